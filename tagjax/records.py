"""The on-disk dataset format: versioned records in ArrayRecord shards, plus a manifest.

A built dataset is one directory::

    <dataset>/
      dataset.json                        manifest, written last: its presence means the build completed
      vocab.json                          the vocabulary the label ids refer to (tagjax.vocab)
      train-00000-of-00004.array_record   msgpack records, see `encode` / `decode`
      heldout-00000-of-00001.array_record
      train.label_offsets.npy             label store of the split (`LabelIndex`), for resampling:
      train.label_ids.npy                   CSR arrays, memory-mapped by every reader
      train.label_counts.json               images per label; written last, so it marks the store complete
      heldout.label_offsets.npy, heldout.label_ids.npy, heldout.label_counts.json
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

The label store holds every record's label ids as CSR arrays in record order over the split's shards,
so the input pipeline can resample by hashtag without reading images: ``offsets`` (int64 [n+1], 8 bytes
per image) and ``ids`` (int32, 4 bytes per (image, hashtag) pair), i.e. about 16 bytes per image at the
paper's ~2 hashtags per image, on disk. Both are plain ``.npy`` files opened with
``np.load(mmap_mode="r")``: nothing reads them whole, so starting a run costs no memory per image. The
counts file (one integer per label plus the totals) is what training and evaluation read to start:
the head/torso/tail buckets and the hashtag sampler's weights come from it. ``LabelStoreWriter``
appends records in bounded memory.

Datasets written before this layout have one ``<split>.labels.npz`` per split. They keep working: the
first reader converts it (streamed, bounded memory) into the files above next to it, once, and says so in
one log line; a read-only dataset gets an error naming the command that converts it
(``tagjax build --upgrade-label-store DIR``).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
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


# ---- the label store ---------------------------------------------------------------------------------

LABEL_STORE_FORMAT = 1
OFFSETS_SUFFIX = ".label_offsets.npy"
IDS_SUFFIX = ".label_ids.npy"
COUNTS_SUFFIX = ".label_counts.json"
LEGACY_SUFFIX = (
    ".labels.npz"  # the single-file label index of datasets built before the label store
)
# Records converted at once when a legacy label index is upgraded (bounds the conversion's memory).
_UPGRADE_CHUNK = 1 << 22


def label_store_files(split: str) -> tuple[str, str, str]:
    """File names of a split's label store: (offsets .npy, label ids .npy, counts .json)."""
    return split + OFFSETS_SUFFIX, split + IDS_SUFFIX, split + COUNTS_SUFFIX


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """A version 1.0 ``.npy`` header for a 1-D array. numpy pads it so its size does not depend on
    ``length``, which lets a writer reserve it first and fill in the final length at the end."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": (int(length),),
        },
    )
    return buf.getvalue()


class _NpyAppender:
    """A 1-D ``.npy`` file written by appending chunks; the header gets the final length on close."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.length = Path(path), np.dtype(dtype), 0
        self._header_size = len(_npy_header(self.dtype, 0))
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed by close()/abort()
        self._file.write(_npy_header(self.dtype, 0))

    def append(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, self.dtype).tobytes())
        self.length += len(values)

    def close(self) -> None:
        header = _npy_header(self.dtype, self.length)
        if len(header) != self._header_size:  # numpy always pads 1-D headers; fail loudly if not
            raise RuntimeError(
                f".npy header of {self.path} changed size; cannot finish it in place"
            )
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class LabelStoreWriter:
    """Writes a split's label store by appending records' label ids, in memory bounded by one chunk.

    ``num_labels`` (the vocabulary size) fixes the counts' length; ``None`` (converting an old dataset,
    whose vocabulary size the label index does not record) uses the largest id seen + 1, which readers
    pad. Files appear under their final names only in ``close``, the counts file last.
    """

    def __init__(self, root: Path, split: str, num_labels: int | None):
        self.root, self.split = Path(root), split
        self.num_labels = None if num_labels is None else int(num_labels)
        self.counts = np.zeros(self.num_labels or 0, np.int64)
        self.num_records = 0
        tag = f".tmp{os.getpid()}"
        offsets_name, ids_name, _ = label_store_files(split)
        self._offsets = _NpyAppender(self.root / (offsets_name + tag), np.int64)
        self._ids = _NpyAppender(self.root / (ids_name + tag), np.int32)
        self._offsets.append(np.zeros(1, np.int64))

    @property
    def num_pairs(self) -> int:
        return self._ids.length

    def append_csr(self, lengths: np.ndarray, ids: np.ndarray) -> None:
        """Appends ``len(lengths)`` records whose ids are ``ids`` (concatenated in record order)."""
        lengths = np.asarray(lengths, np.int64)
        ids = np.asarray(ids, np.int64)
        if int(lengths.sum()) != len(ids):
            raise ValueError(f"{int(lengths.sum())} label ids announced, {len(ids)} given")
        if len(ids):
            low, high = int(ids.min()), int(ids.max())
            limit = self.num_labels if self.num_labels is not None else 1 << 31
            if low < 0 or high >= limit:
                raise RecordError(f"label id {low if low < 0 else high} is outside [0, {limit})")
            chunk_counts = np.bincount(ids, minlength=len(self.counts))
            if len(chunk_counts) > len(self.counts):
                self.counts = np.pad(self.counts, (0, len(chunk_counts) - len(self.counts)))
            self.counts += chunk_counts
        self._offsets.append(self._ids.length + np.cumsum(lengths))
        self._ids.append(ids)
        self.num_records += len(lengths)

    def append(self, label_lists: Sequence[Sequence[int]]) -> None:
        self.append_csr(
            np.fromiter((len(x) for x in label_lists), np.int64, len(label_lists)),
            np.fromiter((int(v) for x in label_lists for v in x), np.int64),
        )

    def close(self) -> None:
        """Publishes the store: both arrays renamed into place, then the counts file."""
        for appender in (self._offsets, self._ids):
            appender.close()
            os.replace(
                appender.path, appender.path.with_name(appender.path.name.rsplit(".tmp", 1)[0])
            )
        counts_path = self.root / label_store_files(self.split)[2]
        meta = {
            "format": LABEL_STORE_FORMAT,
            "num_records": self.num_records,
            "num_pairs": self.num_pairs,
            "counts": self.counts.tolist(),
        }
        tmp = counts_path.with_name(counts_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, separators=(",", ":")) + "\n")
        os.replace(tmp, counts_path)

    def abort(self) -> None:
        self._offsets.abort()
        self._ids.abort()

    def __enter__(self) -> LabelStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclasses.dataclass(frozen=True)
