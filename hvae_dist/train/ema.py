"""Exponential moving average of the weights, used for evaluation and scoring when enabled."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, after every applied update (floating tensors only)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # fp32 even when the backend keeps the module in bf16 (DeepSpeed): an average needs the precision.
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
            else:
                e.copy_(p)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
