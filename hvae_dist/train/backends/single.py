"""The single-process PyTorch backend (`train.backend = "single"`); `ddp.DDPBackend` extends it to DDP.

What it applies to the model for speed, none of which changes a result beyond float rounding:
  * `train.channels_last` (default null: on on a CPU, and for bf16 / fp16 on a GPU): the conv weights in
    NHWC order, so that oneDNN / cuDNN run every convolution (and its backward) in NHWC; the layers keep
    it (weight norm returns w in v's layout, a residual sum takes the conv output's), so the activations
    stay NHWC from layer to layer. Measured on a 2-core Sapphire Rapids CPU, fashionmnist preset, batch
    128 (benchmarks/train_presets.py): a Trainer step 1.2-1.5x faster in fp32 and mostly faster in bf16
    (1.25-1.7x in three of four runs); on a GPU NHWC is cuDNN's tensor-core layout for 16-bit math.
  * `train.compile`: torch.compile of the forward (and so the backward); off by default, the first steps
    pay the compile time.
  * the update without a host sync: the gradient norm, the skip decision and the Adam step stay on the
    device (fused Adam / AdamW take the skip flag as their `found_inf`, the way GradScaler hands it an
    overflow), so a GPU does not wait for the host between backward and step. The StepResult holds the
    device tensors; whoever reads it (the engine's counters and stats) pays the one sync, after the step is
    queued. Adamax has no fused implementation: its skip decision is read on the host.

Gradient accumulation (`train.accumulation_steps` k): each micro-batch's loss is divided by k before its
backward, so the gradients summed in `.grad` are the mean over the update's examples (DDP: see ddp.py).
Clipping, the skip decision and fp16's unscale act once per update, on that accumulated gradient.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from hvae_dist.config import TrainConfig
from hvae_dist.distributed import World
from hvae_dist.train.backends.base import (
    Backend,
    StepResult,
    build_optimizer,
    set_group_hyperparameters,
    should_skip_tensor,
)


def use_channels_last(cfg: TrainConfig, device: torch.device | str = "cpu") -> bool:
    """`train.channels_last`, or its default: NHWC on a CPU (measured faster there in fp32 and bf16) and for
    the 16-bit precisions on a GPU (cuDNN's tensor-core layout); NCHW for fp32 on a GPU (not measured)."""
    if cfg.channels_last is not None:
        return bool(cfg.channels_last)
    return torch.device(device).type == "cpu" or cfg.precision != "fp32"


def _fused_adam_available(params: list[torch.Tensor], device: torch.device, optimizer: str = "adam") -> bool:
    """Fused Adam / AdamW (the on-device skip) run on CPU and CUDA for floating-point parameters."""
    return optimizer in ("adam", "adamw") and device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)


class SingleBackend(Backend):
    """One process: the model, its optimizer (fused Adam where it runs) and fp16's GradScaler.

    An update is skipped when the gradient norm is non-finite or above `skip_threshold`: no parameter,
    Adam moment or step count changes, and fp16's scale is lowered only for a non-finite norm.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, world: World, device: torch.device):
        super().__init__(cfg, world, device)
        self.raw_model = model.to(device)
        if use_channels_last(cfg, device):
            self.raw_model = self.raw_model.to(memory_format=torch.channels_last)
        self.forward_module = self.wrap(self.raw_model)
        if cfg.compile:
            self.forward_module = torch.compile(self.forward_module)
        params = list(self.raw_model.parameters())
        self.fused = _fused_adam_available(params, device, cfg.optimizer)
        self.optimizer = build_optimizer(params, cfg, fused=self.fused)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the forward pass calls (before torch.compile): the model itself; DDP wraps it."""
        return model

    def set_lr(self, lr: float) -> None:
        set_group_hyperparameters(self.optimizer, self.cfg, lr)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Nothing to do per micro-batch in one process (DDP: see ddp.DDPBackend)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        k = self.cfg.accumulation_steps
        if k > 1:
            loss = loss / k
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, loss: torch.Tensor | None = None) -> StepResult:
        if loss is not None:
            self.backward(loss)
        params = [p for p in self.raw_model.parameters() if p.grad is not None or p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)   # records the overflow check for scaler.update()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)       # 0-d, on the device
        skip = should_skip_tensor(grad_norm, self.cfg.skip_threshold)
        if self.fused:
            # Fused Adam leaves parameters, moments and step counts as they were where found_inf is 1.
            self.optimizer.found_inf = skip.to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(skip):                       # host sync: only without fused Adam
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale after a non-finite norm; an over-threshold skip keeps it
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=grad_norm.detach(), skipped=skip)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        set_group_hyperparameters(self.optimizer, self.cfg)   # train.weight_decay may change on resume
        _match_state_layout(self.optimizer)
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


def _match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (Adam moments) its parameter's memory layout.

    A checkpoint keeps the layout it was saved with, and train.channels_last may change on resume (or with
    the precision's default); fused Adam walks parameter, gradient and moments as flat arrays, so a moment
    in NCHW order beside an NHWC parameter would be updated with the wrong elements, silently.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for key, value in st.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
