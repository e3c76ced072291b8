"""Hashtag-prediction metrics: average precision, precision/recall@k, head/torso/tail frequency buckets, and
the accumulator the trainer's periodic evaluation and ``tagjax evaluate`` share (NumPy and JAX only).

The metrics are functions of accumulated arrays, so the trainer, the evaluate command and a notebook
compute the same numbers::

    acc = metrics.MetricsAccumulator(num_labels)
    for batch in eval_batches:
        acc.update(scores, batch["labels"], batch["mask"])       # scores: [B, L] probabilities
    result = acc.result(label_counts=train_label_counts)          # dict; see hashtag_metrics

Definitions (every choice below is deliberate and tested against hand-computed values):

* **Scores.** Higher means more likely. Ranking images *for one label* (average precision) is not
  invariant to a per-image shift of the logits, so pass the model's probabilities: softmax for the
  softmax loss, sigmoid for the per-label baseline (``scores_from_logits``). Precision/recall@k only rank
  labels within an image and are the same for logits and probabilities.
* **Average precision of a label** ranks all evaluated images by their score for that label and sums, over
  the distinct score values t in decreasing order, ``(R(t) - R(t_prev)) * P(t)``, where P and R are the
  precision and recall of "score >= t". Images with *tied* scores therefore enter together (the whole tie
  is one threshold), so the result does not depend on the order the images arrived in; without ties this
  is the usual mean of the precisions at each positive's rank. It is scikit-learn's
  ``average_precision_score`` definition.
* **Labels without positives** among the evaluated images have no defined AP (recall is 0/0). They are
  left out of every mean and counted (``labels_without_positives``); their per-label AP is NaN. A label
  with positives but never scored above a negative still counts (its AP is small, not missing).
* **mAP** is the unweighted mean of AP over labels with at least one positive (every label counts once,
  which is why tail labels matter as much as head labels).
* **precision@k** of an image is ``|top-k predicted ∩ true| / k``; **recall@k** is ``|top-k ∩ true| /
  |true|``; both are averaged over images. Ties in the top-k are broken towards the lower label id
  (``jax.lax.top_k``), so the numbers are deterministic. Images with no labels (none exist in tagjax
  records, which always carry at least one) are excluded and counted.
* **Frequency buckets.** Labels are ordered by the number of *training* images carrying them (most frequent
  first, ties by id) and cut into head / torso / tail at ``bucket_fractions`` of the label count (default:
  thirds). Without training counts the evaluated images' own counts are used (and the result says so).
  Per bucket: mAP over the bucket's labels; precision@k = hits among top-k predictions that fall in the
  bucket / top-k predictions that fall in the bucket; recall@k = true bucket labels found in the top k /
  true bucket labels. Bucket precision and recall are micro-averages (pooled over images), because many
  images have no label (or no prediction) in a given bucket.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tagjax import records
from tagjax.errors import UserError

BUCKETS = ("head", "torso", "tail")
DEFAULT_KS = (1, 5)
DEFAULT_BUCKET_FRACTIONS = (1 / 3, 1 / 3)  # head, torso; the tail is the rest


def scores_from_logits(logits, loss: str = "softmax") -> np.ndarray:
    """Per-label probabilities (float32 numpy) from logits, for the model's loss (see module docstring)."""
    x = np.asarray(logits, np.float32)
    if loss == "sigmoid":
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _as_padded_labels(labels, num_labels: int) -> np.ndarray:
    """int32 [N, M] label ids padded with -1, from padded ids or a dense bool matrix [N, num_labels]."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(
            f"labels must be 2-D ([N, max_labels] ids or [N, num_labels] bool), got {labels.shape}"
        )
    if labels.dtype == bool:  # dense [N, num_labels] multi-hot; integers always mean label ids
        if labels.shape[1] != num_labels:
            raise ValueError(
                f"a bool label matrix needs {num_labels} columns, got {labels.shape[1]}"
            )
        dense = labels.astype(bool)
        width = max(int(dense.sum(axis=1).max(initial=0)), 1)
        out = np.full((dense.shape[0], width), -1, np.int32)
        for i, row in enumerate(dense):
            ids = np.flatnonzero(row)
            out[i, : len(ids)] = ids
        return out
    labels = labels.astype(np.int32)
    if labels.size and labels.max() >= num_labels:
        raise ValueError(f"label id {labels.max()} out of range for {num_labels} labels")
    return labels


@functools.partial(jax.jit, static_argnames=("chunk",))
def _ap_chunk(scores, labels, first, *, chunk: int):
    """AP and positive counts of labels [first, first + chunk); scores [N, chunk], labels [N, M] ids."""
    ids = first + jnp.arange(chunk, dtype=jnp.int32)
    y = jnp.any(labels[:, :, None] == ids[None, None, :], axis=1)  # [N, chunk]
    n = scores.shape[0]
    order = jnp.argsort(-scores, axis=0, stable=True)
    s = jnp.take_along_axis(scores, order, axis=0)
    ys = jnp.take_along_axis(y, order, axis=0).astype(jnp.float32)
    tp = jnp.cumsum(ys, axis=0)
    rank = jnp.arange(1, n + 1, dtype=jnp.float32)[:, None]
    # A threshold ends where the next score differs (or at the last image): the whole tie enters at once.
    end = jnp.concatenate([s[1:] != s[:-1], jnp.ones((1, chunk), bool)], axis=0)
    tp_at_end = jnp.where(end, tp, 0.0)
    # tp is non-decreasing, so the running max of tp at earlier ends is tp at the previous threshold.
    prev = jnp.concatenate([jnp.zeros((1, chunk)), jax.lax.cummax(tp_at_end, axis=0)[:-1]], axis=0)
    gain = jnp.where(end, tp - prev, 0.0)  # positives entering at this threshold
    positives = tp[-1]
    ap = jnp.sum(gain * tp / rank, axis=0) / jnp.maximum(positives, 1.0)
    return jnp.where(positives > 0, ap, jnp.nan), positives


def average_precision(
    scores, labels, num_labels: int | None = None, *, label_chunk: int = 512
) -> np.ndarray:
    """Per-label AP, float64 [L]; NaN for labels without positives (see the module docstring).

    ``scores`` [N, L]; ``labels`` [N, M] ids padded with -1, or a dense bool matrix [N, L].
    Labels are processed ``label_chunk`` at a time, so device memory is ~N x label_chunk x 16 bytes.
    """
    scores = np.asarray(scores)
    n, num = scores.shape
    num_labels = num if num_labels is None else num_labels
    if num != num_labels:
        raise ValueError(f"scores have {num} columns but num_labels={num_labels}")
    ids = _as_padded_labels(labels, num_labels)
    if ids.shape[0] != n:
        raise ValueError(f"{n} score rows but {ids.shape[0]} label rows")
    out = np.full(num_labels, np.nan)
    if n == 0:
        return out
    chunk = min(label_chunk, num_labels)
    ids_dev = jnp.asarray(ids)
    for first in range(0, num_labels, chunk):
        block = scores[:, first : first + chunk].astype(np.float32)
        width = block.shape[1]
        if (
            width < chunk
        ):  # pad the last chunk to the compiled width; padded columns have no positives
            block = np.pad(block, ((0, 0), (0, chunk - width)))
        ap, _ = _ap_chunk(jnp.asarray(block), ids_dev, jnp.int32(first), chunk=chunk)
        out[first : first + width] = np.asarray(ap, np.float64)[:width]
    return out


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_hits(scores, labels, *, k: int):
    """Top-k label ids [B, k] (ties -> lower id) and whether each is a true label [B, k]."""
    _, top = jax.lax.top_k(scores, k)
    hits = jnp.any(top[:, :, None] == labels[:, None, :], axis=2) & (top >= 0)
    return top, hits


def topk_predictions(scores, labels, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(top-k ids [N, k], hits [N, k] bool) computed in row batches."""
    scores = np.asarray(scores)
    labels = np.asarray(labels, np.int32)
    k = min(k, scores.shape[1])
    tops, hits = [], []
    for i in range(0, scores.shape[0], batch):
        t, h = _topk_hits(
            jnp.asarray(scores[i : i + batch], jnp.float32), jnp.asarray(labels[i : i + batch]), k=k
        )
        tops.append(np.asarray(t))
        hits.append(np.asarray(h))
    if not tops:
        return np.zeros((0, k), np.int32), np.zeros((0, k), bool)
    return np.concatenate(tops), np.concatenate(hits)