class LabelIndex:
    """Every record's label ids in CSR form, in the split's record order.

    Opened from a dataset (``open``), both arrays are read-only memory maps: slicing reads only the
    pages it touches. Built from lists (``from_lists``), they are ordinary arrays.
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
        """Images per label (n_h), the quantity hashtag resampling raises to the power alpha.

        Computed from the arrays (O(pairs) time); for a dataset on disk :func:`label_counts` reads the
        counts the build stored instead."""
        return np.bincount(self.labels, minlength=num_labels).astype(np.int64)

    def save(self, root: Path, split: str, num_labels: int | None = None) -> None:
        """Writes this index as the label store of ``split`` in ``root``."""
        with LabelStoreWriter(root, split, num_labels) as writer:
            writer.append_csr(np.diff(self.offsets), self.labels)

    @classmethod
    def open(cls, root: Path, split: str) -> LabelIndex:
        """The label store of ``split``, memory-mapped (an old ``.labels.npz`` is upgraded first)."""
        ensure_label_store(root, split)
        offsets_name, ids_name, _ = label_store_files(split)
        return cls(
            offsets=np.load(Path(root) / offsets_name, mmap_mode="r"),
            labels=np.load(Path(root) / ids_name, mmap_mode="r"),
        )


def label_store_paths(root: Path, split: str) -> tuple[Path, Path, Path]:
    return tuple(Path(root) / name for name in label_store_files(split))  # type: ignore[return-value]


def has_label_store(root: Path, split: str) -> bool:
    """Whether ``split`` has a label store in either format (the current one or a ``.labels.npz``)."""
    return (
        label_store_paths(root, split)[2].is_file()
        or (Path(root) / (split + LEGACY_SUFFIX)).is_file()
    )


def label_store_meta(root: Path, split: str) -> dict:
    """The counts file of ``split``: ``num_records``, ``num_pairs`` and per-label ``counts``."""
    ensure_label_store(root, split)
    path = label_store_paths(root, split)[2]
    meta = json.loads(path.read_text())
    if meta.get("format", 0) > LABEL_STORE_FORMAT:
        raise UserError(f"{path} was written by a newer tagjax (label store v{meta['format']}).")
    return meta


def label_counts(root: Path, split: str, num_labels: int) -> np.ndarray:
    """Images per label of ``split`` from its counts file (O(labels) to read), length ``num_labels``."""
    counts = np.asarray(label_store_meta(root, split)["counts"], np.int64)
    if len(counts) > num_labels:
        raise UserError(
            f"the label store of {root} ({split}) holds label ids beyond the vocabulary's {num_labels} "
            "labels; the dataset and its vocab.json disagree: rebuild the dataset with `tagjax build`."
        )
    return np.pad(counts, (0, num_labels - len(counts)))


def ensure_label_store(root: Path, split: str) -> bool:
    """Makes sure ``split`` has a current label store; converts a ``.labels.npz`` next to it once.

    Returns True when it converted one. Raises UserError when neither format is there, or when the
    dataset folder cannot be written.
    """
    root = Path(root)
    if label_store_paths(root, split)[2].is_file():
        return False
    legacy = root / (split + LEGACY_SUFFIX)
    if not legacy.is_file():
        raise UserError(
            f"{root} has no label store for split {split!r} ({label_store_files(split)[2]}); "
            "rebuild the dataset with `tagjax build`."
        )
    try:
        upgrade_legacy_label_index(legacy, root, split)
    except PermissionError as e:
        raise UserError(
            f"{legacy} is a label index in the old format and {root} cannot be written ({e.strerror}); "
            f"convert it once as a user who can write there: tagjax build --upgrade-label-store {root}"
        ) from None
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES):
            raise UserError(
                f"{legacy} is a label index in the old format and {root} is read-only; convert it once "
                f"where it can be written: tagjax build --upgrade-label-store {root}"
            ) from None
        raise
    logging.warning(
        "converted %s to the memory-mapped label store (%s); the old file can be deleted",
        legacy,
        ", ".join(label_store_files(split)),
    )
    return True


def upgrade_dataset_label_stores(root: Path) -> list[str]:
    """Converts every split of the dataset at ``root`` to the current label store; returns the splits
    converted (``tagjax build --upgrade-label-store``)."""
    manifest = load_manifest(root)
    return [split for split in manifest.splits if ensure_label_store(root, split)]


def _npz_member(archive: zipfile.ZipFile, name: str):
    """(file object positioned at the data, dtype, length) of a 1-D array inside an ``.npz``."""
    f = archive.open(name + ".npy")
    version = np.lib.format.read_magic(f)
    shape, _fortran_order, dtype = (
        np.lib.format.read_array_header_1_0(f)
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0(f)
    )
    if len(shape) != 1 or dtype.hasobject:
        raise UserError(
            f"{name} in the label index is not a 1-D numeric array; rebuild the dataset."
        )
    return f, dtype, shape[0]


def _read_exactly(f, dtype: np.dtype, count: int) -> np.ndarray:
    data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise UserError("the label index is truncated; rebuild the dataset with `tagjax build`.")
    return np.frombuffer(data, dtype)


def upgrade_legacy_label_index(legacy: Path, root: Path, split: str) -> None:
    """Streams ``<split>.labels.npz`` into the label store, ``_UPGRADE_CHUNK`` records at a time."""
    with zipfile.ZipFile(legacy) as archive:
        offsets_f, offsets_dtype, n_offsets = _npz_member(archive, "offsets")
        ids_f, ids_dtype, n_ids = _npz_member(archive, "labels")
        with offsets_f, ids_f, LabelStoreWriter(root, split, None) as writer:
            previous = int(_read_exactly(offsets_f, offsets_dtype, 1)[0])
            done = 0
            while done < n_offsets - 1:
                ends = _read_exactly(
                    offsets_f, offsets_dtype, min(_UPGRADE_CHUNK, n_offsets - 1 - done)
                )
                lengths = np.diff(np.concatenate([[previous], ends.astype(np.int64)]))
                ids = _read_exactly(ids_f, ids_dtype, int(lengths.sum()))
                writer.append_csr(lengths, ids)
                previous = int(ends[-1])
                done += len(ends)
            if writer.num_pairs != n_ids:
                raise UserError(
                    f"{legacy} is inconsistent (offsets and labels disagree); rebuild it."
                )


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
