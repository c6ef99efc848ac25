"""The `hvae` console script (also `python -m hvae_dist`).

Each subcommand lives in a package's `cli.py`, which exposes a function that adds its arguments to a
parser and one that runs it (`run(args) -> int`). Modules are imported only for the subcommand that
runs, so `hvae analyze` never imports DeepSpeed.

Errors a user can fix end as one line `hvae CMD: error: ...` and exit code 2: every HvaeError, and every
OSError that names a file (a full disk, a missing permission), with the free space of that file system.
SIGTERM and Ctrl-C stop a command cleanly (`hvae_dist.signals`): one line `hvae CMD: stopped by SIGNAL; ...`
and exit code 128 + the signal number.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from hvae_dist.files import describe_os_error, free_space  # noqa: F401  (free_space: re-exported)

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
    "visualize": ("hvae_dist.analysis.cli", "add_visualize_arguments", "run_visualize",
                  "reconstructions per latent layer (L>k decodes) and prior samples at temperatures, as a PNG grid"),
    "submit": ("hvae_dist.submit.cli", "add_arguments", "run",
               "submit train / score / pipeline jobs to SLURM with submitit"),
    "poster": ("hvae_dist.experiments.cli", "add_poster_arguments", "run_poster",
               "the paper's OOD table: both models trained, every resolvable OOD set scored, the paper beside us"),
    "demo": ("hvae_dist.experiments.cli", "add_demo_arguments", "run_demo",
             "the paper's headline on offline data: FashionMNIST vs MNIST on CPU"),
    "config": ("hvae_dist.config_cli", "add_arguments", "run",
               "print the resolved config of a preset or file, every default filled in, as JSON"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (the examples) and shows every option's default.

    "(default: X)" is added unless the help already says what the default is, the option takes no value
    (a flag), or the default says nothing (None, []: the help describes it, e.g. "default: from SLURM").
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or action.nargs == 0
                or default is None or default is argparse.SUPPRESS or (isinstance(default, list) and not default)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:   # argparse keeps sub-commands only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """HelpFormatter for `parser` and every parser below it (nested sub-commands such as `submit score`)."""
    parser.formatter_class = HelpFormatter
    for child in _subparsers(parser).values():
        _use_formatter(child)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported (all of them when None)."""
    from hvae_dist import __version__

    # allow_abbrev=False: a sub-command's --local must not read as an abbreviation of --local_rank.
    parser = argparse.ArgumentParser(prog="hvae", description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="run `hvae COMMAND --help` for a command's options and examples")
    parser.add_argument("--version", action="version", version=f"hvae-dist {__version__}")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, metavar="N",
                        help="this process's rank on its node, as DeepSpeed's launcher passes it (torchrun sets "
                             "LOCAL_RANK instead); must agree with LOCAL_RANK when both are given")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, add_fn, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            getattr(importlib.import_module(module_name), add_fn)(p)
    _use_formatter(parser)
    return parser


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the sub-command (and sub-sub-command, e.g. `submit score`) that `args` ran."""
    for dest in ("command", "what"):
        children = _subparsers(parser)
        name = getattr(args, dest, None)
        if not children or name not in children:
            break
        parser = children[name]
    return parser


LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def take_local_rank(argv: list[str], env: dict | None = None) -> list[str]:
    """`argv` without a leading `--local_rank=N` / `--local_rank N` (what `deepspeed --module hvae_dist ...`
    puts before the command), exported as LOCAL_RANK for `hvae_dist.distributed` (the one place that reads the
    world). A value that contradicts LOCAL_RANK is an error: the process would pick one GPU and its peers another.
    """
    import os

    from hvae_dist.errors import ConfigError

    env = os.environ if env is None else env
    if not argv or not argv[0].startswith(LOCAL_RANK_FLAGS):
        return argv
    flag, _, value = argv[0].partition("=")
    if flag not in LOCAL_RANK_FLAGS:
        return argv
    rest = argv[1:]
    if not value:
        if not rest:
            raise ConfigError(f"{flag} needs a value")
        value, rest = rest[0], rest[1:]
    if not value.isdigit():
        raise ConfigError(f"{flag}={value}: expected a non-negative integer")
    if env.get("LOCAL_RANK", value) != value:
        raise ConfigError(f"{flag}={value} but LOCAL_RANK={env['LOCAL_RANK']}; give one, or the same value")
    env["LOCAL_RANK"] = value
    return rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from hvae_dist.errors import ConfigError

    try:
        argv = take_local_rank(argv)
    except ConfigError as e:   # one line and exit 2, like every user error
        print(f"hvae: error: {e}", file=sys.stderr)
        return 2
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None and argv and not argv[0].startswith("-"):
        build_parser("__none__").parse_args(argv)  # prints "invalid choice" and exits 2
    parser = build_parser(command or "__none__")
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # the sub-command's usage, not the top level's
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    module_name, _, run_fn, _ = COMMANDS[args.command]
    run = getattr(importlib.import_module(module_name), run_fn)
    from hvae_dist import signals
    from hvae_dist.errors import HvaeError

    # SIGTERM / Ctrl-C unwind the command (hvae_dist.signals); not where signals cannot be handled (a thread).
    previous = signals.raise_on_stop() if threading.current_thread() is threading.main_thread() else {}
    try:
        return int(run(args) or 0)
    except signals.StoppedBySignal as e:
        # One line, and exit status 128 + the signal (an in-process caller, e.g. a SLURM job, sees the exception;
        # a command run inside another, e.g. poster's analyze, has said it already).
        if not e.reported:
            print(f"hvae {args.command}: {e}", file=sys.stderr, flush=True)
            e.reported = True
        raise
    except KeyboardInterrupt:   # a Ctrl-C that a library's own handler turned into KeyboardInterrupt
        stopped = signals.StoppedBySignal(signal.SIGINT)
        print(f"hvae {args.command}: {stopped}", file=sys.stderr, flush=True)
        raise stopped from None
    except HvaeError as e:
        # Bad input is the user's to fix: one line naming what is wrong, no traceback.
        print(f"hvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:   # not about a file the user named: a bug, keep the traceback
            raise
        print(f"hvae {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    finally:
        signals.restore(previous)
