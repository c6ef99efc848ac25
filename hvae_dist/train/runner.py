"""One training process: join the world from the environment, build the trainer and its monitor, train
(or resume) a run dir, leave the world. `hvae train` and the SLURM training job both call `run_training`."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hvae_dist.config import Config
from hvae_dist.distributed import detect_world, device_for, init_distributed, shutdown
from hvae_dist.train.engine import Trainer
from hvae_dist.train.monitor import Monitor, setup_logging

log = logging.getLogger("hvae_dist.train")


def run_training(cfg: Config, run_dir: str | Path, progress: bool | None = None, *,
                 on_trainer: Callable[[Any], None] | None = None, exit_process: bool = True) -> dict:
    """Train (or resume) `run_dir` with `cfg` in this process, as one rank of the world from the environment.

    `on_trainer(trainer)` runs once the Trainer exists and its signal handlers are installed (a SLURM
    job hooks its own stop signal there). `exit_process=False`: in a distributed world, leave the
    process group but do not end the process (see distributed.shutdown).
    """
    world = detect_world()
    if cfg.train.backend == "deepspeed":
        from hvae_dist.train.backends.deepspeed import prepare_deepspeed_env
        prepare_deepspeed_env(world)
    init_distributed(world)
    run_dir = Path(run_dir)
    setup_logging(run_dir, world.is_main)
    device = device_for(world)
    if device.type == "cpu" and world.distributed:
        # Oversubscribing the cores with one intra-op pool per rank is slower than splitting them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.world_size))
    monitor = Monitor(run_dir, world.is_main, cfg.train.log_every, device, progress)
    trainer = Trainer(cfg, run_dir, world, device, monitor)
    resumed = trainer.maybe_resume()
    trainer.write_config()
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
