"""The interface every training backend implements: wrap the model, run one update, save/load state.

The engine only calls `forward_module`, `autocast()`, `step(loss)`, `state_dict()` and
`load_state_dict()`; it never knows which backend it drives. `raw_model` is always the unwrapped
`HierarchicalVAE`, whose state_dict is what checkpoints store.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from hvae_dist.config import TrainConfig
from hvae_dist.distributed import World
from hvae_dist.nn.precision import autocast_context


class StepResult:
    """What one update did. A backend may hand over 0-d device tensors: they are read (a host sync on a GPU)
    only when `grad_norm` / `skipped` are, so that the update itself needs none."""

    def __init__(self, grad_norm: float | torch.Tensor, skipped: bool | torch.Tensor):
        self._grad_norm, self._skipped = grad_norm, skipped

    @property
    def grad_norm(self) -> float:
        """Global gradient norm before clipping (nan/inf when non-finite)."""
        return float(self._grad_norm)

    @property
    def skipped(self) -> bool:
        """The update was not applied."""
        return bool(self._skipped)

    def __repr__(self) -> str:
        return f"StepResult(grad_norm={self.grad_norm}, skipped={self.skipped})"


class Backend:
    """Interface; see the module docstring."""

    raw_model: nn.Module
    forward_module: nn.Module

    def __init__(self, cfg: TrainConfig, world: World, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device

    def autocast(self):
        return autocast_context(self.cfg.precision, self.device)

    def step(self, loss: torch.Tensor) -> StepResult:
        raise NotImplementedError

    def model_state_dict(self) -> dict:
        """The checkpoint's "model" entry: the unwrapped model's full state_dict (collective for sharded backends)."""
        return self.raw_model.state_dict()

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self.cfg.lr


def should_skip(grad_norm: float, threshold: float | None) -> bool:
    """Skip non-finite gradient norms always, and norms above `threshold` when one is set."""
    return not math.isfinite(grad_norm) or (threshold is not None and grad_norm > threshold)


def should_skip_tensor(grad_norm: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """`should_skip` on the device: a 0-d bool tensor, no host sync."""
    skip = ~torch.isfinite(grad_norm)
    return skip if threshold is None else skip | (grad_norm > threshold)


