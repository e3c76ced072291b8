#!/usr/bin/env bash
# Trains on one machine: all of its local accelerators (GPUs, or the chips of a single TPU VM), or its CPU.
#
# Usage:
#   bash launch/local.sh --config CONFIG --workdir DIR [--config.key=value ...]
# Everything after the script name goes to `tagjax train` unchanged. Re-running the same command resumes
# from the newest checkpoint in DIR (the trainer restores model, optimizer and data-iterator state).
#
# Environment:
#   DRY_RUN=1        print the commands (one line each, shell-quoted) and run nothing.
#   CPU_DEVICES=N    run on the CPU as N simulated devices (XLA's host device count), so a data x FSDP
#                    mesh can be tried on a laptop.
#   NUM_PROCESSES=N  start N processes on this machine that form one JAX cluster over localhost, exactly
#                    as N hosts would (jax.distributed; process 0 is the coordinator). The stand-in for a
#                    multi-host run; each process's output is prefixed with [pI].
#   DEVICES_PER_PROCESS=K  with NUM_PROCESSES on GPUs: process I drives local GPUs I*K .. I*K+K-1.
#                    With CPU_DEVICES, every process simulates CPU_DEVICES devices of its own.
#   COORDINATOR_PORT port of the coordinator on localhost (default 14000 + a number from this shell's PID).
#   TAGJAX           the tagjax command (default: .venv/bin/tagjax of this checkout).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAGJAX="${TAGJAX:-$REPO/.venv/bin/tagjax}"
DRY_RUN="${DRY_RUN:-0}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
# `wait -n -p` (which process ended) needs bash 5.1: Debian 12, Ubuntu 22.04 and later have it.
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || { echo "local.sh: error: needs bash >= 5.1" >&2; exit 2; }

die() {
  echo "local.sh: error: $*" >&2
  exit 2
}

# Prints a command as one shell-quoted line: what DRY_RUN shows and what a log records.
show() {
  local out="+" word
  for word in "$@"; do out+=" $(printf '%q' "$word")"; done
  echo "$out"
}

(($# > 0)) || die "pass the arguments of tagjax train, e.g. --config tiny --workdir /tmp/tagjax-tiny"
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, not '$NUM_PROCESSES'"
if [[ "$DRY_RUN" != 1 && ! -x "$TAGJAX" ]]; then
  command -v "$TAGJAX" >/dev/null 2>&1 || die "$TAGJAX not found: run 'bash launch/setup.sh' first (or set TAGJAX)"
fi

# Environment shared by every process of this run.
common_env=()
if [[ -n "${CPU_DEVICES:-}" ]]; then
  [[ "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] || die "CPU_DEVICES must be a positive integer, not '$CPU_DEVICES'"
  common_env+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$CPU_DEVICES${XLA_FLAGS:+ $XLA_FLAGS}")
fi

if ((NUM_PROCESSES == 1)); then
  cmd=(env "${common_env[@]}" "$TAGJAX" train "$@")
  show "${cmd[@]}"
  [[ "$DRY_RUN" == 1 ]] && exit 0
  exec "${cmd[@]}"
fi

# --- several processes on this machine, joined by jax.distributed over localhost ---------------------
port="${COORDINATOR_PORT:-$((14000 + $$ % 1000))}"
pids=()
# shellcheck disable=SC2317  # called from the EXIT trap, which shellcheck 0.9 does not follow
cleanup() {
  local pid
  # Each process leads its own process group (set -m below): end it with its children (data workers).
  # Only the ones still running: a process that ended is left alone, because its group also holds the
  # `sed` that prefixes its output, which may not have printed its last lines (the error) yet.
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
set -m

for ((i = 0; i < NUM_PROCESSES; i++)); do
  proc_env=("${common_env[@]}"
    "JAX_COORDINATOR_ADDRESS=localhost:$port" "JAX_NUM_PROCESSES=$NUM_PROCESSES" "JAX_PROCESS_ID=$i")
  if [[ -n "${DEVICES_PER_PROCESS:-}" && -z "${CPU_DEVICES:-}" ]]; then
    ids=$(seq -s, $((i * DEVICES_PER_PROCESS)) $((i * DEVICES_PER_PROCESS + DEVICES_PER_PROCESS - 1)))
    proc_env+=("JAX_LOCAL_DEVICE_IDS=$ids")
  fi
  cmd=(env "${proc_env[@]}" "$TAGJAX" train "$@")
  show "${cmd[@]}"
  [[ "$DRY_RUN" == 1 ]] && continue
  # Each process's lines carry its index; sed runs line-buffered so the logs interleave readably.
  "${cmd[@]}" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done
[[ "$DRY_RUN" == 1 ]] && exit 0

# The first failure ends the run: the other processes would otherwise wait on it in a collective.
status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  finished=""
  if wait -n -p finished "${remaining[@]}"; then code=0; else code=$?; fi
  left=()
  for pid in "${remaining[@]}"; do [[ "$pid" == "$finished" ]] || left+=("$pid"); done
  remaining=("${left[@]}")
  if ((code != 0)); then
    status=1
    echo "local.sh: a process failed (exit status $code); stopping the others" >&2
    pids=("${remaining[@]}")
    break
  fi
done
if ((status == 0)); then
  pids=()
  echo "local.sh: all $NUM_PROCESSES processes finished"
fi
exit "$status"
