"""Pretraining on hashtags: the pure train/eval steps and the loop around them (``tagjax train``).

Pieces, each usable on its own from a notebook::

    mesh = sharding.create_mesh(config.mesh)
    model = models.create(config.model, num_classes)
    state = create_train_state(config, model, mesh, num_classes)          # born sharded
    step_fn = jit_train_step(config, model, mesh, state)                   # one jitted, donating step
    state, metrics = step_fn(state, sharding.global_batch(batch, mesh))

and :func:`train_and_evaluate` (config, workdir), which adds the data, evaluation, NaN guard, logging
(``metrics.jsonl`` + TensorBoard), MFU, profiling and checkpoints (tagjax.checkpoint).

**The state** (:class:`TrainState`) is a plain pytree: ``step`` (int32, optimizer updates done), ``params``,
``batch_stats``, ``opt_state`` (momentum; see tagjax.optim for why the learning rate lives outside it) and
``rng``. Images seen are ``step * config.train.batch_size``, computed on the host as a Python int (JAX runs
without 64-bit integers, and IG-3.5B passes 2^31 images).

**One step** takes the *global* batch of ``config.train.batch_size`` images (uint8, normalized on the
device). With ``grad_accum_steps = A`` it is split into A micro-batches that are run one after the other
(``lax.scan``) and their gradients averaged. The split is by whole batch-norm groups, taken in a strided
order (micro-batch j = groups j, j+A, j+2A, ...) so that every device keeps working on images it already
holds, and each micro-batch's batch-norm running statistics are computed from the same starting point
and averaged. Together these make A micro-batches give exactly the update of one step on the whole batch
whenever batch-norm statistics are per group (``config.model.bn_group_size > 0``). With global statistics
(``bn_group_size = 0``) and A > 1, the statistics are those of each micro-batch.

**Batch norm and devices.** Group statistics are taken over fixed positions of the global batch, whatever
the number of devices, so a run's numbers do not change with the device count; the per-device batch
should be a multiple of the group size so that no group spans two devices (a warning says when not).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tagjax import losses, optim, sharding
from tagjax.errors import UserError

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")
TRAIN_BATCH_KEYS = ("image", "labels")
EVAL_BATCH_KEYS = ("image", "labels", "mask")

# Dense bf16/fp16 matrix peak per chip, FLOP/s, from the vendors' datasheets (without sparsity). Matched as
# substrings of jax's device_kind, first match wins (so "v5 lite" precedes "v5", "PCIe" precedes "H100").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("V100", 125e12),  # fp16 tensor cores (V100 has no bf16)
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU7x", 2307e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """The table's peak for ``device_kind`` (``jax.devices()[0].device_kind``); None if unknown or CPU."""
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return flops
    return None


# ----------------------------------------------------------------------------------------------------
# Train state
# ----------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree (checkpointed as is by tagjax.checkpoint)."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    batch_stats: Any
    opt_state: Any
    # Typed PRNG key, carried and checkpointed with the run. The ResNeXt family draws no randomness in
    # its step (augmentation happens in the input pipeline), so the step passes it through unchanged; a
    # stochastic layer would take fold_in(rng, step), which stays reproducible across restarts.
    rng: jax.Array

    def images_seen(self, batch_size: int) -> int:
        """Host int: ``step * batch_size`` (a device->host transfer of one scalar)."""
        return int(jax.device_get(self.step)) * int(batch_size)


def _init_fn(config, model, tx, image_shape):
    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        variables = model.init(params_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=state_rng,
        )

    return init


def _image_shape(config) -> tuple[int, int, int]:
    size = int(config.data.image_size)
    return (size, size, 3)


def state_shardings(config, mesh: Mesh, abstract_state: TrainState) -> TrainState:
    """A NamedSharding for every leaf: step and rng replicated, the rest by the FSDP rule."""
    min_size = int(config.mesh.get("fsdp_min_size", 2**18))
    shardings = sharding.tree_shardings(abstract_state, mesh, min_size)
    return shardings.replace(step=sharding.replicated(mesh), rng=sharding.replicated(mesh))


