"""benchmarks/gpu_check.sh in its CPU mode (--cpu --tiny): every step runs and records sane numbers, a task
that overruns its time box is recorded as timed out while the run goes on, and a run without an
accelerator stops after the environment step saying how to install jax's CUDA build.

The check exists for the rare minutes an accelerator is lent; this keeps it from rotting in between (an
import error after a rename, a schema change) by running the very same script on the CPU.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ["environment", "correctness", "throughput", "input_pipeline", "checkpoint"]
TASK_KEYS = {"name", "status", "seconds", "budget_s", "result", "error"}
RUN_KEYS = {
    "model",
    "grouped_conv",
    "batch_size",
    "image_size",
    "dtype",
    "step_ms",
    "images_per_second",
    "images_per_second_per_device",
    "mfu",
    "peak_memory_bytes",
    "compile_seconds",
}


def _check(out: Path, *args: str, env_extra: dict | None = None, timeout: int = 400):
    env = dict(os.environ, GPU_CHECK_PYTHON=sys.executable, **(env_extra or {}))
    # The suite's compilation cache: a rerun loads the tiny programs instead of compiling them.
    cache = Path(
        os.environ.get("TAGJAX_TEST_JAX_CACHE", Path.home() / ".cache/tagjax/jax_cache_tests")
    )
    cmd = ["bash", "benchmarks/gpu_check.sh", "--out", str(out), "--cache-dir", str(cache), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    record_path = out / "gpu_check.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    return proc, record


def _finite_positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # Generous time boxes: a cold compilation cache on a busy 2-core machine takes ~2 minutes.
    proc, record = _check(out, "--cpu", "--tiny", "--budget-scale", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return record


def test_every_step_runs_in_order_and_is_recorded(cpu_run):
    r = cpu_run
    plan = _gpu_check_module().load_plan("tiny")
    assert r["schema"] == "tagjax.gpu_check/1"
    assert r["status"] == "ok" and r["cpu"] is True
    assert r["plan"] == "configs/gpu_check.py:tiny"
    assert r["finished_utc"] and r["seconds"] > 0
    assert [s["name"] for s in r["steps"]] == STEPS
    for step in r["steps"]:
        assert step["status"] == "ok", step
        assert 0 <= step["seconds"] <= step["budget_s"] + 5
        assert step["budget_s"] == 3 * plan.budget_s[step["name"]]
        assert step["tasks"], step["name"]
        for task in step["tasks"]:
            assert set(task) == TASK_KEYS and task["status"] == "ok" and task["error"] is None


def _result(record, step):
    (entry,) = [s for s in record["steps"] if s["name"] == step]
    return entry


def test_environment_names_the_device_and_versions(cpu_run):
    env = _result(cpu_run, "environment")["tasks"][0]["result"]
    assert env["measured_device"] == "cpu:cpu" and env["default_backend"] == "cpu"
    assert env["versions"]["jax"] == jax.__version__ and env["versions"]["jaxlib"]
    assert env["device_count"] >= 1 and env["devices"][0]["platform"] == "cpu"
    assert "xla_flags" in env and env["host"]["cpus"] >= 1
    assert env["peak_flops_per_device"] is None  # no MFU on CPU


def test_correctness_diffs_are_finite_and_under_tolerance(cpu_run):
    c = _result(cpu_run, "correctness")["tasks"][0]["result"]
    assert c["pass"] is True
    for check in ("block", "grouped_conv_modes", "model_fp32", "model_bf16"):
        for part in ("outputs", "gradients"):
            diff = c[check][part]
            assert {"rel_diff", "max_rel_diff", "worst_tensor", "max_elementwise_rel_diff"} <= set(
                diff
            )
            assert all(math.isfinite(diff[k]) for k in ("rel_diff", "max_rel_diff"))
            assert 0 <= diff["rel_diff"] <= c[check]["tolerance"][part], (check, part, diff)
            assert (
                diff["rel_diff"] <= diff["max_rel_diff"] * (1 + 1e-6) or diff["max_rel_diff"] == 0
            )
    # bf16 really differs from fp32 (the comparison is not of a thing with itself) ...
    assert c["model_bf16"]["outputs"]["rel_diff"] > 0 and c["block"]["gradients"]["rel_diff"] > 0
    # ... and the two grouped-conv implementations agree to fp32 rounding.
    assert c["grouped_conv_modes"]["gradients"]["rel_diff"] < 1e-5
    assert abs(c["loss"]["bf16"] - c["loss"]["cpu_fp32"]) < 0.05


def test_throughput_runs_report_rates_and_the_mode_comparison(cpu_run):
    step = _result(cpu_run, "throughput")
    runs = {t["name"]: t["result"] for t in step["tasks"]}
    assert set(runs) == {"tiny_resnet", "tiny_resnext-xla", "tiny_resnext-block_diagonal"}
    for name, run in runs.items():
        assert set(run) >= RUN_KEYS, name
        assert _finite_positive(run["images_per_second"]) and _finite_positive(run["step_ms"])
        assert run["dtype"] == "bfloat16" and run["image_size"] == 32 and run["batch_size"] == 16
        assert run["mfu"] is None  # CPU: no peak to compare with
        assert run["images_per_second"] == pytest.approx(16 / (run["step_ms"] / 1000), rel=0.01)
    assert runs["tiny_resnext-xla"]["grouped_conv"] == "xla"
    assert runs["tiny_resnext-block_diagonal"]["grouped_conv"] == "block_diagonal"
    assert _finite_positive(step["summary"]["xla_over_block_diagonal_step_time"]["tiny_resnext"])
    assert step["summary"]["goals"] == {}  # the tiny plan sets no img/s targets


def test_input_pipeline_builds_a_dataset_and_measures_cores_per_device(cpu_run):
    r = _result(cpu_run, "input_pipeline")["tasks"][0]["result"]
    assert 0 < r["records"] <= r["posts_generated"] == 64
    assert r["stored_images"]["count"] == r["records"]
    assert _finite_positive(r["decode_augment_per_core"]) and _finite_positive(
        r["pipeline_per_core"]
    )
    assert set(r["host_cores_per_device"]) == {
        "tiny_resnet",
        "tiny_resnext-xla",
        "tiny_resnext-block_diagonal",
    }
    assert all(_finite_positive(v) for v in r["host_cores_per_device"].values())
    fed = r["fed_step"]
    assert fed["run"] == "tiny_resnet" and _finite_positive(fed["images_per_second"])
    assert _finite_positive(fed["fraction_of_synthetic"])


def test_checkpoint_measures_the_loop_time_each_async_save_costs(cpu_run):
    r = _result(cpu_run, "checkpoint")["tasks"][0]["result"]
    assert r["saves"] == 2 and r["model"] == "tiny_resnext"
    # "fastest": the mode the throughput step measured as faster for this model.
    runs = {
        t["result"]["grouped_conv"]: t["result"]
        for t in _result(cpu_run, "throughput")["tasks"]
        if t["result"]["model"] == "tiny_resnext"
    }
    assert r["grouped_conv"] == min(runs.values(), key=lambda x: x["step_ms"])["grouped_conv"]
    assert _finite_positive(r["blocking_s"]) and _finite_positive(r["save_complete_s"])
    assert math.isfinite(r["loop_lost_per_save_s"]) and _finite_positive(r["state_mb"])


def test_a_task_over_its_time_box_is_recorded_and_the_run_goes_on(tmp_path):
    proc, record = _check(
        tmp_path,
        "--cpu",
        "--tiny",
        "--steps",
        "environment,throughput,checkpoint",
        "--config.budget_s.throughput=0.5",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert record["status"] == "incomplete"
    env, throughput, ckpt = record["steps"]
    assert env["status"] == "ok" and ckpt["status"] == "ok"  # the step after the overrun still ran
    assert throughput["status"] == "timed_out"
    first, *rest = throughput["tasks"]
    assert first["status"] == "timed_out" and first["seconds"] < 10 and first["budget_s"] == 0.5
    assert [t["status"] for t in rest] == ["skipped", "skipped"]
    assert "timed_out" in proc.stderr


def test_a_run_cut_off_by_the_hard_cap_keeps_what_it_finished(tmp_path):
    proc, record = _check(
        tmp_path,
        "--cpu",
        "--tiny",
        "--steps",
        "environment,throughput",
        "--config.throughput.steps=100000000",  # the first run would time forever
        env_extra={"GPU_CHECK_HARD_CAP_S": "12"},
    )
    assert proc.returncode == 124  # timeout(1): the cap struck
    assert record["status"] == "cut_off" and record["finished_utc"]
    env, throughput = record["steps"]
    assert env["status"] == "ok" and env["tasks"][0]["result"]["measured_device"] == "cpu:cpu"
    assert throughput["status"] == "cut_off"
    assert [t["status"] for t in throughput["tasks"]] == ["cut_off"]


def test_without_an_accelerator_it_stops_after_the_environment_step(tmp_path):
    proc, record = _check(tmp_path, "--tiny", env_extra={"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert record["status"] == "no_accelerator"
    assert [s["name"] for s in record["steps"]] == ["environment"]
    assert 'TAGJAX_EXTRAS="dev cuda" bash launch/setup.sh' in proc.stderr


def test_a_missing_package_is_named_in_one_line_before_anything_runs(tmp_path):
    # A GPU image with its own jax lacked tensorboardX (2026-11-30): the check died in an import.
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "tensorboardX.py").write_text("raise ImportError('not installed here')\n")
    proc, record = _check(
        tmp_path / "out", "--cpu", "--tiny", env_extra={"PYTHONPATH": str(blocker)}
    )
    assert proc.returncode == 2 and record is None
    assert "cannot import: tensorboardX " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_wrapper_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `bash launch/setup.sh` installs it"
    result = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=info", "benchmarks/gpu_check.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


# --- the gpu plan's bookkeeping, on made-up results (no device needed) ------------------------------


def _gpu_check_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    return gpu_check


def _timed(name, model, mode, step_ms, batch, ips_per_device, mfu=0.3):
    result = {
        "model": model,
        "grouped_conv": mode,
        "step_ms": step_ms,
        "batch_size": batch,
        "images_per_second": ips_per_device,
        "images_per_second_per_device": ips_per_device,
        "mfu": mfu,
        "peak_memory_bytes": 40 * 2**30,
    }
    return {"name": name, "status": "ok", "result": result}


def _gpu_record(tasks):
    return {
        "plan": "configs/gpu_check.py:gpu",
        "started_utc": "2026-12-01T10:00:00+00:00",
        "steps": [{"name": "throughput", "tasks": tasks}],
    }


def test_gpu_plan_fits_nine_minutes_and_judges_the_issue_goals():
    gc = _gpu_check_module()
    plan = gc.load_plan("gpu")
    assert sum(plan.budget_s.values()) == 485  # under 9 minutes with start-up and the hard cap
    runs = {r["name"]: r for r in plan.throughput.runs}
    assert runs["resnet50"]["batch_per_device"] % 24 == 0 and plan.bn_group_size == 24
    assert (
        sum(r["budget_s"] for r in runs.values() if not r["optional"]) <= plan.budget_s.throughput
    )
    tasks = [
        _timed("resnet50", "resnet50", "xla", 80.0, 240, 3000.0),
        _timed("resnext101_32x8d-xla", "resnext101_32x8d", "xla", 150.0, 120, 800.0),
        _timed(
            "resnext101_32x8d-block_diagonal",
            "resnext101_32x8d",
            "block_diagonal",
            100.0,
            120,
            1200.0,
        ),
    ]
    summary = gc.throughput_summary(plan, tasks)
    assert summary["goals"]["resnet50"]["met"] is True  # >= 3,000 counts
    assert summary["goals"]["resnext101_32x8d"] == {
        "target_images_per_second": 1000,
        "measured": 1200.0,
        "grouped_conv": "block_diagonal",
        "met": True,
    }
    assert summary["xla_over_block_diagonal_step_time"] == {"resnext101_32x8d": 1.5}
    assert gc.throughput_summary(plan, tasks[:1])["goals"]["resnext101_32x8d"]["met"] is None


def test_fastest_mode_carries_the_32x8d_verdict_to_32x16d_and_the_checkpoint(tmp_path):
    gc = _gpu_check_module()
    plan = gc.load_plan("gpu")
    tasks = [
        _timed("resnext101_32x8d-xla", "resnext101_32x8d", "xla", 150.0, 120, 800.0),
        _timed(
            "resnext101_32x8d-block_diagonal",
            "resnext101_32x8d",
            "block_diagonal",
            100.0,
            120,
            1200.0,
        ),
    ]
    ctx = gc.Context(plan, True, "", tmp_path, _gpu_record(tasks))
    assert ctx.fastest_mode("resnext101_32x8d") == "block_diagonal"
    assert ctx.fastest_mode("resnext101_32x16d") == "block_diagonal"
    assert gc.trainer_config(ctx, "resnext101_32x16d", 48, "fastest").model.grouped_conv == (
        "block_diagonal"
    )
    assert gc.Context(plan, True, "", tmp_path, _gpu_record([])).fastest_mode("x") == "xla"
    row = gc.table_row(_gpu_record(tasks))
    assert row.startswith("| 2026-12-01 |") and "| 1,200 (30.0%) |" in row and row.count("|") == 12
