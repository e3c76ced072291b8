"""The launch scripts: shellcheck-clean, the commands their DRY_RUN mode prints, and their control flow
(multi-process failure handling, SLURM requeue, TPU preemption recovery) run against fake `srun`,
`scontrol` and `gcloud` executables, so no cluster or cloud account is needed."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])


def _env(**extra: str) -> dict[str, str]:
    """A clean environment: no SLURM_/TPU variables leak in from wherever the tests run."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(extra)
    return env


def _run(args, env, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False, **kw
    )


def _commands(stdout: str) -> list[list[str]]:
    """The `+ cmd args` lines a DRY_RUN prints, split back into argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _env_of(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    """Splits `env A=1 B=2 prog args` into ({A: 1, B: 2}, [prog, args])."""
    assert cmd[0] == "env", cmd
    env, i = {}, 1
    while "=" in cmd[i] and not cmd[i].startswith("-"):
        key, _, value = cmd[i].partition("=")
        env[key] = value
        i += 1
    return env, cmd[i:]


# --- shellcheck ------------------------------------------------------------------------------------


def test_all_launch_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, (
        "shellcheck is missing: `bash launch/setup.sh` installs it (Debian package shellcheck)"
    )
    names = {p.name for p in SCRIPTS}
    assert {"local.sh", "slurm_gpu.sbatch", "tpu_pod.sh", "setup.sh"} <= names
    result = _run([shellcheck, "--shell=bash", "--severity=info", *map(str, SCRIPTS)], os.environ)
    assert result.returncode == 0, result.stdout + result.stderr


# --- local.sh --------------------------------------------------------------------------------------


def test_local_dry_run_passes_arguments_through_unchanged():
    args = [
        "--config",
        "configs/tiny.py",
        "--workdir",
        "/tmp/a dir",
        "--config.train.total_images=64",
    ]
    result = _run(["bash", "launch/local.sh", *args], _env(DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    (cmd,) = _commands(result.stdout)
    env, prog = _env_of(cmd)
    assert env == {}
    assert prog == [str(REPO / ".venv/bin/tagjax"), "train", *args]


def test_local_dry_run_simulated_cpu_devices():
    result = _run(
        ["bash", "launch/local.sh", "--config", "tiny", "--workdir", "/tmp/w"],
        _env(DRY_RUN="1", CPU_DEVICES="4"),
    )
    (cmd,) = _commands(result.stdout)
    env, _ = _env_of(cmd)
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def test_local_dry_run_multiprocess_on_gpus_splits_devices():
    result = _run(
        ["bash", "launch/local.sh", "--config", "tiny", "--workdir", "/tmp/w"],
        _env(DRY_RUN="1", NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", COORDINATOR_PORT="15123"),
    )
    cmds = _commands(result.stdout)
    assert len(cmds) == 2
    envs = [_env_of(c)[0] for c in cmds]
    assert [e["JAX_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert {e["JAX_NUM_PROCESSES"] for e in envs} == {"2"}
    assert {e["JAX_COORDINATOR_ADDRESS"] for e in envs} == {"localhost:15123"}
    assert [e["JAX_LOCAL_DEVICE_IDS"] for e in envs] == ["0,1,2,3", "4,5,6,7"]


def test_local_rejects_bad_process_count():
    result = _run(["bash", "launch/local.sh", "--config", "tiny"], _env(NUM_PROCESSES="two"))
    assert result.returncode == 2
    assert "NUM_PROCESSES must be a positive integer" in result.stderr


FAKE_TAGJAX = """#!/usr/bin/env bash
echo "$$" > "$PID_DIR/p$JAX_PROCESS_ID"
echo "process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES via $JAX_COORDINATOR_ADDRESS: $*"
if [[ "$JAX_PROCESS_ID" == "$FAIL_ID" ]]; then echo "boom"; exit 3; fi
sleep "${SLEEP:-0}"
"""


def test_local_multiprocess_prefixes_output_and_succeeds(tmp_path):
    fake = _executable(tmp_path / "tagjax", FAKE_TAGJAX)
    env = _env(TAGJAX=str(fake), NUM_PROCESSES="3", PID_DIR=str(tmp_path), FAIL_ID="none")
    result = _run(["bash", "launch/local.sh", "--config", "tiny", "--workdir", "/w"], env)
    assert result.returncode == 0, result.stderr
    for i in range(3):
        assert f"[p{i}] process {i} of 3 via localhost:" in result.stdout
        assert (tmp_path / f"p{i}").exists()  # each process really ran
    assert "all 3 processes finished" in result.stdout


def test_local_multiprocess_one_failure_stops_the_others(tmp_path):
    """A process that dies would leave the others blocked in a collective: the script must end them."""
    fake = _executable(tmp_path / "tagjax", FAKE_TAGJAX)
    env = _env(TAGJAX=str(fake), NUM_PROCESSES="2", PID_DIR=str(tmp_path), FAIL_ID="1", SLEEP="60")
    start = time.monotonic()
    result = _run(
        ["bash", "launch/local.sh", "--config", "tiny", "--workdir", "/w"], env, timeout=30
    )
    assert time.monotonic() - start < 20
    assert result.returncode == 1
    assert "[p1] boom" in result.stdout
    assert "a process failed (exit status 3); stopping the others" in result.stderr
    survivor = int((tmp_path / "p0").read_text())
    assert _ends_within(survivor, 5.0), f"process 0 (pid {survivor}) is still running"


def _ends_within(pid: int, seconds: float) -> bool:
    """True once ``pid`` is gone or a zombie (dead, waiting for a reaper that containers may lack)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


