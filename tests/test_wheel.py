"""The package as a user installs it: build the wheel, install it into a fresh virtual environment, run it.

Everything runs offline from uv's cache: the build backend (setuptools) and the dependencies at exactly
the versions of uv.lock (exported as a PEP 751 pylock.toml, whose wheel URLs are the cache's keys). The
commands run with the working directory outside the checkout and without it on the path, so they see
only what the wheel ships: the configs (``--config tiny``), the vocabulary data, the WordNet tables.

The wheel is built through the sdist (``uv build`` makes the sdist, then the wheel from it), so a file the
sdist forgets fails here too, and setuptools' in-tree ``build/`` folder cannot leak stale files into it.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _uv() -> str:
    """The uv executable launch/setup.sh installed (on PATH, or in the user's scripts folder)."""
    found = shutil.which("uv") or shutil.which("uv", path=str(Path.home() / ".local" / "bin"))
    if found is None:
        pytest.skip("uv is not installed (launch/setup.sh installs it)")
    return found


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that points Python at the checkout, uv forced offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(UV_OFFLINE="1", UV_NO_PROGRESS="1", JAX_PLATFORMS="cpu", **extra)
    return env


def _run(args, cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment with the built wheel installed: (bin folder, a work folder)."""
    uv = _uv()
    root = tmp_path_factory.mktemp("wheel")
    env = _clean_env()
    started = time.monotonic()

    dist = root / "dist"
    _run([uv, "build", "--quiet", "--out-dir", dist, REPO], cwd=root, env=env)
    wheels = list(dist.glob("tagjax-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "tagjax/configs/tiny.py" in names and "tagjax/configs/default.py" in names
    assert "tagjax/data/vocab_in1k.json.gz" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # The checkout's configs/ is a link to tagjax/configs; the wheel holds the package only.
    assert not any(n.startswith("configs/") for n in names)

    lock = root / "lock" / "pylock.toml"  # uv insists on this file name
    lock.parent.mkdir()
    export = ["export", "--quiet", "--frozen", "--no-emit-project", "--format", "pylock.toml"]
    _run([uv, *export, "--project", REPO, "--output-file", lock], cwd=root, env=env)
    venv = root / "venv"
    _run([uv, "venv", "--quiet", "--python", sys.executable, venv], cwd=root, env=env)
    python = venv / "bin" / "python"
    _run([uv, "pip", "install", "--quiet", "--python", python, "-r", lock], cwd=root, env=env)
    _run([uv, "pip", "install", "--quiet", "--python", python, "--no-deps", wheels[0]], root, env)

    work = root / "work"
    work.mkdir()
    print(f"wheel built and installed in {time.monotonic() - started:.1f} s")
    return venv / "bin", work


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    bin_dir, work = installed
    script = (
        "import json, sys, tagjax, tagjax.config as c; "
        "print(json.dumps([tagjax.__file__, str(c.PACKAGED_CONFIGS), sys.path]))"
    )
    out = _run([bin_dir / "python", "-c", script], work, _clean_env())
    package, configs, path = json.loads(out)
    venv = bin_dir.parent.resolve()
    for location in (Path(package).resolve(), Path(configs).resolve()):
        assert location.is_relative_to(venv) and not location.is_relative_to(REPO), location
    assert not any(Path(p).resolve() == REPO for p in path if p), path


def test_a_users_config_file_starts_from_the_packaged_defaults(installed):
    bin_dir, work = installed
    (work / "my_config.py").write_text(
        "from tagjax.configs import default\n\n\n"
        "def get_config(arg=None):\n"
        "    c = default.get_config(arg)\n"
        "    c.train.batch_size = int(arg or 7)\n"
        "    return c\n"
    )
    script = (
        "from tagjax import config; "
        "print(config.load('my_config.py:12').train.batch_size, "
        "config.load('ig940m_1k5_32x8d:64').train.batch_size)"
    )
    out = _run([bin_dir / "python", "-c", script], work, _clean_env())
    assert out.split() == ["12", "8064"]


def test_help_lists_the_subcommands(installed):
    bin_dir, work = installed
    out = _run([bin_dir / "tagjax", "--help"], work, _clean_env())
    for command in ("train", "vocab", "build", "evaluate", "transfer", "demo"):
        assert command in out


def test_vocab_lookup_uses_the_packaged_vocabulary_and_wordnet(installed):
    bin_dir, work = installed
    tagjax = bin_dir / "tagjax"
    # The built-in in1k vocabulary has ImageNet's dog breeds, not #dog; WordNet still explains #dog.
    out = _run([tagjax, "vocab", "lookup", "dog", "goldenretriever"], work, _clean_env())
    assert "dog\t-> dropped: not_in_vocab\tdog.n.01" in out
    assert "goldenretriever\t-> label 484 #goldenretriever\tsynsets: golden_retriever.n.01" in out
    # A vocabulary built from counts: #Dogs, #dogs and #dog are one canonical hashtag, #dog.
    (work / "counts.tsv").write_text("dog\t500\ndogs\t120\ngoldenretriever\t80\ntbt\t900\n")
    build = ["vocab", "build", "--counts", "counts.tsv", "--mode", "nouns", "--out", "vocab.json"]
    _run([tagjax, *build], work, _clean_env())
    out = _run([tagjax, "vocab", "lookup", "--vocab", "vocab.json", "#Dogs"], work, _clean_env())
    assert out.startswith("#Dogs\t-> label 0 #dog\tsynsets: dog.n.01,"), out


def test_train_tiny_by_name_writes_metrics_and_a_checkpoint(installed):
    bin_dir, work = installed
    workdir = (work / "run").resolve()
    steps = 2
    batch = 32  # the tiny config's train.batch_size
    overrides = {
        "train.batch_size": batch,
        "train.total_images": steps * batch,
        "optim.warmup_images": batch,
        "train.log_every_images": batch,
        "train.eval_every_images": steps * batch,
        "train.eval_max_images": 64,
        "train.checkpoint_every_images": steps * batch,
    }
    train = ["train", "--config", "tiny", "--workdir", workdir]
    train += [f"--config.{key}={value}" for key, value in overrides.items()]
    _run([bin_dir / "tagjax", *train], work, _clean_env(), timeout=180)
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "tiny_resnext"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train" and "loss" in r]
    assert train_steps == [1, 2]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["num_images"] == 64 and 0 < evals[0]["mAP"] <= 1
    assert (workdir / "checkpoints" / str(steps) / "commit_success.txt").is_file()
