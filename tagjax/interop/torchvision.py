"""Import and export torchvision-layout ResNet / ResNeXt weights (the released WSL and SWSL models).

Facebook's weakly supervised ResNeXt-101 32x{8,16,32,48}d models (``ig_resnext101_32x*d``) and the
semi-weakly supervised ResNet-50 / ResNeXt-50 / ResNeXt-101 models are PyTorch state dicts in torchvision's
ResNet layout; timm republishes them as ``.safetensors`` with the same key names. tagjax's models keep that
layout (tagjax.models), so conversion is a renaming plus a transpose per tensor:

=================================  ==============================================  ========================
torchvision key                    tagjax variable                                 transform
=================================  ==============================================  ========================
``conv1.weight`` [O, I/g, kh, kw]  ``params/conv1/kernel`` [kh, kw, I/g, O]        transpose (2, 3, 1, 0)
``bn1.weight`` / ``.bias``         ``params/bn1/scale`` / ``bias``                 none
``bn1.running_mean`` / ``_var``    ``batch_stats/bn1/mean`` / ``var``              none
``bn1.num_batches_tracked``        (not kept; exported as 0)                       -
``layer3.22.conv2.weight``         ``params/layer3_22/conv2/kernel``               transpose
``layer1.0.downsample.0.weight``   ``params/layer1_0/downsample_conv/kernel``      transpose
``layer1.0.downsample.1.*``        ``.../layer1_0/downsample_bn/...``              none
``fc.weight`` [classes, F]         ``params/fc/kernel`` [F, classes]               transpose
``fc.bias``                        ``params/fc/bias``                              none
=================================  ==============================================  ========================

Every tensor is checked against the layout the chosen architecture needs; a missing, extra or misshapen
key is refused with its name, and when the file fits another architecture the error names it.

``.safetensors`` files are read with the safetensors NumPy API: no PyTorch needed. ``.pth`` files need
PyTorch and are opened with ``torch.load(weights_only=True)``, which refuses pickled code (a ``.pth`` is a
pickle; loading one without that flag can run arbitrary code). That flag is only as safe as torch's
unpickler, so a torch older than :data:`MIN_SAFE_TORCH` (published bypasses) is refused at run time.

Commands::

    tagjax import-weights ig_resnext101_32x8d.safetensors --arch resnext101_32x8d --output ckpt/ig32x8d
    tagjax export-weights --checkpoint /path/to/workdir --output trunk.safetensors [--no-head]

An imported checkpoint is an inference checkpoint (tagjax.checkpoint.save_inference_checkpoint): read it
with ``tagjax.checkpoint.load_for_inference(path)``, and use it with ``tagjax predict``, ``embed``,
``evaluate`` and ``transfer`` like a trained one. A 1000-way head gets the ImageNet-1k class list (sorted
wnids, the order every torchvision ImageNet model uses) with WordNet names in its metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from tagjax import __version__, checkpoint, models
from tagjax import config as config_lib
from tagjax.errors import UserError
from tagjax.metrics_writer import as_path
from tagjax.progress import progress_bar
from tagjax.vocab import IMAGENET1K_CLASSES_FILE

TORCH_CPU_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
IMAGENET1K_NUM_CLASSES = 1000

# Suffixes of the state-dict formats this module reads.
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar", ".ckpt")


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one torchvision tensor lives in tagjax's variables, and how it is laid out there."""

    shape: tuple[int, ...]  # PyTorch shape
    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # module path + leaf name inside the collection
    kind: str  # "conv" (OIHW <-> HWIO), "linear" ([out, in] <-> [in, out]) or "vector"


# --------------------------------------------------------------------------------------------------
# The layout.
# --------------------------------------------------------------------------------------------------


