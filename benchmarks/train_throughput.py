"""Training throughput of a config: images/s, images/s per device and MFU of the real jitted train step.

The step is the trainer's own (tagjax.train.jit_train_step: forward, backward, SGD momentum update, NaN
guard, metrics) on the config's mesh, with parameters born sharded as in a run. The data are synthetic and
already on the devices (a few distinct random uint8 batches, cycled), so the number is the accelerator's
rate with no input pipeline in the way; benchmarks/input_throughput.py measures the pipeline's side.

MFU = images/s x training FLOPs per image / (devices x peak FLOP/s), where training FLOPs = 3 x the analytic
forward FLOPs of tagjax.models.flops_per_image (convolutions + head at their true, grouped cost) and the
peak is tagjax.loop.PEAK_FLOPS for the device kind (dense bf16; "n/a" on CPU). Peak memory is the device
allocator's high-water mark (``device.memory_stats()``; none on CPU). benchmarks/gpu_check.py calls
:func:`measure` for its throughput step.

Run::

    python benchmarks/train_throughput.py --config tiny                      # CPU smoke
    python benchmarks/train_throughput.py --config configs/bench_gpu.py:resnet50 --steps 50
    python benchmarks/train_throughput.py --config tiny --config.model.grouped_conv=block_diagonal

Any ``--config.key=value`` override applies (batch size, image size, dtype, grouped-conv mode, remat, mesh).
Prints one JSON line (and a readable summary on stderr); benchmarks/README.md records the runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from tagjax import config as config_lib
from tagjax import loop, models, sharding, train


def _synthetic_batches(cfg, mesh, num_classes: int, count: int) -> list[dict]:
    """``count`` global batches of random images and 1..max_labels random labels, placed on the mesh."""
    rng = np.random.default_rng(0)
    b = int(cfg.train.batch_size) // jax.process_count()
    s = int(cfg.data.image_size)
    m = int(cfg.data.max_labels)
    out = []
    for _ in range(count):
        labels = np.full((b, m), -1, np.int32)
        k = rng.integers(1, m + 1, size=b)
        ids = rng.integers(0, num_classes, size=(b, m), dtype=np.int32)
        labels[np.arange(m)[None, :] < k[:, None]] = ids[np.arange(m)[None, :] < k[:, None]]
        images = rng.integers(0, 256, size=(b, s, s, 3), dtype=np.uint8)
        out.append(sharding.global_batch({"image": images, "labels": labels}, mesh))
    return out


def peak_memory_bytes(device) -> int | None:
    """The device allocator's high-water mark in this process (None where the backend keeps no stats, CPU)."""
    stats = device.memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def default_num_classes(cfg) -> int:
    """1000 for the full-size models (an ImageNet-sized head), the synthetic task's labels for test models."""
    name = str(cfg.model.name)
    return 1000 if not name.startswith(("tiny", "small")) else int(cfg.data.synthetic_num_labels)


def measure(
    cfg,
    num_classes: int,
    *,
    steps: int = 20,
    warmup: int = 3,
    repeats: int = 3,
    devices=None,
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Times ``cfg``'s jitted train step on synthetic device-resident batches; returns the measurements.

    ``devices``: the mesh's devices (default: all). ``report`` is called with the partial result after
    initialization and after compilation, so a caller that may be cut off still has those numbers.
    """
    train.setup_runtime(cfg)
    mesh = sharding.create_mesh(cfg.mesh, devices)
    train.validate_batch_layout(cfg, mesh)
    model = models.create(cfg.model, num_classes)
    batch = int(cfg.train.batch_size)
    n_dev = mesh.devices.size
    device = mesh.devices.flat[0]
    kind = device.device_kind
    result = {
        "model": str(cfg.model.name),
        "num_classes": num_classes,
        "image_size": int(cfg.data.image_size),
        "dtype": str(cfg.model.dtype),
        "grouped_conv": str(cfg.model.grouped_conv),
        "remat": bool(cfg.model.remat),
        "bn_group_size": int(cfg.model.bn_group_size),
        "batch_size": batch,
        "batch_size_per_device": batch // n_dev,
        "grad_accum_steps": int(cfg.train.grad_accum_steps),
        "mesh": dict(mesh.shape),
        "devices": n_dev,
        "device_kind": kind,
    }

    t0 = time.perf_counter()
    state = train.create_train_state(cfg, model, mesh, num_classes)
    jax.block_until_ready(state)
    result["init_seconds"] = round(time.perf_counter() - t0, 2)
    result["params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
    if report:
        report(result)
    step = train.jit_train_step(cfg, model, mesh, state)
    batches = _synthetic_batches(cfg, mesh, num_classes, 4)

    t0 = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    result["compile_seconds"] = round(time.perf_counter() - t0, 2)
    if report:
        report(result)
    for i in range(warmup):
        state, metrics = step(state, batches[(i + 1) % len(batches)])
    jax.block_until_ready(metrics)

    windows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        windows.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(windows)

    rate = batch / step_s
    peak = loop.peak_flops_per_device(kind)
    train_flops = 3.0 * models.flops_per_image(cfg.model, int(cfg.data.image_size), num_classes)
    result.update(
        {
            "step_ms": round(1000 * step_s, 2),
            "step_ms_windows": [round(1000 * w, 2) for w in windows],
            "images_per_second": round(rate, 1),
            "images_per_second_per_device": round(rate / n_dev, 1),
            "train_gflops_per_image": round(train_flops / 1e9, 3),
            "peak_flops_per_device": peak,
            "mfu": round(rate * train_flops / (peak * n_dev), 4) if peak else None,
            "peak_memory_bytes": peak_memory_bytes(device),
            "final_loss": float(metrics["loss"]),
        }
    )
    if report:
        report(result)
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", default="tiny", help="config file or name in configs/ (default tiny)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps after the compiling one"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed windows; the median is reported"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=0,
        help="head size (default: 1000 for full-size "
        "models, the synthetic task's label count for test models)",
    )
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    config_lib.ensure_absl_flags_parsed()
    cfg = config_lib.load(args.config, overrides)
    num_classes = args.num_classes or default_num_classes(cfg)
    result = {"config": args.config, "overrides": overrides}
    result.update(
        measure(cfg, num_classes, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    )
    result.update({"jax": jax.__version__, "host": platform.node()})
    rate, n_dev = result["images_per_second"], result["devices"]
    mfu = (
        f"{result['mfu']:.1%}"
        if result["mfu"] is not None
        else "n/a (no peak FLOPs for this device)"
    )
    print(
        f"{result['model']} {result['image_size']}px {result['dtype']} batch {result['batch_size']} on "
        f"{n_dev} x {result['device_kind']}: {rate:,.1f} img/s ({rate / n_dev:,.1f}/device), step "
        f"{result['step_ms']:.1f} ms, MFU {mfu}, compile {result['compile_seconds']:.1f} s",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
