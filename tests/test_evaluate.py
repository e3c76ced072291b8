"""Hashtag-prediction metrics against hand-computed values, and `tagjax evaluate` end to end."""

import json
import math

import numpy as np
import pytest

from tagjax import evaluate as ev


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
    ap = ev.average_precision(scores, labels, 1)
    assert ap[0] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_average_precision_ties_enter_together_and_ignore_order():
    # A positive and a negative tie at 0.8: the tie is one threshold with precision 2/3, so
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6, whichever of the two comes first in the input.
    scores = np.array([[0.9], [0.8], [0.8], [0.1]], np.float32)
    y = np.array([[True], [False], [True], [False]])
    assert ev.average_precision(scores, y)[0] == pytest.approx(5 / 6)
    order = [2, 0, 3, 1]
    assert ev.average_precision(scores[order], y[order])[0] == pytest.approx(5 / 6)
    # All images tied: AP is the positive rate.
    flat = np.zeros((4, 1), np.float32)
    assert ev.average_precision(flat, y)[0] == pytest.approx(0.5)


def test_labels_without_positives_are_nan_and_left_out_of_map():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]], np.float32)
    labels = np.array([[0], [1]])  # label 2 has no positive
    m = ev.hashtag_metrics(scores, labels)
    assert math.isnan(m["per_label_ap"][2])
    assert m["labels_without_positives"] == 1 and m["labels_with_positives"] == 2
    assert m["mAP"] == pytest.approx(1.0)  # labels 0 and 1 are both ranked perfectly


def test_average_precision_matches_reference_on_random_tied_scores():
    rng = np.random.default_rng(0)
    n, num = 23, 13  # fixed shapes (one compilation); chunks of 7 pad the last chunk
    for _ in range(10):
        scores = (rng.integers(0, 4, (n, num)) / 3).astype(np.float32)  # many ties
        y = rng.random((n, num)) < 0.25
        got = ev.average_precision(scores, y, label_chunk=7)  # chunking and padding of the last chunk
        want = np.array([reference_ap(scores[:, j], y[:, j]) for j in range(num)])
        np.testing.assert_allclose(np.nan_to_num(got, nan=-1), np.nan_to_num(want, nan=-1), atol=1e-6)


def test_precision_recall_at_k_and_buckets_hand_computed():
    scores = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], np.float32)
    labels = np.array([[0, -1], [1, 2]])
    m = ev.hashtag_metrics(scores, labels, label_counts=[10, 5, 1], ks=(1, 2))
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
    top, hits = ev.topk_predictions(scores, np.array([[3]]), 2)
    assert top.tolist() == [[1, 2]] and not hits.any()
    assert ev.topk_accuracy(scores, [3], (1, 3)) == {"top1": 0.0, "top3": 1.0}


def test_frequency_buckets_cut_sorted_labels_into_thirds():
    counts = np.array([5, 100, 1, 50, 7, 7])
    bucket = ev.frequency_buckets(counts)
    # Sorted: 100 (1), 50 (3), 7 (4), 7 (5), 5 (0), 1 (2) -> ties by id.
    assert bucket.tolist() == [2, 0, 2, 0, 1, 1]


def test_accumulator_equals_one_call_and_respects_mask():
    rng = np.random.default_rng(1)
    scores = rng.random((10, 6)).astype(np.float32)
    labels = np.full((10, 3), -1)
    for i in range(10):
        k = rng.integers(1, 4)
        labels[i, :k] = rng.choice(6, k, replace=False)
    acc = ev.MetricsAccumulator(6)
    acc.update(scores[:4], labels[:4])
    # The second batch pads its labels wider and its rows with two masked-out (padding) images.
    wider = np.pad(labels[4:], ((0, 0), (0, 2)), constant_values=-1)
    acc.update(np.concatenate([scores[4:], np.zeros((2, 6), np.float32)]),
               np.concatenate([wider, np.full((2, 5), -1)]),
               mask=np.array([True] * 6 + [False] * 2))
    got, want = acc.result(), ev.hashtag_metrics(scores, labels)
    assert acc.count == 10
    for key in ("mAP", "precision@1", "precision@5", "recall@5"):
        assert got[key] == pytest.approx(want[key])


def test_json_and_table_are_readable():
    m = ev.hashtag_metrics(np.array([[0.9, 0.1]], np.float32), np.array([[0]]))
    text = json.dumps(ev.to_json(m), allow_nan=False)  # NaN (label 1 has no positive) -> null
    assert json.loads(text)["per_label_ap"] == [1.0, None]
    table = ev.format_table(m)
    for row in ("all", "head", "torso", "tail", "mAP", "P@1", "R@5"):
        assert row in table
    flat = ev.scalar_summary(m, "eval/")
    assert flat["eval/mAP"] == 1.0 and "eval/head/mAP" in flat


def test_evaluate_command_on_the_synthetic_task(tmp_path, capsys):
    """`tagjax evaluate` of a (random) checkpoint on its config's synthetic task: JSON + table files."""
    from tagjax import cli, config, transfer

    cfg = config.load("tiny")
    ckpt = transfer.write_random_init_checkpoint(cfg, tmp_path / "ckpt", num_classes=cfg.data.synthetic_num_labels)
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--checkpoint", str(ckpt), "--dataset", "synthetic", "--batch-size", "64",
                     "--max-images", "128", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 128 and result["num_labels"] == cfg.data.synthetic_num_labels
    assert 0.0 <= result["mAP"] <= 1.0 and result["bucket_counts_source"] == "training images"
    assert "head" in out.with_suffix(".txt").read_text()
    assert "mAP" in capsys.readouterr().out
