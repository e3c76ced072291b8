"""Stop a real `tagjax train` run every way it can stop, restart it, and get the unbroken run's result.

Each run is its own process: the tiny config, 32 px, 8 simulated CPU devices, 40 steps of 32 images,
a checkpoint every 8 steps, the loss logged every step.

* reference: 40 steps uninterrupted;
* SIGTERM during step 13 (a scheduler's preemption notice): the run saves step 13 and exits cleanly;
  restarted, it is SIGKILLed after step 19 (restart point: checkpoint 16); restarted again, it finishes;
* SIGKILL while checkpoint 16 is being written in the background: the restart resumes from step 8, the
  half-written step 16 is discarded, nothing else is lost.

Every restart is the same command with no flags. Both interrupted runs end with parameters bitwise
equal to the reference and the same logged loss at every step. The interruption points are made
deterministic by a driver that wraps two functions (the jitted train step; Orbax's JSON writer) to
pause at the chosen moment; the computation itself is untouched.

Also here, because they reuse the reference run: its checkpoint (saved on 8 devices) restores on 4
and on 1 device with identical values, and its backbone goes into a model with a new head.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tagjax import checkpoint

REPO = Path(__file__).resolve().parent.parent
STEPS, BATCH, EVERY = 40, 32, 8
CACHE = os.environ.get(
    "TAGJAX_TEST_JAX_CACHE", str(Path.home() / ".cache" / "tagjax" / "jax_cache_tests")
)
OVERRIDES = [
    f"--config.train.total_images={STEPS * BATCH}",
    f"--config.train.batch_size={BATCH}",
    f"--config.train.checkpoint_every_images={EVERY * BATCH}",
    f"--config.train.log_every_images={BATCH}",
    "--config.train.eval_every_images=0",
    "--config.train.eval_max_images=64",
    "--config.checkpoint.keep_last=10",
    "--config.checkpoint.async_save=True",
    f"--config.train.compilation_cache_dir={CACHE}",
]

# The driver: optional pause points, then the real CLI. PAUSE_AFTER_STEP=k pauses once the jitted step
# has produced step k (before the loop logs or saves it); PAUSE_IN_SAVE=k pauses inside the background
# write of checkpoint k. A pause writes MARKER, then waits until MARKER.continue exists.
_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    marker = Path(os.environ["MARKER"])
    go_on = Path(os.environ["MARKER"] + ".continue")

    def pause(note):
        marker.write_text(note)
        deadline = time.monotonic() + 600
        while not go_on.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    pause_step = int(os.environ.get("PAUSE_AFTER_STEP", "0"))
    pause_save = os.environ.get("PAUSE_IN_SAVE", "")
    if pause_step:
        from tagjax import train
        jit_train_step = train.jit_train_step
        def patched(*args, **kwargs):
            step_fn = jit_train_step(*args, **kwargs)
            def wrapped(state, batch):
                new_state, metrics = step_fn(state, batch)
                if int(new_state.step) == pause_step:
                    pause("step")
                return new_state, metrics
            return wrapped
        train.jit_train_step = patched
    if pause_save:
        import orbax.checkpoint as ocp
        save_fn = ocp.JsonCheckpointHandler._save_fn
        async def slow(self, x, directory):
            if f"/{{pause_save}}.orbax-checkpoint-tmp" in str(directory):
                pause(str(directory))
            return await save_fn(self, x, directory)
        ocp.JsonCheckpointHandler._save_fn = slow
    from tagjax import cli
    sys.exit(cli.main(["train", "--config", "tiny", "--workdir", sys.argv[1], *sys.argv[2:]]))
    """
)


