"""One prepared accelerator check: five time-boxed steps, one JSON record, under 9 minutes on one H100/H200.

Accelerator time comes in short windows, so this script measures everything the project needs to know
from a GPU in one go, and leaves a complete record even when it is cut off:

1. ``environment``: devices, jax / jaxlib / CUDA versions, XLA flags and JAX environment variables.
2. ``correctness``: one ResNeXt block and a ResNet-50 forward + backward in bf16 on the accelerator
   against the same in fp32 on the CPU (max relative difference over outputs and gradients), and the two
   grouped-convolution implementations (``config.model.grouped_conv``) against each other.
3. ``throughput``: the trainer's jitted step on synthetic device-resident batches, bf16: ResNet-50 and
   ResNeXt-101 32x8d with both grouped-conv modes, 32x16d when time allows: images/s, step time, MFU
   against the device's peak, peak memory (benchmarks/train_throughput.py's ``measure``).
4. ``input_pipeline``: a dataset built by ``tagjax build`` on local disk, its per-core decode + augment
   and whole-pipeline rates, the same step fed by the pipeline, and the host cores each device needs.
5. ``checkpoint``: async saves of the 32x8d train state between train steps: loop time lost per save.

Sizes and time boxes are in configs/gpu_check.py (``gpu`` plan; ``tiny`` for ``--tiny``). Every task runs
in a forked child process with a deadline; a child that overruns is killed, recorded as ``timed_out``
with whatever it had reported, and the check moves on. The JSON record (schema in benchmarks/README.md)
is rewritten after every task. Run it through the wrapper, which adds a hard cap::

    bash benchmarks/gpu_check.sh --out /tmp/gpu-check          # one GPU, ~8 minutes
    bash benchmarks/gpu_check.sh --cpu --tiny --out /tmp/gpu-check-cpu   # CPU smoke, 15 s (cache warm)

On a GPU machine the environment needs jax's CUDA build: ``TAGJAX_EXTRAS="dev cuda" bash launch/setup.sh``
(the ``cuda`` extra of pyproject.toml, locked in uv.lock). Nothing here needs the internet.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import build_throughput  # noqa: E402
import checkpoint_blocking  # noqa: E402
import grouped_conv  # noqa: E402
import input_throughput  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput  # noqa: E402

from tagjax import (  # noqa: E402
    augment,
    build,
    build_steps,
    checkpoint,
    input_pipeline,
    loop,
    losses,
    models,
    records,
    sampling,
    sharding,
    train,
)
from tagjax import config as config_lib  # noqa: E402
from tagjax.configs import bench_gpu  # noqa: E402

SCHEMA = "tagjax.gpu_check/1"
STEPS = ("environment", "correctness", "throughput", "input_pipeline", "checkpoint")
CUDA_HINT = (
    'install jax\'s CUDA build: TAGJAX_EXTRAS="dev cuda" bash launch/setup.sh (the cuda extra, '
    "jax[cuda12]), or pass --cpu to check on the CPU"
)


# ----------------------------------------------------------------------------------------------------
# What every task gets
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """The task's view of the run: the plan, the options, and the record so far (inherited by fork)."""

    plan: object  # configs/gpu_check.py's ConfigDict
    cpu: bool
    cache_dir: str
    work_dir: Path  # scratch: task reports, the built dataset, checkpoints
    record: dict  # the results of the steps finished so far

    def devices(self) -> list:
        """The device the check measures: the first accelerator (or the first CPU device with --cpu)."""
        return jax.devices()[:1]

    def step_entry(self, step: str) -> dict:
        for s in self.record["steps"]:
            if s["name"] == step:
                return s
        return {}

    def throughput_runs(self) -> dict[str, dict]:
        """Finished throughput runs by name (those that reached their timing)."""
        runs = {}
        for task in self.step_entry("throughput").get("tasks", []):
            result = task.get("result") or {}
            if "images_per_second" in result:
                runs[task["name"]] = result
        return runs

    def fastest_mode(self, model: str) -> str:
        """The grouped-conv mode with the shorter step in this run's throughput step: for ``model`` if
        it was timed in both modes, else for the first model that was (32x16d follows 32x8d), else xla."""
        step_ms: dict[str, dict[str, float]] = {}
        for r in self.throughput_runs().values():
            step_ms.setdefault(r["model"], {})[r["grouped_conv"]] = r["step_ms"]
        both = [m for m, modes in step_ms.items() if len(modes) == len(models.GROUPED_CONV_MODES)]
        if not both:
            return "xla"
        modes = step_ms[model if model in both else both[0]]
        return min(modes, key=modes.get)


