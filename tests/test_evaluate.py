"""Hashtag-prediction metrics against hand-computed values, and `tagjax evaluate` end to end."""

import json
import math

import numpy as np
import pytest

from tagjax import evaluate as ev
from tagjax import metrics
from tagjax.errors import UserError


def reference_ap(scores, positives):
    """AP by the definition in tagjax.evaluate, written as plainly as possible: a sum over distinct
    thresholds of (recall gain) x (precision at that threshold)."""
    p = positives.sum()
    if p == 0:
        return math.nan
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        selected = scores >= t
        tp = (positives & selected).sum()
        ap += (tp / p - last_recall) * (tp / selected.sum())
        last_recall = tp / p
    return ap


def test_average_precision_hand_computed_without_ties():
    # Positives at ranks 1, 3, 4: precisions 1, 2/3, 3/4.
    scores = np.array([[0.9], [0.8], [0.7], [0.6]], np.float32)
    labels = np.array([[0], [-1], [0], [0]])
    ap = metrics.average_precision(scores, labels, 1)
    assert ap[0] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_average_precision_ties_enter_together_and_ignore_order():
    # A positive and a negative tie at 0.8: the tie is one threshold with precision 2/3, so
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6, whichever of the two comes first in the input.
    scores = np.array([[0.9], [0.8], [0.8], [0.1]], np.float32)
    y = np.array([[True], [False], [True], [False]])
    assert metrics.average_precision(scores, y)[0] == pytest.approx(5 / 6)
    order = [2, 0, 3, 1]
    assert metrics.average_precision(scores[order], y[order])[0] == pytest.approx(5 / 6)
    # All images tied: AP is the positive rate.
    flat = np.zeros((4, 1), np.float32)
    assert metrics.average_precision(flat, y)[0] == pytest.approx(0.5)


def test_labels_without_positives_are_nan_and_left_out_of_map():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]], np.float32)
    labels = np.array([[0], [1]])  # label 2 has no positive
    m = metrics.hashtag_metrics(scores, labels)
    assert math.isnan(m["per_label_ap"][2])
    assert m["labels_without_positives"] == 1 and m["labels_with_positives"] == 2
    assert m["mAP"] == pytest.approx(1.0)  # labels 0 and 1 are both ranked perfectly


def test_average_precision_matches_reference_on_random_tied_scores():
    rng = np.random.default_rng(0)
    n, num = 23, 13  # fixed shapes (one compilation); chunks of 7 pad the last chunk
    for _ in range(10):
        scores = (rng.integers(0, 4, (n, num)) / 3).astype(np.float32)  # many ties
        y = rng.random((n, num)) < 0.25
        got = metrics.average_precision(
            scores, y, label_chunk=7
        )  # chunking and padding of the last chunk
        want = np.array([reference_ap(scores[:, j], y[:, j]) for j in range(num)])
        np.testing.assert_allclose(
            np.nan_to_num(got, nan=-1), np.nan_to_num(want, nan=-1), atol=1e-6
        )


