"""The memory-mappable label store (tagjax.records.LabelStore): round trips, chunked reads, the upgrade of
old ``labels.npz`` datasets, and that starting to train or evaluate never loads the label file whole."""

import numpy as np
import pytest

from tagjax import records
from tagjax.errors import UserError


def _lists(n, num_labels, seed=0):
    rng = np.random.default_rng(seed)
    return [
        sorted(set(rng.integers(0, num_labels, size=int(rng.integers(1, 5))).tolist()))
        for _ in range(n)
    ]


def test_store_round_trips_and_reads_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(records.LabelStoreWriter, "_BUFFER", 7)  # several flushes
    lists = _lists(101, 9)
    store = records.LabelStore.write(tmp_path, "train", lists, 9)
    assert store.exists() and store.num_records == 101
    assert store.num_pairs == sum(len(x) for x in lists)
    assert store.counts(9).tolist() == np.bincount(np.concatenate(lists), minlength=9).tolist()
    offsets, ids = store.offsets(), store.labels()
    assert isinstance(offsets, np.memmap) and isinstance(ids, np.memmap)
    assert offsets.dtype == np.int64 and ids.dtype == np.int32
    assert [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(101)] == lists
    assert store.labels_of(50).tolist() == lists[50]
    chunks = list(store.chunks(records_per_chunk=10))
    assert [c.first for c in chunks] == list(range(0, 101, 10))
    rebuilt = [
        c.labels[c.offsets[i] : c.offsets[i + 1]].tolist()
        for c in chunks
        for i in range(len(c.offsets) - 1)
    ]
    assert rebuilt == lists
    assert np.concatenate([c.records for c in chunks]).tolist() == [
        i for i, x in enumerate(lists) for _ in x
    ]
    # No temporary file is left behind; a vocabulary of another size is refused.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train.labels.counts.npy",
        "train.labels.ids.npy",
        "train.labels.offsets.npy",
    ]
    with pytest.raises(UserError, match="vocab"):
        store.counts(10)


def test_writer_refuses_label_ids_outside_the_vocabulary(tmp_path):
    with pytest.raises(records.RecordError, match="outside"):
        records.LabelStore.write(tmp_path, "train", [[0], [3]], 3)
    assert not records.LabelStore(tmp_path, "train").exists()


def test_old_labels_npz_is_upgraded_once_with_a_message(tmp_path, monkeypatch, caplog):
    lists = _lists(57, 6, seed=1)
    records.LabelIndex.from_lists(lists).save_legacy(tmp_path / "train.labels.npz")
    original = records._legacy_chunks
    monkeypatch.setattr(  # several chunks, so records straddle chunk boundaries
        records, "_legacy_chunks", lambda path: original(path, records_per_chunk=8)
    )
    with caplog.at_level("WARNING"):
        store = records.open_label_store(tmp_path, "train", 6)
    assert sum("upgrading" in r.getMessage() for r in caplog.records) == 1
    assert store.load().offsets.tolist() == records.LabelIndex.from_lists(lists).offsets.tolist()
    assert [store.labels_of(i).tolist() for i in range(57)] == lists
    assert store.counts(6).tolist() == np.bincount(np.concatenate(lists), minlength=6).tolist()
    caplog.clear()
    with caplog.at_level("WARNING"):
        records.open_label_store(tmp_path, "train", 6)  # already upgraded: no message, no rewrite
    assert not caplog.records


def test_old_dataset_in_a_read_only_folder_says_what_to_run(tmp_path, monkeypatch):
    records.LabelIndex.from_lists([[0], [1, 2]]).save_legacy(tmp_path / "train.labels.npz")
    # (chmod does not stop root, which runs these tests in some containers; ask the access check)
    monkeypatch.setattr(records.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="tagjax build --upgrade-labels"):
        records.open_label_store(tmp_path, "train", 3)
    assert not records.LabelStore(tmp_path, "train").exists()


def test_missing_label_store_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tagjax build"):
        records.open_label_store(tmp_path, "train", 3)


def test_upgrade_command_converts_every_split(tmp_path, capsys):
    from tagjax import cli
    from tagjax import vocab as vocab_lib

    vocab = vocab_lib.build_vocabulary({"dog": 5, "cat": 4, "car": 3}, mode="nouns")
    vocab.save(tmp_path / "vocab.json")
    splits = {}
    for split, lists in (("train", [[0], [1, 2], [2]]), ("heldout", [[1]])):
        records.LabelIndex.from_lists(lists).save_legacy(tmp_path / f"{split}.labels.npz")
        splits[split] = {"shards": [], "num_records": len(lists)}
    records.Manifest(records.SCHEMA_VERSION, splits, vocab_fingerprint=vocab.fingerprint()).save(
        tmp_path
    )
    assert cli.main(["build", "--upgrade-labels", str(tmp_path)]) == 0
    assert "train: 3 records" in capsys.readouterr().out
    assert records.LabelStore(tmp_path, "train").labels_of(1).tolist() == [1, 2]
    assert records.LabelStore(tmp_path, "heldout").counts(vocab.num_labels).tolist() == [0, 1, 0]
