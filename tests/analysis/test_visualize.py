"""`hvae visualize`: the reconstruction grid's layout and its columns' meaning, for every model type."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.score import build, make_run_dir, small_config
from hvae_dist.analysis.visualize import reconstruction_grid
from hvae_dist.cli import main as hvae
from hvae_dist.estimators import noise as noise_mod
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import PRIOR_MODE


def _config(model_type: str) -> dict:
    cfg = small_config()
    cfg["model"]["type"] = model_type
    return cfg


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("model_type", ["vae", "lvae", "biva"])
def test_grid_layout_input_column_and_posterior_column(model_type):
    model, cfg = build(_config(model_type))
    images = {"A/test": _images(3, 0), "B/test": _images(2, 1)}
    grid = reconstruction_grid(model, images, cfg.data.binarize, seed=5, temperatures=(0.0, 1.0))
    num_layers = model.num_layers
    assert grid.cells.shape == (5, 1 + num_layers + 2, 1, 28, 28)
    assert grid.columns == ["input", "posterior", "L>1", "L>2", "T=0", "T=1"]
    assert grid.row_groups == [("A/test", 3), ("B/test", 2)]
    # Column 0 is the input as the scorer preprocesses it; column 1 is the likelihood mean of a posterior
    # forward with the scorer's noise for those examples (bound stream 0, sample 0).
    scorer = IWScorer(model, ScoreSettings(iw_samples=1, ks=[], seed=5, binarize=cfg.data.binarize))
    x = scorer.preprocess(torch.from_numpy(images["B/test"]), "B/test", torch.arange(2))
    eps = noise_mod.normal_noise(noise_mod.example_keys(5, "B/test", noise_mod.bound_stream(0), torch.arange(2)),
                                 0, 1, model.latent_shapes, list(range(num_layers)))
    with torch.no_grad():
        want = model.likelihood.mean(model(x, noise=eps).params)
    assert torch.equal(grid.cells[3:, 0], x)
    assert torch.equal(grid.cells[3:, 1], want)
    # The L>k columns differ from the posterior reconstruction; the image has 2-pixel gaps between cells.
    assert not torch.equal(grid.cells[:, 1], grid.cells[:, 3])
    assert tuple(grid.image.shape) == (3, 2 + 5 * 30, 2 + (3 + num_layers) * 30)


@pytest.mark.parametrize("model_type", ["vae", "biva"])
def test_temperature_zero_is_the_prior_mode_decode(model_type):
    model, cfg = build(_config(model_type))
    grid = reconstruction_grid(model, {"A/test": _images(2, 0)}, cfg.data.binarize, temperatures=(0.0,))
    # Every layer from its conditional-prior mode: the forward with every layer in prior mode (no data used).
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 28, 28), modes=[PRIOR_MODE] * model.num_layers)
        want = model.likelihood.mean(out.params)
    torch.testing.assert_close(grid.cells[:, -1], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(grid.cells[0, -1], grid.cells[1, -1], rtol=0, atol=1e-6)   # no noise in a mode


def test_cli_writes_a_labelled_png(tmp_path):
    run = make_run_dir(tmp_path / "run", _config("vae"))
    assert hvae(["visualize", "--run-dir", str(run), "--datasets", "FashionMNIST:test", "MNIST:test",
                 "--examples", "3", "--out", str(tmp_path / "v")]) == 0
    with Image.open(tmp_path / "v" / "reconstructions.png") as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 200
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20     # images and labels, not a blank canvas
    assert hvae(["visualize", "--run-dir", str(run), "--datasets", "FashionMNIST:test", "--examples", "0"]) == 2


def _texts_inside_the_figure(fig) -> list[str]:
    """The texts (titles, tick labels, legends) drawn outside the figure's canvas after layout: none, or the
    PNG would cut them. Only drawn artists count (Figure.get_tightbbox skips ticks outside the view)."""
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    box, canvas = fig.get_tightbbox(renderer), fig.bbox_inches
    tol = 0.01                                                                      # inches
    if (box.x0 >= canvas.x0 - tol and box.y0 >= canvas.y0 - tol and box.x1 <= canvas.x1 + tol
            and box.y1 <= canvas.y1 + tol):
        return []
    return [f"drawn in {box.bounds}, canvas {canvas.bounds} (inches)"]


def test_long_row_labels_and_the_title_are_not_clipped_and_the_title_has_the_step(tmp_path, monkeypatch):
    from hvae_dist.analysis.visualize import grid_figure

    model, cfg = build(_config("vae"))
    grid = reconstruction_grid(model, {"ST-inverted/test": _images(2, 0), "FashionMNIST-28x28/validation":
                                       _images(2, 1)}, cfg.data.binarize, seed=0, temperatures=(1.0,))
    assert _texts_inside_the_figure(grid_figure(grid, "run: vae, latest.pt (step 222)")) == []
    run = make_run_dir(tmp_path / "run", _config("vae"), step=222)
    import hvae_dist.analysis.visualize as visualize

    titles = []
    monkeypatch.setattr(visualize, "grid_figure", lambda g, title="": titles.append(title) or grid_figure(g, title))
    assert hvae(["visualize", "--run-dir", str(run), "--datasets", "FashionMNIST:test", "--examples", "1",
                 "--out", str(tmp_path / "v")]) == 0
    assert titles == ["run: vae, latest.pt (step 222)"]
