"""Gaussian stochastic layers: posterior q(z|.) and conditional prior p(z|.) heads, and the projection of z.

A layer's latent has a fixed event shape: (latent_features, H, W) for GaussianConv2d at the resolution of
its stage, (latent_features,) for GaussianDense. Scales are softplus(.) + min_scale. Log-densities and
KL terms are computed in float32 whatever the autocast dtype of the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvae_dist.nn.layers import conv2d, dense

LOG_2PI = math.log(2 * math.pi)


@dataclass
class DiagonalGaussian:
    """The distribution of a latent layer: a diagonal Gaussian over a latent of shape (B, *event). loc/scale are float32."""

    loc: Tensor
    scale: Tensor

    def rsample(self, eps: Tensor) -> Tensor:
        return self.loc + self.scale * eps

    def log_prob(self, z: Tensor) -> Tensor:
        """Elementwise log-density, (B, *event), nats."""
        return -0.5 * ((z - self.loc) / self.scale) ** 2 - torch.log(self.scale) - 0.5 * LOG_2PI

    @staticmethod
    def standard_log_prob(z: Tensor) -> Tensor:
        return -0.5 * z ** 2 - 0.5 * LOG_2PI


def _gaussian_from(h: Tensor, min_scale: float) -> DiagonalGaussian:
    loc, raw = h.float().chunk(2, dim=1)
    return DiagonalGaussian(loc, F.softplus(raw) + min_scale)


class GaussianConv2d(nn.Module):
    """Convolutional latent (latent_features, H, W) at the resolution of the stage's deterministic features."""

    def __init__(self, in_channels: int, feature_shape: tuple[int, int, int], latent_features: int,
                 weightnorm: bool = True, min_scale: float = 1e-3, posterior_in_channels: int | None = None):
        super().__init__()
        c, h, w = feature_shape
        self.event_shape = (latent_features, h, w)
        self.min_scale = min_scale
        self.posterior = conv2d(posterior_in_channels or in_channels, 2 * latent_features, 3, 1, weightnorm)
        self.prior = conv2d(c, 2 * latent_features, 3, 1, weightnorm)
        self.project_up = conv2d(latent_features, c, 1, 1, weightnorm)    # z -> features for inference
        self.project_down = conv2d(latent_features, c, 1, 1, weightnorm)  # z -> features for generation

    def q(self, h: Tensor) -> DiagonalGaussian:
        return _gaussian_from(self.posterior(h), self.min_scale)

    def p(self, h: Tensor) -> DiagonalGaussian:
        return _gaussian_from(self.prior(h), self.min_scale)

    def up(self, z: Tensor) -> Tensor:
        return self.project_up(z)

    def down(self, z: Tensor) -> Tensor:
        return self.project_down(z)


class GaussianDense(nn.Module):
    """Dense latent (latent_features,) from the flattened features of its stage."""

    def __init__(self, in_channels: int, feature_shape: tuple[int, int, int], latent_features: int,
                 weightnorm: bool = True, min_scale: float = 1e-3, posterior_in_channels: int | None = None):
        super().__init__()
        c, h, w = feature_shape
        self.feature_shape = feature_shape
        self.event_shape = (latent_features,)
        self.min_scale = min_scale
        self.posterior = dense((posterior_in_channels or in_channels) * h * w, 2 * latent_features, weightnorm)
        self.prior = dense(c * h * w, 2 * latent_features, weightnorm)
        self.project_up = dense(latent_features, c * h * w, weightnorm)
        self.project_down = dense(latent_features, c * h * w, weightnorm)

    def q(self, h: Tensor) -> DiagonalGaussian:
        return _gaussian_from(self.posterior(h.flatten(1)), self.min_scale)

    def p(self, h: Tensor) -> DiagonalGaussian:
        return _gaussian_from(self.prior(h.flatten(1)), self.min_scale)

    def up(self, z: Tensor) -> Tensor:
        return self.project_up(z).view(z.shape[0], *self.feature_shape)

    def down(self, z: Tensor) -> Tensor:
        return self.project_down(z).view(z.shape[0], *self.feature_shape)


def build_stochastic(spec: dict, feature_shape: tuple[int, int, int], min_scale: float,
                     posterior_in_channels: int | None = None) -> nn.Module:
    cls = {"GaussianConv2d": GaussianConv2d, "GaussianDense": GaussianDense}[spec["block"]]
    return cls(feature_shape[0], feature_shape, spec["latent_features"], spec.get("weightnorm", True), min_scale,
               posterior_in_channels)
