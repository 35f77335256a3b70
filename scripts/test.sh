#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then runs ruff and the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check estimator_mnv2 scripts tests
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
