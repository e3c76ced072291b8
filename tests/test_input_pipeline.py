"""The grain input pipeline (tagjax.input_pipeline): batches, hosts, resume, bad records, synthetic task.

Datasets here are written with tagjax.records like `tagjax build` writes them. Record ``i`` holds a flat
gray JPEG of value ``4 i + 2``, so any crop of it still tells which record a batch row came from.
"""

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import simplejpeg

from tagjax import augment, input_pipeline, records, sampling, sharding
from tagjax import vocab as vocab_lib
from tagjax.configs import default
from tagjax.errors import UserError

NOUNS = ["dog", "cat", "goldenretriever", "car", "tree", "house", "bird", "flower", "boat", "horse"]
DOG, GOLDEN = 0, 2


def _jpeg(value: int, h: int, w: int) -> bytes:
    return simplejpeg.encode_jpeg(np.full((h, w, 3), value, np.uint8), quality=95, colorspace="RGB")


def _labels_of(i: int) -> list[int]:
    """Zipf-ish: label 0 on half of the records, the others rarer; record 5 has dog + golden retriever."""
    if i == 5:
        return [DOG, GOLDEN]
    return sorted({0 if i % 2 == 0 else 1 + (i % 9), 1 + (i % 7)})


def _write_split(root, split, n, shards, bad=None):
    bad = bad or {}
    encoded, lists = [], []
    for i in range(n):
        h, w = (40, 56) if i % 2 else (56, 40)
        labels = _labels_of(i)
        if bad.get(i) == "image":
            encoded.append(
                records.encode(records.Record(f"{split}{i}", b"\xff\xd8 not a jpeg", tuple(labels)))
            )
        elif (
            bad.get(i) == "labels"
        ):  # what an older or foreign writer could leave: no labels at all
            item = {"v": 1, "id": f"{split}{i}", "image": _jpeg(4 * i + 2, h, w), "labels": []}
            encoded.append(msgpack.packb(item, use_bin_type=True))
            labels = []
        else:
            encoded.append(
                records.encode(records.Record(f"{split}{i}", _jpeg(4 * i + 2, h, w), tuple(labels)))
            )
        lists.append(labels)
    names = []
    per = -(-n // shards)
    for s in range(shards):
        names.append(records.shard_name(split, s, shards))
        records.write_shard(root / names[-1], encoded[s * per : (s + 1) * per])
    records.LabelStore.write(root, split, lists, len(NOUNS))
    return {"shards": names, "num_records": n}


def _write_dataset(root, n_train=48, n_heldout=20, bad=None):
    root.mkdir(parents=True, exist_ok=True)
    vocab = vocab_lib.build_vocabulary({t: 100 - i for i, t in enumerate(NOUNS)}, mode="nouns")
    assert [vocab.name_of(i) for i in range(vocab.num_labels)] == NOUNS
    assert vocab.is_ancestor(DOG, GOLDEN)
    vocab.save(root / "vocab.json")
    splits = {
        "train": _write_split(root, "train", n_train, 2, bad),
        "heldout": _write_split(root, "heldout", n_heldout, 1),
    }
    records.Manifest(records.SCHEMA_VERSION, splits, vocab_fingerprint=vocab.fingerprint()).save(
        root
    )
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """64 records: record 5 has an undecodable image, record 9 has no labels."""
    return _write_dataset(tmp_path_factory.mktemp("bad"), n_train=64, bad={5: "image", 9: "labels"})


def _config(dataset_dir, **data):
    c = default.get_config()
    c.data.dataset = str(dataset_dir)
    c.data.image_size = 32
    c.data.eval_resize = 36
    c.data.eval_image_size = 32
    c.data.max_labels = 4
    c.data.sampling = "images"
    c.data.bad_record_min_reads = 1
    c.data.max_bad_record_fraction = 0.5
    c.train.batch_size = 8
    c.train.eval_max_images = 0
    for k, v in data.items():
        if k in ("batch_size", "eval_max_images"):
            c.train[k] = v
        else:
            c.data[k] = v
    return c


def _ids(batch):
    """Record id of each row, read back from the flat gray value."""
    return np.rint((batch["image"].reshape(len(batch["image"]), -1).mean(1) - 2) / 4).astype(int)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_batch_format_and_labels(dataset):
    it = input_pipeline.make_train_iterator(_config(dataset), process_index=0, process_count=1)
    batch = next(it)
    assert set(batch) == {"image", "labels", "num_labels"}
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 32, 32, 3)
    assert batch["labels"].dtype == np.int32 and batch["labels"].shape == (8, 4)
    assert batch["num_labels"].dtype == np.int32 and batch["num_labels"].shape == (8,)
    for row, i in enumerate(_ids(batch)):
        k = batch["num_labels"][row]
        assert batch["labels"][row, :k].tolist() == _labels_of(i)
        assert (batch["labels"][row, k:] == -1).all()
    assert it.records_read == 8 and it.bad_records == 0


