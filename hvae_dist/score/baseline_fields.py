"""The baselines' per-example fields of a score file (`hvae score --likelihood-regret`, `--gradients`).

    field              shape    meaning (float64, one row per example, nats where a bound)
    elbo_refit         (N,)     IW ELBO_S after Likelihood Regret's per-example encoder refit, the noise of elbo
    likelihood_regret  (N,)     elbo_refit - elbo: Likelihood Regret (Xiao et al. 2020); higher = more OOD
    grad_norm          (N, G)   ||d ELBO_1 / d theta_l||_2 per layer l (Bergamin et al. 2022), G = len(grad_layers)

Root attributes (identity: a resumed shard and a merge must agree on them; present only when the fields are):

    likelihood_regret  JSON {"steps", "lr", "betas", "weight_decay"} (estimators.likelihood_regret.RegretSettings)
    gradients          JSON {"samples", "layers": [layer names, the columns of grad_norm]}

A value depends only on (seed, dataset, index), as every field, so shards equal one unsharded job. How the
values are computed: hvae_dist.estimators.likelihood_regret and hvae_dist.estimators.gradients.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from torch import Tensor

from hvae_dist.estimators.gradients import GradientSettings, PerExampleGradients
from hvae_dist.estimators.likelihood_regret import LikelihoodRegret, RegretSettings

FIELDS = {
    "elbo_refit": "IW ELBO_S after the per-example encoder refit of Likelihood Regret, nats",
    "likelihood_regret": "elbo_refit - elbo, nats (Likelihood Regret; higher = more OOD)",
    "grad_norm": "(N, G) per-layer L2 norm of the gradient of ELBO_1 (columns: attrs gradients.layers)",
}
"""Field -> what it holds (the documented names; README and DESIGN list them)."""
ATTRS = ("likelihood_regret", "gradients")


class BaselineFields:
    """What `hvae score` adds for --likelihood-regret / --gradients: shapes, root attributes and values."""

    def __init__(self, scorer, regret: RegretSettings | None, gradients: GradientSettings | None):
        self.regret = LikelihoodRegret(scorer, regret) if regret is not None else None
        self.grads = PerExampleGradients(scorer, gradients) if gradients is not None else None

    def attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.regret is not None:
            out["likelihood_regret"] = {**asdict(self.regret.st), "betas": list(self.regret.st.betas)}
        if self.grads is not None:
            out["gradients"] = {"samples": self.grads.st.samples, "layers": self.grads.layers}
        return out

    def shapes(self, n: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        out: dict[str, tuple[tuple[int, ...], Any]] = {}
        if self.regret is not None:
            out["elbo_refit"] = ((n,), np.float64)
            out["likelihood_regret"] = ((n,), np.float64)
        if self.grads is not None:
            out["grad_norm"] = ((n, len(self.grads.layers)), np.float64)
        return out

    def values(self, images: Tensor, indices: Tensor, group: str, elbo: np.ndarray) -> dict[str, np.ndarray]:
        """The fields of B examples (images uint8 (B, C, H, W), indices (B,)); `elbo` their stored IW ELBO."""
        out: dict[str, np.ndarray] = {}
        if self.regret is not None:
            refit = self.regret.elbo_refit(images, indices, group).cpu().numpy()
            out["elbo_refit"] = refit
            out["likelihood_regret"] = refit - elbo
        if self.grads is not None:
            out["grad_norm"] = self.grads.grad_norm(images, indices, group).cpu().numpy()
        return out
