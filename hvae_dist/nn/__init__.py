"""Layers of the hierarchical VAE: deterministic residual blocks and Gaussian stochastic layers."""
from hvae_dist.nn.layers import ResBlockConv2d, conv2d, dense, get_activation
from hvae_dist.nn.stochastic import GaussianConv2d, GaussianDense, Gaussian, build_stochastic

__all__ = ["ResBlockConv2d", "conv2d", "dense", "get_activation", "GaussianConv2d", "GaussianDense", "Gaussian",
           "build_stochastic"]
