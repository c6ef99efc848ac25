"""Likelihood Regret, batched (hvae_dist.estimators.likelihood_regret): B per-example refits at once equal
the original's one-at-a-time loop, in float64 on a tiny Gaussian VAE and in float32 on the HVAE; with no
refit step the bound is the stored ELBO."""
from __future__ import annotations

import math

import pytest
import torch

from helpers.models import preset_model_config
from hvae_dist.errors import ConfigError
from hvae_dist.estimators.likelihood_regret import (
    LikelihoodRegret,
    RegretSettings,
    encoder_names,
    refit_batched,
    refit_loop,
)
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import build_model

D, Z = 12, 3


def _toy(seed: int = 0):
    """A float64 VAE: Gaussian encoder x -> (mu, log var) (refit), Bernoulli decoder z -> logits (frozen)."""
    g = torch.Generator().manual_seed(seed)
    enc = {"w": torch.randn(2 * Z, D, generator=g, dtype=torch.float64) * 0.3,
           "b": torch.zeros(2 * Z, dtype=torch.float64)}
    dec = torch.randn(D, Z, generator=g, dtype=torch.float64)

    def loss(p, x, eps):                                  # x (D,), eps [(1, Z)]: -ELBO_1 of one example
        h = p["w"] @ x + p["b"]
        mu, logvar = h[:Z], h[Z:]
        z = mu + torch.exp(0.5 * logvar) * eps[0][0]
        logits = dec @ z
        log_px = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp())
        return -(log_px - kl)

    return enc, loss


def test_batched_refit_equals_the_loop_in_float64():
    enc, loss = _toy()
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(5, D, generator=g, dtype=torch.float64) > 0.5).double()
    noise = [[torch.randn(5, Z, generator=g, dtype=torch.float64)] for _ in range(30)]
    st = RegretSettings(steps=30, lr=1e-2)
    batched = refit_batched(loss, enc, x, lambda t: noise[t], st)
    loop = refit_loop(loss, enc, x, lambda t: noise[t], st)
    for n in enc:
        assert batched[n].shape == (5, *enc[n].shape)
        torch.testing.assert_close(batched[n], loop[n], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(batched[n][0], enc[n])                    # the refit moved the parameters
        assert not torch.allclose(batched[n][0], batched[n][1])             # ... differently per example


@pytest.fixture(scope="module")
def hvae():
    torch.manual_seed(0)
    model = build_model(preset_model_config("tiny", "vae", input_shape=[1, 28, 28])).eval()
    scorer = IWScorer(model, ScoreSettings(iw_samples=8, ks=[1], sample_chunk=4))
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    return scorer, x, torch.tensor([4, 0, 9])


def test_hvae_batched_equals_loop_and_zero_steps_is_the_elbo(hvae):
    scorer, x, idx = hvae
    st = RegretSettings(steps=3)
    batched = LikelihoodRegret(scorer, st).elbo_refit(x, idx, "A/test")
    loop = LikelihoodRegret(scorer, st, batched=False).elbo_refit(x, idx, "A/test")
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-3)          # float32 network
    elbo = torch.from_numpy(scorer.score_batch(x, idx, "A/test")["elbo"])
    none = LikelihoodRegret(scorer, RegretSettings(steps=0)).elbo_refit(x, idx, "A/test")
    torch.testing.assert_close(none, elbo, rtol=1e-6, atol=1e-3)             # same noise as the stored bound
    assert not torch.allclose(batched, elbo)
    assert all(math.isfinite(v) for v in batched.tolist())


def test_one_example_does_not_depend_on_the_batch(hvae):
    scorer, x, idx = hvae
    st = RegretSettings(steps=2)
    both = LikelihoodRegret(scorer, st).elbo_refit(x, idx, "A/test")
    one = LikelihoodRegret(scorer, st).elbo_refit(x[1:2], idx[1:2], "A/test")
    torch.testing.assert_close(one, both[1:2], rtol=1e-5, atol=1e-3)


def test_encoder_is_the_inference_path_and_bad_settings_raise(hvae):
    scorer, _, _ = hvae
    names = encoder_names(scorer.model)
    assert any(n.startswith("encoders.") for n in names) and any(".posterior." in n for n in names)
    assert not any(n.startswith(("decoders.", "likelihood.")) or ".prior." in n for n in names)
    with pytest.raises(ConfigError, match="--lr-steps"):
        LikelihoodRegret(scorer, RegretSettings(steps=-1))