# --- slurm_gpu.sbatch ------------------------------------------------------------------------------

SLURM_PER_GPU = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[017-020],spare1",
    "SLURM_NNODES": "4",
    "SLURM_NTASKS": "32",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_SUBMIT_DIR": str(REPO),
}
TRAIN_ARGS = ["--config", "configs/tiny.py", "--workdir", "/shared/runs/x", "--config.seed=3"]


def _sbatch(env_extra, args=TRAIN_ARGS, **kw):
    return _run(["bash", "launch/slurm_gpu.sbatch", *args], _env(**env_extra), **kw)


def test_slurm_dry_run_process_per_gpu():
    result = _sbatch({**SLURM_PER_GPU, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    (cmd,) = _commands(result.stdout)
    assert cmd[0] == "srun"
    assert "--kill-on-bad-exit=1" in cmd and "--ntasks-per-node=8" in cmd
    assert cmd[cmd.index("train") - 1] == str(REPO / ".venv/bin/tagjax")
    assert cmd[cmd.index("train") + 1 :] == TRAIN_ARGS
    assert "one process per GPU" in result.stdout
    # jax picks each process's GPU from SLURM_LOCALID itself: nothing may override it here.
    assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout
    assert "export NCCL_DEBUG=WARN" in result.stdout
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in result.stdout


def test_slurm_keeps_a_users_own_latency_hiding_setting():
    flag = "--xla_gpu_enable_latency_hiding_scheduler"
    result = _sbatch({**SLURM_PER_GPU, "DRY_RUN": "1", "XLA_FLAGS": f"{flag}=false"})
    assert result.returncode == 0, result.stderr
    assert f"{flag}=false" in result.stdout and f"{flag}=true" not in result.stdout


def test_slurm_dry_run_process_per_node_lists_all_gpus():
    env = {**SLURM_PER_GPU, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "1(x4)", "DRY_RUN": "1"}
    result = _sbatch(env)
    assert result.returncode == 0, result.stderr
    assert "export JAX_LOCAL_DEVICE_IDS=0\\,1\\,2\\,3\\,4\\,5\\,6\\,7" in result.stdout
    (cmd,) = _commands(result.stdout)
    assert "--ntasks-per-node=1" in cmd


def test_slurm_coordinator_matches_jax_autodetection(monkeypatch):
    """The address the script logs is the one jax.distributed.initialize() will use."""
    from jax._src.clusters import slurm_cluster

    for nodelist in ("gpu[017-020],spare1", "node7", "a[3,5-9]", "n1,n2"):
        env = {**SLURM_PER_GPU, "SLURM_JOB_NODELIST": nodelist, "DRY_RUN": "1"}
        result = _sbatch(env)
        logged = result.stdout.split("coordinator ")[1].split(",")[0]
        monkeypatch.setenv("SLURM_JOB_ID", env["SLURM_JOB_ID"])
        monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
        monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
        assert logged == slurm_cluster.SlurmCluster.get_coordinator_address(None, None)


@pytest.mark.parametrize(
    ("extra", "args", "message"),
    [
        (
            {"SLURM_NTASKS": "12", "SLURM_NTASKS_PER_NODE": "3"},
            TRAIN_ARGS,
            "use 1 (per node) or 8 (per GPU)",
        ),
        ({}, ["--config", "tiny", "--workdir", "/tmp/run"], "is node-local"),
        ({}, ["--config", "tiny"], "pass --workdir DIR on a shared file system"),
        ({"SLURM_GPUS_ON_NODE": "0"}, TRAIN_ARGS, "no GPUs allocated"),
        ({"SLURM_SUBMIT_DIR": "/"}, TRAIN_ARGS, "is not a tagjax checkout"),
    ],
)
def test_slurm_refuses_bad_setups(extra, args, message):
    result = _sbatch({**SLURM_PER_GPU, **extra, "DRY_RUN": "1"}, args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not _commands(result.stdout)


def test_slurm_outside_a_job_says_to_use_sbatch():
    result = _run(["bash", "launch/slurm_gpu.sbatch", *TRAIN_ARGS], _env())
    assert result.returncode == 2
    assert "submit this with sbatch" in result.stderr


FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" > "$FAKE_DIR/srun.args"
trap 'echo TERM > "$FAKE_DIR/srun.signal"; exit 0' TERM
if [[ -n "${SRUN_EXIT:-}" ]]; then exit "$SRUN_EXIT"; fi
touch "$FAKE_DIR/srun.started"
while :; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scontrol.calls"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    tagjax = _executable(tmp_path / "tagjax", "#!/bin/sh\nexit 0\n")
    env = {
        **SLURM_PER_GPU,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "TAGJAX": str(tagjax),
    }
    return tmp_path, env


def _start_sbatch(env):
    proc = subprocess.Popen(
        ["bash", "launch/slurm_gpu.sbatch", *TRAIN_ARGS],
        env=_env(**env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def _wait_for(path: Path, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_slurm_time_limit_signal_checkpoints_then_requeues(fake_slurm):
    tmp, env = fake_slurm
    proc = _start_sbatch(env)
    _wait_for(tmp / "srun.started")
    proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` delivers before the time limit
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert (tmp / "srun.signal").read_text().strip() == "TERM"  # the trainer was told to stop
    assert (tmp / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    assert "--kill-on-bad-exit=1" in (tmp / "srun.args").read_text()
    assert "time limit near" in out


def test_slurm_requeue_is_bounded(fake_slurm):
    tmp, env = fake_slurm
    proc = _start_sbatch({**env, "SLURM_RESTART_COUNT": "5", "MAX_REQUEUES": "5"})
    _wait_for(tmp / "srun.started")
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "already requeued 5 times" in err
    assert not (tmp / "scontrol.calls").exists()


def test_slurm_finished_or_failed_runs_are_not_requeued(fake_slurm):
    tmp, env = fake_slurm
    for code in ("0", "7"):
        result = _sbatch({**env, "SRUN_EXIT": code})
        assert result.returncode == int(code)
        assert f"srun exited with status {code}" in result.stdout
    assert not (tmp / "scontrol.calls").exists()


def test_slurm_preemption_term_reaches_the_trainer_without_requeue(fake_slurm):
    """On preemption SLURM requeues the job itself (--requeue); the script only relays SIGTERM."""
    tmp, env = fake_slurm
    proc = _start_sbatch(env)
    _wait_for(tmp / "srun.started")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert (tmp / "srun.signal").read_text().strip() == "TERM"
    assert not (tmp / "scontrol.calls").exists()


# --- tpu_pod.sh ------------------------------------------------------------------------------------

TPU_ARGS = ["--config", "configs/tiny.py", "--workdir", "gs://bucket/runs/x", "--config.seed=1"]


def _tpu(args, **env):
    base = {"TPU_NAME": "wsl", "ZONE": "us-east5-a", "DRY_RUN": "1"}
    return _run(["bash", "launch/tpu_pod.sh", *args], _env(**{**base, **env}))


def _flag(cmd: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    return value


def test_tpu_dry_run_run_prints_every_gcloud_command():
    result = _tpu(["run", *TPU_ARGS], SPOT="1", PROJECT="my-proj")
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    verbs = [" ".join(c[1:5]) for c in gcloud]
    assert verbs == [
        "compute tpus queued-resources describe",
        "compute tpus queued-resources create",
        "compute tpus tpu-vm scp",
        "compute tpus tpu-vm ssh",  # install on every worker
        "compute tpus tpu-vm ssh",  # train on every worker
    ]
    create = gcloud[1]
    assert create[5] == "wsl" and "--node-id=wsl" in create and "--spot" in create
    assert _flag(create, "--accelerator-type") == "v5p-64"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5"
    for c in gcloud:
        assert "--zone=us-east5-a" in c and "--project=my-proj" in c
    for c in gcloud[2:]:
        assert "--worker=all" in c
    setup, train = (_flag(c, "--command") for c in gcloud[3:])
    assert (
        "uv python install 3.11" in setup
        and "TAGJAX_EXTRAS=tpu bash launch/setup.sh --no-apt" in setup
    )
    # The remote command line, parsed as the workers' shell will: tagjax train with the arguments intact.
    words = shlex.split(train.replace(";", " ; "))
    start = words.index(".venv/bin/tagjax")
    assert words[start + 1 : start + 2 + len(TPU_ARGS)] == ["train", *TPU_ARGS]
    assert "tee" in words


@pytest.mark.parametrize(
    ("accelerator", "version"),
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v6e-64", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_runtime_version_follows_the_accelerator(accelerator, version):
    result = _tpu(["create"], ACCELERATOR=accelerator)
    create = [c for c in _commands(result.stdout) if "create" in c]
    assert _flag(create[0], "--runtime-version") == version
    assert "--spot" not in create[0]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["train", "--config", "tiny", "--workdir", "/local/dir"], {}, "pass --workdir gs://"),
        (["run", "--config", "tiny"], {}, "pass --workdir gs://"),
        (["status"], {"TPU_NAME": ""}, "set TPU_NAME"),
        (["status"], {"ZONE": ""}, "set ZONE"),
        (["frobnicate"], {}, "unknown command 'frobnicate'"),
        (["create"], {"ACCELERATOR": "v9x-8"}, "set RUNTIME_VERSION"),
    ],
)
def test_tpu_refuses_bad_usage(args, env, message):
    result = _tpu(args, **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not [c for c in _commands(result.stdout) if c[0] == "gcloud" and "create" in c]


FAKE_GCLOUD = """#!/usr/bin/env bash
# A stand-in for gcloud that keeps the slice's state in files and records every call.
echo "$*" >> "$FAKE_DIR/calls"
qr="$FAKE_DIR/qr_state"; node="$FAKE_DIR/node_state"
case "$*" in
  *"queued-resources describe"*) [[ -f "$qr" ]] || exit 1; cat "$qr" ;;
  *"queued-resources create"*) echo ACTIVE > "$qr"; echo READY > "$node" ;;
  *"queued-resources delete"*) rm -f "$qr" "$node" ;;
  *"tpu-vm describe"*) [[ -f "$node" ]] || exit 1; cat "$node" ;;
  *"tpu-vm ssh"*"tagjax train"*)
    n=$(( $(cat "$FAKE_DIR/trains" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$FAKE_DIR/trains"
    if (( n <= ${PREEMPT_TIMES:-0} )); then echo SUSPENDED > "$qr"; echo PREEMPTED > "$node"; exit 255; fi
    exit "${TRAIN_EXIT:-0}" ;;
esac
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "gcloud", FAKE_GCLOUD)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "DRY_RUN": "0",
        "POLL_SECONDS": "0",
        "TMPDIR": str(tmp_path),
    }
    return tmp_path, env


def _calls(tmp: Path) -> list[str]:
    kinds = ("queued-resources create", "queued-resources delete", "tpu-vm scp", "tagjax train")
    out = []
    for line in (tmp / "calls").read_text().splitlines():
        kind = next((k for k in kinds if k in line), None)
        if kind == "tagjax train":
            out.append("train")
        elif "tpu-vm ssh" in line:
            out.append("setup")
        elif kind:
            out.append(kind.split()[-1])
    return out


def test_tpu_run_recreates_a_preempted_slice_and_resumes(fake_gcloud):
    tmp, env = fake_gcloud
    result = _tpu(["run", *TPU_ARGS], **env, PREEMPT_TIMES="2")
    assert result.returncode == 0, result.stderr
    # Each preemption: delete the suspended queued resource, request a new slice, reinstall, train again
    # with the same arguments (the trainer resumes from the gs:// workdir).
    assert _calls(tmp) == ["create", "scp", "setup", "train"] + 2 * [
        "delete",
        "create",
        "scp",
        "setup",
        "train",
    ]
    assert "preemption 2" in result.stderr
    assert "training finished" in result.stderr
    trains = [line for line in (tmp / "calls").read_text().splitlines() if "tagjax train" in line]
    assert len(set(trains)) == 1


def test_tpu_run_stops_on_a_failure_of_a_healthy_slice(fake_gcloud):
    tmp, env = fake_gcloud
    result = _tpu(["run", *TPU_ARGS], **env, TRAIN_EXIT="1")
    assert result.returncode == 2
    assert "not a preemption" in result.stderr
    assert _calls(tmp) == ["create", "scp", "setup", "train"]


def test_tpu_run_gives_up_after_max_preemptions(fake_gcloud):
    _, env = fake_gcloud
    result = _tpu(["run", *TPU_ARGS], **env, PREEMPT_TIMES="9", MAX_PREEMPTIONS="1")
    assert result.returncode == 2
    assert "gave up after 1 preemptions" in result.stderr


FAKE_CURL = """#!/usr/bin/env bash
# The TPU VM metadata server, as the workers' curl sees it.
case "${@: -1}" in
  */worker-network-endpoints) printf %s "$ENDPOINTS" ;;
  */agent-worker-number) printf %s "$WORKER" ;;
  *) exit 22 ;;
esac
"""
FAKE_WORKER_TAGJAX = """#!/usr/bin/env bash
echo "coordinator=${JAX_COORDINATOR_ADDRESS:-none} n=${JAX_NUM_PROCESSES:-none} id=${JAX_PROCESS_ID:-none}"
echo "args=$*"
exit "${EXIT:-0}"
"""


@pytest.mark.parametrize(
    ("endpoints", "worker", "expected"),
    [
        ("10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8", "2", "coordinator=10.0.0.5:8476 n=4 id=2"),
        ("w-0:0:10.1.0.9,w-1:1:10.1.0.10", "1", "coordinator=10.1.0.9:8476 n=2 id=1"),
        ("10.0.0.5", "0", "coordinator=none n=none id=none"),  # one host: a single-process run
    ],
)
def test_tpu_worker_command_joins_the_cluster_and_runs_the_trainer(
    tmp_path, endpoints, worker, expected
):
    """Runs the exact --command that `train` sends to every worker, on a fake worker (home directory with
    the checkout's .venv/bin/tagjax, a curl answering like the metadata server)."""
    (cmd,) = [c for c in _commands(_tpu(["train", *TPU_ARGS]).stdout) if "tpu-vm" in c]
    remote = _flag(cmd, "--command")
    home = tmp_path / "home"
    (home / "tagjax/.venv/bin").mkdir(parents=True)
    _executable(home / "tagjax/.venv/bin/tagjax", FAKE_WORKER_TAGJAX)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "curl", FAKE_CURL)
    env = _env(
        HOME=str(home), ENDPOINTS=endpoints, WORKER=worker, PATH=f"{bin_dir}:{os.environ['PATH']}"
    )
    result = subprocess.run(
        ["bash", "-c", remote], env=env, cwd=home, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [expected, "args=train " + " ".join(TPU_ARGS)]
    assert (home / "tagjax-train.log").read_text() == result.stdout  # the log kept on each worker
    assert int((home / "tagjax-train.pid").read_text()) > 0  # what `stop` kills
    failed = subprocess.run(
        ["bash", "-c", remote], env={**env, "EXIT": "5"}, cwd=home, capture_output=True, timeout=30
    )
    assert failed.returncode == 5  # a failure reaches gcloud, hence `run`'s preemption check
