#!/usr/bin/env bash
# One command for a fresh machine: set up, then lint, type-check and run the test suite
# (notebooks are executed by tests/test_notebooks.py). This is what .ci/run calls.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check moecomp tests bench
echo "== mypy"; .venv/bin/mypy moecomp
echo "== pytest"; exec .venv/bin/python -m pytest -q "$@"
