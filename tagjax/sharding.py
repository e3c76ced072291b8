"""The device mesh, how the train state and batches are laid out on it, and multi-process start-up.

Mesh axes ``("data", "fsdp")`` (``config.mesh``). Both shard the batch: every device computes on its own
slice of the global batch (data parallelism over data x fsdp devices). They differ in the parameters:
along ``data`` they are replicated; along ``fsdp`` each large parameter (and its optimizer state) is split
on its largest dimension divisible by the fsdp size, so a model too big for one device's memory fits on
the group (ZeRO-3 / FSDP). XLA inserts the all-gathers and reduce-scatters; the step is one ``jax.jit``.

Multi-process runs (several hosts, or several processes on one host) must call
:func:`maybe_initialize_distributed` before anything else touches JAX. It starts ``jax.distributed`` when
the environment says this is one of several processes:

* ``JAX_COORDINATOR_ADDRESS=host:port`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (launch/local.sh,
  or any launcher; ``JAX_LOCAL_DEVICE_IDS`` picks this process's GPUs);
* SLURM with more than one task (``srun``; JAX reads ``SLURM_*`` itself);
* a multi-host Cloud TPU VM slice (``TPU_WORKER_HOSTNAMES`` lists more than one worker; JAX asks the TPU
  metadata for the rest).

A single process (a laptop, one GPU box, one TPU VM) needs none of this.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tagjax.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over both axes


def _distributed_environment() -> str | None:
    """Which launcher asked for several processes, or None for a single process."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
        return "SLURM"
    workers = (
        os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    )
    if len([w for w in workers.split(",") if w.strip()]) > 1:
        return "TPU"
    return None


# How long a process that finished waits at exit for the others to finish too (JAX's default is 300 s).
# The run itself ends with a barrier (tagjax.train), so the processes arrive here within seconds of each
# other; a longer wait means one of them died or hangs.
DEFAULT_SHUTDOWN_TIMEOUT_S = 60


def _shutdown_distributed(timeout: int) -> None:
    try:
        jax.distributed.shutdown()
    except Exception as e:
        index = jax.process_index()
        print(
            f"tagjax: process {index}: the other processes did not reach the end of the run within "
            f"{timeout} s (one of them died or hangs; see its log); exiting without them "
            f"({type(e).__name__}).",
            file=sys.stderr,
        )
        sys.stderr.flush()
        os._exit(1)


def maybe_initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when launched as one of several processes; True if it did.

    Safe to call twice (the second call does nothing). Must run before the first JAX computation.
    """

    if jax.distributed.is_initialized():
        return True
    source = _distributed_environment()
    if source is None:
        return False
    kwargs = {}
    if source == "JAX_COORDINATOR_ADDRESS":
        # JAX reads the address itself but not these two; a launcher without cluster detection needs them.
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise UserError(
                f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not: set all three "
                "(see launch/local.sh), or unset JAX_COORDINATOR_ADDRESS for a single-process run."
            )
        kwargs = dict(
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    log.info("starting jax.distributed (%s)", source)
    timeout = int(os.environ.get("TAGJAX_SHUTDOWN_TIMEOUT_S", DEFAULT_SHUTDOWN_TIMEOUT_S))
    jax.distributed.initialize(**kwargs, shutdown_timeout_seconds=timeout)
    # Runs before JAX's own exit hook (atexit is last-in, first-out), so a process that waits in vain
    # for the others at the end says so in one line instead of a gRPC error after 5 minutes.
    atexit.register(_shutdown_distributed, timeout)
    log.info(
        "process %d of %d, %d local devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )
    return True


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes: ``-1`` on one axis takes all devices the other leaves."""
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if data == -1 and fsdp == -1:
        raise UserError(
            "config.mesh.data and config.mesh.fsdp are both -1: set at most one of them to -1."
        )
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if known <= 0 or num_devices % known:
            raise UserError(
                f"config.mesh ({data=}, {fsdp=}) does not divide {num_devices} devices: use sizes whose product "
                "is the device count."
            )
        data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
    if data <= 0 or fsdp <= 0 or data * fsdp != num_devices:
        raise UserError(
            f"config.mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {num_devices} are available: "
            "make the product equal the device count (or set one axis to -1)."
        )
    return data, fsdp


def create_mesh(mesh_config, devices=None) -> Mesh:
    """The ("data", "fsdp") mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: jit propagates shardings from the in/out shardings we give it (no explicit-sharding types).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
    """Images each process loads for one global batch; refuses sizes the mesh cannot split evenly."""
    n_dev = mesh.devices.size
    if global_batch % n_dev:
        raise UserError(
            f"batch size {global_batch} is not divisible by the {n_dev} devices of the mesh: pick a multiple "
            f"of {n_dev} (config.train.batch_size, or a micro-batch size with grad_accum_steps)."
        )
    return global_batch // jax.process_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device; the other dimensions whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """Split the largest dimension divisible by ``fsdp_size`` over "fsdp"; small or indivisible: replicate.

    Conv kernels are HWIO, so this usually splits the output channels (or the input channels of a wide
    1x1 conv); the ``fc`` kernel of a 17k head splits its class dimension. Leaves under ``min_size``
    elements (BN vectors, biases) stay replicated: sharding them saves nothing and costs a collective each.
    """
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
    for d in dims:
        if shape[d] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(abstract_tree, mesh: Mesh, min_size: int):
    """A NamedSharding per leaf of a pytree of arrays / ShapeDtypeStructs, by :func:`fsdp_spec`."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)), abstract_tree
    )


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch -> dict of global jax.Arrays split over the batch axes of ``mesh``.

    Each process passes the images it loaded (``batch_size_per_process`` of them); the global batch is their
    concatenation in process order (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * n_proc, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
