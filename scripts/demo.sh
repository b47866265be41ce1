#!/usr/bin/env bash
# One command for a fresh machine: set up, then run the whole pipeline on the embedded
# default (scikit-learn digits): train, search, pick, refine, export, decode, verify.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/moecomp demo "$@"
