"""`tagjax study` (tagjax.study) and the pipeline options its arms use: fixed label noise, train_fraction,
shuffled hashtags; the statistics; a two-arm two-seed study end to end, killed and resumed."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import simplejpeg

from tagjax import cli, demo, input_pipeline, models, posts, records, sampling, study
from tagjax import vocab as vocab_lib
from tagjax.configs import default, tiny
from tagjax.configs import study as study_config
from tagjax.errors import UserError

NOUNS = ["dog", "cat", "car", "tree", "house", "bird", "flower", "boat", "horse", "apple"]
N_TRAIN, N_HELDOUT = 64, 16


# ---- a small dataset whose images say which record they are -------------------------------------------


def _labels_of(i: int) -> list[int]:
    return sorted({i % 2, 2 + i % 8})


def _value_of(i: int) -> int:
    return 3 * i + 2  # a flat gray image: any crop of it tells the record


def _write_dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    vocab = vocab_lib.build_vocabulary({t: 100 - i for i, t in enumerate(NOUNS)}, mode="nouns")
    vocab.save(root / "vocab.json")
    splits = {}
    for split, n in (("train", N_TRAIN), ("heldout", N_HELDOUT)):
        encoded = [
            records.encode(
                records.Record(
                    f"{split}{i}",
                    simplejpeg.encode_jpeg(
                        np.full((40, 40, 3), _value_of(i), np.uint8), quality=95, colorspace="RGB"
                    ),
                    tuple(_labels_of(i)),
                )
            )
            for i in range(n)
        ]
        name = records.shard_name(split, 0, 1)
        records.write_shard(root / name, encoded)
        records.LabelStore.write(root, split, [_labels_of(i) for i in range(n)], vocab.num_labels)
        splits[split] = {"shards": [name], "num_records": n}
    records.Manifest(records.SCHEMA_VERSION, splits, vocab_fingerprint=vocab.fingerprint()).save(
        root
    )
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("study_data") / "ds")


def _config(dataset, **data):
    c = default.get_config()
    c.data.dataset = str(dataset)
    c.data.image_size = 16
    c.data.eval_resize = 16
    c.data.eval_image_size = 16
    c.data.crop_area_range = (0.5, 1.0)
    c.data.max_labels = 4
    c.data.sampling = "images"
    c.train.batch_size = N_TRAIN
    for k, v in data.items():
        c.data[k] = v
    return c


def _rows(batch):
    """(record id from the pixel value, sorted label list) per row."""
    ids = np.rint((batch["image"].reshape(len(batch["image"]), -1).mean(1) - 2) / 3).astype(int)
    return [
        (int(i), batch["labels"][r, : batch["num_labels"][r]].tolist()) for r, i in enumerate(ids)
    ]


def _epochs(cfg, n: int, seed: int = 0):
    cfg.seed = seed
    it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    try:
        return [_rows(next(it)) for _ in range(n)]
    finally:
        it.close()


# ---- label noise: one fixed corrupted dataset ------------------------------------------------------------


def test_noisy_labels_are_a_fixed_function_of_seed_and_record_never_the_replaced_tag():
    counts = np.asarray([500, 200, 100, 50, 25, 0, 5], np.int64)  # label 5 has no images
    cdf = np.cumsum(sampling.integer_weights(counts, 1.0))
    replaced, kept_as_is, drawn = 0, 0, np.zeros(len(counts), np.int64)
    for record in range(4000):
        labels = np.asarray([record % 3, 3 + record % 2, 6])
        out, flip = input_pipeline.corrupt_labels(labels, record, 7, 0.3, cdf)
        again, flip_again = input_pipeline.corrupt_labels(labels, record, 7, 0.3, cdf)
        assert np.array_equal(out, again) and np.array_equal(flip, flip_again)
        assert np.all(out[flip] != labels[flip])  # never the tag it replaces
        assert np.array_equal(out[~flip], labels[~flip])
        replaced += int(flip.sum())
        kept_as_is += int((~flip).sum())
        for old, new in zip(labels[flip], out[flip]):
            if old != 0:  # replacements of other labels: the marginal without the replaced one
                drawn[new] += 1
    assert 0.28 < replaced / (replaced + kept_as_is) < 0.32
    assert drawn[5] == 0  # never a label without images
    # Replacing labels 1..6 by the marginal: label 0 is drawn about 500/880 of the time (it is never the
    # replaced one in this tally), more than any other.
    assert drawn.argmax() == 0 and 0.45 < drawn[0] / drawn.sum() < 0.7
    # Another seed corrupts another way.
    a = [input_pipeline.corrupt_labels(np.arange(3), r, 7, 0.3, cdf)[0].tolist() for r in range(50)]
    b = [input_pipeline.corrupt_labels(np.arange(3), r, 8, 0.3, cdf)[0].tolist() for r in range(50)]
    assert a != b


def test_label_noise_is_the_same_at_every_view_of_a_record(dataset):
    # `images` sampling, a batch per epoch: three views of every record at three stream positions.
    views = {}
    for epoch in _epochs(_config(dataset, label_noise=0.5), 3):
        assert sorted(i for i, _ in epoch) == list(range(N_TRAIN))
        for i, labels in epoch:
            views.setdefault(i, []).append(labels)
    assert all(v[0] == v[1] == v[2] for v in views.values())
    changed = sum(views[i][0] != _labels_of(i) for i in range(N_TRAIN))
    assert changed > N_TRAIN // 4  # at p=0.5 most records have a replaced label
    # The same dataset for the same seed in a new run; another corruption for another seed.
    rerun = dict(_epochs(_config(dataset, label_noise=0.5), 1)[0])
    assert all(rerun[i] == views[i][0] for i in range(N_TRAIN))
    other = dict(_epochs(_config(dataset, label_noise=0.5), 1, seed=1)[0])
    assert any(other[i] != views[i][0] for i in range(N_TRAIN))


# ---- train_fraction -------------------------------------------------------------------------------------


def test_train_fraction_keeps_vocabulary_and_heldout_split_and_trains_on_a_nested_subset(dataset):
    full, quarter = _config(dataset), _config(dataset, train_fraction=0.25)
    # Vocabulary and what checkpoints record about it: identical.
    a, b = input_pipeline.open_source(full), input_pipeline.open_source(quarter)
    assert a.num_classes == b.num_classes and a.metadata == b.metadata
    assert a.vocab.fingerprint() == b.vocab.fingerprint()
    # The held-out split: the same batches, image for image.
    ev_full = input_pipeline.make_eval_iterator(full, process_index=0, process_count=1)
    ev_quarter = input_pipeline.make_eval_iterator(quarter, process_index=0, process_count=1)
    for x, y in zip(ev_full, ev_quarter, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in ("image", "labels", "mask"))
    # Training reads only the kept records, every one of them once per pass (`images` sampling).
    kept = input_pipeline.train_subset(N_TRAIN, 0.25)
    assert 8 <= len(kept) <= 24
    quarter.train.batch_size = len(kept)
    for epoch in _epochs(quarter, 3):
        assert sorted(i for i, _ in epoch) == kept.tolist()
        assert all(labels == _labels_of(i) for i, labels in epoch)
    # Hashtag resampling draws from the subset too.
    sqrt = _config(dataset, train_fraction=0.25, sampling="sqrt")
    assert {i for e in _epochs(sqrt, 2) for i, _ in e} <= set(kept.tolist())
    # Nested, and the same for every run (a function of the record id alone).
    eighth = input_pipeline.train_subset(N_TRAIN, 0.125)
    assert set(eighth.tolist()) <= set(kept.tolist())
    assert np.array_equal(kept, input_pipeline.train_subset(N_TRAIN, 0.25))
    assert input_pipeline.train_subset(N_TRAIN, 1.0) is None
    with pytest.raises(UserError, match="train_fraction"):
        input_pipeline.make_train_iterator(
            _config(dataset, train_fraction=0.0), process_index=0, process_count=1
        )


# ---- the shuffled-hashtag control -------------------------------------------------------------------------


def test_shuffled_hashtags_pair_each_label_set_with_another_records_image(dataset):
    clean = _epochs(_config(dataset, sampling="sqrt"), 2)
    shuffled = _epochs(_config(dataset, sampling="sqrt", shuffle_labels=True), 2)
    # The same stream of label sets (the sampler draws by the real hashtags) ...
    assert [[lab for _, lab in e] for e in clean] == [[lab for _, lab in e] for e in shuffled]
    # ... shown with the images of a fixed permutation of the records.
    source = input_pipeline.RecordSource(dataset, "train", len(NOUNS))
    shuffle = input_pipeline.ShuffledLabels(source, seed=0)
    partner = shuffle.partner(np.arange(N_TRAIN))
    assert sorted(partner.tolist()) == list(range(N_TRAIN))
    assert (partner != np.arange(N_TRAIN)).mean() > 0.8
    for ce, se in zip(clean, shuffled):
        for (record, _), (image, _) in zip(ce, se):
            assert image == partner[record]


# ---- statistics -----------------------------------------------------------------------------------------


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 40), 50, 100, 1000):
        assert study.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4)


def test_paired_difference_against_a_hand_computation():
    arm = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.90}  # seed 3 has no baseline: left out
    base = {0: 0.40, 1: 0.45, 2: 0.65}
    d = study.paired_difference(arm, base)
    # differences 0.10, 0.15, 0.05: mean 0.10, sample std 0.05, t(0.975, 2) = 4.3027
    half = 4.3027 * 0.05 / math.sqrt(3)
    assert d["seeds"] == [0, 1, 2] and d["per_seed"] == pytest.approx([0.10, 0.15, 0.05])
    assert (d["mean"], d["std"], d["n"]) == (pytest.approx(0.10), pytest.approx(0.05), 3)
    assert (d["lo"], d["hi"]) == (pytest.approx(0.10 - half), pytest.approx(0.10 + half))
    assert d["verdict"] == "not resolved"  # the interval [-0.024, 0.224] straddles zero
    clear = study.paired_difference({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.3, 1: 0.42, 2: 0.49})
    assert clear["verdict"] == "higher" and clear["lo"] > 0
    worse = study.paired_difference({0: 0.3, 1: 0.42, 2: 0.49}, {0: 0.5, 1: 0.6, 2: 0.7})
    assert worse["verdict"] == "lower"
    assert study.paired_difference({0: 0.5}, {0: 0.4})["lo"] is None  # one seed: no interval


def test_seed_and_arm_selection():
    assert study.select("0-2,5", [0, 1], "seeds", convert=int) == [0, 1, 2, 5]
    assert study.select(None, ["a", "b"], "arms") == ["a", "b"]
    with pytest.raises(UserError, match="unknown"):
        study.select("a,zzz", ["a", "b"], "arms")
    with pytest.raises(UserError, match="not a valid"):
        study.select("x", [0], "seeds", convert=int)


def test_data_size_schedule_grows_with_the_data():
    c = study_config.get_config()
    n = 2000
    sizes = [study.size_schedule_images(c, f, n) for f in (1 / 8, 1 / 4, 1 / 2, 1.0)]
    assert sizes[-1] == c.train.total_images and sizes == sorted(sizes)
    assert sizes[0] == pytest.approx(40 * n / 8, rel=0.01)  # passes_at_smallest_fraction
    assert all(s % c.train.batch_size == 0 for s in sizes)
    # Fewer passes over more data: the paper's heuristic.
    assert sizes[0] / (n / 8) > sizes[-1] / n


# ---- the whole study, killed and resumed --------------------------------------------------------------

HAVE_OPENCLIPART = Path(posts.OPENCLIPART_ROOT).is_dir()
HAVE_EMOJI = (
    Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").is_file()
    and Path("/usr/share/unicode/emoji/emoji-test.txt").is_file()
)


@pytest.mark.slow
@pytest.mark.skipif(
    not (HAVE_OPENCLIPART and HAVE_EMOJI),
    reason="needs Debian openclipart-svg, fonts-noto-color-emoji and unicode-data",
)
def test_two_arm_two_seed_study_pairs_by_seed_and_resumes_after_a_kill(tmp_path, capsys):
    wd = tmp_path / "study"
    argv = [
        "study",
        "--config",
        "study:tiny",
        "--workdir",
        str(wd),
        "--arms",
        "baseline,shuffled",
        "--seeds",
        "0,1",
        "--no-progress",
        f"--config.demo.data_dir={tmp_path / 'tfds'}",
        f"--config.corpus.raster_cache={tmp_path / 'raster'}",
    ]
    # Killed (SIGKILL: no clean-up at all) once the first arm of seed 0 finished.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagjax.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    marker = wd / "stages" / "seed0__probe_baseline.json"
    try:
        deadline = time.monotonic() + 600
        while not (marker.is_file() and "result" in json.loads(marker.read_text())):
            assert proc.poll() is None, "the study stopped before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    unfinished = [
        p.stem.replace("__", "/")
        for p in (wd / "stages").glob("*.json")
        if "result" not in json.loads(p.read_text())
    ]
    finished = {
        p.stem.replace("__", "/")
        for p in (wd / "stages").glob("*.json")
        if "result" in json.loads(p.read_text())
    }
    assert {"corpus", "seed0/random", "seed0/baseline", "seed0/probe_baseline"} <= finished

    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for name in finished:  # nothing finished is computed again ...
        assert f"{name}: reusing the finished stage" in out
    for name in unfinished:  # ... and what was under way resumes
        assert f"{name}: resuming the unfinished stage" in out
    assert "building the corpus" not in out

    s = json.loads((wd / "study.json").read_text())
    assert s["seeds"] == [0, 1] and list(s["arms"]) == ["baseline", "shuffled"]
    # Pairing: within a seed every arm starts from the same trunk; seeds differ.
    d = s["initial_trunk_digests"]
    assert d["0"]["baseline"] == d["0"]["shuffled"] and d["1"]["baseline"] == d["1"]["shuffled"]
    assert d["0"]["baseline"] != d["1"]["baseline"] and s["paired_initialization"]
    # The numbers are the probes' own, and the interval is the hand-computed one.
    top1 = {
        (arm, seed): json.loads((wd / f"seed{seed}" / f"probe_{arm}" / "results.json").read_text())[
            "test_top1"
        ]
        for arm in ("baseline", "shuffled")
        for seed in (0, 1)
    }
    assert all(1 / 89 < v <= 1 for v in top1.values())
    diffs = [top1["shuffled", s_] - top1["baseline", s_] for s_ in (0, 1)]
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    got = s["arms"]["shuffled"]["vs_baseline"]["probe_top1"]
    assert got["per_seed"] == pytest.approx(diffs) and got["mean"] == pytest.approx(mean)
    half = 12.7062 * sd / math.sqrt(2)
    assert (got["lo"], got["hi"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    base = s["arms"]["baseline"]
    assert base["probe_top1"]["mean"] == pytest.approx(
        (top1["baseline", 0] + top1["baseline", 1]) / 2
    )
    assert 0 < base["mAP"]["mean"] <= 1 and base["per_seed"]["0"]["heldout"]["tail_mAP"] is not None
    # Tables and the figure.
    md = (wd / "study.md").read_text()
    assert "| arm | finding | probe top-1 (%)" in md and "(`shuffled`)" in md
    assert Path(s["plots"]["controls"]).is_file() and "plots/controls.png" in md

    # Once more: every run reused, the same numbers.
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "pretraining tiny_resnext" not in out and "-- linear probe" not in out
    again = json.loads((wd / "study.json").read_text())
    assert again["arms"] == s["arms"]


def test_sigmoid_head_starts_at_the_label_prior():
    cfg = tiny.get_config()
    x = jnp.zeros((1, 32, 32, 3))
    for head_bias, want in (("zero", 0.0), ("prior", -math.log(40))):
        cfg.model.head_bias = head_bias
        model = models.create(cfg.model, 40)
        variables = model.init(jax.random.key(0), x)
        assert np.allclose(variables["params"]["fc"]["bias"], want)
    cfg.model.head_bias = "half"
    with pytest.raises(UserError, match="head_bias"):
        models.create(cfg.model, 40)


def test_summary_table_and_one_figure_per_finding_from_result_rows(tmp_path):
    cfg = study_config.get_config()
    arms = ["baseline", "shuffled", "random", "sigmoid", "sigmoid_lr0_1", "frac1_8", "frac1_2"]
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1, 2):
        for i, arm in enumerate(arms):
            trained = arm != "random"
            heldout = {k: 0.1 + 0.01 * i for k in study.HELDOUT_KEYS} if trained else None
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "init_digest": f"init{seed}",
                    "images_seen": 640,
                    "probe_top1": 0.4 + 0.01 * i + 0.02 * rng.random(),
                    "probe_top5": 0.7,
                    "heldout": heldout,
                    "heldout_loss": 0.05 - 0.001 * i if trained else None,
                    "train_seconds": 1.0,
                    "probe_seconds": 1.0,
                }
            )
    s = study.summarize(cfg, rows, arms, [0, 1, 2])
    assert s["paired_initialization"] and "vs_baseline" not in s["arms"]["baseline"]
    diff = s["arms"]["frac1_2"]["vs_baseline"]["probe_top1"]
    by = {(r["arm"], r["seed"]): r["probe_top1"] for r in rows}
    assert diff["per_seed"] == pytest.approx(
        [by["frac1_2", k] - by["baseline", k] for k in (0, 1, 2)]
    )
    assert s["arms"]["random"]["mAP"]["n"] == 0  # untrained trunks have no hashtag metrics
    s["downstream"] = {"num_classes": 89}
    files = study.make_plots(s, tmp_path)
    assert set(files) == {"controls", "loss", "sigmoid_lr_sweep", "data_size"}
    assert all(Path(f).stat().st_size > 10_000 for f in files.values())
    table = study.render_table(s)
    assert table.count("\n") == len(arms) + 1 and all(f"(`{a}`)" in table for a in arms)
    # frac1_2 is 6 points above the baseline with 2 points of seed noise: resolved.
    assert s["arms"]["frac1_2"]["vs_baseline"]["probe_top1"]["verdict"] == "higher"
    sweep = study.render_sweep(s)  # lowest held-out sigmoid loss first: sigmoid_lr0_1 (arm 4)
    assert sweep.index("`sigmoid_lr0_1`") < sweep.index("`sigmoid`")


def test_hashtag_share_pairs_each_shuffled_arm_with_its_reference_and_fits_the_slope(tmp_path):
    """The shuffled arm at each data fraction is compared with the real-hashtag arm at that fraction (its
    ``reference``), not the baseline; the share's slope per doubling is the least-squares line with its
    t-interval, and the extrapolated size is where that line reaches study.share_target."""
    cfg = study_config.get_config()
    arms = ["baseline", "shuffled", "frac1_8", "shuffled_frac1_8", "frac1_4", "shuffled_frac1_4"]
    fraction = {"baseline": 1.0, "frac1_8": 1 / 8, "frac1_4": 1 / 4}
    rng = np.random.default_rng(1)
    rows, by = [], {}
    for seed in (0, 1, 2):
        for real in fraction:
            f = fraction[real]
            top1 = 0.45 + 0.02 * math.log2(f) + 0.01 * rng.random()
            share = 0.04 + 0.015 * math.log2(f) + 0.01 * rng.standard_normal()
            shuffled = "shuffled" if real == "baseline" else f"shuffled_{real}"
            by[real, seed], by[shuffled, seed] = top1, top1 - share
    for (arm, seed), top1 in by.items():
        rows.append(
            {
                "arm": arm,
                "seed": seed,
                "init_digest": f"init{seed}",
                "images_seen": 640,
                "probe_top1": top1,
                "probe_top5": 0.7,
                "heldout": {k: 0.1 for k in study.HELDOUT_KEYS},
                "heldout_loss": 0.05,
                "train_seconds": 1.0,
                "probe_seconds": 1.0,
            }
        )
    s = study.summarize(cfg, rows, arms, [0, 1, 2], train_records=2400)
    a = s["arms"]["shuffled_frac1_8"]
    assert a["reference"] == "frac1_8"
    assert a["vs_reference"]["probe_top1"]["per_seed"] == pytest.approx(
        [by["shuffled_frac1_8", k] - by["frac1_8", k] for k in (0, 1, 2)]
    )
    assert "vs_reference" not in s["arms"]["shuffled"]  # its reference is the baseline

    share = s["hashtag_share"]
    assert [p["fraction"] for p in share["points"]] == [1 / 8, 1 / 4, 1.0]
    x, y = [], []
    for p in share["points"]:
        real = {1 / 8: "frac1_8", 1 / 4: "frac1_4", 1.0: "baseline"}[p["fraction"]]
        assert p["reference"] == real
        want = [by[real, k] - by[p["arm"], k] for k in (0, 1, 2)]
        assert p["per_seed"] == pytest.approx(want) and p["mean"] == pytest.approx(np.mean(want))
        assert p["lo"] < p["mean"] < p["hi"]
        x += [math.log2(p["fraction"])] * 3
        y += want
    # By hand: ordinary least squares and its slope's standard error, t(0.975, 9 - 2 = 7) = 2.3646.
    x, y = np.asarray(x), np.asarray(y)
    b, a0 = np.polyfit(x, y, 1)
    se = math.sqrt(((y - (a0 + b * x)) ** 2).sum() / 7 / ((x - x.mean()) ** 2).sum())
    fit = share["slope_per_doubling"]
    assert (fit["slope"], fit["intercept"]) == (pytest.approx(b), pytest.approx(a0))
    assert (fit["lo"], fit["hi"]) == (
        pytest.approx(b - 2.3646 * se),
        pytest.approx(b + 2.3646 * se),
    )
    assert fit["lo"] > 0  # the share grows with the data here
    extra = fit["records_for_target"]
    assert extra["central"] == round(2400 * 2 ** ((0.10 - a0) / b))
    assert extra["fewest"] < extra["central"] < extra["most"]

    md = study.render_share(s)
    assert "points per doubling" in md and f"~{extra['central']:,} training images" in md
    table = study.render_table(s)
    assert "| `frac1_8` |" in table  # the shuffled arm at 1/8 is compared with frac1_8
    s["downstream"] = {"num_classes": 89}
    files = study.make_plots(s, tmp_path)
    assert {"hashtag_share", "controls", "data_size"} <= set(files)
    assert Path(files["hashtag_share"]).stat().st_size > 10_000


def test_an_arm_s_reference_must_be_an_arm_and_defaults_to_the_baseline():
    cfg = study_config.get_config()
    with cfg.unlocked():
        cfg.study.arms.shuffled_frac1_8.reference = "nonexistent"
    with pytest.raises(UserError, match="reference='nonexistent'"):
        study.check_config(cfg)
    assert study.reference_of(study_config.get_config(), "shuffled_frac1_2") == "frac1_2"
    assert study.reference_of(study_config.get_config(), "natural") == "baseline"
    cfg = study_config.get_config()
    with cfg.unlocked():
        cfg.study.arms.frac1_8.reference = "frac1_4"  # shuffled_frac1_8 -> frac1_8 -> frac1_4
    with pytest.raises(UserError, match="through a chain"):
        study.check_config(cfg)


def test_length_arms_scale_the_schedule_they_are_given_and_are_not_share_points():
    cfg = study_config.get_config()
    with cfg.unlocked():
        cfg.train.total_images = 64 * 300  # as `--config.train.total_images=19200` does
    for name in ("long4", "shuffled_long4"):
        assert study.arm_config(cfg, cfg.study.arms[name], 2391).train.total_images == 4 * 64 * 300
    entry = {"set": [["data.shuffle_labels", True]], "length": 4.0}
    assert not study.is_share_arm(entry) and study.is_share_arm({**entry, "length": 1.0})


def test_share_already_above_the_target_is_not_extrapolated():
    points = [(f, 0.15 + 0.01 * math.log2(f) + e) for f in (1 / 8, 1 / 4, 1) for e in (0, 0.002)]
    fit = study.share_slope(points, target=0.10, train_records=2400)
    assert fit["target_reached"] and "records_for_target" not in fit


def test_a_reader_option_added_to_the_config_does_not_redo_finished_stages(tmp_path):
    """Stage keys leave out the data fields that only decide how records are read: a workdir finished
    before such a field existed (or with another value of it) is reused, anything else is redone."""
    cfg = default.get_config()
    stages = demo.Stages(tmp_path, fresh=False, log=lambda line: None)
    old = cfg.data.to_dict()
    old.pop("max_open_shards")
    assert stages.begin("run", tmp_path / "run", {"data": old}) is None
    stages.finish("run", {"data": old}, {"top1": 0.5})
    cfg.data.max_open_shards = 64
    assert stages.begin("run", tmp_path / "run", {"data": cfg.data}) == {"top1": 0.5}
    cfg.data.sampling = "natural"
    assert stages.begin("run", tmp_path / "run", {"data": cfg.data}) is None
