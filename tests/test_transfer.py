"""Linear probe (features cached, L2 chosen on held-out data) and fine-tuning (trunk restored, resumable)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tagjax import checkpoint, config, models, transfer
from tagjax.errors import UserError

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


def _probe_config(**overrides):
    c = ml_collections.ConfigDict(
        dict(
            l2_sweep=(1e-3, 1e-1),
            val_fraction=0.25,
            max_iterations=200,
            tolerance=1e-5,
            standardize=True,
            refit=True,
        )
    )
    c.update(overrides)
    return c


def test_linear_probe_on_linearly_separable_features():
    rng = np.random.default_rng(0)
    num_classes, dim = 6, 24
    centers = rng.normal(size=(num_classes, dim)) * 4

    def sample(n):
        y = rng.integers(0, num_classes, n)
        return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y

    result = transfer.linear_probe(
        sample(600), sample(300), num_classes, _probe_config(), log_fn=lambda *_: None
    )
    assert result["test_top1"] >= 0.95 and result["test_top5"] == 1.0
    assert len(result["sweep"]) == 2 and result["l2"] in (1e-3, 1e-1)
    assert result["num_fit"] + result["num_val"] == result["num_train"] == 600


def test_logistic_regression_reaches_the_optimum():
    """At the returned weights the gradient of the objective vanishes (the problem is convex)."""
    import optax

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 10)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(np.int32) + (x[:, 1] > 1)
    model = transfer.fit_logistic_regression(x, y, 3, 1e-2, max_iterations=500, tolerance=1e-6)
    xs = (x - model.mean) / model.std

    def objective(w, b):
        ce = optax.softmax_cross_entropy_with_integer_labels(xs @ w + b, y).mean()
        return ce + 0.5 * 1e-2 * jnp.sum(w**2)

    gw, gb = jax.grad(objective, argnums=(0, 1))(jnp.asarray(model.w), jnp.asarray(model.b))
    assert float(jnp.sqrt(jnp.sum(gw**2) + jnp.sum(gb**2))) < 1e-4


def test_holdout_keeps_variant_groups_together_per_class():
    y = np.array([0] * 8 + [1] * 6)
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "f", "g", "g"])
    fit, val = transfer.holdout_split(y, groups, 0.5, seed=3)
    assert set(groups[fit]).isdisjoint(groups[val])
    # Class 0 has 4 groups -> 2 held out; class 1 has 3 -> round(1.5) = 2; every group has 2 examples.
    assert set(y[val].tolist()) == {0, 1} and len(val) == 8
    single = transfer.holdout_split(np.array([0, 1, 1]), None, 0.5)
    assert 0 in single[0]  # a class with one example stays in the fitting set


def _color_task(root, per_class_train=24, per_class_test=10, seed=0):
    """A tiny learnable image task: a colored square (the class) at a random place and size on noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(90, 160, (40, 40, 3)).astype(np.uint8)
                s = rng.integers(14, 30)
                top, left = rng.integers(0, 40 - s, 2)
                img[top : top + s, left : left + s] = np.clip(
                    np.array(color) + rng.integers(-20, 20, 3), 0, 255
                )
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def color_task(tmp_path_factory):
    return _color_task(tmp_path_factory.mktemp("colors"))


def _pretrained(path, seed=123):
    """A tiny 'pretrained' checkpoint: random weights with a seed other than fine-tuning's, batch-norm
    statistics made non-trivial, and a 16-way hashtag head that transfer must drop."""
    cfg = config.load("tiny")
    model = models.create(cfg.model, 16)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)), train=False)
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(
        lambda v: jnp.asarray(np.abs(rng.normal(size=v.shape)) * 0.5 + 0.1, v.dtype),
        variables["batch_stats"],
    )
    variables = {"params": variables["params"], "batch_stats": stats}
    return checkpoint.save_inference_checkpoint(path, variables, {"config": cfg, "source": "test"})


def _linear_config(dataset, **overrides):
    cfg = config.load(
        "transfer_linear",
        [
            f"--config.transfer.dataset={dataset}",
            "--config.transfer.dtype=float32",
            "--config.transfer.batch_size=32",
            "--config.transfer.feature_chunk=40",
        ],
    )
    with cfg.unlocked():
        cfg.update(overrides)
    return cfg


