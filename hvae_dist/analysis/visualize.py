"""Look inside a model: `hvae visualize` draws the reconstruction grid of `hvae_dist.estimators.reconstructions`
(one row per example, the first `examples` of each dataset one below the other; columns: the input, the
L>k decode for k = 0 .. L-1, prior samples at temperatures) with its column and dataset labels.

With the low latents decoded from the prior, the reconstructions of in-distribution and OOD examples
alike keep the high-level content while the low-level detail is the model's own: the paper's argument
for why the lower latents are what makes the likelihood fail for OOD detection.
"""
from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hvae_dist.estimators.reconstructions import DEFAULT_TEMPERATURES, ReconstructionGrid, reconstruction_grid
from hvae_dist.files import write_bytes_atomic


def grid_figure(grid: ReconstructionGrid, title: str = ""):
    """A matplotlib Figure of the grid with the column labels on top and the dataset of each row block left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = grid.image.permute(1, 2, 0).numpy()                              # H', W', C
    rows, cols, _, h, w = grid.cells.shape
    # Constrained layout sizes the margins to the labels (a fixed axes box cut "ST-inverted/test" at the left).
    fig = Figure(figsize=(max(4.0, 0.75 * cols + 1.5), max(3.0, 0.75 * rows + 1.0)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
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
    """Save the labelled grid as a PNG (rendered in memory with a tight box, so that a label longer than the
    figure is wide still shows whole; then `files.write_bytes_atomic`)."""
    buf = io.BytesIO()
    grid_figure(grid, title).savefig(buf, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.08)
    return write_bytes_atomic(path, buf.getvalue())


__all__ = ["DEFAULT_TEMPERATURES", "ReconstructionGrid", "grid_figure", "reconstruction_grid", "visualize_run",
           "write_grid_png"]


def visualize_run(run_dir: str | Path, datasets: Sequence[str], out: str | Path | None = None, examples: int = 8,
                  temperatures: Sequence[float] = DEFAULT_TEMPERATURES, seed: int = 0, checkpoint: str | None = None,
                  use_ema: bool = True, data_root: str | None = None) -> Path:
    """`hvae visualize`: the grid of a run's checkpoint for `datasets` (NAME:SPLIT), written to
    OUT/reconstructions.png (OUT defaults to RUN_DIR/visualize). Returns the PNG's path."""
    from hvae_dist.checkpoint import load_for_eval
    from hvae_dist.config import check_int_range
    from hvae_dist.data import check_image_shape, open_dataset, parse_specs
    from hvae_dist.errors import ConfigError

    if examples < 1:
        raise ConfigError(f"--examples must be >= 1, got {examples}")
    check_int_range("--seed", seed)
    bad = [t for t in temperatures if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise ConfigError(f"--temperatures {' '.join(map(str, bad))}: each temperature scales the prior's standard "
                          "deviation, so give finite numbers >= 0 (0: the prior modes)")
    model, cfg, ckpt, step = load_for_eval(run_dir, checkpoint, use_ema)
    images = {}
    for spec in parse_specs(datasets):
        ds = open_dataset(spec, data_root or cfg.data.root, False, max_examples=examples)
        check_image_shape(f"dataset {spec}", ds.shape, model.input_shape, "the model takes")
        images[spec.group] = np.asarray(ds.images)
    grid = reconstruction_grid(model, images, cfg.data.binarize, seed, temperatures)
    target = Path(out) if out else Path(run_dir) / "visualize"
    title = f"{Path(run_dir).name}: {cfg.model.type}, {Path(ckpt).name} (step {step})"
    return write_grid_png(grid, target / "reconstructions.png", title)
