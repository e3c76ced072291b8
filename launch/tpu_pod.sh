#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: requests the slice (a queued resource), installs this checkout on
# every worker, runs the same `tagjax train` on all of them with a gs:// workdir, and after a preemption
# recreates the slice and resumes from the newest checkpoint in that workdir.
#
# Usage: bash launch/tpu_pod.sh COMMAND [tagjax train arguments]
#   create              request the slice (queued resource) and wait until it is ACTIVE
#   setup               copy this checkout to every worker and install it (uv, Python 3.11, jax[tpu])
#   data SRC DEST       copy a built dataset (e.g. gs://bucket/ig-1.5k) to DEST on every worker's disk
#   train ARGS...       run `tagjax train ARGS` on every worker now (the slice must be ACTIVE and set up)
#   run ARGS...         create + setup + train, and on preemption: recreate, set up, resume; until done
#   status              print the queued resource's state
#   stop                stop the trainer on every worker (it was started by `train` or `run`)
#   delete              release the slice (deletes the queued resource and its TPU VMs)
# ARGS must hold --config NAME (a packaged config, or a config file inside the checkout) and
# --workdir gs://BUCKET/PATH (every worker writes to it, and it outlives the slice). Example:
#   TPU_NAME=wsl ZONE=us-east5-a ACCELERATOR=v5p-64 bash launch/tpu_pod.sh run \
#     --config NAME --workdir gs://my-bucket/runs/NAME
#
# Environment:
#   TPU_NAME (required)   name of the queued resource and of its TPU VM node
#   ZONE (required)       e.g. us-east5-a; PROJECT (default: gcloud's configured project)
#   ACCELERATOR           accelerator type (default v5p-64: 32 chips on 8 hosts)
#   RUNTIME_VERSION       TPU software version (default: chosen from ACCELERATOR: v6e -> v2-alpha-tpuv6e,
#                         v5p -> v2-alpha-tpuv5, v5litepod -> v2-alpha-tpuv5-lite, v4 -> tpu-ubuntu2204-base)
#   SPOT=1                request Spot capacity (cheaper, preemptible: `run` resumes after preemption)
#   MAX_PREEMPTIONS       give up after this many preemptions (default 100)
#   POLL_SECONDS          how often to poll the queued resource's state (default 60)
#   REMOTE_DIR            where the code lives on the workers (default: tagjax, in the home directory)
#   SETUP_ARGS            arguments of launch/setup.sh on the workers (default --no-apt; training from
#                         built shards needs no Debian packages)
#   DRY_RUN=1             print every gcloud command instead of running it (assumes a fresh slice)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
ACCELERATOR="${ACCELERATOR:-v5p-64}"
MAX_PREEMPTIONS="${MAX_PREEMPTIONS:-100}"
POLL_SECONDS="${POLL_SECONDS:-60}"
REMOTE_DIR="${REMOTE_DIR:-tagjax}"
SETUP_ARGS="${SETUP_ARGS:---no-apt}"
REMOTE_LOG="tagjax-train.log"
REMOTE_PID="tagjax-train.pid"

die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 2
}

say() { echo "tpu_pod.sh: $*" >&2; }

show() {
  local out="+" word
  for word in "$@"; do out+=" $(printf '%q' "$word")"; done
  echo "$out"
}

# Every gcloud call goes through here: DRY_RUN prints it instead.
gc() {
  show gcloud "$@"
  [[ "$DRY_RUN" == 1 ]] && return 0
  gcloud "$@"
}

runtime_version() {
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then
    echo "$RUNTIME_VERSION"
    return
  fi
  case "$ACCELERATOR" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default TPU software version for ACCELERATOR=$ACCELERATOR: set RUNTIME_VERSION" ;;
  esac
}

[[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the name of the slice), e.g. TPU_NAME=wsl"
[[ -n "${ZONE:-}" ]] || die "set ZONE (the zone of the slice), e.g. ZONE=us-east5-a"
location=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && location+=(--project="$PROJECT")

# Sets STATE to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or NOT_FOUND.
# A global rather than an echo, so that DRY_RUN's printed command reaches stdout like all the others.
STATE=""
refresh_state() {
  if [[ "$DRY_RUN" == 1 ]]; then
    show gcloud compute tpus queued-resources describe "$TPU_NAME" "${location[@]}" --format='value(state.state)'
    STATE=NOT_FOUND
    return
  fi
  STATE=$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${location[@]}" \
    --format='value(state.state)' 2>/dev/null) || STATE=NOT_FOUND
  STATE="${STATE:-NOT_FOUND}"
}

# The TPU VM node's own state: READY while healthy, PREEMPTED after a preemption.
node_state() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${location[@]}" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}

create() {
  local version
  version=$(runtime_version)
  refresh_state
  case "$STATE" in
    ACTIVE) say "$TPU_NAME is ACTIVE" && return 0 ;;
    SUSPENDING | SUSPENDED | FAILED)
      say "$TPU_NAME is $STATE (preempted or failed): deleting it to request a new slice"
      gc compute tpus queued-resources delete "$TPU_NAME" "${location[@]}" --force --quiet
      STATE=NOT_FOUND
      ;;
  esac
  if [[ "$STATE" == NOT_FOUND ]]; then
    local extra=()
    [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
    gc compute tpus queued-resources create "$TPU_NAME" "${location[@]}" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$version" "${extra[@]}"
  fi
  [[ "$DRY_RUN" == 1 ]] && return 0
  say "waiting for $TPU_NAME ($ACCELERATOR) to become ACTIVE (polling every ${POLL_SECONDS}s)"
  while :; do
    refresh_state
    case "$STATE" in
      ACTIVE) say "$TPU_NAME is ACTIVE" && return 0 ;;
      FAILED | SUSPENDED | NOT_FOUND) die "queued resource $TPU_NAME is $STATE; see: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

