#!/usr/bin/env bash
# Creates .venv with TensorFlow 2.15 (CPU), tensorflow-estimator and the project installed
# in editable mode with its test, digits and plots extras. Safe to run again: it installs again
# only when pyproject.toml changed (delete .venv/.estimator_mnv2-installed to force it).
# Needs Python 3.9-3.11 (TensorFlow 2.15 has no wheels for newer Pythons).
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
# Installs again only when pyproject.toml changed since the last install (a stamp in .venv).
extras='.[cpu,test,digits,plots]'
stamp=".venv/.estimator_mnv2-installed"
want="$extras $(cksum < pyproject.toml)"  # cksum: POSIX, on Linux and macOS alike
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -e "$extras"
  echo "$want" > "$stamp"
fi
.venv/bin/python -c 'import estimator_mnv2, tensorflow as tf; print("estimator_mnv2 ready: TensorFlow", tf.__version__)'
