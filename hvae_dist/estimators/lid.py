"""Local intrinsic dimension (LID) of the decoder's image manifold at each example, from the decoder's Jacobian.

Kamkari et al. ("A Geometric Explanation of the Likelihood OOD Detection Paradox", ICML 2024; code
layer6ai-labs/dgm_ood_detection, `lid/flows/lid_estimators.py`) pair a model's likelihood with an LID
estimate: OOD data that gets a high likelihood sits where the model puts little probability *mass*, which
shows as a low LID. For a flow they take the Jacobian J of the generator at the latent of x and read LID
off the eigenvalues lambda_i = s_i^2 of J^T J at a scale delta (their `scale` is log delta):

    threshold count     LID_thr(delta) = #{ i : s_i > delta }                       (their ThresholdSVD)
    linearisation       LID_lin(delta) = sum_i s_i^2 / (s_i^2 + delta^2)            (their SpectralLinearization,
                                                                                    without its z-dependent term)

A VAE gives the generator directly. Here J is the Jacobian of the decoder *mean* (the likelihood's mean
image, (D,) = C*H*W values in the data's [0, 1] units) with respect to the latents, per example:

    z>k   the latents of layers k+1..L at the posterior mean (a forward pass with zero noise under
          `lk_modes(k, L)`), flattened and concatenated bottom-up: (d_k,) values
    g_k   z>k -> decoder mean, with layers 1..k decoded from their conditional-prior mode (as in L>k;
          `model.decode(zs, k)`), so the lowest latent, which can have more dimensions than the image,
          drops out for k >= 1
    J     dg_k / dz>k at that point, (D, d_k); its singular values s_1 >= s_2 >= ... (min(D, d_k) of them)

Where this differs from their flow estimator, and why:
- Latents, not standardised noise: J is taken with respect to z itself; a flow's latent is N(0, I), ours
  are conditional Gaussians whose scales vary with z above (the reparametrised noise would fold those
  scales into J). The count and the linearisation are invariant to neither; z is what the decoder sees.
- The linearisation drops their term in z (sum lambda_i z_i^2 delta^2 / (lambda_i + delta^2)^2, from the
  prior density at the latent): with a conditional prior it has no closed form, and it vanishes at the
  mode. LID_lin is then a smooth version of LID_thr (both count the directions stretched beyond delta).
- The mean of a discretized logistic mixture is its expected value sum_m pi_m mu_m (coupled, unclamped,
  not quantised), so that J exists; a Gaussian likelihood's mean is its location, unclamped.

Two ways to the spectrum (`LidSettings.rank`):
- full (rank None): J column block by column block, `chunk` columns per batched forward-mode pass
  (torch.func.jvp under vmap), then the exact singular values (float64 SVD). d_k passes per example.
- randomized (rank R, Halko, Martinsson & Tropp 2011, Alg. 4.4): R + oversample Gaussian probe vectors,
  `power_iters` rounds of subspace iteration (jvp and vjp), then the SVD of the small projected matrix.
  Gives the top R singular values (from below: each is <= the true one); the count is capped at R and the
  linearisation misses the tail below s_R. The probes are a function of (seed, dataset, index, k)
  (`hvae_dist.estimators.noise`), so the values do not depend on batching or sharding. Measured error on
  the tiny preset: see README.md (section "Local intrinsic dimension").

Examples are independent in every model (no batch statistics), so a batched jvp of the batched decoder is
the per-example Jacobian of each row. Costs and memory: B x chunk rows per pass (full), the Jacobian
(B, D, d_k) float32 once per batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hvae_dist.config import check_int_range
from hvae_dist.errors import ConfigError
from hvae_dist.estimators import noise as noise_mod
from hvae_dist.model import lk_modes
from hvae_dist.nn.likelihoods import Bernoulli, DiscretizedLogistic, DiscretizedLogisticMixture, GaussianLikelihood

DEFAULT_SCALES = (0.1, 1.0)
"""delta of the LID estimates, in units of the decoder mean (pixel values in [0, 1]) per unit of latent."""


@dataclass
class LidSettings:
    """What determines the LID fields of a score file (`hvae score --lid ...`)."""

    scales: list = field(default_factory=lambda: list(DEFAULT_SCALES))
    """delta values (> 0), stored in increasing order: the columns of lid / lid_lin."""
    ks: list = field(default_factory=lambda: [0])
    """Jacobians with respect to z>k for each k (0: all latents); each in 0..L-1, increasing."""
    rank: int | None = None
    """None: the full Jacobian. R: the top R singular values by randomized SVD."""
    oversample: int = 10
    """Extra probe vectors of the randomized SVD."""
    power_iters: int = 2
    """Subspace iterations of the randomized SVD (each one jvp and one vjp pass of R + oversample columns)."""
    chunk: int = 32
    """Jacobian columns (or probes) per batched pass; memory B x chunk rows; does not change the values."""

    def resolved(self, num_layers: int) -> LidSettings:
        """Checked and normalised (sorted scales and ks); ConfigError naming the option."""
        scales = [float(s) for s in self.scales]
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ConfigError(f"--lid-scales {scales}: give one or more finite values > 0 (delta, pixel units)")
        if len(set(scales)) != len(scales):
            raise ConfigError(f"--lid-scales {scales} repeats a value")
        ks = sorted(int(k) for k in self.ks)
        bad = [k for k in ks if not 0 <= k < num_layers]
        if not ks or bad or len(set(ks)) != len(ks):
            raise ConfigError(f"--lid-ks {self.ks}: give distinct k in 0..{num_layers - 1} (the Jacobian with respect "
                              f"to z>k; 0 = all latents) for this model with {num_layers} latent layers")
        if self.rank is not None:
            check_int_range("--lid-rank", self.rank, 1)
        check_int_range("--lid-chunk", self.chunk, 1)
        if self.oversample < 0 or self.power_iters < 0:
            raise ConfigError(f"LID oversample / power_iters must be >= 0, got {self.oversample} / {self.power_iters}")
        return LidSettings(sorted(scales), ks, None if self.rank is None else int(self.rank), int(self.oversample),
                           int(self.power_iters), int(self.chunk))

    def attrs(self) -> dict:
        """The score file's `lid` attribute (part of its identity; `chunk` is not: it changes no value)."""
        return {"scales": self.scales, "ks": self.ks, "rank": self.rank, "oversample": self.oversample,
                "power_iters": self.power_iters}


