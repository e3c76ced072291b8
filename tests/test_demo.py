"""`tagjax demo`: the whole job end to end (scaled down), and the bookkeeping that makes re-runs cheap."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagjax import cli, demo, posts

HAVE_OPENCLIPART = Path(posts.OPENCLIPART_ROOT).is_dir()
HAVE_EMOJI = (
    Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").is_file()
    and Path("/usr/share/unicode/emoji/emoji-test.txt").is_file()
)


# ---- stage bookkeeping ---------------------------------------------------------------------------------


def test_stage_reused_only_with_the_same_key(tmp_path):
    logs = []
    stages = demo.Stages(tmp_path, fresh=False, log=logs.append)
    d = tmp_path / "s"
    assert stages.begin("s", d, {"lr": 0.1}) is None
    (d / "output.txt").write_text("first")
    stages.finish("s", {"lr": 0.1}, {"top1": np.float32(0.5), "curve": np.arange(2)})

    again = demo.Stages(tmp_path, fresh=False, log=logs.append)
    assert again.begin("s", d, {"lr": 0.1}) == {"top1": 0.5, "curve": [0, 1]}
    assert (d / "output.txt").read_text() == "first"

    # Another key: the old outputs must not survive into the new run.
    assert again.begin("s", d, {"lr": 0.2}) is None
    assert d.is_dir() and not (d / "output.txt").exists()

    # --fresh recomputes even with the same key.
    again.finish("s", {"lr": 0.2}, {"top1": 0.7})
    assert demo.Stages(tmp_path, fresh=True, log=logs.append).begin("s", d, {"lr": 0.2}) is None


def test_unfinished_stage_with_the_same_key_resumes_in_place(tmp_path):
    stages = demo.Stages(tmp_path, fresh=False, log=lambda s: None)
    d = tmp_path / "train"
    stages.begin("train", d, {"steps": 10})
    (d / "checkpoints").mkdir(parents=True)  # an interrupted run left its checkpoints
    assert (
        demo.Stages(tmp_path, fresh=False, log=lambda s: None).begin("train", d, {"steps": 10})
        is None
    )
    assert (d / "checkpoints").is_dir()  # kept: the trainer resumes from them


def _fake_results(tops):
    """Stage results of len(tops) seeds, tops[i] = (pretrained, random, downstream) probe top-1."""
    pre, rnd, scr, probes = [], [], [], {t: [] for t in demo.TRUNKS}
    for seed, top in enumerate(tops):
        pre.append(
            {
                "seed": seed,
                "images_seen": 640,
                "steps": 10,
                "train_seconds": 1.0,
                "heldout": {
                    "num_images": 30,
                    "mAP": 0.2 + 0.1 * seed,
                    "precision@1": 0.3,
                    "precision@5": 0.1,
                    "recall@5": 0.4,
                },
            }
        )
        rnd.append({"seconds": 2.0})
        scr.append({"finetuned_head": {"test_top1": 0.5}, "seconds": 4.0})
        for t, v in zip(("pretrained", "random", "downstream"), top):
            probes[t].append(
                {
                    "test_top1": v,
                    "test_top5": v + 0.2,
                    "num_classes": 89,
                    "num_train": 2664,
                    "num_test": 923,
                    "feature_dim": 512,
                    "image_size": 56,
                    "seconds": 1.0,
                }
            )
    corpus = {
        "dataset": "/d",
        "dedup": {"eval_removed": 2},
        "seconds": 20.0,
        "stats": {
            "posts_read": 8121,
            "records": {"train": 2194, "heldout": 230},
            "dropped": {},
            "labels": {"vocabulary_size": 488, "used_in_train": 481, "mean_per_post": 1.9},
        },
    }
    return corpus, pre, rnd, scr, probes


def test_summary_aggregates_seeds_and_checks_the_target():
    from tagjax import config as config_lib

    cfg = config_lib.load("demo")
    corpus, pre, rnd, scr, probes = _fake_results(
        [(0.50, 0.40, 0.55), (0.44, 0.37, 0.50), (0.47, 0.43, 0.52)]
    )
    s = demo.summarize(cfg, corpus, pre, rnd, scr, probes, 100.0, 0, "tagjax demo --seeds 3")
    d = s["downstream"]
    gain = d["gain_pretrained_minus_random"]
    np.testing.assert_allclose(gain["per_seed"], [0.10, 0.07, 0.04], atol=1e-12)
    assert gain["mean"] == pytest.approx(0.07)
    assert gain["std"] == pytest.approx(np.std([0.10, 0.07, 0.04], ddof=1))
    assert d["meets_target"]  # 7 points >= the config's 5
    assert d["trunks"]["pretrained"]["top1"]["min"] == pytest.approx(0.44)
    assert s["hashtag_prediction"]["mAP"]["mean"] == pytest.approx(0.3)
    table = demo.render_table(s)
    assert "| hashtag-pretrained | 47.0 ± 3.0 |" in table
    assert "+7.0 ± 3.0 points top-1 (per seed: +10.0, +7.0, +4.0); meets the target of +5" in table

    # Stage durations add up across seeds, whether computed now or reused from an earlier invocation.
    assert s["compute_seconds"] == {
        "corpus": 20.0,
        "pretrain": 3.0,
        "hashtag_eval": 0.0,
        "random_init": 6.0,
        "downstream_only": 12.0,
        "probes": 9.0,
    }
    assert "total 50s (wall time 1m40s)" in table

    corpus, pre, rnd, scr, probes = _fake_results([(0.42, 0.40, 0.55)])
    one = demo.summarize(cfg, corpus, pre, rnd, scr, probes, 1.0, 7, "tagjax demo")
    assert not one["downstream"]["meets_target"]
    assert "falls short of the target" in demo.render_table(one)
    assert "(this invocation 1s, reusing 7 finished stages)" in demo.render_table(one)


def test_bad_seed_count_is_a_user_error(tmp_path, capsys):
    assert cli.main(["demo", "--workdir", str(tmp_path), "--seeds", "0"]) == 3
    assert "--seeds must be at least 1" in capsys.readouterr().err


# ---- the whole demo, scaled down -----------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.mark.slow
@pytest.mark.skipif(
    not (HAVE_OPENCLIPART and HAVE_EMOJI),
    reason="needs Debian openclipart-svg, fonts-noto-color-emoji and unicode-data",
)
def test_demo_end_to_end_and_rerun_reuses_every_stage(tmp_path, capsys):
    from tagjax import records

    wd = tmp_path / "demo"
    argv = [
        "demo",
        "--config",
        "demo:tiny",
        "--workdir",
        str(wd),
        "--no-progress",
        f"--config.demo.data_dir={tmp_path / 'tfds'}",
        f"--config.corpus.raster_cache={tmp_path / 'raster'}",
    ]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.err  # stage banners and progress lines go to stderr, the summary table to stdout
    assert (
        captured.out.startswith("corpus: 500 openclipart posts read") and "\r" not in captured.err
    )
    for banner in (
        "[1/5] corpus",
        "[2/5] pretraining",
        "[3/5] baselines",
        "[4/5] linear probes",
        "[5/5] summary",
    ):
        assert banner in out
    assert "tagjax build report" in out and "hashtag prediction on held-out posts" in out

    s = json.loads((wd / "summary.json").read_text())
    assert s["seeds"] == [0]
    # The corpus: the posts asked for, split as the dataset on disk says, decontaminated against emoji.
    manifest = records.load_manifest(wd / "dataset")
    assert s["corpus"]["posts_read"] == 500
    assert s["corpus"]["records"] == {k: manifest.num_records(k) for k in ("train", "heldout")}
    assert s["corpus"]["records"]["train"] > 100 and s["corpus"]["records"]["heldout"] > 10
    assert json.loads((wd / "dataset" / "stats.json").read_text())["dedup"]["eval_images"] == 923
    # Pretraining ran its steps and wrote checkpoints; the hashtag metrics cover every held-out post.
    p = s["pretraining"]
    assert (p["model"], p["steps"], p["images_seen"], p["sampling"]) == (
        "tiny_resnext",
        8,
        128,
        "sqrt",
    )
    assert (
        sorted(
            int(x.name)
            for x in (wd / "seed0" / "pretrain" / "checkpoints").iterdir()
            if x.name.isdigit()
        )[-1]
        == 8
    )
    h = s["hashtag_prediction"]
    assert h["num_images"] == manifest.num_records("heldout")
    assert 0.0 < h["mAP"]["mean"] <= 1.0 and 0.0 <= h["precision@1"]["mean"] <= 1.0
    # The three trunks, probed on the same downstream split; the gain is their difference.
    d = s["downstream"]
    assert (d["dataset"], d["num_classes"], d["num_test"], d["feature_dim"]) == (
        "emoji_subgroups/32px",
        89,
        923,
        128,
    )
    tops = {t: d["trunks"][t]["per_seed_top1"][0] for t in demo.TRUNKS}
    assert all(1 / 89 < v <= 1.0 for v in tops.values())  # every trunk beats chance
    assert d["gain_pretrained_minus_random"]["per_seed"][0] == pytest.approx(
        tops["pretrained"] - tops["random"]
    )
    # The headline against the controls: shuffled hashtags and the random trunk with re-estimated BN.
    assert set(d["trunks"]) == set(demo.TRUNKS)
    for control in demo.CONTROLS:
        assert d[f"gain_pretrained_minus_{control}"]["per_seed"][0] == pytest.approx(
            tops["pretrained"] - tops[control]
        )
    assert "what the hashtags themselves add" in demo.render_table(s)
    assert tops["random_bn"] != tops["random"]
    probe = json.loads((wd / "seed0" / "probe_random" / "results.json").read_text())
    assert probe["test_top1"] == pytest.approx(tops["random"])
    assert all(v > 0 for k, v in s["compute_seconds"].items() if k != "hashtag_eval")
    assert s["machine"]["cpu_count"] >= 1

    md = (wd / "summary.md").read_text()
    assert "| trunk | top-1 (%) | top-5 (%) | top-1 range |" in md
    for name in ("loss", "tag_frequency", "per_label_ap", "probe"):
        path = Path(s["plots"][name])
        assert path.parent == wd / "plots" and f"({path.relative_to(wd)})" in md
        w, hgt = _png_size(path)
        assert w > 300 and hgt > 200

    # The same command again (with --json): every stage is reused, the numbers are the same, and
    # stdout is the summary as one JSON document.
    assert cli.main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["downstream"] == s["downstream"]
    out = captured.err
    # corpus, pretrain, shuffled pretrain, random, random_bn, downstream-only, 5 probes
    assert out.count("reusing the finished stage") == 11
    again = json.loads((wd / "summary.json").read_text())
    assert again["downstream"]["trunks"] == s["downstream"]["trunks"]
    assert again["hashtag_prediction"] == s["hashtag_prediction"]
    assert again["compute_seconds"] == s["compute_seconds"] and again["stages_reused"] == 11
