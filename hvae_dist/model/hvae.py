"""HierarchicalVAE: a stack of stages, each a list of residual blocks and one Gaussian latent layer.

Layers are numbered bottom-up, i = 1 .. L (index 0 .. L-1 in code). Let d_i be the deterministic
bottom-up features of stage i (d_0 = x mapped to [-1, 1]) and t_i the top-down features of the
generative path at the same resolution.

VAE stage (bottom-up inference, skip connections between latents):
    d_i = Enc_i(h_{i-1}),  q(z_i | z_{<i}, x) = N(.; d_i),  h_i = d_i + Up_i(z_i)  (h_0 = x)
LVAE stage (ladder, top-down inference):
    d_i = Enc_i(d_{i-1}),  q(z_L | x) = N(.; d_L),  q(z_i | z_{>i}, x) = N(.; [d_i, t_i])
Generation, both (top-down, skip connections between latents):
    p(z_L) = N(0, I),  u_L = Down_L(z_L),  t_i = Dec_{i+1}(u_{i+1}),  p(z_i | z_{>i}) = N(.; t_i),
    u_i = t_i + Down_i(z_i),  p(x | z) = Likelihood(Dec_1(u_1))

Decode modes (one per layer), which cover every bound of the paper:

    mode          z_i used for generation        z_i used for inference   KL counted
    "sample"      posterior sample               posterior sample          yes
    "prior_mode"  mean of p(z_i | z_{>i})        posterior mean (VAE)      no

ELBO: all "sample". L>k: layers 1..k "prior_mode", layers k+1..L "sample" (`lk_modes(k, L)`); for k = 0
it equals the ELBO forward for the same noise. The model is pure: no device, precision or backend logic.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hvae_dist.config import ModelConfig
from hvae_dist.model.common import (
    PRIOR_MODE,
    SAMPLE,
    HierarchicalModel,
    ModelOutput,
    build_stage,
    check_modes,
    model_input,
)
from hvae_dist.nn import DiagonalGaussian, build_likelihood, build_stochastic


@dataclass
class Precomputed:
    """Sample-independent work for a batch (computed once per example, then repeated over samples).

    VAE: inference of the leading prior-mode layers (posterior means) and the features of the first
    sampled layer's stage. LVAE: every bottom-up feature map.
    """

    x: Tensor                                   # (B, C, H, W) data as given to log p(x|z)
    d: list = field(default_factory=list)       # LVAE: d_1..d_L; VAE: [d_j] of the first sampled stage j
    q: list = field(default_factory=list)       # VAE: Gaussians of the leading prior-mode layers
    h: Tensor | None = None                  # VAE: input of the first sampled stage (unused when d given)

    def repeat(self, n: int) -> Precomputed:
        """Each row repeated n times (row b*n + s is sample s of example b)."""
        if n == 1:
            return self
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return Precomputed(x=rep(self.x), d=[rep(t) for t in self.d],
                           q=[DiagonalGaussian(rep(g.loc), rep(g.scale)) for g in self.q], h=rep(self.h))


class HierarchicalVAE(HierarchicalModel):
    """VAE or LVAE stack built from a ModelConfig (seed config format); see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.input_shape is None:
            raise ValueError("model.input_shape is not set: build the model after the dataset is known "
                             "(build_model(cfg, input_shape))")
        self.cfg = cfg
        self.input_shape = tuple(cfg.input_shape)
        self.type = cfg.type
        c = self.input_shape[0]
        self.encoders, self.decoders, self.latents = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        num_layers = len(cfg.config_stochastic)
        shape = self.input_shape
        for i, sto in enumerate(cfg.config_stochastic):
            enc, dec, shape = build_stage(cfg, i, shape)
            self.encoders.append(enc)
            self.decoders.append(dec)
            post_in = 2 * shape[0] if (cfg.type == "lvae" and i < num_layers - 1) else None
            lat = build_stochastic(sto, shape, cfg.min_scale, post_in)
            # Drop the heads the forward pass never calls, so every parameter gets a gradient (DDP without
            # find_unused_parameters fails otherwise): the top prior is N(0, I), and z feeds the bottom-up
            # path only below the top of a VAE (an LVAE's inference path never sees z).
            if i == num_layers - 1:
                lat.prior = None
            if cfg.type == "lvae" or i == num_layers - 1:
                lat.project_up = None
            self.latents.append(lat)
        self.likelihood = build_likelihood(cfg.likelihood, cfg.config_deterministic[0][0]["out_channels"], c,
                                           cfg.num_mixtures, cfg.bits)

    @property
    def num_layers(self) -> int:
        return len(self.latents)

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Event shape of each latent layer, bottom first."""
        return [lat.event_shape for lat in self.latents]

    def precompute(self, x: Tensor, modes: Sequence[str] | None = None) -> Precomputed:
        """The part of the forward pass that does not depend on the noise. x: (B, C, H, W) in [0, 1]."""
        modes = check_modes(modes, self.num_layers)
        if self.type == "lvae":
            d, ds = model_input(x), []
            for enc in self.encoders:
                d = enc(d)
                ds.append(d)
            return Precomputed(x=x, d=ds)
        pre = Precomputed(x=x, h=model_input(x))
        for i, mode in enumerate(modes):
            d = self.encoders[i](pre.h)
            if mode == SAMPLE:
                pre.d = [d]
                break
            q = self.latents[i].q(d)
            pre.q.append(q)
            if i < self.num_layers - 1:  # the top z feeds no stage above it
                pre.h = d + self.latents[i].up(q.loc.to(d.dtype))
        return pre

    def forward(self, x: Tensor | None = None, modes: Sequence[str] | None = None,
                noise: Sequence[Tensor] | None = None, precomputed: Precomputed | None = None) -> ModelOutput:
        """One pass; x: (B, C, H, W) in the likelihood's data space ({0,1} or k/255), or `precomputed`.

        noise: optional standard-normal tensors, one per layer, (B, *event_shape_i) (entries of prior-mode
        layers are ignored); default fresh torch.randn. Explicit noise makes a pass reproducible.
        """
        modes = check_modes(modes, self.num_layers)
        pre = precomputed if precomputed is not None else self.precompute(x, modes)
        batch = pre.x.shape[0]
        eps = list(noise) if noise is not None else [None] * self.num_layers

        def draw(i: int, like: Tensor) -> Tensor:
            e = eps[i] if eps[i] is not None else torch.randn(batch, *self.latents[i].event_shape, device=like.device)
            return e.to(device=like.device, dtype=torch.float32)

        q_list: list[DiagonalGaussian | None] = [None] * self.num_layers
        z_post: list[Tensor | None] = [None] * self.num_layers
        if self.type == "vae":
            for i, q in enumerate(pre.q):
                q_list[i] = q
            h = pre.h
            for i in range(len(pre.q), self.num_layers):
                d = pre.d[0] if i == len(pre.q) and pre.d else self.encoders[i](h)
                q_list[i] = self.latents[i].q(d)
                z_post[i] = q_list[i].loc if modes[i] == PRIOR_MODE else q_list[i].rsample(draw(i, d))
                if i < self.num_layers - 1:  # the top z feeds no stage above it
                    h = d + self.latents[i].up(z_post[i].to(d.dtype))

        kl = pre.x.new_zeros(batch, self.num_layers, dtype=torch.float32)
        kl_dims: list[Tensor] = [None] * self.num_layers  # type: ignore[list-item]
        zs: list[Tensor] = [None] * self.num_layers       # type: ignore[list-item]
        u: Tensor | None = None
        for i in reversed(range(self.num_layers)):
            lat = self.latents[i]
            if i == self.num_layers - 1:
                loc = torch.zeros(batch, *lat.event_shape, device=pre.x.device)
                p = DiagonalGaussian(loc, torch.ones_like(loc))
                t = None
            else:
                t = self.decoders[i + 1](u)
                p = lat.p(t)
            if self.type == "lvae":
                d = pre.d[i]
                q_list[i] = lat.q(d if t is None else torch.cat([d, t.to(d.dtype)], dim=1))
            q = q_list[i]
            if modes[i] == PRIOR_MODE:
                z = p.loc
                kl_dims[i] = torch.zeros_like(q.loc.flatten(1))
            else:
                z = z_post[i] if z_post[i] is not None else q.rsample(draw(i, q.loc))
                kl_dims[i] = (q.log_prob(z) - p.log_prob(z)).flatten(1)  # B, D_i
                kl[:, i] = kl_dims[i].sum(1)
            zs[i] = z
            down = lat.down(z.to(t.dtype) if t is not None else z)
            u = down if t is None else t + down
        params = self.likelihood(self.decoders[0](u))
        log_px = self.likelihood.log_prob(pre.x, params)
        return ModelOutput(log_px=log_px, kl=kl, kl_dims=kl_dims,
                           posterior_means=[q.loc.flatten(1) for q in q_list], params=params, zs=zs)

    def decode(self, zs: Sequence[Tensor | None], k: int = 0) -> Tensor:
        """The generative path alone: likelihood parameters (B, P, H, W) from the latents of layers k+1..L.

        zs: per layer (B, *latent_shapes[i]); entries of layers 1..k (index < k) are ignored (may be None): those
        layers decode from their conditional-prior mode, as in L>k; k in 0..L-1 (the top is always given). With the
        `zs` of a forward pass under `lk_modes(k, L)` this gives that pass's `params`. Differentiable in zs
        (the per-example Jacobians of `hvae_dist.estimators.lid`).
        """
        if not 0 <= k < self.num_layers:
            raise ValueError(f"k={k} must be in 0..{self.num_layers - 1} (the top layer is always decoded from zs)")
        u: Tensor | None = None
        for i in reversed(range(self.num_layers)):
            lat = self.latents[i]
            if i == self.num_layers - 1:
                t, z = None, zs[i]
            else:
                t = self.decoders[i + 1](u)
                z = zs[i] if i >= k else lat.p(t).loc
            down = lat.down(z.to(t.dtype) if t is not None else z)
            u = down if t is None else t + down
        return self.likelihood(self.decoders[0](u))

    @torch.no_grad()
    def sample_prior(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                     mean_image: bool = True, temperature: float = 1.0) -> Tensor:
        """n images from p(z_L) ... p(x|z): (n, C, H, W) in [0, 1] (the likelihood's mean when mean_image).

        `temperature` scales the standard deviation of every prior draw; 0 decodes every layer from its
        conditional-prior mode.
        """
        u: Tensor | None = None
        for i in reversed(range(self.num_layers)):
            lat = self.latents[i]
            eps = torch.randn(n, *lat.event_shape, generator=generator, device=device) * temperature
            if u is None:
                z, t = eps, None
            else:
                t = self.decoders[i + 1](u)
                z = lat.p(t).rsample(eps)
            down = lat.down(z)
            u = down if t is None else t + down
        params = self.likelihood(self.decoders[0](u))
        return self.likelihood.mean(params) if mean_image else self.likelihood.sample(params, generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Likelihood mean of p(x | z ~ q(z|x)): (B, C, H, W) in [0, 1]."""
        return self.likelihood.mean(self.forward(x).params)