def topk_accuracy(logits, labels, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Single-label classification: ``{"top1": ..., "top5": ...}`` (fractions), ties -> lower class id."""
    logits = np.asarray(logits, np.float32)
    labels = np.asarray(labels, np.int32).reshape(-1, 1)
    if logits.shape[0] == 0:
        return {f"top{k}": float("nan") for k in ks}
    kmax = min(max(ks), logits.shape[1])
    _, hits = topk_predictions(logits, labels, kmax)
    return {f"top{k}": float(hits[:, : min(k, kmax)].any(axis=1).mean()) for k in ks}


def frequency_buckets(counts, fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS) -> np.ndarray:
    """int8 [L]: 0 head, 1 torso, 2 tail; labels sorted by ``counts`` (desc, ties by id), cut at fractions."""
    counts = np.asarray(counts)
    if len(fractions) != 2 or min(fractions) < 0 or sum(fractions) > 1 + 1e-9:
        raise UserError(
            f"bucket fractions {tuple(fractions)} must be two non-negative shares (head, torso) summing to "
            "at most 1; the tail is the rest."
        )
    num = len(counts)
    order = np.lexsort((np.arange(num), -counts))  # most frequent first, ties by id
    head_end = round(fractions[0] * num)
    torso_end = round((fractions[0] + fractions[1]) * num)
    bucket = np.empty(num, np.int8)
    bucket[order[:head_end]] = 0
    bucket[order[head_end:torso_end]] = 1
    bucket[order[torso_end:]] = 2
    return bucket


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def hashtag_metrics(
    scores,
    labels,
    *,
    label_counts=None,
    ks: Sequence[int] = DEFAULT_KS,
    bucket_fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS,
    label_chunk: int = 512,
) -> dict[str, Any]:
    """All hashtag-prediction metrics of ``scores`` [N, L] against ``labels`` (see the module docstring).

    ``labels``: [N, M] ids padded with -1 (the input pipeline's format) or a dense bool [N, L] matrix.
    ``label_counts``: training images per label (``LabelIndex.counts``) for the head/torso/tail buckets.
    Returns a JSON-ready dict of fractions (not percentages), plus ``per_label_ap`` (a float64 numpy
    array, NaN where a label has no positives) which ``to_json`` turns into a list.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, num_labels], got shape {scores.shape}")
    n, num_labels = scores.shape
    ids = _as_padded_labels(labels, num_labels)
    keep = (ids >= 0).sum(axis=1) > 0
    scores, ids = scores[keep], ids[keep]
    ap = average_precision(scores, ids, num_labels, label_chunk=label_chunk)
    top, hits = topk_predictions(scores, ids, min(max(ks), num_labels))
    return _metrics_from_parts(
        ap,
        ids,
        top,
        hits,
        images_without_labels=int(n - keep.sum()),
        label_counts=label_counts,
        ks=ks,
        bucket_fractions=bucket_fractions,
    )


def _metrics_from_parts(
    ap: np.ndarray,
    ids: np.ndarray,
    top: np.ndarray,
    hits: np.ndarray,
    *,
    images_without_labels: int,
    label_counts,
    ks: Sequence[int],
    bucket_fractions: Sequence[float],
) -> dict[str, Any]:
    """The metrics dict from per-label AP [L], the images' true ids [N, M] (every row has one), and their
    top-k predictions and hits [N, kmax]: what the exact and the streamed accumulators share."""
    num_labels = len(ap)
    num_true = (ids >= 0).sum(axis=1)
    has_pos = ~np.isnan(ap)
    kmax = min(max(ks), num_labels)
    out: dict[str, Any] = {
        "num_images": len(ids),
        "images_without_labels": int(images_without_labels),
        "num_labels": int(num_labels),
        "labels_with_positives": int(has_pos.sum()),
        "labels_without_positives": int(num_labels - has_pos.sum()),
        "mAP": _nanmean(ap),
    }
    for k in ks:
        kk = min(k, kmax)
        h = hits[:, :kk].sum(axis=1)
        out[f"precision@{k}"] = float((h / k).mean()) if len(h) else float("nan")
        out[f"recall@{k}"] = float((h / num_true).mean()) if len(h) else float("nan")

    if label_counts is None:
        counts = np.bincount(ids[ids >= 0], minlength=num_labels)
        out["bucket_counts_source"] = "evaluated images"
    else:
        counts = np.asarray(label_counts)
        if counts.shape != (num_labels,):
            raise ValueError(f"label_counts has shape {counts.shape}, expected ({num_labels},)")
        out["bucket_counts_source"] = "training images"
    bucket = frequency_buckets(counts, bucket_fractions)
    true_bucket = np.where(ids >= 0, bucket[np.maximum(ids, 0)], -1)
    pred_bucket = bucket[top] if top.size else np.zeros_like(top, np.int8)
    buckets: dict[str, Any] = {}
    for b, name in enumerate(BUCKETS):
        in_b = bucket == b
        entry: dict[str, Any] = {
            "num_labels": int(in_b.sum()),
            "labels_with_positives": int((in_b & has_pos).sum()),
            "mAP": _nanmean(ap[in_b]),
            "min_count": int(counts[in_b].min()) if in_b.any() else 0,
            "max_count": int(counts[in_b].max()) if in_b.any() else 0,
        }
        true_in_b = int((true_bucket == b).sum())
        for k in ks:
            kk = min(k, kmax)
            pred_in_b = pred_bucket[:, :kk] == b
            found = int((hits[:, :kk] & pred_in_b).sum())
            entry[f"precision@{k}"] = (
                found / int(pred_in_b.sum()) if pred_in_b.any() else float("nan")
            )
            entry[f"recall@{k}"] = found / true_in_b if true_in_b else float("nan")
        buckets[name] = entry
    out["buckets"] = buckets
    out["per_label_ap"] = ap
    return out


class MetricsAccumulator:
    """Collects per-batch scores and labels on the host, then computes :func:`hashtag_metrics`.

    Memory is N x L x itemsize bytes for the scores (``score_dtype``; float16 halves it at the cost of
    more ties, which AP handles as documented): 50k images x 17k labels in float32 is 3.4 GB. Only the
    rows whose ``mask`` is True (not padding) are kept.
    """

    def __init__(self, num_labels: int, *, score_dtype=np.float32, max_images: int = 0):
        self.num_labels = int(num_labels)
        self.score_dtype = np.dtype(score_dtype)
        self.max_images = int(max_images)
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.count = 0

    @property
    def full(self) -> bool:
        return self.max_images > 0 and self.count >= self.max_images

    def update(self, scores, labels, mask=None) -> None:
        scores = np.asarray(scores)
        labels = np.asarray(labels, np.int32)
        if scores.shape[-1] != self.num_labels:
            raise ValueError(
                f"scores have {scores.shape[-1]} labels, the accumulator {self.num_labels}"
            )
        if mask is not None:
            mask = np.asarray(mask, bool)
            scores, labels = scores[mask], labels[mask]
        if self.max_images > 0:
            room = self.max_images - self.count
            scores, labels = scores[:room], labels[:room]
        self._scores.append(scores.astype(self.score_dtype, copy=False))
        self._labels.append(labels)
        self.count += len(scores)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores [N, L], labels [N, M] padded with -1) collected so far."""
        if not self._scores:
            return np.zeros((0, self.num_labels), self.score_dtype), np.zeros((0, 1), np.int32)
        width = max(x.shape[1] for x in self._labels)
        labels = np.concatenate(
            [np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1) for x in self._labels]
        )
        return np.concatenate(self._scores), labels

    def result(self, **kwargs) -> dict[str, Any]:
        scores, labels = self.arrays()
        return hashtag_metrics(scores, labels, **kwargs)


# Streamed AP bins scores in logit space, log(p / (1 - p)), over [_LOGIT_MIN, _LOGIT_MAX]: softmax
# probabilities over thousands of labels sit around logit -10, sigmoid ones near 1 at +10 and more, and
# float32 saturates below +17. Scores outside the range land in the first or last bin.
_LOGIT_MIN = -40.0
_LOGIT_MAX = 20.0
STREAMED_MODES = ("auto", "exact", "streamed")
_AP_LABEL_CHUNK = 1024  # labels whose histograms are expanded to int64 at once when computing AP


def _logit_bins(scores, bins: int, xp=np):
    """(bin index int32, position inside the bin in [0, 1)) of probabilities ``scores``."""
    scores = xp.asarray(scores, xp.float32)
    with np.errstate(divide="ignore"):
        z = xp.log(scores) - xp.log1p(-scores)
    x = (xp.clip(z, _LOGIT_MIN, _LOGIT_MAX) - _LOGIT_MIN) * (bins / (_LOGIT_MAX - _LOGIT_MIN))
    b = xp.clip(xp.floor(x), 0, bins - 1)
    return b.astype(xp.int32), xp.clip(x - b, 0.0, 1.0)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("bins",))
def _histogram_update(hist, scores, mask, *, bins: int):
    """hist[l, bin(scores[i, l])] += 1 for every row i with mask[i]; hist uint32 [L, bins]."""
    b, _ = _logit_bins(scores, bins, jnp)
    cols = jnp.arange(scores.shape[1], dtype=jnp.int32)[None, :]
    return hist.at[cols, b].add(mask[:, None].astype(jnp.uint32))


class StreamingMetricsAccumulator:
    """:func:`hashtag_metrics` in host memory that does not grow with N x L.

    Kept per evaluated image: its true label ids and the score of each (exact, O(labels per image)), and
    its top-k predictions (O(k)); kept per label: a histogram of *all* its scores over ``bins`` bins of
    logit space (uint32 [L, bins], on the default JAX device: 70 MB at 17k labels x 1024 bins). Negatives
    per bin are the histogram minus the binned positives. Precision@k, recall@k and the buckets are exact.
    AP is exact except for negatives that share a bin with a positive: they are counted as above the
    positive in proportion to the positive's place in the bin (scores uniform within a bin). The error
    against the exact AP is measured in ``benchmarks/streamed_ap.py`` and documented on the evaluation
    page.
    """

    def __init__(self, num_labels: int, *, bins: int = 1024, max_images: int = 0, kmax: int = 5):
        self.num_labels = int(num_labels)
        self.bins = int(bins)
        self.max_images = int(max_images)
        self.kmax = min(int(kmax), self.num_labels)
        self._hist = jnp.zeros((self.num_labels, self.bins), jnp.uint32)
        self._labels: list[np.ndarray] = []
        self._positive_scores: list[np.ndarray] = []
        self._top: list[np.ndarray] = []
        self._hits: list[np.ndarray] = []
        self.count = 0
        self.images_without_labels = 0

    @property
    def full(self) -> bool:
        return self.max_images > 0 and self.count >= self.max_images

    def update(self, scores, labels, mask=None) -> None:
        scores = np.asarray(scores, np.float32)
        labels = np.asarray(labels, np.int32)
        if scores.shape[-1] != self.num_labels:
            raise ValueError(
                f"scores have {scores.shape[-1]} labels, the accumulator {self.num_labels}"
            )
        ids = _as_padded_labels(labels, self.num_labels)
        keep = np.ones(len(scores), bool) if mask is None else np.asarray(mask, bool).copy()
        if self.max_images > 0:
            room = self.max_images - self.count
            keep &= np.cumsum(keep) <= room
        has_label = (ids >= 0).any(axis=1)
        self.images_without_labels += int((keep & ~has_label).sum())
        keep &= has_label
        if not keep.any():
            return
        self._hist = _histogram_update(
            self._hist, jnp.asarray(scores), jnp.asarray(keep), bins=self.bins
        )
        scores, ids = scores[keep], ids[keep]
        rows = np.arange(len(ids))[:, None]
        self._labels.append(ids)
        self._positive_scores.append(np.where(ids >= 0, scores[rows, np.maximum(ids, 0)], 0.0))
        top, hits = topk_predictions(scores, ids, self.kmax)
        self._top.append(top)
        self._hits.append(hits)
        self.count += len(ids)

    def average_precision(self) -> np.ndarray:
        """Per-label AP (float64 [L], NaN without positives) from the histograms and the positives."""
        ids, pos_scores = _padded_concat(self._labels), _padded_concat(self._positive_scores)
        is_pos = ids >= 0
        label, score = ids[is_pos].astype(np.int64), pos_scores[is_pos]
        b, inside = _logit_bins(score, self.bins)
        fp = np.zeros(len(label), np.float64)
        for first in range(0, self.num_labels, _AP_LABEL_CHUNK):  # bounded temporaries
            last = min(first + _AP_LABEL_CHUNK, self.num_labels)
            hist = np.asarray(self._hist[first:last], np.int64)
            mine = np.flatnonzero((label >= first) & (label < last))
            rows, cols = label[mine] - first, b[mine]
            np.subtract.at(hist, (rows, cols), 1)  # -> negatives per bin
            # Negatives strictly above the positive's bin, plus its share of those in the bin.
            above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1] - hist
            fp[mine] = above[rows, cols] + hist[rows, cols] * (1.0 - inside[mine])
        # TP at each positive's score: positives of its label with a score >= it (ties enter together).
        order = np.lexsort((-score, label))
        label, score, fp = label[order], score[order], fp[order]
        start = np.searchsorted(label, label, side="left")
        # Within a label (sorted by descending score), the last index of each tie group.
        tied_with_previous = np.zeros(len(label), bool)
        tied_with_previous[1:] = (label[1:] == label[:-1]) & (score[1:] == score[:-1])
        group_start = np.flatnonzero(~tied_with_previous)
        group_last = np.append(group_start[1:], len(label)) - 1
        last = group_last[np.cumsum(~tied_with_previous) - 1]
        tp = last - start + 1
        precision = tp / (tp + fp)
        sums = np.bincount(label, weights=precision, minlength=self.num_labels)
        positives = np.bincount(label, minlength=self.num_labels)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(positives > 0, sums / positives, np.nan)

    def result(
        self,
        *,
        label_counts=None,
        ks: Sequence[int] = DEFAULT_KS,
        bucket_fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS,
        label_chunk: int = 512,
    ) -> dict[str, Any]:
        del label_chunk  # (the exact accumulator's knob)
        if min(max(ks), self.num_labels) > self.kmax:
            raise ValueError(
                f"this accumulator keeps the top {self.kmax} predictions, not {max(ks)}"
            )
        out = _metrics_from_parts(
            self.average_precision(),
            _padded_concat(self._labels, fill=-1),
            np.concatenate(self._top) if self._top else np.zeros((0, self.kmax), np.int32),
            np.concatenate(self._hits) if self._hits else np.zeros((0, self.kmax), bool),
            images_without_labels=self.images_without_labels,
            label_counts=label_counts,
            ks=ks,
            bucket_fractions=bucket_fractions,
        )
        out["ap_method"] = f"streamed ({self.bins} logit bins per label)"
        return out


def _padded_concat(parts: Sequence[np.ndarray], fill=-1) -> np.ndarray:
    if not parts:
        return np.zeros((0, 1), np.int32)
    width = max(x.shape[1] for x in parts)
    return np.concatenate(
        [np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill) for x in parts]
    )


def make_accumulator(
    num_labels: int,
    num_images: int,
    *,
    mode: str = "auto",
    exact_max_scores: int = 100_000_000,
    bins: int = 1024,
    max_images: int = 0,
    kmax: int = max(DEFAULT_KS),
):
    """The accumulator for an evaluation of ``num_images`` images: exact (keeps all N x L scores) when
    ``mode`` is "exact", or "auto" with N x L at most ``exact_max_scores``; else streamed (bounded host
    memory, see :class:`StreamingMetricsAccumulator`). Configs: ``config.train.eval_metrics``,
    ``eval_exact_max_scores``, ``eval_histogram_bins``."""
    if mode not in STREAMED_MODES:
        raise UserError(
            f"config.train.eval_metrics={mode!r} is not one of {', '.join(STREAMED_MODES)}."
        )
    n = min(num_images, max_images) if max_images > 0 else num_images
    if mode == "exact" or (mode == "auto" and n * num_labels <= exact_max_scores):
        return MetricsAccumulator(num_labels, max_images=max_images)
    return StreamingMetricsAccumulator(num_labels, bins=bins, max_images=max_images, kmax=kmax)


def accumulator_from_config(config, num_labels: int, num_images: int, max_images: int = 0):
    """:func:`make_accumulator` with ``config.train.eval_metrics`` / ``eval_exact_max_scores`` /
    ``eval_histogram_bins`` (defaults where a config predates them)."""
    t = config.train
    return make_accumulator(
        num_labels,
        num_images,
        mode=str(t.get("eval_metrics", "auto")),
        exact_max_scores=int(t.get("eval_exact_max_scores", 100_000_000)),
        bins=int(t.get("eval_histogram_bins", 1024)),
        max_images=max_images,
    )


def to_json(metrics: Mapping[str, Any]) -> dict:
    """``metrics`` with numpy arrays as lists and NaN as null (strict JSON)."""

    def conv(x):
        if isinstance(x, Mapping):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, np.ndarray):
            return [conv(v) for v in x.tolist()]
        if isinstance(x, list | tuple):
            return [conv(v) for v in x]
        if isinstance(x, float | np.floating):
            return None if math.isnan(x) else float(x)
        if isinstance(x, np.integer):
            return int(x)
        return x

    return conv(metrics)


def scalar_summary(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flat ``{name: value}`` of the scalar metrics (for metric writers / TensorBoard)."""
    out = {}
    for key, value in metrics.items():
        if key == "buckets":
            for b, entry in value.items():
                for k, v in entry.items():
                    if k in ("mAP",) or "@" in k:
                        out[f"{prefix}{b}/{k}"] = float(v)
        elif isinstance(value, int | float | np.floating | np.integer) and not isinstance(
            value, bool
        ):
            out[f"{prefix}{key}"] = float(value)
    return out


