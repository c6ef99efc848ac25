"""Training backends behind one interface (`base.Backend`): `single.SingleBackend` (one process),
`ddp.DDPBackend` (DistributedDataParallel) and `deepspeed.DeepSpeedBackend` (ZeRO 0-2). DeepSpeed is
imported only when a run asks for it.
"""
from __future__ import annotations

import torch
from torch import nn

from hvae_dist.config import TrainConfig
from hvae_dist.distributed import World
from hvae_dist.train.backends.base import Backend, StepResult

__all__ = ["Backend", "StepResult", "make_backend"]


def make_backend(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device,
                 deepspeed_config: dict | None = None) -> Backend:
    """The backend of train.backend; `deepspeed_config`: the run's (`train.preflight.RunPlan`), for deepspeed."""
    if cfg.backend == "deepspeed":
        from hvae_dist.train.backends.deepspeed import DeepSpeedBackend
        if deepspeed_config is None:
            raise ValueError("make_backend: train.backend='deepspeed' needs the run's deepspeed_config "
                             "(hvae_dist.train.preflight.check_run builds it)")
        return DeepSpeedBackend(model, cfg, world, device, deepspeed_config)
    if cfg.backend == "ddp":
        from hvae_dist.train.backends.ddp import DDPBackend
        return DDPBackend(model, cfg, world, device)
    if world.distributed:
        raise ValueError(f"make_backend: train.backend='single' with {world.world_size} ranks "
                         "(hvae_dist.train.preflight.check_run refuses this before any work)")
    from hvae_dist.train.backends.single import SingleBackend
    return SingleBackend(model, cfg, world, device)
