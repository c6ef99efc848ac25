"""One training process: check the run (`preflight.check_run`), join the world from the environment, lock
the run dir, build the trainer and its monitor, train (or resume) the run dir, leave the world. `hvae train`,
`hvae demo`, `hvae poster` and the SLURM training job all call `run_training` (with the Config of
`preflight.resolve_run_config`)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hvae_dist.config import Config
from hvae_dist.distributed import World, detect_world, device_for, init_distributed, shutdown
from hvae_dist.errors import LockedError
from hvae_dist.locking import FileLock
from hvae_dist.train.engine import Trainer
from hvae_dist.train.monitor import Monitor, setup_logging
from hvae_dist.train.preflight import check_run

log = logging.getLogger("hvae_dist.train")
LOCK_NAME = ".lock"


def lock_run_dir(run_dir: Path, world: World) -> FileLock | None:
    """Rank 0 takes RUN/.lock (held until the process ends or releases it); every rank learns the outcome.

    Only rank 0 touches the lock, but every rank must stop when it is refused: the refusal is broadcast, so
    that the other ranks raise the same LockedError instead of waiting for rank 0 in a collective forever.
    """
    lock, refusal = None, ""
    if world.is_main:
        try:
            lock = FileLock(run_dir / LOCK_NAME, f"run dir {run_dir}").acquire()
        except LockedError as e:
            refusal = str(e)
    if world.distributed:
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        shutdown(world, exit_process=False)   # leave the process group cleanly on every rank, then report
        raise LockedError(refusal)
    return lock


def run_training(cfg: Config, run_dir: str | Path, progress: bool | None = None, *,
                 on_trainer: Callable[[Any], None] | None = None, exit_process: bool = True,
                 checkpoint: str | Path | None = None, restart: bool = False) -> dict:
    """Train (or resume) `run_dir` with `cfg` in this process, as one rank of the world from the environment.

    `on_trainer(trainer)` runs once the Trainer exists and its signal handlers are installed (a SLURM
    job hooks its own stop signal there). `exit_process=False`: in a distributed world, leave the
    process group but do not end the process (see distributed.shutdown). `checkpoint`: resume from this
    file instead of the run's newest; `restart`: start over at step 0 (see Trainer.maybe_resume).
    Rank 0 holds the run dir's lock (RUN/.lock) from before the first write until training ends.
    """
    world = detect_world()
    plan = check_run(cfg, world)   # every refusal before the process group, the lock or DeepSpeed's set-up
    if cfg.train.backend == "deepspeed":
        from hvae_dist.train.backends.deepspeed import prepare_deepspeed_env
        prepare_deepspeed_env(world)
    init_distributed(world)
    run_dir = Path(run_dir)
    lock = lock_run_dir(run_dir, world)
    try:
        setup_logging(run_dir, world.is_main)
        device = device_for(world)
        if device.type == "cpu" and world.distributed:
            # Oversubscribing the cores with one intra-op pool per rank is slower than splitting them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.world_size))
        monitor = Monitor(run_dir, world.is_main, cfg.train.log_every, device, progress)
        trainer = Trainer(cfg, run_dir, world, device, monitor, plan)
        resumed = trainer.maybe_resume(checkpoint, restart)
        if trainer.step < cfg.train.max_steps:   # else fit() stops at once, and nothing in the run dir changes
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
    finally:
        if lock is not None:
            lock.release()
    shutdown(world, exit_process=exit_process)
    return result
