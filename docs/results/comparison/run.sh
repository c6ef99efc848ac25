#!/usr/bin/env bash
# The comparison of docs/results/comparison/README.md for one in-distribution set:
#   docs/results/comparison/run.sh FashionMNIST MNIST runs/comparison            (5 seeds: WAIC over 5 runs)
#   SEEDS=1 N=200 docs/results/comparison/run.sh MNIST FashionMNIST runs/comparison   (no WAIC: one run)
# SEEDS runs of the tiny preset with the demo's recipe and budget (STEPS fixed steps, EMA weights), each scored
# on N class-stratified examples of IN:test, OOD:test and IN:train (S importance samples); seed 0 again with
# Likelihood Regret (LR_STEPS Adam steps, the original's 100), the per-layer gradients and input complexity; then one analysis
# with every method, DoSE-KDE (fit on IN:train), WAIC over the SEEDS runs and 1000 bootstrap resamples.
# Re-running continues where it stopped (runs resume, scored shards are kept).
set -euo pipefail
IN=$1 OOD=$2 OUT=${3:-runs/comparison}/$1
STEPS=${STEPS:-2500} SEEDS=${SEEDS:-5} N=${N:-500} S=${S:-16} LR_STEPS=${LR_STEPS:-100}
HVAE=${HVAE:-.venv/bin/hvae}
SETS=("$IN:test" "$OOD:test" "$IN:train")   # in-distribution first (the ensemble's own analysis)
DATA=()
if [ "$IN" != FashionMNIST ]; then   # the tiny preset trains on FashionMNIST; another IN set replaces it
  DATA=(--set "data.dataset=$IN" --set "data.val_datasets=[\"$IN:validation\", \"$OOD:validation\"]")
fi
# trains the seeds one after another (train.seed = 0 .. SEEDS-1) and scores each into OUT/seed-I/scores; one
# seed (no WAIC) is `hvae demo`'s run and scoring, the same as the ensemble's seed 0
if [ "$SEEDS" -gt 1 ]; then
  $HVAE ensemble --seeds "$SEEDS" --out "$OUT" --steps "$STEPS" --datasets "${SETS[@]}" \
      --iw-samples "$S" --max-examples "$N" "${DATA[@]}"
else
  $HVAE demo --out "$OUT/seed-0" --steps "$STEPS" --datasets "${SETS[@]}" --iw-samples "$S" --max-examples "$N" \
      --set train.seed=0 "${DATA[@]}"
fi
$HVAE score --run-dir "$OUT/seed-0/run" --datasets "${SETS[@]}" --iw-samples "$S" --max-examples "$N" \
    --likelihood-regret --lr-steps "$LR_STEPS" --gradients --complexity --out "$OUT/baselines" --no-progress
$HVAE merge "$OUT/baselines"
ENSEMBLE=()
for i in $(seq 1 $((SEEDS - 1))); do ENSEMBLE+=("$OUT/seed-$i/scores/scores.h5"); done
$HVAE analyze "$OUT/baselines/scores.h5" --in-dist "$IN:test" --dose kde --bootstrap 1000 --bootstrap-seed 0 \
    ${ENSEMBLE[@]+--ensemble "${ENSEMBLE[@]}"} --out "$OUT/analysis"
