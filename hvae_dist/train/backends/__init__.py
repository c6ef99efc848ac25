"""Training backends behind one interface (`base.Backend`): `ddp.TorchBackend` (single process or DDP)
and `deepspeed.DeepSpeedBackend` (ZeRO 0-2). DeepSpeed is imported only when a run asks for it.
"""
from __future__ import annotations

import torch
from torch import nn

from hvae_dist.config import TrainConfig
from hvae_dist.distributed import World
from hvae_dist.train.backends.base import Backend, StepResult

__all__ = ["Backend", "StepResult", "make_backend"]


def make_backend(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device) -> Backend:
    if cfg.backend == "deepspeed":
        from hvae_dist.train.backends.deepspeed import DeepSpeedBackend
        return DeepSpeedBackend(model, cfg, world, device)
    from hvae_dist.train.backends.ddp import TorchBackend
    return TorchBackend(model, cfg, world, device)
