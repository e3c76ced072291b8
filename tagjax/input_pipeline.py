"""grain input pipelines: hashtag-resampled training batches, padded evaluation batches, a synthetic task.

Training (``make_train_iterator``)::

    position p of the global stream ──▶ sampler (tagjax.sampling: hashtag resampling or shuffled epochs)
      ──▶ record id ──▶ ArrayRecord shards ──▶ decode + random-resized-crop + flip (tagjax.augment)
      ──▶ labels: ancestor dropping, label noise, padded ids ──▶ host batch ──▶ grain worker processes

Every batch is a pure function of its index: host ``h`` of ``H`` builds its rows of global batch ``k`` from
positions ``start + k*G + h*b + [0, b)`` (``G`` = config.train.batch_size, ``b = G / H``). grain turns
``MapDataset.range(...).map(batch)`` into an iterator, prefetching in a thread (0 workers) or in
``config.data.num_workers`` processes, each computing whole batches. Consequences users rely on:

* Resuming (``get_state`` / ``set_state``; the trainer stores the state in its checkpoint) yields exactly
  the batches an uninterrupted run would have, with 0 or any number of workers.
* The worker count never changes the batches, so it may change between runs. The host count may also
  change if the global batch size does not: global batch ``k`` is the same set of positions whatever the
  number of hosts, so the state is remapped exactly (documented remap, logged). A state from another
  dataset, split, sampling mode or seed is refused with a ``UserError``.
* Hosts read disjoint positions of one global stream: their resampled streams differ and are
  deterministic; in ``images`` mode and for evaluation the hosts together read every image exactly once
  per epoch / pass.

Batches (numpy, per host)::

    {"image": uint8 [b, S, S, 3], "labels": int32 [b, max_labels] (ids, padded with -1),
     "num_labels": int32 [b]}                         + "mask": bool [b] for evaluation

Labels are the image's canonical label ids, deduplicated; an image with more than ``max_labels`` keeps the
drawn hashtag and a deterministic random subset of the others. ``tagjax.sharding.global_batch`` turns a host
batch into one global ``jax.Array`` per field on the training mesh.

Bad records (undecodable image, unreadable record, no labels, label ids outside the vocabulary) are
skipped: in training the position is redrawn (deterministically), in evaluation the slot is masked out.
They are counted (``bad_records`` / ``records_read``); past ``config.data.max_bad_record_fraction``
(checked once ``config.data.bad_record_min_reads`` records were read) the iterator raises a ``UserError``.

Memory per image: see tagjax.sampling (hashtag modes ~12 bytes per image at 3 hashtags, memory-mapped and
shared by all workers of a host; ``images`` mode none), plus, in every reading process, 8 bytes per record
of each record shard it keeps open: all it has read from, or at most ``config.data.max_open_shards``
(tagjax.records.BoundedShardReader; docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import cv2
import grain
import numpy as np
from absl import logging
from grain.multiprocessing import SharedMemoryArray

from tagjax import augment, records, sampling
from tagjax import vocab as vocab_lib
from tagjax.bad_records import BadRecordCounter
from tagjax.errors import UserError

STATE_FORMAT = "tagjax.input_pipeline/1"
# The training stream is endless; grain needs a length: more batches than any run reads.
_ENDLESS_BATCHES = 1 << 48


class BadRecord(ValueError):
    """A record the pipeline skips and counts."""


# ------------------------------------------------------------------------------------------------
# Sources: record id -> (image, label ids). Pickled into worker processes, so they open files lazily.
# ------------------------------------------------------------------------------------------------


def split_shards(dataset_dir: Path, split: str) -> tuple[records.Manifest, list[str]]:
    """The manifest of a built dataset and the shard paths of ``split``, after the checks that need no
    shard opened (the split exists, every listed shard is there): cheap enough for a run's start."""
    manifest = records.load_manifest(dataset_dir)
    try:
        paths = [str(p) for p in manifest.shard_paths(dataset_dir, split)]
    except KeyError:
        raise UserError(
            f"{dataset_dir} has no split {split!r} (it has {', '.join(sorted(manifest.splits))}); "
            "set config.data.train_split / eval_split."
        ) from None
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(
            f"shard {missing[0]} listed in {records.MANIFEST} is missing; rebuild the dataset."
        )
    return manifest, paths


class RecordSource:
    """The records of one split of a built dataset (tagjax.records), read through grain's ArrayRecord
    source, which keeps a reader open for every shard it has read from; or, with ``max_open_shards``
    > 0 (config.data.max_open_shards), through records.BoundedShardReader, which keeps at most that
    many open (docs/scaling.md, "The record reader's chunk index")."""

    def __init__(self, dataset_dir: Path, split: str, num_labels: int, max_open_shards: int = 0):
        dataset_dir = Path(dataset_dir)
        manifest, self.paths = split_shards(dataset_dir, split)
        self.dataset_dir = dataset_dir
        self.split = split
        self.num_records = manifest.num_records(split)
        self.num_labels = int(num_labels)
        self.max_open_shards = int(max_open_shards)
        self._identity = {
            "kind": "records",
            "split": split,
            "shards": [Path(p).name for p in self.paths],
            "num_records": self.num_records,
            "vocab_fingerprint": manifest.vocab_fingerprint,
        }
        self._source = None
        try:
            held = len(self._grain_source())
        # A truncated or overwritten shard; ArrayRecord's message can be empty.
        except RuntimeError as e:
            bad = records.first_unreadable(self.paths)
            where = f"shard {bad}" if bad else f"a {split} shard of {dataset_dir}"
            raise UserError(
                f"{where} is damaged ({str(e) or 'unreadable'}); rebuild the dataset or copy that "
                "shard again."
            ) from None
        if held != self.num_records:
            raise UserError(
                f"the {split} shards of {dataset_dir} hold {held} records but "
                f"{records.MANIFEST} says {self.num_records}; the dataset is damaged: rebuild it."
            )

    def _grain_source(self):
        if self._source is None:
            if not self.paths:  # an empty split (a small build's held-out split can be)
                self._source = []
            elif self.max_open_shards > 0:
                self._source = records.BoundedShardReader(self.paths, self.max_open_shards)
            else:
                self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self):
        # A bounded reader travels with its record counts (and no open reader), so a grain worker does
        # not open every shard again to count it (350,000 opens per worker at 3.5B images); grain's own
        # source is rebuilt in the worker.
        if isinstance(self._source, records.BoundedShardReader):
            return dict(self.__dict__)
        return {**self.__dict__, "_source": None}

    def identity(self) -> dict:
        return dict(self._identity)

    def load(self, ids: Sequence[int]) -> list:
        """(image JPEG bytes, label ids) per id, or the BadRecord / RecordError explaining why not."""
        raw = self._grain_source().__getitems__([int(i) for i in ids])
        out = []
        for data in raw:
            try:
                rec = records.decode(data)
                out.append((rec.image, _check_labels(rec.labels, self.num_labels)))
            except (records.RecordError, BadRecord) as e:
                out.append(e)
        return out