def format_percent(x) -> str:
    return "    -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"


def format_table(
    metrics: Mapping[str, Any], ks: Sequence[int] = DEFAULT_KS, title: str = ""
) -> str:
    """A readable table of ``hashtag_metrics`` output (percentages)."""
    cols = ["mAP"] + [f"{m}@{k}" for k in ks for m in ("precision", "recall")]
    short = {c: c.replace("precision", "P").replace("recall", "R") for c in cols}
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"{metrics['num_images']:,} images, {metrics['num_labels']:,} labels "
        f"({metrics['labels_with_positives']:,} with positives; "
        f"{metrics['labels_without_positives']:,} without, left out of mAP)"
    )
    header = (
        f"{'':8s}"
        + "".join(f"{short[c]:>7s}" for c in cols)
        + f"{'labels':>9s}  train images/label"
    )
    lines.append(header)
    lines.append("-" * len(header))
    lines.append(
        f"{'all':8s}"
        + "".join(f"{format_percent(metrics[c]):>7s}" for c in cols)
        + f"{metrics['num_labels']:>9,d}"
    )
    for name in BUCKETS:
        e = metrics["buckets"][name]
        span = f"{e['min_count']:,}-{e['max_count']:,}" if e["num_labels"] else ""
        lines.append(
            f"{name:8s}"
            + "".join(f"{format_percent(e[c]):>7s}" for c in cols)
            + f"{e['num_labels']:>9,d}  {span}"
        )
    lines.append(
        f"(percent; buckets by {metrics.get('bucket_counts_source', 'training images')}: labels sorted by "
        "frequency, cut into thirds; bucket P/R pooled over images)"
    )
    return "\n".join(lines)


def label_counts_of(
    dataset_dir: str | Path, num_labels: int, split: str = "train"
) -> np.ndarray | None:
    """Training images per label from the dataset's label store (O(labels): its small counts file), if
    the dataset has one; an old-format dataset is upgraded once (tagjax.records.open_label_store)."""

    store = records.LabelStore(Path(dataset_dir), split)
    if not store.exists() and not store.legacy_path.is_file():
        return None
    return records.open_label_store(Path(dataset_dir), split, num_labels).counts(num_labels)
