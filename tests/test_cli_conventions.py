"""The conventions every `tagjax` subcommand keeps (docs/cli.md): `--json` stdout is JSON and nothing
else, progress bars never reach a redirected log, one flag name per meaning, and the exit statuses
0 ok / 1 some inputs failed / 2 usage / 3 user-fixable error / 130 interrupted."""

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagjax import checkpoint, cli, config, progress, transfer
from tagjax import vocab as vocab_lib
from tagjax.errors import EXIT_INTERRUPTED, EXIT_SOME_INPUTS_FAILED, EXIT_USAGE, EXIT_USER_ERROR

TAGS = ("dog", "cat", "car", "flag")


def _picture(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
    img[8:30, 8:30] = rng.integers(0, 255, 3)  # a square, so near-duplicate hashes differ
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def vocab():
    return vocab_lib.build_vocabulary({t: 5 for t in TAGS}, mode="nouns")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, vocab):
    """A random tiny checkpoint laid out like a training workdir, its vocabulary beside it."""
    root = tmp_path_factory.mktemp("ckpt")
    transfer.write_random_init_checkpoint(
        config.load("tiny"),
        root / "checkpoints" / "0",
        num_classes=vocab.num_labels,
        metadata={"vocab_fingerprint": vocab.fingerprint()},
    )
    vocab.save(root / "vocab.json")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three good images and one that is not an image at all."""
    root = tmp_path_factory.mktemp("images")
    for i in range(3):
        _picture(i).save(root / f"good{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    """A class-per-folder downstream set: DIR/{train,test}/{red,blue}/*.png."""
    root = tmp_path_factory.mktemp("classes")
    for split, n in (("train", 6), ("test", 4)):
        for c, name in enumerate(("red", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _picture(100 * c + i + (50 if split == "test" else 0), 40).save(
                    root / split / name / f"{i}.png"
                )
    return root


@pytest.fixture(scope="module")
def posts(tmp_path_factory):
    """A jsonl post source: 24 posts of 4 uploaders, tagged with the vocabulary's hashtags."""
    root = tmp_path_factory.mktemp("posts")
    (root / "img").mkdir()
    lines = []
    for i in range(24):
        _picture(1000 + i).save(root / "img" / f"{i}.jpg")
        lines.append(
            {"id": f"p{i}", "image": f"img/{i}.jpg", "tags": [TAGS[i % 4]], "user": f"u{i % 4}"}
        )
    (root / "posts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root / "posts.jsonl"


def _run_redirected(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    """`tagjax ARGV` in a subprocess whose stdout and stderr are files, as in `tagjax ... > log 2> err`."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as o, err.open("wb") as e:
        code = subprocess.run(
            [sys.executable, "-m", "tagjax.cli", *argv],
            stdout=o,
            stderr=e,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
            timeout=600,
        ).returncode
    return code, out.read_text(), err.read_text()


def _json_flagged_commands() -> set[str]:
    """Every command (and vocab action) whose parser has --json."""
    found = set()
    for name in cli.COMMANDS:
        parser, _ = cli.build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        cmd = sub.choices[name]
        actions = next((a for a in cmd._actions if isinstance(a, argparse._SubParsersAction)), None)
        parsers = {f"{name} {k}": p for k, p in actions.choices.items()} if actions else {name: cmd}
        for label, p in parsers.items():
            if any("--json" in a.option_strings for a in p._actions):
                found.add(label)
    return found


# The commands run below with --json; the first test keeps this list complete.
JSON_COMMANDS = {
    "vocab build",
    "vocab show",
    "vocab lookup",
    "vocab rebuild-data",
    "build",
    "train",
    "evaluate",
    "transfer",
    "predict",
    "embed",
    "decontaminate",
    "import-weights",
    "export-weights",
    "demo",
    "study",
}


def test_every_reporting_command_has_json_and_every_flag_has_help():
    assert _json_flagged_commands() == JSON_COMMANDS
    for name in cli.COMMANDS:
        parser, _ = cli.build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        stack = [sub.choices[name]]
        while stack:
            p = stack.pop()
            for a in p._actions:
                if isinstance(a, argparse._SubParsersAction):
                    stack.extend(a.choices.values())
                else:
                    assert a.help, f"tagjax {name}: {a.option_strings or a.dest} has no help"
            # Defaults are printed once: the help of each option names its default at most once.
            text = p.format_help().replace("\n", " ")
            for chunk in text.split("  -")[1:]:
                assert chunk.count("(default: ") <= 1, chunk
            names = {o for a in p._actions for o in a.option_strings}
            # One spelling per meaning: the old ones are hidden aliases, never parser options.
            assert not names & {"--out", "--tfds-data-dir", "--out-dir"}, name


def test_embed_help_prints_the_librarys_default_values():
    # The library (and jax) is imported only when embed runs, so its help writes the values out.
    from tagjax import inference

    parser, _ = cli.build_parser("embed")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["embed"].format_help().split())
    assert f"(default: {inference.DEFAULT_BATCH_SIZE}, tagjax.inference.DEFAULT_BATCH_SIZE)" in text
    assert f"(default: {inference.DEFAULT_THREADS}, tagjax.inference.DEFAULT_THREADS)" in text


def test_vocab_json_is_json_and_nothing_else(tmp_path, capsys):
    assert cli.main(["vocab", "lookup", "--json", "dogs", "tbt", "dog"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["tag"] for r in rows] == ["dogs", "tbt", "dog"]
    assert "as one post" in captured.err  # the text line goes to stderr under --json

    counts = tmp_path / "counts.tsv"
    counts.write_text("".join(f"{t}\t{n}\n" for t, n in [("dog", 9), ("cat", 4), ("tbt", 7)]))
    out = tmp_path / "v.json"
    assert cli.main(["vocab", "build", "--counts", str(counts), "-o", str(out), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["output"] == str(out) and built["num_labels"] == 2

    assert cli.main(["vocab", "show", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    labels = [json.loads(line) for line in captured.out.splitlines()]
    assert sorted(x["name"] for x in labels) == ["cat", "dog"]
    assert "vocabulary: 2 labels" in captured.err  # the summary went to stderr


def test_old_flag_names_still_work_and_warn_once(tmp_path, capsys):
    counts = tmp_path / "counts.tsv"
    counts.write_text("dog\t3\n")
    out = tmp_path / "v.json"
    assert cli.main(["vocab", "build", "--counts", str(counts), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("--out is now --output") == 1 and out.is_file()


def test_config_overrides_may_be_space_separated():
    overrides, rest = cli.split_overrides(
        ["train", "--config", "tiny", "--config.train.batch_size", "64", "--config.a.b=1"]
    )
    assert overrides == ["--config.train.batch_size=64", "--config.a.b=1"]
    assert rest == ["train", "--config", "tiny"]
    cfg = config.load("tiny", overrides[:1])
    assert cfg.train.batch_size == 64


def test_predict_json_and_folders(ckpt, folder, capsys):
    code = cli.main(["predict", "--checkpoint", str(ckpt), "--json", "--top-k", "2", str(folder)])
    assert code == EXIT_SOME_INPUTS_FAILED  # one of the four could not be read
    out = json.loads(capsys.readouterr().out)
    assert [Path(o["image"]).name for o in out] == [
        "broken.png",
        "good0.png",
        "good1.png",
        "good2.png",
    ]
    assert "error" in out[0] and all(len(o["hashtags"]) == 2 for o in out[1:])
    assert "<_io." not in out[0]["error"] and "object at 0x" not in out[0]["error"]


def test_embed_marks_a_bad_image_and_keeps_the_good_rows(ckpt, folder, tmp_path):
    prefix = tmp_path / "emb"
    argv = ["embed", "--checkpoint", str(ckpt), "--input", str(folder), "-o", str(prefix)]
    code, out, err = _run_redirected(tmp_path, *argv, "--json", "--batch-size", "2")
    assert code == EXIT_SOME_INPUTS_FAILED, err
    summary = json.loads(out)
    assert summary["rows"] == 4 and summary["bad_images"] == 1
    assert "\r" not in out + err and "1 of 4 images could not be read" in err
    rows = [json.loads(line) for line in Path(f"{prefix}.index.jsonl").read_text().splitlines()]
    assert [(r["id"], r["valid"]) for r in rows] == [
        ("broken.png", False),
        ("good0.png", True),
        ("good1.png", True),
        ("good2.png", True),
    ]
    emb = np.load(f"{prefix}.npy")
    assert not emb[0].any() and all(emb[i].any() for i in (1, 2, 3))
    assert "<_io." not in rows[0]["error"] and "object at 0x" not in rows[0]["error"]


def test_embed_stops_on_a_folder_of_nothing_readable(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"nope")
    argv = ["embed", "--checkpoint", str(ckpt), "--input", str(bad), "-o", str(tmp_path / "e")]
    assert cli.main(argv) == EXIT_USER_ERROR
    assert "none of the 3 images" in capsys.readouterr().err


def test_embed_output_is_a_prefix_not_a_folder(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "emb"
    out.mkdir()  # `-o emb/` used to write emb.npy beside the folder
    argv = ["embed", "--checkpoint", str(ckpt), "--input", str(folder), "-o", f"{out}/"]
    assert cli.main(argv) == EXIT_USER_ERROR
    assert f"pass {out / 'NAME'}" in capsys.readouterr().err
    assert not (tmp_path / "emb.npy").exists()


def test_build_train_evaluate_redirected(posts, tmp_path):
    """The long-running commands, as in `tagjax X --json > out 2> err`: stdout parses as JSON, no
    carriage-return bar updates in either file."""
    data = tmp_path / "data"
    code, out, err = _run_redirected(
        tmp_path,
        "build",
        f"jsonl:{posts}",
        "-o",
        str(data),
        "--assume-public",
        "--vocab-min-count",
        "1",
        "--max-side",
        "32",
        "--workers",
        "1",
        "--raster-cache",
        "",
        "--heldout-fraction",
        "0.25",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["dataset"] == str(data) and "\r" not in out + err

    run = tmp_path / "run"
    code, out, err = _run_redirected(
        tmp_path,
        "train",
        "--config",
        "tiny",
        "--workdir",
        str(run),
        "--config.train.total_images",
        "64",
        "--config.train.eval_every_images=64",
        "--config.train.checkpoint_every_images=64",
        "--config.optim.warmup_images=32",
        "--json",
    )
    assert code == 0, err
    assert isinstance(json.loads(out), dict) and "\r" not in out + err

    code, out, err = _run_redirected(
        tmp_path, "evaluate", "--checkpoint", str(run), "--dataset", "synthetic", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert Path(result["output"]).is_file() and "\r" not in out + err


def test_transfer_and_decontaminate_json(ckpt, classes, folder, tmp_path):
    code, out, err = _run_redirected(
        tmp_path,
        "transfer",
        "--mode",
        "linear",
        "--checkpoint",
        str(ckpt),
        "--workdir",
        str(tmp_path / "probe"),
        "--dataset",
        str(classes),
        "--json",
    )
    assert code == 0, err
    assert 0.0 <= json.loads(out)["test_top1"] <= 1.0 and "\r" not in out + err


def test_decontaminate_and_weights_json(ckpt, classes, tmp_path, capsys):
    argv = ["decontaminate", "--checkpoint", str(ckpt), "--train", str(classes / "train")]
    argv += ["--eval", str(classes / "test"), "-o", str(tmp_path / "exclude.txt"), "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_train"] == 12 and result["num_eval"] == 8

    pytest.importorskip("safetensors")
    weights = tmp_path / "w.safetensors"
    assert (
        cli.main(["export-weights", "--checkpoint", str(ckpt), "-o", str(weights), "--json"]) == 0
    )
    exported = json.loads(capsys.readouterr().out)
    assert exported["output"] == str(weights) and exported["bytes"] == weights.stat().st_size
    again = tmp_path / "again"
    argv = ["import-weights", str(weights), "--arch", "tiny_resnext", "-o", str(again), "--json"]
    assert cli.main([*argv, "--no-head"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(again)


# One cheap way per command to make a mistake the user must fix: exit 3, one line, no traceback.
USER_ERRORS = {
    "vocab": ["vocab", "lookup", "--vocab", "/no/such/vocab.json", "dog"],
    "build": ["build", "jsonl:/no/such.jsonl"],
    "train": ["train", "--config", "no_such_config", "--workdir", "/tmp/x"],
    "evaluate": ["evaluate", "--checkpoint", "/no/such", "--dataset", "/no/such/data"],
    "transfer": [
        "transfer",
        "--mode",
        "linear",
        "--checkpoint",
        "x",
        "--workdir",
        "y",
        "--config",
        "no_such",
    ],
    "predict": ["predict", "--checkpoint", "/no/such/ckpt", "x.png"],
    "embed": ["embed", "--checkpoint", "/no/such", "--input", "x", "-o", "y", "--batch-size", "0"],
    "decontaminate": [
        "decontaminate",
        "--checkpoint",
        "c",
        "--train",
        "t",
        "--eval",
        "e",
        "-o",
        "o",
        "--threshold",
        "2",
    ],
    "import-weights": [
        "import-weights",
        "/no/such.safetensors",
        "--arch",
        "tiny_resnext",
        "-o",
        "/tmp/no",
    ],
    "export-weights": ["export-weights", "-o", "x.safetensors"],
    "demo": ["demo", "--seeds", "0"],
    "study": ["study", "--config", "no_such_config"],
}


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_exit_codes_per_command(name, capsys, monkeypatch):
    assert set(USER_ERRORS) == set(cli.COMMANDS)
    # 2: a usage error (argparse), whatever the command.
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--no-such-flag"])
    assert e.value.code == EXIT_USAGE
    capsys.readouterr()
    # 3: a user-fixable error, as one line.
    assert cli.main(USER_ERRORS[name]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tagjax {name}: error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    # 130: interrupted (Ctrl-C or SIGTERM) wherever the command is.
    module = cli.COMMANDS[name].load()

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    assert cli.main(USER_ERRORS[name]) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_evaluate_names_a_missing_path(capsys):
    argv = ["evaluate", "--checkpoint", "/no/such", "--dataset", "/nonexistent"]
    assert cli.main(argv) == EXIT_USER_ERROR
    assert "/nonexistent: no such path" in capsys.readouterr().err


def test_log_lines_print_above_a_bar_not_through_it(capsys):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with progress.logging_above_bars():
            bar = progress.progress_bar(total=3, desc="work", enabled=True)
            bar.update(1)
            logging.getLogger("tagjax.test").warning("a log line")
            bar.update(2)
            bar.close()
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    segments = [s.strip() for s in err.replace("\r", "\n").split("\n")]
    assert "WARNING a log line" in segments  # a line of its own, not glued to the bar's text
    assert err.count("a log line") == 1  # once, not again through a second handler
    assert any(s.startswith("work: 100%") for s in segments)


def test_bars_only_on_a_terminal_unless_forced(capsys):
    for enabled in (None, False):  # stderr is captured here: not a terminal
        with progress.progress_bar(total=2, desc="quiet", enabled=enabled) as bar:
            bar.update(2)
    assert capsys.readouterr().err == ""
    with progress.progress_bar(total=2, desc="forced", enabled=True) as bar:
        bar.update(2)
    assert "forced: 100%" in capsys.readouterr().err


def test_every_command_takes_progress_and_no_progress():
    for name in cli.COMMANDS:
        parser, _ = cli.build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        cmd = sub.choices[name]
        nested = next((a for a in cmd._actions if isinstance(a, argparse._SubParsersAction)), None)
        for p in nested.choices.values() if nested else [cmd]:
            flags = {o for a in p._actions for o in a.option_strings}
            assert {"--progress", "--no-progress"} <= flags, p.prog


def test_an_output_below_a_file_is_refused_before_any_work(
    ckpt, folder, tmp_path, capsys, monkeypatch
):
    """evaluate, embed and export-weights check where they will write before reading a checkpoint."""
    from tagjax import inference

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr(inference.Inference, "__init__", never)
    monkeypatch.setattr(checkpoint, "load_for_inference", never)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, output in (
        (["evaluate", "--dataset", "synthetic"], afile / "x.json"),
        (["embed", "--input", str(folder)], afile / "x"),
        (["export-weights"], afile / "sub" / "x.safetensors"),
    ):
        code = cli.main([*argv, "--checkpoint", str(ckpt), "--output", str(output)])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_USER_ERROR, err
        assert (
            err
            == f"tagjax {argv[0]}: error: --output {output}: {afile} is a file, not a directory."
        )
