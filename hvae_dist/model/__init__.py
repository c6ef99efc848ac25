"""The models: `hvae` (VAE / LVAE stage stacks), `biva` (bidirectional inference), and what they share
(`common`: decode modes, ModelOutput, the stage stack). Every model type derives from the one type
`HierarchicalModel` (`common`) and has its interface: num_layers, latent_shapes, input_shape,
precompute(x, modes), forward(x, modes, noise, precomputed), sample_prior(n), reconstruct(x),
decode(zs, k) (the generative path from given latents)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from hvae_dist.config import ModelConfig
from hvae_dist.model.biva import BIVA
from hvae_dist.model.common import PRIOR_MODE, SAMPLE, HierarchicalModel, ModelOutput, lk_modes
from hvae_dist.model.hvae import HierarchicalVAE, Precomputed

Model = HierarchicalModel   # the short name


def build_model(cfg: ModelConfig, input_shape: Sequence[int] | None = None) -> Model:
    """Build from the config (`model.type` vae / lvae / biva); `input_shape` (C, H, W) fills `cfg.input_shape`."""
    if input_shape is not None:
        cfg = replace(cfg, input_shape=[int(s) for s in input_shape])
    return BIVA(cfg) if cfg.type == "biva" else HierarchicalVAE(cfg)


__all__ = ["BIVA", "PRIOR_MODE", "SAMPLE", "HierarchicalModel", "HierarchicalVAE", "Model",
           "ModelOutput", "Precomputed", "build_model",
           "lk_modes"]
