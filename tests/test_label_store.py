"""The memory-mapped label store (tagjax.records): round trips, the legacy upgrade, bounded memory."""

import errno
import tracemalloc

import numpy as np
import pytest

from tagjax import cli, records, sampling
from tagjax.errors import UserError

NUM_LABELS = 50


def _zipf_store(n: int, seed: int = 0, num_labels: int = NUM_LABELS):
    """``n`` images with 1-3 Zipf-distributed label ids each, as CSR (lengths, ids)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 4, size=n)
    p = 1.0 / np.arange(1, num_labels + 1)
    ids = rng.choice(num_labels, size=int(lengths.sum()), p=p / p.sum()).astype(np.int32)
    return lengths, ids


def _lists(lengths, ids):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(lengths))]


def test_chunked_writer_round_trips_as_memory_maps_with_counts(tmp_path):
    lengths, ids = _zipf_store(1000)
    with records.LabelStoreWriter(tmp_path, "train", NUM_LABELS) as writer:
        for a in range(0, 1000, 300):  # chunks that split nothing but records
            first, last = int(lengths[:a].sum()), int(lengths[: a + 300].sum())
            writer.append_csr(lengths[a : a + 300], ids[first:last])
    index = records.LabelIndex.open(tmp_path, "train")
    assert isinstance(index.offsets, np.memmap) and isinstance(index.labels, np.memmap)
    assert index.num_records == 1000
    assert [index.labels_of(i).tolist() for i in range(1000)] == _lists(lengths, ids)
    meta = records.label_store_meta(tmp_path, "train")
    assert meta["num_records"] == 1000 and meta["num_pairs"] == len(ids)
    expected = np.bincount(ids, minlength=NUM_LABELS)
    assert records.label_counts(tmp_path, "train", NUM_LABELS).tolist() == expected.tolist()
    # No temporary file is left behind; the counts file is what marks the store complete.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(records.label_store_files("train"))


def test_a_failed_write_publishes_nothing(tmp_path):
    with (
        pytest.raises(records.RecordError, match="outside"),
        records.LabelStoreWriter(tmp_path, "train", 3) as writer,
    ):
        writer.append([[0, 1], [2]])
        writer.append([[7]])
    assert list(tmp_path.iterdir()) == []
    assert not records.has_label_store(tmp_path, "train")
    with pytest.raises(UserError, match="rebuild the dataset"):
        records.LabelIndex.open(tmp_path, "train")


def test_old_labels_npz_is_converted_once_with_a_message(tmp_path, monkeypatch):
    lengths, ids = _zipf_store(700, seed=3)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.savez(tmp_path / "train.labels.npz", offsets=offsets, labels=ids)
    monkeypatch.setattr(records, "_UPGRADE_CHUNK", 64)  # many chunks
    messages = []
    monkeypatch.setattr(records.logging, "warning", lambda msg, *a: messages.append(msg % a))
    assert records.has_label_store(tmp_path, "train")
    # Counts of an old dataset come out at the vocabulary's length (the npz does not record it).
    counts = records.label_counts(tmp_path, "train", NUM_LABELS + 5)
    assert counts.tolist() == np.bincount(ids, minlength=NUM_LABELS + 5).tolist()
    assert len(messages) == 1 and "train.labels.npz" in messages[0]
    index = records.LabelIndex.open(tmp_path, "train")
    assert len(messages) == 1  # converted once
    assert index.offsets.tolist() == offsets.tolist() and index.labels.tolist() == ids.tolist()


def test_old_labels_npz_in_a_read_only_dataset_names_the_command(tmp_path, monkeypatch):
    np.savez(tmp_path / "train.labels.npz", offsets=np.asarray([0, 1]), labels=np.asarray([0]))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(records, "LabelStoreWriter", read_only)
    with pytest.raises(UserError, match="tagjax build --upgrade-label-store"):
        records.label_counts(tmp_path, "train", 4)


def test_upgrade_command_converts_every_split(tmp_path, capsys):
    for split in records.SPLITS:
        np.savez(
            tmp_path / f"{split}.labels.npz", offsets=np.asarray([0, 2]), labels=np.asarray([1, 3])
        )
    splits = {s: {"shards": [], "num_records": 1} for s in records.SPLITS}
    records.Manifest(records.SCHEMA_VERSION, splits).save(tmp_path)
    assert cli.main(["build", "--upgrade-label-store", str(tmp_path)]) == 0
    assert "converted heldout, train" in capsys.readouterr().out
    for split in records.SPLITS:
        assert records.label_store_paths(tmp_path, split)[2].is_file()
    assert cli.main(["build", "--upgrade-label-store", str(tmp_path)]) == 0
    assert "already has the current label store" in capsys.readouterr().out


def test_inverted_index_written_by_runs_equals_the_in_memory_one(tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "_INVERT_CHUNK_PAIRS", 100)
    lengths, ids = _zipf_store(2000, seed=5)
    index = records.LabelIndex.from_lists(_lists(lengths, ids))
    index.save(tmp_path, "train", NUM_LABELS)
    built = sampling.InvertedIndex.load_or_build(tmp_path, "train", NUM_LABELS, tmp_path / "c")
    memory = sampling.InvertedIndex.in_memory(index, NUM_LABELS)
    assert np.array_equal(np.asarray(built.images), memory.images)
    assert built.counts.tolist() == memory.counts.tolist()


def test_counts_that_disagree_with_the_ids_are_refused(tmp_path):
    records.LabelIndex.from_lists([[0], [1], [1]]).save(tmp_path, "train", 2)
    path = records.label_store_paths(tmp_path, "train")[2]
    path.write_text(path.read_text().replace('"counts":[1,2]', '"counts":[2,1]'))
    with pytest.raises(UserError, match="disagrees"):
        sampling.InvertedIndex.load_or_build(tmp_path, "train", 2, tmp_path / "cache")


def test_starting_on_a_million_image_store_allocates_no_memory_per_image(tmp_path, monkeypatch):
    """Counts, building the sampler's index and reopening it allocate far less than the label data
    (16 MB here): label arrays are only ever memory-mapped, and the index is built chunk by chunk."""
    n = 1_000_000
    lengths, ids = _zipf_store(n, seed=7, num_labels=1500)
    with records.LabelStoreWriter(tmp_path, "train", 1500) as writer:
        writer.append_csr(lengths, ids)
    label_bytes = sum(p.stat().st_size for p in records.label_store_paths(tmp_path, "train"))
    del lengths, ids
    monkeypatch.setattr(sampling, "_INVERT_CHUNK_PAIRS", 1 << 16)
    loads = []
    real_load = np.load
    monkeypatch.setattr(
        np,
        "load",
        lambda path, *a, **kw: loads.append(kw.get("mmap_mode")) or real_load(path, *a, **kw),
    )
    tracemalloc.start()
    counts = records.label_counts(tmp_path, "train", 1500)
    inverted = sampling.InvertedIndex.load_or_build(tmp_path, "train", 1500, tmp_path / "cache")
    sampler = sampling.make_sampler("sqrt", 0, inverted.num_records, inverted)
    drawn = sampler.sample(np.arange(4096))
    _, build_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    again = sampling.InvertedIndex.load_or_build(tmp_path, "train", 1500, tmp_path / "cache")
    sampling.make_sampler("sqrt", 0, again.num_records, again).sample(np.arange(4096))
    _, start_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert loads and set(loads) == {"r"}  # every .npy opened was memory-mapped
    assert counts.sum() == len(again.images) and drawn.record.max() < n
    assert build_peak < label_bytes / 4, (build_peak, label_bytes)
    assert start_peak < label_bytes / 16, (start_peak, label_bytes)