def test_images_mode_two_hosts_read_every_image_once_per_epoch(dataset):
    cfg = _config(dataset, sampling="images")
    hosts = [
        input_pipeline.make_train_iterator(cfg, process_index=h, process_count=2) for h in (0, 1)
    ]
    epochs = []
    for _ in range(2):  # 48 images, global batch 8: 6 steps per epoch, 4 rows per host
        ids = np.concatenate([_ids(b) for _ in range(6) for b in (next(hosts[0]), next(hosts[1]))])
        assert sorted(ids) == list(range(48))
        epochs.append(ids)
    assert (epochs[0] != epochs[1]).mean() > 0.5


def test_eval_two_hosts_cover_every_image_once_and_run_the_same_steps(dataset):
    cfg = _config(dataset)
    seen, steps = [], []
    for h in (0, 1):
        it = input_pipeline.make_eval_iterator(cfg, process_index=h, process_count=2)
        batches = list(it)
        steps.append(len(batches))
        assert len(it) == len(batches) == 3  # ceil(20 / 8)
        for b in batches:
            assert b["image"].shape == (4, 32, 32, 3) and b["mask"].dtype == np.bool_
            seen += _ids(b)[b["mask"]].tolist()
            assert (b["num_labels"][~b["mask"]] == 0).all() and (
                b["labels"][~b["mask"]] == -1
            ).all()
            for row in np.nonzero(b["mask"])[0]:
                i = _ids(b)[row]
                assert b["labels"][row, : b["num_labels"][row]].tolist() == _labels_of(i)
    assert sorted(seen) == list(range(20))
    # Fixed order: a second pass is identical.
    again = [
        _ids(b) for b in input_pipeline.make_eval_iterator(cfg, process_index=0, process_count=2)
    ]
    first = [
        _ids(b) for b in input_pipeline.make_eval_iterator(cfg, process_index=0, process_count=2)
    ]
    assert all(np.array_equal(a, b) for a, b in zip(again, first))


def test_eval_max_images_limits_the_pass(dataset):
    it = input_pipeline.make_eval_iterator(
        _config(dataset), max_images=10, process_index=0, process_count=1
    )
    masks = [b["mask"] for b in it]
    assert len(masks) == 2 and sum(m.sum() for m in masks) == 10


def test_resampled_streams_differ_per_host_and_are_deterministic(dataset):
    cfg = _config(dataset, sampling="sqrt")
    a0 = _take(input_pipeline.make_train_iterator(cfg, process_index=0, process_count=2), 3)
    a1 = _take(input_pipeline.make_train_iterator(cfg, process_index=1, process_count=2), 3)
    b0 = _take(input_pipeline.make_train_iterator(cfg, process_index=0, process_count=2), 3)
    assert _same(a0, b0)
    assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a0, a1))
    cfg.seed = 1
    c0 = _take(input_pipeline.make_train_iterator(cfg, process_index=0, process_count=2), 3)
    assert not _same(a0, c0)


