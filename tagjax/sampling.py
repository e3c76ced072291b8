"""Which record sits at each position of the training stream: hashtag resampling and shuffled epochs.

The training stream is a function of ``(seed, position)`` only. Position ``p`` is the ``p``-th example
of the *global* stream (all hosts together); host ``h`` of ``H`` takes the positions of its slice of each
global batch. Nothing is drawn sequentially, so any position can be computed on its own: the stream is
random access, a resumed run continues it exactly from a saved position, and hosts need no coordination.
Randomness comes from a counter-based hash (SplitMix64 finalizers chained over the key words), which is
cheap to vectorize with numpy and identical on every machine.

Samplers (``config.data.sampling``):

* ``natural`` / ``sqrt`` / ``uniform``: hashtag resampling (Mahajan et al. 2018). Draw a hashtag ``h``
  with ``p(h) ~ n_h ** alpha`` (alpha 1, 0.5, 0; ``n_h`` = images carrying ``h`` in the split, the same
  counts on every host), then an image carrying ``h`` uniformly. It needs an inverted index
  (hashtag -> images, CSR): one image id per (image, hashtag) pair, 4 bytes while the split has fewer than
  2**32 images (8 above), i.e. **~12 bytes per image at 3 hashtags per image**, plus O(num_labels) tables.
  The id array is a memory-mapped ``.npy`` file, so all worker processes of a host share one copy through
  the page cache instead of holding their own.
* ``images``: every image equally, in shuffled epochs without resampling. Position ``p`` is image
  ``perm_e(p mod N)`` of epoch ``e = p div N``, where ``perm_e`` is a keyed Feistel permutation of
  ``[0, N)`` (cycle walking), computed on the fly: **0 bytes per image**.

``natural`` is *not* "no resampling". Drawing ``h`` with probability ``n_h / sum n`` and then one of its
``n_h`` images gives image ``i`` the probability ``sum over its k_i hashtags of (n_h / sum n) x (1 / n_h)
= k_i / sum_j k_j``: an image is weighted by its number of hashtags, so a post with 4 hashtags is drawn 4
times as often as a post with one. ``images`` is uniform over images: every image once per epoch. The
paper's baseline without resampling trains on the images as they are, each once per pass: that is
``images`` [R: the paper's sampling ablation is recalled, not re-read]. The two coincide only when every
image carries the same number of hashtags.

A bad record (undecodable image, no labels) is replaced by redrawing the same position with ``attempt``
1, 2, ...: the replacement is as deterministic as the original.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
from absl import logging

from tagjax import records
from tagjax.errors import UserError
from tagjax.progress import progress_bar

ALPHAS = {"natural": 1.0, "sqrt": 0.5, "uniform": 0.0}
SAMPLING_MODES = (*ALPHAS, "images")

# Stream identifiers: independent hash streams for independent random choices at one position.
STREAM_LABEL = 1
STREAM_IMAGE = 2
STREAM_EPOCH = 3
STREAM_REDRAW = 4
STREAM_AUGMENT = 5
STREAM_NOISE = 6
STREAM_SUBSET = 7
STREAM_SYNTHETIC = 8
STREAM_FRACTION = 9  # which training records config.data.train_fraction keeps

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# Hashtag weights are integers summing to about 2**40: draws are exact integer arithmetic (the same on every
# host), and reducing a 64-bit hash modulo the total has a bias below 2**-24.
_WEIGHT_TOTAL_BITS = 40
_FEISTEL_ROUNDS = 8
_ROUND_KEYS = np.asarray(
    [((r + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF for r in range(_FEISTEL_ROUNDS)], np.uint64
)
# Building the inverted index: records read per chunk (temporaries ~50 B per pair of a chunk, ~100 MB at
# 2 labels per image), index entries assembled at once (the output buffer: 4 B each, 256 MB), and bucket
# entries read at once. Peak memory is bounded by these, not by the split's size.
_INVERT_CHUNK_RECORDS = 1 << 20
_INVERT_BUFFER_PAIRS = 1 << 26
_INVERT_READ_PAIRS = 1 << 22
_INDEX_FORMAT = 1


def _mix(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_u64(seed: int, stream: int, *words) -> np.ndarray:
    """A 64-bit hash of ``(seed, stream, *words)``; ``words`` are ints or integer arrays (broadcast).

    Each word enters through its own SplitMix64 round, so changing any one word gives an independent value.
    """
    h = _mix(
        np.asarray([(seed * 0x632BE59BD9B4E019 + stream) & 0xFFFFFFFFFFFFFFFF], np.uint64) + _GOLDEN
    )
    for w in words:
        h = _mix(h ^ (np.asarray(w).astype(np.uint64) + _GOLDEN))
    return h if any(np.ndim(w) for w in words) else h.reshape(())


def uniforms(seed: int, stream: int, positions, count: int, attempt: int = 0) -> np.ndarray:
    """``count`` independent floats in [0, 1) per position: shape ``[*positions.shape, count]``.

    One call covers a whole batch, which keeps the per-image cost of hashing negligible.
    """
    positions = np.asarray(positions, np.int64)[..., None]
    h = hash_u64(seed, stream, positions, attempt, np.arange(count, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _uniform_ints(h: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Hashes -> integers in [0, n) (n < 2**40 keeps the modulo bias below 2**-24)."""
    return (h % np.asarray(n).astype(np.uint64)).astype(np.int64)


