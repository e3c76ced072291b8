#!/usr/bin/env bash
# One prepared accelerator check (benchmarks/gpu_check.py): environment, correctness, training throughput,
# input pipeline, async checkpoints; ~8 minutes on one H100/H200, every step time-boxed, the JSON record
# (<out>/gpu_check.json, schema in benchmarks/README.md) rewritten after every task.
#
# Usage: bash benchmarks/gpu_check.sh [--out DIR] [--cpu] [--tiny] [--steps a,b] [--config.KEY=VALUE ...]
#   bash benchmarks/gpu_check.sh --out /tmp/gpu-check             # the GPU check
#   bash benchmarks/gpu_check.sh --cpu --tiny --out /tmp/gpu-cpu   # the CPU smoke run (< 1 minute)
# Env: GPU_CHECK_PYTHON (default .venv/bin/python), GPU_CHECK_HARD_CAP_S (default 540: 9 minutes; the
# plan's time boxes sum to 485 s, so the cap only ends a run that hangs outside them).
# Set up first on a GPU machine: TAGJAX_EXTRAS="dev cuda" bash launch/setup.sh (jax[cuda12]).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${GPU_CHECK_PYTHON:-.venv/bin/python}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: $PY not found: run 'bash launch/setup.sh' first (on a GPU machine:" \
    "TAGJAX_EXTRAS=\"dev cuda\" bash launch/setup.sh)" >&2
  exit 2
fi
cpu=0
for arg in "$@"; do [[ "$arg" == "--cpu" ]] && cpu=1; done
if ((cpu == 0)) && command -v nvidia-smi >/dev/null 2>&1 \
  && ! "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('jax_cuda12_plugin') or u.find_spec('jax_cuda13_plugin')))" >/dev/null 2>&1; then
  echo "gpu_check: this machine has an NVIDIA GPU but jax has no CUDA backend: run" \
    "TAGJAX_EXTRAS=\"dev cuda\" bash launch/setup.sh (or pass --cpu)" >&2
  exit 2
fi
# Every package the check imports, before anything starts: a machine that lacks one (a GPU image with
# its own jax, say) gets one line naming them all instead of a traceback from the middle of an import.
missing=$("$PY" - <<'PY'
import importlib
names = ["jax", "flax", "optax", "orbax.checkpoint", "grain", "array_record", "ml_collections",
         "simplejpeg", "cv2", "PIL", "tensorboardX", "portpicker", "defusedxml", "numpy"]
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except ImportError:
        missing.append(name)
print(" ".join(missing))
PY
)
if [[ -n "$missing" ]]; then
  echo "gpu_check: $PY cannot import: $missing (set up with 'bash launch/setup.sh', or carry their" \
    "wheels: benchmarks/README.md, 'How to run it')" >&2
  exit 2
fi
# tagjax and configs/ from this checkout, also in grain's worker processes (installed or not).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The Python process handles SIGTERM by recording what finished; KILL follows 20 s later if it must.
exec timeout --kill-after=20 "${GPU_CHECK_HARD_CAP_S:-540}" "$PY" benchmarks/gpu_check.py "$@"