# The start of a script run in a new process: config ``c`` from the JSON in argv[1] (its "data" fields).
_SCRIPT_CONFIG = """
import json, sys
import numpy as np
from tagjax.configs import default
from tagjax import config as config_lib, input_pipeline
config_lib.ensure_absl_flags_parsed()
args = json.loads(sys.argv[1])
c = default.get_config()
for k, v in args["data"].items():
    c.data[k] = v
"""

_RESUME = (
    _SCRIPT_CONFIG
    + """
c.train.batch_size = args["batch_size"]
it = input_pipeline.make_train_iterator(c, process_index=0, process_count=1)
it.set_state(json.loads(open(args["state"]).read()))
out = {}
for n in range(2):
    for k, v in next(it).items():
        out[f"{n}/{k}"] = v
it.close()
np.savez(args["out"], **out)
"""
)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_yields_the_same_batches(dataset, tmp_path, repo_root, workers):
    data = {
        "dataset": str(dataset),
        "image_size": 32,
        "eval_resize": 36,
        "eval_image_size": 32,
        "max_labels": 4,
        "sampling": "sqrt",
        "num_workers": workers,
        "color_jitter": 0.3,
    }
    cfg = _config(dataset, **data)
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    it.close()
    (tmp_path / "state.json").write_text(json.dumps(state))
    args = {
        "data": data,
        "batch_size": 8,
        "state": str(tmp_path / "state.json"),
        "out": str(tmp_path / "o.npz"),
    }
    subprocess.run(
        [sys.executable, "-c", _RESUME, json.dumps(args)],
        cwd=repo_root,
        check=True,
        timeout=300,
        env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    with np.load(tmp_path / "o.npz") as got:
        for n, batch in enumerate(expected):
            for k, v in batch.items():
                np.testing.assert_array_equal(got[f"{n}/{k}"], v)


def test_resume_remaps_worker_count_and_host_count_exactly(dataset):
    cfg = _config(dataset, sampling="uniform")
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 2)
    # Another worker count: each batch is computed whole by one worker from its index.
    one_worker = input_pipeline.make_train_iterator(
        _config(dataset, sampling="uniform", num_workers=1), process_index=0, process_count=1
    )
    one_worker.set_state(state)
    assert _same(_take(one_worker, 2), expected)
    one_worker.close()
    # Two hosts, same global batch: host rows concatenate to the same global batches.
    hosts = [
        input_pipeline.make_train_iterator(cfg, process_index=h, process_count=2) for h in (0, 1)
    ]
    for h in hosts:
        h.set_state(state)
    for want in expected:
        parts = [next(h) for h in hosts]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])
    assert hosts[0].get_state()["next_position"] == state["next_position"] + 16


def test_state_of_another_stream_is_refused(dataset):
    state = input_pipeline.make_train_iterator(
        _config(dataset), process_index=0, process_count=1
    ).get_state()
    for change in ({"sampling": "sqrt"}, {"train_split": "heldout"}):
        other = input_pipeline.make_train_iterator(
            _config(dataset, **change), process_index=0, process_count=1
        )
        with pytest.raises(UserError, match="another data stream"):
            other.set_state(state)
    other = input_pipeline.make_train_iterator(_config(dataset), process_index=0, process_count=1)
    with pytest.raises(UserError, match="not written by"):
        other.set_state({"next_index": 3})


def test_corrupt_records_are_skipped_and_counted(bad_dataset):
    it = input_pipeline.make_train_iterator(_config(bad_dataset), process_index=0, process_count=1)
    ids = np.concatenate([_ids(next(it)) for _ in range(8)])  # one epoch of 64 positions
    assert len(ids) == 64 and not {5, 9} & set(ids.tolist())
    assert it.bad_records >= 2 and it.records_read == 64 + it.bad_records
    ev = input_pipeline.make_eval_iterator(
        _config(bad_dataset), split="train", process_index=0, process_count=1
    )
    batches = list(ev)
    masked = np.concatenate([_ids(b)[b["mask"]] for b in batches])
    assert sorted(masked) == sorted(set(range(64)) - {5, 9}) and ev.bad_records == 2


