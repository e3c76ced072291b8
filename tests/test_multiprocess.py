"""Multi-process training, the tested stand-in for multi-host: two CPU processes joined by jax.distributed
on localhost (started by launch/local.sh, as two hosts would be) train the tiny config together.

They must agree on the parameters (every process's copy of every replicated parameter is bit-identical),
and match a single process training the same global batches on the same number of devices: the global
batch does not depend on how many hosts produce it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# A stand-in for the `tagjax` command that launch/local.sh starts in every process: it runs the real CLI
# (`tagjax train ...`), then, still inside the JAX cluster, restores the checkpoint the run wrote and
# records what this process holds of every parameter.
DRIVER = """#!{python}
import hashlib, json, os, sys
import numpy as np
from tagjax import cli

argv = sys.argv[1:]
code = cli.main(argv)
if code:
    sys.exit(code)

import jax
from tagjax import config as config_lib, models, sharding, train

workdir = argv[argv.index("--workdir") + 1]
cfg = config_lib.load(argv[argv.index("--config") + 1], [a for a in argv if a.startswith("--config.")])
mesh = sharding.create_mesh(cfg.mesh)
data = train.open_data(cfg)
model = models.create(cfg.model, data.num_classes)
manager = train._checkpoint_manager(cfg, workdir, data)
state, _ = manager.restore_latest(train.abstract_train_state(cfg, model, mesh, data.num_classes))
manager.close()

me = jax.process_index()
report = {{"process": me, "processes": jax.process_count(), "devices": jax.device_count(),
          "step": int(jax.device_get(state.step)), "leaves": {{}}}}
arrays = {{}}
for path, leaf in jax.tree_util.tree_leaves_with_path({{"params": state.params, "batch_stats": state.batch_stats}}):
    name = jax.tree_util.keystr(path)
    shards = sorted(leaf.addressable_shards, key=lambda s: s.device.id)
    report["leaves"][name] = {{
        "replicated": leaf.sharding.is_fully_replicated,
        "shard_sha1": [hashlib.sha1(np.asarray(s.data).tobytes()).hexdigest() for s in shards],
    }}
    if leaf.sharding.is_fully_replicated:
        arrays[name] = np.asarray(shards[0].data)
out = os.environ["REPORT_DIR"]
with open(os.path.join(out, f"process{{me}}.json"), "w") as f:
    json.dump(report, f)
np.savez(os.path.join(out, f"process{{me}}.npz"), **arrays)
"""

OVERRIDES = [
    "--config.train.total_images=192",  # 6 steps of the global batch of 32
    "--config.optim.warmup_images=64",
    "--config.train.log_every_images=64",
    "--config.train.eval_every_images=192",
    "--config.train.eval_max_images=32",
    "--config.train.checkpoint_every_images=96",
]


def _train(
    tmp: Path, name: str, processes: int, devices_per_process: int
) -> tuple[list, list, str]:
    driver = tmp / "tagjax-driver"
    driver.write_text(DRIVER.format(python=sys.executable))
    driver.chmod(0o755)
    report_dir = tmp / f"{name}-reports"
    report_dir.mkdir()
    cache = Path(
        os.environ.get("TAGJAX_TEST_JAX_CACHE", Path.home() / ".cache/tagjax/jax_cache_tests")
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_", "TPU_"))
    }
    env.update(
        TAGJAX=str(driver),
        REPORT_DIR=str(report_dir),
        NUM_PROCESSES=str(processes),
        CPU_DEVICES=str(devices_per_process),
        COORDINATOR_PORT=str(20000 + os.getpid() % 20000),
    )
    args = [
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(tmp / name),
        *OVERRIDES,
        f"--config.train.compilation_cache_dir={cache}",
    ]
    result = subprocess.run(
        ["bash", "launch/local.sh", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    reports = [json.loads((report_dir / f"process{i}.json").read_text()) for i in range(processes)]
    arrays = [dict(np.load(report_dir / f"process{i}.npz")) for i in range(processes)]
    return reports, arrays, result.stdout


@pytest.mark.slow
def test_two_processes_train_together_and_agree(tmp_path):
    reports, arrays, log = _train(tmp_path, "two", processes=2, devices_per_process=2)

    # One cluster of 4 devices, not two runs of 2: both processes see it and finish at the same step.
    assert [r["process"] for r in reports] == [0, 1]
    assert {(r["processes"], r["devices"], r["step"]) for r in reports} == {(2, 4, 6)}
    # Both logged through local.sh, each with its prefix; only process 0 prints the progress lines.
    assert "[p0] " in log and "[p1] " in log
    assert "[p0] done: 6 steps" in log and "[p1] done:" not in log

    # Every parameter and batch-norm statistic is replicated (fsdp=1) and every copy on every device of
    # both processes is bit-identical: the processes agree.
    leaves0, leaves1 = reports[0]["leaves"], reports[1]["leaves"]
    assert leaves0.keys() == leaves1.keys() and len(leaves0) > 10
    for name in leaves0:
        assert leaves0[name]["replicated"], name
        hashes = leaves0[name]["shard_sha1"] + leaves1[name]["shard_sha1"]
        assert len(hashes) == 4 and len(set(hashes)) == 1, name

    # And the run moved the parameters: they are not the initialization.
    assert any(np.abs(v).sum() > 0 for k, v in arrays[0].items() if "bn3" in k and "scale" in k)

    # A single process on 4 devices trains on the same global batches and reaches the same parameters
    # (up to the order of floating-point reductions across processes).
    (single,), (single_arrays,), _ = _train(tmp_path, "one", processes=1, devices_per_process=4)
    assert (single["processes"], single["devices"], single["step"]) == (1, 4, 6)
    assert single_arrays.keys() == arrays[0].keys()
    for name, value in arrays[0].items():
        np.testing.assert_allclose(value, single_arrays[name], rtol=1e-4, atol=1e-5, err_msg=name)
