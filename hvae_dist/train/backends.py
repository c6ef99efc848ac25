"""Training backends behind one small interface: wrap the model, run one update, save/load their state.

The engine only calls `forward_module`, `autocast()`, `step(loss)`, `state_dict()` and
`load_state_dict()`; it never knows which backend it drives. `raw_model` is always the unwrapped
`HierarchicalVAE`, whose state_dict is what checkpoints store.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from hvae_dist.config import TrainConfig
from hvae_dist.distributed import World

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    grad_norm: float   # global gradient norm before clipping (nan/inf when non-finite)
    skipped: bool      # the update was not applied


def autocast_context(precision: str, device: torch.device):
    """Autocast for the network in bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


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


def make_backend(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device) -> Backend:
    if cfg.backend == "deepspeed":
        from hvae_dist.train.deepspeed_backend import DeepSpeedBackend
        return DeepSpeedBackend(model, cfg, world, device)
    return TorchBackend(model, cfg, world, device)
