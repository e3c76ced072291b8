"""The on-disk dataset format: versioned records in ArrayRecord shards, plus a manifest.

A built dataset is one directory::

    <dataset>/
      dataset.json                        manifest, written last: its presence means the build completed
      vocab.json                          the vocabulary the label ids refer to (tagjax.vocab)
      train-00000-of-00004.array_record   msgpack records, see `encode` / `decode`
      heldout-00000-of-00001.array_record
      train.labels.offsets.npy            label index of the split (`LabelStore`): which labels each
      train.labels.ids.npy                record carries, memory-mappable, for resampling without
      train.labels.counts.npy             reading images; plus images per label
      heldout.labels.{offsets,ids,counts}.npy
      stats.json, report.txt              what the build read, wrote and dropped, per reason

Records are msgpack maps so the schema can grow: readers check ``v`` and ignore unknown keys. Version 1:

=========  ==========  ============================================================================
key        type        meaning
=========  ==========  ============================================================================
v          int         schema version (``SCHEMA_VERSION``)
id         str         post id (stable; the train/held-out split and opt-outs are keyed on it)
image      bytes       the image, JPEG (RGB, shorter side at most the build's ``max_side``)
labels     list[int]   canonical label ids, sorted, unique, non-empty
user       str         uploader id; only present when the build was asked to keep it
=========  ==========  ============================================================================

The label store holds every record's label ids as CSR arrays (``offsets`` int64 [n+1], ``ids`` int32
[nnz]) in record order over the split's shards, so the input pipeline can resample by hashtag without
reading images: 8 bytes per image plus 4 bytes per label (16 bytes per image at ~2 labels per image),
on disk and memory-mapped, never loaded whole; ``counts`` (images per label) is O(labels).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import mmap
import os
import shutil
import threading
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import msgpack
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from tagjax.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "dataset.json"
SPLITS = ("train", "heldout")


class RecordError(ValueError):
    """A record that cannot be decoded or violates the schema."""


@dataclasses.dataclass(frozen=True)
class Record:
    post_id: str
    image: bytes
    labels: tuple[int, ...]
    user: str | None = None


def encode(record: Record) -> bytes:
    """Record -> bytes (msgpack). Labels are sorted and deduplicated here, so every writer agrees."""
    labels = sorted({int(x) for x in record.labels})
    if not labels:
        raise RecordError(
            f"post {record.post_id!r} has no labels; records must carry at least one."
        )
    item = {
        "v": SCHEMA_VERSION,
        "id": str(record.post_id),
        "image": bytes(record.image),
        "labels": labels,
    }
    if record.user is not None:
        item["user"] = str(record.user)
    return msgpack.packb(item, use_bin_type=True)


def decode(data: bytes) -> Record:
    """bytes -> Record; raises RecordError for anything that is not a valid record of a known version."""
    try:
        item = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise RecordError(f"undecodable record ({type(e).__name__}: {e})") from None
    if not isinstance(item, dict) or "v" not in item:
        raise RecordError("not a tagjax record (no schema version)")
    if item["v"] > SCHEMA_VERSION:
        raise RecordError(
            f"record schema v{item['v']} is newer than this tagjax (v{SCHEMA_VERSION}); upgrade tagjax."
        )
    try:
        return Record(
            post_id=item["id"],
            image=item["image"],
            labels=tuple(item["labels"]),
            user=item.get("user"),
        )
    except KeyError as e:
        raise RecordError(f"record is missing field {e}") from None


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write_shard(path: Path, records: Iterable[bytes]) -> int:
    """Writes encoded records to one ArrayRecord shard atomically (temp name, then rename).

    ``group_size:1`` makes every record its own chunk, which random access (grain) needs to be fast.
    """

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    n = 0
    try:
        for data in records:
            writer.write(data)
            n += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return n


def read_shard(path: Path) -> list[bytes]:
    """All encoded records of one shard, in order (for tools and tests; training reads through grain)."""

    reader = ArrayRecordReader(str(path))
    try:
        return reader.read_all()
    finally:
        reader.close()


# How grain's ArrayRecordDataSource opens a shard for random access (one record per read, no read-ahead).
_RANDOM_ACCESS = "readahead_buffer_size:0"
_FILE_BUFFER = 32 << 10


def _count_records(path: str) -> int:
    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def first_unreadable(paths: Sequence[str]) -> str | None:
    """The first shard of ``paths`` ArrayRecord cannot open (truncated, overwritten), else None."""
    for path in paths:
        try:
            _count_records(str(path))
        except RuntimeError:
            return str(path)
    return None


class BoundedShardReader:
    """Random access by record id to a split's shards (in manifest order), with at most ``max_open``
    shard readers open.

    An open ArrayRecord reader keeps its shard's chunk index, 8 bytes per record, and a file
    descriptor. grain's ArrayRecordDataSource keeps one open for every shard it has read from, so a
    process reading at random from a large split holds them all (28 GB and 350,000 files at 3.5B
    images; docs/scaling.md, "The record reader's chunk index"). Here the least recently used reader
    is closed when a read needs another shard, which bounds memory and open files by ``max_open``
    shards; a read from a shard that is not open reopens it (its footer decoded again: ~0.3 ms of one
    core at 10^4 records per shard). Same interface as grain's source (``len``, ``__getitems__``);
    one batch is read at a time, and pickled copies (grain workers) open their own readers.
    """

    def __init__(self, paths: Sequence[str | Path], max_open: int):
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.paths = [str(p) for p in paths]
        self.max_open = int(max_open)
        # Counting opens every shard once, as grain's source does; in threads, as it is I/O on
        # network file systems.
        with concurrent.futures.ThreadPoolExecutor(max(1, min(32, len(self.paths)))) as pool:
            counts = np.asarray(list(pool.map(_count_records, self.paths)), np.int64)
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        self._readers: collections.OrderedDict[int, ArrayRecordReader] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitems__(self, ids: Sequence[int]) -> list[bytes]:
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"record ids must be in [0, {len(self)})")
        shards = np.searchsorted(self._ends, ids, side="right")
        out: list[bytes] = [b""] * len(ids)
        with self._lock:  # reads are serialized: one batch at a time, whatever the thread
            # Open shards first, so a batch that spans more shards than max_open evicts only after
            # using what is open (in ascending order, a cyclic pattern would miss on every shard).
            for shard in sorted(np.unique(shards).tolist(), key=lambda s: s not in self._readers):
                rows = np.flatnonzero(shards == shard)
                positions = (ids[rows] - self._starts[shard]).tolist()
                for row, data in zip(rows, self._reader(int(shard)).read(positions)):
                    out[row] = data
        return out

    def __getitem__(self, record_id: int) -> bytes:
        return self.__getitems__([record_id])[0]

    @property
    def open_shards(self) -> int:
        return len(self._readers)

    def _reader(self, shard: int) -> ArrayRecordReader:
        reader = self._readers.pop(shard, None)
        if reader is None:
            if len(self._readers) >= self.max_open:
                self._readers.popitem(last=False)[1].close()
            reader = ArrayRecordReader(
                self.paths[shard], _RANDOM_ACCESS, file_reader_buffer_size=_FILE_BUFFER
            )
        self._readers[shard] = reader  # the most recently used last
        return reader

    def close(self) -> None:
        with self._lock:
            while self._readers:
                self._readers.popitem()[1].close()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._readers = collections.OrderedDict()
        self._lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class LabelIndex:
    """Every record's label ids in CSR form, in the split's record order, in memory.

    For small splits (the synthetic task, tests, demos). A built dataset's index is a :class:`LabelStore`,
    which is read through memory maps or in chunks instead.
    """

    offsets: np.ndarray  # int64 [num_records + 1]
    labels: np.ndarray  # int32 [num_labels_total]

    @classmethod
    def from_lists(cls, label_lists: Sequence[Sequence[int]]) -> LabelIndex:
        offsets = np.zeros(len(label_lists) + 1, np.int64)
        offsets[1:] = np.cumsum([len(x) for x in label_lists])
        flat = [int(v) for x in label_lists for v in x]
        return cls(offsets=offsets, labels=np.asarray(flat, np.int32))

    @property
    def num_records(self) -> int:
        return len(self.offsets) - 1

    def labels_of(self, i: int) -> np.ndarray:
        return self.labels[self.offsets[i] : self.offsets[i + 1]]

    def counts(self, num_labels: int) -> np.ndarray:
        """Images per label (n_h), the quantity hashtag resampling raises to the power alpha."""
        return np.bincount(self.labels, minlength=num_labels).astype(np.int64)

    def chunks(self, records_per_chunk: int = 1 << 20) -> Iterator[LabelChunk]:
        for start in range(0, self.num_records, records_per_chunk):
            stop = min(start + records_per_chunk, self.num_records)
            offsets = self.offsets[start : stop + 1]
            yield LabelChunk(start, offsets - offsets[0], self.labels[offsets[0] : offsets[-1]])

    def save_legacy(self, path: Path) -> None:
        """Writes the pre-``LabelStore`` ``<split>.labels.npz`` format (for upgrade tests only)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, offsets=self.offsets, labels=self.labels)
        os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class LabelChunk:
    """Consecutive records ``[first, first + len(offsets) - 1)``: their labels in CSR form.

    ``offsets`` start at 0 and index into ``labels``; record ``first + i`` carries
    ``labels[offsets[i]:offsets[i + 1]]``.
    """

    first: int
    offsets: np.ndarray  # int64 [n + 1]
    labels: np.ndarray  # int32 [offsets[-1]]

    @property
    def records(self) -> np.ndarray:
        """The record id of every entry of ``labels`` (int64)."""
        n = len(self.offsets) - 1
        return np.repeat(
            np.arange(self.first, self.first + n, dtype=np.int64), np.diff(self.offsets)
        )


