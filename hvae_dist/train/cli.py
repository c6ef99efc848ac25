"""`hvae train`: start or resume a run directory."""
from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from hvae_dist.config import (
    BACKENDS,
    PRECISIONS,
    RESUMABLE_DATA_KEYS,
    Config,
    TrainConfig,
    preset_names,
    read_config_source,
)
from hvae_dist.signals import StoppedBySignal

EPILOG = f"""\
examples:
  hvae train --config tiny --run-dir runs/tiny                      start (or resume) a run
  hvae train --config fashionmnist --run-dir runs/fm --set train.lr=1e-3 --set train.eval_every=0
  hvae train --run-dir runs/fm --max-steps 200000                   resume with a new step budget
  torchrun --nproc_per_node 2 -m hvae_dist train --config tiny --run-dir runs/ddp --backend ddp

--set KEY=VALUE overrides one config field, KEY = section.field (sections model, data, train; every field
and its default: hvae_dist/config.py). VALUE is parsed as JSON when it parses, else taken as a string:
  --set train.lr=1e-3   --set train.max_minutes=null   --set 'data.val_datasets=["FashionMNIST:validation","MNIST:test"]'
Floats must be finite (Infinity / NaN are refused).

Resuming: re-running with an existing DIR continues from its newest checkpoint that loads (latest.pt,
else the numbered step-N.pt newest first, with a warning naming the files passed over). Every train.*
field but train.optimizer, and data.{{{','.join(RESUMABLE_DATA_KEYS)}}}, may change on resume; the
other model.* and data.* fields must stay as in DIR/config.json (start a new --run-dir to change them).
A run already at or past --max-steps stops at once and writes nothing. Files that a resume from an older
checkpoint (--checkpoint, or a fallback past broken files) would contradict are moved to
DIR/checkpoints/superseded-TIME/, never deleted. One trainer per DIR: a second one exits with an error
naming the holder (DIR/.lock). SIGTERM / SIGUSR1 finish the step, save a checkpoint and exit 0; Ctrl-C
does the same and exits 130 (a second Ctrl-C stops at once).
Presets: {', '.join(preset_names())}.
"""


def _preset_defaults(key: str) -> str:
    """The default of train.`key` per preset, for the help: "'single' in every preset" or "tiny 20000, ..."."""
    fallback = getattr(TrainConfig(), key)
    values = {name: read_config_source(name).get("train", {}).get(key, fallback) for name in preset_names()}
    if len(set(map(str, values.values()))) == 1:
        return f"{next(iter(values.values()))!r} in every preset"
    return ", ".join(f"{name} {value}" for name, value in values.items())


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (its examples); the help texts state their defaults themselves."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    # `hvae submit train|pipeline` shares these options but runs a job that cannot take the one-off
    # recovery flags (a requeued job would --restart again each time), nor this command's examples.
    standalone = "submit" not in p.prog.split()
    if standalone:
        p.formatter_class, p.epilog = _HelpFormatter, EPILOG
    p.add_argument("--config", default=None, metavar="PRESET|FILE",
                   help=f"preset ({', '.join(preset_names())}) or JSON file; required for a new run, optional when "
                        "resuming DIR (default: DIR/config.json)")
    p.add_argument("--run-dir", required=True, metavar="DIR", help="run directory; an existing one is resumed")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help=f"overrides train.backend (default: the config's; {_preset_defaults('backend')})")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"overrides train.precision (default: the config's; {_preset_defaults('precision')})")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help=f"overrides train.max_steps (default: the config's; {_preset_defaults('max_steps')})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-3 (repeatable; default: none)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    if standalone:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="resume from this checkpoint file instead of DIR's newest (default: the newest that "
                            "loads); newer checkpoint files of DIR are moved to DIR/checkpoints/superseded-TIME/")
        g.add_argument("--restart", action="store_true",
                       help="start over at step 0 although DIR has checkpoints; they are moved to "
                            "DIR/checkpoints/superseded-TIME/, not deleted (default: off; without it a DIR whose "
                            "checkpoints all fail to load is refused)")


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's config from the command line (`preflight.resolve_run_config`; --backend, --precision and
    --max-steps are `--set train.KEY` items after the others)."""
    from hvae_dist.train.preflight import resolve_run_config

    overrides = list(args.overrides)
    for flag, key in (("backend", "backend"), ("precision", "precision"), ("max_steps", "max_steps")):
        if getattr(args, flag) is not None:
            overrides.append(f"train.{key}={json.dumps(getattr(args, flag))}")
    return resolve_run_config(args.run_dir, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from hvae_dist.files import require_folder
    from hvae_dist.train.runner import run_training

    require_folder(args.run_dir, "--run-dir")
    cfg = resolve_config(args)
    result = run_training(cfg, args.run_dir, args.progress, checkpoint=getattr(args, "checkpoint", None),
                          restart=getattr(args, "restart", False))
    if result.get("signal") == signal.SIGINT:
        # Ctrl-C: the step finished and its checkpoint is saved (a SIGTERM, SLURM's stop, exits 0 after it).
        raise StoppedBySignal(signal.SIGINT, f"checkpoint of step {result['step']} saved in "
                                             f"{Path(args.run_dir) / 'checkpoints'}; re-run the same command to resume")
    return 0
