"""Likelihood Regret (Xiao, Yan and Amit, NeurIPS 2020), batched: B examples refit at once, each with its own
copy of the encoder.

The original (XavierXiao/Likelihood-Regret, compute_LR.py) scores one test image at a time: it copies the
encoder, takes `num_iter` = 100 Adam steps (lr 2e-4, betas (0.9, 0.999), weight decay 5e-5, batch size 1) on
the single-sample negative ELBO of that image (a fresh posterior sample per step; the decoder frozen), and
reports the regret NLL_before - NLL_after, each an importance-weighted bound over 1000 samples (5 x 200).
Its paper says the procedure cannot be batched. Here it is, exactly: the encoder's parameters are stacked
along a new leading axis (B copies), one forward pass runs `torch.func.vmap(functional_call(model, ...))`
over (parameters_b, x_b, noise_b), and the gradient of the sum of the B losses w.r.t. the stacked tensors is
each example's own gradient (example b's loss depends only on copy b). Adam and weight decay act elementwise,
so one `torch.optim.Adam` over the stacked tensors is B independent optimisers with the same step count:
the same arithmetic as the one-at-a-time loop (`refit_loop`), which the tests compare in float64.

The HVAE's encoder (what is refit) is the inference path: the bottom-up deterministic blocks (`encoders.*`),
the posterior heads (`latents.*.posterior.*`) and, in a VAE stack, the projections of z into the next
stage's inference (`latents.*.project_up.*`); the generative path (decoders, priors, project_down,
likelihood) is frozen, as the original freezes netG. The loss is -ELBO_1 = -(log p(x|z) - sum_i KL_i) with
one posterior sample per step; the bound after the refit is the IW ELBO_S with the noise of the stored ELBO
(`noise.bound_stream(0)`, samples 0..S-1), so `likelihood_regret = elbo_refit - elbo` compares the two
bounds with common random numbers (the original draws independent samples for each). Noise of step t is
sample t of stream `REFIT_STREAM`: a value depends on (seed, dataset, index) only, as every score.
Higher regret = more OOD (nats).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from hvae_dist.errors import ConfigError
from hvae_dist.estimators import noise as noise_mod
from hvae_dist.objectives import StreamingLogMeanExp

REFIT_STREAM = 1 << 20
"""Noise stream of the refit's per-step posterior samples (far above the bound streams 1 + k)."""
ENCODER_PREFIXES = ("encoders.",)
ENCODER_PARTS = (".posterior.", ".project_up.")


