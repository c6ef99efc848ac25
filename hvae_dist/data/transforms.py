"""Batch transforms from uint8 pixels to model inputs, and the background-model perturbation.

They run on the batch's device; random draws use the given torch.Generator (on any device: the noise is
drawn on the generator's device and moved) or the global RNG when none is given.
"""

from __future__ import annotations

import torch

from hvae_dist.config import BINARIZE_MODES


def _check_uint8(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{what} expects a uint8 tensor of pixels 0..255, got {got}")


def _uniform(x: torch.Tensor, source) -> torch.Tensor:
    """U[0, 1) float32 noise shaped like x: from an explicit tensor, a Generator, or the global RNG."""
    if isinstance(source, torch.Tensor):
        if source.shape != x.shape:
            raise ValueError(f"noise tensor has shape {tuple(source.shape)}, expected {tuple(x.shape)} (like x)")
        return source.to(device=x.device, dtype=torch.float32)
    if isinstance(source, torch.Generator):
        return torch.rand(x.shape, generator=source, device=source.device).to(x.device)
    if source is None:
        return torch.rand(x.shape, device=x.device)
    raise TypeError(f"generator_or_noise must be a torch.Generator, a noise tensor or None, got {type(source).__name__}")


def preprocess_batch(x_uint8: torch.Tensor, mode: str, generator_or_noise=None) -> torch.Tensor:
    """uint8 pixels (B, C, H, W) -> float32 model input of the same shape.

    - ``none``: x / 255 in [0, 1], the 8-bit values k / 255 the DMoL likelihood expects.
    - ``dynamic``: a Bernoulli(x / 255) sample in {0, 1}, computed as ``u < x / 255`` with u ~ U[0, 1) from
      `generator_or_noise`: a torch.Generator, an explicit noise tensor shaped like x (float in [0, 1), for
      noise that depends only on the example), or None (global RNG).
    - ``static``: deterministic threshold x / 255 > 0.5 (pixels >= 128) in {0, 1}.
    - ``dequantize``: (x + u) / 256 in [0, 1), u ~ U[0, 1) drawn as for ``dynamic``.
    Unknown mode -> ValueError, x not uint8 -> TypeError (the config is validated before: these are bugs).
    """
    if mode not in BINARIZE_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; allowed: {', '.join(BINARIZE_MODES)}")
    _check_uint8(x_uint8, "preprocess_batch")
    if mode == "none":
        return x_uint8.to(torch.float32) / 255.0
    if mode == "static":
        return (x_uint8 > 127).to(torch.float32)  # x / 255 > 0.5  <=>  x >= 128
    u = _uniform(x_uint8, generator_or_noise)
    if mode == "dynamic":
        return (u < x_uint8.to(torch.float32) / 255.0).to(torch.float32)  # 0 never fires, 255 always does
    return (x_uint8.to(torch.float32) + u) / 256.0


def perturb(x_uint8: torch.Tensor, rate: float, generator_or_noise=None) -> torch.Tensor:
    """Background-model noise (Ren et al. 2019): each pixel independently, with probability `rate`, is
    replaced by a uniform random value in 0..255. Returns a new uint8 tensor; rate 0 returns an equal copy.

    One uniform u per pixel decides both (as `preprocess_batch`, from a Generator, an explicit noise tensor
    shaped like x, or the global RNG): the pixel is replaced when u < rate, by floor(256 u / rate), which
    given u < rate is uniform on 0..255.
    """
    _check_uint8(x_uint8, "perturb")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perturb rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return x_uint8.clone()
    u = _uniform(x_uint8, generator_or_noise)
    value = torch.floor(u * (256.0 / rate)).clamp_(max=255).to(torch.uint8)
    return torch.where(u < rate, value, x_uint8)
