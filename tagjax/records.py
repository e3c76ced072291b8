"""The on-disk dataset format: versioned records in ArrayRecord shards, plus a manifest.

A built dataset is one directory::

    <dataset>/
      dataset.json                        manifest, written last: its presence means the build completed
      vocab.json                          the vocabulary the label ids refer to (tagjax.vocab)
      train-00000-of-00004.array_record   msgpack records, see `encode` / `decode`
      heldout-00000-of-00001.array_record
      train.labels.npz                    label index of the split (`LabelIndex`), for resampling
      heldout.labels.npz
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

The label index stores every record's label ids as CSR arrays (``offsets`` int64 [n+1], ``labels``
int32 [nnz]) in record order over the split's shards, so the input pipeline can resample by hashtag
without reading images: 8 bytes per image plus 4 bytes per label (about 20 bytes per image at the
paper's ~3 labels per image).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgpack
import numpy as np
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


@dataclasses.dataclass(frozen=True)
class LabelIndex:
    """Every record's label ids in CSR form, in the split's record order."""

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

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, offsets=self.offsets, labels=self.labels)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> LabelIndex:
        with np.load(path) as f:
            return cls(offsets=f["offsets"], labels=f["labels"])


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