def layout(arch: str | models.ArchSpec, num_classes: int | None) -> dict[str, Entry]:
    """torchvision key -> Entry for every tensor of ``arch`` (``num_classes=None``: the trunk only).

    ``num_batches_tracked`` counters are not listed: tagjax does not keep them (see :func:`to_state_dict`).
    """
    spec = models.get_spec(arch)
    out: dict[str, Entry] = {}

    def conv(torch_name, module_path, cout, cin_per_group, k):
        out[torch_name + ".weight"] = Entry(
            (cout, cin_per_group, k, k), "params", (*module_path, "kernel"), "conv"
        )

    def bn(torch_name, module_path, c):
        out[torch_name + ".weight"] = Entry((c,), "params", (*module_path, "scale"), "vector")
        out[torch_name + ".bias"] = Entry((c,), "params", (*module_path, "bias"), "vector")
        out[torch_name + ".running_mean"] = Entry(
            (c,), "batch_stats", (*module_path, "mean"), "vector"
        )
        out[torch_name + ".running_var"] = Entry(
            (c,), "batch_stats", (*module_path, "var"), "vector"
        )

    conv("conv1", ("conv1",), spec.stem_width, 3, 7)
    bn("bn1", ("bn1",), spec.stem_width)
    for name, stage, index, cin, _, downsample in spec.blocks():
        t = f"layer{stage + 1}.{index}"
        width, cout = spec.block_width(stage), spec.planes[stage] * spec.expansion
        conv(t + ".conv1", (name, "conv1"), width, cin, 1)
        bn(t + ".bn1", (name, "bn1"), width)
        conv(t + ".conv2", (name, "conv2"), width, width // spec.groups, 3)
        bn(t + ".bn2", (name, "bn2"), width)
        conv(t + ".conv3", (name, "conv3"), cout, width, 1)
        bn(t + ".bn3", (name, "bn3"), cout)
        if downsample:
            conv(t + ".downsample.0", (name, "downsample_conv"), cout, cin, 1)
            bn(t + ".downsample.1", (name, "downsample_bn"), cout)
    if num_classes is not None:
        out["fc.weight"] = Entry(
            (num_classes, spec.feature_dim), "params", ("fc", "kernel"), "linear"
        )
        out["fc.bias"] = Entry((num_classes,), "params", ("fc", "bias"), "vector")
    return out


def _is_counter(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def _is_head(key: str) -> bool:
    return key.startswith("fc.")


def _strip_wrapper_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drops a ``module.`` prefix that every key carries (state dicts saved from DataParallel/DDP)."""
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _fits(sd: Mapping[str, np.ndarray], arch: str) -> bool:
    trunk = layout(arch, None)
    keys = {k for k in sd if not _is_counter(k) and not _is_head(k)}
    return keys == set(trunk) and all(tuple(np.shape(sd[k])) == trunk[k].shape for k in trunk)


def guess_arch(sd: Mapping[str, np.ndarray]) -> list[str]:
    """The registered architectures whose trunk matches the state dict exactly (keys and shapes)."""
    return [name for name in models.ARCHS if _fits(sd, name)]


def _arch_name(arch: str | models.ArchSpec) -> str:
    return arch if isinstance(arch, str) else "the given architecture"


def _mismatch_error(sd, arch, source: str, problem: str) -> UserError:
    guesses = [g for g in guess_arch(sd) if g != arch]
    hint = (
        f"it looks like a {guesses[0]} state dict, so pass --arch {guesses[0]}."
        if guesses
        else "pass the --arch it was trained as (see `tagjax import-weights --help`)."
    )
    return UserError(f"{source} does not fit {_arch_name(arch)}: {problem}; {hint}")


def _check(sd: Mapping[str, np.ndarray], expected: dict[str, Entry], arch, source: str) -> None:
    present = {k for k in sd if not _is_counter(k)}
    missing = [k for k in expected if k not in present]
    extra = sorted(k for k in present if k not in expected)
    if missing:
        raise _mismatch_error(
            sd,
            arch,
            source,
            f"{len(missing)} key(s) it needs are missing, the first is {missing[0]!r}",
        )
    if extra:
        raise _mismatch_error(
            sd, arch, source, f"{len(extra)} key(s) are not part of it, the first is {extra[0]!r}"
        )
    for key, entry in expected.items():
        shape = tuple(np.shape(sd[key]))
        if shape != entry.shape:
            raise _mismatch_error(
                sd, arch, source, f"key {key!r} has shape {shape} where it needs {entry.shape}"
            )


def _to_float32(key: str, value: Any, source: str) -> np.ndarray:
    a = np.asarray(value)
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name in ("bfloat16", "float16")):
        raise UserError(
            f"{source}: tensor {key!r} has dtype {a.dtype}, not floating point; is this a model file?"
        )
    return a.astype(np.float32)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def from_state_dict(
    state_dict: Mapping[str, Any],
    arch: str | models.ArchSpec,
    *,
    head: bool = True,
    source: str = "the state dict",
) -> dict[str, dict]:
    """torchvision state dict (NumPy arrays) -> tagjax ``{"params", "batch_stats"}`` (float32 NumPy).

    ``head=True`` requires ``fc.weight``/``fc.bias`` (any number of classes) and converts them;
    ``head=False`` converts the trunk only and ignores an ``fc`` the file may have.
    Raises UserError naming the first missing, extra or misshapen key.
    """
    sd = _strip_wrapper_prefix(state_dict)
    if not head:
        sd = {k: v for k, v in sd.items() if not _is_head(k)}
    num_classes = None
    if head:
        if "fc.weight" not in sd:
            raise _mismatch_error(
                sd,
                arch,
                source,
                "it has no classifier 'fc.weight' (import the trunk alone with --no-head)",
            )
        num_classes = int(np.shape(sd["fc.weight"])[0])
    expected = layout(arch, num_classes)
    _check(sd, expected, arch, source)
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, entry in expected.items():
        value = _to_float32(key, sd[key], source)
        if entry.kind == "conv":
            value = np.transpose(value, (2, 3, 1, 0))
        elif entry.kind == "linear":
            value = np.transpose(value)
        _set(variables[entry.collection], entry.path, np.ascontiguousarray(value))
    return variables


def to_state_dict(
    variables: Mapping[str, Any],
    arch: str | models.ArchSpec,
    *,
    head: bool = True,
    num_batches_tracked: bool = True,
) -> dict[str, np.ndarray]:
    """tagjax variables -> torchvision state dict (float32 NumPy, torchvision's key order).

    ``num_batches_tracked`` adds PyTorch's int64 batch-norm counters (as 0) so that
    ``model.load_state_dict(sd)`` works with ``strict=True`` in every PyTorch version.
    """
    params = variables["params"]
    num_classes = None
    if head:
        if "fc" not in params:
            raise UserError(
                "this checkpoint has no classifier head 'fc'; export it with --no-head."
            )
        num_classes = int(np.shape(params["fc"]["kernel"])[-1])
    expected = layout(arch, num_classes)
    sd: dict[str, np.ndarray] = {}
    for key, entry in expected.items():
        try:
            value = np.asarray(_get(variables[entry.collection], entry.path), dtype=np.float32)
        except KeyError:
            raise UserError(
                f"the checkpoint has no {entry.collection}/{'/'.join(entry.path)}, which "
                f"{_arch_name(arch)} needs; is its model config right?"
            ) from None
        if entry.kind == "conv":
            value = np.transpose(value, (3, 2, 0, 1))
        elif entry.kind == "linear":
            value = np.transpose(value)
        if value.shape != entry.shape:
            raise UserError(
                f"checkpoint variable {'/'.join(entry.path)} becomes {key!r} of shape {value.shape}, "
                f"but {_arch_name(arch)} needs {entry.shape}."
            )
        sd[key] = np.ascontiguousarray(value)
        if num_batches_tracked and key.endswith(".running_var"):
            sd[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, dtype=np.int64)
    return sd


# --------------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------------


# torch.load(weights_only=True) is only as safe as its unpickler: releases before these had published
# bypasses that run code or corrupt memory from a crafted .pth (CVE-2025-32434, GHSA-53q9-r3pm-6pq6,
# fixed in 2.6.0; CVE-2026-24747, GHSA-63cw-57p8-fm3p, fixed in 2.10.0).
MIN_SAFE_TORCH = (2, 10, 0)


def torch_version_is_safe(version: str) -> bool:
    """Whether a ``torch.__version__`` string (``2.10.0+cpu``, ``2.5.1``) is at least MIN_SAFE_TORCH."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        return False
    return tuple(int(x or 0) for x in m.groups()) >= MIN_SAFE_TORCH


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError(
            f"reading .pth files needs PyTorch, which is not installed: install the CPU wheel with "
            f"`{TORCH_CPU_INSTALL}`, or use the .safetensors release of the same weights."
        ) from None
    version = str(getattr(torch, "__version__", "unknown"))
    if not torch_version_is_safe(version):
        minimum = ".".join(map(str, MIN_SAFE_TORCH))
        raise UserError(
            f"refusing to open a .pth with PyTorch {version}: torch.load(weights_only=True) has "
            f"known bypasses before {minimum} (CVE-2025-32434, CVE-2026-24747); install torch>="
            f"{minimum} (`{TORCH_CPU_INSTALL}`), or use the .safetensors release of the weights."
        )
    return torch


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict from ``.safetensors`` (no PyTorch needed) or ``.pth`` (PyTorch, weights-only)."""
    p = as_path(path)
    if not p.is_file():
        raise UserError(
            f"weights file {str(p)!r} does not exist; pass the path of a .safetensors or .pth file."
        )
    name = p.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        try:
            return dict(load_file(str(p)))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(
                f"{p} is not a readable .safetensors file ({str(e).splitlines()[0]}); download it again."
            ) from None
    if name.endswith(PICKLE_SUFFIXES):
        torch = _torch()
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except (
            Exception
        ) as e:  # torch raises UnpicklingError, RuntimeError, ... for bad or unsafe files
            raise UserError(
                f"PyTorch could not load {p} as plain weights ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "tagjax only reads weights-only state dicts."
            ) from None
        # Training checkpoints wrap the state dict: {"state_dict": {...}} or {"model": {...}}.
        for wrapper in ("state_dict", "model", "model_state", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(
                f"{p} does not hold a state dict of tensors; pass a torchvision model's weights."
            )
        out = {}
        for k, v in obj.items():
            v = v.detach().cpu()
            out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
        return out
    raise UserError(f"{p.name}: unknown weights format; pass a .safetensors or .pth file.")


def write_safetensors(
    sd: Mapping[str, np.ndarray], path: str | Path, metadata: Mapping[str, str]
) -> Path:
    """Writes ``sd`` atomically (temporary file, then rename); refuses to overwrite."""

    p = as_path(path)
    if p.exists():
        raise UserError(f"{str(p)!r} already exists; choose another --output or delete it first.")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    save_file(dict(sd), str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    # save_file leaves the file readable by its owner only; weights are shared like any output.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, p)
    return p


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, with a progress bar for the multi-GB releases."""

    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        progress_bar(
            total=size,
            unit="B",
            unit_scale=True,
            desc="sha256",
            enabled=None if size >= (256 << 20) else False,
            leave=False,
        ) as bar,
    ):
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def imagenet1k_classes() -> tuple[list[str], list[str], list[str]]:
    """ImageNet-1k classes in model-output order: (wnids, names, synset names), from the packaged list."""
    if not IMAGENET1K_CLASSES_FILE.is_file():
        raise UserError(f"{IMAGENET1K_CLASSES_FILE} is missing; reinstall tagjax.")
    rows = [line.split("\t") for line in IMAGENET1K_CLASSES_FILE.read_text().splitlines() if line]
    if len(rows) != IMAGENET1K_NUM_CLASSES or any(len(r) != 3 for r in rows):
        raise UserError(
            f"{IMAGENET1K_CLASSES_FILE} is damaged (expected 1000 lines of 3 fields); reinstall tagjax."
        )
    wnids, synsets, names = (list(col) for col in zip(*rows))
    return wnids, names, synsets


# --------------------------------------------------------------------------------------------------
# Import and export.
# --------------------------------------------------------------------------------------------------


def _count(tree) -> int:

    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def import_weights(
    file: str | Path,
    arch: str,
    out: str | Path,
    *,
    head: bool = True,
    config=None,
    class_names: list[str] | None = None,
) -> tuple[Path, dict]:
    """Converts a torchvision-layout weights file into a tagjax inference checkpoint at ``out``.

    ``config``: the tagjax config to store with it (default: configs/default.py); its ``model.name`` is
    set to ``arch``. ``class_names``: names of the head's classes (default: ImageNet-1k for 1000 classes).
    Returns (checkpoint path, metadata).
    """

    models.get_spec(arch)  # an unknown name is a UserError listing the choices
    file = as_path(file)
    out = as_path(out)
    if out.exists():
        raise UserError(
            f"{str(out)!r} already exists; choose a new --output directory or delete it first."
        )
    sd = read_state_dict(file)
    variables = from_state_dict(sd, arch, head=head, source=file.name)
    cfg = config if config is not None else config_lib.load("default")
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    cfg["model"] = dict(cfg.get("model", {}), name=arch)
    meta: dict[str, Any] = {
        "config": cfg,
        "arch": arch,
        "source": str(file.resolve()),
        "source_sha256": sha256_of(file),
        "source_format": "safetensors"
        if file.name.lower().endswith(SAFETENSORS_SUFFIXES)
        else "pth",
        "imported_with": "tagjax import-weights",
        "num_params": _count(variables["params"]),
    }
    if head:
        num_classes = int(variables["params"]["fc"]["kernel"].shape[-1])
        meta["num_classes"] = num_classes
        if class_names is None and num_classes == IMAGENET1K_NUM_CLASSES:
            wnids, class_names, synsets = imagenet1k_classes()
            meta.update(label_set="imagenet2012", class_wnids=wnids, class_synsets=synsets)
        if class_names is not None:
            if len(class_names) != num_classes:
                raise UserError(
                    f"{len(class_names)} class names were given for a {num_classes}-way head; pass one per class."
                )
            meta["class_names"] = list(class_names)
    path = checkpoint.save_inference_checkpoint(out, variables, meta)
    return path, meta


def export_weights(
    checkpoint_path: str | Path, out: str | Path, *, head: bool = True
) -> tuple[Path, dict]:
    """Writes a tagjax checkpoint's weights as a torchvision-layout ``.safetensors`` file.

    Load it in PyTorch with ``torchvision.models.<arch>(num_classes=N).load_state_dict(
    safetensors.torch.load_file(path))`` (``strict=False`` for a ``--no-head`` export).
    """

    out = as_path(out)
    if not out.name.lower().endswith(".safetensors"):
        raise UserError(
            f"--output {str(out)!r}: the export is a .safetensors file; name it NAME.safetensors."
        )
    if out.exists():
        raise UserError(f"{str(out)!r} already exists; choose another --output or delete it first.")
    loader = checkpoint.load_for_inference if head else checkpoint.load_backbone
    variables, meta = loader(checkpoint_path)
    arch = ((meta.get("config") or {}).get("model") or {}).get("name")
    if not arch:
        raise UserError(
            f"{checkpoint_path}: its metadata names no model (config.model.name); was it written by tagjax?"
        )
    variables = jax.tree.map(np.asarray, variables)
    sd = to_state_dict(variables, arch, head=head)
    header = {
        "format": "pt",  # what safetensors.torch and timm expect for PyTorch tensors
        "arch": arch,
        "layout": "torchvision",
        "tagjax_version": __version__,
        "source_checkpoint": str(checkpoint.resolve(checkpoint_path)),
        "images_seen": str(meta.get("images_seen", "")),
    }
    if head:
        header["num_classes"] = str(sd["fc.weight"].shape[0])
    if meta.get("vocab_fingerprint"):
        header["vocab_fingerprint"] = str(meta["vocab_fingerprint"])
    return write_safetensors(sd, out, header), header
