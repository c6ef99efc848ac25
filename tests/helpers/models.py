"""Model helpers shared by the tests: small versions of the preset architectures, seeded noise."""
from __future__ import annotations

import copy

import torch

from hvae_dist.config import config_from_dict, read_config_source


def preset_model_config(preset: str, model_type: str = "vae", channels: int | None = None,
                        likelihood: str | None = None, input_shape=None):
    """The ModelConfig of `preset` with its stage structure intact (blocks, kernels, strides, latents),
    optionally with every block's out_channels shrunk to `channels` so that CPU tests stay fast."""
    data = copy.deepcopy(read_config_source(preset))
    model = data["model"]
    model["type"] = model_type
    if channels is not None:
        for stage in model["config_deterministic"]:
            for block in stage:
                block["out_channels"] = channels
    if likelihood is not None:
        model["likelihood"] = likelihood
        data["data"]["binarize"] = "dynamic" if likelihood == "bernoulli" else "none"
    if input_shape is not None:
        model["input_shape"] = list(input_shape)
    return config_from_dict(data).model


def standard_noise(model, batch: int, seed: int) -> list[torch.Tensor]:
    """One standard-normal tensor per latent layer, (batch, *event_shape_i), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for shape in model.latent_shapes]
