"""What every model type shares: the one model type (`HierarchicalModel`, the base of every hierarchy),
the decode modes, the forward pass's output, and the stage stack built from the seed config format (a
bottom-up encoder and its top-down mirror per stage)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hvae_dist.config import ModelConfig
from hvae_dist.nn import ResBlockConv2d

SAMPLE, PRIOR_MODE = "sample", "prior_mode"


def lk_modes(k: int, num_layers: int) -> list[str]:
    """Decode modes of the L>k bound: layers 1..k from the conditional-prior mode, the rest sampled."""
    if not 0 <= k <= num_layers:
        raise ValueError(f"k={k} must be in 0..{num_layers} (the model has {num_layers} latent layers)")
    return [PRIOR_MODE] * k + [SAMPLE] * (num_layers - k)


@dataclass
class ModelOutput:
    """Result of one forward pass over a batch of B rows (examples x samples). All float32, nats."""

    log_px: Tensor                 # (B,) log p(x | z)
    kl: Tensor                     # (B, L) log q(z_i|.) - log p(z_i|.), single sample; 0 for prior-mode layers
    kl_dims: list[Tensor]          # per layer (B, D_i) elementwise KL terms, for free nats
    posterior_means: list[Tensor]  # per layer (B, D_i), for active-unit statistics
    params: Tensor                 # (B, P, H, W) likelihood parameters
    zs: list[Tensor] | None = None  # per layer (B, *latent_shapes[i]) the z the generative path used (`decode`)

    @property
    def elbo(self) -> Tensor:
        """(B,) single-sample bound log p(x|z) - sum_i KL_i, nats (an L>k bound under L>k modes)."""
        return self.log_px - self.kl.sum(1)


class HierarchicalModel(nn.Module):
    """The one model type: every hierarchy (VAE and LVAE: `model.hvae.HierarchicalVAE`; BIVA: `model.biva.BIVA`)
    derives from it, and training, evaluation and scoring take a HierarchicalModel, never a concrete class.

    cfg (ModelConfig), type ("vae" / "lvae" / "biva"), input_shape (C, H, W) and likelihood (the p(x|z)
    head, `nn.likelihoods`) are set by the subclass; images are (B, C, H, W) floats in [0, 1].
    """

    cfg: ModelConfig
    type: str
    input_shape: tuple[int, ...]
    likelihood: nn.Module

    @property
    def num_layers(self) -> int:
        """L, the number of latent layers (decode modes and KL terms per forward pass)."""
        raise NotImplementedError

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Shape of each layer's noise for one row, bottom first (`forward(noise=...)` takes (B, *shape))."""
        raise NotImplementedError

    def precompute(self, x: Tensor, modes: Sequence[str] | None = None):
        """The noise-independent part of the forward pass (the deterministic bottom-up path), reused over
        importance samples with `.repeat(n)`."""
        raise NotImplementedError

    def forward(self, x: Tensor | None = None, modes: Sequence[str] | None = None,
                noise: Sequence[Tensor] | None = None, precomputed=None) -> ModelOutput:
        """One sample per row: log p(x|z) and the KL per layer (ModelOutput) under `modes` (SAMPLE / PRIOR_MODE
        per layer, bottom first; default all SAMPLE), with given standard-normal `noise` or fresh noise."""
        raise NotImplementedError

    def sample_prior(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                     mean_image: bool = True, temperature: float = 1.0) -> Tensor:
        """n images (n, C, H, W) in [0, 1] drawn from the prior."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        """Likelihood mean of p(x | z ~ q(z|x)): (B, C, H, W) in [0, 1]."""
        raise NotImplementedError

    def decode(self, zs: Sequence[Tensor | None], k: int = 0) -> Tensor:
        """Likelihood parameters (B, P, H, W) from the latents zs[k:] of layers k+1..L (`ModelOutput.zs` layout),
        layers 1..k from their conditional-prior mode as in L>k; differentiable in zs (estimators.lid)."""
        raise NotImplementedError


def _out_size(size: int, stride: int) -> int:
    return math.ceil(size / stride)


def build_stage(cfg: ModelConfig, i: int, in_shape: tuple[int, int, int]
                ) -> tuple[nn.Sequential, nn.Sequential, tuple[int, int, int]]:
    """Stage i (0 = bottom) of the seed config: (encoder, decoder, encoder output shape (C, H, W)).

    The encoder maps the stage's input of shape `in_shape` (x for stage 0, else the features of the
    stage below) through the stage's residual blocks; the decoder mirrors it back to the input's
    resolution (stage 0 decodes to the first block's hidden channels: the likelihood head maps those
    to pixels).
    """
    blocks = cfg.config_deterministic[i]
    enc, dec, shapes, shape = [], [], [in_shape], in_shape
    for b in blocks:
        out = (b["out_channels"], _out_size(shape[1], b["stride"]), _out_size(shape[2], b["stride"]))
        enc.append(ResBlockConv2d(shape[0], out[0], b.get("kernel_size", 3), b.get("stride", 1),
                                  b.get("weightnorm", True), b.get("gated", False), cfg.activation))
        shape = out
        shapes.append(shape)
    for j in reversed(range(len(blocks))):
        b, src, dst = blocks[j], shapes[j + 1], shapes[j]
        dst_ch = blocks[0]["out_channels"] if (i == 0 and j == 0) else dst[0]
        dec.append(ResBlockConv2d(src[0], dst_ch, b.get("kernel_size", 3), b.get("stride", 1),
                                  b.get("weightnorm", True), b.get("gated", False), cfg.activation,
                                  upsample_to=dst[1:]))
    return nn.Sequential(*enc), nn.Sequential(*dec), shape


def check_modes(modes: Sequence[str] | None, num_layers: int) -> list[str]:
    """The decode modes of a forward pass (default: all sampled, the ELBO); ValueError if malformed."""
    modes = list(modes) if modes is not None else [SAMPLE] * num_layers
    if len(modes) != num_layers or any(m not in (SAMPLE, PRIOR_MODE) for m in modes):
        raise ValueError(f"modes must be {num_layers} of {SAMPLE!r}/{PRIOR_MODE!r}, got {modes}")
    return modes


def model_input(x: Tensor) -> Tensor:
    """Data in [0, 1] -> the networks' input in [-1, 1]."""
    return x * 2.0 - 1.0
