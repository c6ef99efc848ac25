"""Per-example gradients of the ELBO, per layer: the gradient-norm score, the score statistic and Fisher's
method of Bergamin et al. (AISTATS 2022, "Model-agnostic out-of-distribution detection using combined
statistical tests"), computed with torch.func (vmap of grad) for B examples at once.

For example x, g_l(x) = d ELBO_1(x) / d theta_l, the gradient of the single-sample ELBO (averaged over M
posterior samples, noise stream `GRAD_STREAM`, so a value depends on (seed, dataset, index) only) w.r.t. the
parameters theta_l of layer l. A layer is a module that owns parameters (a conv or dense layer: its weight,
weight-norm g and v, and bias together; `layer_groups`). The score file stores

    grad_norm (N, G)   ||g_l(x)||_2 for each of the G layers, in the order of the `grad_layers` attribute

from which `hvae analyze` (hvae_dist.analysis.baselines) computes, with the in-distribution TRAINING
split's rows as the reference:

    gradnorm     sqrt(sum_l ||g_l||^2): the norm of the whole gradient
    score_stat   sum_l ||g_l||^2 / mean_train ||g_l||^2: the score statistic g^T F^-1 g with the Fisher
                 information approximated per layer by a multiple of the identity, F_l = mean_train ||g_l||^2 / P_l
                 (Bergamin et al. use its diagonal; one value per layer is what N x G stored norms allow)
    fisher       -2 sum_l log p_l(x), p_l the upper-tail empirical p-value of ||g_l(x)|| among the training
                 rows ((1 + #{train >= x}) / (1 + n_train)): Fisher's method over the per-layer tests

All three: higher = more OOD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from hvae_dist.errors import ConfigError
from hvae_dist.estimators import noise as noise_mod

GRAD_STREAM = (1 << 20) + 1
"""Noise stream of the gradients' posterior samples."""
PARAM_SUFFIXES = (".parametrizations.weight.original0", ".parametrizations.weight.original1", ".weight", ".bias")


@dataclass(frozen=True)
class GradientSettings:
    samples: int = 1
    """M: posterior samples whose ELBO_1 the gradient is taken of (their mean)."""

    def check(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--grad-samples must be >= 1, got {self.samples}")


def layer_of(name: str) -> str:
    """The layer (module path) a parameter name belongs to, e.g. encoders.0.0.conv for its g, v and bias."""
    for suffix in PARAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0]


def layer_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Layer -> the names of its parameters, in the model's parameter order (the `grad_layers` order)."""
    groups: dict[str, list[str]] = {}
    for n, _ in model.named_parameters():
        groups.setdefault(layer_of(n), []).append(n)
    return groups


class PerExampleGradients:
    """Per-layer gradient norms of ELBO_1 for batches of examples through an IWScorer (device, preprocess)."""

    def __init__(self, scorer, settings: GradientSettings):
        settings.check()
        self.scorer, self.st, self.model = scorer, settings, scorer.model
        self.groups = layer_groups(self.model)
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}

    @property
    def layers(self) -> list[str]:
        return list(self.groups)

    def _elbo(self, params: dict[str, Tensor], x: Tensor, eps: list[Tensor]) -> Tensor:
        """Mean ELBO_1 of one example x (C, H, W) over the M samples of eps (M, *event)."""
        m = eps[0].shape[0]
        out = functional_call(self.model, params, kwargs={"x": x.unsqueeze(0).expand(m, *x.shape), "noise": eps})
        return (out.log_px - out.kl.sum(1)).mean()

    def noise(self, dataset: str, indices: Tensor) -> list[Tensor]:
        """Per-layer noise (B, M, *event) of the examples `indices`."""
        keys = noise_mod.example_keys(self.scorer.settings.seed, dataset, GRAD_STREAM, indices)
        m, batch = self.st.samples, indices.shape[0]
        return [e.view(batch, m, *e.shape[1:]) for e in noise_mod.normal_noise(keys, 0, m, self.model.latent_shapes)]

    def per_example(self, x: Tensor, eps: list[Tensor]) -> dict[str, Tensor]:
        """Parameter name -> (B, *shape) gradient of each example's mean ELBO_1 (x: model input (B, C, H, W))."""
        return vmap(grad(self._elbo), in_dims=(None, 0, 0), randomness="error")(self.params, x, eps)

    def norms(self, grads: dict[str, Tensor]) -> Tensor:
        """(B, G) float64 per-layer L2 norms of per-example gradients."""
        cols = [torch.sqrt(sum(grads[n].double().flatten(1).pow(2).sum(1) for n in names)) for names in self.groups.values()]
        return torch.stack(cols, 1)

    def grad_norm(self, x_uint8: Tensor, indices: Tensor, dataset: str) -> Tensor:
        """(B, G) float64 ||d ELBO_1 / d theta_l|| per example and layer (see the module)."""
        sc = self.scorer
        x_uint8, indices = x_uint8.to(sc.device), indices.to(sc.device, torch.int64)
        x = sc.preprocess(x_uint8, dataset, indices)
        with torch.enable_grad():
            return self.norms(self.per_example(x, self.noise(dataset, indices)))
