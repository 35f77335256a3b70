#!/usr/bin/env bash
# Creates .venv with TensorFlow 2.15 (CPU), tensorflow-estimator and the project installed
# in editable mode with its test and digits extras. Safe to run again: it only adds what is
# missing. Needs Python 3.9-3.11 (TensorFlow 2.15 has no wheels for newer Pythons).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for p in "${PYTHON:-}" python3.11 python3.10 python3.9 python3; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 || continue
    if "$p" -c 'import sys; sys.exit(not ((3, 9) <= sys.version_info[:2] <= (3, 11)))'; then
      echo "$p"; return 0
    fi
  done
  echo "error: need Python 3.9-3.11 for TensorFlow 2.15 (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  "$(pick_python)" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[cpu,test,digits]'
.venv/bin/python -c 'import estimator_mnv2, tensorflow as tf; print("estimator_mnv2 ready: TensorFlow", tf.__version__)'
