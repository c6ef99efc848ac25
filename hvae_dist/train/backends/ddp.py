"""The PyTorch backend: one process, or DDP (gloo on CPU, NCCL on GPU) over the ranks of the world."""
from __future__ import annotations

import math

import torch
from torch import nn

from hvae_dist.config import TrainConfig
from hvae_dist.distributed import World
from hvae_dist.train.backends.base import Backend, StepResult, should_skip


class TorchBackend(Backend):
    """Single process, or DDP (gloo on CPU, NCCL on GPU) when the world has more than one rank.

    fp16 uses a GradScaler; an update is skipped (on every rank alike, since DDP all-reduces the
    gradients before the norm is taken) when the norm is non-finite or above `skip_threshold`.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, world: World, device: torch.device):
        super().__init__(cfg, world, device)
        self.raw_model = model.to(device)
        self.forward_module = self.raw_model
        if world.distributed:
            self.forward_module = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=cfg.lr)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    def step(self, loss: torch.Tensor) -> StepResult:
        params = [p for p in self.raw_model.parameters() if p.grad is not None or p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        skipped = should_skip(grad_norm, self.cfg.skip_threshold)
        if self.scaler is not None:
            if skipped and math.isfinite(grad_norm):
                pass  # over the threshold: do not step, but let the scaler keep its scale
            elif not skipped:
                self.scaler.step(self.optimizer)
            self.scaler.update()  # a non-finite norm lowers the scale
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=grad_norm, skipped=skipped)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
