"""tagjax.interop: torchvision-layout weights -> tagjax gives the reference network's logits; round trips.

The reference is tagjax.interop.reference_numpy: a float64 NumPy forward pass written from torchvision's
rules on the PyTorch-layout state dict, sharing no code with the converter or the Flax model. Each parity
test prints its max abs difference (run with ``-s`` to see them).
"""

import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tagjax import checkpoint, cli, models, wordnet
from tagjax.errors import UserError
from tagjax.interop import reference_numpy as ref
from tagjax.interop import torchvision as tv

# One depth-reduced, quarter-width member of each architecture family (layers [1, 1, 1, 1]; the groups and
# width per group of the real model): every block of it has a downsample, every stage a stride.
FAMILIES = {
    "resnet50/101": "resnet50",
    "resnext*_32x4d": "resnext101_32x4d",
    "resnext101_32x8d": "resnext101_32x8d",
    "resnext101_32x16d": "resnext101_32x16d",
    "resnext101_32x32d": "resnext101_32x32d",
    "resnext101_32x48d": "resnext101_32x48d",
}
QUARTER = dict(planes=(16, 32, 64, 128), stem_width=16)


def reduced(name: str, layers=(1, 1, 1, 1)) -> models.ArchSpec:
    return dataclasses.replace(models.ARCHS[name], layers=layers, **QUARTER)


def random_sd(spec: models.ArchSpec, num_classes: int, seed: int = 0, **kw) -> dict:
    return ref.random_state_dict(
        spec.layers,
        groups=spec.groups,
        width_per_group=spec.width_per_group,
        planes=spec.planes,
        stem_width=spec.stem_width,
        num_classes=num_classes,
        seed=seed,
        **kw,
    )


def nchw_images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def tagjax_forward(spec, variables, x_nchw, num_classes, *, features_only=False):
    model = models.create({"name": "resnet50", "dtype": "float32"}, num_classes, spec=spec)
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False, features_only=features_only))
    return np.asarray(fn(variables, x))


def assert_parity(label, got, want):
    """float32 vs the float64 reference: agreement to ~1e-5 of the logits' scale."""
    diff = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    print(f"\n[parity] {label}: max |tagjax - reference| = {diff:.2e} (logit scale {scale:.2f})")
    assert diff <= 1e-5 * max(scale, 1.0) * 10, (label, diff, scale)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_weights_match_reference_forward(family):
    spec = reduced(FAMILIES[family])
    sd = random_sd(spec, num_classes=10, seed=1)
    x = nchw_images()
    variables = tv.from_state_dict(sd, spec)
    assert_parity(family, tagjax_forward(spec, variables, x, 10), ref.forward(sd, x))
    feats = tagjax_forward(spec, variables, x, 10, features_only=True)
    np.testing.assert_allclose(feats, ref.forward(sd, x, features_only=True), rtol=1e-4, atol=1e-4)


def test_full_depth_resnext101_matches_reference():
    """All 33 blocks of ResNeXt-101 (layer3.0 .. layer3.22, no-downsample blocks), at quarter width."""
    spec = reduced("resnext101_32x8d", layers=(3, 4, 23, 3))
    sd = random_sd(spec, num_classes=7, seed=2)
    # Keep 33 random blocks from blowing up: shrink the residual branches' last BN.
    for k in sd:
        if k.endswith("bn3.weight"):
            sd[k] = sd[k] * np.float32(0.2)
    x = nchw_images(2, 64, seed=3)
    variables = tv.from_state_dict(sd, spec)
    assert "layer3_22" in variables["params"]
    assert_parity(
        "resnext101_32x8d depth 101", tagjax_forward(spec, variables, x, 7), ref.forward(sd, x)
    )


def test_full_size_resnext101_32x8d_matches_reference():
    spec = models.ARCHS["resnext101_32x8d"]
    sd = random_sd(spec, num_classes=1000, seed=4)
    for k in sd:
        if k.endswith("bn3.weight"):
            sd[k] = sd[k] * np.float32(0.2)
    x = nchw_images(1, 64, seed=5)
    variables = tv.from_state_dict(sd, "resnext101_32x8d")
    got = tagjax_forward(spec, variables, x, 1000)
    assert_parity("resnext101_32x8d full size", got, ref.forward(sd, x))


