"""The `hvae` console script (also `python -m hvae_dist`).

Each subcommand lives in a package's `cli.py`, which exposes a function that adds its arguments to a
parser and one that runs it (`run(args) -> int`). Modules are imported only for the subcommand that
runs, so `hvae analyze` never imports DeepSpeed.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, its add-arguments function, its run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("hvae_dist.train.cli", "add_arguments", "run",
              "train a hierarchical VAE (single / DDP / DeepSpeed); resumes a run dir"),
    "score": ("hvae_dist.score.cli", "add_score_arguments", "run_score",
              "importance-weighted ELBO, L>k and LLR>k per example, to HDF5 shards"),
    "merge": ("hvae_dist.score.cli", "add_merge_arguments", "run_merge",
              "validate and join score shards into OUT/scores.h5"),
    "analyze": ("hvae_dist.analysis.cli", "add_arguments", "run",
                "AUROC / AUPRC / FPR80 tables and plots from a score file"),
    "submit": ("hvae_dist.submit.cli", "add_arguments", "run",
               "submit train / score / pipeline jobs to SLURM with submitit"),
    "demo": ("hvae_dist.experiments.cli", "add_demo_arguments", "run_demo",
             "the paper's headline on offline data: FashionMNIST vs MNIST on CPU"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="hvae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, add_fn, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            getattr(importlib.import_module(module_name), add_fn)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None and argv and not argv[0].startswith("-"):
        build_parser("__none__").parse_args(argv)  # prints "invalid choice" and exits 2
    args = build_parser(command or "__none__").parse_args(argv)
    module_name, _, run_fn, _ = COMMANDS[args.command]
    run = getattr(importlib.import_module(module_name), run_fn)
    from hvae_dist.errors import HvaeError
    try:
        return int(run(args) or 0)
    except HvaeError as e:
        # Bad input is the user's to fix: one line naming what is wrong, no traceback.
        print(f"hvae {args.command}: error: {e}", file=sys.stderr)
        return 2
