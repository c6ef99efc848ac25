#!/usr/bin/env bash
# The LID / dual-threshold experiment of this folder (README.md), both directions, tiny preset, one thread each.
# Usage: docs/results/lid_dual_threshold/run.sh WORKDIR   (from the repository root; the two directions run in parallel)
set -euo pipefail
work=${1:?usage: run.sh WORKDIR}
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1
direction() {   # IN OOD
  local run=$work/runs/tiny-$1 out=$work/scores/$1
  # trained for 30 minutes of wall time on a loaded 2-core machine, stopped by SIGTERM (it checkpoints and exits);
  # --max-steps 600 reaches about the same point (579 / 569 steps here)
  hvae train --config tiny --run-dir "$run" --max-steps 600 --set data.dataset="$1" --set "data.val_datasets=[]" \
      --set train.eval_every=0 --set train.log_every=100
  hvae score --run-dir "$run" --datasets "$1:test" "$2:test" "$1:validation" --first 200 --iw-samples 16 \
      --ks 1 2 --lid --lid-ks 1 2 --lid-scales 0.1 1 --batch-size 20 --out "$out" --no-progress
  hvae merge "$out"
  hvae analyze "$out/scores.h5" --in-dist "$1:test" --out "$work/analysis/$1"
  # all latents (k = 0): the full 808-column Jacobian, so 40 examples per set
  hvae score --run-dir "$run" --datasets "$1:test" "$2:test" "$1:validation" --first 40 --iw-samples 16 \
      --ks 1 2 --lid --lid-ks 0 1 --lid-scales 0.1 1 --batch-size 10 --out "$work/scores-k0/$1" --no-progress
  hvae merge "$work/scores-k0/$1"
  hvae analyze "$work/scores-k0/$1/scores.h5" --in-dist "$1:test" --out "$work/analysis-k0/$1"
}
direction FashionMNIST MNIST &
direction MNIST FashionMNIST &
wait
python "$here/make_table.py" "$work/analysis/FashionMNIST/metrics.json" "$work/analysis/MNIST/metrics.json"
