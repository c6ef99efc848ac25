"""Deterministic layers: weight-normed conv/dense and the residual block of the paper's architectures."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from hvae_dist.config import ACTIVATIONS

_ACTIVATIONS = dict(zip(ACTIVATIONS, (nn.SiLU, nn.ELU, nn.ReLU, nn.LeakyReLU)))  # in config's order


def get_activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


class WeightNorm(nn.Module):
    """w = g * v / ||v|| (norm over every dim but 0): torch.nn.utils.parametrizations.weight_norm, with the same
    parameters (`parametrizations.weight.original0` = g, `original1` = v) and values, except that w keeps v's
    memory layout. (torch's fused kernel returns an NCHW w even for an NHWC v, which would send every conv of
    a channels_last model back to NCHW; for an NCHW v nothing changes, not even a copy.)"""

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        if torch._C._functorch.is_functorch_wrapped_tensor(weight_v):
            # under torch.func (vmap / grad: per-example parameters, estimators/likelihood_regret.py) the fused
            # kernel has no batching rule and falls back to a slow per-example loop; the same math, composite:
            dims = tuple(range(1, weight_v.dim()))
            return weight_v * (weight_g / torch.linalg.vector_norm(weight_v, dim=dims, keepdim=True))
        w = torch._weight_norm(weight_v, weight_g, 0)
        return w if w.stride() == weight_v.stride() else torch.empty_like(weight_v).copy_(w)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return torch.norm_except_dim(weight, 2, 0), weight


def weight_norm(layer: nn.Module) -> nn.Module:
    parametrize.register_parametrization(layer, "weight", WeightNorm(), unsafe=True)
    return layer


def conv2d(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, weightnorm: bool = True) -> nn.Module:
    """Same-padded conv (odd kernel); output spatial size ceil(H / stride)."""
    layer = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)
    return weight_norm(layer) if weightnorm else layer


def dense(in_features: int, out_features: int, weightnorm: bool = True) -> nn.Module:
    layer = nn.Linear(in_features, out_features)
    return weight_norm(layer) if weightnorm else layer


class ResBlockConv2d(nn.Module):
    """Pre-activation residual block: act -> conv(k, stride) -> act -> conv(k) [-> gate], plus a skip path.

    Bottom-up (`upsample_to=None`): a stride s > 1 downsamples (H -> ceil(H / s)).
    Top-down (`upsample_to=(H, W)`): the input is first resized (nearest) to (H, W), so a decoder block
    mirrors an encoder block of stride s exactly, whatever the rounding of ceil(H / s).
    Gated: the second conv emits 2C channels, a * sigmoid(b) (as in the paper's code).
    Shapes: (B, in_channels, H, W) -> (B, out_channels, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 weightnorm: bool = True, gated: bool = False, activation: str = "silu",
                 upsample_to: tuple[int, int] | None = None):
        super().__init__()
        self.upsample_to = tuple(upsample_to) if upsample_to is not None else None
        self.gated = gated
        conv_stride = 1 if upsample_to is not None else stride
        self.act = get_activation(activation)
        self.conv1 = conv2d(in_channels, out_channels, kernel_size, conv_stride, weightnorm)
        self.conv2 = conv2d(out_channels, out_channels * (2 if gated else 1), kernel_size, 1, weightnorm)
        needs_proj = in_channels != out_channels or conv_stride != 1
        self.skip = conv2d(in_channels, out_channels, 1, conv_stride, weightnorm) if needs_proj else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.upsample_to is not None and tuple(x.shape[-2:]) != self.upsample_to:
            x = F.interpolate(x, size=self.upsample_to, mode="nearest")
        h = self.conv2(self.act(self.conv1(self.act(x))))
        if self.gated:
            a, b = h.chunk(2, dim=1)
            h = a * torch.sigmoid(b)
        return h + self.skip(x)   # h first: the sum takes the conv output's memory layout (same value either way)