def npy_layout(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, byte offset of the data) of a ``.npy`` file, reading only its header."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran and len(shape) > 1:
            raise RecordError(f"{path} is Fortran-ordered; the label store writes C order")
        return np.dtype(dtype), tuple(shape), f.tell()


def open_random_access(path: Path) -> np.ndarray:
    """A ``.npy`` file memory-mapped read-only for random access.

    Readers here touch a few scattered entries at a time (a batch's records, a batch's draws): telling
    the kernel so (``MADV_RANDOM``) stops every page fault from reading ahead around it, which on a
    cold cache (a network disk, the first epoch) would read ~128 KB from disk per draw. The pages a
    process has touched count in its RSS as file pages (shared, reclaimable), not as its own memory.
    """
    array = np.load(path, mmap_mode="r")
    raw = getattr(array, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_RANDOM"):
        raw.madvise(mmap.MADV_RANDOM)
    return array


def read_npy_range(path: Path, start: int, stop: int) -> np.ndarray:
    """Elements ``[start, stop)`` of a 1-D ``.npy`` file by ordinary reads (no memory map).

    Chunked passes over the label store use this, so what they read lands in the page cache (shared,
    reclaimable) and never in the process' resident set.
    """
    dtype, shape, data_offset = npy_layout(path)
    stop = min(stop, shape[0])
    if stop <= start:
        return np.zeros(0, dtype)
    with open(path, "rb") as f:
        f.seek(data_offset + start * dtype.itemsize)
        out = np.fromfile(f, dtype, count=stop - start)
    if len(out) != stop - start:
        raise RecordError(f"{path} is truncated (wanted elements {start}..{stop})")
    return out


class NpyStreamWriter:
    """Appends 1-D chunks to a ``.npy`` file without knowing its length up front, in bounded memory.

    The data goes to ``<path>.<pid>.data.tmp`` as it comes; ``close`` writes the header to
    ``<path>.<pid>.tmp``, copies the data behind it and renames: the final file appears complete or not
    at all, and several processes upgrading the same dataset at once do not clobber each other.
    """

    def __init__(self, path: Path, dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._data_path = self.path.with_name(f"{self.path.name}.{os.getpid()}.data.tmp")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 (closed by close or abort)
        self.length = 0

    def append(self, values) -> None:
        values = np.ascontiguousarray(values, self.dtype)
        values.tofile(self._data)
        self.length += len(values)

    def close(self) -> None:
        self._data.close()
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        with open(tmp, "wb") as out, open(self._data_path, "rb") as data:
            np.lib.format.write_array_header_1_0(out, {**header, "shape": (self.length,)})
            shutil.copyfileobj(data, out, 1 << 24)
        os.replace(tmp, self.path)
        self._data_path.unlink()

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)


class LabelStoreWriter:
    """Writes a split's :class:`LabelStore` record by record, in bounded memory (``add`` in record order)."""

    _BUFFER = 1 << 16  # records buffered before a write

    def __init__(self, root: Path, split: str, num_labels: int):
        self.store = LabelStore(Path(root), split)
        self.num_labels = int(num_labels)
        self._offsets = NpyStreamWriter(self.store.offsets_path, np.int64)
        self._labels = NpyStreamWriter(self.store.labels_path, np.int32)
        self._counts = np.zeros(self.num_labels, np.int64)
        self._lengths: list[int] = []
        self._flat: list[int] = []
        self._end = 0
        self._offsets.append([0])

    def add(self, labels: Sequence[int]) -> None:
        self._lengths.append(len(labels))
        self._flat.extend(int(v) for v in labels)
        if len(self._lengths) >= self._BUFFER:
            self._flush()

    def add_chunk(self, chunk: LabelChunk) -> None:
        """Appends whole records at once (the upgrade of an old index uses this)."""
        self._flush()
        self._write(np.diff(chunk.offsets), np.asarray(chunk.labels, np.int32))

    def _flush(self) -> None:
        if self._lengths:
            self._write(np.asarray(self._lengths, np.int64), np.asarray(self._flat, np.int32))
            self._lengths, self._flat = [], []

    def _write(self, lengths: np.ndarray, flat: np.ndarray) -> None:
        if len(flat) and (flat.min() < 0 or flat.max() >= self.num_labels):
            self.abort()
            raise RecordError(f"label ids outside [0, {self.num_labels}) of the vocabulary")
        self._offsets.append(self._end + np.cumsum(lengths))
        self._end += int(lengths.sum())
        self._labels.append(flat)
        self._counts += np.bincount(flat, minlength=self.num_labels)

    def close(self) -> LabelStore:
        """Finishes the files; the counts file is written last (the store is complete once it exists)."""
        self._flush()
        self._offsets.close()
        self._labels.close()
        tmp = self.store.counts_path.with_name(f"{self.store.counts_path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, self._counts)
        os.replace(tmp, self.store.counts_path)
        return self.store

    def abort(self) -> None:
        self._offsets.abort()
        self._labels.abort()


@dataclasses.dataclass(frozen=True)
class LabelStore:
    """A split's label index on disk, readable without loading it: every record's label ids in CSR form.

    Files (all ``.npy``, written by the build next to the shards):

    * ``<split>.labels.offsets.npy`` int64 [num_records + 1]: record ``i``'s labels are
      ``ids[offsets[i]:offsets[i + 1]]`` (8 bytes per image);
    * ``<split>.labels.ids.npy`` int32 [pairs]: label ids in record order (4 bytes per label);
    * ``<split>.labels.counts.npy`` int64 [num_labels]: images per label (n_h), so nothing has to read
      the O(images) files to get the head/torso/tail buckets or the resampling weights.

    ``offsets`` and ``ids`` are opened with ``np.load(mmap_mode='r')`` or read in chunks
    (:meth:`chunks`); only ``counts`` (O(labels)) is ever loaded whole. Datasets built before the store
    existed have one ``<split>.labels.npz``; :func:`open_label_store` upgrades them once.
    """

    root: Path
    split: str

    @property
    def offsets_path(self) -> Path:
        return Path(self.root) / f"{self.split}.labels.offsets.npy"

    @property
    def labels_path(self) -> Path:
        return Path(self.root) / f"{self.split}.labels.ids.npy"

    @property
    def counts_path(self) -> Path:
        return Path(self.root) / f"{self.split}.labels.counts.npy"

    @property
    def legacy_path(self) -> Path:
        return Path(self.root) / f"{self.split}.labels.npz"

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.offsets_path, self.labels_path, self.counts_path))

    @property
    def num_records(self) -> int:
        return npy_layout(self.offsets_path)[1][0] - 1

    @property
    def num_pairs(self) -> int:
        """(image, label) pairs: the length of ``ids``."""
        return npy_layout(self.labels_path)[1][0]

    def counts(self, num_labels: int | None = None) -> np.ndarray:
        """Images per label (int64 [num_labels]); O(labels), written at build time."""
        counts = np.load(self.counts_path)
        if num_labels is not None and len(counts) != num_labels:
            raise UserError(
                f"{self.counts_path} has counts for {len(counts)} labels but the vocabulary has "
                f"{num_labels}; the dataset and its vocab.json disagree: rebuild the dataset."
            )
        return counts

    def offsets(self) -> np.ndarray:
        """Memory-mapped offsets (int64 [num_records + 1]); pages are read on access only."""
        return open_random_access(self.offsets_path)

    def labels(self) -> np.ndarray:
        """Memory-mapped label ids (int32 [pairs])."""
        return open_random_access(self.labels_path)

    def labels_of(self, i: int) -> np.ndarray:
        lo, hi = read_npy_range(self.offsets_path, i, i + 2)
        return read_npy_range(self.labels_path, int(lo), int(hi))

    def chunks(self, records_per_chunk: int = 1 << 20) -> Iterator[LabelChunk]:
        """Consecutive chunks of records, read with ordinary file reads (bounded memory, no mmap)."""
        n = self.num_records
        for start in range(0, n, records_per_chunk):
            stop = min(start + records_per_chunk, n)
            offsets = read_npy_range(self.offsets_path, start, stop + 1)
            labels = read_npy_range(self.labels_path, int(offsets[0]), int(offsets[-1]))
            yield LabelChunk(start, offsets - offsets[0], labels)

    def memory_mapped(self) -> LabelIndex:
        """The index over the memory maps: random access that reads only the pages it touches."""
        return LabelIndex(offsets=self.offsets(), labels=self.labels())

    def load(self) -> LabelIndex:
        """The whole index in memory: O(images), for small splits (demos, tests) only."""
        return LabelIndex(offsets=np.load(self.offsets_path), labels=np.load(self.labels_path))

    @classmethod
    def write(
        cls, root: Path, split: str, label_lists: Iterable[Sequence[int]], num_labels: int
    ) -> LabelStore:
        writer = LabelStoreWriter(root, split, num_labels)
        for labels in label_lists:
            writer.add(labels)
        return writer.close()


