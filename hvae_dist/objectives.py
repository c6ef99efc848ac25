"""Training objective (ELBO with free nats and KL warm-up), schedules (KL, free nats, learning rate),
bits/dim, and the streaming importance-weighted bound used by the scorer.

Units: nats unless a name says bpd (bits per dimension = -log p / (D ln 2)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hvae_dist.model import ModelOutput


def kl_warmup_beta(step: int, warmup_steps: int) -> float:
    """Linear KL warm-up: beta goes 0 -> 1 over `warmup_steps` (1 when warmup_steps = 0)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def free_nats_at(step: int, free_nats: float, constant_steps: int, cooldown_steps: int) -> float:
    """Free-nats budget per layer: `free_nats` for `constant_steps`, then linear decay to 0 over
    `cooldown_steps`. With both step counts 0 the budget is constant (never cooled down)."""
    if constant_steps <= 0 and cooldown_steps <= 0:
        return free_nats
    if step < constant_steps:
        return free_nats
    if cooldown_steps <= 0:
        return 0.0
    return free_nats * max(0.0, 1.0 - (step - constant_steps) / cooldown_steps)


def lr_at(step: int, lr: float, *, warmup_steps: int = 0, schedule: str = "constant", max_steps: int = 0,
          lr_min: float = 0.0) -> float:
    """The learning rate of update `step` (0-based): a pure function of the step, so a resumed run applies the
    same lr at every step as an uninterrupted one.

    Warm-up (`warmup_steps` W > 0): lr * (t + 1) / W for t < W, a line from 0 whose first update already moves
    the weights. Then `constant`: lr; `cosine`: lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2 with
    p = (t - W) / (max_steps - W), clamped to [0, 1], so lr at t = W and lr_min from t = max_steps on (the
    last update of a run, t = max_steps - 1, is just above lr_min). Units: those of `lr` (per update).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}")
    span = max_steps - max(warmup_steps, 0)
    p = 1.0 if span <= 0 else min(1.0, max(0.0, (step - max(warmup_steps, 0)) / span))
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))


def bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """-log-likelihood in nats -> bits/dim; pass a log-likelihood's negative."""
    return nats / (num_dims * math.log(2.0))


@dataclass
class Loss:
    loss: Tensor       # scalar to minimise
    elbo: Tensor       # (B,) single-sample ELBO, nats (the unclamped, beta = 1 bound)
    log_px: Tensor     # (B,)
    kl: Tensor         # (B, L)


def elbo_loss(out: ModelOutput, beta: float = 1.0, free_nats: float = 0.0) -> Loss:
    """-(log p(x|z) - beta * sum_i max(KL_i,d, free_nats / D_i)) averaged over the batch.

    Free nats (as in BIVA / the paper's code): the budget of layer i is spread over its D_i
    dimensions; a dimension whose batch-mean KL is below free_nats / D_i contributes that constant
    (zero gradient), so the optimiser cannot push a layer below the budget but is not penalised
    under it.
    """
    kl_term = out.log_px.new_zeros(())
    for kl_d in out.kl_dims:                       # (B, D_i)
        per_dim = kl_d.mean(0)                     # D_i
        floor = free_nats / per_dim.numel()
        kl_term = kl_term + (torch.clamp(per_dim, min=floor) if free_nats > 0 else per_dim).sum()
    loss = -out.log_px.mean() + beta * kl_term
    return Loss(loss=loss, elbo=out.elbo.detach(), log_px=out.log_px.detach(), kl=out.kl.detach())


class StreamingLogMeanExp:
    """Online log(1/S sum_s exp(w_s)) over sample chunks, in float64: memory does not grow with S.

    update(w): w is (B, s) log-weights of s more samples for the same B examples.
    result(): (B,) logsumexp_s(w_s) - log S, and `mean()` the plain mean of w (the 1-sample bound).
    """

    def __init__(self) -> None:
        self.max: Tensor | None = None
        self.sum: Tensor | None = None
        self.total: Tensor | None = None
        self.count = 0

    def update(self, w: Tensor) -> None:
        w = w.double()
        chunk_max = w.max(dim=1).values
        if self.max is None:
            self.max, self.sum, self.total = chunk_max, torch.zeros_like(chunk_max), torch.zeros_like(chunk_max)
        new_max = torch.maximum(self.max, chunk_max)
        # A row whose running max is -inf has seen only -inf weights: keep its sum 0, not NaN.
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        self.sum = self.sum * torch.exp(self.max - safe).nan_to_num(0.0) + torch.exp(w - safe[:, None]).sum(1)
        self.max = new_max
        self.total = self.total + w.sum(1)
        self.count += w.shape[1]

    def result(self) -> Tensor:
        if self.count == 0:
            raise ValueError("no samples were added")
        safe = torch.where(torch.isfinite(self.max), self.max, torch.zeros_like(self.max))
        return safe + torch.log(self.sum) - math.log(self.count)

    def mean(self) -> Tensor:
        return self.total / self.count

