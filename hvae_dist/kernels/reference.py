"""Discretized logistic mixture (DMoL) likelihood in plain PyTorch: the reference the fused kernel must match,
plus sampling and a point reconstruction.

Parameter layout (channel dimension of ``params``, ``K = M * (3C + 1)``)::

    [ logits (M) | means (C*M) | log_scales (C*M) | coeffs (C*M) ]

each group channel-major: ``means[c*M + m]`` is the mean of data channel ``c`` under component ``m``, and
likewise for log-scales. Coefficient slot ``q`` couples the pair (channel, earlier channel) =
(1, 0), (2, 0), (2, 1) for q = 0, 1, 2 (PixelCNN++'s c_gr, c_br, c_bg, through tanh); C = 1 uses no slot,
C = 2 slot 0, C = 3 all three; the remaining slots are unused (kept for a uniform layout, zero gradient).
``dmol_split_params`` returns the four groups as views.

Semantics (PixelCNN++ / VDVAE): x rescaled to [-1, 1]; log-scales clamped below at ``LOG_SCALE_MIN`` (-7);
the means of later channels shift by tanh(coeff) * (the true value of earlier channels); the bin half-width
is 1 / (2^bits - 1). The lowest bin gets the mass below its upper edge, the highest the mass above its lower
edge, interior bins log(cdf_plus - cdf_min) when that difference exceeds ``CDF_DELTA_MIN`` (1e-5), else
log(density at the bin centre * bin width). Both constants are owned by ``csrc/dmol_constants.h``, shared
with the fused kernel, and read from it by `hvae_dist.kernels.constants`.
The one numerical departure from the textbook code: cdf_plus - cdf_min is formed on the side of the bin
centre where it does not cancel (sigmoid(-min_in) - sigmoid(-plus_in) above the mean), the same number in
exact arithmetic but accurate in float32 where both cdfs are close to 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hvae_dist.kernels.constants import CDF_DELTA_MIN, LOG_SCALE_MIN

_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_BITS = 16


def dmol_num_params(channels: int, num_mixtures: int) -> int:
    """Parameter channels per pixel: M * (3C + 1)."""
    return num_mixtures * (3 * channels + 1)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"dmol: bits must be an int in [1, {MAX_BITS}], got {bits!r}")


def _check_params(params: Tensor, channels: int) -> int:
    """Validate params for `channels` data channels; return M."""
    if not isinstance(params, Tensor):
        raise TypeError(f"dmol: params must be a torch.Tensor, got {type(params).__name__}")
    if params.dtype not in _PARAM_DTYPES:
        raise TypeError(f"dmol: params dtype must be float16, bfloat16, float32 or float64, got {params.dtype}")
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 3:
        raise ValueError(f"dmol: data channels C must be 1, 2 or 3 (the coupling has C*(C-1)/2 <= C "
                         f"coefficient slots only then), got {channels!r}")
    if params.dim() != 4:
        raise ValueError(f"dmol: params must be (B, M*(3C+1), H, W), got shape {tuple(params.shape)}")
    k = params.shape[1]
    if k == 0 or k % (3 * channels + 1):
        raise ValueError(f"dmol: params has {k} channels, not a positive multiple of 3C+1 = {3 * channels + 1} "
                         f"(C = {channels}); expected M*(3C+1) for M mixture components")
    return k // (3 * channels + 1)


def check_dmol_args(x: Tensor, params: Tensor, bits: int) -> tuple[int, int]:
    """Validate the arguments of `dmol_log_prob` (shapes, dtypes, devices, bits) without touching values
    (no device sync). Returns (M, C)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"dmol: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"dmol: x must be floating point with values k / (2^bits - 1) in [0, 1], got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"dmol: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    _check_bits(bits)
    m = _check_params(params, x.shape[1])
    b, c, h, w = x.shape
    if (params.shape[0], params.shape[2], params.shape[3]) != (b, h, w):
        raise ValueError(f"dmol: params {tuple(params.shape)} does not match x {tuple(x.shape)} in B, H, W")
    if x.device != params.device:
        raise ValueError(f"dmol: x is on {x.device} but params on {params.device}")
    return m, c


def compute_dtype(params: Tensor) -> torch.dtype:
    """float64 for float64 params (gradcheck), else float32: half-precision params are upcast."""
    return torch.float64 if params.dtype == torch.float64 else torch.float32


