#!/usr/bin/env bash
# Sets everything up (launch/setup.sh) and runs the test suite: ruff, then pytest on 2 workers.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k vocab`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check tagjax tests benchmarks
.venv/bin/ruff format --check tagjax tests benchmarks
exec .venv/bin/python -m pytest -q -n "${TAGJAX_TEST_WORKERS:-2}" --durations=15 "$@"
