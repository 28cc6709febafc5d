#!/usr/bin/env bash
# Phantom accuracy experiment (issues 3 and 4): DrCT1 vs DrCT2 on a 280-scan RSNA-layout phantom,
# random:0 VGG16 features at 64/128 px (configs/phantom_accuracy.yaml), 5 patient-grouped folds,
# paired t-test, Tables 5-6 (drct interpret), and a linear probe of the features vs HU statistics.
# Results: BENCHMARKS.md, section "Phantom accuracy (issue 3/4)". Data and runs are gitignored.
# Usage: bench/phantom_accuracy.sh [extra `drct train` args, e.g. --set train.epochs=150]
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=configs/phantom_accuracy.yaml
DRCT=.venv/bin/drct
RUNS=runs/phantom_acc
t() { local s=$SECONDS; "$@"; echo "[wall $((SECONDS - s)) s] $*" >&2; }

t $DRCT phantom --config $CFG --no-progress                       # data/phantom_acc (scans/size/seed from CFG)
t $DRCT extract --config $CFG --no-progress                       # data/phantom_acc_features.h5
t $DRCT train --config $CFG --model drct1 --out $RUNS/drct1 --quiet "$@"
t $DRCT train --config $CFG --model drct2 --out $RUNS/drct2 --quiet "$@"
t $DRCT evaluate $RUNS/drct1
t $DRCT evaluate $RUNS/drct2 --compare $RUNS/drct1                # paired t-test across folds, DrCT2 - DrCT1
t $DRCT interpret $RUNS/drct1                                     # Tables 5-6 -> interpret.json
t $DRCT interpret $RUNS/drct2
t .venv/bin/python bench/phantom_probe.py data/phantom_acc_features.h5 --json $RUNS/probe.json
