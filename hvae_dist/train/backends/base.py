"""The interface every training backend implements: wrap the model, run one update, save/load state.

The engine only calls `forward_module`, `autocast()`, `set_lr(lr)`, `micro_batch(last)`, `backward(loss)`,
`step()`, `state_dict()` and `load_state_dict()`; it never knows which backend it drives. One update is

    backend.set_lr(lr_t)
    for m in range(train.accumulation_steps):
        with backend.micro_batch(last=m == accumulation_steps - 1):   # forward and backward of micro-batch m
            backend.backward(loss_m)                                    # loss_m: the micro-batch's mean loss
    result = backend.step()                                             # clip, skip or apply, zero the grads

and the backend makes the accumulated gradient the mean over all the update's examples (it divides each
micro-batch's loss by accumulation_steps); `step(loss)` is the update of a single micro-batch.
`raw_model` is always the unwrapped `HierarchicalModel` (VAE, LVAE or BIVA), whose state_dict is what checkpoints store.
"""
from __future__ import annotations

import contextlib

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

    def as_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_norm 0-d float32, skipped 0-d bool) on `device`, without reading device values on the host."""
        grad_norm = torch.as_tensor(self._grad_norm, dtype=torch.float32, device=device)
        skipped = torch.as_tensor(self._skipped, dtype=torch.bool, device=device)
        return grad_norm, skipped

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

    def set_lr(self, lr: float) -> None:
        """The learning rate of the coming update (the engine's `objectives.lr_at` of the step)."""
        raise NotImplementedError

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward; `last`: the update's final one."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's mean loss, weighted 1 / accumulation_steps."""
        raise NotImplementedError

    def step(self, loss: torch.Tensor | None = None) -> StepResult:
        """Apply (or skip) the update of the accumulated gradient; `loss`: backward it first (one micro-batch)."""
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
        """The learning rate of the last update."""
        raise NotImplementedError


def build_optimizer(params: list[torch.Tensor], cfg: TrainConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer of `train.optimizer` over `params`, at lr `train.lr` until `set_lr`. `fused`: the
    fused implementation (adam / adamw; adamax has none)."""
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr)
    if cfg.optimizer == "adamw":   # torch's AdamW defaults to weight_decay 0.01; ours is train.weight_decay
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.Adam(params, lr=cfg.lr, fused=fused or None)


def set_group_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig, lr: float | None = None) -> None:
    """Every param group's lr (when given) and weight decay from the config: a loaded optimizer state_dict
    brings back the values it was saved with, and both may change on resume."""
    for group in optimizer.param_groups:
        if lr is not None:
            group["lr"] = lr
        if cfg.optimizer == "adamw":
            group["weight_decay"] = cfg.weight_decay


def should_skip_tensor(grad_norm: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Skip non-finite gradient norms always, and norms above `threshold` when one is set: a 0-d bool tensor
    on the norm's device (no host sync)."""
    skip = ~torch.isfinite(grad_norm)
    return skip if threshold is None else skip | (grad_norm > threshold)