# Runs one shell command on every worker of the slice at once.
on_all_workers() {
  gc compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" --worker=all --command="$1"
}

setup() {
  local archive="${TMPDIR:-/tmp}/tagjax-$TPU_NAME.tar.gz"
  # The working tree as it is (uncommitted edits included), without the local venv and caches.
  show tar -czf "$archive" -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=__pycache__ .
  if [[ "$DRY_RUN" != 1 ]]; then
    tar -czf "$archive" -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=__pycache__ .
  fi
  gc compute tpus tpu-vm scp "$archive" "$TPU_NAME:tagjax.tar.gz" "${location[@]}" --worker=all
  # TPU VM images ship Python 3.10; tagjax needs >= 3.11, which uv installs next to it.
  on_all_workers "set -euo pipefail; python3 -m pip install --quiet --user uv; export PATH=\$HOME/.local/bin:\$PATH; \
uv python install 3.11; mkdir -p $REMOTE_DIR; tar -xzf tagjax.tar.gz -C $REMOTE_DIR; cd $REMOTE_DIR; \
PYTHON=\$(uv python find 3.11) TAGJAX_EXTRAS=tpu bash launch/setup.sh $SETUP_ARGS"
}

check_train_args() {
  local args=("$@") workdir="" i
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
      --workdir) workdir="${args[$((i + 1))]:-}" ;;
      --workdir=*) workdir="${args[$i]#--workdir=}" ;;
    esac
  done
  [[ "$workdir" == gs://* ]] || die "pass --workdir gs://BUCKET/PATH: every worker writes checkpoints there and it must outlive the slice"
}

# Run on each worker before the trainer: tells tagjax's multi-process start-up (JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES, JAX_PROCESS_ID, see tagjax/sharding.py) what JAX's own Cloud TPU detection reads from
# the VM metadata server: the worker list (first one = coordinator, port 8476 as JAX uses) and this
# worker's number. An entry of worker-network-endpoints is "host" or "name:id:ip". One worker: nothing.
# shellcheck disable=SC2016  # the $ expressions expand on the workers, not here
{
  TPU_CLUSTER_ENV='md() { curl -sf -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; '
  TPU_CLUSTER_ENV+='endpoints=$(md worker-network-endpoints); n=$(tr , "\n" <<< "$endpoints" | grep -c .); '
  TPU_CLUSTER_ENV+='IFS=: read -r a _ c <<< "${endpoints%%,*}"; if [ "$n" -gt 1 ]; then export '
  TPU_CLUSTER_ENV+='JAX_COORDINATOR_ADDRESS="${c:-$a}:8476" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$(md agent-worker-number)"; fi'
}

train() {
  check_train_args "$@"
  local quoted="" word
  for word in "$@"; do quoted+=" $(printf '%q' "$word")"; done
  # Every worker runs the same command. The pid file lets `stop` end exactly this process; the log
  # stays on each worker.
  on_all_workers "set -o pipefail; $TPU_CLUSTER_ENV; cd $REMOTE_DIR && { .venv/bin/tagjax train$quoted & echo \$! > ~/$REMOTE_PID; wait \$!; } 2>&1 | tee -a ~/$REMOTE_LOG"
}

run() {
  check_train_args "$@"
  local preemptions=0 node
  while :; do
    create
    setup
    if train "$@"; then
      say "training finished"
      return 0
    fi
    # A preemption ends the ssh sessions before the queued resource changes state: look again after a pause.
    [[ "$DRY_RUN" == 1 ]] || sleep "$POLL_SECONDS"
    refresh_state
    node=$(node_state)
    if [[ "$STATE" == ACTIVE && "$node" == READY ]]; then
      die "training failed while the slice is healthy (not a preemption); the log is ~/$REMOTE_LOG on each worker"
    fi
    preemptions=$((preemptions + 1))
    ((preemptions <= MAX_PREEMPTIONS)) || die "gave up after $MAX_PREEMPTIONS preemptions (MAX_PREEMPTIONS)"
    say "slice lost (queued resource $STATE, node $node), preemption $preemptions: recreating it and resuming from the workdir's newest checkpoint"
  done
}

command="${1:-}"
shift || true
case "$command" in
  create) create ;;
  setup) setup ;;
  data)
    (($# == 2)) || die "usage: tpu_pod.sh data gs://BUCKET/DATASET /local/path/on/workers"
    on_all_workers "mkdir -p $(printf '%q' "$2") && gcloud storage rsync --recursive $(printf '%q %q' "$1" "$2")"
    ;;
  train) train "$@" ;;
  run) run "$@" ;;
  status) refresh_state && echo "$STATE" ;;
  stop) on_all_workers "[ -f ~/$REMOTE_PID ] && kill \$(cat ~/$REMOTE_PID) 2>/dev/null; rm -f ~/$REMOTE_PID" ;;
  delete) gc compute tpus queued-resources delete "$TPU_NAME" "${location[@]}" --force --quiet ;;
  *) die "unknown command '${command}': use create, setup, data, train, run, status, stop or delete" ;;
esac
