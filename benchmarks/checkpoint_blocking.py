"""How long does a checkpoint save stall the training loop? ResNet-50-sized train state vs one train step.

The state is the trainer's own (tagjax.train.abstract_train_state: params, momentum, batch stats, step,
rng) for ``--model`` with a ``--num-classes`` head, filled with random values and sharded as the trainer
shards it. Three numbers per save, measured around real train steps:

* ``blocking``: the time ``CheckpointManager.save`` holds the loop (copying arrays off the device,
  capturing the data-iterator state, starting the background write). This is the cost per save.
* ``write``: from the start of the save until the checkpoint is complete on disk (background).
* ``sync``: the same save with ``config.checkpoint.async_save=False``, for comparison.

and the step time, plus the time of the step that runs while a background write is in flight (on a
machine with few cores the writer competes with the step for CPU).

Run (CPU, one device; ResNet-50 at 224 px, batch 8 takes seconds per step on 2 cores)::

    python benchmarks/checkpoint_blocking.py --saves 3 --steps-between 1
    python benchmarks/checkpoint_blocking.py --model tiny_resnext --image-size 32 --batch-size 32  # smoke

Prints a JSON line with the medians; benchmarks/README.md records a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from tagjax import checkpoint, models, sharding, train
from tagjax.config import ensure_absl_flags_parsed
from tagjax.configs import default


def random_state(abstract):
    """Random values with the abstract state's shapes, dtypes and shardings (no init compile)."""
    rng = np.random.default_rng(0)

    def fill(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), x.sharding)
        if np.issubdtype(x.dtype, np.floating):
            value = rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype) * 0.01
        else:
            value = np.zeros(x.shape, x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree.map(fill, abstract)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument(
        "--steps-between", type=int, default=1, help="train steps between two saves"
    )
    parser.add_argument(
        "--workdir", default="", help="where to write (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    ensure_absl_flags_parsed()

    cfg = default.get_config()
    cfg.model.name = args.model
    cfg.model.dtype = "float32"  # CPU
    cfg.model.bn_group_size = 0
    cfg.data.image_size = args.image_size
    cfg.train.batch_size = args.batch_size
    cfg.train.total_images = args.batch_size * 1000
    cfg.optim.warmup_images = args.batch_size * 10
    cfg.train.checkpoint_every_images = 0
    cfg.checkpoint.keep_last = 2
    cfg.checkpoint.save_on_preemption = False

    mesh = sharding.create_mesh(cfg.mesh)
    model = models.create(cfg.model, args.num_classes)
    abstract = train.abstract_train_state(cfg, model, mesh, args.num_classes)
    state = random_state(abstract)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    state_bytes = sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(state)
        if hasattr(x, "size") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )

    step_fn = train.jit_train_step(cfg, model, mesh, state)
    rng = np.random.default_rng(1)
    local = {
        "image": rng.integers(
            0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8
        ),
        "labels": rng.integers(
            0, args.num_classes, (args.batch_size, int(cfg.data.max_labels)), dtype=np.int32
        ),
    }
    batch = sharding.global_batch(local, mesh)

    def step(s):
        t = time.perf_counter()
        s, metrics = step_fn(s, batch)
        jax.block_until_ready((s, metrics))
        return s, time.perf_counter() - t

    t0 = time.perf_counter()
    state, _ = step(state)  # compile
    compile_s = time.perf_counter() - t0
    state, step_s = step(state)
    steps = [step_s]

    root = Path(args.workdir or tempfile.mkdtemp(prefix="tagjax-ckpt-bench-"))
    data_state = {"next_index": 123, "seed": 0}
    results = {}
    for mode in ("async", "sync"):
        cfg.checkpoint.async_save = mode == "async"
        workdir = root / mode
        shutil.rmtree(workdir, ignore_errors=True)
        blocking, writes, overlapped = [], [], []
        mgr = checkpoint.CheckpointManager(workdir, cfg, {"vocab_fingerprint": "bench"})
        for i in range(args.saves):
            n = (i + 1) * 10
            t = time.perf_counter()
            mgr.save(n, state, data_state)
            blocking.append(mgr.last_save_blocking_s)
            for _ in range(args.steps_between):
                state, dt = step(state)
                (overlapped if mode == "async" else steps).append(dt)
            mgr.wait_until_finished()
            writes.append(time.perf_counter() - t)
        mgr.close()
        results[mode] = {
            "blocking_s": statistics.median(blocking),
            "blocking_max_s": max(blocking),
            "complete_s": statistics.median(writes),
        }
        if mode == "async":
            results[mode]["step_during_write_s"] = statistics.median(overlapped)
    step_median = statistics.median(steps)
    out = {
        "model": args.model,
        "num_classes": args.num_classes,
        "params": n_params,
        "state_mb": round(state_bytes / 2**20, 1),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "compile_s": round(compile_s, 2),
        "step_s": round(step_median, 4),
        "async_blocking_s": round(results["async"]["blocking_s"], 4),
        "async_blocking_max_s": round(results["async"]["blocking_max_s"], 4),
        "async_blocking_fraction_of_step": round(results["async"]["blocking_s"] / step_median, 4),
        "async_complete_s": round(results["async"]["complete_s"], 3),
        "step_during_async_write_s": round(results["async"]["step_during_write_s"], 4),
        "sync_blocking_s": round(results["sync"]["blocking_s"], 4),
        "saves": args.saves,
    }
    print(json.dumps(out))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
