"""`hvae demo`: the paper's headline on offline data, end to end on a CPU.

Trains a model (the `tiny` preset by default; `--config biva-tiny` for BIVA) with the recipe of
experiments/recipe.py (EMA weights) on FashionMNIST for a bounded time, scores FashionMNIST-test against
MNIST-test and AnimalMNIST-test with importance-weighted ELBO and L>k for every k, merges, and prints the
AUROC table. Each stage calls the function behind a CLI command (experiments/stages.py) and prints that
command before it runs, so the demo is also a worked example.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hvae_dist.config import SCORE_PRECISIONS
from hvae_dist.experiments.recipe import DEMO_STEPS, POSTER_STEPS, RECIPE

EXAMPLES = """examples:
  hvae demo                                   # DEMO_STEPS training steps + scoring on a CPU -> runs/demo/
  hvae demo --steps 500 --iw-samples 8 --max-examples 200 --out runs/quick
  hvae demo --minutes 5                       # at most 5 min of training; says "stopped at step N of M" if cut
  hvae demo --config biva-tiny --out runs/demo-biva   # the same with the BIVA model
Re-running with the same --out resumes the run and rescores; the report is runs/demo/scores/analysis/report.html
(where `hvae analyze runs/demo/scores/scores.h5` writes it too)."""


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EXAMPLES
    p.add_argument("--config", default="tiny", help="preset or JSON file of the model to train (e.g. biva-tiny)")
    p.add_argument("--out", default="runs/demo", help="folder for the run, scores and report")
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help="training steps: a fixed budget, so the result does not depend on how busy the machine is")
    p.add_argument("--minutes", type=float, default=None,
                   help="optional cap on the training wall time; a run it stops early says 'stopped at step N of M' "
                        "(default: no cap)")
    # The one precision trains and scores: only those both commands take.
    p.add_argument("--precision", choices=SCORE_PRECISIONS, default="fp32", help="network precision")
    p.add_argument("--iw-samples", type=int, default=16, help="importance samples per bound")
    p.add_argument("--max-examples", type=int, default=500, help="examples scored per dataset")
    p.add_argument("--datasets", nargs="+", default=["FashionMNIST:test", "MNIST:test", "AnimalMNIST:test"],
                   help="datasets to score, in-distribution first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training config overrides after the demo's recipe (experiments/recipe.py: "
                        f"{' '.join(RECIPE)}), e.g. --set train.ema_decay=0 (repeatable)")


def run_demo(args: argparse.Namespace) -> int:
    from hvae_dist.experiments import stages

    out = Path(args.out)
    # The report goes where `hvae analyze` and `hvae submit` put it by default: the score folder's analysis/.
    run_dir, scores = out / "run", out / "scores"
    report = scores / "analysis"
    t0 = time.monotonic()
    budget = stages.budget_overrides(args.steps, args.minutes)
    if (run_dir / "config.json").exists():  # resume the same run; its config stays as it was
        trained = stages.train(run_dir, None, budget)
    else:
        trained = stages.train(run_dir, args.config, budget, args.overrides, precision=args.precision)
    note = stages.budget_note(trained, args.steps, args.minutes)
    t1 = time.monotonic()
    stages.score(run_dir, args.datasets, scores, args.iw_samples, args.max_examples)
    stages.merge(scores)
    t2 = time.monotonic()
    stages.analyze(scores / "scores.h5", args.datasets[0], report, note)
    print(f"\ndemo done: training {(t1 - t0) / 60:.1f} min ({note or f'{args.steps} steps'}), "
          f"scoring {(t2 - t1) / 60:.1f} min. "
          f"Tables: {report}/metrics.md, TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    print("The paper (Havtorn et al. 2021, FashionMNIST -> MNIST): AUROC of log p(x) well below 0.5, LLR>1 0.986.")
    print(f"Report: open {report / 'report.html'}")
    return 0


POSTER_EXAMPLES = """examples:
  hvae poster --out runs/poster                              # both models, every set that resolves offline
  hvae poster --out runs/poster --data-root ~/data           # + KMNIST, notMNIST, Omniglot, SmallNORB
  hvae poster --steps 2000 --minutes 30 --out runs/poster    # a cap: "stopped at step N of M" when it stops early
Re-running with the same --out continues an interrupted stage and skips finished ones."""


def add_poster_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = POSTER_EXAMPLES
    p.add_argument("--out", default="runs/poster", help="folder for both runs, their scores, analyses and the table")
    p.add_argument("--steps", type=int, default=POSTER_STEPS, help="training steps per model (a fixed budget)")
    p.add_argument("--minutes", type=float, default=None,
                   help="optional cap on each model's training wall time; a model it stops early is marked "
                        "'stopped at step N of M' in the output and poster.md (default: no cap)")
    p.add_argument("--config", default="tiny", help="preset or JSON file of both models")
    p.add_argument("--iw-samples", type=int, default=64, help="importance samples per bound")
    p.add_argument("--max-examples", type=int, default=1000, help="examples scored per dataset")
    p.add_argument("--data-root", default=None, metavar="DIR", help="folder with the sets that do not ship offline")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training config overrides for both models, after the recipe (experiments/recipe.py: "
                        f"{' '.join(RECIPE)}; repeatable)")


def add_ensemble_arguments(p: argparse.ArgumentParser) -> None:
    from hvae_dist.experiments.ensemble import __doc__ as doc

    p.epilog = "On SLURM (one job per seed):\n" + doc.split("e.g. for N = 5:\n\n", 1)[1]
    p.add_argument("--seeds", type=int, default=5, help="number of runs (train.seed = 0 .. N-1)")
    p.add_argument("--out", default="runs/ensemble", help="folder for OUT/seed-I/{run,scores} and OUT/analysis")
    p.add_argument("--config", default="tiny", help="preset or JSON file of every run")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps per run")
    p.add_argument("--minutes", type=float, default=None, help="optional cap on each run's training wall time")
    p.add_argument("--datasets", nargs="+", default=["FashionMNIST:test", "MNIST:test"],
                   help="datasets every run scores, in-distribution first")
    p.add_argument("--iw-samples", type=int, default=16, help="importance samples per bound")
    p.add_argument("--max-examples", type=int, default=500, help="examples scored per dataset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training config overrides of every run (repeatable)")


def run_ensemble(args: argparse.Namespace) -> int:
    from hvae_dist.experiments.ensemble import run_ensemble as ensemble

    files = ensemble(args.out, args.seeds, args.config, args.steps, args.minutes, args.datasets, args.iw_samples,
                     args.max_examples, args.overrides)
    print(f"\nensemble of {len(files)} runs; report with -WAIC: {Path(args.out) / 'analysis'}")
    return 0


def run_poster(args: argparse.Namespace) -> int:
    from hvae_dist.experiments.poster import run_poster as poster

    print(poster(args.out, args.minutes, args.config, args.iw_samples, args.max_examples, args.data_root,
                 args.overrides, steps=args.steps))
    return 0