def test_precision_recall_at_k_and_buckets_hand_computed():
    scores = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], np.float32)
    labels = np.array([[0, -1], [1, 2]])
    m = metrics.hashtag_metrics(scores, labels, label_counts=[10, 5, 1], ks=(1, 2))
    # Image 0: top-1 {0} hit; top-2 {0,1}: 1 hit. Image 1: top-1 {2} hit; top-2 {2,1}: 2 hits.
    assert m["precision@1"] == pytest.approx(1.0)
    assert m["recall@1"] == pytest.approx((1 / 1 + 1 / 2) / 2)
    assert m["precision@2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert m["recall@2"] == pytest.approx(1.0)
    # Per-label AP: label 0 -> 1; label 1: image 0 (0.3, negative) above image 1 (0.2, positive) -> 1/2;
    # label 2 -> 1.
    np.testing.assert_allclose(m["per_label_ap"], [1.0, 0.5, 1.0])
    assert m["mAP"] == pytest.approx(2.5 / 3)
    # Buckets by training counts 10 / 5 / 1: one label each.
    b = m["buckets"]
    assert (b["head"]["mAP"], b["torso"]["mAP"], b["tail"]["mAP"]) == pytest.approx((1.0, 0.5, 1.0))
    # Torso (label 1): never a top-1 prediction (precision undefined); its one true instance is missed
    # at k=1 and found at k=2, where it is predicted twice (once right).
    assert math.isnan(b["torso"]["precision@1"]) and b["torso"]["recall@1"] == 0.0
    assert b["torso"]["precision@2"] == pytest.approx(0.5) and b["torso"]["recall@2"] == 1.0
    assert m["bucket_counts_source"] == "training images"


def test_topk_ties_break_towards_lower_label_id():
    scores = np.array([[0.2, 0.4, 0.4, 0.4]], np.float32)
    top, hits = metrics.topk_predictions(scores, np.array([[3]]), 2)
    assert top.tolist() == [[1, 2]] and not hits.any()
    assert metrics.topk_accuracy(scores, [3], (1, 3)) == {"top1": 0.0, "top3": 1.0}


def test_frequency_buckets_cut_sorted_labels_into_thirds():
    counts = np.array([5, 100, 1, 50, 7, 7])
    bucket = metrics.frequency_buckets(counts)
    # Sorted: 100 (1), 50 (3), 7 (4), 7 (5), 5 (0), 1 (2) -> ties by id.
    assert bucket.tolist() == [2, 0, 2, 0, 1, 1]


def test_accumulator_equals_one_call_and_respects_mask():
    rng = np.random.default_rng(1)
    scores = rng.random((10, 6)).astype(np.float32)
    labels = np.full((10, 3), -1)
    for i in range(10):
        k = rng.integers(1, 4)
        labels[i, :k] = rng.choice(6, k, replace=False)
    acc = metrics.MetricsAccumulator(6)
    acc.update(scores[:4], labels[:4])
    # The second batch pads its labels wider and its rows with two masked-out (padding) images.
    wider = np.pad(labels[4:], ((0, 0), (0, 2)), constant_values=-1)
    acc.update(
        np.concatenate([scores[4:], np.zeros((2, 6), np.float32)]),
        np.concatenate([wider, np.full((2, 5), -1)]),
        mask=np.array([True] * 6 + [False] * 2),
    )
    got, want = acc.result(), metrics.hashtag_metrics(scores, labels)
    assert acc.count == 10
    for key in ("mAP", "precision@1", "precision@5", "recall@5"):
        assert got[key] == pytest.approx(want[key])


def _random_eval_set(n, num_labels, seed):
    """Softmax scores where true labels get a logit boost; 1-3 labels per image."""
    rng = np.random.default_rng(seed)
    logits = 2 * rng.normal(size=(n, num_labels)).astype(np.float32)
    labels = np.full((n, 3), -1, np.int32)
    for i in range(n):
        k = rng.integers(1, 4)
        labels[i, :k] = rng.choice(num_labels, k, replace=False)
        logits[i, labels[i, :k]] += 2.5
    return metrics.scores_from_logits(logits), labels


def test_streamed_metrics_match_exact_ones(monkeypatch):
    monkeypatch.setattr(metrics, "_AP_LABEL_CHUNK", 7)  # AP computed over several label chunks
    scores, labels = _random_eval_set(600, 40, seed=2)
    scores[7] = scores[8]  # a tie across images, including a positive's score
    labels[7] = labels[8]
    exact = metrics.MetricsAccumulator(40)
    streamed = metrics.StreamingMetricsAccumulator(40, bins=1024, max_images=580)
    for a in range(0, 600, 64):
        mask = np.arange(a, a + 64)[: len(scores[a : a + 64])] % 50 != 3  # some padding rows
        exact.update(scores[a : a + 64][mask], labels[a : a + 64][mask])
        streamed.update(scores[a : a + 64], labels[a : a + 64], mask=mask)
    assert streamed.count == 580 and streamed.full
    exact_scores, exact_labels = exact.arrays()
    want = metrics.hashtag_metrics(exact_scores[:580], exact_labels[:580])
    got = streamed.result()
    # top-k metrics and buckets are exact; AP differs only through negatives sharing a bin with a
    # positive (documented bound: docs/evaluation.md).
    for key in ("precision@1", "precision@5", "recall@1", "recall@5", "num_images"):
        assert got[key] == pytest.approx(want[key])
    assert got["buckets"]["tail"]["recall@5"] == pytest.approx(want["buckets"]["tail"]["recall@5"])
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-3)
    assert np.nanmax(np.abs(got["per_label_ap"] - want["per_label_ap"])) < 0.02
    assert np.array_equal(np.isnan(got["per_label_ap"]), np.isnan(want["per_label_ap"]))


