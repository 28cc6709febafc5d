#!/usr/bin/env bash
# The phantom end to end from DICOM (issue 8): an encoder adapted on a *separate* phantom (another
# seed) -> stage one with those frozen weights -> DrCT2 and DrCT1, 5 patient-grouped folds ->
# metrics, Algorithm 1, reports. Never uses the validation scans' labels outside stage two.
#   bench/phantom_e2e.sh                     # 200 scans (+60 for adaptation), 32/64 px
#   SCANS=300 EPOCHS=60 bench/phantom_e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-bench/results/phantom_e2e}
SCANS=${SCANS:-200}; ADAPT_SCANS=${ADAPT_SCANS:-60}; EPOCHS=${EPOCHS:-30}; RES=${RES:-[32,64]}
TRAIN_SETS=(--set sampler.m=16 --set model.m_key=8 --set train.batch_size=8 --folds 5 --epochs "$EPOCHS")
mkdir -p "$OUT"
start=$SECONDS
step() { echo "[$((SECONDS - start)) s] $*" >&2; }
step "phantoms: $ADAPT_SCANS scans to adapt on (seed 101), $SCANS to diagnose (seed 7)"
drct phantom "$OUT/adapt_data" --scans "$ADAPT_SCANS" --seed 101 --size 64 --no-progress
drct phantom "$OUT/data" --scans "$SCANS" --seed 7 --size 64 --no-progress
step "adapt (block 5 on the adaptation phantom's slice labels)"
drct adapt --data "$OUT/adapt_data" --out "$OUT/vgg16_adapted.pth" --set "extract.resolutions=$RES" \
  --set extract.weights=random:0 --epochs "${ADAPT_EPOCHS:-6}" --no-progress
step "extract with the adapted, frozen encoder"
drct extract --data "$OUT/data" --layout rsna --out "$OUT/features.h5" --weights "$OUT/vgg16_adapted.pth" \
  --set "extract.resolutions=$RES" --set extract.aps_source=native --workers 0 --no-progress
for model in drct2 drct1; do
  step "train $model"
  drct train --cache "$OUT/features.h5" --out "$OUT/$model" --model "$model" "${TRAIN_SETS[@]}" --no-progress
done
step "evaluate, interpret, report"
drct evaluate "$OUT/drct2" --compare "$OUT/drct1"
drct evaluate "$OUT/drct1"
drct interpret "$OUT/drct2" --out "$OUT/interpret"
drct report "$OUT/drct2" --out "$OUT/reports" --no-progress
step "done"
