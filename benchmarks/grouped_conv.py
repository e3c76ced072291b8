"""XLA grouped convolution vs a block-diagonal dense kernel: one ResNeXt block, forward + backward.

``config.model.grouped_conv`` picks how a ResNeXt block's 3x3 grouped conv runs:

* ``xla``: ``lax.conv_general_dilated(feature_group_count=groups)``: the true arithmetic;
* ``block_diagonal``: the stored (3, 3, C/g, C) kernel expanded to a dense (3, 3, C, C) one with zeros off
  the diagonal blocks: ``groups`` times the conv arithmetic, but a plain dense conv, whose backward pass
  (the weight gradient especially) some backends run much faster than a grouped one.

This script times a jitted forward + backward (gradients of a scalar loss w.r.t. parameters and input) of
one ``tagjax.models.Bottleneck`` in train mode (batch-norm statistics included), for both modes, and also of
the 3x3 conv alone, and reports milliseconds per step and the ratio. Example (the recorded CPU run)::

    python benchmarks/grouped_conv.py --arch resnext101_32x8d --stage 3 --batch 8 --image-size 224

``--stage 3`` is ResNeXt-101 32x8d's third stage (a 1024-wide grouped conv at 14x14 for 224px images,
where 23 of its 33 blocks sit). On a GPU use ``--dtype bfloat16`` and a larger ``--batch``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from tagjax import models


def _time(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of a jitted ``fn`` (compilation excluded)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def block_step(spec, stage: int, mode: str, dtype, batch: int, hw: int):
    """A jitted value-and-grad of one block in ``mode``, plus its arguments."""
    width, cout = spec.block_width(stage), spec.planes[stage] * spec.expansion
    block = models.Bottleneck(
        planes=spec.planes[stage],
        width=width,
        stride=1,
        groups=spec.groups,
        expansion=spec.expansion,
        downsample=False,
        train=True,
        dtype=dtype,
        grouped_conv=mode,
        zero_init_last_bn=False,
        bn_group_size=0,
        bn_momentum=0.9,
        bn_epsilon=1e-5,
    )
    x = jax.random.normal(jax.random.key(0), (batch, hw, hw, cout), jnp.float32).astype(dtype)
    variables = jax.jit(block.init)(jax.random.key(1), x)

    def loss(params, x):
        y, _ = block.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (variables["params"], x)


def conv_step(spec, stage: int, mode: str, dtype, batch: int, hw: int):
    """The 3x3 grouped conv alone (the only layer the mode changes)."""
    width = spec.block_width(stage)
    conv = models.Conv(width, 3, 1, spec.groups, grouped_conv=mode, dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (batch, hw, hw, width), jnp.float32).astype(dtype)
    params = jax.jit(conv.init)(jax.random.key(1), x)

    def loss(params, x):
        return jnp.mean(jnp.square(conv.apply(params, x).astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnext101_32x8d", choices=sorted(models.ARCHS))
    p.add_argument("--stage", type=int, default=3, help="1-based stage whose block is timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--image-size", type=int, default=224, help="input image size the stage's map derives from"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    spec = models.get_spec(args.arch)
    stage = args.stage - 1
    hw = args.image_size // 4 // (2**stage)  # stem /4, then /2 per later stage
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    result = {
        "arch": args.arch,
        "stage": args.stage,
        "groups": spec.groups,
        "width": spec.block_width(stage),
        "map": f"{hw}x{hw}",
        "batch": args.batch,
        "dtype": args.dtype,
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.processor() or platform.machine(),
    }
    print(
        f"{args.arch} stage {args.stage}: width {result['width']}, groups {spec.groups}, map {hw}x{hw}, "
        f"batch {args.batch}, {args.dtype}, on {result['device']}"
    )
    for what, make in (("block", block_step), ("conv3x3", conv_step)):
        ms = {}
        for mode in models.GROUPED_CONV_MODES:
            fn, fargs = make(spec, stage, mode, dtype, args.batch, hw)
            ms[mode] = 1e3 * _time(fn, *fargs, iters=args.iters)
        result[f"{what}_ms"] = {k: round(v, 2) for k, v in ms.items()}
        result[f"{what}_speedup_block_diagonal"] = round(ms["xla"] / ms["block_diagonal"], 2)
        print(
            f"  {what:8s} fwd+bwd  xla {ms['xla']:9.2f} ms   block_diagonal {ms['block_diagonal']:9.2f} ms"
            f"   xla/block_diagonal = {ms['xla'] / ms['block_diagonal']:.2f}x"
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
