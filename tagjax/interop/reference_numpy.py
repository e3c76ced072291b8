"""An independent NumPy implementation of torchvision's ResNet / ResNeXt, for parity tests without PyTorch.

Everything here works on a torchvision *state dict* in PyTorch's own layout (NCHW activations, OIHW conv
weights, ``fc.weight`` as [classes, features]) and re-derives the network from torchvision's constructor
rules, deliberately sharing no code with :mod:`tagjax.interop.torchvision` (the converter) or
:mod:`tagjax.models` (the Flax model). A parity test that converts a state dict and compares the Flax
logits with :func:`forward` therefore checks the converter's renaming and transposes, the model's padding,
strides, grouping and batch norm, all at once.

The reference computes in float64, so a difference from the float32 Flax model measures the Flax side's
rounding only.

torchvision rules re-implemented here (``torchvision/models/resnet.py``, Bottleneck, "v1.5"):

* stem: 7x7 conv stride 2 pad 3, BN, ReLU, 3x3 max-pool stride 2 pad 1 (padding never wins a max);
* ``layer{i}`` (i = 1..4): blocks; the first block of layers 2..4 has stride 2, placed on the 3x3 conv;
* block: 1x1 conv -> BN -> ReLU -> 3x3 conv (stride, groups) -> BN -> ReLU -> 1x1 conv -> BN, plus
  the identity or ``downsample`` (1x1 conv with the block's stride, BN), then ReLU;
* the 3x3 conv's width is ``int(planes * width_per_group / 64) * groups``, its output ``planes * 4``;
* a block has ``downsample`` iff its stride is not 1 or its input width is not ``planes * 4``;
* global average pool, ``fc``.
"""

from __future__ import annotations

import re

import numpy as np

BN_EPS = 1e-5  # torchvision's BatchNorm2d default


def conv2d(
    x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0, groups: int = 1
) -> np.ndarray:
    """PyTorch ``F.conv2d`` semantics: x [N, C, H, W], w [O, C/groups, kh, kw] -> [N, O, Ho, Wo]."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * groups and o % groups == 0, (x.shape, w.shape, groups)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    xg = xp.reshape(n, groups, cg, xp.shape[2], xp.shape[3])
    wg = w.reshape(groups, o // groups, cg, kh, kw)
    out = np.zeros((n, groups, o // groups, ho, wo), dtype=np.result_type(x, w))
    for i in range(kh):
        for j in range(kw):
            patch = xg[
                :,
                :,
                :,
                i : i + stride * (ho - 1) + 1 : stride,
                j : j + stride * (wo - 1) + 1 : stride,
            ]
            out += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, i, j], optimize=True)
    return out.reshape(n, o, ho, wo)


def max_pool_3x3_s2(x: np.ndarray) -> np.ndarray:
    """``nn.MaxPool2d(kernel_size=3, stride=2, padding=1)``: padded positions never win."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    out = np.full((n, c, ho, wo), -np.inf, dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            out = np.maximum(
                out, xp[:, :, i : i + 2 * (ho - 1) + 1 : 2, j : j + 2 * (wo - 1) + 1 : 2]
            )
    return out


def batch_norm_eval(x: np.ndarray, sd: dict, prefix: str, eps: float = BN_EPS) -> np.ndarray:
    """Eval-mode ``BatchNorm2d``: running statistics, affine weight and bias."""
    shape = (1, -1, 1, 1)
    mean = sd[prefix + ".running_mean"].reshape(shape)
    var = sd[prefix + ".running_var"].reshape(shape)
    return (x - mean) / np.sqrt(var + eps) * sd[prefix + ".weight"].reshape(shape) + sd[
        prefix + ".bias"
    ].reshape(shape)


def _relu(x):
    return np.maximum(x, 0)


def _blocks(sd: dict) -> list[tuple[int, int]]:
    """(layer, block) pairs present in the state dict, in forward order."""
    found = set()
    for key in sd:
        m = re.match(r"layer(\d+)\.(\d+)\.conv1\.weight$", key)
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    return sorted(found)