def test_layout_matches_published_parameter_counts():
    counts = {
        "resnet50": 25_557_032,
        "resnext101_32x8d": 88_791_336,
        "resnext101_32x48d": 828_411_176,
    }
    for name, count in counts.items():
        lay = tv.layout(name, 1000)
        assert sum(int(np.prod(e.shape)) for e in lay.values() if e.collection == "params") == count
    # torchvision's resnet50 state dict: 161 params + 106 running stats (+53 counters) = 267 tensors.
    assert len(tv.layout("resnet50", 1000)) == 267


def test_layout_keys_match_an_independently_built_state_dict():
    spec = reduced("resnext101_32x8d", layers=(3, 4, 23, 3))
    sd = random_sd(spec, num_classes=5)
    lay = tv.layout(spec, 5)
    assert list(lay) == [
        k for k in sd if not k.endswith("num_batches_tracked")
    ]  # torchvision's order
    assert all(lay[k].shape == sd[k].shape for k in lay)


def test_state_dict_round_trip_is_exact():
    spec = reduced("resnext50_32x4d")
    sd = random_sd(spec, num_classes=10, seed=6)
    back = tv.to_state_dict(tv.from_state_dict(sd, spec), spec)
    assert list(back) == list(sd)
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            assert back[k].dtype == np.int64 and back[k].shape == ()
        else:
            assert back[k].dtype == np.float32
            np.testing.assert_array_equal(back[k], v)


