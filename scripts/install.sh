#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its test tools. Idempotent: a second
# run only checks. torch comes pinned to 2.14.1 (the CPU wheel on disk here; CUDA builds elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