def test_too_many_bad_records_fail_loudly(bad_dataset):
    cfg = _config(bad_dataset, max_bad_record_fraction=0.01, bad_record_min_reads=32)
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    with pytest.raises(UserError, match="max_bad_record_fraction"):
        _take(it, 8)
    ev = input_pipeline.make_eval_iterator(cfg, split="train", process_index=0, process_count=1)
    with pytest.raises(UserError, match="bad"):
        list(ev)
    cfg = _config(bad_dataset, max_redraws=0)
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    with pytest.raises(UserError, match="in a row"):
        _take(it, 8)


def test_label_noise_replaces_labels_at_the_configured_rate(dataset):
    cfg = _config(dataset, label_noise=0.4, max_labels=8, batch_size=48)
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    seen = {}  # the noise is a fixed function of (seed, record id): every view of a record agrees
    for _ in range(10):
        b = next(it)
        for row, i in enumerate(_ids(b)):
            got = set(b["labels"][row, : b["num_labels"][row]].tolist())
            assert seen.setdefault(i, got) == got
    changed = sum(len(set(_labels_of(i)) - got) for i, got in seen.items())
    total = sum(len(_labels_of(i)) for i in seen)
    # A replaced label is never redrawn as itself; ~90 labels: the rate within 3 standard deviations.
    assert total > 60 and 0.4 - 0.16 < changed / total < 0.4 + 0.16
    clean = input_pipeline.make_train_iterator(
        _config(dataset, batch_size=48), process_index=0, process_count=1
    )
    b = next(clean)
    assert all(
        b["labels"][r, : b["num_labels"][r]].tolist() == _labels_of(i)
        for r, i in enumerate(_ids(b))
    )


def test_drop_ancestors_keeps_the_specific_hashtag(dataset):
    def labels_of_5(**kw):
        ev = input_pipeline.make_eval_iterator(
            _config(dataset, **kw), split="train", process_index=0, process_count=1
        )
        b = next(ev)
        row = list(_ids(b)).index(5)
        return b["labels"][row, : b["num_labels"][row]].tolist()

    assert labels_of_5() == [DOG, GOLDEN]
    assert labels_of_5(drop_ancestors=True) == [GOLDEN]


def test_long_label_lists_keep_the_drawn_hashtag():
    opts = input_pipeline.LabelOptions(max_labels=2, seed=0)
    labels = np.arange(6)
    for pos in range(50):
        got = opts.targets(labels, drawn=3, position=pos, train=True)
        assert len(got) == 2 and 3 in got and np.array_equal(got, np.sort(got))
        assert np.array_equal(got, opts.targets(labels, drawn=3, position=pos, train=True))


def test_inverted_index_is_cached_next_to_the_dataset(dataset):
    input_pipeline.make_train_iterator(
        _config(dataset, sampling="natural"), process_index=0, process_count=1
    )
    assert len(list(dataset.glob("train.inverted-*.npy"))) == 1


def test_bad_config_values_are_user_errors(dataset):
    for kw in (
        {"sampling": "zipf"},
        {"label_noise": 1.5},
        {"batch_size": 9},
        {"max_open_shards": -1},
    ):
        with pytest.raises(UserError):
            input_pipeline.make_train_iterator(
                _config(dataset, **kw), process_index=0, process_count=2
            )
    with pytest.raises(UserError, match="no dataset"):
        input_pipeline.make_train_iterator(_config(""), process_index=0, process_count=1)


def _open_shard_files() -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if fd.resolve().suffix == ".array_record")


