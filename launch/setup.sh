#!/usr/bin/env bash
# Sets up everything tagjax needs on a Debian/Ubuntu machine; safe to run again (idempotent).
#   - Debian packages: WordNet 3.0 (wordnet-base), the openclipart corpus, the emoji font and Unicode
#     data for the demo's downstream task, shellcheck for the launch scripts' test.
#   - uv (from PyPI) and a virtual environment in .venv with the exact versions of uv.lock.
# Usage: bash launch/setup.sh [--no-apt]
# Env: TAGJAX_EXTRAS (default "dev beam"): the optional dependency groups to install.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(wordnet-base openclipart-svg fonts-noto-color-emoji unicode-data tuxpaint-stamps-default shellcheck)

if [[ "${1:-}" != "--no-apt" ]]; then
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PYTHON="${PYTHON:-python3}"
if ! command -v uv >/dev/null 2>&1 && ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
  echo "setup: installing uv"
  "$PYTHON" -m pip install --quiet --user uv 2>/dev/null || "$PYTHON" -m pip install --quiet uv
fi
UV=(uv)
command -v uv >/dev/null 2>&1 || UV=("$PYTHON" -m uv)

extras=()
for extra in ${TAGJAX_EXTRAS:-dev beam}; do extras+=(--extra "$extra"); done
# --frozen: install exactly what uv.lock says; never re-resolve on a user's machine.
UV_PYTHON_DOWNLOADS=never "${UV[@]}" sync --quiet --frozen --python "$PYTHON" "${extras[@]}"
echo "setup: ready (.venv, $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