@dataclass(frozen=True)
class RegretSettings:
    """The refit of the original compute_LR.py (defaults as there)."""

    steps: int = 100
    """Adam steps per example (compute_LR.py --num_iter 100)."""
    lr: float = 2e-4
    """Adam learning rate (compute_LR.py --lr 2e-4)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (compute_LR.py --beta1 0.9, beta2 PyTorch's 0.999)."""
    weight_decay: float = 5e-5
    """Adam's L2 weight decay (compute_LR.py: weight_decay=5e-5)."""

    def check(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"--lr-steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"Likelihood Regret learning rate must be > 0, got {self.lr}")


def encoder_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters of the inference path (what Likelihood Regret refits; see the module)."""
    names = [n for n, _ in model.named_parameters()
             if n.startswith(ENCODER_PREFIXES) or any(part in n for part in ENCODER_PARTS)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no encoder parameters named {ENCODER_PREFIXES} or "
                          f"*{ENCODER_PARTS}: Likelihood Regret supports the vae / lvae stacks")
    return names


LossFn = Callable[[dict[str, Tensor], Tensor, list[Tensor]], Tensor]
"""(parameters of one example, x (C, H, W), noise per layer (1, *event)) -> scalar loss of that example."""


def _adam(params: list[Tensor], st: RegretSettings) -> torch.optim.Adam:
    # foreach=False: the same per-tensor arithmetic for the stacked tensors and the loop's single copies
    return torch.optim.Adam(params, lr=st.lr, betas=st.betas, weight_decay=st.weight_decay, foreach=False)


def refit_batched(loss_fn: LossFn, params: dict[str, Tensor], x: Tensor, noise: Callable[[int], list[Tensor]],
                  st: RegretSettings) -> dict[str, Tensor]:
    """B per-example refits at once. params: the shared starting values; x: (B, C, H, W); noise(t): the
    per-layer noise of step t, each (B, *event). Returns the refit parameters stacked, each (B, *shape)."""
    batch = x.shape[0]
    stacked = {n: p.detach().unsqueeze(0).repeat(batch, *[1] * p.dim()).requires_grad_() for n, p in params.items()}
    opt = _adam(list(stacked.values()), st)
    per_example = vmap(lambda p, xb, eps: loss_fn(p, xb, [e.unsqueeze(0) for e in eps]), randomness="error")
    for t in range(st.steps):
        loss = per_example(stacked, x, noise(t)).sum()      # example b's loss depends on copy b only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in stacked.items()}


def refit_loop(loss_fn: LossFn, params: dict[str, Tensor], x: Tensor, noise: Callable[[int], list[Tensor]],
               st: RegretSettings) -> dict[str, Tensor]:
    """The original's one-at-a-time refit (a fresh copy and optimiser per example); same result as
    `refit_batched`, for the tests and the benchmark's baseline."""
    out: dict[str, list[Tensor]] = {n: [] for n in params}
    steps_noise = [noise(t) for t in range(st.steps)]
    for b in range(x.shape[0]):
        copy = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        opt = _adam(list(copy.values()), st)
        for t in range(st.steps):
            loss = loss_fn(copy, x[b], [e[b:b + 1] for e in steps_noise[t]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for n, p in copy.items():
            out[n].append(p.detach())
    return {n: torch.stack(v) for n, v in out.items()}


class LikelihoodRegret:
    """Likelihood Regret of a HierarchicalVAE through an IWScorer (its settings, device, preprocessing)."""

    def __init__(self, scorer, settings: RegretSettings, batched: bool = True):
        settings.check()
        self.scorer, self.st, self.batched = scorer, settings, batched
        self.model = scorer.model
        self.names = encoder_names(self.model)
        self.frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in self.names}
        self.start = {n: p.detach() for n, p in self.model.named_parameters() if n in self.names}

    def _log_weights(self, params: dict[str, Tensor], x: Tensor, eps: list[Tensor]) -> Tensor:
        """log p(x|z) - sum KL for one example: x (C, H, W) repeated over the rows of eps (R, *event)."""
        rows = eps[0].shape[0]
        out = functional_call(self.model, {**self.frozen, **params},
                              kwargs={"x": x.unsqueeze(0).expand(rows, *x.shape), "noise": eps})
        return out.log_px - out.kl.sum(1)                                       # R

    def _loss(self, params: dict[str, Tensor], x: Tensor, eps: list[Tensor]) -> Tensor:
        return -self._log_weights(params, x, eps).sum()                         # -ELBO_1, one sample

    def _noise(self, keys: Tensor) -> Callable[[int], list[Tensor]]:
        """noise(t): the posterior noise of refit step t, each (B, *event), of example keys (B,)."""
        shapes = self.model.latent_shapes
        return lambda t: noise_mod.normal_noise(keys, t, 1, shapes)

    def elbo_refit(self, x_uint8: Tensor, indices: Tensor, dataset: str) -> Tensor:
        """(B,) float64 IW ELBO_S after each example's refit (nats), S = the scorer's iw_samples, the noise of
        the stored elbo. Likelihood Regret = this - elbo."""
        sc = self.scorer
        x_uint8, indices = x_uint8.to(sc.device), indices.to(sc.device, torch.int64)
        x = sc.preprocess(x_uint8, dataset, indices)
        refit_keys = noise_mod.example_keys(sc.settings.seed, dataset, REFIT_STREAM, indices)
        refit = refit_batched if self.batched else refit_loop
        with torch.enable_grad():
            params = refit(self._loss, self.start, x, self._noise(refit_keys), self.st)
        return self.bound(params, x, dataset, indices)

    @torch.no_grad()
    def bound(self, params: dict[str, Tensor], x: Tensor, dataset: str, indices: Tensor) -> Tensor:
        """(B,) float64 IW ELBO_S with per-example parameters `params` (each (B, *shape)), chunked over samples."""
        sc, batch = self.scorer, x.shape[0]
        keys = noise_mod.example_keys(sc.settings.seed, dataset, noise_mod.bound_stream(0), indices)
        red = StreamingLogMeanExp()
        chunk = sc.chunk_for(batch)
        per_example = vmap(self._log_weights, randomness="error")
        for s0 in range(0, sc.settings.iw_samples, chunk):
            c = min(chunk, sc.settings.iw_samples - s0)
            eps = [e.view(batch, c, *e.shape[1:]) for e in noise_mod.normal_noise(keys, s0, c, self.model.latent_shapes)]
            red.update(per_example(params, x, eps).float())                     # B, C
        return red.result()
