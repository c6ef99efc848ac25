"""Look inside a model: reconstructions per latent layer and prior samples at several temperatures.

The grid of `hvae visualize` (and of the training monitor's TensorBoard image) has one row per example
(the first `examples` of each dataset, datasets one below the other) and these columns:

    0            the input x as the model sees it (binarized / dequantized like the scorer does)
    1 + k        k = 0 .. L-1: the likelihood mean of the L>k decode path: layers 1..k from their
                 conditional-prior mode, the layers above from the posterior (one sample, the scorer's
                 noise for that example); k = 0 is the ordinary posterior reconstruction
    1 + L + j    a prior sample at temperatures[j] (the standard deviation of every prior draw scaled
                 by it; 0 decodes every layer from its prior mode); row r shows the same base noise at
                 every temperature

With the low latents decoded from the prior, the reconstructions of in-distribution and OOD examples
alike keep the high-level content while the low-level detail is the model's own: the paper's argument
for why the lower latents are what makes the likelihood fail for OOD detection.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hvae_dist.model import lk_modes
from hvae_dist.score import noise as noise_mod
from hvae_dist.score.scorer import IWScorer, ScoreSettings

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


def grid_figure(grid: ReconstructionGrid, title: str = ""):
    """A matplotlib Figure of the grid with the column labels on top and the dataset of each row block left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = grid.image.permute(1, 2, 0).numpy()                              # H', W', C
    rows, cols, _, h, w = grid.cells.shape
    fig = Figure(figsize=(max(4.0, 0.75 * cols + 1.5), max(3.0, 0.75 * rows + 1.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.14, 0.02, 0.84, 0.88])
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([2 + c * (w + 2) + w / 2 for c in range(cols)], grid.columns, rotation=45, fontsize=8)
    ax.xaxis.tick_top()
    starts = np.cumsum([0] + [n for _, n in grid.row_groups])
    ax.set_yticks([2 + (a + b) / 2 * (h + 2) for a, b in itertools.pairwise(starts)],
                  [g for g, _ in grid.row_groups], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def write_grid_png(grid: ReconstructionGrid, path: str | Path, title: str = "", dpi: int = 120) -> Path:
    """Save the labelled grid as a PNG (written to a temp file beside `path`, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        grid_figure(grid, title).savefig(tmp, dpi=dpi, format="png")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["DEFAULT_TEMPERATURES", "ReconstructionGrid", "grid_figure", "reconstruction_grid", "write_grid_png"]


def visualize_run(run_dir: str | Path, datasets: Sequence[str], out: str | Path | None = None, examples: int = 8,
                  temperatures: Sequence[float] = DEFAULT_TEMPERATURES, seed: int = 0, checkpoint: str | None = None,
                  use_ema: bool = True, data_root: str | None = None) -> Path:
    """`hvae visualize`: the grid of a run's checkpoint for `datasets` (NAME:SPLIT), written to
    OUT/reconstructions.png (OUT defaults to RUN_DIR/visualize). Returns the PNG's path."""
    from hvae_dist.checkpoint import load_model_for_eval
    from hvae_dist.data import get_dataset, parse_dataset_spec
    from hvae_dist.errors import ConfigError
    from hvae_dist.score.layout import group_name

    if examples < 1:
        raise ConfigError(f"--examples must be >= 1, got {examples}")
    model, cfg, ckpt = load_model_for_eval(run_dir, checkpoint, use_ema)
    images = {}
    for spec in datasets:
        name, split = parse_dataset_spec(spec)
        ds = get_dataset(name, split, data_root or cfg.data.root, False, examples)
        if ds.shape != tuple(model.input_shape):
            raise ConfigError(f"dataset {name}:{split} has images of shape {ds.shape} but the model takes "
                              f"{tuple(model.input_shape)}")
        images[group_name(f"{name}:{split}")] = np.asarray(ds.images)
    grid = reconstruction_grid(model, images, cfg.data.binarize, seed, temperatures)
    target = Path(out) if out else Path(run_dir) / "visualize"
    title = f"{Path(run_dir).name}: {cfg.model.type}, {Path(ckpt).name}"
    return write_grid_png(grid, target / "reconstructions.png", title)