def abstract_train_state(config, model, mesh: Mesh, num_classes: int | None = None) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct``s carrying this mesh's shardings (the checkpoint restore target).

    ``num_classes`` is accepted for symmetry with :func:`create_train_state`; the model already has it.
    """
    del num_classes
    tx = optim.make_gradient_transform(config.optim)
    init = _init_fn(config, model, tx, _image_shape(config))
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = state_shardings(config, mesh, abstract)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def create_train_state(config, model, mesh: Mesh, num_classes: int | None = None) -> TrainState:
    """A fresh state, born sharded: ``eval_shape`` gives the shapes, a jitted init writes each device's shard.

    No full copy of the parameters ever exists on one device, which is what lets FSDP hold models larger
    than one device's memory. Values depend on ``config.seed`` only, not on the mesh.
    """
    del num_classes
    tx = optim.make_gradient_transform(config.optim)
    init = _init_fn(config, model, tx, _image_shape(config))
    rng = jax.random.key(int(config.seed))
    abstract = jax.eval_shape(init, rng)
    shardings = state_shardings(config, mesh, abstract)
    return jax.jit(init, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------


def normalize_images(images: jax.Array, data_config, dtype) -> jax.Array:
    """uint8 [B, H, W, 3] -> (x/255 - mean) / std in ``dtype``: on the device, so the host ships bytes."""
    mean = jnp.asarray(data_config.mean, jnp.float32) * 255.0
    inv_std = 1.0 / (jnp.asarray(data_config.std, jnp.float32) * 255.0)
    return ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)


def _compute_dtype(config):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(
        str(config.model.dtype), jnp.float32
    )


def microbatch_group(config) -> int:
    """The unit in which a batch is split into micro-batches: one batch-norm group (1 for global BN)."""
    return max(int(config.model.bn_group_size), 1)


def split_microbatches(x: jax.Array, num_micro: int, group: int) -> jax.Array:
    """[B, ...] -> [A, B/A, ...] by whole groups of ``group`` consecutive images, strided.

    Micro-batch j holds groups j, j+A, j+2A, ... Reshaping [B] as [B/(A*g), A, g] keeps each device's
    contiguous shard of the batch in place (when the per-device batch is a multiple of A*g), so the split
    moves no data between devices, and every batch-norm group stays whole.
    """
    b = x.shape[0]
    x = x.reshape((b // (num_micro * group), num_micro, group, *x.shape[1:]))
    x = jnp.moveaxis(x, 1, 0)
    return x.reshape((num_micro, b // num_micro, *x.shape[3:]))


def validate_batch_layout(config, mesh: Mesh) -> None:
    """Refuses batch sizes the step cannot split; warns when batch-norm groups straddle devices."""
    batch = int(config.train.batch_size)
    accum = int(config.train.grad_accum_steps)
    group = microbatch_group(config)
    n_dev = mesh.devices.size
    if accum < 1:
        raise UserError(
            f"config.train.grad_accum_steps={accum}: use 1 or more micro-batches per step."
        )
    if batch % n_dev:
        raise UserError(
            f"config.train.batch_size={batch} is not divisible by the {n_dev} devices: use a multiple of {n_dev}."
        )
    if batch % (accum * group):
        raise UserError(
            f"config.train.batch_size={batch} does not split into {accum} micro-batches of whole batch-norm "
            f"groups of {group}: make it a multiple of grad_accum_steps x bn_group_size = {accum * group}."
        )
    if (batch // (accum * group)) % n_dev:
        log.warning(
            "batch %d / (grad_accum_steps %d x bn_group_size %d) is not a multiple of the %d devices: "
            "micro-batches or batch-norm groups span devices, which costs cross-device traffic every step.",
            batch,
            accum,
            group,
            n_dev,
        )


def make_train_step(
    config,
    model,
    tx: optax.GradientTransformation,
    schedule: optim.Schedule,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """The pure step ``(state, batch) -> (state, metrics)``; jit it with :func:`jit_train_step`.

    ``batch``: {"image": uint8 [B, H, W, 3], "labels": int32 [B, max_labels] padded with -1}, the global
    batch. ``metrics`` are float32 scalars: loss, precision@1 (on the training batch), grad_norm (before
    clipping), param_norm, lr (the rate this update used) and nonfinite (1.0 when loss or gradients were
    NaN/Inf; the update was then not applied).
    """
    accum = int(config.train.grad_accum_steps)
    group = microbatch_group(config)
    loss_name = str(config.loss)
    policy = str(config.train.nan_policy)
    if policy not in NAN_POLICIES:
        raise UserError(
            f"config.train.nan_policy={policy!r}: choose one of {', '.join(NAN_POLICIES)}."
        )
    dtype = _compute_dtype(config)
    losses.per_image_loss(
        loss_name, jnp.zeros((1, 2)), jnp.zeros((1, 1), jnp.int32)
    )  # validates the name
    micro_sharding = None if mesh is None else NamedSharding(mesh, P(None, sharding.BATCH_AXES))

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            normalize_images(images, config.data, dtype),
            train=True,
            mutable=["batch_stats"],
        )
        loss = losses.batch_loss(loss_name, logits, labels)
        p1 = jnp.mean(losses.precision_at_k(logits, labels, 1))
        return loss, (updates["batch_stats"], p1)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(state: TrainState, batch):
        if accum == 1:
            (loss, (stats, p1)), grads = grad_fn(
                state.params, state.batch_stats, batch["image"], batch["labels"]
            )
            return loss, p1, stats, grads
        images = split_microbatches(batch["image"], accum, group)
        labels = split_microbatches(batch["labels"], accum, group)
        if micro_sharding is not None:
            images = jax.lax.with_sharding_constraint(images, micro_sharding)
            labels = jax.lax.with_sharding_constraint(labels, micro_sharding)

        def body(carry, micro):
            (loss, (stats, p1)), grads = grad_fn(state.params, state.batch_stats, *micro)
            # Every micro-batch starts from the same running statistics; their updates are averaged below.
            return jax.tree.map(jnp.add, carry, (loss, p1, stats, grads)), None

        zeros = jax.tree.map(
            jnp.zeros_like, (jnp.float32(0), jnp.float32(0), state.batch_stats, state.params)
        )
        total, _ = jax.lax.scan(body, zeros, (images, labels))
        return jax.tree.map(lambda t: t / accum, total)

    def train_step(state: TrainState, batch):
        loss, p1, new_stats, grads = gradients(state, batch)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        lr = schedule(state.step)
        new_params = optim.apply_updates(state.params, updates, lr)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Both policies keep a non-finite update out of the state; "stop" then ends the run on the host.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            batch_stats=keep(new_stats, state.batch_stats),
            opt_state=keep(new_opt_state, state.opt_state),
        )
        metrics = {
            "loss": loss,
            "precision@1": p1,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(new_state.params),
            "lr": lr,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

    return train_step


def jit_train_step(
    config, model, mesh: Mesh, state: TrainState, *, schedule: optim.Schedule | None = None
):
    """``make_train_step`` jitted with the state's shardings in and out, the batch split over the mesh,
    metrics replicated, and the input state donated (its buffers are reused for the new state)."""
    tx = optim.make_gradient_transform(config.optim)
    if schedule is None:
        schedule = optim.make_schedule(
            config.optim, int(config.train.batch_size), int(config.train.total_images)
        )
    step = make_train_step(config, model, tx, schedule, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(config, model) -> Callable[[TrainState, Mapping[str, jax.Array]], dict]:
    """``(state, batch) -> {"loss_sum", "count", "scores"}`` on held-out batches.

    ``loss_sum`` and ``count`` are sums over real images (``mask`` True and at least one label), so batches
    and the padded last batch add up exactly. ``scores`` [B, num_classes] are the model's probabilities
    (softmax, or sigmoid for the sigmoid loss) for tagjax.evaluate's hashtag metrics (mAP, precision and
    recall@k, head/torso/tail), which rank images per label and so need probabilities, not logits.
    """
    loss_name = str(config.loss)
    dtype = _compute_dtype(config)

    def eval_step(state: TrainState, batch):
        logits = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            normalize_images(batch["image"], config.data, dtype),
            train=False,
        )
        labels = batch["labels"]
        mask = batch["mask"].astype(jnp.float32) * jnp.any(labels >= 0, axis=-1)
        logits = logits.astype(jnp.float32)
        scores = (
            jax.nn.sigmoid(logits) if loss_name == "sigmoid" else jax.nn.softmax(logits, axis=-1)
        )
        return {
            "loss_sum": jnp.sum(losses.per_image_loss(loss_name, logits, labels) * mask),
            "count": jnp.sum(mask),
            "scores": scores,
        }

    return eval_step


def jit_eval_step(config, model, mesh: Mesh, state: TrainState):
    """``make_eval_step`` jitted: state as sharded, batch split over the mesh, scores left split by batch."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    rep = sharding.replicated(mesh)
    return jax.jit(
        make_eval_step(config, model),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings={"loss_sum": rep, "count": rep, "scores": sharding.batch_sharding(mesh)},
    )


