#!/usr/bin/env bash
# Install, then reproduce the whole pipeline on the embedded synthetic phantom with DVC:
# phantom -> extract (random:0 VGG16 at demo resolutions) -> train -> evaluate -> interpret -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# `dvc exp` needs a git identity; set a local one only where none is configured.
git config user.name >/dev/null || git config user.name "drct demo"
git config user.email >/dev/null || git config user.email "drct-demo@localhost"
.venv/bin/dvc repro
echo
echo "Metrics:  $(ls runs/demo/metrics.json runs/demo/interpret.json 2>/dev/null | tr '\n' ' ')"
echo "Reports:  reports/demo/index.html  (one HTML page per scan, images embedded)"
echo "Compare:  .venv/bin/dvc metrics show ; .venv/bin/dvc exp run -S train.lr_primary=0.001"
