"""Hashtag-prediction metrics, and ``tagjax evaluate`` (a checkpoint on held-out shards, or a classifier
checkpoint on a downstream dataset).

The metrics are functions of accumulated arrays, so the trainer's periodic evaluation, this command and a
notebook compute the same numbers::

    acc = evaluate.MetricsAccumulator(num_labels)
    for batch in eval_batches:
        acc.update(scores, batch["labels"], batch["mask"])       # scores: [B, L] probabilities
    metrics = acc.result(label_counts=train_label_counts)         # dict; see hashtag_metrics

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

**Classification** (``tagjax evaluate --dataset imagenet2012`` or any other downstream dataset of
tagjax.downstream): a checkpoint whose head is a classifier (an ImageNet-1k import from ``tagjax
import-weights``, or a ``tagjax transfer --mode finetune`` checkpoint) is scored by top-1 / top-5 over its
*own* outputs, at its own evaluation preprocessing (shorter side to ``data.eval_resize``, center crop
``data.eval_image_size``, ``data.mean`` / ``data.std``). Dataset labels are mapped onto the checkpoint's
outputs by name (:func:`map_classes`): by wnid when the checkpoint lists ``class_wnids`` (the ImageNet-1k
imports), else by ``class_names``; a dataset class the head does not predict is refused, and outputs the
dataset lacks stay in the ranking (predicting one is an error, as it would be in use).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tagjax.errors import UserError

BUCKETS = ("head", "torso", "tail")
DEFAULT_KS = (1, 5)
DEFAULT_BUCKET_FRACTIONS = (1 / 3, 1 / 3)  # head, torso; the tail is the rest


# ----------------------------------------------------------------------------------------------------
# Scores.
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Average precision (label-chunked, on the default JAX device).
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Top-k precision / recall.
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Buckets and the full metric set.
# ----------------------------------------------------------------------------------------------------


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
    num_true = (ids >= 0).sum(axis=1)
    keep = num_true > 0
    scores, ids, num_true = scores[keep], ids[keep], num_true[keep]

    ap = average_precision(scores, ids, num_labels, label_chunk=label_chunk)
    has_pos = ~np.isnan(ap)
    kmax = min(max(ks), num_labels)
    top, hits = topk_predictions(scores, ids, kmax)

    out: dict[str, Any] = {
        "num_images": int(keep.sum()),
        "images_without_labels": int(n - keep.sum()),
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


# ----------------------------------------------------------------------------------------------------
# Reporting.
# ----------------------------------------------------------------------------------------------------


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


def _pct(x) -> str:
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
        + "".join(f"{_pct(metrics[c]):>7s}" for c in cols)
        + f"{metrics['num_labels']:>9,d}"
    )
    for name in BUCKETS:
        e = metrics["buckets"][name]
        span = f"{e['min_count']:,}-{e['max_count']:,}" if e["num_labels"] else ""
        lines.append(
            f"{name:8s}"
            + "".join(f"{_pct(e[c]):>7s}" for c in cols)
            + f"{e['num_labels']:>9,d}  {span}"
        )
    lines.append(
        f"(percent; buckets by {metrics.get('bucket_counts_source', 'training images')}: labels sorted by "
        "frequency, cut into thirds; bucket P/R pooled over images)"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# tagjax evaluate
# ----------------------------------------------------------------------------------------------------


def label_counts_of(
    dataset_dir: str | Path, num_labels: int, split: str = "train"
) -> np.ndarray | None:
    """Training images per label from the dataset's label index (``<split>.labels.npz``), if present."""
    from tagjax import records

    path = Path(dataset_dir) / f"{split}.labels.npz"
    if not path.is_file():
        return None
    return records.LabelIndex.load(path).counts(num_labels)


