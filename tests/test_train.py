"""tagjax.train / tagjax.loop / tagjax.sharding: the step is device-count independent, accumulation is
exact, the loop learns, logs and guards against NaN, and ``tagjax train --help`` does not load JAX.

Runs on the 8 simulated CPU devices of conftest, with the tiny ResNeXt at 32 px.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagjax import bad_records, cli, loop, losses, metrics_writer, models, sharding, train
from tagjax.configs import tiny
from tagjax.errors import UserError

NUM_CLASSES = 10


def _config(**overrides):
    cfg = tiny.get_config()
    cfg.optim.warmup_images = 0  # full rate from the first step, so one step moves the parameters
    cfg.train.batch_size = 16
    cfg.train.total_images = 16 * 100
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def _batches(n, batch=16, size=32, max_labels=4, seed=0):
    """Deterministic random tagged batches (host numpy, the input pipeline's format)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = np.full((batch, max_labels), -1, np.int32)
        for i in range(batch):
            k = rng.integers(1, max_labels + 1)
            labels[i, :k] = rng.choice(NUM_CLASSES, k, replace=False)
        out.append(
            {
                "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                "labels": labels,
            }
        )
    return out


def _run_steps(cfg, devices, batches):
    mesh = sharding.create_mesh(cfg.mesh, devices=devices)
    model = models.create(cfg.model, NUM_CLASSES)
    state = train.create_train_state(cfg, model, mesh, NUM_CLASSES)
    init_params = jax.tree.map(np.asarray, state.params)
    step = train.jit_train_step(cfg, model, mesh, state)
    metrics = []
    for b in batches:
        state, m = step(state, sharding.global_batch(b, mesh))
        metrics.append(jax.device_get(m))
    return state, metrics, init_params


def _assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    a, b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("bn_group_size", [0, 2])
def test_same_step_on_one_and_eight_devices(bn_group_size):
    """1 device vs data=8 vs data=2 x fsdp=4: same init, same losses, same parameters and statistics."""
    batches = _batches(2)
    base = {"model.bn_group_size": bn_group_size, "mesh.fsdp_min_size": 64}
    ref_state, ref_metrics, ref_init = _run_steps(
        _config(**base, **{"mesh.data": 1, "mesh.fsdp": 1}), jax.devices()[:1], batches
    )
    for data, fsdp in [(8, 1), (2, 4)]:
        cfg = _config(**base, **{"mesh.data": data, "mesh.fsdp": fsdp})
        state, metrics, init = _run_steps(cfg, jax.devices(), batches)
        _assert_trees_close(
            init, ref_init, rtol=0, atol=0
        )  # initialization does not depend on the mesh
        for m, r in zip(metrics, ref_metrics):
            np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
            np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-4)
        _assert_trees_close(state.params, ref_state.params)
        _assert_trees_close(state.batch_stats, ref_state.batch_stats)
        _assert_trees_close(state.opt_state, ref_state.opt_state)
        assert int(state.step) == 2
        if fsdp > 1:  # the FSDP mesh really shards: the largest conv kernel is split over "fsdp"
            kernel = state.params["layer2_0"]["conv3"]["kernel"]
            assert "fsdp" in kernel.sharding.spec
            assert kernel.addressable_shards[0].data.size == kernel.size // fsdp


def test_gradient_accumulation_over_four_micro_batches_equals_one_large_batch():
    """Same update (params, momentum, BN running statistics) with per-group BN statistics."""
    batches = _batches(2)
    common = {"model.bn_group_size": 2, "mesh.data": 1, "mesh.fsdp": 1}
    one, m_one, _ = _run_steps(_config(**common), jax.devices()[:1], batches)
    four, m_four, _ = _run_steps(
        _config(**common, **{"train.grad_accum_steps": 4}), jax.devices()[:1], batches
    )
    for a, b in zip(m_four, m_one):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["precision@1"], b["precision@1"], rtol=1e-6)
    _assert_trees_close(four.params, one.params, rtol=1e-4, atol=1e-6)
    _assert_trees_close(four.batch_stats, one.batch_stats, rtol=1e-4, atol=1e-6)
    _assert_trees_close(four.opt_state, one.opt_state, rtol=1e-4, atol=1e-6)


def test_microbatch_split_keeps_groups_whole_and_covers_the_batch():
    x = jnp.arange(16)
    micro = np.asarray(train.split_microbatches(x, 4, 2))
    assert micro.shape == (4, 4)
    np.testing.assert_array_equal(micro[0], [0, 1, 8, 9])  # groups 0 and 4 (strided by 4 groups)
    np.testing.assert_array_equal(np.sort(micro.ravel()), np.arange(16))
    for row in micro:  # every group of 2 consecutive images stays together
        assert all(row[i] % 2 == 0 and row[i + 1] == row[i] + 1 for i in range(0, 4, 2))