def test_streamed_ap_is_exact_when_no_negative_shares_a_positives_bin():
    # Hand-made: label 0 positives at 0.9 and 0.5, negatives at 0.7 and 0.1 (distinct logit bins).
    scores = np.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.1, 0.9]], np.float32)
    labels = np.array([[0], [1], [0], [1]])
    acc = metrics.StreamingMetricsAccumulator(2, bins=4096)
    acc.update(scores, labels)
    # label 0: 1/1 at 0.9, 2/3 at 0.5 -> (1 + 2/3) / 2; label 1: 1/1 at 0.9, 2/3 at 0.3.
    assert acc.average_precision() == pytest.approx([5 / 6, 5 / 6])
    assert metrics.average_precision(scores, labels) == pytest.approx([5 / 6, 5 / 6])


def test_accumulator_is_picked_by_size_and_config():
    assert isinstance(metrics.make_accumulator(100, 1000), metrics.MetricsAccumulator)
    big = metrics.make_accumulator(17_000, 50_000)
    assert isinstance(big, metrics.StreamingMetricsAccumulator)
    assert isinstance(
        metrics.make_accumulator(17_000, 50_000, mode="exact"), metrics.MetricsAccumulator
    )
    assert isinstance(
        metrics.make_accumulator(10, 10, mode="streamed"), metrics.StreamingMetricsAccumulator
    )
    # max_images bounds the evaluation, so it decides too.
    assert isinstance(
        metrics.make_accumulator(17_000, 10**6, max_images=1000), metrics.MetricsAccumulator
    )
    with pytest.raises(UserError, match="eval_metrics"):
        metrics.make_accumulator(10, 10, mode="sampled")


def test_json_and_table_are_readable():
    m = metrics.hashtag_metrics(np.array([[0.9, 0.1]], np.float32), np.array([[0]]))
    text = json.dumps(metrics.to_json(m), allow_nan=False)  # NaN (label 1 has no positive) -> null
    assert json.loads(text)["per_label_ap"] == [1.0, None]
    table = metrics.format_table(m)
    for row in ("all", "head", "torso", "tail", "mAP", "P@1", "R@5"):
        assert row in table
    flat = metrics.scalar_summary(m, "eval/")
    assert flat["eval/mAP"] == 1.0 and "eval/head/mAP" in flat


