"""BIVA's importance-weighted bound against an exact log p(x): a two-stage BIVA with 1-d latents (z_1^BU,
z_1^TD, z_2) on 1x4x4 Bernoulli images, where log p(x) is a 3-d integral computed on a grid in float64."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from helpers.score import build
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings


def _block() -> dict:
    return {"block": "ResBlockConv2d", "out_channels": 4, "kernel_size": 3, "stride": 1, "weightnorm": True,
            "gated": False}


def _exact_biva():
    config = {
        "model": {"type": "biva", "likelihood": "bernoulli", "input_shape": [1, 4, 4],
                  "config_deterministic": [[_block()], [_block()]],
                  "config_stochastic": [{"block": "GaussianDense", "latent_features": 1, "weightnorm": True}] * 2},
        "data": {"dataset": "FashionMNIST", "binarize": "static"},
        "train": {"seed": 0},
    }
    model, _ = build(config, seed=3)
    with torch.no_grad():   # posteriors wider than the true ones (finite weight variance), a sharper likelihood
        for lat in (model.lat_bu[0], model.lat_td[0], model.top):
            lat.posterior.bias[1:] += 1.0
        model.likelihood.head.parametrizations.weight.original0.mul_(3.0)
    return model


@torch.no_grad()
def _exact_log_px(model, x: torch.Tensor, top_points: int = 161, inner_points: int = 61) -> np.ndarray:
    """log of the integral of p(x | z) p(z_1^BU | z_2) p(z_1^TD | z_2) N(z_2; 0, 1) over (z_1^BU, z_1^TD, z_2).

    z_2 on a grid over [-7, 7]; given z_2, the two conditional priors are Gaussians, so z_1 = loc + scale * e
    with e on a grid over [-7, 7]^2 weighted by N(e; 0, I) (a change of variables: no prior density term).
    """
    m = model.double()
    g2 = torch.linspace(-7, 7, top_points, dtype=torch.float64)
    ge = torch.linspace(-7, 7, inner_points, dtype=torch.float64)
    e = torch.cartesian_prod(ge, ge)                                              # E, 2
    log_w_e = -0.5 * (e ** 2).sum(1) - math.log(2 * math.pi) + 2 * math.log(ge[1] - ge[0])
    log_w_2 = -0.5 * g2 ** 2 - 0.5 * math.log(2 * math.pi) + math.log(g2[1] - g2[0])
    xs = x.double().flatten(1)                                                     # B, D
    per_z2 = []
    for z2, lw2 in zip(g2, log_w_2):
        t = m.decoders[1](m.top.down(z2.view(1, 1)))                               # 1, C, H, W
        p_bu, p_td = m.lat_bu[0].p(t), m.lat_td[0].p(t)
        zb = p_bu.loc + p_bu.scale * e[:, :1]                                      # E, 1
        zt = p_td.loc + p_td.scale * e[:, 1:]
        u = t + m.lat_bu[0].down(zb) + m.lat_td[0].down(zt)
        logits = m.likelihood.head(m.decoders[0](u)).flatten(1)                    # E, D
        log_lik = xs @ F.logsigmoid(logits).T + (1 - xs) @ F.logsigmoid(-logits).T  # B, E
        per_z2.append(torch.logsumexp(log_lik + log_w_e, 1) + lw2)                 # B
    model.float()
    return torch.logsumexp(torch.stack(per_z2, 1), 1).numpy()


def test_biva_iw_bound_is_below_exact_log_px_increases_with_samples_and_approaches_it():
    torch.set_num_threads(2)
    model = _exact_biva()
    x = (torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.uint8) * 255
    exact = _exact_log_px(model, (x > 127).float())
    means, last = {}, None
    for S in (1, 10, 100, 1000):
        runs = []
        for seed in range(6):
            scorer = IWScorer(model, ScoreSettings(iw_samples=S, ks=[1], seed=seed, binarize="static", sample_chunk=250))
            out = scorer.score_batch(x, torch.arange(6), "Exact/test")
            runs.append(out["elbo"])
            last = out
        means[S] = float((np.stack(runs) - exact).mean())
    assert means[1] < means[10] < means[100] < 0.02, means      # a lower bound that tightens with S
    assert means[1] < -0.5, means                                 # S matters in this model
    assert abs(means[1000]) < 0.05, means                         # and S = 1000 is nearly exact
    assert (last["elbo_1"] < exact).all()
    assert np.isfinite(last["llr"]).all() and last["kl"].shape == (6, 2)
