"""ResNet and ResNeXt (torchvision layout) in Flax Linen.

The network is torchvision's ``ResNet`` with ``Bottleneck`` blocks ("ResNet v1.5": the stride sits in the
3x3 conv), because every released weakly supervised model (WSL ``ig_resnext101_32x*d``, SWSL ResNet-50 /
ResNeXt) is a torchvision state dict: keeping the same layout, padding and parameter names makes import and
export a renaming plus a transpose (tagjax.interop.torchvision).

Parameter tree (torchvision's dotted names with ``.`` -> ``_`` at block level)::

    conv1/kernel  bn1/{scale,bias}  layer1_0/{conv1,bn1,conv2,bn2,conv3,bn3,downsample_conv,downsample_bn}
    ... layer4_2 ...  fc/{kernel,bias}
    batch_stats: every BN has {mean, var}

Conv kernels are HWIO. A grouped conv kernel is stored as (H, W, in/groups, out) whichever way it is
computed (``grouped_conv``): XLA's ``feature_group_count`` or a block-diagonal dense kernel expanded at run
time. The block-diagonal form does ``groups`` times the arithmetic of the grouped one but turns the conv into
a plain dense conv, whose backward pass some backends run far faster than a grouped one (shared FACTS:
~5x on XLA:CPU; jax-ml/jax#13800 on CUDA). Checkpoints therefore do not depend on the mode.

Precision: parameters are float32; activations are computed in ``dtype`` (bfloat16 for training); batch-norm
statistics, pooled features and logits are float32.

Batch norm (``bn_group_size``): 0 = statistics over the whole batch the step sees (under ``jit`` with a
data-sharded batch that is the *global* batch; XLA inserts the cross-device reduction); N > 0 = statistics
over each group of N consecutive images, as the paper did with one group per GPU (24 images). Grouped
statistics do not depend on the device count, and need no cross-device traffic when groups align with the
per-device shards. The running statistics are updated with the mean over groups of the group statistics.
Momentum uses the Flax convention: ``running = momentum * running + (1 - momentum) * batch`` (PyTorch's
``momentum=0.1`` is ``bn_momentum=0.9`` here). Variances are biased (divided by n) in both the normalization
and the running estimate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tagjax.errors import UserError

Dtype = Any

GROUPED_CONV_MODES = ("xla", "block_diagonal")

# torchvision's conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / fan_out),
# fan_out = out_channels * kh * kw (not divided by the groups, as in PyTorch).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The classifier of the Caffe2 ResNe(X)t recipe the paper follows: N(0, 0.01) weights, zero bias.
head_init = nn.initializers.normal(stddev=0.01)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One member of the torchvision ResNet family with Bottleneck blocks.

    ``layers``: blocks per stage; ``planes``: the per-stage "planes" of torchvision (the block's output has
    ``planes * expansion`` channels, its 3x3 conv ``int(planes * width_per_group / 64) * groups``);
    ``stem_width``: output channels of the 7x7 stem conv (64 in torchvision, smaller in test variants).
    """

    layers: tuple[int, ...]
    groups: int = 1
    width_per_group: int = 64
    planes: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    expansion: int = 4

    def __post_init__(self):
        if len(self.layers) != len(self.planes):
            raise ValueError(
                f"ArchSpec: {len(self.layers)} stages in layers but {len(self.planes)} in planes"
            )

    def block_width(self, stage: int) -> int:
        """Channels of the 3x3 (grouped) conv of a block in ``stage`` (torchvision's formula)."""
        return int(self.planes[stage] * (self.width_per_group / 64.0)) * self.groups

    @property
    def feature_dim(self) -> int:
        """Width of the pooled trunk output (2048 for the full-size models)."""
        return self.planes[-1] * self.expansion

    def stage_stride(self, stage: int) -> int:
        return 1 if stage == 0 else 2

    def blocks(self):
        """Yields (name, stage, index, in_channels, stride, has_downsample) for every block, in order."""
        in_ch = self.stem_width
        for s, n in enumerate(self.layers):
            for b in range(n):
                stride = self.stage_stride(s) if b == 0 else 1
                out_ch = self.planes[s] * self.expansion
                yield f"layer{s + 1}_{b}", s, b, in_ch, stride, (stride != 1 or in_ch != out_ch)
                in_ch = out_ch