def _legacy_chunks(path: Path, records_per_chunk: int = 1 << 20) -> Iterator[LabelChunk]:
    """Chunks of an old ``<split>.labels.npz`` (np.savez, uncompressed), streamed from the zip."""
    with zipfile.ZipFile(path) as zf:

        def member(name):
            f = zf.open(name + ".npy")
            major, _ = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
            return f, np.dtype(dtype), shape[0]

        def take(f, dtype, count):
            data = f.read(count * dtype.itemsize)
            if len(data) != count * dtype.itemsize:
                raise RecordError(f"{path} is truncated")
            return np.frombuffer(data, dtype)

        off_f, off_dtype, n_off = member("offsets")
        lab_f, lab_dtype, _ = member("labels")
        with off_f, lab_f:
            previous = int(take(off_f, off_dtype, 1)[0]) if n_off else 0
            done = 1
            start = 0
            while done < n_off:
                count = min(records_per_chunk, n_off - done)
                ends = take(off_f, off_dtype, count).astype(np.int64)
                offsets = np.concatenate([[previous], ends])
                labels = take(lab_f, lab_dtype, int(ends[-1] - previous)).astype(np.int32)
                yield LabelChunk(start, offsets - previous, labels)
                previous = int(ends[-1])
                start += count
                done += count


