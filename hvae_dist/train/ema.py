"""Exponential moving average of the weights, used for evaluation and scoring when enabled."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, after every applied update (floating tensors only).

    The engine calls `update` after every update with the backend's skip flag, a 0-d bool tensor on the
    device: a skipped update leaves the average as it was without the host reading the flag.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # fp32 even when the backend keeps the module in bf16 (DeepSpeed): an average needs the precision.
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, skipped: torch.Tensor | bool = False) -> None:
        """Average in `model`'s weights unless `skipped` (a bool, or a 0-d bool tensor decided on the device:
        then the weight of the new weights is 0 and every average stays exactly as it was, no host sync)."""
        if isinstance(skipped, torch.Tensor):
            weight: torch.Tensor | float = (~skipped).to(torch.float32) * (1.0 - self.decay)
        elif skipped:
            return
        else:
            weight = 1.0 - self.decay
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                w = weight.to(e.device, e.dtype) if isinstance(weight, torch.Tensor) else weight
                e.lerp_(p.detach().to(e.dtype), w)
            else:
                e.copy_(p)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