def test_bounded_shard_reader_reads_every_record_with_at_most_n_shards_open(tmp_path):
    """records.BoundedShardReader (config.data.max_open_shards) returns what the shards hold, in the
    order asked, and never keeps more than its bound of shards (readers, files) open."""
    names = _write_split(tmp_path, "train", 50, 5)["shards"]
    paths = [tmp_path / n for n in names]
    everything = [r for path in paths for r in records.read_shard(path)]
    before = _open_shard_files()
    reader = records.BoundedShardReader(paths, max_open=2)
    assert len(reader) == 50
    ids = np.random.default_rng(0).integers(0, 50, 200)
    for batch in np.split(ids, 25):
        assert reader.__getitems__(batch.tolist()) == [everything[i] for i in batch]
        assert reader.open_shards <= 2
        assert _open_shard_files() - before <= 2
    assert reader[49] == everything[49]
    copy = pickle.loads(pickle.dumps(reader))  # as grain workers receive it: no reader open yet
    assert copy.open_shards == 0 and copy.__getitems__([3, 47, 3]) == [
        everything[i] for i in (3, 47, 3)
    ]
    with pytest.raises(IndexError):
        reader.__getitems__([50])
    reader.close()
    copy.close()
    assert _open_shard_files() == before


def test_max_open_shards_gives_the_same_batches(dataset, monkeypatch):
    """Bounding the open shards changes how records are read, never which records a batch holds."""
    reads = []

    class Spy(records.BoundedShardReader):
        def __getitems__(self, ids):
            out = super().__getitems__(ids)
            reads.append((self.max_open, self.open_shards))
            return out

    monkeypatch.setattr(records, "BoundedShardReader", Spy)
    batches = {}
    for bound in (0, 1):
        cfg = _config(dataset, sampling="sqrt", max_open_shards=bound)
        train = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
        evaluation = input_pipeline.make_eval_iterator(cfg, process_index=0, process_count=1)
        batches[bound] = _take(train, 4) + list(evaluation)
    assert len(batches[1]) == 4 + 3  # 20 held-out images in batches of 8
    assert _same(batches[0], batches[1])
    assert reads and all(bound == 1 and open_now <= 1 for bound, open_now in reads)


def test_synthetic_task_is_deterministic_and_learnable():
    c = _config(
        "",
        synthetic=True,
        synthetic_num_images=1536,
        synthetic_num_labels=8,
        batch_size=512,
        image_size=32,
        eval_resize=36,
        crop_area_range=(0.5, 1.0),
        sampling="images",
    )
    it = input_pipeline.make_train_iterator(c, process_index=0, process_count=1)
    batches = _take(it, 3)
    assert _same(
        batches, _take(input_pipeline.make_train_iterator(c, process_index=0, process_count=1), 3)
    )
    counts = np.concatenate([b["num_labels"] for b in batches])
    assert counts.min() == 1 and counts.max() == 3

    # Learnable: a linear least-squares probe on color statistics (the fraction of pixels near each
    # palette color, which ignores where the shapes are) predicts every label far above chance.
    palette = np.asarray(input_pipeline._COLORS, np.float32)

    def features(b):
        px = b["image"].reshape(len(b["image"]), -1, 1, 3).astype(np.float32)
        near = (np.abs(px - palette).max(-1) < 40).mean(1)
        return np.concatenate([near, np.ones((len(near), 1))], 1)

    def targets(b):
        y = np.zeros((len(b["labels"]), 8))
        for r, (lab, k) in enumerate(zip(b["labels"], b["num_labels"])):
            y[r, lab[:k]] = 1
        return y

    x = np.concatenate([features(b) for b in batches[:2]])
    y = np.concatenate([targets(b) for b in batches[:2]])
    w = np.linalg.lstsq(x.T @ x + 1e-1 * np.eye(x.shape[1]), x.T @ y, rcond=None)[0]
    score, truth = features(batches[2]) @ w, targets(batches[2])
    aucs = []
    for j in range(8):
        pos, neg = score[truth[:, j] == 1, j], score[truth[:, j] == 0, j]
        aucs.append((pos[:, None] > neg[None, :]).mean())
    assert min(aucs) > 0.95, aucs
    ev = input_pipeline.make_eval_iterator(c, batch_size=512, process_index=0, process_count=1)
    assert ev.num_images == c.data.synthetic_eval_images and sum(b["mask"].sum() for b in ev) == 512
    assert input_pipeline.num_labels(c) == 8