def trainer_config(ctx: Context, model: str, batch_per_device: int, grouped_conv: str):
    """configs/bench_gpu.py's config for ``model`` at the plan's sizes, on the one measured device."""
    plan = ctx.plan
    cfg = bench_gpu.get_config(model)
    cfg.model.dtype = plan.dtype
    cfg.model.grouped_conv = ctx.fastest_mode(model) if grouped_conv == "fastest" else grouped_conv
    cfg.model.bn_group_size = int(plan.bn_group_size)
    cfg.data.image_size = int(plan.image_size)
    cfg.train.batch_size = int(batch_per_device) * len(ctx.devices())
    cfg.train.compilation_cache_dir = ctx.cache_dir
    return cfg


def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


# ----------------------------------------------------------------------------------------------------
# 1. environment
# ----------------------------------------------------------------------------------------------------

PACKAGES = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "numpy",
    "simplejpeg",
    "opencv-python-headless",
)
CUDA_VERSION_QUERIES = (
    "cuda_runtime_get_version",
    "cuda_driver_get_version",
    "cudnn_get_version",
    "cublas_get_version",
    "cufft_get_version",
    "cusolver_get_version",
    "cusparse_get_version",
)


def _cuda_versions() -> dict:
    """CUDA library versions as the jax CUDA plugin reports them (empty without the plugin)."""
    out = {}
    try:
        from jax._src.lib import cuda_versions  # the plugin's own version queries; no public API
    except ImportError:
        return out
    if cuda_versions is None:
        return out
    for name in CUDA_VERSION_QUERIES:
        with contextlib.suppress(Exception):
            out[name.removesuffix("_get_version")] = int(getattr(cuda_versions, name)())
    return out


def _nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit,pcie.link.gen.max"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    return (out.stdout or out.stderr).strip()


