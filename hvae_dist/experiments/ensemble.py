"""`hvae ensemble`: N runs of the same config that differ only in the seed, each scored on the same examples,
and the analysis with WAIC over them (Choi et al. 2018; the paper's baseline "WAIC over 5 VAEs").

On one machine the runs train one after another (OUT/seed-I/run, scores in OUT/seed-I/scores/scores.h5),
then `hvae analyze OUT/seed-0/scores/scores.h5 --ensemble OUT/seed-1/... --out OUT/analysis` adds -WAIC to
every other score. Re-running continues: each run resumes, a scored shard is not recomputed. On SLURM the N
runs are independent jobs (an array in all but name), submitted with the existing pipeline, e.g. for N = 5:

    for i in 0 1 2 3 4; do
      hvae submit pipeline --config tiny --run-dir runs/ens/seed-$i --set train.seed=$i \\
          --datasets FashionMNIST:test MNIST:test --max-examples 500 --iw-samples 16 --num-shards 4 --partition P
    done
    hvae analyze runs/ens/seed-0/scores/scores.h5 --in-dist FashionMNIST:test \\
        --ensemble runs/ens/seed-{1,2,3,4}/scores/scores.h5
"""
from __future__ import annotations

from pathlib import Path

from hvae_dist.errors import ConfigError
from hvae_dist.experiments import stages


def run_ensemble(out: str | Path, seeds: int, config: str = "tiny", steps: int = 2500, minutes: float | None = None,
                 datasets: list[str] | None = None, iw_samples: int = 16, max_examples: int = 500,
                 overrides: list[str] | None = None) -> list[Path]:
    """Train `seeds` runs (train.seed = 0 .. seeds-1) one after another, score and merge each, analyze with
    WAIC over them into OUT/analysis; returns the score files (seed 0 first)."""
    if seeds < 2:
        raise ConfigError(f"--seeds must be >= 2 (WAIC is a variance over runs), got {seeds}")
    out = Path(out)
    datasets = datasets or ["FashionMNIST:test", "MNIST:test"]
    files, notes = [], []
    for i in range(seeds):
        run_dir, scores = out / f"seed-{i}" / "run", out / f"seed-{i}" / "scores"
        budget = stages.budget_overrides(steps, minutes)
        if (run_dir / "config.json").exists():
            trained = stages.train(run_dir, None, budget)
        else:
            trained = stages.train(run_dir, config, [*budget, f"train.seed={i}"], overrides)
        if trained.get("reason") == "signal":      # stopped by SIGTERM / Ctrl-C: the checkpoint is saved, go no further
            raise SystemExit(128 + int(trained.get("signal", 15)))
        if note := stages.budget_note(trained, steps, minutes):
            notes.append(f"seed {i}: {note}")
        stages.score(run_dir, datasets, scores, iw_samples, max_examples)
        files.append(stages.merge(scores))
    stages.analyze(files[0], datasets[0], out / "analysis", "; ".join(notes) or None, ensemble=files[1:])
    return files
