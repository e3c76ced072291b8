"""Training survives faults: relative paths, failed saves, damaged checkpoints, poisoned state, orphans.

The runs are real `tagjax train` processes (the tiny config, 32 px, 8 simulated CPU devices, 32 images a
step, a checkpoint every 4 steps, the loss logged every step), started from a temporary directory with
the relative ``--workdir relrun``. A small driver can make one checkpoint's background write fail the way
a full disk does. Damage to a checkpoint and poisoned states are checked in-process against the manager
the trainer uses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagjax import checkpoint, cli, input_pipeline, models, sharding, train
from tagjax import config as config_lib
from tagjax.errors import UserError

REPO = Path(__file__).resolve().parent.parent
BATCH, EVERY = 32, 4
CACHE = os.environ.get(
    "TAGJAX_TEST_JAX_CACHE", str(Path.home() / ".cache" / "tagjax" / "jax_cache_tests")
)


def overrides(steps: int) -> list[str]:
    return [
        f"--config.train.total_images={steps * BATCH}",
        f"--config.train.batch_size={BATCH}",
        f"--config.train.checkpoint_every_images={EVERY * BATCH}",
        f"--config.train.log_every_images={BATCH}",
        "--config.train.eval_every_images=0",
        "--config.train.eval_max_images=32",
        "--config.optim.warmup_images=0",
        "--config.checkpoint.keep_last=10",
        f"--config.train.compilation_cache_dir={CACHE}",
    ]


# FAIL_SAVE=k: the background write of checkpoint k fails as on a full disk.
_DRIVER = textwrap.dedent(
    """
    import errno, os, sys
    sys.path.insert(0, {repo!r})
    fail = os.environ.get("FAIL_SAVE", "")
    if fail:
        import orbax.checkpoint as ocp
        save_fn = ocp.JsonCheckpointHandler._save_fn
        async def full_disk(self, x, directory):
            if f"/{{fail}}.orbax-checkpoint-tmp" in str(directory):
                raise OSError(errno.ENOSPC, "No space left on device")
            return await save_fn(self, x, directory)
        ocp.JsonCheckpointHandler._save_fn = full_disk
    if __name__ == "__main__":  # data workers are spawned: they import this file again
        from tagjax import cli
        sys.exit(cli.main(["train", "--config", "tiny", *sys.argv[1:]]))
    """
)


def train_cli(cwd: Path, steps: int, *extra: str, env=None, timeout=400):
    """`tagjax train --workdir relrun` run from ``cwd``; returns (exit status, stdout+stderr)."""
    driver = cwd / "driver.py"
    if not driver.exists():
        driver.write_text(_DRIVER.format(repo=str(REPO)))
    proc = subprocess.run(
        [sys.executable, str(driver), "--workdir", "relrun", *overrides(steps), *extra],
        cwd=str(cwd),
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def train_rows(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train" and "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """8 steps with a relative --workdir: checkpoints 4 and 8 under <tmp>/relrun."""
    cwd = tmp_path_factory.mktemp("trained")
    rc, out = train_cli(cwd, 8)
    assert rc == 0, out[-3000:]
    workdir = cwd / "relrun"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"], out[-3000:]
    return workdir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "relrun", symlinks=True)
    return tmp_path / "relrun"


# ----------------------------------------------------------------------------------------------------
# 1. Relative paths
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_relative_workdir_trains_checkpoints_and_resumes(trained, tmp_path):
    assert checkpoint.read_metadata(trained)["step"] == 8
    copy_run(trained, tmp_path)
    rc, out = train_cli(tmp_path, 12)
    assert rc == 0, out[-3000:]
    assert "resuming at step 8" in out
    workdir = tmp_path / "relrun"
    assert checkpoint.resolve(workdir).name == "12"
    assert [r["step"] for r in train_rows(workdir)] == list(range(1, 13))


def test_command_paths_are_made_absolute_once_and_urls_are_left_alone(tmp_path, monkeypatch):
    from tagjax.commands import paths
    from tagjax.metrics_writer import as_path

    monkeypatch.chdir(tmp_path)
    assert paths.path("runs/a") == str(tmp_path / "runs" / "a")
    assert paths.path("~/x") == str(Path.home() / "x")
    assert paths.path("gs://bucket/run") == "gs://bucket/run"
    assert as_path("runs/a") == tmp_path / "runs" / "a"
    assert str(as_path("gs://bucket/run")) == "gs://bucket/run"
    parser, _ = cli.build_parser("train")
    args = parser.parse_args(["train", "--config", "tiny", "--workdir", "relrun"])
    assert args.workdir == str(tmp_path / "relrun") and args.config == "tiny"


def test_relative_paths_for_predict_export_import_and_the_python_api(tmp_path, monkeypatch, capsys):
    from tagjax import transfer
    from tagjax import vocab as vocab_lib

    monkeypatch.chdir(tmp_path)
    vocab = vocab_lib.build_vocabulary({"dog": 10, "cat": 5, "car": 4, "face": 7}, mode="nouns")
    cfg = config_lib.load("tiny")
    transfer.write_random_init_checkpoint(
        cfg,
        Path("pred/checkpoints/0"),
        num_classes=vocab.num_labels,
        metadata={"vocab_fingerprint": vocab.fingerprint()},
    )
    vocab.save(Path("pred/vocab.json"))
    variables, meta = checkpoint.load_for_inference("pred")
    assert meta["num_classes"] == vocab.num_labels

    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save("img.png")
    assert cli.main(["predict", "--checkpoint", "pred", "--json", "img.png"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == str(tmp_path / "img.png")
    assert cli.main(["export-weights", "pred", "--out", "w.safetensors"]) == 0
    assert (tmp_path / "w.safetensors").is_file()
    assert (
        cli.main(["import-weights", "w.safetensors", "--arch", "tiny_resnext", "--out", "imported"])
        == 0
    )
    again, _ = checkpoint.load_for_inference("imported")
    np.testing.assert_array_equal(
        np.asarray(again["params"]["fc"]["kernel"]), np.asarray(variables["params"]["fc"]["kernel"])
    )


# ----------------------------------------------------------------------------------------------------
# 2. A failed save; torn and stale log rows
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failed_save_stops_the_run_and_the_restart_resumes_from_the_previous_one(tmp_path):
    rc, out = train_cli(tmp_path, 12, env={"FAIL_SAVE": "8"})
    assert rc == 3, out[-3000:]
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert (
        "checkpoint 8 could not be written (OSError: [Errno 28] No space left on device)"
        in (errors[0])
    )
    workdir = tmp_path / "relrun"
    assert checkpoint.resolve(workdir).name == "4"  # the previous checkpoint stays the newest
    steps_logged = [r["step"] for r in train_rows(workdir)]
    assert 4 < max(steps_logged) <= 9  # stopped at the first step boundary after the failure

    # A torn last line, as a kill mid-write on some filesystems or a full disk leaves it.
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "step": 9, "lo')
    rc, out = train_cli(tmp_path, 12)
    assert rc == 0, out[-3000:]
    assert "resuming at step 4" in out and "last line is incomplete" in out
    # Rows logged after step 4 by the failed run are gone: one row per step, as in one unbroken run.
    assert [r["step"] for r in train_rows(workdir)] == list(range(1, 13))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "4", "8"]
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # the resumed run writes a fresh file (purge_step marks the old rows)


def test_metric_writer_keeps_rows_up_to_the_restored_step(tmp_path, caplog):
    from tagjax.metrics_writer import MetricWriter, read_metrics

    with MetricWriter(tmp_path) as writer:
        for step in range(1, 7):
            writer.write("train", step, step * 2, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"split": "tr')
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 7))
    assert "incomplete" in caplog.text
    with MetricWriter(tmp_path, resume_step=4) as writer:
        writer.write("train", 5, 10, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 0.5),
    ]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_metrics(tmp_path)


# ----------------------------------------------------------------------------------------------------
# 3. Damaged checkpoints: verified on start, skipped with one line, restore_step
# ----------------------------------------------------------------------------------------------------


def _array_files(step_dir: Path) -> list[Path]:
    """The OCDBT data files of the state. Which of them hold live array bytes (and which are superseded
    by a later write of the same save) varies from save to save, so a damage hits them all."""
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _delete_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def _truncate_array_files(step_dir):
    for f in _array_files(step_dir):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _overwrite_array_bytes(step_dir):
    for f in _array_files(step_dir):
        data = bytearray(f.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(range(64))[: len(data) - middle]
        f.write_bytes(bytes(data))


def _delete_meta_item(step_dir):
    shutil.rmtree(step_dir / "meta")


def _delete_data_item(step_dir):
    shutil.rmtree(step_dir / "data")


def _delete_manifest(step_dir):
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _silently_changed_values(step_dir):
    """The bytes still decode, but to other values: only the checksums written at save time see it."""
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["checksums"]["params/fc/kernel"] ^= 1
    meta_file.write_text(json.dumps(meta))


DAMAGE = {
    "deleted _METADATA": _delete_metadata,
    "truncated array files": _truncate_array_files,
    "overwritten array bytes": _overwrite_array_bytes,
    "missing meta item": _delete_meta_item,
    "missing data item": _delete_data_item,
    "missing OCDBT manifest": _delete_manifest,
    "values differing from the checksums": _silently_changed_values,
}


def _restore(workdir: Path, *extra: str):
    cfg = config_lib.load("tiny", overrides(8) + list(extra))
    mesh = sharding.create_mesh(cfg.mesh)
    meta = checkpoint.read_metadata(workdir / "checkpoints" / "4")
    model = models.create(cfg.model, meta["num_classes"])
    abstract = train.abstract_train_state(cfg, model, mesh)
    with checkpoint.CheckpointManager(workdir, cfg, install_signal_handler=False) as mgr:
        state, data_state = mgr.restore_latest(abstract)
    return state, data_state


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restored(
    trained, tmp_path, caplog, damage
):
    workdir = copy_run(trained, tmp_path)
    DAMAGE[damage](workdir / "checkpoints" / "8")
    state, data_state = _restore(workdir)
    assert int(state.step) == 4 and data_state["next_position"] == 4 * BATCH
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    named = [w for w in warnings if "checkpoints/8" in w]
    assert len(named) == 1 and "\n" not in named[0] and "damaged" in named[0], warnings
    assert not (workdir / "checkpoints" / "8").exists()
    assert (workdir / checkpoint.SET_ASIDE_DIRNAME / "8-damaged").is_dir()


@pytest.mark.slow
def test_the_cli_resumes_from_the_intact_checkpoint_after_damage(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    _overwrite_array_bytes(workdir / "checkpoints" / "8")
    rc, out = train_cli(tmp_path, 12)
    assert rc == 0, out[-3000:]
    assert "checkpoints/8 is damaged" in out and "resuming at step 4" in out
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "4", "8"]


@pytest.mark.slow
def test_restore_step_picks_a_checkpoint_and_sets_newer_ones_aside(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    with pytest.raises(UserError, match=r"restore_step=6: no checkpoint of that step .*4, 8"):
        _restore(workdir, "--config.checkpoint.restore_step=6")
    state, _ = _restore(workdir, "--config.checkpoint.restore_step=4")
    assert int(state.step) == 4
    assert (workdir / checkpoint.SET_ASIDE_DIRNAME / "8-newer").is_dir()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4"]


# ----------------------------------------------------------------------------------------------------
# 4. Nothing non-finite is applied or saved
# ----------------------------------------------------------------------------------------------------


def _tiny_state(cfg):
    mesh = sharding.create_mesh(cfg.mesh)
    model = models.create(cfg.model, 8)
    return mesh, model, train.create_train_state(cfg, model, mesh)


def _equal_trees(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_update_with_infinite_batch_norm_statistics_is_not_applied():
    cfg = config_lib.load("tiny")
    _, _, state = _tiny_state(cfg)
    poisoned = jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), state.batch_stats)
    params = jax.tree.map(lambda x: x + 1.0, state.params)
    new, nonfinite = train.apply_if_finite(
        state, jnp.float32(1.0), jnp.float32(1.0), params, poisoned, state.opt_state
    )
    assert float(nonfinite) == 1.0 and int(new.step) == int(state.step) + 1
    _equal_trees(new.params, state.params)
    _equal_trees(new.batch_stats, state.batch_stats)


def test_the_skip_policy_leaves_the_whole_state_untouched_under_a_nan_learning_rate():
    cfg = config_lib.load("tiny", ["--config.train.nan_policy=skip"])
    mesh, model, state = _tiny_state(cfg)
    before = jax.tree.map(
        np.asarray, {k: getattr(state, k) for k in ("params", "batch_stats", "opt_state")}
    )
    step = train.jit_train_step(
        cfg, model, mesh, state, schedule=lambda s: jnp.where(s >= 0, jnp.nan, 0.1)
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (BATCH, 32, 32, 3), dtype=np.uint8),
        "labels": rng.integers(0, 8, (BATCH, 1)).astype(np.int32),
    }
    new, metrics = step(state, sharding.global_batch(batch, mesh))
    assert float(metrics["nonfinite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    assert int(new.step) == 1
    _equal_trees(new.params, before["params"])
    _equal_trees(new.batch_stats, before["batch_stats"])
    _equal_trees(new.opt_state, before["opt_state"])


def test_a_state_with_nan_batch_norm_statistics_is_never_saved(tmp_path):
    cfg = config_lib.load("tiny", ["--config.checkpoint.async_save=False"])
    _, _, state = _tiny_state(cfg)
    poisoned = state.replace(
        batch_stats=jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan), state.batch_stats)
    )
    with checkpoint.CheckpointManager(tmp_path, cfg, install_signal_handler=False) as mgr:
        assert mgr.save(1, state)
        with pytest.raises(UserError, match=r"not saving checkpoint 2: .*NaN/Inf in batch_stats"):
            mgr.save(2, poisoned)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optim.base_lr=-0.1", "config.optim.base_lr=-0.1: must not be negative"),
        ("--config.optim.base_lr=nan", "config.optim.base_lr=nan: must be a finite number"),
        ("--config.train.batch_size=0", "config.train.batch_size=0: must be greater than 0"),
        ("--config.data.image_size=0", "config.data.image_size=0: must be greater than 0"),
        ("--config.data.mean=(1,2", "bad config or override"),
        ("--config.train.profile_steps=(1,x)", "config.train.profile_steps="),
    ],
)
def test_bad_numbers_are_one_line_errors_before_anything_runs(tmp_path, capsys, override, message):
    code = cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "w"), override])
    err = capsys.readouterr().err
    assert code == 3 and message in err and len(err.strip().splitlines()) == 1, err


def test_unusable_workdirs_and_cache_dirs_are_one_line_errors(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["train", "--config", "tiny", "--workdir", str(a_file)]) == 3
    assert "is a file, not a directory" in capsys.readouterr().err
    cache = f"--config.train.compilation_cache_dir={a_file}/cache"
    assert cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "w"), cache]) == 3
    err = capsys.readouterr().err
    assert "compilation_cache_dir" in err and "cannot be written" in err
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        assert cli.main(["train", "--config", "tiny", "--workdir", str(read_only / "w")]) == 3
        assert "is not writable" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# 5. Data workers and shared memory after SIGKILL
# ----------------------------------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigkill_with_data_workers_leaves_no_process_and_no_shared_memory(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(repo=str(REPO)))
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [
            *(sys.executable, str(driver), "--workdir", "relrun"),
            *overrides(400),
            *("--config.data.num_workers=2", "--config.checkpoint.async_save=False"),
        ],
        cwd=str(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    metrics = tmp_path / "relrun" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never trained"
        time.sleep(0.2)
    children = _descendants(proc.pid)
    shm = Path("/dev/shm")
    prefix = input_pipeline.worker_shm_prefix(proc.pid)
    assert len(children) >= 3  # 2 grain workers and the resource tracker (at least)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    deadline = time.monotonic() + 20
    while any(_alive(c) for c in children) or list(shm.glob(prefix + "*")):
        if time.monotonic() > deadline:
            survivors = [c for c in children if _alive(c)]
            pytest.fail(f"survivors {survivors}, segments {list(shm.glob(prefix + '*'))}")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_normal_run_with_data_workers_leaks_no_shared_memory(tmp_path):
    rc, out = train_cli(tmp_path, 6, "--config.data.num_workers=2")
    assert rc == 0, out[-3000:]
    assert "leaked" not in out