def test_evaluate_command_on_the_synthetic_task(tmp_path, capsys):
    """`tagjax evaluate` of a (random) checkpoint on its config's synthetic task: JSON + table files."""
    from tagjax import cli, config, transfer

    cfg = config.load("tiny")
    ckpt = transfer.write_random_init_checkpoint(
        cfg, tmp_path / "ckpt", num_classes=cfg.data.synthetic_num_labels
    )
    out = tmp_path / "eval.json"
    assert (
        cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(ckpt),
                "--dataset",
                "synthetic",
                "--batch-size",
                "64",
                "--max-images",
                "128",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["num_images"] == 128 and result["num_labels"] == cfg.data.synthetic_num_labels
    assert 0.0 <= result["mAP"] <= 1.0 and result["bucket_counts_source"] == "training images"
    assert "head" in out.with_suffix(".txt").read_text()
    assert "mAP" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Classification: a classifier checkpoint on a downstream dataset.
# ----------------------------------------------------------------------------------------------------

# The checkpoint's classes, deliberately not in the dataset's (sorted folder) order, with one extra class.
CKPT_CLASSES = ["fig", "cherry", "grape", "apple", "elder", "banana", "date"]
COLOR_CLASS = {
    0: "apple",
    1: "banana",
    2: "elder",
}  # pooled feature (red, green, blue) -> class it votes for
# Biases rank every class when no colour feature fires: grape > date > fig > banana > elder > apple > cherry.
CKPT_BIAS = {
    "grape": 6.0,
    "date": 5.0,
    "fig": 4.0,
    "banana": 3.0,
    "elder": 2.0,
    "apple": 1.0,
    "cherry": 0.0,
}
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0)}


def write_color_classifier(path, class_names=CKPT_CLASSES):
    """A tiny_resnext whose pooled features are the (ReLU'd, normalized) colour of a uniform image, so its
    predictions are known by hand: the stem conv copies the RGB channels through its centre tap, every
    residual branch is zeroed (last BN scale and bias 0), every projection shortcut is an identity, and all
    batch norms are identities. Red, green and blue light up features 0, 1 and 2 (about 2.2-2.6 each after
    ImageNet normalization); black lights up none. The head adds 10 per unit of feature c to
    COLOR_CLASS[c] on top of CKPT_BIAS, so e.g. a red image ranks apple, grape, date, fig, banana, ..."""
    import jax

    from tagjax import checkpoint, config, models

    cfg = config.load("tiny")
    cfg.model.dtype = "float32"
    model = models.create(cfg.model, len(class_names))
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
    variables = jax.tree.map(lambda x: np.array(x, np.float32), dict(variables))
    params, stats = variables["params"], variables.get("batch_stats", {})
    params["conv1"]["kernel"][:] = 0.0
    for c in range(3):
        params["conv1"]["kernel"][3, 3, c, c] = 1.0
    for name, module in params.items():
        for sub, leaves in module.items() if name.startswith("layer") else [(None, module)]:
            if "scale" in leaves:  # a batch norm: identity (the residual branch's last one: zero)
                zero = sub == "bn3"
                leaves["scale"][:] = 0.0 if zero else 1.0
                leaves["bias"][:] = 0.0
                bn_stats = stats[name][sub] if sub else stats[name]
                bn_stats["mean"][:] = 0.0
                bn_stats["var"][:] = 1.0
            elif sub == "downsample_conv":
                leaves["kernel"][0, 0] = np.eye(*leaves["kernel"].shape[2:], dtype=np.float32)
    params["fc"]["kernel"][:] = 0.0
    for feature, cls in COLOR_CLASS.items():
        params["fc"]["kernel"][feature, class_names.index(cls)] = 10.0
    params["fc"]["bias"][:] = [CKPT_BIAS[c] for c in class_names]
    return checkpoint.save_inference_checkpoint(
        path,
        {"params": params, "batch_stats": stats},
        {"config": cfg, "class_names": list(class_names)},
    )


def write_color_folders(root, images):
    """DIR/train/<class>/ and DIR/val/<class>/ of uniform 40x40 PNGs; ``images``: (class, colour) pairs."""
    from PIL import Image

    for cls in sorted({c for c, _ in images}):
        (root / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), RGB["black"]).save(root / "train" / cls / "0.png")
    for i, (cls, color) in enumerate(images):
        (root / "val" / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), RGB[color]).save(root / "val" / cls / f"{i}.png")


