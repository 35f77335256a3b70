#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then runs ruff and the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check estimator_mnv2 scripts tests examples
# Two worker processes, one test file each at a time: much of a test's time is single-threaded
# Python (graph building, process start-up), so two overlap well even on 2 cores.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n "${PYTEST_WORKERS:-2}" \
    --dist loadfile "$@"