def _default_output(step_dir: Path, dataset: str, split: str, step: int) -> Path:
    workdir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    name = "synthetic" if dataset == "synthetic" else Path(dataset).name
    return workdir / "eval" / f"{name}-{split}-step{step}.json"


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    dataset: str,
    split: str = "heldout",
    *,
    max_images: int = 0,
    batch_size: int = 256,
    image_size: int | None = None,
    resize: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    bucket_fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS,
    progress: bool = True,
) -> dict[str, Any]:
    """Hashtag metrics of a checkpoint on one split of a built dataset (``"synthetic"``: the synthetic task
    of the checkpoint's config). Returns the :func:`hashtag_metrics` dict plus where it came from."""
    from tqdm import tqdm

    from tagjax import input_pipeline
    from tagjax.predict import Inference

    inference = Inference(checkpoint_path, head=True, image_size=image_size, resize=resize)
    config = inference.config
    synthetic = dataset == "synthetic"
    with config.unlocked():
        config.data.synthetic = synthetic
        if not synthetic:
            config.data.dataset = str(Path(dataset).expanduser())
        config.data.eval_image_size = inference.transform.size
        config.data.eval_resize = inference.transform.resize
    dataset_dir = None if synthetic else config.data.dataset
    if not synthetic:
        vocab = input_pipeline.load_vocabulary(config, dataset_dir)
        expected = inference.meta.get("vocab_fingerprint")
        if expected and vocab.fingerprint() != expected:
            raise UserError(
                f"{dataset} uses vocabulary {vocab.fingerprint()} but the checkpoint was trained on {expected}: "
                "evaluate on a dataset built with the checkpoint's vocabulary."
            )
    if inference.num_classes != input_pipeline.num_labels(config, dataset_dir):
        raise UserError(
            f"the checkpoint predicts {inference.num_classes} labels but {dataset} has "
            f"{input_pipeline.num_labels(config, dataset_dir)}; evaluate on the dataset it was trained on."
        )
    it = input_pipeline.make_eval_iterator(
        config,
        dataset_dir,
        split,
        batch_size=batch_size,
        max_images=max_images,
        process_index=0,
        process_count=1,
    )
    acc = MetricsAccumulator(inference.num_classes)
    loss = str(config.get("loss", "softmax"))
    start = time.perf_counter()
    bar = tqdm(total=it.num_images, unit="img", desc=f"evaluate {split}", disable=not progress)
    for batch in it:
        logits = inference.logits(batch["image"])
        acc.update(scores_from_logits(logits, loss), batch["labels"], batch["mask"])
        bar.update(int(np.asarray(batch["mask"]).sum()))
    bar.close()
    if synthetic:
        counts = input_pipeline.synthetic_task(config, "train").label_index.counts(
            inference.num_classes
        )
    else:
        counts = label_counts_of(dataset_dir, inference.num_classes, config.data.train_split)
    metrics = acc.result(label_counts=counts, ks=ks, bucket_fractions=bucket_fractions)
    metrics.update(
        {
            "checkpoint": inference.path,
            "step": inference.meta.get("step"),
            "images_seen": inference.meta.get("images_seen"),
            "dataset": str(dataset),
            "split": split,
            "bad_records": int(it.bad_records),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return metrics


# ----------------------------------------------------------------------------------------------------
# tagjax evaluate on a downstream dataset: classifier checkpoints, top-k accuracy.
# ----------------------------------------------------------------------------------------------------

# --split names of a downstream dataset -> tagjax.downstream's split. "test" is the dataset's labelled
# evaluation split (ImageNet's and Places365's "validation", a folder's test/, val/ or validation/).
CLASSIFICATION_SPLITS = {"train": "train", "test": "test", "validation": "test", "val": "test"}
DEFAULT_MAX_BAD_FRACTION = (
    0.001  # unreadable images tolerated before the pass fails (as tagjax embed)
)


def is_hashtag_dataset(dataset: str) -> bool:
    """``synthetic`` or a directory built by ``tagjax build`` (it has dataset.json); anything else is a
    downstream dataset name or a class-per-folder directory (tagjax.downstream)."""
    from tagjax import records

    return dataset == "synthetic" or (Path(dataset).expanduser() / records.MANIFEST).is_file()


@dataclasses.dataclass(frozen=True)
class ClassMapping:
    """Which checkpoint output each dataset label is: ``to_checkpoint[label]``."""

    to_checkpoint: np.ndarray  # int32 [dataset classes]
    num_outputs: int  # classes of the checkpoint's head
    by: str  # "wnid" (metadata class_wnids) or "name" (class_names)

    @property
    def identity(self) -> bool:
        """Same classes in the same order: dataset labels are output ids as they are."""
        n = len(self.to_checkpoint)
        return n == self.num_outputs and bool((self.to_checkpoint == np.arange(n)).all())

    @property
    def outputs_outside_dataset(self) -> int:
        """Outputs no dataset class maps to (they still compete in the top-k)."""
        return self.num_outputs - len(np.unique(self.to_checkpoint))


def map_classes(
    meta: Mapping[str, Any],
    num_outputs: int,
    dataset_classes: Sequence[str],
    dataset: str = "the dataset",
) -> ClassMapping:
    """Places each of a dataset's classes (by name) on a classifier checkpoint's outputs, from its metadata.

    Tried in order: ``class_wnids`` (ImageNet-1k imports; TFDS's imagenet2012 names its classes by wnid,
    labels.txt order, and so do ImageNet class folders), then ``class_names`` (a fine-tuned checkpoint stores
    its training dataset's class names; an import with ``--classes`` its file's). The first list that names
    every dataset class wins; matching is by name, never by position, so a dataset listing the same classes
    in another order is remapped rather than silently misread. Raises UserError naming the classes no list
    places (or a name the checkpoint lists twice, which would be ambiguous).
    """
    lists = [
        (by, meta[key])
        for by, key in (("wnid", "class_wnids"), ("name", "class_names"))
        if meta.get(key)
    ]
    if not lists:
        what = (
            "a hashtag model (its head predicts a hashtag vocabulary)"
            if meta.get("vocab_fingerprint")
            else f"a {num_outputs}-way head without class names in its metadata"
        )
        raise UserError(
            f"the checkpoint is {what}, so its outputs cannot be matched to the classes of {dataset}: evaluate a "
            "classifier (an ImageNet-1k checkpoint from `tagjax import-weights`, or one from `tagjax transfer "
            "--mode finetune`), or a hashtag model on a dataset built by `tagjax build`."
        )
    best = None
    for by, names in lists:
        names = [str(n) for n in names]
        if len(names) != num_outputs:
            raise UserError(
                f"the checkpoint's metadata lists {len(names)} classes (by {by}) for its {num_outputs}-way head, "
                "so it is damaged: import or fine-tune it again."
            )
        position: dict[str, int] = {}
        repeated = set()
        for i, name in enumerate(names):
            if name in position:
                repeated.add(name)
            position.setdefault(name, i)
        missing = [c for c in dataset_classes if c not in position or c in repeated]
        if not missing:
            return ClassMapping(
                np.asarray([position[c] for c in dataset_classes], np.int32), int(num_outputs), by
            )
        if best is None or len(missing) < len(best[1]):
            best = (by, missing, repeated)
    by, missing, repeated = best
    twice = " or named twice" if any(c in repeated for c in missing) else ""
    raise UserError(
        f"{len(missing):,} of the {len(dataset_classes):,} classes of {dataset} are not among the checkpoint's "
        f"{num_outputs:,} outputs{twice} (matched by {by}), e.g. {', '.join(repr(c) for c in missing[:3])}: "
        "evaluate a checkpoint whose head predicts this dataset's classes."
    )


def evaluate_classification(
    checkpoint_path: str | Path,
    dataset: str,
    split: str = "test",
    *,
    data_dir: str | None = None,
    max_images: int = 0,
    batch_size: int = 256,
    image_size: int | None = None,
    resize: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    num_threads: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-k accuracy of a classifier checkpoint on one split of a downstream dataset (module docstring).

    ``dataset``: a tagjax.downstream name (imagenet2012, emoji_subgroups, ...) or a class-per-folder
    directory; ``split``: "test" (or "validation" / "val": the dataset's labelled evaluation split) or
    "train". Preprocessing is the checkpoint's (``image_size`` / ``resize`` override it, as in
    ``tagjax predict``). Unreadable images are skipped and counted; past ``max_bad_fraction`` it fails.
    Returns fractions ``top1``, ``top5``, ... plus where they came from and how classes were matched.
    """
    from tqdm import tqdm

    from tagjax import augment, downstream
    from tagjax.predict import DEFAULT_THREADS, BadImageCounter, Inference, image_batches

    if split not in CLASSIFICATION_SPLITS:
        raise UserError(
            f"split {split!r}: a downstream dataset has 'train' and 'test' (also called 'validation')."
        )
    ds = downstream.open_split(dataset, CLASSIFICATION_SPLITS[split], data_dir)
    inference = Inference(checkpoint_path, head=True, image_size=image_size, resize=resize)
    if "fc" not in inference.variables["params"]:
        raise UserError(
            f"{inference.path} has no classifier head (imported with --no-head?); evaluate a checkpoint "
            "with one, or measure its features with `tagjax transfer --mode linear`."
        )
    mapping = map_classes(inference.meta, inference.num_classes, ds.class_names, ds.name)
    num = len(ds.source) if max_images <= 0 else min(max_images, len(ds.source))
    tf = inference.transform
    kmax = min(max(ks), inference.num_classes)

    def load(i: int):
        ex = ds.source[i]
        return ex["image"], int(ex["label"])

    counter = BadImageCounter(max_bad_fraction, f"{ds.name} ({split})")
    hits, labels = [], []
    start = time.perf_counter()
    bar = tqdm(total=num, unit="img", desc=f"evaluate {ds.name} {split}", disable=not progress)
    for batch in image_batches(
        load,
        range(num),
        preprocess=lambda image, out: augment.eval_image(image, out, tf),
        size=tf.size,
        batch_size=batch_size,
        num_threads=num_threads or DEFAULT_THREADS,
    ):
        # Every row goes through top-k (one compiled shape per batch size); unreadable rows are dropped after.
        y = np.asarray([e if ok else 0 for e, ok in zip(batch.extras, batch.valid)], np.int64)
        target = np.where(batch.valid, mapping.to_checkpoint[y], -1).astype(np.int32)
        _, h = topk_predictions(inference.logits(batch.images), target[:, None], kmax)
        hits.append(h[batch.valid])
        labels.append(y[batch.valid])
        counter.add(batch)
        bar.update(len(batch.indices))
    bar.close()
    counter.check(final=True)
    hits = np.concatenate(hits) if hits else np.zeros((0, kmax), bool)
    metrics: dict[str, Any] = {
        f"top{k}": float(hits[:, : min(k, kmax)].any(axis=1).mean()) if len(hits) else float("nan")
        for k in ks
    }
    metrics.update(
        {
            "task": "classification",
            "num_images": len(hits),
            "bad_images": int(counter.bad),
            "num_classes": int(ds.num_classes),
            "checkpoint_outputs": int(mapping.num_outputs),
            "class_mapping": {
                "by": mapping.by,
                "same_order": mapping.identity,
                "outputs_outside_dataset": mapping.outputs_outside_dataset,
            },
            "checkpoint": inference.path,
            "step": inference.meta.get("step"),
            "images_seen": inference.meta.get("images_seen"),
            "dataset": ds.name,
            "split": split,
            "image_size": int(tf.size),
            "resize": int(tf.resize),
            "mean": [float(x) for x in inference.mean],
            "std": [float(x) for x in inference.std],
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return metrics


def format_classification_table(
    metrics: Mapping[str, Any], ks: Sequence[int] = DEFAULT_KS, title: str = ""
) -> str:
    """A readable table of :func:`evaluate_classification` output (percentages)."""
    m = metrics["class_mapping"]
    mapping = f"matched by {m['by']}, {'same order' if m['same_order'] else 'remapped'}"
    if m["outputs_outside_dataset"]:
        mapping += (
            f", {m['outputs_outside_dataset']:,} of the checkpoint's outputs not in the dataset"
        )
    lines = [title] if title else []
    lines.append(
        f"{metrics['num_images']:,} images, {metrics['num_classes']:,} classes ({mapping}); "
        f"resize {metrics['resize']}, center crop {metrics['image_size']}"
    )
    header = f"{'':10s}" + "".join(f"{f'top-{k}':>7s}" for k in ks)
    lines += [
        header,
        "-" * len(header),
        f"{'accuracy':10s}" + "".join(f"{_pct(metrics[f'top{k}']):>7s}" for k in ks),
    ]
    lines.append(
        f"(percent of images whose class is among the checkpoint's k highest outputs; "
        f"{metrics['bad_images']:,} unreadable images skipped)"
    )
    return "\n".join(lines)


def _classification_output(step_dir: Path, dataset: str, split: str, step: int) -> Path:
    """WORKDIR/eval/<dataset>-<split>-step<N>.json for a workdir's checkpoint; beside a standalone
    (imported) checkpoint directory, eval/<checkpoint>-<dataset>-<split>.json, so two imports never collide."""
    path = Path(dataset).expanduser()
    name = path.name if path.is_dir() else dataset
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    if step_dir.parent.name == "checkpoints":
        return step_dir.parent.parent / "eval" / f"{name}-{split}-step{step}.json"
    return step_dir.parent / "eval" / f"{step_dir.name}-{name}-{split}.json"


def run_classification(args) -> int:
    """``tagjax evaluate`` on a downstream dataset: writes the JSON and the table, prints the table."""
    metrics = evaluate_classification(
        args.checkpoint,
        args.dataset,
        args.split or "test",
        data_dir=args.data_dir,
        max_images=args.max_images,
        batch_size=args.batch_size,
        image_size=args.image_size,
        resize=args.resize,
    )
    step = int(metrics.get("step") or 0)
    out = (
        Path(args.output)
        if args.output
        else _classification_output(
            Path(metrics["checkpoint"]), args.dataset, metrics["split"], step
        )
    )
    table = format_classification_table(
        metrics,
        title=f"{metrics['checkpoint']} on {metrics['dataset']} ({metrics['split']}), step {step:,}",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(metrics), indent=1) + "\n")
    out.with_suffix(".txt").write_text(table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a training workdir (newest checkpoint), its "
        "checkpoints/ folder, or one checkpoint directory",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="a dataset built by `tagjax build` (its vocabulary must "
        "be the checkpoint's), 'synthetic' for the checkpoint config's synthetic task, or, for a "
        "classifier checkpoint (ImageNet import, fine-tuned), a downstream dataset (imagenet2012, "
        "emoji_subgroups, any prepared TFDS name) or class-per-folder directory: top-1/top-5",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split to evaluate (default heldout for built datasets; "
        "test for downstream ones, where validation and val name the same split)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data directory of a downstream dataset "
        "(default $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--max-images", type=int, default=0, help="evaluate the first N images (0 = all)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="center-crop side (default: the checkpoint's data.eval_image_size)",
    )
    parser.add_argument(
        "--resize",
        type=int,
        default=None,
        help="shorter side before the crop (default: the "
        "checkpoint's data.eval_resize, scaled with --image-size)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON file to write (default: WORKDIR/eval/"
        "<dataset>-<split>-step<N>.json, or eval/<checkpoint>-<dataset>-<split>.json beside a "
        "standalone checkpoint directory); the table is written beside it as .txt",
    )


def run(args) -> int:
    if args.batch_size < 1 or args.max_images < 0:
        raise UserError("--batch-size must be at least 1 and --max-images at least 0.")
    if not is_hashtag_dataset(args.dataset):
        return run_classification(args)
    split = args.split or "heldout"
    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        split,
        max_images=args.max_images,
        batch_size=args.batch_size,
        image_size=args.image_size,
        resize=args.resize,
    )
    step = int(metrics.get("step") or 0)
    out = (
        Path(args.output)
        if args.output
        else _default_output(Path(metrics["checkpoint"]), args.dataset, split, step)
    )
    table = format_table(
        metrics, title=f"{metrics['checkpoint']} on {args.dataset} ({split}), step {step:,}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(metrics), indent=1) + "\n")
    out.with_suffix(".txt").write_text(table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0