def test_linear_probe_on_a_tiny_image_task_with_cached_resumable_features(tmp_path, color_task):
    ckpt = _pretrained(tmp_path / "ckpt")
    cfg = _linear_config(str(color_task))
    logs = []
    result = transfer.run_linear(cfg, ckpt, tmp_path / "probe", progress=False, log_fn=logs.append)
    assert result["test_top1"] >= 0.95, result
    assert result["num_train"] == 96 and result["num_test"] == 40 and result["num_classes"] == 4
    saved = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert saved["test_top1"] == result["test_top1"] and saved["class_names"] == sorted(COLORS)

    # The cache: a rerun computes nothing; a lost chunk (an interrupted extraction) is recomputed alone.
    inference_path = str(checkpoint.resolve(ckpt))
    from tagjax import downstream
    from tagjax.inference import Inference

    inference = Inference(inference_path, head=False, dtype="float32")
    train_ds = downstream.open_split(str(color_task), "train")
    first = transfer.extract_features(
        inference, train_ds, tmp_path / "probe" / "features", chunk=40, progress=False
    )
    assert first.chunks_computed == 0 and len(first.y) == 96
    chunks = sorted(first.cache_dir.glob("chunk-*.npz"))
    assert len(chunks) == 3  # 96 examples in chunks of 40
    chunks[1].unlink()
    again = transfer.extract_features(
        inference, train_ds, tmp_path / "probe" / "features", chunk=40, progress=False
    )
    assert again.chunks_computed == 1
    np.testing.assert_allclose(again.x, first.x, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again.y, first.y)


def test_linear_probe_on_a_mocked_stock_dataset(tmp_path):
    """The stock TFDS path (cifar10 through tfds.testing.mock_data): random labels, so only the plumbing."""
    import tensorflow_datasets as tfds

    ckpt = _pretrained(tmp_path / "ckpt")
    cfg = _linear_config("cifar10", linear=_probe_config(l2_sweep=(1e-2,)))
    with tfds.testing.mock_data(num_examples=20):
        result = transfer.run_linear(
            cfg, ckpt, tmp_path / "probe", progress=False, log_fn=lambda *_: None
        )
    assert result["num_train"] == 20 and result["num_test"] == 20 and result["num_classes"] == 10
    assert 0.0 <= result["test_top1"] <= result["test_top5"] <= 1.0


def _finetune_config(dataset, **overrides):
    cfg = config.load(
        "transfer_finetune:tiny",
        [
            f"--config.transfer.dataset={dataset}",
            "--config.transfer.dtype=float32",
            "--config.transfer.bn_group_size=0",
            "--config.train.batch_size=16",
            "--config.train.total_images=96",
            "--config.train.checkpoint_every_images=48",
            "--config.train.log_every_images=32",
            "--config.transfer.eval_batch_size=40",
        ],
    )
    with cfg.unlocked():
        cfg.update(overrides)
    return cfg


