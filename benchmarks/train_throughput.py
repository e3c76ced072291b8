"""Training throughput of a config: images/s, images/s per device and MFU of the real jitted train step.

The step is the trainer's own (tagjax.train.jit_train_step: forward, backward, SGD momentum update, NaN
guard, metrics) on the config's mesh, with parameters born sharded as in a run. The data are synthetic and
already on the devices (a few distinct random uint8 batches, cycled), so the number is the accelerator's
rate with no input pipeline in the way; benchmarks/input_throughput.py measures the pipeline's side.

MFU = images/s x training FLOPs per image / (devices x peak FLOP/s), where training FLOPs = 3 x the analytic
forward FLOPs of tagjax.models.flops_per_image (convolutions + head at their true, grouped cost) and the
peak is tagjax.loop.PEAK_FLOPS for the device kind (dense bf16; "n/a" on CPU).

Run::

    python benchmarks/train_throughput.py --config tiny                      # CPU smoke
    python benchmarks/train_throughput.py --config bench_gpu:resnet50 --steps 50
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        default="tiny",
        help="config file, or the name of a packaged config (default tiny)",
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
    train.setup_runtime(cfg)

    mesh = sharding.create_mesh(cfg.mesh)
    train.validate_batch_layout(cfg, mesh)
    name = str(cfg.model.name)
    num_classes = args.num_classes or (
        1000 if not name.startswith(("tiny", "small")) else int(cfg.data.synthetic_num_labels)
    )
    model = models.create(cfg.model, num_classes)

    t0 = time.perf_counter()
    state = train.create_train_state(cfg, model, mesh, num_classes)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    step = train.jit_train_step(cfg, model, mesh, state)
    batches = _synthetic_batches(cfg, mesh, num_classes, 4)

    t0 = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        state, metrics = step(state, batches[(i + 1) % len(batches)])
    jax.block_until_ready(metrics)

    windows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        windows.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(windows)

    batch = int(cfg.train.batch_size)
    n_dev = mesh.devices.size
    rate = batch / step_s
    kind = jax.devices()[0].device_kind
    peak = loop.peak_flops_per_device(kind)
    train_flops = 3.0 * models.flops_per_image(cfg.model, int(cfg.data.image_size), num_classes)
    result = {
        "config": args.config,
        "overrides": overrides,
        "model": name,
        "num_classes": num_classes,
        "image_size": int(cfg.data.image_size),
        "dtype": str(cfg.model.dtype),
        "grouped_conv": str(cfg.model.grouped_conv),
        "remat": bool(cfg.model.remat),
        "bn_group_size": int(cfg.model.bn_group_size),
        "batch_size": batch,
        "grad_accum_steps": int(cfg.train.grad_accum_steps),
        "mesh": dict(mesh.shape),
        "devices": n_dev,
        "device_kind": kind,
        "step_ms": round(1000 * step_s, 2),
        "step_ms_windows": [round(1000 * w, 2) for w in windows],
        "images_per_second": round(rate, 1),
        "images_per_second_per_device": round(rate / n_dev, 1),
        "train_gflops_per_image": round(train_flops / 1e9, 3),
        "mfu": round(rate * train_flops / (peak * n_dev), 4) if peak else None,
        "init_seconds": round(init_s, 2),
        "compile_seconds": round(compile_s, 2),
        "final_loss": float(metrics["loss"]),
        "jax": jax.__version__,
        "host": platform.node(),
    }
    mfu = f"{result['mfu']:.1%}" if peak else "n/a (no peak FLOPs for this device)"
    print(
        f"{name} {result['image_size']}px {result['dtype']} batch {batch} on {n_dev} x {kind}: "
        f"{rate:,.1f} img/s ({rate / n_dev:,.1f}/device), step {1000 * step_s:.1f} ms, MFU {mfu}, "
        f"compile {compile_s:.1f} s",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