def _to_host(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array as one numpy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def evaluate(
    eval_step,
    state: TrainState,
    batches: Iterator[Mapping],
    mesh: Mesh,
    num_classes: int,
    *,
    max_images: int = 0,
    label_counts: np.ndarray | None = None,
    accumulator=None,
) -> dict:
    """Held-out metrics over ``batches`` (per-host eval batches with "mask"): the mean loss and the flat
    scalars of ``tagjax.evaluate.hashtag_metrics`` (mAP, precision@k, recall@k, per frequency bucket).

    Stops after ``max_images`` real images (0 = the whole iterator). ``label_counts`` (training images per
    label) defines the head/torso/tail buckets. ``accumulator`` (default: the exact one) collects the
    scores; ``tagjax.metrics.accumulator_from_config`` picks exact or streamed by size.
    """
    from tagjax import metrics as metrics_lib

    acc = accumulator or metrics_lib.MetricsAccumulator(num_classes, max_images=max_images)
    loss_sum = count = 0.0
    for local in batches:
        batch = sharding.global_batch({k: local[k] for k in EVAL_BATCH_KEYS}, mesh)
        out = eval_step(state, batch)
        acc.update(_to_host(out["scores"]), _to_host(batch["labels"]), _to_host(batch["mask"]))
        loss_sum += float(out["loss_sum"])
        count += float(out["count"])
        if acc.full:
            break
    if acc.count == 0:
        return {"num_images": 0}
    metrics = metrics_lib.scalar_summary(acc.result(label_counts=label_counts))
    metrics["loss"] = loss_sum / max(count, 1.0)
    return metrics


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def setup_runtime(config) -> None:
    """Process-level setup that must precede the first computation: multi-process start and the
    persistent compilation cache (a restart or a second run of the same config skips most compiling)."""
    sharding.maybe_initialize_distributed()
    cache_dir = str(config.train.get("compilation_cache_dir", "") or "")
    if cache_dir and not jax.config.jax_compilation_cache_dir:
        path = Path(cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@dataclasses.dataclass
class DataSource:
    """What the loop needs from the data side (tagjax.input_pipeline)."""

    num_classes: int
    train_iterator: Any  # yields per-host train batches; get_state()/set_state() for checkpoints
    make_eval_iterator: (
        Callable[[], Iterator[Mapping]] | None
    )  # a fresh pass over the held-out split
    metadata: dict  # stored in checkpoints (vocabulary fingerprint, dataset identity)
    label_counts: np.ndarray | None = None  # training images per label (head/torso/tail buckets)


def open_data(config) -> DataSource:
    """The training iterator and held-out batches from ``config.data`` (a built dataset or synthetic)."""
    from tagjax import input_pipeline
    from tagjax import metrics as metrics_lib

    source = input_pipeline.open_source(config)
    if config.data.synthetic:
        task = input_pipeline.synthetic_task(config, "train")
        counts = task.label_index.counts(source.num_classes)
    else:
        counts = metrics_lib.label_counts_of(
            source.dataset_dir, source.num_classes, config.data.train_split
        )
    return DataSource(
        num_classes=source.num_classes,
        train_iterator=input_pipeline.make_train_iterator(config, source),
        make_eval_iterator=functools.partial(input_pipeline.make_eval_iterator, config, source),
        metadata=dict(source.metadata),
        label_counts=counts,
    )


class _Window:
    """Host-side sums of step metrics between two log points, and the wall time of its timed steps.

    Every step's metrics count towards the means; only steps after ``restart_clock`` count towards the
    throughput (so the first step, which includes compilation, is left out of img/s and MFU).
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.start = time.perf_counter()
        self.timed_steps = 0

    def add(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if key != "nonfinite":
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.last_lr = float(metrics["lr"])
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Window means; ``lr`` is the rate of the window's last step (what the run is at now)."""
        out = {key: value / max(self.steps, 1) for key, value in self.sums.items()}
        if self.steps:
            out["lr"] = self.last_lr
        return out


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its newest checkpoint) and returns the final metrics.

    Writes ``workdir/config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and, with
    ``config.train.profile_steps``, ``profile/``.
    """
    setup_runtime(config)
    from tagjax.metrics_writer import as_path

    workdir = as_path(workdir)  # a local path, or gs://... (etils.epath) on Cloud TPU
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        from tagjax import config as config_lib

        (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")

    batch_size = int(config.train.batch_size)
    total_images = int(config.train.total_images)
    num_steps = total_images // batch_size
    if num_steps < 1:
        raise UserError(
            f"config.train.total_images={total_images} is less than one batch of {batch_size}: raise it."
        )
    policy = str(config.train.nan_policy)
    if policy not in NAN_POLICIES:
        raise UserError(
            f"config.train.nan_policy={policy!r}: choose one of {', '.join(NAN_POLICIES)}."
        )
    mesh = sharding.create_mesh(config.mesh)
    validate_batch_layout(config, mesh)
    n_dev = mesh.devices.size
    device_kind = jax.devices()[0].device_kind

    data = open_data(config)
    from tagjax import models

    model = models.create(config.model, data.num_classes)
    schedule = optim.make_schedule(config.optim, batch_size, total_images)
    train_flops = 3.0 * models.flops_per_image(
        config.model, int(config.data.image_size), data.num_classes
    )
    peak = peak_flops_per_device(device_kind)

    # --- state: restore the newest checkpoint, or initialize ---------------------------------------
    manager = _checkpoint_manager(config, workdir, data)
    try:
        abstract = abstract_train_state(config, model, mesh, data.num_classes)
        state, _ = manager.restore_latest(abstract, data.train_iterator)
    except (
        BaseException
    ):  # e.g. a checkpoint of another experiment: release Orbax's threads, then say so
        manager.close()
        if hasattr(data.train_iterator, "close"):
            data.train_iterator.close()
        raise
    if state is None:
        state = create_train_state(config, model, mesh, data.num_classes)
    start_step = int(jax.device_get(state.step))
    log.info(
        "model %s, %d classes, %s parameters; mesh data=%d x fsdp=%d on %d %s device(s); %s",
        config.model.name,
        data.num_classes,
        f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
        mesh.shape["data"],
        mesh.shape["fsdp"],
        n_dev,
        device_kind,
        f"resuming at step {start_step:,}" if start_step else "starting fresh",
    )

    train_step = jit_train_step(config, model, mesh, state, schedule=schedule)
    eval_step = jit_eval_step(config, model, mesh, state)
    writer = _metric_writer(workdir, is_main, start_step)
    if start_step == 0 and is_main:
        from tagjax import config as config_lib

        writer.write_text("config", "```\n" + config_lib.to_json(config) + "\n```")

    log_every = int(config.train.log_every_images)
    eval_every = int(config.train.eval_every_images)
    profile = tuple(int(s) for s in config.train.get("profile_steps", ()) or ())
    max_bad = int(config.train.get("max_consecutive_nonfinite", 20))

    def crossed(step: int, every: int) -> bool:
        return every > 0 and (step * batch_size) // every > ((step - 1) * batch_size) // every

    def run_eval(step: int) -> dict:
        if data.make_eval_iterator is None:
            return {}
        from tagjax import metrics as metrics_lib

        start = time.perf_counter()
        batches = data.make_eval_iterator()
        max_images = int(config.train.eval_max_images)
        result = evaluate(
            eval_step,
            state,
            batches,
            mesh,
            data.num_classes,
            max_images=max_images,
            label_counts=data.label_counts,
            accumulator=metrics_lib.accumulator_from_config(
                config, data.num_classes, int(getattr(batches, "num_images", 0)), max_images
            ),
        )
        result["seconds"] = time.perf_counter() - start
        window.start += result["seconds"]  # evaluation time is not training throughput
        writer.write("eval", step, step * batch_size, result)
        shown = ("loss", "mAP", "precision@1", "precision@5", "recall@5", "num_images")
        _print(
            is_main,
            f"eval at step {step:,}: "
            + ", ".join(f"{k} {_fmt(result[k])}" for k in shown if k in result),
        )
        return result

    from tqdm.auto import tqdm

    bar = tqdm(
        total=num_steps * batch_size,
        initial=start_step * batch_size,
        unit="img",
        unit_scale=True,
        disable=None if is_main else True,  # None: off when stderr is not a terminal (log files)
        dynamic_ncols=True,
    )
    window = _Window()
    pending: tuple[int, Any] | None = None  # (step number, device metrics) not yet fetched
    skipped_total = 0
    consecutive_bad = 0
    last_train: dict = {}
    last_eval: dict = {}
    run_start = time.perf_counter()
    first_step_done_at: float | None = None
    profiling = False
    step = start_step

    def collect(done_step: int, device_metrics) -> None:
        """Fetch one step's metrics (the step is finished by then), apply the NaN policy, accumulate."""
        nonlocal skipped_total, consecutive_bad
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if metrics["nonfinite"] > 0:
            if policy == "stop":
                raise UserError(
                    f"the loss or the gradients became NaN/Inf at step {done_step:,} "
                    f"({done_step * batch_size:,} images seen; that update was not applied): lower "
                    "config.optim.base_lr, set config.optim.grad_clip_norm, or set "
                    "config.train.nan_policy=skip to skip such updates."
                )
            skipped_total += 1
            consecutive_bad += 1
            log.warning(
                "step %d: non-finite loss or gradients; update skipped (%d so far)",
                done_step,
                skipped_total,
            )
            if consecutive_bad > max_bad:
                raise UserError(
                    f"{consecutive_bad} consecutive updates were NaN/Inf (up to step {done_step:,}), more than "
                    f"config.train.max_consecutive_nonfinite={max_bad}: the run diverged; lower "
                    "config.optim.base_lr or restart from an earlier checkpoint."
                )
            return
        consecutive_bad = 0
        window.add(metrics)

    try:
        for step in range(start_step, num_steps):
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(workdir / "profile"))
                profiling = True
            local = next(data.train_iterator)
            batch = sharding.global_batch({k: local[k] for k in TRAIN_BATCH_KEYS}, mesh)
            state, metrics = train_step(state, batch)
            if pending is not None:
                collect(*pending)  # the previous step: fetching it lets this one run meanwhile
            pending = (step + 1, metrics)
            done = step + 1
            window.timed_steps += 1
            bar.update(batch_size)
            if profiling and done == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
                _print(
                    is_main,
                    f"profile of steps {profile[0]}-{profile[1] - 1} written to {workdir / 'profile'}",
                )
            if first_step_done_at is None:
                collect(*pending)
                pending = None
                first_step_done_at = time.perf_counter()
                window.restart_clock()  # throughput excludes the first step (compilation)
                writer.write(
                    "train",
                    done,
                    done * batch_size,
                    {"compile_seconds": first_step_done_at - run_start},
                )
            if crossed(done, log_every) or done == num_steps:
                if pending is not None:
                    collect(*pending)
                    pending = None
                last_train = _log_window(
                    writer,
                    window,
                    done,
                    num_steps,
                    batch_size,
                    n_dev,
                    train_flops,
                    peak,
                    skipped_total,
                    is_main,
                    bar,
                )
                window = _Window()
            if crossed(done, eval_every):
                last_eval = run_eval(done)
            if manager.should_save(done):
                manager.save(done, state, data.train_iterator)
                if manager.preempted:
                    _print(is_main, f"preempted: checkpoint at step {done:,} saved; stopping.")
                    break
        if pending is not None:
            collect(*pending)
            pending = None
        if profiling:
            jax.profiler.stop_trace()
        final_step = int(jax.device_get(state.step))
        if final_step == num_steps > start_step and not crossed(final_step, eval_every):
            last_eval = run_eval(final_step)
        manager.save(final_step, state, data.train_iterator)
    finally:
        bar.close()
        if hasattr(data.train_iterator, "close"):
            data.train_iterator.close()  # stops grain's prefetch threads / worker processes
        manager.close()
        writer.close()

    summary = {
        "step": final_step,
        "images_seen": final_step * batch_size,
        "skipped_steps": skipped_total,
        "wall_seconds": time.perf_counter() - run_start,
        **{f"train_{k}": v for k, v in last_train.items()},
        **{f"eval_{k}": v for k, v in last_eval.items()},
    }
    _print(
        is_main,
        f"done: {final_step:,} steps, {final_step * batch_size:,} images in "
        f"{_format_duration(summary['wall_seconds'])}; "
        + ", ".join(
            f"{k} {_fmt(summary[k])}"
            for k in ("train_loss", "eval_loss", "eval_mAP", "eval_precision@1", "skipped_steps")
            if k in summary
        )
        + f"; logs in {workdir}",
    )
    return summary


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _print(is_main: bool, line: str) -> None:
    if is_main:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)


