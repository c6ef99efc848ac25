"""The reconstruction grid: the L>k decode paths of the scorer, and prior samples, as images.

Used by `hvae visualize` (hvae_dist.analysis.visualize, which draws and labels it) and by the training
monitor (TensorBoard at every evaluation). Columns, for one row per example:

    0            the input x as the model sees it (binarized / dequantized like the scorer does)
    1 + k        k = 0 .. L-1: the likelihood mean of the L>k decode path: layers 1..k from their
                 conditional-prior mode, the layers above from the posterior (one sample, the scorer's
                 noise for that example); k = 0 is the ordinary posterior reconstruction
    1 + L + j    a prior sample at temperatures[j] (the standard deviation of every prior draw scaled
                 by it; 0 decodes every layer from its prior mode); row r shows the same base noise at
                 every temperature
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hvae_dist.estimators import noise as noise_mod
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import lk_modes

DEFAULT_TEMPERATURES = (0.5, 0.8, 1.0)


@dataclass
class ReconstructionGrid:
    """cells: (rows, columns, C, H, W) float32 in [0, 1]; the labels say what each row block and column is."""

    cells: Tensor
    columns: list[str]
    row_groups: list[tuple[str, int]]       # (dataset group, number of rows), top to bottom

    @property
    def image(self) -> Tensor:
        """The grid as one (C, rows*H + gaps, columns*W + gaps) image (torchvision make_grid, 2-pixel gaps)."""
        from torchvision.utils import make_grid

        rows, cols = self.cells.shape[:2]
        return make_grid(self.cells.flatten(0, 1), nrow=cols, padding=2, pad_value=1.0)


@torch.no_grad()
def reconstruction_grid(model, images: dict[str, np.ndarray], binarize: str, seed: int = 0,
                        temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                        device: torch.device | str = "cpu") -> ReconstructionGrid:
    """The grid of the module docstring. `images`: dataset group ("Name/split") -> uint8 (n, C, H, W), the
    dataset's first n examples (positions 0..n-1, which key the noise as in `hvae score --seed`)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    scorer = IWScorer(model, ScoreSettings(iw_samples=1, ks=[], seed=seed, binarize=binarize), device)
    num_layers, rows = model.num_layers, []
    for group, imgs in images.items():
        idx = torch.arange(len(imgs), device=device)
        x = scorer.preprocess(torch.from_numpy(np.array(imgs)).to(device), group, idx)
        keys = noise_mod.example_keys(seed, group, noise_mod.bound_stream(0), idx)
        eps = noise_mod.normal_noise(keys, 0, 1, model.latent_shapes, list(range(num_layers)))
        cols = [x.float()]
        for k in range(num_layers):
            out = model(x, modes=lk_modes(k, num_layers), noise=eps)
            cols.append(model.likelihood.mean(out.params).float())
        rows.append(torch.stack(cols, dim=1))                              # n, 1 + L, C, H, W
    cells = torch.cat(rows)                                                # R, 1 + L, C, H, W
    samples = []
    for t in temperatures:
        g = torch.Generator(device=device).manual_seed(seed)
        samples.append(model.sample_prior(cells.shape[0], device=device, generator=g, temperature=float(t)).float())
    if samples:
        cells = torch.cat([cells, torch.stack(samples, dim=1)], dim=1)
    model.train(was_training)
    columns = ["input"] + [f"L>{k}" if k else "posterior" for k in range(num_layers)] + [f"T={t:g}" for t in temperatures]
    return ReconstructionGrid(cells.cpu().clamp(0, 1), columns, [(g, len(v)) for g, v in images.items()])