def test_finetune_restores_the_trunk_exactly(tmp_path, color_task):
    from tagjax import optim, sharding
    from tagjax.inference import Inference

    ckpt = _pretrained(tmp_path / "ckpt")
    cfg = transfer.prepare_finetune_config(
        _finetune_config(str(color_task)), ckpt, num_classes=4, num_train=96
    )
    model = models.create(cfg.model, 4)
    tx, _ = optim.make_optimizer(cfg.optim, 16, 96)
    state = transfer.init_finetune_state(cfg, ckpt, model, tx, sharding.create_mesh(cfg.mesh))
    assert state.params["fc"]["kernel"].shape == (128, 4)  # a new head for the downstream classes

    # "First-step features": the fine-tuning model's pooled features before any update, through the very
    # forward pass fine-tuning uses, equal those of the pretrained variables bit for bit.
    from tagjax.train import normalize_images

    @jax.jit
    def features(variables, images):
        return model.apply(
            variables, normalize_images(images, cfg.data, jnp.float32), method=model.features
        )

    stored, _ = checkpoint.load_backbone(ckpt)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    got = features({"params": state.params, "batch_stats": state.batch_stats}, images)
    want = features(
        {
            "params": {**stored["params"], "fc": state.params["fc"]},
            "batch_stats": stored["batch_stats"],
        },
        images,
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # ... and they are the pretrained model's features as `tagjax embed` computes them (up to float32 rounding
    # of a differently fused normalization).
    np.testing.assert_allclose(
        np.asarray(got),
        Inference(ckpt, head=False, dtype="float32").features(images),
        rtol=1e-4,
        atol=1e-6,
    )
    for a, b in zip(
        jax.tree.leaves(stored),
        jax.tree.leaves(
            {
                "params": {k: v for k, v in state.params.items() if k != "fc"},
                "batch_stats": state.batch_stats,
            }
        ),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_finetune_learns_and_resumes_exactly(tmp_path, color_task, capsys):
    ckpt = _pretrained(tmp_path / "ckpt")
    cfg = _finetune_config(str(color_task))
    quiet = dict(progress=False, log_fn=lambda *_: None)
    straight = transfer.run_finetune(cfg, ckpt, tmp_path / "a", **quiet)
    assert straight["finished"] and straight["step"] == 6 and straight["num_test"] == 40
    assert 0.0 <= straight["test_top1"] <= 1.0

    partial = transfer.run_finetune(cfg, ckpt, tmp_path / "b", max_steps=3, **quiet)
    assert not partial["finished"] and partial["step"] == 3
    resumed = transfer.run_finetune(cfg, ckpt, tmp_path / "b", **quiet)
    assert resumed["step"] == 6 and resumed["test_top1"] == straight["test_top1"]
    a, _ = checkpoint.load_for_inference(tmp_path / "a")
    b, _ = checkpoint.load_for_inference(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    # The fine-tuned checkpoint is a normal tagjax checkpoint: it carries its model and classes.
    meta = checkpoint.read_metadata(tmp_path / "a")
    assert meta["num_classes"] == 4 and meta["class_names"] == sorted(COLORS)
    assert meta["config"]["model"]["name"] == "tiny_resnext"
    # ... so `tagjax predict` names its downstream classes.
    from tagjax import cli

    image = next((color_task / "test" / "red").glob("*.png"))
    assert (
        cli.main(
            ["predict", "--checkpoint", str(tmp_path / "a"), "--json", "--top-k", "4", str(image)]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {t["hashtag"] for t in out[0]["hashtags"]} == set(COLORS)


def test_finetune_unreadable_images_follow_the_data_configs_bad_record_rule(tmp_path, color_task):
    """Fine-tuning skips and counts unreadable images like every other reader, and fails past
    config.data.max_bad_record_fraction (one rule for every reader)."""
    import shutil

    data = tmp_path / "colors"
    shutil.copytree(color_task, data)
    for i in range(8):
        (data / "train" / "red" / f"broken{i}.png").write_bytes(b"not a png")
    ckpt = _pretrained(tmp_path / "ckpt")
    quiet = dict(progress=False, log_fn=lambda *_: None)
    lenient = _finetune_config(str(data))
    with lenient.unlocked():
        lenient.data.max_bad_record_fraction = 0.2
        lenient.data.bad_record_min_reads = 16
    result = transfer.run_finetune(lenient, ckpt, tmp_path / "lenient", **quiet)
    assert result["finished"] and 0 < result["bad_images"] <= 96  # skipped, counted, reported
    strict = _finetune_config(str(data))
    with strict.unlocked():
        strict.data.max_bad_record_fraction = 0.01
        strict.data.bad_record_min_reads = 16
    with pytest.raises(UserError, match=r"training images of .*max_bad_record_fraction=0.01"):
        transfer.run_finetune(strict, ckpt, tmp_path / "strict", **quiet)


def test_finetune_stops_on_a_nonfinite_update_like_pretraining(tmp_path, color_task):
    ckpt = _pretrained(tmp_path / "ckpt")
    cfg = _finetune_config(str(color_task))
    with cfg.unlocked():
        cfg.optim.base_lr = 1e30
    with pytest.raises(UserError, match=r"NaN/Inf at step \d+ .*nan_policy=skip"):
        transfer.run_finetune(cfg, ckpt, tmp_path / "ft", progress=False, log_fn=lambda *_: None)