def _check_labels(labels, num_labels: int) -> np.ndarray:
    lab = sorted({int(x) for x in labels})  # a handful of ids: Python beats np.unique here
    if not lab:
        raise BadRecord("record has no labels")
    if lab[0] < 0 or lab[-1] >= num_labels:
        raise BadRecord(f"label id outside the vocabulary of {num_labels} labels")
    return np.asarray(lab, np.int64)


# The synthetic task: each label is a (shape, color) pair drawn into the image, so a model can learn it.
_SHAPES = ("disk", "square", "triangle", "ring", "plus", "diamond", "hstripes", "vstripes")
_COLORS = (
    (230, 40, 40),
    (40, 200, 60),
    (50, 90, 240),
    (240, 220, 40),
    (40, 220, 230),
    (220, 50, 220),
    (250, 140, 20),
    (250, 250, 250),
    (10, 10, 10),
    (130, 50, 200),
)
SYNTHETIC_MAX_LABELS = len(_SHAPES) * len(_COLORS)
_SYNTHETIC_SPLITS = {"train": 0, "heldout": 1}
_SYNTHETIC_CHUNK = 1 << 16  # images whose labels are drawn at once


def synthetic_label_name(label: int) -> str:
    """Human-readable name of a synthetic label, e.g. ``red_disk`` (for logs and demos)."""
    shape, color = _synthetic_shape_color(label)
    names = (
        "red",
        "green",
        "blue",
        "yellow",
        "cyan",
        "magenta",
        "orange",
        "white",
        "black",
        "purple",
    )
    return f"{names[color]}_{_SHAPES[shape]}"


def _synthetic_shape_color(label: int) -> tuple[int, int]:
    # (l mod 8, (9 * (l div 8) + l mod 8) mod 10) is injective for l < 80 because gcd(9, 10) = 1.
    q, r = divmod(int(label), len(_SHAPES))
    return r, (q * (len(_SHAPES) + 1) + r) % len(_COLORS)


