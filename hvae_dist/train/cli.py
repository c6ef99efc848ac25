"""`hvae train`: start or resume a run directory."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable

from hvae_dist.config import PRECISIONS, BACKENDS, Config, apply_overrides, config_from_dict, read_config_source
from hvae_dist.errors import ConfigError

log = logging.getLogger("hvae_dist.train")


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


def main(cfg: Config, run_dir: str | Path, progress: bool | None = None, *,
         on_trainer: Callable[[Any], None] | None = None, exit_process: bool = True) -> dict:
    """Train (or resume) `run_dir` with `cfg` in this process, as one rank of the world from the environment.

    `on_trainer(trainer)` runs once the Trainer exists and its signal handlers are installed (a SLURM
    job hooks its own stop signal there). `exit_process=False`: in a distributed world, leave the
    process group but do not end the process (see distributed.shutdown).
    """
    import torch

    from hvae_dist.distributed import detect_world, device_for, init_distributed, shutdown
    from hvae_dist.train.engine import Trainer
    from hvae_dist.train.monitor import Monitor, setup_logging

    world = detect_world()
    if cfg.train.backend == "deepspeed":
        from hvae_dist.train.deepspeed_backend import prepare_deepspeed_env
        prepare_deepspeed_env(world)
    init_distributed(world)
    run_dir = Path(run_dir)
    setup_logging(run_dir, world.is_main)
    device = device_for(world)
    if device.type == "cpu" and world.distributed:
        # Oversubscribing the cores with one intra-op pool per rank is slower than splitting them.
        import os
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.world_size))
    trainer = Trainer(cfg, run_dir, world, device)
    resumed = trainer.maybe_resume()
    trainer.write_config()
    trainer.logger = Monitor(run_dir, world.is_main, cfg.train.log_every, cfg.train.eval_every, progress)
    trainer.install_signal_handlers()
    if on_trainer is not None:
        on_trainer(trainer)
    if world.is_main:
        log.info("%s run %s: backend=%s precision=%s world=%d device=%s step=%d", "resuming" if resumed else "starting",
                 run_dir, cfg.train.backend, cfg.train.precision, world.world_size, device, trainer.step)
        log.info("checkpoints: %s  TensorBoard: tensorboard --logdir %s", run_dir / "checkpoints", run_dir / "tb")
    result = trainer.fit()
    if world.is_main:
        log.info("stopped at step %d (%s)", result["step"], result["reason"])
    shutdown(world, exit_process=exit_process)
    return result


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    main(cfg, args.run_dir, args.progress)
    return 0
