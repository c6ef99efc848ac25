#!/usr/bin/env bash
# The comparison of docs/results/comparison/README.md for one in-distribution set:
#   docs/results/comparison/run.sh FashionMNIST MNIST runs/comparison      (then: MNIST FashionMNIST)
# SEEDS runs of the tiny preset (STEPS steps each, the KL / free-nats schedules shortened to WARM steps) scored
# on the first N examples of IN:train, IN:test and OOD:test (S importance samples), seed 0 rescored with
# Likelihood Regret (LR_STEPS Adam steps) and the gradients, then one analysis with every method, DoSE-KDE,
# WAIC over the SEEDS runs and 1000 bootstrap resamples.
set -euo pipefail
IN=$1 OOD=$2 OUT=${3:-runs/comparison}/$1
STEPS=${STEPS:-300} WARM=${WARM:-100} SEEDS=${SEEDS:-2} N=${N:-200} S=${S:-16} LR_STEPS=${LR_STEPS:-20}
HVAE=${HVAE:-.venv/bin/hvae}
VAL="[\"$IN:validation\"]"
$HVAE ensemble --seeds "$SEEDS" --out "$OUT" --steps "$STEPS" --datasets "$IN:train" "$IN:test" "$OOD:test" \
    --iw-samples "$S" --max-examples "$N" --set "data.dataset=$IN" --set "data.val_datasets=$VAL" \
    --set train.eval_every=0 --set "train.kl_warmup_steps=$WARM" --set "train.free_nats_steps=$WARM" \
    --set "train.free_nats_cooldown_steps=$WARM" --set "train.checkpoint_every=$STEPS"
$HVAE score --run-dir "$OUT/seed-0/run" --datasets "$IN:train" "$IN:test" "$OOD:test" --iw-samples "$S" \
    --max-examples "$N" --likelihood-regret --lr-steps "$LR_STEPS" --gradients --out "$OUT/baselines" --no-progress
$HVAE merge "$OUT/baselines"
$HVAE analyze "$OUT/baselines/scores.h5" --in-dist "$IN:test" --dose kde --bootstrap 1000 --bootstrap-seed 0 \
    --ensemble $(for i in $(seq 1 $((SEEDS - 1))); do echo "$OUT/seed-$i/scores/scores.h5"; done) --out "$OUT/report"
