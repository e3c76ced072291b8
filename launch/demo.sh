#!/usr/bin/env bash
# Sets everything up (launch/setup.sh) and runs the main job end to end on CPU: `tagjax demo`
# (openclipart corpus -> vocabulary -> shards -> pretraining -> hashtag metrics -> linear probe).
# Extra arguments go to `tagjax demo`, e.g. `bash launch/demo.sh --workdir /tmp/demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/tagjax demo "$@"
