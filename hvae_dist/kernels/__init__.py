"""Discretized logistic mixture (DMoL) likelihood: a pure-PyTorch reference and a fused C++/CUDA kernel.

`dmol_log_prob(x, params, bits)` picks the implementation: ``HVAE_DMOL=reference|fused`` forces one;
unset (or ``auto``), the fused kernel is used when it builds for the tensors' device, else the reference
(with one warning per process). The parameter layout is documented in `hvae_dist.kernels.reference`:
``[logits (M) | means (C*M) | log_scales (C*M) | coeffs (C*M)]``, each group channel-major.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from hvae_dist.kernels.fused import dmol_fused, extension_kind, fused_log_prob, load_extension
from hvae_dist.kernels.reference import (
    check_dmol_args,
    dmol_mean,
    dmol_num_params,
    dmol_reference,
    dmol_sample,
    dmol_split_params,
    reference_log_prob,
)

__all__ = [
    "dmol_fused",
    "dmol_implementation",
    "dmol_log_prob",
    "dmol_mean",
    "dmol_num_params",
    "dmol_reference",
    "dmol_sample",
    "dmol_split_params",
]

ENV_VAR = "HVAE_DMOL"
_warned: set[str] = set()


def dmol_implementation(device: torch.device | str = "cpu") -> str:
    """'fused' or 'reference': what `dmol_log_prob` uses for tensors on `device` (builds the kernel if needed)."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in ("auto", "fused", "reference"):
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 'reference', 'fused' or unset")
    if choice == "reference":
        return "reference"
    device = torch.device(device)
    kind = extension_kind(device)
    if choice == "fused":
        if kind is None:
            raise RuntimeError(f"{ENV_VAR}=fused but the fused DMoL kernel has no implementation for {device}")
        load_extension(kind)  # raises with the build error
        return "fused"
    try:
        if kind is None:
            raise RuntimeError(f"no fused kernel for device type {device.type!r}")
        load_extension(kind)
        return "fused"
    except RuntimeError as e:
        key = device.type
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"hvae_dist: using the reference DMoL likelihood on {device.type} (slower, more "
                          f"memory): {e}. Set {ENV_VAR}=reference to silence this.", RuntimeWarning,
                          stacklevel=3)
        return "reference"


def dmol_log_prob(x: Tensor, params: Tensor, bits: int = 8) -> Tensor:
    """log p(x) in nats per example, (B,) float32 (float64 for float64 params), summed over pixels and channels.

    x: (B, C, H, W) float, values k / (2^bits - 1) in [0, 1], C in {1, 2, 3}; it gets no gradient from the
    fused kernel. params: (B, M*(3C+1), H, W), float16/bfloat16/float32/float64 (math in float32), same
    device. Arguments are validated on the host from shapes and dtypes only (no device sync).
    """
    m, c = check_dmol_args(x, params, bits)  # once here: the implementations below do not check again
    if dmol_implementation(params.device) == "fused":
        return fused_log_prob(x, params, bits, m, c)
    return reference_log_prob(x, params, bits, m, c)
