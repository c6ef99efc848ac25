"""`hvae train`: start or resume a run directory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hvae_dist.config import BACKENDS, PRECISIONS, Config, apply_overrides, config_from_dict, read_config_source
from hvae_dist.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="preset (fashionmnist, cifar10, tiny) or JSON file; optional when resuming DIR")
    p.add_argument("--run-dir", required=True, help="run directory; an existing one is resumed")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="overrides train.backend")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="overrides train.precision")
    p.add_argument("--max-steps", type=int, default=None, help="overrides train.max_steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's config: DIR/config.json when resuming (only train.* may change), else --config + overrides."""
    overrides = list(args.overrides)
    for flag, key in (("backend", "backend"), ("precision", "precision"), ("max_steps", "max_steps")):
        if getattr(args, flag) is not None:
            overrides.append(f"train.{key}={json.dumps(getattr(args, flag))}")
    saved = Path(args.run_dir) / "config.json"
    if saved.exists():
        base = json.loads(saved.read_text())
        # The command that started a run must resume it (SLURM requeues re-run the same command line):
        # --config and model.* / data.* overrides may be repeated, but must not change the stored values.
        requested = config_from_dict(apply_overrides(read_config_source(args.config) if args.config else base,
                                                     overrides)).to_dict()
        for section in ("model", "data"):
            changed = sorted(k for k in base[section].keys() | requested[section].keys()
                             if k != "input_shape" and base[section].get(k) != requested[section].get(k))
            if changed:
                given = f"--config {args.config} with --set" if args.config else "--set"
                raise ConfigError(f"cannot change {', '.join(f'{section}.{k}' for k in changed)} when resuming "
                                  f"{args.run_dir} ({given} differs from {saved}): only train.* settings may change; "
                                  "resume with the run's own settings, or start a new --run-dir")
        return config_from_dict(apply_overrides(base, [o for o in overrides if o.strip().startswith("train.")]))
    if args.config is None:
        raise ConfigError(f"{args.run_dir} has no config.json: give --config PRESET|FILE to start a new run")
    return config_from_dict(apply_overrides(read_config_source(args.config), overrides))


def run(args: argparse.Namespace) -> int:
    from hvae_dist.train.runner import run_training

    cfg = resolve_config(args)
    run_training(cfg, args.run_dir, args.progress)
    return 0
