#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its test tools, at the tested pins of
# constraints.txt (what CI installs). Idempotent: a second run only checks.
# torch: the default wheel from PyPI. For a specific build (CPU-only, or CUDA 12.x) set
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu      (or .../whl/cu126, ...)
# and torch/torchvision are installed from that index first, at the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt torch torchvision \
    --index-url "$TORCH_INDEX_URL"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