def dmol_split_params(params: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Views of the four parameter groups: logits (B, M, H, W) and means, log_scales (raw, unclamped),
    coeffs (raw, before tanh), each (B, C, M, H, W)."""
    return _split(params, channels, _check_params(params, channels))


def _split(params: Tensor, channels: int, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`dmol_split_params` for params already validated (`_check_params` returned `m`)."""
    b, _, h, w = params.shape
    logits = params[:, :m]                                           # B, M, H, W
    rest = params[:, m:].reshape(b, 3, channels, m, h, w)            # B, group, C, M, H, W
    return logits, rest[:, 0], rest[:, 1], rest[:, 2]


def _coupled_means(means: Tensor, tanh_coeffs: Tensor, x: Tensor) -> Tensor:
    """means (B, C, M, H, W) shifted by the coupling with x (B, C, 1, H, W) in [-1, 1]."""
    c = means.shape[1]
    mus = [means[:, 0]]
    if c >= 2:
        mus.append(means[:, 1] + tanh_coeffs[:, 0] * x[:, 0])
    if c >= 3:
        mus.append(means[:, 2] + tanh_coeffs[:, 1] * x[:, 0] + tanh_coeffs[:, 2] * x[:, 1])
    return torch.stack(mus, dim=1)                                   # B, C, M, H, W


def dmol_reference(x: Tensor, params: Tensor, bits: int = 8) -> Tensor:
    """log p(x) in nats per example, (B,), summed over pixels and channels.

    x: (B, C, H, W) float, values k / (2^bits - 1) in [0, 1]. params: (B, M*(3C+1), H, W) in the layout of
    this module's docstring, float16/bfloat16/float32/float64. Math and result in float32 (float64 for
    float64 params). Every branch goes through torch.where with finite values on the unused side, so the
    gradients are finite wherever the edge bins or the low-probability fallback trigger.
    """
    m, c = check_dmol_args(x, params, bits)
    return reference_log_prob(x, params, bits, m, c)


def reference_log_prob(x: Tensor, params: Tensor, bits: int, m: int, c: int) -> Tensor:
    """`dmol_reference` without the argument checks, for callers that already ran them:
    ``m, c = check_dmol_args(x, params, bits)``."""
    dt = compute_dtype(params)
    n = float(2 ** bits - 1)
    hw = 1.0 / n
    logits, means, log_scales, coeffs = _split(params.to(dt), c, m)
    x = (x.to(dt) * 2 - 1).unsqueeze(2)                              # B, C, 1, H, W
    log_scales = log_scales.clamp(min=LOG_SCALE_MIN)                 # B, C, M, H, W
    mu = _coupled_means(means, torch.tanh(coeffs), x)                # B, C, M, H, W
    centered = x - mu
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centered + hw)
    min_in = inv_s * (centered - hw)
    mid_in = inv_s * centered
    cdf_delta = torch.where(mid_in > 0, torch.sigmoid(-min_in) - torch.sigmoid(-plus_in),
                            torch.sigmoid(plus_in) - torch.sigmoid(min_in))
    log_cdf_plus = plus_in - F.softplus(plus_in)                     # lowest bin
    log_one_minus_cdf_min = -F.softplus(min_in)                      # highest bin
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    interior = torch.where(cdf_delta > CDF_DELTA_MIN, torch.log(cdf_delta.clamp(min=1e-12)),
                           log_pdf_mid - math.log(n / 2))
    lp = torch.where(x < -1 + hw, log_cdf_plus,
                     torch.where(x > 1 - hw, log_one_minus_cdf_min, interior))   # B, C, M, H, W
    lp = lp.sum(1) + torch.log_softmax(logits, dim=1)                # B, M, H, W
    return torch.logsumexp(lp, dim=1).flatten(1).sum(1)              # B


def _quantize(x: Tensor, bits: int) -> Tensor:
    """[-1, 1] -> the nearest of the 2^bits levels k / (2^bits - 1) in [0, 1]."""
    n = 2 ** bits - 1
    return torch.round((x.clamp(-1, 1) + 1) * (n / 2)) / n


def _select(t: Tensor, k: Tensor) -> Tensor:
    """t (B, C, M, H, W), k (B, H, W) component indices -> (B, C, H, W)."""
    b, c, _, h, w = t.shape
    return t.gather(2, k[:, None, None].expand(b, c, 1, h, w)).squeeze(2)


def _couple(v: Tensor, t: Tensor, channels: int) -> Tensor:
    """Channel coupling of a sample or mean v (B, C, H, W) in [-1, 1]: later channels shift by tanh(coeff)
    t (B, 3, H, W) times the (clamped) values of earlier channels, slots (1,0), (2,0), (2,1)."""
    xs = [v[:, 0].clamp(-1, 1)]
    if channels >= 2:
        xs.append((v[:, 1] + t[:, 0] * xs[0]).clamp(-1, 1))
    if channels >= 3:
        xs.append((v[:, 2] + t[:, 1] * xs[0] + t[:, 2] * xs[1]).clamp(-1, 1))
    return torch.stack(xs, dim=1)


@torch.no_grad()
def dmol_sample(params: Tensor, channels: int, bits: int = 8,
                generator: torch.Generator | None = None) -> Tensor:
    """One sample per pixel, (B, C, H, W) float32 with values k / (2^bits - 1) in [0, 1]: a component by
    Gumbel-max on the logits, then the channels in order, each a logistic around its coupled mean."""
    _check_bits(bits)
    logits, means, log_scales, coeffs = dmol_split_params(params.float(), channels)
    dev = params.device
    b, _, h, w = logits.shape
    u = torch.rand(logits.shape, generator=generator, device=dev).clamp_(1e-5, 1 - 1e-5)
    k = torch.argmax(logits - torch.log(-torch.log(u)), dim=1)       # B, H, W
    mu = _select(means, k)                                           # B, C, H, W
    scale = torch.exp(_select(log_scales, k).clamp(min=LOG_SCALE_MIN))
    t = torch.tanh(_select(coeffs, k))
    u = torch.rand(mu.shape, generator=generator, device=dev).clamp_(1e-5, 1 - 1e-5)
    z = mu + scale * (torch.log(u) - torch.log1p(-u))                # B, C, H, W
    return _quantize(_couple(z, t, channels), bits)


@torch.no_grad()
def dmol_mean(params: Tensor, channels: int, bits: int = 8) -> Tensor:
    """A point reconstruction for image grids, (B, C, H, W) float32 in [0, 1]: the coupled mean of the
    component with the largest logit at each pixel, clamped and quantized to the 2^bits levels."""
    _check_bits(bits)
    logits, means, _, coeffs = dmol_split_params(params.float(), channels)
    k = torch.argmax(logits, dim=1)                                  # B, H, W
    mu = _select(means, k)                                           # B, C, H, W
    t = torch.tanh(_select(coeffs, k))
    return _quantize(_couple(mu, t, channels), bits)