def test_global_batch_builds_global_arrays_on_the_mesh():
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    batch = {
        "image": np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(8, 2, 2, 3),
        "num_labels": np.arange(8, dtype=np.int32),
    }
    out = sharding.global_batch(batch, mesh)
    assert out["image"].shape == (8, 2, 2, 3) and len(out["image"].addressable_shards) == 8
    assert out["image"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out["num_labels"]), batch["num_labels"])


def test_train_crop_with_reduced_decoding_matches_a_full_decode():
    """A large JPEG decoded at a DCT scale gives (nearly) the pixels of a full decode + area resize."""
    import cv2

    yy, xx = np.mgrid[0:768, 0:1024]
    img = np.stack([xx / 4, yy / 3, (xx + yy) / 7], -1).astype(np.uint8)
    data = simplejpeg.encode_jpeg(img, quality=95, colorspace="RGB")
    aug = augment.TrainAugment(size=64, area_range=(0.5, 0.5), aspect_range=(1.0, 1.0), flip=False)
    u = sampling.uniforms(0, 1, 7, augment.NUM_UNIFORMS)
    out = np.empty((64, 64, 3), np.uint8)
    augment.train_image(data, out, u, aug)
    top, left, ch, cw = augment.crop_window(768, 1024, u, aug.area_range, aug.aspect_range)
    ref = cv2.resize(img[top : top + ch, left : left + cw], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - ref).mean() < 2.0
    flipped = np.empty_like(out)
    always_flip = np.where(np.arange(len(u)) == augment._U_FLIP, 0.0, u)
    augment.train_image(data, flipped, always_flip, dataclasses.replace(aug, flip=True))
    np.testing.assert_array_equal(flipped, out[:, ::-1])


def test_eval_center_crop_and_other_image_formats():
    import io

    from PIL import Image

    img = np.zeros((60, 100, 3), np.uint8)
    img[:, 40:60] = 255  # a white band in the middle
    tf = augment.EvalTransform(resize=30, size=20)
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        out = np.empty((20, 20, 3), np.uint8)
        augment.eval_image(buf.getvalue(), out, tf)
        # Shorter side 60 -> 30 (scale 1/2): the 20px center crop spans source columns 30..70.
        assert out[:, 6:14].mean() > 240 and out[:, :2].mean() < 15 and out[:, -2:].mean() < 15
    gray = io.BytesIO()
    Image.fromarray(img[..., 0]).save(gray, format="JPEG")
    out = np.empty((20, 20, 3), np.uint8)
    augment.eval_image(gray.getvalue(), out, tf)
    assert out[10, 10].tolist() == [out[10, 10, 0]] * 3
    with pytest.raises(augment.BadImage):
        augment.eval_image(b"garbage", out, tf)


def test_open_source_and_grain_checkpoint_handler_round_trip(dataset, tmp_path):
    """The trainer's path: open_source once, iterators from it; grain's Orbax handler saves the state."""
    import grain

    cfg = _config(dataset, sampling="natural")
    source = input_pipeline.open_source(cfg)
    assert source.num_classes == len(NOUNS) and source.metadata["vocab_fingerprint"]
    it = input_pipeline.make_train_iterator(cfg, source, process_index=0, process_count=1)
    next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, item=it)
    expected = _take(it, 2)
    restored = input_pipeline.make_train_iterator(cfg, source, process_index=0, process_count=1)
    handler.restore(tmp_path, item=restored)
    assert _same(_take(restored, 2), expected)
    ev = input_pipeline.make_eval_iterator(cfg, source, process_index=0, process_count=1)
    assert ev.num_images == 20


def test_color_jitter_strength():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    same = img.copy()
    augment.color_jitter(same, 0.4, np.full(3, 0.5))  # all factors 1.0
    assert np.abs(same.astype(int) - img).max() <= 1
    darker = img.copy()
    augment.color_jitter(darker, 0.4, np.asarray([0.0, 0.5, 0.5]))  # brightness x0.6
    assert darker.mean() == pytest.approx(0.6 * img.mean(), rel=0.02)
    gray = img.copy()
    augment.color_jitter(gray, 1.0, np.asarray([0.5, 0.5, 0.0]))  # saturation 0: gray
    assert np.abs(gray.astype(int) - gray[..., :1]).max() <= 1


