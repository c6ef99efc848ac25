"""`hvae analyze FILE --in-dist NAME:SPLIT`: AUROC / AUPRC / FPR80 of every OOD set x score.

Writes DIR/metrics.{md,csv,json} and the ROC / histogram PNGs (DIR defaults to FILE's folder /
"analysis"), prints the table, and optionally logs it all to TensorBoard. Every score is oriented so
that higher = more OOD; the table's footer says what each one is (see hvae_dist.analysis.metrics).
Heavy imports (h5py, scikit-learn, matplotlib, torch) happen in `run`, so `hvae --help` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  hvae analyze scores/fm/scores.h5 --in-dist FashionMNIST:test              # -> scores/fm/analysis/
  hvae analyze scores/fm/scores.h5 --in-dist FashionMNIST:test --out report --scores llr nll \\
      --background scores/fm-bg/scores.h5 --tensorboard runs/fm
Every file is written atomically; a score file with incomplete rows (an unmerged shard) is refused."""


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
    parser.add_argument("--tb-step", type=int, default=0, metavar="N", help="global step for TensorBoard")
    parser.add_argument("--scores", nargs="+", metavar="SCORE", default=None,
                        help="only these scores: ids (nll, lk1, llr2, complexity_png, background, typicality) or "
                             "families (nll lk llr complexity background typicality); default: all available")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def run(args: argparse.Namespace) -> int:
    from hvae_dist.analysis.metrics import run_analysis
    from hvae_dist.analysis.report import format_text, report

    out = Path(args.out) if args.out else Path(args.file).resolve().parent / "analysis"
    result = run_analysis(args.file, args.in_dist, background=args.background, scores=args.scores)
    written = report(result, out, plots=not args.no_plots, tensorboard=args.tensorboard, tb_step=args.tb_step)
    print(format_text(result))
    print(f"\nwrote {len(written)} files to {out}"
          + (f"; TensorBoard: {args.tensorboard}" if args.tensorboard else ""))
    return 0
