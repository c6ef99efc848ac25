"""Per-example gradients (hvae_dist.estimators.gradients): vmap(grad) equals a loop of single backward passes,
layers group each module's parameters, and a row does not depend on its batch."""
from __future__ import annotations

import pytest
import torch

from helpers.models import preset_model_config
from hvae_dist.errors import ConfigError
from hvae_dist.estimators.gradients import GradientSettings, PerExampleGradients, layer_groups
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import build_model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(preset_model_config("tiny", "vae", input_shape=[1, 28, 28])).eval()
    scorer = IWScorer(model, ScoreSettings(iw_samples=4, ks=[1]))
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    return scorer, x, torch.tensor([2, 7, 5])


def test_per_example_gradients_equal_single_backward_passes(setup):
    scorer, x_uint8, idx = setup
    pg = PerExampleGradients(scorer, GradientSettings(samples=2))
    x = scorer.preprocess(x_uint8, "A/test", idx)
    eps = pg.noise("A/test", idx)
    grads = pg.per_example(x, eps)
    model = scorer.model
    for b in range(3):
        model.zero_grad(set_to_none=True)
        out = model(x[b:b + 1].expand(2, *x.shape[1:]), noise=[e[b] for e in eps])
        (out.log_px - out.kl.sum(1)).mean().backward()
        # float32 sums: compared at the scale of the example's whole gradient (some entries are zero in exact
        # arithmetic, e.g. d/dv of a weight-normed 1x1 conv with one input channel, and rounding noise in both)
        scale = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
        for n, p in model.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[n][b], want, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, n=n, b=b: f"{n}, example {b}: {m}")
    norms = pg.norms(grads)
    assert norms.shape == (3, len(pg.layers)) and norms.dtype == torch.float64
    torch.testing.assert_close(pg.grad_norm(x_uint8, idx, "A/test"), norms)
    torch.testing.assert_close(pg.grad_norm(x_uint8[1:2], idx[1:2], "A/test"), norms[1:2], rtol=1e-5, atol=1e-6)


def test_layers_hold_each_module_parameters_once(setup):
    scorer, _, _ = setup
    groups = layer_groups(scorer.model)
    names = [n for names in groups.values() for n in names]
    assert sorted(names) == sorted(n for n, _ in scorer.model.named_parameters())
    wn = [layer for layer, ps in groups.items() if any("parametrizations" in p for p in ps)]
    assert wn and all(len(groups[layer]) >= 2 for layer in wn)          # g and v (and bias) in one layer
    with pytest.raises(ConfigError, match="--grad-samples"):
        PerExampleGradients(scorer, GradientSettings(samples=0))