def test_evaluate_command_top1_top5_of_a_classifier_on_a_folder_dataset(tmp_path, capsys):
    """`tagjax evaluate` of a classifier checkpoint on class folders (--split validation), labels remapped by
    class name onto the checkpoint's outputs; top-1/top-5 equal the hand count."""
    from tagjax import cli

    ckpt = write_color_classifier(tmp_path / "ckpt")
    images = [
        ("apple", "red"),
        ("apple", "black"),
        ("banana", "green"),
        ("cherry", "red"),
        ("date", "black"),
        ("elder", "blue"),
        ("fig", "green"),
    ]
    write_color_folders(tmp_path / "fruit", images)
    # Each image's ranking (colour class first, then by bias) and whether its class is in the top 1 / top 5:
    #   apple/red    apple grape date fig banana     yes yes
    #   apple/black  grape date fig banana elder     no  no
    #   banana/green banana grape date fig elder     yes yes
    #   cherry/red   apple grape date fig banana     no  no
    #   date/black   grape date fig banana elder     no  yes
    #   elder/blue   elder grape date fig banana     yes yes
    #   fig/green    banana grape date fig elder     no  yes
    out = tmp_path / "eval.json"
    assert (
        cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(ckpt),
                "--dataset",
                str(tmp_path / "fruit"),
                "--split",
                "validation",
                "--image-size",
                "32",
                "--resize",
                "36",
                "--batch-size",
                "4",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["top1"] == pytest.approx(3 / 7) and result["top5"] == pytest.approx(5 / 7)
    assert (result["num_images"], result["num_classes"], result["checkpoint_outputs"]) == (7, 6, 7)
    assert result["class_mapping"] == {
        "by": "name",
        "same_order": False,
        "outputs_outside_dataset": 1,
    }
    assert (result["split"], result["image_size"], result["resize"], result["bad_images"]) == (
        "validation",
        32,
        36,
        0,
    )
    table = out.with_suffix(".txt").read_text()
    assert "top-1" in table and "42.9" in table and "71.4" in table and "remapped" in table
    assert "71.4" in capsys.readouterr().out


def test_map_classes_by_wnid_then_name_and_refusals():
    # An ImageNet-style import: wnids in output order (not the dataset's), human names beside them.
    meta = {"class_wnids": ["n02", "n01", "n03"], "class_names": ["bee", "ant", "cat"]}
    m = ev.map_classes(meta, 3, ["n01", "n02", "n03"])
    assert m.by == "wnid" and m.to_checkpoint.tolist() == [1, 0, 2] and not m.identity
    assert ev.map_classes(meta, 3, ["n02", "n01", "n03"]).identity
    # A folder named by class names, a subset: matched by name; the third output is outside the dataset.
    m = ev.map_classes(meta, 3, ["ant", "cat"])
    assert m.by == "name" and m.to_checkpoint.tolist() == [1, 2] and m.outputs_outside_dataset == 1
    with pytest.raises(UserError, match=r"1 of the 2 classes of imagenet2012 .* 'n09'"):
        ev.map_classes(meta, 3, ["n01", "n09"], "imagenet2012")
    with pytest.raises(UserError, match="named twice"):
        ev.map_classes({"class_names": ["a", "b", "a"]}, 3, ["a", "b"])
    with pytest.raises(UserError, match="hashtag model"):
        ev.map_classes({"vocab_fingerprint": "abc"}, 3, ["a"])
    with pytest.raises(UserError, match="damaged"):
        ev.map_classes({"class_names": ["a", "b"]}, 3, ["a"])


def test_imported_imagenet_classes_are_the_tfds_imagenet2012_label_order(tmp_path):
    """TFDS's imagenet2012 labels are the import's class_wnids in the same order: matched by wnid, as is."""
    import tensorflow_datasets as tfds

    from tagjax.interop import torchvision as tv

    wnids, names, _ = tv.imagenet1k_classes()
    dataset_classes = (
        tfds.builder("imagenet2012", data_dir=str(tmp_path)).info.features["label"].names
    )
    m = ev.map_classes(
        {"class_wnids": wnids, "class_names": names}, 1000, dataset_classes, "imagenet2012"
    )
    assert m.by == "wnid" and m.identity and m.outputs_outside_dataset == 0
