"""`hvae train`: start or resume a run directory."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

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
        for item in overrides:
            if not item.startswith("train."):
                raise ConfigError(f"cannot change '{item.split('=')[0]}' when resuming {args.run_dir}: only train.* "
                                  "settings may change; start a new --run-dir instead")
        if args.config is not None:
            requested = config_from_dict(read_config_source(args.config)).to_dict()
            for section in ("model", "data"):
                stored = {k: v for k, v in base[section].items() if k != "input_shape"}
                wanted = {k: v for k, v in requested[section].items() if k != "input_shape"}
                if stored != wanted:
                    raise ConfigError(f"--config {args.config} differs from {saved} in section '{section}'; "
                                      "resume without --config, or use a new --run-dir")
        return config_from_dict(apply_overrides(base, overrides))
    if args.config is None:
        raise ConfigError(f"{args.run_dir} has no config.json: give --config PRESET|FILE to start a new run")
    return config_from_dict(apply_overrides(read_config_source(args.config), overrides))


def main(cfg: Config, run_dir: str | Path, progress: bool | None = None) -> dict:
    """Train (or resume) `run_dir` with `cfg` in this process, as one rank of the world from the environment."""
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
    if world.is_main:
        log.info("%s run %s: backend=%s precision=%s world=%d device=%s step=%d", "resuming" if resumed else "starting",
                 run_dir, cfg.train.backend, cfg.train.precision, world.world_size, device, trainer.step)
        log.info("checkpoints: %s  TensorBoard: tensorboard --logdir %s", run_dir / "checkpoints", run_dir / "tb")
    result = trainer.fit()
    if world.is_main:
        log.info("stopped at step %d (%s)", result["step"], result["reason"])
    shutdown(world)
    return result


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    main(cfg, args.run_dir, args.progress)
    return 0