def decoder_mean(likelihood, params: Tensor) -> Tensor:
    """The likelihood's mean image (B, C, H, W), differentiable in params (see the module docstring)."""
    if isinstance(likelihood, Bernoulli):
        return torch.sigmoid(params)
    if isinstance(likelihood, GaussianLikelihood):
        return likelihood._split(params)[0]
    if isinstance(likelihood, DiscretizedLogistic):
        params = likelihood._mixture_params(params)
    if isinstance(likelihood, DiscretizedLogisticMixture):
        return _dmol_expected_value(params, likelihood.data_channels)
    raise ConfigError(f"LID: no differentiable mean for likelihood {type(likelihood).__name__}")


def _dmol_expected_value(params: Tensor, channels: int) -> Tensor:
    """E[x] of a discretized logistic mixture, (B, C, H, W) in [0, 1] units: sum_m pi_m mu_m, each later
    channel's mean shifted by tanh(coeff) times the earlier channels' component means (unclamped)."""
    from hvae_dist.kernels.reference import dmol_split_params

    logits, means, _, coeffs = dmol_split_params(params.float(), channels)     # B,M,H,W; B,C,M,H,W
    t = torch.tanh(coeffs)
    mus = [means[:, 0]]
    if channels >= 2:
        mus.append(means[:, 1] + t[:, 0] * means[:, 0])
    if channels >= 3:
        mus.append(means[:, 2] + t[:, 1] * means[:, 0] + t[:, 2] * mus[1])
    mu = torch.stack(mus, dim=1)                                                # B, C, M, H, W in [-1, 1]
    pi = torch.softmax(logits, dim=1)[:, None]                                  # B, 1, M, H, W
    return ((pi * mu).sum(2) + 1.0) / 2.0


def latent_point(model, x: Tensor, k: int) -> list[Tensor]:
    """The latents of a forward pass under `lk_modes(k, L)` with zero noise: posterior means of layers
    k+1..L (each given the ones above), conditional-prior modes below. Per layer (B, *latent_shapes[i])."""
    zeros = [torch.zeros(x.shape[0], *s, device=x.device) for s in model.latent_shapes]
    with torch.no_grad():
        out = model(x, modes=lk_modes(k, model.num_layers), noise=zeros)
    return [z.detach().float() for z in out.zs]


def flat_decoder(model, zs: list[Tensor], k: int) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """(g, z): g maps z>k flattened (B, d_k) to the decoder mean flattened (B, D); z is the point (B, d_k)."""
    shapes = [tuple(t.shape[1:]) for t in zs[k:]]
    sizes = [math.prod(s) for s in shapes]

    def g(flat: Tensor) -> Tensor:
        parts = [p.reshape(flat.shape[0], *s) for p, s in zip(flat.split(sizes, dim=1), shapes)]
        params = model.decode([None] * k + parts, k)
        return decoder_mean(model.likelihood, params).flatten(1)

    return g, torch.cat([t.flatten(1) for t in zs[k:]], dim=1)


def _jvp_columns(g: Callable[[Tensor], Tensor], z: Tensor, tangents: Tensor) -> Tensor:
    """J_b v for every example b and tangent v: tangents (m, B, d) -> (m, B, D)."""
    from torch.func import jvp, vmap

    return vmap(lambda v: jvp(g, (z,), (v,))[1])(tangents)


def _vjp_rows(g: Callable[[Tensor], Tensor], z: Tensor, cotangents: Tensor) -> Tensor:
    """J_b^T u for every example b and cotangent u: cotangents (m, B, D) -> (m, B, d)."""
    from torch.func import vjp, vmap

    _, pull = vjp(g, z)
    return vmap(lambda u: pull(u)[0])(cotangents)


