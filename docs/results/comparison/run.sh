#!/usr/bin/env bash
# The comparison of docs/results/comparison/README.md for one in-distribution set:
#   docs/results/comparison/run.sh FashionMNIST MNIST runs/comparison      (then: MNIST FashionMNIST)
# SEEDS runs of the tiny preset (STEPS steps each, the KL / free-nats schedules shortened to WARM steps), each
# scored with its RAW weights (--no-ema: after 300 steps the recipe's EMA, decay 0.999, still holds 74% of the
# initial weights) on N examples of IN:train, IN:test and OOD:test (S importance samples); seed 0 also with
# Likelihood Regret (LR_STEPS Adam steps) and the gradients; then one analysis with every method, DoSE-KDE,
# WAIC over the SEEDS runs and 1000 bootstrap resamples.
set -euo pipefail
IN=$1 OOD=$2 OUT=${3:-runs/comparison}/$1
STEPS=${STEPS:-300} WARM=${WARM:-100} SEEDS=${SEEDS:-2} N=${N:-100} S=${S:-16} LR_STEPS=${LR_STEPS:-10}
HVAE=${HVAE:-.venv/bin/hvae}
VAL="[\"$IN:validation\"]"
SETS=("$IN:train" "$IN:test" "$OOD:test")
# trains the seeds (it also scores them with the EMA weights into OUT/seed-I/scores: not used below)
$HVAE ensemble --seeds "$SEEDS" --out "$OUT" --steps "$STEPS" --datasets "${SETS[@]}" \
    --iw-samples "$S" --max-examples "$N" --set "data.dataset=$IN" --set "data.val_datasets=$VAL" \
    --set train.eval_every=0 --set "train.kl_warmup_steps=$WARM" --set "train.free_nats_steps=$WARM" \
    --set "train.free_nats_cooldown_steps=$WARM" --set "train.checkpoint_every=$STEPS"
for i in $(seq 0 $((SEEDS - 1))); do
  $HVAE score --run-dir "$OUT/seed-$i/run" --datasets "${SETS[@]}" --iw-samples "$S" --max-examples "$N" \
      --no-ema --out "$OUT/raw/seed-$i" --no-progress
  $HVAE merge "$OUT/raw/seed-$i"
done
$HVAE score --run-dir "$OUT/seed-0/run" --datasets "${SETS[@]}" --iw-samples "$S" --max-examples "$N" --no-ema \
    --likelihood-regret --lr-steps "$LR_STEPS" --gradients --out "$OUT/raw/baselines" --no-progress
$HVAE merge "$OUT/raw/baselines"
$HVAE analyze "$OUT/raw/baselines/scores.h5" --in-dist "$IN:test" --dose kde --bootstrap 1000 --bootstrap-seed 0 \
    --ensemble $(for i in $(seq 1 $((SEEDS - 1))); do echo "$OUT/raw/seed-$i/scores.h5"; done) --out "$OUT/analysis"