def forward(
    state_dict: dict, images_nchw: np.ndarray, *, features_only: bool = False
) -> np.ndarray:
    """torchvision ResNet forward (eval mode) of ``images_nchw`` [N, 3, H, W], in float64.

    The block structure, the groups and the widths are read off the state dict's keys and shapes; strides
    follow torchvision's rule (first block of layer 2, 3, 4).
    """
    sd = {
        k: np.asarray(v, dtype=np.float64)
        for k, v in state_dict.items()
        if not k.endswith("num_batches_tracked")
    }
    x = np.asarray(images_nchw, dtype=np.float64)
    x = conv2d(x, sd["conv1.weight"], stride=2, padding=3)
    x = _relu(batch_norm_eval(x, sd, "bn1"))
    x = max_pool_3x3_s2(x)
    for layer, block in _blocks(sd):
        p = f"layer{layer}.{block}"
        stride = 2 if (layer > 1 and block == 0) else 1
        width = sd[p + ".conv1.weight"].shape[0]
        groups = width // sd[p + ".conv2.weight"].shape[1]
        out = _relu(batch_norm_eval(conv2d(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
        out = conv2d(out, sd[p + ".conv2.weight"], stride=stride, padding=1, groups=groups)
        out = _relu(batch_norm_eval(out, sd, p + ".bn2"))
        out = batch_norm_eval(conv2d(out, sd[p + ".conv3.weight"]), sd, p + ".bn3")
        if p + ".downsample.0.weight" in sd:
            identity = conv2d(x, sd[p + ".downsample.0.weight"], stride=stride)
            identity = batch_norm_eval(identity, sd, p + ".downsample.1")
        else:
            identity = x
        x = _relu(out + identity)
    features = x.mean(axis=(2, 3))
    if features_only:
        return features
    return features @ sd["fc.weight"].T + sd["fc.bias"]


def random_state_dict(
    layers: tuple[int, ...],
    *,
    groups: int = 1,
    width_per_group: int = 64,
    planes: tuple[int, ...] = (64, 128, 256, 512),
    stem_width: int = 64,
    num_classes: int = 1000,
    seed: int = 0,
    num_batches_tracked: bool = True,
) -> dict[str, np.ndarray]:
    """A randomly initialized torchvision-layout state dict (float32), keys in torchvision's order.

    Conv weights follow He (fan-in) scaling and batch-norm statistics and affine parameters are drawn away
    from their (0, 1) defaults, so that a converter that swapped mean/var or weight/bias, or transposed a
    kernel the wrong way, changes the logits visibly. ``num_batches_tracked`` adds the int64 counters
    PyTorch writes (some released files lack them).
    """
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    expansion = 4

    def conv(name, cout, cin_per_group, k):
        std = np.sqrt(2.0 / (cin_per_group * k * k))
        sd[name + ".weight"] = (rng.standard_normal((cout, cin_per_group, k, k)) * std).astype(
            np.float32
        )

    def bn(name, c):
        sd[name + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[name + ".bias"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
        sd[name + ".running_mean"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
        sd[name + ".running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        if num_batches_tracked:
            sd[name + ".num_batches_tracked"] = np.array(
                int(rng.integers(0, 10**6)), dtype=np.int64
            )

    conv("conv1", stem_width, 3, 7)
    bn("bn1", stem_width)
    inplanes = stem_width
    for i, (n_blocks, p) in enumerate(zip(layers, planes)):
        for b in range(n_blocks):
            stride = 2 if (i > 0 and b == 0) else 1
            prefix = f"layer{i + 1}.{b}"
            width = int(p * (width_per_group / 64.0)) * groups
            conv(prefix + ".conv1", width, inplanes, 1)
            bn(prefix + ".bn1", width)
            conv(prefix + ".conv2", width, width // groups, 3)
            bn(prefix + ".bn2", width)
            conv(prefix + ".conv3", p * expansion, width, 1)
            bn(prefix + ".bn3", p * expansion)
            if stride != 1 or inplanes != p * expansion:
                conv(prefix + ".downsample.0", p * expansion, inplanes, 1)
                bn(prefix + ".downsample.1", p * expansion)
            inplanes = p * expansion
    bound = 1.0 / np.sqrt(inplanes)
    sd["fc.weight"] = rng.uniform(-bound, bound, (num_classes, inplanes)).astype(np.float32)
    sd["fc.bias"] = rng.uniform(-bound, bound, num_classes).astype(np.float32)
    return sd
