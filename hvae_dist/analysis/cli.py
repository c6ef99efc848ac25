"""`hvae analyze FILE --in-dist NAME:SPLIT`: AUROC / AUPRC / FPR80 of every OOD set x score.

Writes DIR/metrics.{md,csv,json}, the ROC / histogram PNGs and report.html (DIR defaults to FILE's
folder / "analysis"; the folder is replaced as a whole), prints the table, and optionally logs it all to
TensorBoard. Every score is oriented so that higher = more OOD; the table's footer says what each one is
(see hvae_dist.analysis.metrics).
Heavy imports (h5py, scikit-learn, matplotlib, torch) happen in `run`, so `hvae --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  hvae analyze scores/fm/scores.h5 --in-dist FashionMNIST:test              # -> scores/fm/analysis/
  hvae analyze scores/fm/scores.h5 --in-dist FashionMNIST:test --out report --scores llr nll \\
      --background scores/fm-bg/scores.h5 --tensorboard runs/fm
The report folder is replaced as a whole (a stop or a full disk leaves the previous report); a score file with
incomplete rows (an unmerged shard) is refused. Metrics use every row; figures draw at most 100,000 rows per
group (a seeded uniform subsample)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("file", metavar="FILE", help="merged score file (hvae merge's OUT/scores.h5)")
    parser.add_argument("--in-dist", required=True, metavar="NAME:SPLIT",
                        help="the in-distribution group, the negatives (e.g. FashionMNIST:test); every group of "
                             "another dataset is an OOD set")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder for metrics.{md,csv,json} and PNGs (default: FILE's folder/analysis)")
    parser.add_argument("--background", metavar="FILE2", default=None,
                        help="score file of a background model over the same groups and indices: adds the "
                             "likelihood-ratio score of Ren et al. 2019 (default: none)")
    parser.add_argument("--tensorboard", metavar="DIR", default=None,
                        help="also log table, figures and metrics to TensorBoard: a run dir (uses its tb/) or "
                             "a TensorBoard log dir (default: no TensorBoard)")
    parser.add_argument("--tb-step", type=int, default=None, metavar="N",
                        help="global step for TensorBoard (default: the step of the checkpoint the scores were made "
                             "with, from the score file; 0 when it is unknown)")
    parser.add_argument("--scores", nargs="+", metavar="SCORE", default=None,
                        help="only these scores: ids (nll, lk1, llr2, complexity_png, background, typicality) or "
                             "families (nll lk llr complexity background typicality lid lidlin dual); default: all available")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    # intervals.REPLICATES, as a literal: building the parser must not import the analysis (numpy, torch)
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="R",
                        help="95%% percentile-bootstrap intervals of every metric from R resamples of the in-dist and "
                             "OOD rows (0: none; default: 1000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED", help="seed of the resamples")
    parser.add_argument("--dose", choices=("kde", "svm"), default=None,
                        help="add DoSE: a KDE / one-class SVM of the per-example statistics fitted to the in-dist "
                             "TRAINING split's rows (the file must hold NAME/train); default: no DoSE")
    parser.add_argument("--ensemble", nargs="+", metavar="FILE", default=None,
                        help="score files of other runs (other seeds) over the same examples: adds -WAIC over FILE "
                             "and these (e.g. from hvae ensemble); default: no WAIC")


def run(args: argparse.Namespace) -> int:
    from hvae_dist.analysis.metrics import run_analysis
    from hvae_dist.analysis.report import checkpoint_step, format_text, report
    from hvae_dist.files import require_folder
    from hvae_dist.signals import stop_note

    out = require_folder(args.out if args.out else Path(args.file).resolve().parent / "analysis", "--out")
    if args.tensorboard:
        require_folder(args.tensorboard, "--tensorboard")
    if args.bootstrap < 0:
        from hvae_dist.errors import ConfigError

        raise ConfigError(f"--bootstrap must be >= 0 (0: no intervals), got {args.bootstrap}")
    result = run_analysis(args.file, args.in_dist, background=args.background, scores=args.scores,
                          figures=not args.no_plots, bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
                          dose=args.dose, ensemble=args.ensemble)
    tb_step = args.tb_step
    if args.tensorboard and tb_step is None:
        tb_step = checkpoint_step(result.attrs)
        if tb_step is None:
            print("hvae analyze: the checkpoint's step is not in the score file nor its checkpoint: TensorBoard "
                  "step 0 (give --tb-step N)", file=sys.stderr)
            tb_step = 0
    with stop_note(f"{out} holds the previous report (or none), unchanged; re-run to write the new one"):
        written = report(result, out, plots=not args.no_plots, tensorboard=args.tensorboard, tb_step=tb_step or 0)
    print(format_text(result))
    from hvae_dist.analysis.comparison import format_comparison_markdown

    print("\n" + format_comparison_markdown(result.rows, result.in_group).rstrip())
    print(f"\nwrote {len(written)} files to {out}"
          + (f"; TensorBoard: {args.tensorboard} at step {tb_step}" if args.tensorboard else ""))
    return 0


VISUALIZE_EXAMPLES = """examples:
  hvae visualize --run-dir runs/fmnist --datasets FashionMNIST:test MNIST:test
  hvae visualize --run-dir runs/fmnist --datasets FashionMNIST:test --examples 4 --temperatures 0 0.7 1 --out figs"""


def add_visualize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = VISUALIZE_EXAMPLES
    parser.add_argument("--run-dir", required=True, help="training run dir (config.json, checkpoints/)")
    parser.add_argument("--datasets", nargs="+", required=True, metavar="NAME:SPLIT",
                        help="datasets whose first examples form the rows, e.g. FashionMNIST:test MNIST:test")
    parser.add_argument("--examples", type=int, default=8, help="rows per dataset")
    parser.add_argument("--temperatures", nargs="*", type=float, default=[0.5, 0.8, 1.0], metavar="T",
                        help="prior-sample columns: the std of every prior draw times T, finite and >= 0 (0: the prior modes)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/visualize)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (default: RUN_DIR/checkpoints/latest.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior noise (as hvae score --seed)")
    parser.add_argument("--no-ema", action="store_true", help="the raw weights even when the checkpoint has EMA")
    parser.add_argument("--data-root", default=None, metavar="DIR", help="folder of the datasets' files")


def run_visualize(args: argparse.Namespace) -> int:
    from hvae_dist.analysis.visualize import visualize_run
    from hvae_dist.files import require_folder

    require_folder(args.run_dir, "--run-dir")
    if args.out:
        require_folder(args.out, "--out")
    path = visualize_run(args.run_dir, args.datasets, args.out, args.examples, args.temperatures, args.seed,
                         args.checkpoint, not args.no_ema, args.data_root)
    print(path)
    return 0