ARCHS: dict[str, ArchSpec] = {
    "resnet50": ArchSpec(layers=(3, 4, 6, 3)),
    "resnet101": ArchSpec(layers=(3, 4, 23, 3)),
    "resnext50_32x4d": ArchSpec(layers=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x4d": ArchSpec(layers=(3, 4, 23, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ArchSpec(layers=(3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_32x16d": ArchSpec(layers=(3, 4, 23, 3), groups=32, width_per_group=16),
    "resnext101_32x32d": ArchSpec(layers=(3, 4, 23, 3), groups=32, width_per_group=32),
    "resnext101_32x48d": ArchSpec(layers=(3, 4, 23, 3), groups=32, width_per_group=48),
    # Test / laptop variants: 2 stages, narrow, fast at 32px. Same block structure and naming.
    "tiny_resnet": ArchSpec(layers=(1, 1), planes=(8, 16), stem_width=8),
    "tiny_resnext": ArchSpec(
        layers=(1, 1), groups=4, width_per_group=16, planes=(16, 32), stem_width=16
    ),
    # 4 stages of one block each, narrow, groups=8: the full stage structure (every downsample) at low cost.
    "small_resnext": ArchSpec(
        layers=(1, 1, 1, 1), groups=8, width_per_group=8, planes=(16, 32, 64, 128), stem_width=16
    ),
}


def _block_diagonal(kernel: jax.Array, groups: int) -> jax.Array:
    """(H, W, I/g, O) grouped kernel -> (H, W, I, O) dense kernel, zero outside the diagonal blocks.

    Channel convention (XLA's and PyTorch's): input channel i belongs to group i // (I/g), output channel o to
    group o // (O/g).
    """
    h, w, cin_g, cout = kernel.shape
    cout_g = cout // groups
    k5 = kernel.reshape(h, w, cin_g, groups, cout_g)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    dense = jnp.einsum("hwiGo,gG->hwgiGo", k5, eye)
    return dense.reshape(h, w, groups * cin_g, cout)


class Conv(nn.Module):
    """Bias-free square conv with torchvision's symmetric padding (k // 2), optionally grouped.

    Explicit padding matters: "SAME" pads (2, 3) for a 7x7 stride-2 conv on an even input where PyTorch
    pads (3, 3), which would shift every feature map of imported weights by one pixel.
    """

    features: int
    kernel_size: int
    strides: int = 1
    groups: int = 1
    grouped_conv: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        k, g = self.kernel_size, self.groups
        if cin % g or self.features % g:
            raise ValueError(
                f"{self.name}: channels {cin}->{self.features} not divisible by groups={g}"
            )
        kernel = self.param("kernel", conv_init, (k, k, cin // g, self.features), jnp.float32)
        kernel = kernel.astype(self.dtype)
        if g > 1 and self.grouped_conv == "block_diagonal":
            kernel, g = _block_diagonal(kernel, g), 1
        pad = k // 2
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel,
            window_strides=(self.strides, self.strides),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=g,
        )


class BatchNorm(nn.Module):
    """Batch norm over the whole batch (``group_size=0``) or over groups of ``group_size`` images.

    Statistics are computed in float32 whatever the activation dtype; see the module docstring for the
    momentum convention and how grouped running statistics are averaged.
    """

    group_size: int = 0
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if not train:
            y = (xf - ra_mean.value) * (scale * jax.lax.rsqrt(ra_var.value + self.epsilon)) + bias
            return y.astype(self.dtype)

        b = x.shape[0]
        n = self.group_size if self.group_size > 0 else b
        if b % n:
            raise UserError(
                f"batch-norm group size {n} does not divide the batch of {b} images on this step: set "
                "config.model.bn_group_size to a divisor of the per-step (micro-)batch, or 0 for global statistics."
            )
        xg = xf.reshape((b // n, n, *x.shape[1:]))
        axes = tuple(range(1, xg.ndim - 1))  # within a group: images and spatial positions
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = (xg - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(-1, c).mean(axis=0)
            ra_var.value = m * ra_var.value + (1 - m) * var.reshape(-1, c).mean(axis=0)
        return y.reshape(x.shape).astype(self.dtype)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride, groups) -> 1x1, plus a projection shortcut if needed.

    ``train`` is a field rather than a call argument so that ``nn.remat`` can wrap the block without static
    argument bookkeeping.
    """

    planes: int
    width: int
    stride: int
    groups: int
    expansion: int
    downsample: bool
    train: bool
    dtype: Dtype
    grouped_conv: str
    zero_init_last_bn: bool
    bn_group_size: int
    bn_momentum: float
    bn_epsilon: float

    def _bn(self, name, zero=False):
        return BatchNorm(
            group_size=self.bn_group_size,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
            name=name,
        )

    @nn.compact
    def __call__(self, x):
        conv = dict(dtype=self.dtype, grouped_conv=self.grouped_conv)
        out = Conv(self.width, 1, name="conv1", **conv)(x)
        out = nn.relu(self._bn("bn1")(out, self.train))
        out = Conv(self.width, 3, self.stride, self.groups, name="conv2", **conv)(out)
        out = nn.relu(self._bn("bn2")(out, self.train))
        out = Conv(self.planes * self.expansion, 1, name="conv3", **conv)(out)
        out = self._bn("bn3", zero=self.zero_init_last_bn)(out, self.train)
        identity = x
        if self.downsample:
            identity = Conv(
                self.planes * self.expansion, 1, self.stride, name="downsample_conv", **conv
            )(x)
            identity = self._bn("downsample_bn")(identity, self.train)
        return nn.relu(out + identity.astype(out.dtype))


class ResNet(nn.Module):
    """The torchvision ResNet/ResNeXt trunk plus the ``fc`` head. Build it with :func:`create`."""

    spec: ArchSpec
    num_classes: int
    dtype: Dtype = jnp.float32
    zero_init_last_bn: bool = True
    grouped_conv: str = "xla"
    remat: bool = False
    bn_group_size: int = 0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    head_bias: float = (
        0.0  # the fc bias at initialization (see ``create``: "prior" for sigmoid heads)
    )

    @nn.compact
    def __call__(self, x, train: bool = False, *, features_only: bool = False):
        """Images [B, H, W, 3] (normalized) -> float32 logits [B, num_classes] (or pooled features)."""
        spec = self.spec
        bn = dict(
            group_size=self.bn_group_size,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )
        x = Conv(spec.stem_width, 7, 2, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(BatchNorm(name="bn1", **bn)(x, train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
        for name, stage, _, _, stride, downsample in spec.blocks():
            x = block_cls(
                planes=spec.planes[stage],
                width=spec.block_width(stage),
                stride=stride,
                groups=spec.groups,
                expansion=spec.expansion,
                downsample=downsample,
                train=train,
                dtype=self.dtype,
                grouped_conv=self.grouped_conv,
                zero_init_last_bn=self.zero_init_last_bn,
                bn_group_size=self.bn_group_size,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                name=name,
            )(x)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if features_only:
            return features
        # The head runs in float32: it is <1% of the FLOPs, and 17k-way logits keep their precision.
        return nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=head_init,
            bias_init=nn.initializers.constant(self.head_bias),
            name="fc",
        )(features)

    def features(self, x, train: bool = False):
        """Pooled trunk output, float32 [B, spec.feature_dim] (2048 for the full-size models)."""
        return self(x, train=train, features_only=True)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _get(cfg, key, default):
    """Reads ``cfg.key`` from a ConfigDict / dict / object, with a default for fields older configs lack."""
    if isinstance(cfg, dict) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def get_spec(name_or_spec: str | ArchSpec) -> ArchSpec:
    """An architecture by name (see ``ARCHS``), or the spec itself."""

    if isinstance(name_or_spec, ArchSpec):
        return name_or_spec
    if name_or_spec not in ARCHS:
        raise UserError(f"unknown model {name_or_spec!r}: choose one of {', '.join(ARCHS)}.")
    return ARCHS[name_or_spec]


def create(model_config, num_classes: int, *, spec: ArchSpec | None = None) -> ResNet:
    """The model that ``config.model`` describes, with a ``num_classes``-way ``fc`` head.

    ``spec`` overrides ``config.model.name`` with an explicit architecture (reduced test variants).
    """

    spec = spec or get_spec(_get(model_config, "name", "resnext101_32x8d"))
    dtype_name = str(_get(model_config, "dtype", "float32"))
    if dtype_name not in _DTYPES:
        raise UserError(f"config.model.dtype={dtype_name!r}: choose one of {', '.join(_DTYPES)}.")
    mode = str(_get(model_config, "grouped_conv", "xla"))
    if mode not in GROUPED_CONV_MODES:
        raise UserError(
            f"config.model.grouped_conv={mode!r}: choose one of {', '.join(GROUPED_CONV_MODES)}."
        )
    group_size = int(_get(model_config, "bn_group_size", 0))
    if group_size < 0:
        raise UserError(
            f"config.model.bn_group_size={group_size}: use 0 (global batch) or a positive size."
        )
    if num_classes < 1:
        raise UserError(f"the model needs at least one class (got num_classes={num_classes}).")
    # "prior": every logit starts at -log(num_classes), a sigmoid head's fair start (each hashtag's
    # probability about 1/k, near the label prior) instead of 0.5 for every hashtag.
    head_bias = str(_get(model_config, "head_bias", "zero"))
    if head_bias not in ("zero", "prior"):
        raise UserError(f"config.model.head_bias={head_bias!r}: choose zero or prior.")
    return ResNet(
        spec=spec,
        num_classes=int(num_classes),
        dtype=_DTYPES[dtype_name],
        zero_init_last_bn=bool(_get(model_config, "zero_init_last_bn", True)),
        grouped_conv=mode,
        remat=bool(_get(model_config, "remat", False)),
        bn_group_size=group_size,
        bn_momentum=float(_get(model_config, "bn_momentum", 0.9)),
        bn_epsilon=float(_get(model_config, "bn_epsilon", 1e-5)),
        head_bias=-math.log(num_classes) if head_bias == "prior" else 0.0,
    )


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int | np.integer):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def _conv_out(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def macs_per_image(spec: ArchSpec, image_size: int | Sequence[int], num_classes: int = 0) -> int:
    """Multiply-accumulates of one forward pass: every conv (grouped convs at their true cost) + the head."""
    h, w = _hw(image_size)
    macs = 0

    def conv(h, w, cin, cout, k, stride, groups=1):
        ho, wo = _conv_out(h, k, stride), _conv_out(w, k, stride)
        return ho, wo, ho * wo * k * k * (cin // groups) * cout

    h, w, m = conv(h, w, 3, spec.stem_width, 7, 2)
    macs += m
    h, w = _conv_out(h, 3, 2), _conv_out(w, 3, 2)  # max pool
    for _, stage, _, cin, stride, downsample in spec.blocks():
        width, cout = spec.block_width(stage), spec.planes[stage] * spec.expansion
        _, _, m1 = conv(h, w, cin, width, 1, 1)
        ho, wo, m2 = conv(h, w, width, width, 3, stride, spec.groups)
        _, _, m3 = conv(ho, wo, width, cout, 1, 1)
        macs += m1 + m2 + m3
        if downsample:
            macs += conv(h, w, cin, cout, 1, stride)[2]
        h, w = ho, wo
    return macs + spec.feature_dim * num_classes


def flops_per_image(model_config, image_size: int | Sequence[int], num_classes: int = 0) -> float:
    """Analytic forward FLOPs of one image (2 x multiply-accumulates of convs and the head).

    Batch norm, ReLU, pooling and the residual adds are left out, as in the usual MFU accounting; a training
    step costs about 3x this (forward + two backward matmuls). ``num_classes`` adds the ``fc`` head.
    ``config.model.grouped_conv`` does not change the count: the block-diagonal mode's extra zeros are
    wasted work, not model FLOPs. ResNet-50 at 224px: 8.2e9 (4.1 GMACs).
    """
    name_or_spec = (
        model_config if isinstance(model_config, str | ArchSpec) else _get(model_config, "name", "")
    )
    return 2.0 * macs_per_image(get_spec(name_or_spec), image_size, num_classes)
