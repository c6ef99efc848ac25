"""The network's compute precision: one autocast for training and scoring.

Precision names are owned by `hvae_dist.config` (PRECISIONS for training, SCORE_PRECISIONS for scoring).
Under bf16 / fp16 only the network runs in 16 bits: likelihoods, KL terms and reductions stay fp32
(see `hvae_dist.nn.stochastic` and `hvae_dist.nn.likelihoods`).
"""
from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(precision: str, device: torch.device | str):
    """torch.autocast to the 16-bit dtype of `precision` on `device`'s type; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])