class SyntheticTask:
    """An in-memory, learnable tagged task with the batch format of a built dataset.

    Image ``i`` of a split carries 1 to ``max_labels_per_image`` labels drawn from a Zipfian marginal
    (p(l) ~ 1/(l+1), so hashtag resampling matters as it does on real data); each label is a colored
    shape drawn in its own quadrant of a textured background. Images are rendered on demand from
    ``(seed, split, i)``: deterministic, random access, no memory per image beyond its label ids.
    """

    def __init__(
        self,
        num_images: int,
        num_labels: int,
        canvas: int,
        seed: int,
        split: str,
        max_labels_per_image: int = 3,
    ):
        if not 1 <= num_labels <= SYNTHETIC_MAX_LABELS:
            raise UserError(
                f"config.data.synthetic_num_labels={num_labels}: the synthetic task has 1 to "
                f"{SYNTHETIC_MAX_LABELS} labels ({len(_SHAPES)} shapes x {len(_COLORS)} colors)."
            )
        if num_images <= 0:
            raise UserError("config.data.synthetic_num_images must be positive.")
        self.num_records = int(num_images)
        self.num_labels = int(num_labels)
        self.canvas = int(canvas)
        self.seed = int(seed)
        self.split = split
        self._split_id = _SYNTHETIC_SPLITS.get(split, len(_SYNTHETIC_SPLITS))
        k = min(int(max_labels_per_image), self.num_labels, 4)  # one quadrant per label
        rng = np.random.Generator(
            np.random.Philox(
                key=int(sampling.hash_u64(seed, sampling.STREAM_SYNTHETIC, self._split_id))
            )
        )
        logp = -np.log1p(np.arange(self.num_labels, dtype=np.float64))
        counts, flat = [], []
        for start in range(0, self.num_records, _SYNTHETIC_CHUNK):  # bounded memory for large tasks
            n = min(_SYNTHETIC_CHUNK, self.num_records - start)
            keys = logp + rng.gumbel(size=(n, self.num_labels))  # Gumbel top-k: no replacement
            top = np.argsort(-keys, axis=1)[:, :k]
            count = rng.integers(1, k + 1, size=n)
            chosen = np.sort(np.where(np.arange(k) < count[:, None], top, self.num_labels), axis=1)
            counts.append(count)
            flat.append(chosen[chosen < self.num_labels])
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        self.label_index = records.LabelIndex(offsets, np.concatenate(flat).astype(np.int32))

    def identity(self) -> dict:
        return {
            "kind": "synthetic",
            "split": self.split,
            "num_records": self.num_records,
            "num_labels": self.num_labels,
            "seed": self.seed,
        }

    def render(self, i: int) -> np.ndarray:
        """Image ``i``: uint8 [canvas, canvas, 3]."""
        s = self.canvas
        key = int(sampling.hash_u64(self.seed, sampling.STREAM_SYNTHETIC, self._split_id, int(i)))
        rng = np.random.Generator(np.random.Philox(key=key))
        # Background: a smooth gray texture with a slight tint, so color belongs to the shapes. Built at
        # 8x8 and upsampled: rendering stays cheap at any canvas size.
        gray = rng.integers(50, 140, size=(8, 8, 1)).astype(np.int16)
        low = np.clip(gray + rng.integers(-12, 13, size=3), 0, 255).astype(np.uint8)
        img = cv2.resize(low, (s, s), interpolation=cv2.INTER_LINEAR)
        cells = rng.permutation(4)
        half = s / 2
        for n, label in enumerate(self.label_index.labels_of(i)):
            shape, color = _synthetic_shape_color(label)
            cy = (cells[n] // 2 + 0.5) * half + rng.uniform(-0.1, 0.1) * half
            cx = (cells[n] % 2 + 0.5) * half + rng.uniform(-0.1, 0.1) * half
            _draw_shape(img, shape, _COLORS[color], cx, cy, half * rng.uniform(0.28, 0.42))
        return img

    def load(self, ids: Sequence[int]) -> list:
        return [(self.render(int(i)), self.label_index.labels_of(int(i))) for i in ids]


def _draw_shape(img: np.ndarray, shape: int, color, cx: float, cy: float, r: float) -> None:
    c, x, y, ri = tuple(int(v) for v in color), round(cx), round(cy), max(1, round(r))
    name = _SHAPES[shape]
    if name == "disk":
        cv2.circle(img, (x, y), ri, c, -1)
    elif name == "square":
        cv2.rectangle(img, (x - ri, y - ri), (x + ri, y + ri), c, -1)
    elif name == "triangle":
        pts = np.array([[x, y - ri], [x - ri, y + ri], [x + ri, y + ri]], np.int32)
        cv2.fillPoly(img, [pts], c)
    elif name == "ring":
        cv2.circle(img, (x, y), ri, c, max(1, ri // 3))
    elif name == "plus":
        t = max(1, ri // 3)
        cv2.rectangle(img, (x - ri, y - t), (x + ri, y + t), c, -1)
        cv2.rectangle(img, (x - t, y - ri), (x + t, y + ri), c, -1)
    elif name == "diamond":
        pts = np.array([[x, y - ri], [x + ri, y], [x, y + ri], [x - ri, y]], np.int32)
        cv2.fillPoly(img, [pts], c)
    else:  # three stripes inside the square
        t = max(1, round(2 * ri / 5))
        for k in range(3):
            o = -ri + 2 * k * t
            if name == "hstripes":
                cv2.rectangle(img, (x - ri, y + o), (x + ri, y + o + t - 1), c, -1)
            else:
                cv2.rectangle(img, (x + o, y - ri), (x + o + t - 1, y + ri), c, -1)


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------


class AncestorDropper:
    """Drops a label when a WordNet descendant of it is on the same image (#dog beside #goldenretriever).

    Holds each label's ancestor ids (from tagjax.vocab) in CSR form, a few bytes per label, so worker
    processes get a small table instead of the whole vocabulary.
    """

    def __init__(self, ancestors: Sequence[Sequence[int]]):
        index = records.LabelIndex.from_lists(ancestors)
        self.offsets, self.ids = index.offsets, index.labels

    @classmethod
    def from_vocab(cls, vocab) -> AncestorDropper:
        return cls([vocab.ancestors_of(i) for i in range(vocab.num_labels)])

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        if len(labels) < 2:
            return labels
        anc = np.concatenate([self.ids[self.offsets[j] : self.offsets[j + 1]] for j in labels])
        return labels[~np.isin(labels, anc)]


def corrupt_labels(
    labels: np.ndarray, record: int, seed: int, rate: float, noise_cdf: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's label noise: each label of training record ``record`` is replaced with probability
    ``rate`` by one drawn from the label marginal (``noise_cdf``), never by itself.

    A pure function of ``(seed, record, labels)``: the corrupted dataset is fixed, whichever position,
    epoch or host reads the record (the paper corrupts the dataset once; it does not re-draw per view).
    The replacement is drawn from the marginal with the replaced label's own weight taken out, so it is
    always a different tag. Returns the labels (same order, before deduplication) and the replaced mask.
    """
    labels = np.asarray(labels)
    u = sampling.uniforms(seed, sampling.STREAM_NOISE, np.int64(record), 2 * len(labels))
    flip = u[0::2] < rate
    if not flip.any():
        return labels, flip
    out = labels.astype(np.int64)
    cdf = np.asarray(noise_cdf, np.int64)
    old = out[flip]
    lo = np.where(old > 0, cdf[np.maximum(old - 1, 0)], 0)  # the replaced label's interval [lo, hi)
    own = cdf[old] - lo
    total = int(cdf[-1])
    if np.any(own >= total):
        raise UserError(
            "label noise needs at least two labels with training images; the split has one."
        )
    span = total - own  # the marginal without the replaced label
    r = np.minimum((u[1::2][flip] * span).astype(np.int64), span - 1)
    r = np.where(r >= lo, r + own, r)  # skip over the replaced label's interval
    out[flip] = np.searchsorted(cdf, r, side="right")
    return out.astype(labels.dtype), flip


@dataclasses.dataclass
class LabelOptions:
    max_labels: int
    seed: int
    label_noise: float = 0.0
    noise_cdf: np.ndarray | None = None  # int64 cumulative weights of the label marginal
    drop_ancestors: AncestorDropper | None = None

    def targets(
        self, labels: np.ndarray, drawn: int, position: int, train: bool, record: int = -1
    ) -> np.ndarray:
        """Final label ids of one image: ancestors dropped, noise injected, at most ``max_labels``.

        ``record`` (the training record's id in its split) keys the label noise; ``position`` (the stream
        position) keys the choice of labels kept when there are more than ``max_labels``.
        """
        if self.drop_ancestors is not None:
            labels = self.drop_ancestors(labels)
        if train and self.label_noise > 0:
            if record < 0:
                raise ValueError("label noise needs the record id")
            labels, flip = corrupt_labels(
                labels, record, self.seed, self.label_noise, self.noise_cdf
            )
            if flip.any():
                labels = np.unique(labels)
        if len(labels) > self.max_labels:
            if train:  # the drawn hashtag first, then a random subset of the others
                u = sampling.uniforms(self.seed, sampling.STREAM_SUBSET, position, len(labels))
                u[labels == drawn] = -1.0
                labels = np.sort(labels[np.argsort(u, kind="stable")[: self.max_labels]])
            else:
                labels = labels[: self.max_labels]
        return labels


# ------------------------------------------------------------------------------------------------
# Less data, and the shuffled-hashtag control (tagjax.study's arms)
# ------------------------------------------------------------------------------------------------

# The label shuffle's permutation is ImageSampler's keyed permutation at an epoch no run reaches, so it is
# independent of the epoch shuffles of ``images`` sampling with the same seed.
_SHUFFLE_EPOCH = 1 << 62


def train_subset(num_records: int, fraction: float) -> np.ndarray | None:
    """Record ids that ``config.data.train_fraction`` keeps (None = all of them).

    Record ``i`` is kept when a hash of ``i`` alone falls below ``fraction``: the subset is the same for
    every seed and run, and the subsets are nested (1/8 of the data lies inside 1/4). The vocabulary, the
    held-out split and everything downstream stay those of the whole dataset. Costs 8 bytes per kept record.
    """
    if fraction >= 1.0:
        return None
    ids = np.arange(int(num_records), dtype=np.int64)
    u = (sampling.hash_u64(0, sampling.STREAM_FRACTION, ids) >> np.uint64(11)).astype(np.float64)
    kept = ids[u * (1.0 / (1 << 53)) < fraction]
    if not len(kept):
        raise UserError(
            f"config.data.train_fraction={fraction} keeps none of the {num_records} training records."
        )
    return kept


def subset_label_index(index: records.LabelIndex, kept: np.ndarray) -> records.LabelIndex:
    """The label lists of records ``kept`` (in that order) as a LabelIndex of ``len(kept)`` records."""
    starts = index.offsets[kept]
    lengths = index.offsets[kept + 1] - starts
    offsets = np.zeros(len(kept) + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return records.LabelIndex(offsets=offsets, labels=index.labels[gather])


class SubsetSampler:
    """A sampler over the kept records' positions ``[0, len(kept))``, answering with their record ids."""

    def __init__(self, inner, kept: np.ndarray, fraction: float):
        self.inner, self.kept, self.fraction = inner, kept, float(fraction)
        self.mode = inner.mode
        self.num_records = len(kept)

    def sample(self, positions: np.ndarray, attempt: int = 0) -> sampling.Draw:
        draw = self.inner.sample(positions, attempt)
        return sampling.Draw(record=self.kept[draw.record], label=draw.label)

    def label_probabilities(self) -> np.ndarray:
        return self.inner.label_probabilities()

    def identity(self) -> dict:
        return {**self.inner.identity(), "train_fraction": self.fraction}


class ShuffledLabels:
    """The shuffled-hashtag control: record ``j``'s hashtags on the image of record ``pi(j)``.

    ``pi`` is a fixed permutation of the training records (keyed on the seed; within the kept subset with
    ``train_fraction``). The sampler still draws ``j`` by its own hashtags, so the stream of label sets,
    the images, the steps and the schedule are those of the real run; only the pairing of images and
    hashtags is broken. The difference between a real run and this one is what the hashtags themselves
    teach, beyond what training on any labels of this distribution does.
    """

    def __init__(self, source, seed: int, kept: np.ndarray | None = None):
        self.source, self.kept = source, kept
        self.num_records, self.num_labels = source.num_records, source.num_labels
        self._perm = sampling.ImageSampler(
            len(kept) if kept is not None else source.num_records, seed
        )

    def partner(self, ids) -> np.ndarray:
        """The record whose image is shown with record ``ids``' hashtags."""
        ids = np.asarray(ids, np.int64)
        local = ids if self.kept is None else np.searchsorted(self.kept, ids)
        other = self._perm.permute(local, np.full(len(local), _SHUFFLE_EPOCH, np.uint64))
        return other if self.kept is None else self.kept[other]

    def identity(self) -> dict:
        return {**self.source.identity(), "shuffled_labels": True}

    def load(self, ids: Sequence[int]) -> list:
        labelled = self.source.load(ids)
        pictured = self.source.load(self.partner(ids))
        out = []
        for lab, pic in zip(labelled, pictured):
            bad = lab if isinstance(lab, Exception) else pic if isinstance(pic, Exception) else None
            out.append(bad if bad is not None else (pic[0], lab[1]))
        return out


# ------------------------------------------------------------------------------------------------
# Batches: pure functions of the batch index, computed in grain worker processes
# ------------------------------------------------------------------------------------------------


def _alloc(shape, dtype, fill=None) -> np.ndarray:
    """A batch array; in a grain worker it lives in shared memory, so handing it over copies nothing.

    Only in our grain workers (marked by :func:`_init_worker`): a process that merely has a
    multiprocessing parent (a sweep driver's child, a benchmark's forked task) reads its own batches,
    and a shared-memory batch there would stay in /dev/shm until the process ends (one per step)."""
    if _IN_GRAIN_WORKER:
        arr = SharedMemoryArray(shape, np.dtype(dtype))
    else:
        arr = np.empty(shape, dtype)
    if fill is not None:
        arr.fill(fill)
    return arr


_SKIPPED = (BadRecord, records.RecordError, augment.BadImage, cv2.error)


@dataclasses.dataclass
class _Layout:
    """Where a host's rows sit in the global stream."""

    start: int  # global position of row 0 of batch 0
    global_batch: int
    local_batch: int
    process_index: int

    def positions(self, k: int) -> np.ndarray:
        first = self.start + k * self.global_batch + self.process_index * self.local_batch
        return first + np.arange(self.local_batch, dtype=np.int64)


class TrainBatches:
    """Batch ``k`` of this host: sample, read, decode, augment, labels (a grain map over batch indices)."""

    def __init__(
        self,
        source,
        sampler,
        aug: augment.TrainAugment,
        labels: LabelOptions,
        layout: _Layout,
        seed: int,
        max_redraws: int,
    ):
        self.source, self.sampler, self.aug, self.labels = source, sampler, aug, labels
        self.layout, self.seed, self.max_redraws = layout, seed, max_redraws

    def __call__(self, k: int) -> dict:
        b, size, m = self.layout.local_batch, self.aug.size, self.labels.max_labels
        pos = self.layout.positions(int(k))
        draw = self.sampler.sample(pos)
        items = self.source.load(draw.record)
        u = sampling.uniforms(self.seed, sampling.STREAM_AUGMENT, pos, augment.NUM_UNIFORMS)
        image = _alloc((b, size, size, 3), np.uint8)
        labels = _alloc((b, m), np.int32, fill=-1)
        num = _alloc((b,), np.int32)
        bad = 0
        for j in range(b):
            drawn, record, item = int(draw.label[j]), int(draw.record[j]), items[j]
            attempt = 0
            while True:
                try:
                    if isinstance(item, Exception):
                        raise item
                    payload, rec_labels = item
                    t = self.labels.targets(rec_labels, drawn, int(pos[j]), True, record)
                    augment.train_image(payload, image[j], u[j], self.aug)
                    break
                except _SKIPPED as e:
                    bad += 1
                    attempt += 1
                    if attempt > self.max_redraws:
                        raise UserError(
                            f"{attempt} records drawn in a row for one position were bad (last: {e}); the "
                            "data is broken: check or rebuild the dataset."
                        ) from None
                    d = self.sampler.sample(pos[j : j + 1], attempt)
                    drawn, record = int(d.label[0]), int(d.record[0])
                    item = self.source.load(d.record)[0]
            labels[j, : len(t)] = t
            num[j] = len(t)
        stats = np.asarray([b + bad, bad], np.int64)
        return {"image": image, "labels": labels, "num_labels": num, "_stats": stats}


class EvalBatches:
    """Batch ``k`` of this host's evaluation pass; rows past the end are padding with ``mask`` False."""

    def __init__(
        self,
        source,
        tf: augment.EvalTransform,
        labels: LabelOptions,
        layout: _Layout,
        num_images: int,
    ):
        self.source, self.tf, self.labels, self.layout = source, tf, labels, layout
        self.num_images = num_images

    def __call__(self, k: int) -> dict:
        b, size, m = self.layout.local_batch, self.tf.size, self.labels.max_labels
        pos = self.layout.positions(int(k))
        valid = np.nonzero(pos < self.num_images)[0]
        image = _alloc((b, size, size, 3), np.uint8, fill=0)
        labels = _alloc((b, m), np.int32, fill=-1)
        num = _alloc((b,), np.int32, fill=0)
        mask = _alloc((b,), np.bool_, fill=False)
        items = self.source.load(pos[valid]) if len(valid) else []
        bad = 0
        for j, item in zip(valid, items):
            try:
                if isinstance(item, Exception):
                    raise item
                payload, rec_labels = item
                t = self.labels.targets(rec_labels, -1, int(pos[j]), train=False)
                augment.eval_image(payload, image[j], self.tf)
            except _SKIPPED:
                bad += 1
                image[j] = 0
                continue
            labels[j, : len(t)] = t
            num[j] = len(t)
            mask[j] = True
        stats = np.asarray([len(valid), bad], np.int64)
        return {"image": image, "labels": labels, "num_labels": num, "mask": mask, "_stats": stats}


# ------------------------------------------------------------------------------------------------
# Iterators
# ------------------------------------------------------------------------------------------------


# Shared-memory segments of our grain workers are named with this prefix, the training process's pid and
# a token of the iterator they feed, so closing one iterator releases its own batches still in flight (and
# not those of another iterator open beside it: training's while an evaluation pass ends), and a test can
# tell them from other programs' segments.
SHM_PREFIX = "psm_tagjax"


def worker_shm_prefix(parent_pid: int, iterator_token: str = "") -> str:
    """The name prefix of the segments made for process ``parent_pid`` (for one iterator, with a token)."""
    return f"{SHM_PREFIX}{parent_pid}_" + (f"{iterator_token}_" if iterator_token else "")


# True in the grain worker processes of our training iterators (set by _init_worker), where batches are
# built in shared memory for the training process to read.
_IN_GRAIN_WORKER = False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)  # the training process is gone (killed): nobody will read our batches


def _init_worker(
    parent_pid: int, iterator_token: str, worker_index: int, worker_count: int
) -> None:
    """Runs first in each grain worker process: the worker ends itself when the training process dies
    (a SIGKILL runs no cleanup; without this, workers and the resource tracker outlive it), and names
    its shared memory so the training process can release what is left when it closes its iterator.

    A thread polling the parent's pid, not prctl(PR_SET_PDEATHSIG): that signal fires when the *thread*
    that started the worker ends, which need not be the process ending."""
    global _IN_GRAIN_WORKER
    del worker_index, worker_count
    if os.getppid() != parent_pid:
        os._exit(1)
    _IN_GRAIN_WORKER = True
    prefix = "/" + worker_shm_prefix(parent_pid, iterator_token)
    shared_memory._make_filename = lambda: prefix + secrets.token_hex(8)  # names are never reused
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _grain_iterator(owner, batch_fn, first: int, stop: int, num_workers: int, prefetch: int):
    """A grain iterator over batches ``first..stop-1``, and the finalizer that closes it: called by the
    owner's ``close()``, or when the owner is collected, or at interpreter exit while the module's globals
    still exist (an iterator a script never closed would otherwise fail in grain's ``__del__``)."""
    ds = grain.MapDataset.range(first, stop).map(batch_fn)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    prefix = None
    if num_workers > 0:
        token = secrets.token_hex(4)
        prefix = worker_shm_prefix(os.getpid(), token)
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch),
            worker_init_fn=functools.partial(_init_worker, os.getpid(), token),
        )
    iterator = iter(it_ds)
    return iterator, weakref.finalize(owner, _close_grain, iterator, prefix)


def _close_grain(iterator, shm_prefix: str | None) -> None:
    """Stops a grain iterator's workers, then unlinks the shared memory of batches they made for it that
    were never read (grain leaves those to the resource tracker, which warns about each at exit)."""
    iterator.close()
    shm_dir = Path("/dev/shm")
    if shm_prefix is None or not shm_dir.is_dir():
        return
    for leftover in shm_dir.glob(shm_prefix + "*"):
        with contextlib.suppress(OSError):
            leftover.unlink()
        with contextlib.suppress(Exception):
            resource_tracker.unregister("/" + leftover.name, "shared_memory")


_BAD_RECORD_CAUSE = "undecodable image, no labels or unknown label ids"
_BAD_RECORD_FIX = "check the dataset (`tagjax build` reports what it dropped)"


class TrainIterator(grain.DatasetIterator):
    """The training iterator: numpy host batches, checkpointable with ``get_state`` / ``set_state``.

    The state is small JSON: the next global stream position plus what identifies the stream. It is the
    same on every host (only the bad-record counters are per host), so any host's copy restores any host.
    """

    def __init__(
        self,
        batches: TrainBatches,
        stream: dict,
        num_workers: int,
        prefetch: int,
        counter: BadRecordCounter,
    ):
        super().__init__()
        self._batches = batches
        self._stream = stream
        self._num_workers = int(num_workers)
        self._prefetch = int(prefetch)
        self._counter = counter
        self._next_batch = 0
        self._inner = None
        self._closer = None

    # Properties the trainer logs.
    @property
    def local_batch_size(self) -> int:
        return self._batches.layout.local_batch

    @property
    def next_position(self) -> int:
        """Global stream position of the next batch's first row (= images the run has consumed)."""
        lay = self._batches.layout
        return lay.start + self._next_batch * lay.global_batch

    @property
    def records_read(self) -> int:
        return self._counter.records_read

    @property
    def bad_records(self) -> int:
        return self._counter.bad_records

    def _ensure(self):
        if self._inner is None:
            self._inner, self._closer = _grain_iterator(
                self,
                self._batches,
                self._next_batch,
                _ENDLESS_BATCHES,
                self._num_workers,
                self._prefetch,
            )
        return self._inner

    def __next__(self) -> dict:
        batch = next(self._ensure())
        self._next_batch += 1
        self._counter.add(*batch.pop("_stats"))
        return batch

    def start_prefetch(self) -> None:
        self._ensure().start_prefetch()

    def close(self) -> None:
        if self._inner is not None:
            self._closer()  # closes the grain iterator once, however often it is called
            self._inner = None

    def get_state(self) -> dict:
        lay = self._batches.layout
        return {
            "format": STATE_FORMAT,
            "next_position": self.next_position,
            "stream": self._stream,
            "global_batch_size": lay.global_batch,
            "process_count": lay.global_batch // lay.local_batch,
            "num_workers": self._num_workers,
            "records_read": self._counter.records_read,
            "bad_records": self._counter.bad_records,
        }

    def set_state(self, state: dict) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError(
                "the checkpoint's data-iterator state was not written by this tagjax input pipeline; "
                "start a fresh run or use the tagjax version that wrote it."
            )
        if state["stream"] != self._stream:
            diff = sorted(
                k
                for k in {*state["stream"], *self._stream}
                if state["stream"].get(k) != self._stream.get(k)
            )
            raise UserError(
                f"the checkpoint was trained on another data stream (differs in: {', '.join(diff)}); "
                "resume with the same dataset, split, config.data.sampling and config.seed."
            )
        lay = self._batches.layout
        pos = int(state["next_position"])
        if state["global_batch_size"] != lay.global_batch or state["process_count"] != (
            lay.global_batch // lay.local_batch
        ):
            logging.warning(
                "data iterator: resuming a run saved with global batch %d on %d hosts with global batch "
                "%d on %d hosts; the example stream continues exactly at position %d.",
                state["global_batch_size"],
                state["process_count"],
                lay.global_batch,
                lay.global_batch // lay.local_batch,
                pos,
            )
        self.close()
        self._batches.layout = dataclasses.replace(lay, start=pos)
        self._next_batch = 0
        self._counter.records_read = int(state.get("records_read", 0))
        self._counter.bad_records = int(state.get("bad_records", 0))


class EvalIterator:
    """One pass over an evaluation split: ``num_steps`` batches on every host, padded rows masked."""

    def __init__(
        self,
        batches: EvalBatches,
        num_steps: int,
        num_workers: int,
        prefetch: int,
        counter: BadRecordCounter,
    ):
        self._batches, self.num_steps = batches, int(num_steps)
        self._num_workers, self._prefetch, self._counter = num_workers, prefetch, counter
        self._inner = None
        self._closer = None
        self._done = 0
        self.num_images = batches.num_images  # all hosts together, padding excluded

    @property
    def records_read(self) -> int:
        return self._counter.records_read

    @property
    def bad_records(self) -> int:
        return self._counter.bad_records

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._done >= self.num_steps:
            self.close()
            raise StopIteration
        if self._inner is None:
            self._inner, self._closer = _grain_iterator(
                self, self._batches, 0, self.num_steps, self._num_workers, self._prefetch
            )
        batch = next(self._inner)
        self._done += 1
        self._counter.add(*batch.pop("_stats"), final=self._done == self.num_steps)
        return batch

    def close(self) -> None:
        if self._inner is not None:
            self._closer()  # closes the grain iterator once, however often it is called
            self._inner = None


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def _hosts(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        process_index = shard.shard_index if process_index is None else process_index
        process_count = shard.shard_count if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return int(process_index), int(process_count)


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise UserError(
            f"{what}={global_batch} must be a positive multiple of the number of hosts ({process_count})."
        )
    return global_batch // process_count


def _dataset_dir(config, dataset_dir) -> Path:
    if isinstance(dataset_dir, SourceInfo):
        dataset_dir = dataset_dir.dataset_dir
    path = dataset_dir or config.data.dataset
    if not path:
        raise UserError(
            "no dataset: set config.data.dataset=DIR (built by `tagjax build`) or config.data.synthetic=True."
        )
    return Path(path).expanduser()


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What a run trains on, opened once: pass it to ``make_*_iterator`` in place of the dataset dir."""

    dataset_dir: Path | None  # None for the synthetic task
    num_classes: int
    metadata: dict  # for checkpoints: dataset, vocabulary fingerprint, training records, sampling
    vocab: object = dataclasses.field(default=None, repr=False, compare=False)


def open_source(config, dataset_dir=None) -> SourceInfo:
    """The dataset (or synthetic task) of ``config``, checked, with what the trainer stores about it."""
    d = config.data
    if d.synthetic:
        meta = {
            "dataset": "synthetic",
            "num_classes": int(d.synthetic_num_labels),
            "synthetic_num_images": int(d.synthetic_num_images),
            "sampling": d.sampling,
        }
        return SourceInfo(None, int(d.synthetic_num_labels), meta)
    root = _dataset_dir(config, dataset_dir)
    vocab = load_vocabulary(config, root)
    manifest = records.load_manifest(root)
    meta = {
        "dataset": str(root),
        "vocab_fingerprint": vocab.fingerprint(),
        "num_classes": vocab.num_labels,
        "train_records": manifest.num_records(d.train_split)
        if d.train_split in manifest.splits
        else 0,
        "sampling": d.sampling,
    }
    return SourceInfo(root, vocab.num_labels, meta, vocab)


def load_vocabulary(config, dataset_dir=None):
    """The dataset's vocabulary (``vocab.json``), checked against the fingerprint in its manifest."""

    if isinstance(dataset_dir, SourceInfo) and dataset_dir.vocab is not None:
        return dataset_dir.vocab
    root = _dataset_dir(config, dataset_dir)
    manifest = records.load_manifest(root)
    vocab = vocab_lib.Vocabulary.load(root / manifest.vocab_file)
    if manifest.vocab_fingerprint and manifest.vocab_fingerprint != vocab.fingerprint():
        raise UserError(
            f"{root / manifest.vocab_file} is not the vocabulary {root} was built with (fingerprint "
            f"{vocab.fingerprint()} vs {manifest.vocab_fingerprint}); restore it or rebuild the dataset."
        )
    return vocab


def num_labels(config, dataset_dir=None) -> int:
    """The number of classes the model predicts: the vocabulary size (or the synthetic task's)."""
    if config.data.synthetic:
        return int(config.data.synthetic_num_labels)
    return load_vocabulary(config, dataset_dir).num_labels


def _ancestor_dropper(config, vocab) -> AncestorDropper | None:
    if not config.data.drop_ancestors:
        return None
    if vocab is None:
        raise UserError(
            "config.data.drop_ancestors needs a real vocabulary; the synthetic task has none."
        )
    return AncestorDropper.from_vocab(vocab)


def _cache_dir(config, dataset_dir: Path) -> Path:
    if config.data.get("cache_dir", ""):
        return Path(config.data.cache_dir).expanduser()
    if os.access(dataset_dir, os.W_OK):
        return dataset_dir
    return Path.home() / ".cache" / "tagjax" / "index"


def _validate(config) -> None:
    d = config.data
    if d.sampling not in sampling.SAMPLING_MODES:
        raise UserError(
            f"config.data.sampling={d.sampling!r} is not one of {', '.join(sampling.SAMPLING_MODES)}."
        )
    if not 0.0 <= d.label_noise <= 1.0:
        raise UserError(f"config.data.label_noise={d.label_noise} must be a probability in [0, 1].")
    if not 0.0 < d.get("train_fraction", 1.0) <= 1.0:
        raise UserError(f"config.data.train_fraction={d.train_fraction} must be in (0, 1].")
    if d.max_labels < 1:
        raise UserError("config.data.max_labels must be at least 1.")
    lo, hi = d.crop_area_range
    if not 0 < lo <= hi <= 1:
        raise UserError(
            f"config.data.crop_area_range={tuple(d.crop_area_range)} must satisfy 0 < lo <= hi <= 1."
        )
    if d.eval_image_size > d.eval_resize:
        raise UserError(
            "config.data.eval_image_size must not exceed config.data.eval_resize (center crop)."
        )
    if d.get("max_open_shards", 0) < 0:
        raise UserError(
            f"config.data.max_open_shards={d.max_open_shards}: use 0 (every shard read stays open) "
            "or a positive number of shards."
        )
    if d.num_workers < 0 or d.prefetch_buffer < 1:
        raise UserError(
            "config.data.num_workers must be >= 0 and config.data.prefetch_buffer >= 1."
        )
    mean, std = tuple(d.mean), tuple(d.std)
    if len(mean) != 3 or not all(math.isfinite(float(m)) for m in mean):
        raise UserError(f"config.data.mean={mean} must be 3 finite numbers (R, G, B).")
    if len(std) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in std):
        raise UserError(f"config.data.std={std} must be 3 positive numbers (R, G, B).")
    if not 0.0 <= d.max_bad_record_fraction <= 1.0:
        raise UserError(
            f"config.data.max_bad_record_fraction={d.max_bad_record_fraction} must be in [0, 1]."
        )


def make_train_iterator(
    config, dataset_dir=None, *, process_index: int | None = None, process_count: int | None = None
) -> TrainIterator:
    """This host's training batches (see the module docstring). Restore with ``it.set_state(state)``.

    ``process_index`` / ``process_count`` default to the JAX process; tests pass them to simulate hosts.
    """
    _validate(config)
    d = config.data
    index, count = _hosts(process_index, process_count)
    global_batch = int(config.train.batch_size)
    layout = _Layout(
        0, global_batch, _local_batch(global_batch, count, "config.train.batch_size"), index
    )
    if d.synthetic:
        source = synthetic_task(config, "train")
        label_index, store = source.label_index, None
        vocab = None
    else:
        dataset_root = _dataset_dir(config, dataset_dir)
        vocab = load_vocabulary(
            config, dataset_dir if isinstance(dataset_dir, SourceInfo) else dataset_root
        )
        source = RecordSource(
            dataset_root, d.train_split, vocab.num_labels, d.get("max_open_shards", 0)
        )
        store = records.open_label_store(dataset_root, d.train_split, source.num_labels)
        if store.num_records != source.num_records:
            raise UserError(
                f"{store.offsets_path} indexes {store.num_records} records but the split has "
                f"{source.num_records}; rebuild the dataset."
            )
        label_index = None
    fraction = float(d.get("train_fraction", 1.0))
    kept = train_subset(source.num_records, fraction)
    needs_index = d.sampling != "images" or d.label_noise > 0
    inverted = None
    if kept is not None:  # a subset: its own inverted index, in memory (the cached one covers all)
        if needs_index:
            full = label_index if label_index is not None else store.memory_mapped()
            sub = subset_label_index(full, kept)
            inverted = sampling.InvertedIndex.in_memory(sub, source.num_labels)
        sampler = sampling.make_sampler(d.sampling, config.seed, len(kept), inverted)
        sampler = SubsetSampler(sampler, kept, fraction)
    else:
        if label_index is not None:
            inverted = sampling.InvertedIndex.in_memory(label_index, source.num_labels)
        elif needs_index:
            inverted = sampling.InvertedIndex.load_or_build(
                store, source.num_labels, _cache_dir(config, dataset_root)
            )
        sampler = sampling.make_sampler(d.sampling, config.seed, source.num_records, inverted)
    if d.get("shuffle_labels", False):
        source = ShuffledLabels(source, int(config.seed), kept)
    noise_cdf = None
    if d.label_noise > 0:
        noise_cdf = np.cumsum(sampling.integer_weights(inverted.counts, 1.0))
    label_opts = LabelOptions(
        max_labels=int(d.max_labels),
        seed=int(config.seed),
        label_noise=float(d.label_noise),
        noise_cdf=noise_cdf,
        drop_ancestors=_ancestor_dropper(config, vocab),
    )
    batches = TrainBatches(
        source,
        sampler,
        augment.TrainAugment.from_config(d),
        label_opts,
        layout,
        int(config.seed),
        int(d.max_redraws),
    )
    stream = {
        "source": source.identity(),
        "sampler": sampler.identity(),
        "seed": int(config.seed),
    }
    counter = BadRecordCounter.from_data_config(
        d, "training records", cause=_BAD_RECORD_CAUSE, fix=_BAD_RECORD_FIX
    )
    return TrainIterator(
        batches, json.loads(json.dumps(stream)), d.num_workers, d.prefetch_buffer, counter
    )


def make_eval_iterator(
    config,
    dataset_dir=None,
    split: str | None = None,
    *,
    batch_size: int | None = None,
    max_images: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterator:
    """One pass over ``split`` (default config.data.eval_split) in file order, every image exactly once.

    ``batch_size`` is global (default config.train.batch_size); ``max_images`` (default
    config.train.eval_max_images, 0 = all) evaluates the first images of the split. Every host runs
    ``len(iterator)`` steps; rows past the end of the data have ``mask`` False.
    """
    _validate(config)
    d = config.data
    split = split or d.eval_split
    index, count = _hosts(process_index, process_count)
    global_batch = int(batch_size or config.train.batch_size)
    layout = _Layout(
        0, global_batch, _local_batch(global_batch, count, "the evaluation batch size"), index
    )
    if d.synthetic:
        source = synthetic_task(config, split)
        vocab = None
    else:
        dataset_root = _dataset_dir(config, dataset_dir)
        vocab = load_vocabulary(
            config, dataset_dir if isinstance(dataset_dir, SourceInfo) else dataset_root
        )
        source = RecordSource(dataset_root, split, vocab.num_labels, d.get("max_open_shards", 0))
    limit = config.train.eval_max_images if max_images is None else max_images
    n = source.num_records if not limit else min(int(limit), source.num_records)
    label_opts = LabelOptions(
        max_labels=int(d.max_labels),
        seed=int(config.seed),
        drop_ancestors=_ancestor_dropper(config, vocab),
    )
    batches = EvalBatches(source, augment.EvalTransform.from_config(d), label_opts, layout, n)
    counter = BadRecordCounter.from_data_config(
        d, f"{split} records", cause=_BAD_RECORD_CAUSE, fix=_BAD_RECORD_FIX
    )
    steps = math.ceil(n / global_batch)
    return EvalIterator(batches, steps, d.num_workers, d.prefetch_buffer, counter)


def synthetic_task(config, split: str = "train") -> SyntheticTask:
    """The synthetic task of ``config`` (config.data.synthetic_*): ``train`` or ``heldout`` images."""
    d = config.data
    n = (
        d.synthetic_num_images
        if split == d.train_split or split == "train"
        else d.synthetic_eval_images
    )
    return SyntheticTask(
        num_images=int(n),
        num_labels=int(d.synthetic_num_labels),
        canvas=int(d.eval_resize),
        seed=int(config.seed),
        split="train" if split in ("train", d.train_split) else "heldout",
        max_labels_per_image=int(d.synthetic_labels_per_image),
    )