def test_nonfinite_update_is_not_applied():
    cfg = _config(**{"mesh.data": 1, "mesh.fsdp": 1, "train.nan_policy": "skip"})
    mesh = sharding.create_mesh(cfg.mesh, devices=jax.devices()[:1])
    model = models.create(cfg.model, NUM_CLASSES)
    state = train.create_train_state(cfg, model, mesh, NUM_CLASSES)
    poisoned = state.params["fc"]["bias"].at[0].set(jnp.nan)
    state = state.replace(params={**state.params, "fc": {**state.params["fc"], "bias": poisoned}})
    before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.batch_stats))
    step = train.jit_train_step(cfg, model, mesh, state)
    state, metrics = step(state, sharding.global_batch(_batches(1)[0], mesh))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(state.step) == 1  # the step (images seen) advances ...
    after = (state.params, state.opt_state, state.batch_stats)
    _assert_trees_close(
        after, before, rtol=0, atol=0
    )  # ... parameters, momentum and statistics do not


def test_nonfinite_guard_skips_and_stops_after_too_many_in_a_row():
    guard = loop.NonfiniteGuard("skip", max_consecutive=2, batch_size=32)
    assert guard.passes(1, {"loss": 1.0, "nonfinite": 0.0})
    assert not guard.passes(2, {"loss": float("nan"), "nonfinite": 1.0})
    assert not guard.passes(3, {"loss": float("nan"), "nonfinite": 1.0})
    assert guard.passes(4, {"loss": 1.0, "nonfinite": 0.0})  # a finite step resets the streak ...
    assert guard.skipped == 2  # ... but not the count the log reports
    guard.passes(5, {"nonfinite": 1.0})
    guard.passes(6, {"nonfinite": 1.0})
    with pytest.raises(
        UserError, match=r"3 consecutive .*config.train.max_consecutive_nonfinite=2"
    ):
        guard.passes(7, {"nonfinite": 1.0})
    with pytest.raises(UserError, match="nan_policy='retry': choose one of stop, skip"):
        loop.NonfiniteGuard("retry", 2, 32)


def test_log_and_eval_points_are_counted_in_images():
    cadence = loop.Cadence(batch_size=32, num_steps=10, log_every_images=64, eval_every_images=96)
    assert [s for s in range(1, 11) if cadence.should_log(s, stop=10)] == [2, 4, 6, 8, 10]
    # A run stopped early (fine-tuning's max_steps) logs its last step.
    assert [s for s in range(1, 6) if cadence.should_log(s, stop=5)] == [2, 4, 5]
    # Every 96 images is after steps 3, 6 and 9; the last step's evaluation is the caller's to report.
    assert [s for s in range(1, 11) if cadence.should_eval(s)] == [3, 6, 9]
    with pytest.raises(UserError, match="less than one batch of 16"):
        loop.Cadence.from_config(_config(**{"train.total_images": 8}).train)


def test_one_bad_record_rule():
    rule = bad_records.too_many_bad
    assert not rule(bad=50, read=999, max_fraction=0.01, min_reads=1000)  # too few reads to judge
    assert rule(bad=11, read=1000, max_fraction=0.01, min_reads=1000)
    assert not rule(
        bad=10, read=1000, max_fraction=0.01, min_reads=1000
    )  # at the threshold is fine
    assert rule(
        bad=2, read=100, max_fraction=0.01, min_reads=1000, final=True
    )  # a whole pass is judged
    counter = bad_records.BadRecordCounter.from_data_config(_config().data, "training records")
    counter.add(read=counter.min_reads, bad=0)
    with pytest.raises(
        UserError, match=r"of \d+ training records were bad .*max_bad_record_fraction"
    ):
        counter.add(read=100, bad=counter.min_reads)