def full_jacobian(g: Callable[[Tensor], Tensor], z: Tensor, chunk: int) -> Tensor:
    """Per-example Jacobian (B, D, d) of g at z (B, d), `chunk` columns per batched jvp pass."""
    batch, d = z.shape
    cols = []
    for a in range(0, d, chunk):
        c = min(chunk, d - a)
        basis = torch.zeros(c, batch, d, device=z.device, dtype=z.dtype)
        basis[torch.arange(c), :, a + torch.arange(c)] = 1.0                     # column a + j of the identity
        cols.append(_jvp_columns(g, z, basis))                                   # c, B, D
    return torch.cat(cols, 0).permute(1, 2, 0)                                   # B, D, d


def _in_chunks(fn: Callable[[Tensor], Tensor], vectors: Tensor, chunk: int) -> Tensor:
    """fn over (m, B, n) vectors in chunks of the first axis."""
    return torch.cat([fn(vectors[a:a + chunk]) for a in range(0, vectors.shape[0], chunk)], 0)


def _orth(y: Tensor) -> Tensor:
    """Orthonormal basis of the columns, per example: (B, n, m) -> (B, n, m)."""
    return torch.linalg.qr(y.double()).Q.to(y.dtype)


def randomized_singular_values(g: Callable[[Tensor], Tensor], z: Tensor, probes: Tensor, rank: int,
                               power_iters: int, chunk: int) -> Tensor:
    """Top `rank` singular values (B, rank) of each example's Jacobian; probes (B, d, m) with m >= rank
    standard-normal columns (Halko et al. 2011, randomized range finder with subspace iteration)."""
    jv = lambda v: _in_chunks(lambda c: _jvp_columns(g, z, c), v, chunk)        # noqa: E731  (m,B,d) -> (m,B,D)
    jtu = lambda u: _in_chunks(lambda c: _vjp_rows(g, z, c), u, chunk)          # noqa: E731  (m,B,D) -> (m,B,d)
    y = jv(probes.permute(2, 0, 1)).permute(1, 2, 0)                             # B, D, m
    for _ in range(power_iters):
        w = _orth(jtu(_orth(y).permute(2, 0, 1)).permute(1, 2, 0))              # B, d, m
        y = jv(w.permute(2, 0, 1)).permute(1, 2, 0)                              # B, D, m
    q = _orth(y)                                                                  # B, D, m
    small = jtu(q.permute(2, 0, 1)).permute(1, 0, 2)                              # B, m, d = Q^T J
    return torch.linalg.svdvals(small.double())[:, :rank]


def lid_estimates(singular_values: Tensor, scales: list[float]) -> tuple[Tensor, Tensor]:
    """(count, linearised), each (B, S) float64, from singular values (B, r) and the S scales delta."""
    s = singular_values.double()[:, :, None]                                      # B, r, 1
    delta = torch.tensor(scales, dtype=torch.float64, device=s.device)            # S
    count = (s > delta).sum(1).double()                                           # B, S
    lin = (s ** 2 / (s ** 2 + delta ** 2)).sum(1)                                 # B, S
    return count, lin


class LidEstimator:
    """LID fields of batches of preprocessed examples; see the module docstring."""

    def __init__(self, model, settings: LidSettings, seed: int = 0):
        self.model = model.eval()
        self.settings = settings.resolved(model.num_layers)
        self.seed = seed

    def singular_values(self, x: Tensor, k: int, dataset: str = "", indices: Tensor | None = None) -> Tensor:
        """(B, r) singular values of each example's Jacobian dg_k/dz>k, descending, float64; x (B, C, H, W) as
        the model takes it. `dataset` / `indices` key the probes of the randomized SVD."""
        st = self.settings
        g, z = flat_decoder(self.model, latent_point(self.model, x, k), k)
        with torch.no_grad():          # torch.func's jvp / vjp differentiate anyway; nothing else keeps a graph
            if st.rank is None:
                return torch.linalg.svdvals(full_jacobian(g, z, st.chunk).double())
            m = st.rank + st.oversample
            if indices is None:
                indices = torch.arange(x.shape[0], device=x.device)
            keys = noise_mod.example_keys(self.seed, dataset, noise_mod.lid_stream(k), indices.to(x.device))
            probes = noise_mod.normal_noise(keys, 0, m, [(z.shape[1],)])[0].view(x.shape[0], m, -1)
            return randomized_singular_values(g, z, probes.transpose(1, 2), min(st.rank, m), st.power_iters, st.chunk)

    def score_batch(self, x: Tensor, indices: Tensor, dataset: str) -> dict[str, np.ndarray]:
        """lid (B, K, S) threshold counts and lid_lin (B, K, S) linearised LIDs, float64, for each k of
        settings.ks (K) and each scale (S)."""
        counts, lins = [], []
        for k in self.settings.ks:
            count, lin = lid_estimates(self.singular_values(x, k, dataset, indices), self.settings.scales)
            counts.append(count)
            lins.append(lin)
        return {"lid": torch.stack(counts, 1).cpu().numpy(), "lid_lin": torch.stack(lins, 1).cpu().numpy()}
