"""Layers of the hierarchical VAE: deterministic residual blocks, Gaussian stochastic layers (their distribution:
`DiagonalGaussian`), the likelihood heads p(x|z) (`GaussianLikelihood` among them) and the network precision (autocast)."""
from hvae_dist.nn.layers import ResBlockConv2d, conv2d, dense, get_activation
from hvae_dist.nn.likelihoods import Likelihood, build_likelihood
from hvae_dist.nn.stochastic import DiagonalGaussian, GaussianConv2d, GaussianDense, build_stochastic

__all__ = [
           "DiagonalGaussian",
           "GaussianConv2d",
           "GaussianDense",
           "Likelihood",
           "ResBlockConv2d",
           "build_likelihood",
           "build_stochastic",
           "conv2d",
           "dense",
           "get_activation",
]