def _log_window(
    writer, window, step, num_steps, batch_size, n_dev, train_flops, peak, skipped, is_main, bar
) -> dict:
    seconds = time.perf_counter() - window.start
    metrics = window.means()
    if window.timed_steps and seconds > 0:
        rate = window.timed_steps * batch_size / seconds
        metrics["images_per_second"] = rate
        metrics["images_per_second_per_device"] = rate / n_dev
        metrics["step_seconds"] = seconds / window.timed_steps
        if peak:
            metrics["mfu"] = rate * train_flops / (peak * n_dev)
        eta = (num_steps - step) * batch_size / rate
    else:
        eta = float("nan")
    metrics["skipped_steps"] = skipped
    writer.write("train", step, step * batch_size, metrics)
    writer.flush()
    parts = [
        f"step {step:,}/{num_steps:,}",
        f"{step * batch_size:,} img",
        f"loss {metrics.get('loss', float('nan')):.4f}",
        f"lr {metrics.get('lr', float('nan')):.4g}",
        f"|g| {metrics.get('grad_norm', float('nan')):.3g}",
    ]
    if "images_per_second" in metrics:
        parts.append(
            f"{metrics['images_per_second']:,.0f} img/s ({metrics['images_per_second_per_device']:,.0f}/device)"
        )
    parts.append(f"MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "MFU n/a")
    if skipped:
        parts.append(f"skipped {skipped}")
    parts.append(f"ETA {_format_duration(eta)}")
    if bar is not None and not bar.disable:
        bar.set_postfix_str(f"loss {metrics.get('loss', float('nan')):.3f}", refresh=False)
    _print(is_main, " | ".join(parts))
    return metrics


def _metric_writer(workdir, is_main: bool, start_step: int):
    from tagjax.metrics_writer import MetricWriter

    return MetricWriter(
        workdir, enabled=is_main, resume_step=start_step if start_step > 0 else None
    )


def _checkpoint_manager(config, workdir, data: DataSource):
    """tagjax.checkpoint's manager, storing the data source's identity (vocabulary) with every save."""
    from tagjax import checkpoint

    metadata = dict(data.metadata)
    metadata["num_classes"] = data.num_classes
    return checkpoint.CheckpointManager(workdir, config, metadata)


# ----------------------------------------------------------------------------------------------------
# CLI: tagjax train
# ----------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="config file (configs/NAME.py[:arg], or a bare NAME from configs/); override fields with "
        "--config.key=value",
    )
    parser.add_argument(
        "--workdir",
        required=True,
        help="run directory: checkpoints, metrics.jsonl, TensorBoard events; rerun to resume",
    )


def run(args) -> int:
    from tagjax import config as config_lib

    if not logging.getLogger().handlers:
        # Libraries speak at WARNING and above; tagjax's own progress (restores, saves) at INFO.
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    logging.getLogger("tagjax").setLevel(logging.INFO)
    cfg = config_lib.load(args.config, args.config_overrides)
    train_and_evaluate(cfg, args.workdir)
    return 0