def upgrade_label_store(root: Path, split: str, num_labels: int) -> LabelStore:
    """Converts an old ``<split>.labels.npz`` into a :class:`LabelStore` next to it, in bounded memory.

    The npz stays (older tagjax versions still read it); the new files are written atomically.
    """
    store = LabelStore(Path(root), split)
    writer = LabelStoreWriter(root, split, num_labels)
    try:
        for chunk in _legacy_chunks(store.legacy_path):
            writer.add_chunk(chunk)
    except RecordError as e:
        writer.abort()
        raise UserError(
            f"{store.legacy_path}: {e}; the dataset and its vocab.json disagree or the file is "
            "damaged: rebuild the dataset with `tagjax build`."
        ) from None
    return writer.close()


def open_label_store(root: Path, split: str, num_labels: int) -> LabelStore:
    """The split's label store, upgrading an old ``<split>.labels.npz`` once (with a one-line message).

    Raises UserError when there is neither, or when an old dataset's folder is read-only.
    """
    store = LabelStore(Path(root), split)
    if store.exists():
        return store
    if not store.legacy_path.is_file():
        raise UserError(
            f"{store.offsets_path} is missing: {root} has no label index for split {split!r}; "
            "rebuild the dataset with `tagjax build`."
        )
    if not os.access(root, os.W_OK):
        raise UserError(
            f"{root} has an old-format label index ({store.legacy_path.name}) and is read-only; "
            f"convert it once where it is writable: `tagjax build --upgrade-labels {root}`."
        )
    logging.warning(
        "upgrading %s to the memory-mapped label store (%s.labels.*.npy), once",
        store.legacy_path,
        split,
    )
    return upgrade_label_store(root, split, num_labels)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What ``dataset.json`` holds: the schema version, the shards and sizes of each split."""

    schema_version: int
    splits: dict  # split -> {"shards": [file names], "num_records": int}
    vocab_file: str = "vocab.json"
    vocab_fingerprint: str = ""
    build: dict = dataclasses.field(default_factory=dict)  # settings the build ran with

    def shard_paths(self, root: Path, split: str) -> list[Path]:
        if split not in self.splits:
            raise KeyError(f"dataset has no split {split!r} (has {sorted(self.splits)})")
        return [Path(root) / name for name in self.splits[split]["shards"]]

    def num_records(self, split: str) -> int:
        return int(self.splits[split]["num_records"])

    def save(self, root: Path) -> None:
        path = Path(root) / MANIFEST
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def load_manifest(root: Path) -> Manifest:
    """Reads ``<root>/dataset.json``; a directory without one is not a (complete) dataset."""

    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{root} is not a built tagjax dataset (no {MANIFEST}); build one with `tagjax build`, "
            "or the build that wrote it did not finish."
        )
    raw = json.loads(path.read_text())
    if raw.get("schema_version", 0) > SCHEMA_VERSION:
        raise UserError(f"{root} was written by a newer tagjax (schema v{raw['schema_version']}).")
    return Manifest(**raw)


def content_hash(root: Path) -> str:
    """One hex digest of a dataset's content: every split's records (post id, labels, stored image
    bytes) in shard order, and the vocabulary's fingerprint. Two builds hash alike exactly when they
    hold the same images, labels and splits, whatever machine, thread count or raster cache made them."""

    root = Path(root)
    manifest = load_manifest(root)
    h = hashlib.blake2b(digest_size=16, person=b"tagjax-data")
    h.update(manifest.vocab_fingerprint.encode())
    for split in sorted(manifest.splits):
        h.update(f"\x00split {split}\x00".encode())
        for path in manifest.shard_paths(root, split):
            for data in read_shard(path):
                r = decode(data)
                h.update(r.post_id.encode() + b"\x00")
                h.update(np.asarray(r.labels, np.int64).tobytes())
                h.update(len(r.image).to_bytes(8, "little") + r.image)
    return h.hexdigest()
