#!/usr/bin/env bash
# The comparison of docs/results/comparison/README.md for one in-distribution set:
#   docs/results/comparison/run.sh FashionMNIST MNIST runs/comparison      (then: MNIST FashionMNIST)
# Three runs of the tiny preset (seeds 0, 1, 2; STEPS steps each) scored on the first N examples of IN:train,
# IN:test and OOD:test (S = 64), seed 0 rescored with Likelihood Regret and the gradients, then one analysis
# with every method, DoSE-KDE, WAIC over the three runs and 1000 bootstrap resamples.
set -euo pipefail
IN=$1 OOD=$2 OUT=${3:-runs/comparison}/$1
STEPS=${STEPS:-1500} N=${N:-300} S=${S:-64} LR_STEPS=${LR_STEPS:-20}
HVAE=${HVAE:-.venv/bin/hvae}
VAL="[\"$IN:validation\"]"
$HVAE ensemble --seeds 3 --out "$OUT" --steps "$STEPS" --datasets "$IN:train" "$IN:test" "$OOD:test" \
    --iw-samples "$S" --max-examples "$N" --set "data.dataset=$IN" --set "data.val_datasets=$VAL" \
    --set train.eval_every=0
$HVAE score --run-dir "$OUT/seed-0/run" --datasets "$IN:train" "$IN:test" "$OOD:test" --iw-samples "$S" \
    --max-examples "$N" --likelihood-regret --lr-steps "$LR_STEPS" --gradients --out "$OUT/baselines" --no-progress
$HVAE merge "$OUT/baselines"
$HVAE analyze "$OUT/baselines/scores.h5" --in-dist "$IN:test" --dose kde --bootstrap 1000 --bootstrap-seed 0 \
    --ensemble "$OUT/seed-1/scores/scores.h5" "$OUT/seed-2/scores/scores.h5" --out "$OUT/report"
