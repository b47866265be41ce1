#!/usr/bin/env bash
# Set up moecomp on a fresh machine: system packages (FashionMNIST, PostgreSQL for the
# multi-worker study tests) and a virtual environment in .venv with the CPU build of torch.
# Idempotent: steps already done are skipped. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install the Debian packages: ${need_apt[*]} (needs root)" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import moecomp, pytest, torch" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.moecomp-installed ]; then
  echo "setup: installing torch==2.13.0 (CPU) and moecomp[dev]"
  .venv/bin/python -m pip install -q --upgrade pip
  # Pinned for this kind of machine: a bare 'torch' may pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch .venv/.moecomp-installed
fi
