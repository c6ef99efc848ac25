"""Observation models p(x|z): a conv head that maps decoder features to parameters, and their log-probability.

All `log_prob` return (B,) float32 in nats, summed over pixels and channels, computed in float32 whatever
the autocast dtype of the network. Data conventions (see `hvae_dist.data.preprocess_batch`):
bernoulli takes x in {0, 1}; the discretized likelihoods take 8-bit values k / (2^bits - 1) in [0, 1];
gaussian takes continuous x in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvae_dist.config import LIKELIHOODS
from hvae_dist.nn.layers import conv2d
from hvae_dist.nn.stochastic import LOG_2PI


class Likelihood(nn.Module):
    """Head conv (hidden -> parameter channels) plus the distribution's math."""

    def __init__(self, in_channels: int, params_per_pixel: int):
        super().__init__()
        self.head = conv2d(in_channels, params_per_pixel, 3, 1, weightnorm=True)

    def forward(self, h: Tensor) -> Tensor:
        return self.head(h).float()

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    def __init__(self, in_channels: int, data_channels: int, **_):
        super().__init__(in_channels, data_channels)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(params, x.float(), reduction="none").flatten(1).sum(1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class GaussianLikelihood(Likelihood):
    """The likelihood head of model.likelihood="gaussian": a diagonal Gaussian per pixel with a learned scale
    (softplus + 1e-3)."""

    def __init__(self, in_channels: int, data_channels: int, **_):
        super().__init__(in_channels, 2 * data_channels)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw = params.chunk(2, dim=1)
        return loc, F.softplus(raw) + 1e-3

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        loc, scale = self._split(params)
        lp = -0.5 * ((x.float() - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI
        return lp.flatten(1).sum(1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        loc, scale = self._split(params)
        return (loc + scale * torch.randn(loc.shape, generator=generator, device=loc.device)).clamp(0, 1)

    def mean(self, params: Tensor) -> Tensor:
        return self._split(params)[0].clamp(0, 1)


class DiscretizedLogisticMixture(Likelihood):
    """PixelCNN++ mixture of discretized logistics (1 or 3 channels), through the fused kernel when it builds."""

    def __init__(self, in_channels: int, data_channels: int, num_mixtures: int = 10, bits: int = 8, **_):
        super().__init__(in_channels, num_mixtures * (3 * data_channels + 1))
        self.data_channels, self.bits = data_channels, bits

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        from hvae_dist.kernels import dmol_log_prob
        return dmol_log_prob(x, params, bits=self.bits)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        from hvae_dist.kernels import dmol_sample
        return dmol_sample(params, self.data_channels, bits=self.bits, generator=generator)

    def mean(self, params: Tensor) -> Tensor:
        from hvae_dist.kernels import dmol_mean
        return dmol_mean(params, self.data_channels, bits=self.bits)


class DiscretizedLogistic(DiscretizedLogisticMixture):
    """One discretized logistic per channel, no channel coupling: a 1-component mixture with zero coefficients."""

    def __init__(self, in_channels: int, data_channels: int, bits: int = 8, **_):
        Likelihood.__init__(self, in_channels, 2 * data_channels)
        self.data_channels, self.bits = data_channels, bits

    def _mixture_params(self, params: Tensor) -> Tensor:
        b, _, h, w = params.shape                                    # B, 2C, H, W
        zeros = params.new_zeros(b, 1, h, w)
        coeffs = params.new_zeros(b, self.data_channels, h, w)
        return torch.cat([zeros, params, coeffs], dim=1)             # B, 3C+1, H, W (M = 1)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return super().log_prob(x, self._mixture_params(params))

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return super().sample(self._mixture_params(params), generator)

    def mean(self, params: Tensor) -> Tensor:
        return super().mean(self._mixture_params(params))


# In config's order: ("bernoulli", "dmol", "discretized_logistic", "gaussian").
_LIKELIHOODS = dict(zip(LIKELIHOODS, (Bernoulli, DiscretizedLogisticMixture, DiscretizedLogistic, GaussianLikelihood)))


def build_likelihood(name: str, in_channels: int, data_channels: int, num_mixtures: int = 10,
                     bits: int = 8) -> Likelihood:
    return _LIKELIHOODS[name](in_channels, data_channels, num_mixtures=num_mixtures, bits=bits)