@pytest.mark.parametrize("mode", ["images", "sqrt"])
def test_training_and_evaluation_start_without_loading_the_label_file(tmp_path, monkeypatch, mode):
    """The O(images) label files are only memory-mapped or read in bounded chunks, never loaded whole."""
    from tagjax import metrics

    root = _write_dataset(tmp_path / "ds", n_train=48)
    store = records.LabelStore(root, "train")
    big = {store.offsets_path.name, store.labels_path.name}
    monkeypatch.setattr(sampling, "_INVERT_CHUNK_RECORDS", 10)  # 48 records: 5 chunks
    monkeypatch.setattr(sampling, "_INVERT_BUFFER_PAIRS", 32)  # several passes
    reads = []
    real_load, real_fromfile = np.load, np.fromfile

    def load(path, *args, **kwargs):
        reads.append(("load", getattr(path, "name", str(path)), kwargs.get("mmap_mode")))
        return real_load(path, *args, **kwargs)

    def fromfile(f, dtype, count=-1, **kwargs):
        reads.append(("read", getattr(f, "name", ""), count))
        return real_fromfile(f, dtype, count=count, **kwargs)

    monkeypatch.setattr(np, "load", load)
    monkeypatch.setattr(np, "fromfile", fromfile)
    config = _config(root, sampling=mode, cache_dir=str(tmp_path / "cache"))
    it = input_pipeline.make_train_iterator(config, process_index=0, process_count=1)
    next(iter(it))
    counts = metrics.label_counts_of(root, len(NOUNS))
    assert (
        counts.tolist()
        == np.bincount(np.concatenate([_labels_of(i) for i in range(48)]), minlength=10).tolist()
    )
    assert reads  # the store was opened
    for kind, name, how in reads:
        if kind == "load" and Path(name).name in big:
            assert how == "r", f"{name} loaded whole"
        if kind == "read" and Path(name).name in big:
            assert 0 <= how <= 11 * 4, f"{how} elements of {name} read at once"


def test_a_workers_copy_of_a_bounded_source_does_not_count_the_shards_again(dataset, monkeypatch):
    """grain workers receive the source pickled: a bounded one carries its record counts, so a worker
    does not open every shard to count it (350,000 opens per worker at 3.5B images)."""
    source = input_pipeline.RecordSource(Path(dataset), "train", 16, max_open_shards=1)
    copy = pickle.loads(pickle.dumps(source))
    monkeypatch.setattr(records, "_count_records", lambda path: pytest.fail("counted again"))
    got, want = copy.load([0, 1, 2]), source.load([0, 1, 2])
    assert [(img, list(labels)) for img, labels in got] == [
        (img, list(labels)) for img, labels in want
    ]


def _batches_in_a_child_process(cfg, workers: int, conn) -> None:
    """Runs in a child of multiprocessing (as under a sweep driver): reads 3 batches, reports whether
    each is a plain numpy array and which of this process's batch segments exist in /dev/shm."""
    cfg.data.num_workers = workers
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    kinds = [type(next(it)["image"]).__name__ for _ in range(3)]
    mine = sorted(p.name for p in Path("/dev/shm").glob("psm_*"))
    it.close()
    conn.send((kinds, mine))
    conn.close()


def test_a_process_with_a_multiprocessing_parent_reads_batches_without_shared_memory(dataset):
    # Batches are built in shared memory only inside our grain workers, to hand them over; a consumer
    # that is itself a multiprocessing child used to build every batch there too, one /dev/shm
    # segment per step kept until the process ended (2,046 after a short benchmark task on Python 3.12).
    import multiprocessing

    cfg = _config(dataset, dataset=str(dataset), image_size=32, sampling="sqrt")
    before = set(p.name for p in Path("/dev/shm").glob("psm_*"))
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe in a process with reader threads
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_batches_in_a_child_process, args=(cfg, 0, child_conn))
    child.start()
    child_conn.close()  # the child's end: a child that dies makes recv() fail instead of hang
    assert parent_conn.poll(120), "the child reported nothing"
    kinds, segments = parent_conn.recv()
    child.join(60)
    assert child.exitcode == 0
    assert kinds == ["ndarray"] * 3
    assert set(segments) <= before  # none of its own