def integer_weights(counts: np.ndarray, alpha: float) -> np.ndarray:
    """``n_h ** alpha`` as int64 weights summing to about 2**40; hashtags with no images get weight 0.

    Integers make the draw exact (the same on every host); every present hashtag keeps weight >= 1.
    """
    counts = np.asarray(counts, np.int64)
    present = counts > 0
    if not present.any():
        raise UserError(
            "the split has no labelled images; rebuild the dataset with `tagjax build`."
        )
    raw = np.zeros(len(counts), np.float64)
    raw[present] = np.power(counts[present].astype(np.float64), alpha)
    w = np.floor(raw / raw.sum() * float(1 << _WEIGHT_TOTAL_BITS)).astype(np.int64)
    w[present] = np.maximum(w[present], 1)
    return w


@dataclasses.dataclass
class Draw:
    """Records at a batch of positions; ``label`` is the drawn hashtag (-1 in ``images`` mode)."""

    record: np.ndarray  # int64 [n]
    label: np.ndarray  # int64 [n]


class ImageSampler:
    """Every image once per epoch, epochs shuffled independently (keyed Feistel permutation).

    Over positions ``[e*N, (e+1)*N)`` each image appears exactly once, whichever host reads which position.
    """

    mode = "images"

    def __init__(self, num_records: int, seed: int):
        if num_records <= 0:
            raise UserError("the split has no records; rebuild the dataset with `tagjax build`.")
        self.num_records = int(num_records)
        self.seed = int(seed)
        bits = max(2, math.ceil(math.log2(self.num_records)))
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)

    def _feistel(self, x: np.ndarray, key: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self._half), x & self._mask
        for r in range(_FEISTEL_ROUNDS):
            f = _mix(key ^ (right + _ROUND_KEYS[r])) & self._mask
            left, right = right, left ^ f
        return (left << np.uint64(self._half)) | right

    def permute(self, index: np.ndarray, epoch: np.ndarray) -> np.ndarray:
        """Image at within-epoch ``index`` of ``epoch`` (a bijection of [0, N) per epoch)."""
        index = np.asarray(index, np.uint64)
        key = hash_u64(self.seed, STREAM_EPOCH, np.asarray(epoch, np.uint64))
        key = np.broadcast_to(key, index.shape).copy()
        x = self._feistel(index, key)
        todo = np.nonzero(x >= self.num_records)[0]
        while len(todo):  # cycle walking: the domain is < 4N, so few rounds are needed
            x[todo] = self._feistel(x[todo], key[todo])
            todo = todo[x[todo] >= self.num_records]
        return x.astype(np.int64)

    def sample(self, positions: np.ndarray, attempt: int = 0) -> Draw:
        positions = np.asarray(positions, np.int64)
        if attempt == 0:
            record = self.permute(positions % self.num_records, positions // self.num_records)
        else:  # a replacement for a bad record: any image, uniformly
            record = _uniform_ints(
                hash_u64(self.seed, STREAM_REDRAW, positions, attempt), self.num_records
            )
        return Draw(record=record, label=np.full(len(positions), -1, np.int64))

    def identity(self) -> dict:
        return {"mode": self.mode, "num_records": self.num_records}


class HashtagSampler:
    """p(h) ~ n_h**alpha, then an image carrying h uniformly (see the module docstring for memory)."""

    def __init__(self, index: InvertedIndex, alpha: float, seed: int, mode: str):
        self.index = index
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.mode = mode
        self.num_records = index.num_records
        self.weights = integer_weights(index.counts, alpha)
        self._cdf = np.cumsum(self.weights)
        self._total = int(self._cdf[-1])

    def label_probabilities(self) -> np.ndarray:
        """The exact distribution of the drawn hashtag (for tests and reports)."""
        return self.weights / self._total

    def sample(self, positions: np.ndarray, attempt: int = 0) -> Draw:
        positions = np.asarray(positions, np.int64)
        r = _uniform_ints(hash_u64(self.seed, STREAM_LABEL, positions, attempt), self._total)
        label = np.searchsorted(self._cdf, r, side="right").astype(np.int64)
        j = _uniform_ints(
            hash_u64(self.seed, STREAM_IMAGE, positions, attempt), self.index.counts[label]
        )
        return Draw(record=self.index.images_at(self.index.offsets[label] + j), label=label)

    def identity(self) -> dict:
        return {
            "mode": self.mode,
            "num_records": self.num_records,
            "weights": _digest(self.weights),
        }


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


class InvertedIndex:
    """hashtag -> images carrying it, in CSR form: ``images[offsets[h]:offsets[h+1]]``, ascending ids.

    For a built dataset ``images`` is memory-mapped from a cache file and reopened (not copied) when the
    pipeline is pickled into a worker process; small in-memory indexes (the synthetic task) travel as is.
    """

    def __init__(self, counts: np.ndarray, num_records: int, path: Path | None = None, images=None):
        self.path = None if path is None else Path(path)
        self.counts = np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_records = int(num_records)
        self._images = images

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = records.open_random_access(self.path)  # draws hit scattered entries
        return self._images

    def images_at(self, flat: np.ndarray) -> np.ndarray:
        return np.asarray(self.images[np.asarray(flat, np.int64)], np.int64)

    def images_of(self, label: int) -> np.ndarray:
        return np.asarray(self.images[self.offsets[label] : self.offsets[label + 1]], np.int64)

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.path is not None:
            state["_images"] = None
        return state

    @staticmethod
    def _dtype(num_records: int):
        return np.uint32 if num_records < (1 << 32) else np.int64

    @classmethod
    def in_memory(cls, label_index: records.LabelIndex, num_labels: int) -> InvertedIndex:
        """The index of a small in-memory label index (synthetic task, demos), held in memory."""
        counts = label_index.counts(num_labels)[:num_labels]  # longer if ids are out of range
        images = np.empty(int(counts.sum()), cls._dtype(label_index.num_records))
        for dest, rec in _placed_pairs(label_index.chunks, counts):
            images[dest] = rec
        return cls(counts, label_index.num_records, images=images)

    @classmethod
    def build(
        cls,
        store: records.LabelStore,
        num_labels: int,
        path: Path,
        buffer_pairs: int | None = None,
    ) -> InvertedIndex:
        """Writes the index of ``store`` to the ``.npy`` file ``path`` (plus a ``.json`` with the counts).

        Bounded memory whatever the split's size (an external counting sort): one chunked pass over the
        label store places every (image, hashtag) pair at its final position and appends it to the
        bucket file of that position's slice of ``buffer_pairs`` entries (8 or 12 bytes per pair of
        temporary disk next to ``path``); then each slice is assembled in one buffer and appended to the
        output. A split whose index fits one buffer skips the bucket files. The file is renamed into
        place when complete.
        """
        buffer_pairs = int(buffer_pairs or _INVERT_BUFFER_PAIRS)
        n = store.num_records
        counts = store.counts(num_labels)
        total = int(counts.sum())
        if total != store.num_pairs:
            raise UserError(
                f"{store.counts_path} counts {total} (image, label) pairs but {store.labels_path} holds "
                f"{store.num_pairs}; the label store is damaged: rebuild the dataset."
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
        dtype = np.dtype(cls._dtype(n))
        num_slices = max(1, -(-total // buffer_pairs))
        bucket_dtype = np.dtype([("pos", np.uint32), ("rec", dtype)])
        buckets = [tmp.with_name(f"{tmp.name}.bucket{k}") for k in range(num_slices)]
        bar = progress_bar(
            total=2 * total if num_slices > 1 else total,
            unit="pair",
            desc="hashtag -> images index",
            enabled=None if total > _INVERT_CHUNK_RECORDS else False,
        )
        try:
            with open(tmp, "wb") as out:
                np.lib.format.write_array_header_1_0(
                    out,
                    {
                        "descr": np.lib.format.dtype_to_descr(dtype),
                        "fortran_order": False,
                        "shape": (total,),
                    },
                )
                if num_slices == 1:
                    buffer = np.empty(total, dtype)
                    for dest, rec in _placed_pairs(store.chunks, counts):
                        buffer[dest] = rec
                        bar.update(len(dest))
                    buffer.tofile(out)
                else:
                    _write_buckets(store, counts, buffer_pairs, buckets, bucket_dtype, bar)
                    buffer = np.empty(buffer_pairs, dtype)
                    for k, bucket in enumerate(buckets):
                        size = min(buffer_pairs, total - k * buffer_pairs)
                        with open(bucket, "rb") as f:
                            while True:
                                part = np.fromfile(f, bucket_dtype, count=_INVERT_READ_PAIRS)
                                if not len(part):
                                    break
                                buffer[part["pos"]] = part["rec"]
                                bar.update(len(part))
                        bucket.unlink()
                        buffer[:size].tofile(out)
            os.replace(tmp, path)
        finally:
            bar.close()
            for f in [tmp, *buckets]:
                f.unlink(missing_ok=True)
        meta = {"format": _INDEX_FORMAT, "num_records": int(n), "counts": counts.tolist()}
        tmp_meta = _meta_path(path).with_name(_meta_path(path).name + f".tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, _meta_path(path))
        return cls(counts, n, path=path)

    @classmethod
    def load_or_build(
        cls, store: records.LabelStore, num_labels: int, cache_dir: Path
    ) -> InvertedIndex:
        """The cached index of ``store`` (keyed by its files' paths, sizes and mtimes), built if missing.

        Concurrent builders (several hosts on a shared disk) write identical files and rename atomically.
        """
        key = [_INDEX_FORMAT, num_labels]
        for f in (store.offsets_path, store.labels_path):
            st = f.stat()
            key += [str(f.resolve()), st.st_size, st.st_mtime_ns]
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"{store.split}.inverted-{digest}.npy"
        if path.is_file() and _meta_path(path).is_file():
            meta = json.loads(_meta_path(path).read_text())
            return cls(np.asarray(meta["counts"], np.int64), meta["num_records"], path=path)
        logging.info(
            "building the hashtag -> images index of %s in %s", store.labels_path, path.parent
        )
        return cls.build(store, num_labels, path)


def _placed_pairs(chunks, counts: np.ndarray):
    """Every (image, hashtag) pair with its position in the index, chunk by chunk: ``(dest, record)``.

    Entry ``offsets[h] + j`` of the index is the ``j``-th record (in record order) carrying hashtag ``h``.
    Within a chunk, pairs come sorted by hashtag, so ``dest`` is ascending. Temporaries are ~50 bytes per
    pair of one chunk. Checks the label ids against the vocabulary and the stored counts.
    """
    num_labels = len(counts)
    cursor = np.cumsum(counts) - counts  # the next free slot of each hashtag
    seen = np.zeros(num_labels, np.int64)
    for chunk in chunks(_INVERT_CHUNK_RECORDS):
        labels = chunk.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= num_labels):
            raise UserError(
                f"the label index holds label ids outside [0, {num_labels}) of the vocabulary; the "
                "dataset and its vocab.json disagree: rebuild the dataset with `tagjax build`."
            )
        chunk_counts = np.bincount(labels, minlength=num_labels)
        seen += chunk_counts
        if (seen > counts).any():
            break
        order = np.argsort(labels, kind="stable")
        lab, rec = labels[order], chunk.records[order]
        rank = np.arange(len(lab)) - np.searchsorted(lab, lab, side="left")
        yield cursor[lab] + rank, rec
        cursor += chunk_counts
    if not np.array_equal(seen, counts):
        raise UserError(
            "the label index's stored per-label counts disagree with its label ids; the label "
            "store is damaged: rebuild the dataset with `tagjax build`."
        )


def _write_buckets(store, counts, buffer_pairs, buckets, bucket_dtype, bar) -> None:
    """Appends every placed pair to the bucket file of its slice: (position in the slice, record)."""
    files = [open(b, "wb") for b in buckets]  # noqa: SIM115 (closed below)
    try:
        starts = np.arange(len(buckets), dtype=np.int64) * buffer_pairs
        for dest, rec in _placed_pairs(store.chunks, counts):
            cuts = [*np.searchsorted(dest, starts, side="left").tolist(), len(dest)]
            for k in range(len(buckets)):
                lo, hi = cuts[k], cuts[k + 1]
                if hi > lo:
                    part = np.empty(hi - lo, bucket_dtype)
                    part["pos"] = dest[lo:hi] - starts[k]
                    part["rec"] = rec[lo:hi]
                    part.tofile(files[k])
            bar.update(len(dest))
    finally:
        for f in files:
            f.close()


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(".npy")] + ".json")


def make_sampler(mode: str, seed: int, num_records: int, index: InvertedIndex | None = None):
    """The sampler for ``config.data.sampling``; hashtag modes need the split's inverted index."""
    if mode == "images":
        return ImageSampler(num_records, seed)
    if mode not in ALPHAS:
        raise UserError(f"config.data.sampling={mode!r} is not one of {', '.join(SAMPLING_MODES)}.")
    if index is None:
        raise ValueError("hashtag sampling needs the split's inverted index")
    return HashtagSampler(index, ALPHAS[mode], seed, mode)
