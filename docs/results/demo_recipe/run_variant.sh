#!/bin/bash
# One candidate of the demo's recipe: the tiny preset for STEPS steps on one thread with EMA 0.999 plus the
# given overrides (later --sets win), then the first 1,000 FashionMNIST / MNIST test examples scored at
# S = 16 twice, with the EMA weights (report-ema) and with the raw weights (report-raw).
# usage (from the repository root): OUT=runs/recipe docs/results/demo_recipe/run_variant.sh NAME STEPS [--set KEY=VALUE ...]
set -e
name=$1; steps=$2; shift 2
R=${OUT:-runs/recipe}/$name
export OMP_NUM_THREADS=${THREADS:-1}
H=.venv/bin/hvae
mkdir -p "$R"
$H train --config tiny --run-dir "$R" --no-progress --set train.max_steps="$steps" --set train.ema_decay=0.999 "$@" > "$R.train.log" 2>&1
for mode in ema raw; do
  flag=""; [ $mode = raw ] && flag=--no-ema
  $H score --run-dir "$R" --datasets FashionMNIST:test MNIST:test --iw-samples 16 --max-examples 1000 \
    --out "$R/scores-$mode" $flag --no-progress > "$R.score-$mode.log" 2>&1
  $H merge "$R/scores-$mode" >> "$R.score-$mode.log" 2>&1
  $H analyze "$R/scores-$mode/scores.h5" --in-dist FashionMNIST:test --out "$R/report-$mode" >> "$R.score-$mode.log" 2>&1
done