_UNCLOSED = (
    _SCRIPT_CONFIG
    + """
c.train.batch_size = 8
it = input_pipeline.make_train_iterator(c, process_index=0, process_count=1)
next(it)
for batch in input_pipeline.make_eval_iterator(c):
    break
print("done")
"""
)


def test_a_script_that_never_closes_its_iterators_exits_cleanly(dataset, repo_root):
    # As the docs' snippet does: no close(). Grain's __del__ used to call our close() after the
    # interpreter had torn down the module ("Exception ignored ... 'NoneType' object is not callable").
    # With data workers grain's own objects still complain at exit when a script keeps batches and
    # never closes: the docs close the iterator there.
    data = {"dataset": str(dataset), "image_size": 32, "eval_resize": 36, "eval_image_size": 32}
    data.update({"max_labels": 4, "num_workers": 0})
    proc = subprocess.run(
        [sys.executable, "-c", _UNCLOSED, json.dumps({"data": data})],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr


def test_closing_an_evaluation_pass_leaves_the_training_iterators_batches_alone(dataset):
    # Closing an iterator releases the shared memory of batches its workers made and nobody read. It
    # used to release every segment of the process, the training iterator's queued batches too, so
    # the training iterator failed on its next batch or at close (FileNotFoundError from grain).
    cfg = _config(dataset, sampling="sqrt", num_workers=2, eval_max_images=0)
    train_it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    first = _take(train_it, 2)
    eval_it = input_pipeline.make_eval_iterator(cfg, process_index=0, process_count=1)
    eval_batches = list(eval_it)  # a whole pass: it closes itself at the end
    assert sum(int(b["mask"].sum()) for b in eval_batches) == eval_it.num_images
    more = _take(train_it, 3)
    train_it.close()
    assert all(len(b["image"]) == 8 for b in first + more)


def test_a_truncated_shard_is_named_in_one_line(dataset, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(dataset, damaged)
    shard = sorted(damaged.glob("train-*.array_record"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    cfg = _config(damaged)
    with pytest.raises(UserError, match=f"shard {shard} is damaged"):
        input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"mean": (1.0, 2.0)}, "must be 3 finite numbers"),
        ({"std": (0.0, 0.0, 0.0)}, "must be 3 positive numbers"),
        ({"max_bad_record_fraction": 2.0}, "must be in"),
    ],
)
def test_normalization_and_thresholds_are_checked_before_any_step(dataset, override, message):
    cfg = _config(dataset, **override)
    with pytest.raises(UserError, match=message):
        input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)


def test_training_on_a_dataset_with_an_empty_held_out_split_runs_without_evaluation(
    dataset, tmp_path, caplog
):
    # A small build can leave the held-out split empty; training used to crash at its first evaluation.
    import shutil

    from tagjax import train

    small = tmp_path / "small"
    shutil.copytree(dataset, small)
    manifest = json.loads((small / records.MANIFEST).read_text())
    for name in manifest["splits"]["heldout"]["shards"]:
        (small / name).unlink()
    manifest["splits"]["heldout"] = {"shards": [], "num_records": 0}
    (small / records.MANIFEST).write_text(json.dumps(manifest))
    data = train.open_data(_config(small))
    assert data.make_eval_iterator is None
    assert "split of" in caplog.text and "is empty" in caplog.text
    assert len(next(data.train_iterator)["image"]) == 8
    data.train_iterator.close()


def test_training_stops_at_start_when_a_held_out_shard_is_missing(dataset, tmp_path):
    # Not at its first evaluation, hours in (and without opening every held-out shard at start).
    import shutil

    from tagjax import train

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / records.load_manifest(copy).splits["heldout"]["shards"][0]).unlink()
    with pytest.raises(UserError, match=r"heldout-.* listed in dataset\.json is missing"):
        train.open_data(_config(copy))