def task_environment(ctx: Context, report: Callable[[dict], None]) -> dict:
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    result = {
        "versions": versions,
        "cuda": _cuda_versions(),
        "nvidia_smi": _nvidia_smi(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("JAX_", "XLA_", "TF_", "NCCL_", "CUDA_VISIBLE", "TPU_"))
        },
        "host": {
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    report(result)  # versions survive even if the backend hangs on start
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    result.update(
        {
            "default_backend": jax.default_backend(),
            "device_count": len(devices),
            "devices": [
                {"id": d.id, "platform": d.platform, "kind": d.device_kind} for d in devices
            ],
            "measured_device": f"{devices[0].platform}:{devices[0].device_kind}",
            "device_memory_bytes": stats.get("bytes_limit"),
            "peak_flops_per_device": loop.peak_flops_per_device(devices[0].device_kind),
        }
    )
    return result


# ----------------------------------------------------------------------------------------------------
# 2. correctness
# ----------------------------------------------------------------------------------------------------


def compare(test, ref) -> dict:
    """How far ``test`` is from ``ref`` (two pytrees of arrays of the same structure).

    ``rel_diff``: ||test - ref|| / ||ref|| over all tensors together (what is judged);
    ``max_rel_diff``: the same for the worst single tensor, and ``worst_tensor`` its path;
    ``max_elementwise_rel_diff``: the worst tensor's max|test - ref| / max|ref|. The per-tensor numbers
    run high where a gradient is a sum that nearly cancels (the bias gradient of a batch norm: its terms
    have zero mean), so they are reported, not judged.
    """
    flat_test = jax.tree_util.tree_leaves_with_path(jax.device_get(test))
    flat_ref = jax.tree.leaves(jax.device_get(ref))
    worst, where, worst_elementwise, sq_diff, sq_ref = 0.0, "", 0.0, 0.0, 0.0
    for (path, a), b in zip(flat_test, flat_ref, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff_norm, ref_norm = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
        rel = diff_norm / ref_norm if ref_norm > 0 else diff_norm
        if not np.isfinite(rel) or rel > worst:
            worst, where = rel, jax.tree_util.keystr(path)
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        elementwise = float(np.max(np.abs(a - b))) / scale if scale > 0 else 0.0
        worst_elementwise = max(worst_elementwise, elementwise)
        sq_diff += diff_norm**2
        sq_ref += ref_norm**2
    return {
        "rel_diff": _round((sq_diff / sq_ref) ** 0.5 if sq_ref > 0 else sq_diff**0.5),
        "max_rel_diff": _round(worst),
        "worst_tensor": where,
        "max_elementwise_rel_diff": _round(worst_elementwise),
    }


def judge(what: str, outputs, gradients, tolerances: tuple[float, float]) -> dict:
    """One comparison: outputs and gradients, each (test, reference), against its two tolerances."""
    out = {"what": what, "outputs": compare(*outputs), "gradients": compare(*gradients)}
    out["tolerance"] = {"outputs": float(tolerances[0]), "gradients": float(tolerances[1])}
    out["pass"] = all(out[k]["rel_diff"] <= out["tolerance"][k] for k in ("outputs", "gradients"))
    return out


def _on(device, tree):
    return jax.device_put(tree, device)


def _block_check(plan, accel, cpu) -> dict:
    """One ResNeXt block (train mode: batch-norm statistics of the batch), its loss and the gradients
    w.r.t. parameters and input: bf16 on ``accel`` vs fp32 on ``cpu``, and the two grouped-conv modes
    against each other in fp32 on ``accel``."""
    c = plan.correctness
    tol = c.tolerance
    spec = models.get_spec(c.block_arch)
    stage = int(c.block_stage) - 1
    hw = int(plan.image_size) // 4 // (2**stage)  # stem /4, then /2 per later stage
    args = (spec, stage)
    with jax.default_device(cpu):
        ref_fn, (params, x32) = grouped_conv.block_step(
            *args, "xla", jnp.float32, c.block_batch, hw
        )
        x = x32.astype(jnp.bfloat16).astype(jnp.float32)  # the same inputs on both sides
        reference = ref_fn(params, x)
    with jax.default_device(accel):
        bf16_fn, _ = grouped_conv.block_step(*args, "xla", jnp.bfloat16, c.block_batch, hw)
        low = bf16_fn(_on(accel, params), _on(accel, x.astype(jnp.bfloat16)))
        with jax.default_matmul_precision("highest"):
            modes = {}
            for mode in models.GROUPED_CONV_MODES:
                fn, _ = grouped_conv.block_step(*args, mode, jnp.float32, c.block_batch, hw)
                modes[mode] = fn(_on(accel, params), _on(accel, x))
    where = (
        f"{c.block_arch} stage {c.block_stage} block (width {spec.block_width(stage)}, "
        f"{spec.groups} groups, {hw}x{hw} map, batch {c.block_batch})"
    )
    xla, block_diagonal = modes["xla"], modes["block_diagonal"]
    return {
        "block": judge(
            f"{where}: bf16 on the accelerator vs fp32 on the CPU",
            (low[0], reference[0]),
            (low[1], reference[1]),
            (tol.bf16, tol.bf16),
        ),
        "grouped_conv_modes": judge(
            f"{where}: block_diagonal vs xla, fp32 on the accelerator",
            (block_diagonal[0], xla[0]),
            (block_diagonal[1], xla[1]),
            (tol.modes, tol.modes),
        ),
    }


def _model_check(plan, accel, cpu) -> dict:
    """A whole model's forward + backward (logits, parameter gradients) at its training init, on
    ``accel`` against fp32 on ``cpu``: in fp32 (highest matmul precision: different kernels, the same
    sums) and in bf16. The bf16 gradients get a looser tolerance: the backward pass of batch norm over a
    few images amplifies bf16 rounding (measured on XLA:CPU, whose bf16 convs accumulate in fp32:
    ResNet-50 gradients differ by ~5% overall, some single tensors by ~20%)."""
    c = plan.correctness
    tol = c.tolerance
    size, n = int(plan.image_size), int(plan.num_classes)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((int(c.model_batch), size, size, 3)).astype(np.float32)
    labels = rng.integers(0, n, (int(c.model_batch), 2)).astype(np.int32)

    def forward_backward(dtype: str):
        model = models.create({"name": c.model, "dtype": dtype, "bn_group_size": 0}, n)

        def run(params, batch_stats, images, labels):
            def loss_fn(params):
                logits, _ = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    images.astype(model.dtype),
                    train=True,
                    mutable=["batch_stats"],
                )
                return losses.batch_loss("softmax", logits, labels), logits.astype(jnp.float32)

            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return {"loss": loss, "logits": logits, "grads": grads}

        return model, jax.jit(run)

    model, fp32_fn = forward_backward("float32")
    _, bf16_fn = forward_backward("bfloat16")
    with jax.default_device(cpu):
        variables = jax.jit(lambda rng, x: model.init(rng, x, train=False))(
            jax.random.key(0), jnp.zeros((1, size, size, 3))
        )
    cpu_args = _on(cpu, (variables["params"], variables["batch_stats"], images, labels))
    accel_args = _on(accel, cpu_args)

    def compile_one(job):
        fn, args, precision = job
        with jax.default_matmul_precision(precision):
            return fn.lower(*args).compile()

    # Compile the three programs at once (XLA releases the GIL while compiling).
    jobs = [(fp32_fn, cpu_args, "highest"), (bf16_fn, accel_args, "default")]
    if accel != cpu:  # with --cpu the fp32 comparison is the CPU against itself: no second compile
        jobs.append((fp32_fn, accel_args, "highest"))
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        ref_exe, bf16_exe, *fp32_exe = pool.map(compile_one, jobs)
    ref = ref_exe(*cpu_args)
    bf16 = bf16_exe(*accel_args)
    fp32 = fp32_exe[0](*accel_args) if fp32_exe else ref_exe(*accel_args)
    where = f"{c.model}, batch {c.model_batch}, {size} px"
    out = {
        "fp32": judge(
            f"{where}: fp32 on the accelerator vs fp32 on the CPU",
            (fp32["logits"], ref["logits"]),
            (fp32["grads"], ref["grads"]),
            (tol.fp32, tol.fp32),
        ),
        "bf16": judge(
            f"{where}: bf16 on the accelerator vs fp32 on the CPU",
            (bf16["logits"], ref["logits"]),
            (bf16["grads"], ref["grads"]),
            (tol.bf16, tol.bf16_model_gradients),
        ),
    }
    out["loss"] = {
        k: float(v["loss"]) for k, v in (("cpu_fp32", ref), ("fp32", fp32), ("bf16", bf16))
    }
    return out


def task_correctness(ctx: Context, report: Callable[[dict], None]) -> dict:
    accel, cpu = ctx.devices()[0], jax.devices("cpu")[0]
    result = {
        "accelerator": f"{accel.platform}:{accel.device_kind} bfloat16",
        "reference": "cpu float32",
    }
    result.update(_block_check(ctx.plan, accel, cpu))
    report(result)
    model = _model_check(ctx.plan, accel, cpu)
    result.update({"model_fp32": model["fp32"], "model_bf16": model["bf16"], "loss": model["loss"]})
    checks = ("block", "grouped_conv_modes", "model_fp32", "model_bf16")
    result["pass"] = all(result[k]["pass"] for k in checks)
    return result


# ----------------------------------------------------------------------------------------------------
# 3. throughput
# ----------------------------------------------------------------------------------------------------


def task_throughput(ctx: Context, report: Callable[[dict], None], run: dict) -> dict:
    plan = ctx.plan.throughput
    cfg = trainer_config(ctx, run["model"], run["batch_per_device"], run["grouped_conv"])
    return train_throughput.measure(
        cfg,
        int(ctx.plan.num_classes),
        steps=int(plan.steps),
        warmup=int(plan.warmup),
        repeats=int(plan.repeats),
        devices=ctx.devices(),
        report=report,
    )


def throughput_summary(plan, tasks: list[dict]) -> dict:
    """Goals met or not (best run of each model), and XLA's grouped conv against the block-diagonal one."""
    timed = [t["result"] for t in tasks if "images_per_second" in (t.get("result") or {})]
    best: dict[str, dict] = {}
    for r in timed:
        if (
            r["model"] not in best
            or r["images_per_second_per_device"] > best[r["model"]]["images_per_second_per_device"]
        ):
            best[r["model"]] = r
    goals = {}
    for model, target in dict(plan.throughput.goals).items():
        got = best.get(model, {}).get("images_per_second_per_device")
        goals[model] = {
            "target_images_per_second": target,
            "measured": got,
            "grouped_conv": best.get(model, {}).get("grouped_conv"),
            "met": None if got is None else got >= target,
        }
    speedups = {}
    for model in {r["model"] for r in timed}:
        by_mode = {r["grouped_conv"]: r for r in timed if r["model"] == model}
        by_batch = {r["batch_size"] for r in by_mode.values()}
        if set(models.GROUPED_CONV_MODES) <= by_mode.keys() and len(by_batch) == 1:
            speedups[model] = round(
                by_mode["xla"]["step_ms"] / by_mode["block_diagonal"]["step_ms"], 3
            )
    return {"goals": goals, "xla_over_block_diagonal_step_time": speedups}


# ----------------------------------------------------------------------------------------------------
# 4. input pipeline
# ----------------------------------------------------------------------------------------------------


def _build_dataset(plan, root: Path) -> tuple[Path, dict]:
    """Generates photo-like JPEG posts and builds them with `tagjax build` (default image options)."""
    width, height = (int(v) for v in plan.input.source_size)
    t0 = time.perf_counter()
    posts = build_throughput.make_corpus(root / "corpus", int(plan.input.posts), width, height)
    generate_s = time.perf_counter() - t0
    cfg = build_steps.BuildConfig(
        inputs=(f"jsonl:{posts}",),
        output=str(root / "dataset"),
        workers=int(plan.input.build_workers),
        heldout_fraction=0.0,
        raster_cache="",
        progress=False,
    )
    t0 = time.perf_counter()
    stats = build.build(cfg)
    return Path(cfg.output), {
        "posts_generated": int(plan.input.posts),
        "source_size": f"{width}x{height}",
        "generate_seconds": round(generate_s, 2),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "records": int(stats["posts_written"]),
    }


def _fed_rate(cfg, ctx: Context, steps: int) -> dict:
    """The train step fed by the input pipeline (grain workers per ``cfg.data.num_workers``).

    The batches the pipeline buffered while the first step compiled are used up by untimed steps first
    (as many as its buffers hold), so the timed ``steps`` show the pipeline's pace, not its backlog."""
    mesh = sharding.create_mesh(cfg.mesh, ctx.devices())
    model = models.create(cfg.model, int(ctx.plan.num_classes))
    state = train.create_train_state(cfg, model, mesh)
    step = train.jit_train_step(cfg, model, mesh, state)
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    try:

        def one_step(state):
            local = next(it)
            batch = {"image": local["image"], "labels": local["labels"]}
            batch = sharding.global_batch(batch, mesh)
            return step(state, batch)

        t0 = time.perf_counter()
        state, metrics = one_step(state)  # compile (or load from the cache) and start the workers
        jax.block_until_ready(metrics)
        first_s = time.perf_counter() - t0
        buffered = (int(cfg.data.num_workers) + 1) * int(cfg.data.prefetch_buffer)
        for _ in range(buffered):
            state, metrics = one_step(state)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = one_step(state)
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - t0
    finally:
        it.close()
    batch = int(cfg.train.batch_size)
    return {
        "num_workers": int(cfg.data.num_workers),
        "first_step_seconds": round(first_s, 2),
        "untimed_steps": buffered,
        "timed_steps": steps,
        "step_ms": round(1000 * seconds / steps, 2),
        "images_per_second": round(steps * batch / seconds, 1),
    }


def task_input_pipeline(ctx: Context, report: Callable[[dict], None]) -> dict:
    plan = ctx.plan
    config_lib.ensure_absl_flags_parsed()  # grain's worker processes read absl flags
    feed = next(r for r in plan.throughput.runs if r["name"] == plan.input.feed_run)
    cfg = trainer_config(ctx, feed["model"], feed["batch_per_device"], feed["grouped_conv"])
    root, result = _build_dataset(plan, ctx.work_dir / "input_pipeline")
    report(result)

    manifest = records.load_manifest(root)
    jpegs = [
        records.decode(r).image
        for path in manifest.shard_paths(root, "train")
        for r in records.read_shard(path)
    ]
    sides = np.asarray([augment._header(j) for j in jpegs])
    result["stored_images"] = {
        "count": len(jpegs),
        "shorter_side": int(np.median(sides.min(1))),
        "mean_kb": round(float(np.mean([len(j) for j in jpegs])) / 1e3, 1),
    }
    aug = augment.TrainAugment.from_config(cfg.data)
    u = sampling.uniforms(0, sampling.STREAM_AUGMENT, np.arange(len(jpegs)), augment.NUM_UNIFORMS)
    out = np.empty((aug.size, aug.size, 3), np.uint8)

    def decode_all():
        for j, data in enumerate(jpegs):
            augment.train_image(data, out, u[j], aug)
        return len(jpegs)

    seconds = float(plan.input.seconds)
    _, per_core, _ = input_throughput.timed(decode_all, seconds)
    result["decode_augment_per_core"] = round(per_core, 1)
    report(result)

    cfg.data.synthetic = False
    cfg.data.dataset = str(root)
    cfg.data.num_workers = 0
    cfg.data.prefetch_buffer = int(plan.input.prefetch_buffer)
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    try:
        _, per_core, _ = input_throughput.timed(lambda: len(next(it)["image"]), seconds)
    finally:
        it.close()
    result["pipeline_per_core"] = round(per_core, 1)
    report(result)

    # Host cores each device needs: its training rate (synthetic data) over one core's pipeline rate.
    result["host_cores_per_device"] = {
        name: round(r["images_per_second_per_device"] / result["pipeline_per_core"], 2)
        for name, r in ctx.throughput_runs().items()
    }
    report(result)

    cfg.data.num_workers = int(plan.input.num_workers)
    fed = _fed_rate(cfg, ctx, int(plan.input.feed_steps))
    synthetic = ctx.throughput_runs().get(feed["name"], {}).get("images_per_second")
    fed.update(
        {
            "run": feed["name"],
            "synthetic_images_per_second": synthetic,
            "fraction_of_synthetic": round(fed["images_per_second"] / synthetic, 3)
            if synthetic
            else None,
        }
    )
    result["fed_step"] = fed
    return result


# ----------------------------------------------------------------------------------------------------
# 5. checkpoint
# ----------------------------------------------------------------------------------------------------


def task_checkpoint(ctx: Context, report: Callable[[dict], None]) -> dict:
    """Async saves between train steps. Loss per save = (a window of steps that starts with a save) -
    (the same number of steps without one): what the save costs the loop, blocking part and the
    background write's competition for the host included."""
    c = ctx.plan.checkpoint
    cfg = trainer_config(ctx, c.model, c.batch_per_device, c.grouped_conv)
    cfg.checkpoint.async_save = True
    cfg.checkpoint.keep_last = 2
    cfg.checkpoint.save_on_preemption = False
    cfg.train.checkpoint_every_images = 0
    mesh = sharding.create_mesh(cfg.mesh, ctx.devices())
    n = int(ctx.plan.num_classes)
    model = models.create(cfg.model, n)
    state = checkpoint_blocking.random_state(train.abstract_train_state(cfg, model, mesh))
    step_fn = train.jit_train_step(cfg, model, mesh, state)
    batches = train_throughput._synthetic_batches(cfg, mesh, n, 2)
    between = int(c.steps_between)

    def window(state):
        """``between`` steps, finished: (state, seconds)."""
        t0 = time.perf_counter()
        for i in range(between):
            state, metrics = step_fn(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        return state, time.perf_counter() - t0

    t0 = time.perf_counter()
    state, _ = step_fn(state, batches[0])
    jax.block_until_ready(state)
    result = {
        "model": c.model,
        "grouped_conv": str(cfg.model.grouped_conv),
        "batch_size": int(cfg.train.batch_size),
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "state_mb": round(
            sum(
                x.size * x.dtype.itemsize
                for x in jax.tree.leaves(state)
                if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            )
            / 2**20,
            1,
        ),
        "compile_seconds": round(time.perf_counter() - t0, 2),
    }
    state, _ = window(state)  # warm-up
    baseline = []
    for _ in range(2):
        state, seconds = window(state)
        baseline.append(seconds)
    base = statistics.median(baseline)
    result["step_ms"] = round(1000 * base / between, 2)
    report(result)

    workdir = ctx.work_dir / "checkpoint"
    manager = checkpoint.CheckpointManager(
        workdir, cfg, {"vocab_fingerprint": "gpu_check"}, install_signal_handler=False
    )
    blocking, lost, complete = [], [], []
    try:
        for i in range(int(c.saves)):
            t0 = time.perf_counter()
            manager.save(i + 1, state, {"next_index": i})
            blocking.append(manager.last_save_blocking_s)
            state, _ = window(state)
            lost.append(time.perf_counter() - t0 - base)
            manager.wait_until_finished()
            complete.append(time.perf_counter() - t0)
            result.update(
                {
                    "saves": len(lost),
                    "blocking_s": round(statistics.median(blocking), 4),
                    "loop_lost_per_save_s": round(statistics.median(lost), 4),
                    "loop_lost_per_save_in_steps": round(
                        statistics.median(lost) / (base / between), 3
                    ),
                    "save_complete_s": round(statistics.median(complete), 3),
                    "steps_between_saves": between,
                }
            )
            report(result)
    finally:
        manager.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------------
# Running tasks in time-boxed children, recording as we go
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    name: str
    fn: Callable
    budget_s: float | None = None  # its own time box (within the step's)
    optional: bool = False
    args: tuple = ()


def plan_tasks(plan, budget_scale: float = 1.0) -> dict[str, list[Task]]:
    return {
        "environment": [Task("environment", task_environment)],
        "correctness": [Task("correctness", task_correctness)],
        "throughput": [
            Task(
                r["name"],
                task_throughput,
                float(r["budget_s"]) * budget_scale,
                bool(r["optional"]),
                (r,),
            )
            for r in plan.throughput.runs
        ],
        "input_pipeline": [Task("input_pipeline", task_input_pipeline)],
        "checkpoint": [Task("checkpoint", task_checkpoint)],
    }


def write_json(path: Path, obj) -> None:
    """Atomic rewrite: a reader (or a cut-off run) always sees a complete file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _child(task: Task, ctx: Context, out: Path) -> None:
    """Runs in the forked child: its own process group (so grain workers die with it), JAX set up, the
    task's partial results written to ``out`` each time it reports."""
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    if ctx.cpu:
        jax.config.update("jax_platforms", "cpu")
    if ctx.cache_dir:
        jax.config.update("jax_compilation_cache_dir", ctx.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    partial: dict = {}

    def report(result: dict) -> None:
        partial.update(result)
        write_json(out, {"result": partial})

    try:
        report(task.fn(ctx, report, *task.args))
    except BaseException:
        write_json(out, {"result": partial, "error": traceback.format_exc(limit=8)})
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class CutOff(Exception):
    """SIGTERM/SIGINT to the parent (the wrapper's hard cap, or the user): record and stop."""


def _raise_cutoff(signum, frame):
    raise CutOff(signal.Signals(signum).name)


def run_task(task: Task, ctx: Context, timeout_s: float) -> dict:
    """One task in a forked child with a deadline: {name, status, seconds, budget_s, result, error}.

    Status ``ok``, ``error`` (it raised), ``timed_out`` (killed at its deadline) or ``cut_off`` (this
    process was told to stop meanwhile; the caller then stops too).
    """
    out = ctx.work_dir / f"task-{task.name}.json"
    out.unlink(missing_ok=True)
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(task, ctx, out))
    t0 = time.perf_counter()
    proc.start()
    try:
        proc.join(timeout_s)
        status = "timed_out" if proc.is_alive() else "ok" if proc.exitcode == 0 else "error"
    except CutOff:
        status = "cut_off"
    if proc.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the child and any grain workers it started
        proc.join(5)
    record = json.loads(out.read_text()) if out.is_file() else {}
    error = record.get("error")
    if status == "error" and not error:
        error = f"exit code {proc.exitcode} without a report"
    return {
        "name": task.name,
        "status": status,
        "seconds": round(time.perf_counter() - t0, 2),
        "budget_s": round(timeout_s, 1),
        "result": record.get("result", {}),
        "error": error,
    }


def step_status(tasks: list[dict]) -> str:
    ran = [t for t in tasks if t["status"] != "skipped"]
    for status in ("cut_off", "error", "timed_out"):
        if any(t["status"] == status for t in ran):
            return status
    return "ok" if ran else "skipped"


def _log(line: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _brief(entry: dict) -> str:
    """One line per task for the log."""
    r = entry["result"]
    if "images_per_second_per_device" in r:
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
        mem = (
            f", peak {r['peak_memory_bytes'] / 2**30:.1f} GiB" if r.get("peak_memory_bytes") else ""
        )
        return f"{r['images_per_second_per_device']:,.0f} img/s/device, step {r['step_ms']} ms{mfu}{mem}"
    if "loop_lost_per_save_s" in r:
        return f"{r['loop_lost_per_save_s']} s of loop lost per save of {r['state_mb']} MB"
    if "fed_step" in r:
        return (
            f"pipeline {r['pipeline_per_core']:,.0f} img/s per core; cores per device "
            f"{r['host_cores_per_device']}"
        )
    if "model_bf16" in r:
        diffs = ", ".join(
            f"{k} {r[k]['outputs']['rel_diff']:.2g}/{r[k]['gradients']['rel_diff']:.2g}"
            for k in ("block", "grouped_conv_modes", "model_fp32", "model_bf16")
        )
        return f"{'pass' if r['pass'] else 'FAIL'}; rel diff outputs/gradients: {diffs}"
    if "measured_device" in r:
        return f"{r['device_count']} x {r['measured_device']}, jax {r['versions'].get('jax')}"
    return ""


def table_row(record: dict) -> str:
    """The run as a row of benchmarks/README.md's table of recorded runs ("-" where a number is missing)."""

    def task(step: str, name: str) -> dict:
        for entry in record["steps"]:
            for t in entry.get("tasks", []):
                if entry["name"] == step and t["name"] == name:
                    return t.get("result") or {}
        return {}

    def rate(r: dict) -> str:
        if "images_per_second_per_device" not in r:
            return "-"
        mfu = f" ({r['mfu']:.1%})" if r.get("mfu") is not None else ""
        return f"{r['images_per_second_per_device']:,.0f}{mfu}"

    def gib(r: dict) -> str:
        return f"{r['peak_memory_bytes'] / 2**30:.1f}" if r.get("peak_memory_bytes") else "-"

    plan = record["plan"].rsplit(":", 1)[-1]
    env = task("environment", "environment")
    versions = env.get("versions", {})
    cuda = env.get("cuda", {}).get("cuda_runtime", "-")
    runs = [r["name"] for r in load_plan(plan).throughput.runs]
    r50, x8, x8bd, x16 = (task("throughput", n) for n in (runs + ["-"] * 4)[:4])
    correctness = task("correctness", "correctness")
    pipe = task("input_pipeline", "input_pipeline")
    cores = pipe.get("host_cores_per_device", {})
    ckpt = task("checkpoint", "checkpoint")
    cells = [
        record["started_utc"][:10],
        env.get("measured_device", "-"),
        f"{versions.get('jax', '-')} / {versions.get('jaxlib', '-')} / {cuda}",
        rate(r50),
        rate(x8),
        rate(x8bd),
        rate(x16),
        {True: "pass", False: "FAIL"}.get(correctness.get("pass"), "-"),
        " / ".join(str(cores.get(n, "-")) for n in runs[:2]),
        f"{ckpt['loop_lost_per_save_s']} s" if "loop_lost_per_save_s" in ckpt else "-",
        f"{gib(r50)} / {gib(x8)} GiB",
    ]
    return "| " + " | ".join(cells) + " |"


def load_plan(name: str, overrides=()):
    return config_lib.load(f"gpu_check:{name}", overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Plan fields can be overridden: --config.budget_s.throughput=300 (configs/gpu_check.py).",
    )
    p.add_argument("--out", default="", help="results directory (default: a new one under /tmp)")
    p.add_argument("--cpu", action="store_true", help="measure the CPU (no accelerator needed)")
    p.add_argument(
        "--tiny", action="store_true", help="tiny models and images (configs/gpu_check.py:tiny)"
    )
    p.add_argument(
        "--cache-dir",
        default="~/.cache/tagjax/jax_cache",
        help="persistent compilation cache ('' = off); later steps reuse the programs of earlier ones",
    )
    p.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every time box (a slow or busy machine, a cold compilation cache)",
    )
    p.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.budget_scale <= 0:
        p.error("--budget-scale must be positive")
    wanted = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {','.join(STEPS)}")

    plan_name = "tiny" if args.tiny else "gpu"
    plan = load_plan(plan_name, overrides)
    stamp = datetime.datetime.now(datetime.UTC)
    out_dir = Path(args.out or tempfile.gettempdir() + f"/tagjax-gpu-check-{stamp:%Y%m%d-%H%M%S}")
    out_dir = out_dir.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "gpu_check.json"
    cache_dir = str(Path(args.cache_dir).expanduser().resolve()) if args.cache_dir else ""
    record = {
        "schema": SCHEMA,
        "started_utc": stamp.isoformat(timespec="seconds"),
        "finished_utc": None,
        "status": "running",
        "argv": argv,
        "plan": f"configs/gpu_check.py:{plan_name}",
        "plan_overrides": overrides,
        "cpu": args.cpu,
        "git_commit": _git_commit(),
        "host": platform.node(),
        "budget_scale": args.budget_scale,
        "budget_s": {s: float(plan.budget_s[s]) * args.budget_scale for s in wanted},
        "seconds": None,
        "steps": [],
    }
    # Scratch (task reports, the built dataset, checkpoints) stays out of --out, which holds the record.
    work_dir = Path(tempfile.mkdtemp(prefix="tagjax-gpu-check-work-"))
    ctx = Context(plan, args.cpu, cache_dir, work_dir, record)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_cutoff)
    _log(f"plan {record['plan']}, writing {results_path}; budgets {record['budget_s']} s")
    t_run = time.perf_counter()
    status = "ok"
    tasks_of = plan_tasks(plan, args.budget_scale)
    current = None  # the task being started or run, for a signal that strikes outside run_task
    try:
        for step in wanted:
            budget = record["budget_s"][step]
            entry = {"name": step, "status": "running", "budget_s": budget, "seconds": 0.0}
            entry["tasks"] = []
            record["steps"].append(entry)
            t_step = time.perf_counter()
            for task in tasks_of[step]:
                left = budget - (time.perf_counter() - t_step)
                timeout = min(left, task.budget_s or left)
                if left < 0.1 or (task.optional and left < task.budget_s):
                    why = (
                        "optional, not enough of the step's budget left"
                        if task.optional
                        else "step budget spent"
                    )
                    entry["tasks"].append({"name": task.name, "status": "skipped", "reason": why})
                    _log(f"{step}/{task.name}: skipped ({why})")
                    continue
                current = task
                _log(f"{step}/{task.name}: start (time box {timeout:.0f} s)")
                done = run_task(task, ctx, timeout)
                entry["tasks"].append(done)
                current = None
                entry["seconds"] = round(time.perf_counter() - t_step, 2)
                entry["status"] = step_status(entry["tasks"])
                write_json(results_path, record)
                _log(f"{step}/{task.name}: {done['status']} in {done['seconds']} s; {_brief(done)}")
                if done["error"]:
                    _log(f"{step}/{task.name}: {done['error'].strip().splitlines()[-1]}")
                if done["status"] == "cut_off":
                    raise CutOff("a signal")
            if step == "throughput":
                entry["summary"] = throughput_summary(plan, entry["tasks"])
            entry["status"] = step_status(entry["tasks"])
            write_json(results_path, record)
            if step == "environment":
                env = entry["tasks"][0]["result"]
                if not args.cpu and env.get("default_backend") == "cpu":
                    status = "no_accelerator"
                    _log(f"no accelerator: jax sees only the CPU; {CUDA_HINT}")
                    break
    except CutOff:
        status = "cut_off"
        _log("cut off by a signal; the record keeps what finished")
        # A signal between steps or tasks (before run_task could record it) leaves no step "running".
        last = record["steps"][-1] if record["steps"] else None
        if last is not None and last["status"] == "running":
            if current is not None and current.name not in [t["name"] for t in last["tasks"]]:
                last["tasks"].append(
                    {"name": current.name, "status": "cut_off", "seconds": 0.0, "budget_s": 0.0}
                    | {"result": {}, "error": None}
                )
            last["status"] = "cut_off"
    finally:
        if status == "ok":
            statuses = {s["status"] for s in record["steps"]}
            status = "ok" if statuses <= {"ok"} else "incomplete"
        record.update(
            {
                "status": status,
                "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - t_run, 2),
            }
        )
        write_json(results_path, record)
        shutil.rmtree(work_dir, ignore_errors=True)
    for step in record["steps"]:
        _log(
            f"{step['name']:15s} {step['status']:10s} {step['seconds']:7.1f} s of {step['budget_s']:.0f}"
        )
    _log(f"{status} in {record['seconds']} s; record: {results_path}")
    _log(f"for benchmarks/README.md's table of recorded runs:\n{table_row(record)}")
    print(results_path)
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