@pytest.mark.parametrize("command", ["train", "transfer"])
def test_command_help_does_not_load_jax(command):
    code = (
        "import sys\n"
        "from tagjax import cli\n"
        "try:\n"
        f"    cli.main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('loaded jax' if 'jax' in sys.modules else 'no jax')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--workdir" in out.stdout and out.stdout.strip().endswith("no jax")


def test_eval_step_sums_over_real_images_only():
    cfg = _config(**{"mesh.data": 1, "mesh.fsdp": 1})
    mesh = sharding.create_mesh(cfg.mesh, devices=jax.devices()[:1])
    model = models.create(cfg.model, NUM_CLASSES)
    state = train.create_train_state(cfg, model, mesh, NUM_CLASSES)
    batch = dict(_batches(1)[0])
    batch["mask"] = np.arange(16) < 11
    out = jax.device_get(
        train.jit_eval_step(cfg, model, mesh, state)(state, sharding.global_batch(batch, mesh))
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = train.normalize_images(jnp.asarray(batch["image"]), cfg.data, jnp.float32)
    logits = model.apply(variables, images, train=False)
    per_image = np.asarray(losses.softmax_cross_entropy(logits, jnp.asarray(batch["labels"])))
    assert out["count"] == 11
    np.testing.assert_allclose(out["loss_sum"], per_image[:11].sum(), rtol=1e-5)
    np.testing.assert_allclose(out["scores"], jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_tiny_training_run_learns_and_writes_logs(tmp_path, capsys):
    """`tagjax train --config tiny` on the synthetic tagged task: the loss falls, held-out mAP beats
    chance, the JSONL/TensorBoard logs and checkpoints are there, and a rerun resumes instead of repeating."""
    workdir = tmp_path / "run"
    steps, batch = 60, 32
    args = [
        "train",
        "--config",
        "tiny",
        "--workdir",
        str(workdir),
        f"--config.train.total_images={steps * batch}",
        f"--config.train.log_every_images={10 * batch}",
        f"--config.train.eval_every_images={30 * batch}",
        f"--config.train.checkpoint_every_images={30 * batch}",
        "--config.optim.warmup_images=320",
    ]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "img/s" in err and "ETA" in err and "MFU n/a" in err  # CPU: no peak FLOPs
    rows = metrics_writer.read_metrics(workdir, "train")
    losses_logged = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30, 40, 50, 60]
    assert losses_logged[-1] < 0.85 * losses_logged[0], losses_logged
    last = rows[-1]
    assert last["images_per_second"] > 0 and last[
        "images_per_second_per_device"
    ] * 8 == pytest.approx(last["images_per_second"])
    evals = metrics_writer.read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [30, 60]
    # Chance mAP on the synthetic task is about its label frequency (~0.1-0.2); a learning model is far above.
    assert evals[-1]["mAP"] > 0.3 and evals[-1]["loss"] < evals[0]["loss"] + 0.05
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "tiny_resnext"
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["30", "60"]

    # Rerunning a finished run resumes at its last step: no step is trained or logged twice, and its
    # --json document still holds the final metrics (the ones logged at step 60).
    capsys.readouterr()
    assert cli.main([*args, "--json"]) == 0
    rows_again = metrics_writer.read_metrics(workdir, "train")
    assert [r["step"] for r in rows_again if "loss" in r] == [10, 20, 30, 40, 50, 60]
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 60
    assert summary["train_loss"] == losses_logged[-1] and summary["eval_mAP"] == evals[-1]["mAP"]


def test_nan_policy_stop_ends_the_run_with_a_clear_message(tmp_path):
    cfg = tiny.get_config()
    cfg.optim.base_lr = 1e12
    cfg.optim.warmup_images = 0
    cfg.train.total_images = 32 * 20
    cfg.train.eval_every_images = 0
    cfg.train.checkpoint_every_images = 0
    with pytest.raises(UserError, match=r"NaN/Inf at step \d+ .*nan_policy=skip"):
        train.train_and_evaluate(cfg, tmp_path / "run")


def test_metric_writer_drops_lines_past_the_resumed_step(tmp_path):
    with metrics_writer.MetricWriter(tmp_path) as w:
        for step in (1, 2, 3, 4):
            w.write("train", step, step * 8, {"loss": float(step), "precision@1": float("nan")})
    assert metrics_writer.read_metrics(tmp_path)[0]["precision@1"] is None  # strict JSON, no NaN
    with metrics_writer.MetricWriter(tmp_path, resume_step=2) as w:
        w.write("train", 3, 24, {"loss": 30.0})
    rows = metrics_writer.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_mesh_shapes_and_errors():
    assert sharding.mesh_shape(_config(**{"mesh.data": -1, "mesh.fsdp": 4}).mesh, 8) == (2, 4)
    assert sharding.mesh_shape(_config(**{"mesh.data": 2, "mesh.fsdp": -1}).mesh, 8) == (2, 4)
    with pytest.raises(UserError, match="device count"):
        sharding.mesh_shape(_config(**{"mesh.data": 3, "mesh.fsdp": 1}).mesh, 8)
    with pytest.raises(UserError, match="divide"):
        sharding.mesh_shape(_config(**{"mesh.data": -1, "mesh.fsdp": 3}).mesh, 8)
    mesh = sharding.create_mesh(_config(**{"mesh.data": 8, "mesh.fsdp": 1}).mesh)
    with pytest.raises(UserError, match="grad_accum_steps x bn_group_size"):
        train.validate_batch_layout(
            _config(**{"train.grad_accum_steps": 3, "model.bn_group_size": 2}), mesh
        )
    with pytest.raises(UserError, match="divisible by the 8 devices"):
        train.validate_batch_layout(_config(**{"train.batch_size": 12}), mesh)


def test_fsdp_rule_splits_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((3, 3, 64, 256), 4, 0) == jax.sharding.PartitionSpec(
        None, None, None, "fsdp"
    )
    assert sharding.fsdp_spec((2048, 17003), 8, 0) == jax.sharding.PartitionSpec(
        "fsdp", None
    )  # 17003 is odd
    assert sharding.fsdp_spec((256,), 4, 1024) == jax.sharding.PartitionSpec()  # small: replicated
    assert (
        sharding.fsdp_spec((3, 5), 4, 0) == jax.sharding.PartitionSpec()
    )  # indivisible: replicated


def test_peak_flops_table_and_cpu():
    assert loop.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert loop.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert loop.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert loop.peak_flops_per_device("TPU v5 lite") == 197e12
    assert loop.peak_flops_per_device("TPU v5") == 459e12
    assert loop.peak_flops_per_device("cpu") is None


def test_distributed_start_is_detected_from_the_environment(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_NTASKS",
        "SLURM_STEP_NODELIST",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    assert sharding._distributed_environment() is None
    assert sharding.maybe_initialize_distributed() is False  # a single process starts nothing
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    assert sharding._distributed_environment() is None  # one SLURM task is a single process
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert sharding._distributed_environment() == "SLURM"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    assert sharding._distributed_environment() == "JAX_COORDINATOR_ADDRESS"
    with pytest.raises(UserError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        sharding.maybe_initialize_distributed()


PAPER_CONFIGS = [
    "ig940m_1k5_32x8d",
    "ig940m_1k5_32x16d",
    "ig940m_1k5_32x32d",
    "ig940m_1k5_32x48d",
    "ig3b5_17k_32x16d",
]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_lay_out_the_8064_batch(name, caplog):
    from tagjax import config as config_lib

    paper = config_lib.load(name)  # no ARG: the paper's 336 x 24 layout
    assert paper.train.batch_size == 8064 and paper.model.bn_group_size == 24
    assert paper.train.grad_accum_steps == 1 and paper.model.dtype == "bfloat16"
    assert paper.optim.base_lr * 8064 / paper.optim.lr_reference_batch == pytest.approx(3.15)
    cfg = config_lib.load(f"{name}:8")
    per_device_micro = 8064 // 8 // cfg.train.grad_accum_steps
    assert per_device_micro % cfg.model.bn_group_size == 0  # no BN group spans two devices
    mesh = sharding.create_mesh(cfg.mesh)
    with caplog.at_level("WARNING"):
        train.validate_batch_layout(cfg, mesh)
    assert "span devices" not in caplog.text
    with pytest.raises(UserError, match="divide the batch"):
        config_lib.load(f"{name}:5")


@pytest.mark.parametrize("name", ["small_cpu", "bench_gpu", "bench_gpu:resnext101_32x8d"])
def test_other_configs_load_and_validate(name):
    from tagjax import config as config_lib

    cfg = config_lib.load(name)
    train.validate_batch_layout(cfg, sharding.create_mesh(cfg.mesh))
    assert models.get_spec(cfg.model.name)


def test_a_config_no_run_can_use_is_refused_before_the_workdir_is_touched(tmp_path):
    workdir = tmp_path / "run"
    cfg = _config(**{"optim.warmup_images": 3200, "train.total_images": 1600})
    with pytest.raises(UserError, match="warmup_images=3200 must lie between 0"):
        train.train_and_evaluate(cfg, workdir)
    assert (
        not workdir.exists()
    )  # no config.json, metrics or TensorBoard of a run that never started


def test_a_relative_dataset_path_is_stored_absolute(tmp_path, monkeypatch):
    # predict and evaluate find the vocabulary through the checkpoint's config.data.dataset: stored as
    # given ("ds"), it pointed nowhere from any other directory.
    from tests.test_input_pipeline import _write_dataset

    monkeypatch.chdir(tmp_path)
    _write_dataset(tmp_path / "ds")
    args = ["train", "--config", "tiny", "--workdir", "run", "--config.data.synthetic=False"]
    args += [
        "--config.data.dataset=ds",
        "--config.data.image_size=32",
        "--config.data.max_labels=4",
    ]
    args += ["--config.train.batch_size=8", "--config.train.total_images=16"]
    args += ["--config.train.eval_every_images=0", "--config.train.eval_max_images=8"]
    args += ["--config.optim.warmup_images=0"]
    assert cli.main(args) == 0
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["data"]["dataset"] == str(tmp_path / "ds")
