"""BIVA: the Bidirectional-Inference Variational Autoencoder (Maaløe, Fraccaro, Liévin, Winther, NeurIPS 2019).

Stages i = 1 .. S (bottom first), built from the same config format as the VAE / LVAE: stage i's
`config_deterministic[i]` blocks and `config_stochastic[i]` latent spec. Every intermediate stage
i < S has two latents of that spec, a bottom-up z_i^BU and a top-down z_i^TD; the top stage has one
latent z_S. Let x' = 2x - 1, t_i the top-down generative features at stage i's resolution, [a, b]
channel concatenation.

Inference, bottom-up pass (deterministic BU features and BU latents, sampled bottom-up):
    b_1 = EncBU_1(x'),  q(z_i^BU | x, z_{<i}^BU) = N(.; b_i),  b_{i+1} = EncBU_{i+1}(b_i + Up_i(z_i^BU))
Inference, the deterministic top-down-inference features (a second encoder of x, no latents):
    h_1 = EncTD_1(x'),  h_{i+1} = EncTD_{i+1}(h_i)
Top stage, one latent fed by both paths:
    q(z_S | x) = N(.; [b_S, h_S])
Generation top-down with skip connections, and the top-down inference of z_i^TD:
    p(z_S) = N(0, I),  u_S = Down_S(z_S),  t_i = Dec_{i+1}(u_{i+1}),
    p(z_i^TD | z_{>i}) = N(.; t_i),  p(z_i^BU | z_{>i}) = N(.; t_i),  q(z_i^TD | x, z_{>i}) = N(.; [h_i, t_i]),
    u_i = t_i + DownBU_i(z_i^BU) + DownTD_i(z_i^TD),  p(x | z) = Likelihood(Dec_1(u_1))

Where this follows Maaløe et al. and the paper's code (hvae-oodd `BivaIntermediateStage` / `BivaTopStage`):
two latents per intermediate stage, a bottom-up stochastic inference path, a top-down inference path
whose posterior sees both the deterministic inference features and the generative features, one top
latent fed by both paths, a skip-connected top-down generative model, and the BU prior conditioned on
the features from above (their default `conditional_bu=False`). Where it differs, and why:
- The BU latent reaches the stage above as a residual, b_i + Up_i(z_i^BU) (as our VAE's h_i), instead
  of replacing the features by a projection of z: the same bottom-up information, and the gradient path
  of the deterministic features stays open in deep stacks.
- The TD inference encoder is a plain second encoder of x (their TD convolutions also take the BU
  features as an auxiliary input); q(z_i^TD) then sees the BU side through t_i, which depends on the
  BU samples above. Fewer parameters, the same conditional structure q(z^TD_i | x, z_{>i}).
- The top posterior concatenates [b_S, h_S] into its head directly (no extra merge block).
- Their L>k decoding for BIVA stages is marked "not correctly implemented" in their code; here it is
  defined below and tested.

Latent order and the L>k bound. A "layer" is a stage, numbered bottom-up 1 .. S as in the paper (a
ten-layer BIVA has z_1 .. z_10, where z_i = (z_i^BU, z_i^TD) for i < 10 and z_10 is the top latent).
Decode modes are per layer, as for the VAE / LVAE (`lk_modes(k, S)`):

    layer i < S   mode          generation uses                     inference uses z_i^BU as   KL counted
                  "sample"      z_i^BU ~ q(BU), z_i^TD ~ q(TD)      its posterior sample       both
                  "prior_mode"  means of p(z_i^BU|.), p(z_i^TD|.)   its posterior mean         none
    layer S       "sample"      z_S ~ q(z_S | x)                    -                          yes
                  "prior_mode"  0 (the mode of N(0, I))             -                          no

So L>k decodes both latents of layers 1..k from the conditional prior; L>0 equals the ELBO forward for
the same noise. KL of a layer is the sum over its latents. The noise of layer i < S is one tensor of
shape (2, *event_i): [:, 0] for z_i^BU, [:, 1] for z_i^TD; the top layer's is (*event_S).

Sample-independent precompute (`precompute`): the whole TD-inference encoder (h_1 .. h_S depend on x
only), the BU inference of the leading prior-mode layers (posterior means, no noise), and the BU
features b_j of the first sampled layer j. The scorer runs this once per example.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hvae_dist.config import ModelConfig
from hvae_dist.errors import ConfigError
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


def _rep(t: Tensor | None, n: int) -> Tensor | None:
    return None if t is None else t.repeat_interleave(n, dim=0)


@dataclass
class BivaPrecomputed:
    """Sample-independent work for a batch (see the module docstring); row b*n + s = sample s of example b."""

    x: Tensor                                   # (B, C, H, W) data as given to log p(x|z)
    h: list = field(default_factory=list)       # TD-inference features h_1 .. h_S
    q_bu: list = field(default_factory=list)    # BU posteriors of the leading prior-mode layers
    bu_in: Tensor | None = None                 # input of the first BU encoder still to run
    b: Tensor | None = None                     # BU features b_j of the first sampled layer j

    def repeat(self, n: int) -> BivaPrecomputed:
        if n == 1:
            return self
        return BivaPrecomputed(x=_rep(self.x, n), h=[_rep(t, n) for t in self.h],
                               q_bu=[DiagonalGaussian(_rep(g.loc, n), _rep(g.scale, n)) for g in self.q_bu],
                               bu_in=_rep(self.bu_in, n), b=_rep(self.b, n))


def _cat(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([a, b.to(a.dtype)], dim=1)


class BIVA(HierarchicalModel):
    """BIVA built from a ModelConfig with `type = "biva"`; a HierarchicalModel (see model.common)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.input_shape is None:
            raise ValueError("model.input_shape is not set: build the model after the dataset is known "
                             "(build_model(cfg, input_shape))")
        if len(cfg.config_stochastic) < 2:
            raise ConfigError("model.type='biva' needs at least 2 stages (intermediate stages hold z^BU and z^TD, "
                              f"the top stage one latent); model.config_stochastic has {len(cfg.config_stochastic)}")
        self.cfg, self.type = cfg, cfg.type
        self.input_shape = tuple(cfg.input_shape)
        self.enc_bu, self.enc_td, self.decoders = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.lat_bu, self.lat_td = nn.ModuleList(), nn.ModuleList()
        num = len(cfg.config_stochastic)
        shape = self.input_shape
        for i, sto in enumerate(cfg.config_stochastic):
            enc_bu, dec, out = build_stage(cfg, i, shape)
            enc_td, _, _ = build_stage(cfg, i, shape)   # its mirror decoder is not needed
            self.enc_bu.append(enc_bu)
            self.enc_td.append(enc_td)
            self.decoders.append(dec)
            if i < num - 1:
                bu = build_stochastic(sto, out, cfg.min_scale)                       # q from b_i, p from t_i
                td = build_stochastic(sto, out, cfg.min_scale, 2 * out[0])           # q from [h_i, t_i]
                td.project_up = None    # z^TD never feeds the BU inference path
                self.lat_bu.append(bu)
                self.lat_td.append(td)
            else:
                top = build_stochastic(sto, out, cfg.min_scale, 2 * out[0])          # q from [b_S, h_S]
                top.prior, top.project_up = None, None                               # p(z_S) = N(0, I)
                self.top = top
            shape = out
        self.likelihood = build_likelihood(cfg.likelihood, cfg.config_deterministic[0][0]["out_channels"],
                                           self.input_shape[0], cfg.num_mixtures, cfg.bits)

    @property
    def num_layers(self) -> int:
        return len(self.lat_bu) + 1

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Noise shape of each layer, bottom first: (2, *event) for intermediate layers (BU, TD), the top's event."""
        return [(2, *lat.event_shape) for lat in self.lat_bu] + [self.top.event_shape]

    def precompute(self, x: Tensor, modes: Sequence[str] | None = None) -> BivaPrecomputed:
        """The part of the forward pass that does not depend on the noise. x: (B, C, H, W) in [0, 1]."""
        modes = check_modes(modes, self.num_layers)
        xin = model_input(x)
        pre = BivaPrecomputed(x=x, bu_in=xin)
        h = xin
        for enc in self.enc_td:
            h = enc(h)
            pre.h.append(h)
        for i, mode in enumerate(modes):
            b = self.enc_bu[i](pre.bu_in)
            if mode == SAMPLE or i == self.num_layers - 1:
                pre.b = b
                break
            q = self.lat_bu[i].q(b)
            pre.q_bu.append(q)
            pre.bu_in = b + self.lat_bu[i].up(q.loc.to(b.dtype))
        return pre

    def forward(self, x: Tensor | None = None, modes: Sequence[str] | None = None,
                noise: Sequence[Tensor] | None = None, precomputed: BivaPrecomputed | None = None) -> ModelOutput:
        """One pass; x (B, C, H, W) in the likelihood's data space, or `precomputed`. noise: per layer
        (B, *latent_shapes[i]) standard normals (prior-mode layers' entries are ignored); default torch.randn."""
        modes = check_modes(modes, self.num_layers)
        pre = precomputed if precomputed is not None else self.precompute(x, modes)
        batch, top = pre.x.shape[0], self.num_layers - 1
        eps = list(noise) if noise is not None else [None] * self.num_layers

        def draw(i: int, like: Tensor) -> Tensor:
            e = eps[i] if eps[i] is not None else torch.randn(batch, *self.latent_shapes[i], device=like.device)
            return e.to(device=like.device, dtype=torch.float32)

        # Bottom-up: the BU posteriors and their samples (prior-mode layers: the posterior mean).
        q_bu: list[DiagonalGaussian] = list(pre.q_bu)
        z_bu: list[Tensor | None] = [q.loc for q in q_bu] + [None] * (top - len(q_bu))
        bu_in, b = pre.bu_in, pre.b
        for i in range(len(pre.q_bu), top):
            b = b if i == len(pre.q_bu) else self.enc_bu[i](bu_in)
            q = self.lat_bu[i].q(b)
            q_bu.append(q)
            z_bu[i] = q.loc if modes[i] == PRIOR_MODE else q.rsample(draw(i, b)[:, 0])
            bu_in = b + self.lat_bu[i].up(z_bu[i].to(b.dtype))
        b_top = b if len(pre.q_bu) == top else self.enc_bu[top](bu_in)

        # Top-down: generation, the TD posteriors, and the KL of every sampled layer.
        kl = pre.x.new_zeros(batch, self.num_layers, dtype=torch.float32)
        kl_dims: list[Tensor] = [None] * self.num_layers  # type: ignore[list-item]
        means: list[Tensor] = [None] * self.num_layers    # type: ignore[list-item]
        zs: list[Tensor] = [None] * self.num_layers       # type: ignore[list-item]
        q = self.top.q(_cat(b_top, pre.h[top]))
        means[top] = q.loc.flatten(1)
        if modes[top] == PRIOR_MODE:
            z, kl_dims[top] = torch.zeros_like(q.loc), torch.zeros_like(q.loc.flatten(1))
        else:
            z = q.rsample(draw(top, q.loc))
            kl_dims[top] = (q.log_prob(z) - DiagonalGaussian.standard_log_prob(z)).flatten(1)
            kl[:, top] = kl_dims[top].sum(1)
        zs[top] = z
        u = self.top.down(z)
        for i in reversed(range(top)):
            t = self.decoders[i + 1](u)
            p_bu, p_td = self.lat_bu[i].p(t), self.lat_td[i].p(t)
            q_td = self.lat_td[i].q(_cat(pre.h[i], t))
            means[i] = torch.cat([q_bu[i].loc.flatten(1), q_td.loc.flatten(1)], dim=1)
            if modes[i] == PRIOR_MODE:
                zb, zt = p_bu.loc, p_td.loc
                kl_dims[i] = torch.zeros_like(means[i])
            else:
                zb, zt = z_bu[i], q_td.rsample(draw(i, t)[:, 1])
                kl_dims[i] = torch.cat([(q_bu[i].log_prob(zb) - p_bu.log_prob(zb)).flatten(1),
                                        (q_td.log_prob(zt) - p_td.log_prob(zt)).flatten(1)], dim=1)
                kl[:, i] = kl_dims[i].sum(1)
            zs[i] = torch.stack([zb.float(), zt.float()], dim=1)              # B, 2, *event
            u = t + self.lat_bu[i].down(zb.to(t.dtype)) + self.lat_td[i].down(zt.to(t.dtype))
        params = self.likelihood(self.decoders[0](u))
        log_px = self.likelihood.log_prob(pre.x, params)
        return ModelOutput(log_px=log_px, kl=kl, kl_dims=kl_dims, posterior_means=means, params=params, zs=zs)

    def decode(self, zs: Sequence[Tensor | None], k: int = 0) -> Tensor:
        """The generative path alone: likelihood parameters (B, P, H, W) from the latents of layers k+1..S.

        zs: per layer (B, *latent_shapes[i]) ((B, 2, *event) for i < S: [:, 0] z^BU, [:, 1] z^TD); layers 1..k
        (index < k, may be None) decode both latents from their conditional-prior means, as in L>k; k in 0..S-1.
        With the `zs` of a forward pass under `lk_modes(k, S)` this gives that pass's `params`.
        """
        top = self.num_layers - 1
        if not 0 <= k <= top:
            raise ValueError(f"k={k} must be in 0..{top} (the top layer is always decoded from zs)")
        u = self.top.down(zs[top])
        for i in reversed(range(top)):
            t = self.decoders[i + 1](u)
            if i >= k:
                zb, zt = zs[i][:, 0], zs[i][:, 1]
            else:
                zb, zt = self.lat_bu[i].p(t).loc, self.lat_td[i].p(t).loc
            u = t + self.lat_bu[i].down(zb.to(t.dtype)) + self.lat_td[i].down(zt.to(t.dtype))
        return self.likelihood(self.decoders[0](u))

    @torch.no_grad()
    def sample_prior(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                     mean_image: bool = True, temperature: float = 1.0) -> Tensor:
        """n images from p(z_S) ... p(x|z): (n, C, H, W) in [0, 1] (the likelihood's mean when mean_image).

        `temperature` scales the standard deviation of every prior draw; 0 decodes from the prior modes.
        """
        def draw(shape: tuple[int, ...]) -> Tensor:
            return torch.randn(n, *shape, generator=generator, device=device) * temperature

        u = self.top.down(draw(self.top.event_shape))
        for i in reversed(range(self.num_layers - 1)):
            t = self.decoders[i + 1](u)
            zb = self.lat_bu[i].p(t).rsample(draw(self.lat_bu[i].event_shape))
            zt = self.lat_td[i].p(t).rsample(draw(self.lat_td[i].event_shape))
            u = t + self.lat_bu[i].down(zb) + self.lat_td[i].down(zt)
        params = self.likelihood(self.decoders[0](u))
        return self.likelihood.mean(params) if mean_image else self.likelihood.sample(params, generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Likelihood mean of p(x | z ~ q(z|x)): (B, C, H, W) in [0, 1]."""
        return self.likelihood.mean(self.forward(x).params)