class Run:
    """One `tagjax train` process on ``workdir``; its output goes to ``<workdir>.<name>.log``."""

    def __init__(self, tmp_path: Path, workdir: Path, name: str, **pause):
        driver = tmp_path / "driver.py"
        if not driver.exists():
            driver.write_text(_DRIVER.format(repo=str(REPO)))
        self.marker = Path(f"{workdir}.marker")
        self.marker.unlink(missing_ok=True)
        Path(f"{self.marker}.continue").unlink(missing_ok=True)
        self.log_path = Path(f"{workdir}.{name}.log")
        env = dict(os.environ, MARKER=str(self.marker))
        env.update({key.upper(): str(value) for key, value in pause.items()})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(driver), str(workdir), *OVERRIDES],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def finish(self, timeout: float = 400, status: int = 0) -> str:
        """Waits for the process to exit by itself with ``status``; returns its output."""
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        assert rc == status, self.output()[-4000:]
        return self.output()

    def wait_for(self, ready, timeout: float = 400) -> None:
        """Polls ``ready()``; fails if the process ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                self._log.close()
                pytest.fail("the run ended before the expected point:\n" + self.output()[-3000:])
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail("the run never reached the expected point")
            time.sleep(0.05)

    def resume(self) -> None:
        Path(f"{self.marker}.continue").touch()

    def sigkill(self) -> str:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        return self.output()


def _loss_curve(workdir) -> dict[int, float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train" and "loss" in r}


def _final_variables(workdir):
    variables, meta = checkpoint.load_for_inference(workdir)
    assert meta["step"] == STEPS and meta["images_seen"] == STEPS * BATCH
    return jax.tree.map(np.asarray, variables)


def _assert_bitwise_equal(a, b):
    a, b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    workdir = tmp / "run"
    Run(tmp, workdir, "only").finish()
    return workdir


@pytest.mark.slow
def test_preempted_then_killed_then_restarted_is_exact(tmp_path, reference):
    workdir = tmp_path / "run"
    first = Run(tmp_path, workdir, "first", pause_after_step=13)
    first.wait_for(first.marker.exists)
    os.kill(first.proc.pid, signal.SIGTERM)  # during step 13: the scheduler's notice
    first.resume()
    # It exits by itself with 130 (a clean stop, not the end of the run: launchers resume on it).
    output = first.finish(status=130)
    assert "preempted: checkpoint at step 13 saved" in output
    assert "stopped by a preemption at step 13 of " in output
    assert checkpoint.resolve(workdir).name == "13"  # not a multiple of 8: the preemption save

    second = Run(tmp_path, workdir, "second", pause_after_step=19)
    # SIGKILL after step 19, once checkpoint 16 is complete (renamed into place).
    checkpoint_16 = workdir / "checkpoints" / "16" / "meta"
    second.wait_for(lambda: second.marker.exists() and checkpoint_16.is_dir())
    assert "resuming at step 13" in second.sigkill()
    assert checkpoint.resolve(workdir).name == "16"

    assert "resuming at step 16" in Run(tmp_path, workdir, "third").finish()
    _assert_bitwise_equal(_final_variables(workdir), _final_variables(reference))
    curve, expected = _loss_curve(workdir), _loss_curve(reference)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve == expected  # exact floats, every step


@pytest.mark.slow
def test_sigkill_during_an_async_save_restarts_from_the_previous_checkpoint(tmp_path, reference):
    workdir = tmp_path / "run"
    ckpts = workdir / "checkpoints"
    first = Run(tmp_path, workdir, "first", pause_in_save=16)
    first.wait_for(first.marker.exists)
    first.sigkill()
    assert (ckpts / "16.orbax-checkpoint-tmp").is_dir()  # the interrupted write ...
    assert checkpoint.resolve(workdir).name == "8"  # ... is not a checkpoint
    before = checkpoint.read_metadata(ckpts / "8")

    assert "resuming at step 8" in Run(tmp_path, workdir, "second").finish()
    assert not (ckpts / "16.orbax-checkpoint-tmp").exists()
    assert checkpoint.read_metadata(ckpts / "8") == before  # the previous checkpoint is untouched
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [8, 16, 24, 32, 40]
    _assert_bitwise_equal(_final_variables(workdir), _final_variables(reference))
    assert _loss_curve(workdir) == _loss_curve(reference)


_RESTORE_WORKER = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from absl import flags; flags.FLAGS.mark_as_parsed()
    from tagjax import checkpoint, config as config_lib, models, sharding, train
    workdir, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = config_lib.load("tiny", overrides)
    mesh = sharding.create_mesh(cfg.mesh)
    meta = checkpoint.read_metadata(workdir)
    model = models.create(cfg.model, meta["num_classes"])
    abstract = train.abstract_train_state(cfg, model, mesh, meta["num_classes"])
    mgr = checkpoint.CheckpointManager(workdir, cfg, install_signal_handler=False)
    state, data_state = mgr.restore_latest(abstract)
    mgr.close()
    assert data_state["next_position"] == meta["images_seen"], data_state
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, leaf in leaves:
        assert len(leaf.sharding.device_set) == jax.device_count() == mesh.devices.size
    np.savez(out, **{{jax.tree_util.keystr(p): np.asarray(
        jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for p, x in leaves}})
    print("restored on", jax.device_count())
    """
)


@pytest.mark.slow
def test_trainer_checkpoint_from_8_devices_restores_on_4_and_1(tmp_path, reference):
    """The reference run's TrainState, restored onto the trainer's own abstract state per device count."""
    script = tmp_path / "restore_worker.py"
    script.write_text(_RESTORE_WORKER.format(repo=str(REPO)))
    meta = checkpoint.read_metadata(reference)
    assert meta["device_count"] == 8 and meta["mesh_shape"] == {"data": 8, "fsdp": 1}
    results = {}
    for devices in (8, 4, 1):
        out = tmp_path / f"state_{devices}.npz"
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run(
            [sys.executable, str(script), str(reference), str(out), *OVERRIDES],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=str(REPO),
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"restored on {devices}" in proc.stdout
        results[devices] = dict(np.load(out))
    assert any("opt_state" in k for k in results[8]) and any("batch_stats" in k for k in results[8])
    for devices in (4, 1):
        assert results[devices].keys() == results[8].keys()
        for key, value in results[8].items():
            np.testing.assert_array_equal(results[devices][key], value, err_msg=key)


@pytest.mark.slow
def test_trained_backbone_into_a_model_with_a_new_head(reference):
    """Transfer from a real run: the trunk comes from the checkpoint, the new 7-way head is kept."""
    import jax.numpy as jnp

    from tagjax import models

    backbone, meta = checkpoint.load_backbone(reference)
    assert "fc" not in backbone["params"] and meta["kind"] == "train"
    model = models.create(meta["config"]["model"], 7)
    fresh = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)), train=False)
    variables, _ = checkpoint.restore_backbone(reference, fresh)
    _assert_bitwise_equal(variables["params"]["fc"], fresh["params"]["fc"])
    trunk = {k: v for k, v in variables["params"].items() if k != "fc"}
    _assert_bitwise_equal(trunk, backbone["params"])
    _assert_bitwise_equal(variables["batch_stats"], backbone["batch_stats"])
    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    assert jax.jit(model.apply)(variables, images).shape == (4, 7)