def test_wrong_architecture_missing_extra_and_misshapen_keys_are_named():
    tiny_resnext = models.ARCHS["tiny_resnext"]
    sd = random_sd(tiny_resnext, num_classes=3)
    with pytest.raises(UserError, match=r"pass --arch tiny_resnext"):
        tv.from_state_dict(sd, "tiny_resnet", source="w.safetensors")
    with pytest.raises(UserError, match=r"does not fit resnet50: .*'layer1.1.conv1.weight'"):
        tv.from_state_dict(sd, "resnet50", source="w.safetensors")
    missing = {k: v for k, v in sd.items() if k != "layer2.0.bn2.running_var"}
    with pytest.raises(
        UserError, match=r"1 key\(s\) it needs are missing, the first is 'layer2.0.bn2.running_var'"
    ):
        tv.from_state_dict(missing, "tiny_resnext")
    extra = dict(sd, **{"layer2.0.se.fc.weight": np.zeros(3, np.float32)})
    with pytest.raises(UserError, match=r"not part of it, the first is 'layer2.0.se.fc.weight'"):
        tv.from_state_dict(extra, "tiny_resnext")
    bad = dict(sd)
    bad["layer1.0.conv2.weight"] = np.zeros((16, 8, 3, 3), np.float32)
    with pytest.raises(
        UserError,
        match=r"'layer1.0.conv2.weight' has shape \(16, 8, 3, 3\) where it needs \(16, 4, 3, 3\)",
    ):
        tv.from_state_dict(bad, "tiny_resnext")
    no_head = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    with pytest.raises(UserError, match="--no-head"):
        tv.from_state_dict(no_head, "tiny_resnext")
    # A DataParallel `module.` prefix and missing batch counters are fine; --no-head drops the classifier.
    wrapped = {"module." + k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    variables = tv.from_state_dict(wrapped, "tiny_resnext")
    assert variables["params"]["fc"]["kernel"].shape == (tiny_resnext.feature_dim, 3)
    assert "fc" not in tv.from_state_dict(sd, "tiny_resnext", head=False)["params"]
    assert tv.guess_arch(sd) == ["tiny_resnext"]


def test_packaged_imagenet_classes_match_tfds_labels_and_wordnet(wn):
    """The packaged list (read at import time; nltk WordNet is slow to load) equals its sources."""
    rows = wordnet.imagenet1k_classes_from_sources(wn)
    wnids, names, synsets = tv.imagenet1k_classes()
    assert (
        [r[0] for r in rows] == wnids
        and [r[1] for r in rows] == synsets
        and [r[2] for r in rows] == names
    )
    assert len(set(wnids)) == len(set(names)) == 1000 and wnids == sorted(wnids)
    assert (wnids[0], names[0]) == ("n01440764", "tench")
    assert "crane (crane.n.05)" in names


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tv.read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown weights format"):
        tv.read_state_dict(tmp_path / "w.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match=r"not a readable \.safetensors"):
        tv.read_state_dict(tmp_path / "broken.safetensors")


def test_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(UserError, match=r"download.pytorch.org/whl/cpu"):
        tv.read_state_dict(tmp_path / "w.pth")


@pytest.mark.parametrize(
    ("version", "safe"),
    [("2.5.1", False), ("2.6.0+cpu", False), ("2.9.1", False), ("2.10.0+cpu", True), ("3.0", True)],
)
def test_torch_with_known_weights_only_bypasses_is_refused(tmp_path, monkeypatch, version, safe):
    import types

    assert tv.torch_version_is_safe(version) is safe
    fake = types.ModuleType("torch")
    fake.__version__ = version
    fake.load = lambda *a, **k: "not weights"  # refused as content, but only by a safe torch
    fake.Tensor = type("Tensor", (), {})
    monkeypatch.setitem(sys.modules, "torch", fake)
    (tmp_path / "w.pth").write_bytes(b"never unpickled by an old torch")
    match = r"state dict of tensors" if safe else r"refusing .* PyTorch .*torch>=2\.10\.0"
    with pytest.raises(UserError, match=match):
        tv.read_state_dict(tmp_path / "w.pth")


def test_exported_weights_are_readable_like_any_output(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tv.write_safetensors({"w": np.zeros(2, np.float32)}, tmp_path / "w.st", {})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # safetensors alone leaves 0o600


def test_cli_import_predicts_like_reference_and_export_round_trips(tmp_path, capsys):
    """import-weights -> checkpoint -> logits == reference; export-weights -> the same file; re-import."""
    spec = models.ARCHS["tiny_resnext"]
    sd = random_sd(spec, num_classes=1000, seed=7, num_batches_tracked=False)
    src = tmp_path / "tiny.safetensors"
    save_file(sd, str(src))
    ckpt = tmp_path / "imported"
    assert cli.main(["import-weights", str(src), "--arch", "tiny_resnext", "-o", str(ckpt)]) == 0
    assert "1000-way head (ImageNet-1k classes)" in capsys.readouterr().out

    variables, meta = checkpoint.load_for_inference(ckpt)
    assert (
        meta["config"]["model"]["name"] == "tiny_resnext"
        and meta["config"]["model"]["dtype"] == "float32"
    )
    assert meta["num_classes"] == 1000 and meta["label_set"] == "imagenet2012"
    assert meta["class_wnids"][:2] == ["n01440764", "n01443537"] and meta["class_wnids"] == sorted(
        meta["class_wnids"]
    )
    assert meta["class_names"][0] == "tench" and meta["class_names"][1] == "goldfish"
    assert len(meta["source_sha256"]) == 64
    x = nchw_images(2, 32, seed=8)
    model = models.create(meta["config"]["model"], meta["num_classes"])
    got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert_parity("tiny_resnext via import-weights", got, ref.forward(sd, x))

    out = tmp_path / "export.safetensors"
    assert cli.main(["export-weights", "--checkpoint", str(ckpt), "-o", str(out)]) == 0
    assert "1000-way head" in capsys.readouterr().out
    exported = load_file(str(out))
    # safetensors stores keys sorted; every tensor comes back bit for bit, plus PyTorch's BN counters.
    assert {k for k in exported if not k.endswith("num_batches_tracked")} == set(sd)
    assert {k for k in exported if k.endswith("num_batches_tracked")} == {
        k[: -len("running_var")] + "num_batches_tracked" for k in sd if k.endswith("running_var")
    }
    for k, v in sd.items():
        np.testing.assert_array_equal(exported[k], v)

    again = tmp_path / "reimported"
    assert cli.main(["import-weights", str(out), "--arch", "tiny_resnext", "-o", str(again)]) == 0
    variables2, _ = checkpoint.load_for_inference(again)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Trunk-only export; existing outputs and wrong architectures are refused in one line.
    trunk = tmp_path / "trunk.safetensors"
    # (the old spellings, a positional checkpoint and --out, still work and warn)
    assert cli.main(["export-weights", str(ckpt), "--out", str(trunk), "--no-head"]) == 0
    err = capsys.readouterr().err
    assert "--out is now --output" in err and "is now --checkpoint" in err
    assert not any(k.startswith("fc.") for k in load_file(str(trunk)))
    assert cli.main(["export-weights", "--checkpoint", str(ckpt), "-o", str(trunk)]) == 3
    assert "already exists" in capsys.readouterr().err
    assert (
        cli.main(["import-weights", str(src), "--arch", "tiny_resnet", "-o", str(tmp_path / "x")])
        == 3
    )
    err = capsys.readouterr().err
    assert "pass --arch tiny_resnext" in err and len(err.strip().splitlines()) == 1


class NotAWeight:
    """A picklable object that is not a tensor: weights-only loading must refuse it."""


def _torch_forward(torch, sd, x):
    """torchvision's forward written with torch.nn.functional (torchvision itself is not needed)."""
    f = torch.nn.functional
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}

    def bn(h, p):
        return f.batch_norm(
            h, t[p + ".running_mean"], t[p + ".running_var"], t[p + ".weight"], t[p + ".bias"]
        )

    h = torch.from_numpy(x)
    h = f.max_pool2d(
        f.relu(bn(f.conv2d(h, t["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1
    )
    blocks = sorted(
        (int(m.group(1)), int(m.group(2)))
        for m in (re.match(r"layer(\d+)\.(\d+)\.conv1\.weight$", k) for k in sd)
        if m
    )
    for layer, block in blocks:
        p = f"layer{layer}.{block}"
        stride = 2 if layer > 1 and block == 0 else 1
        groups = t[p + ".conv1.weight"].shape[0] // t[p + ".conv2.weight"].shape[1]
        o = f.relu(bn(f.conv2d(h, t[p + ".conv1.weight"]), p + ".bn1"))
        o = f.relu(
            bn(
                f.conv2d(o, t[p + ".conv2.weight"], stride=stride, padding=1, groups=groups),
                p + ".bn2",
            )
        )
        o = bn(f.conv2d(o, t[p + ".conv3.weight"]), p + ".bn3")
        idn = (
            bn(f.conv2d(h, t[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
            if p + ".downsample.0.weight" in t
            else h
        )
        h = f.relu(o + idn)
    return (h.mean(dim=(2, 3)) @ t["fc.weight"].T + t["fc.bias"]).numpy()


@pytest.mark.torch
def test_pth_import_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    spec = reduced("resnext101_32x8d")
    sd = random_sd(spec, num_classes=10, seed=9)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "w.pth")
    loaded = tv.read_state_dict(tmp_path / "w.pth")
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded[k], v)
    x = nchw_images(2, 32, seed=10)
    # The NumPy reference agrees with PyTorch's own kernels, and tagjax with both.
    np.testing.assert_allclose(
        ref.forward(sd, x), _torch_forward(torch, sd, x), rtol=1e-4, atol=1e-4
    )
    got = tagjax_forward(spec, tv.from_state_dict(loaded, spec), x, 10)
    assert_parity("resnext101_32x8d reduced, from .pth", got, _torch_forward(torch, sd, x))
    # weights_only refuses pickled objects that are not tensors.
    torch.save({"fc.weight": torch.zeros(2, 2), "evil": NotAWeight()}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="weights-only"):
        tv.read_state_dict(tmp_path / "bad.pth")
