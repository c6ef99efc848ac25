"""Importance-weighted bounds per example: ELBO_S, L>k_S, LLR>k, the 1-sample ELBO, KL per layer, bits/dim.

For a batch of B examples and each bound (the ELBO is L>0: every layer sampled; L>k decodes layers
1..k from the conditional-prior mode, `hvae_dist.model.lk_modes`):

    pre = model.precompute(x, modes)                      # sample-independent work, once per example
    for each chunk of C samples s0 .. s0+C-1:
        out = model(modes=modes, noise=eps(seed, dataset, i, bound, s), precomputed=pre.repeat(C))
        w   = out.elbo.view(B, C)                         # log p(x|z) - sum_i KL_i, nats, fp32
        StreamingLogMeanExp.update(w)                     # online log-sum-exp in float64

so memory is O(B * C) whatever S, and the value of every example depends only on (seed, dataset,
index) through `hvae_dist.estimators.noise`, never on B, C or the shard. `sample_chunk="auto"` (the default)
picks C per batch so that B * C is about `rows_per_pass(device)` rows (`hvae_dist.estimators.rows`, the one
policy of the scorer and the training's evaluation). Runs under torch.inference_mode;
`precision="bf16"` autocasts the network to bfloat16 while log-densities and reductions stay fp32/fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parametrize

from hvae_dist.config import SCORE_PRECISIONS, check_int_range
from hvae_dist.data import preprocess_batch
from hvae_dist.errors import ConfigError
from hvae_dist.estimators import noise as noise_mod
from hvae_dist.estimators.rows import resolve_sample_chunk
from hvae_dist.model import SAMPLE, HierarchicalModel, lk_modes
from hvae_dist.nn.precision import autocast_context
from hvae_dist.objectives import StreamingLogMeanExp, bits_per_dim


def default_ks(num_layers: int) -> list[int]:
    """The paper's L>k for every k in 1..L-1."""
    return list(range(1, num_layers))


@dataclass
class ScoreSettings:
    """Everything that determines the scores (besides the model and the data)."""

    iw_samples: int = 1000
    """S: importance samples of the ELBO bound."""
    iw_samples_lk: int | None = None
    """Importance samples of each L>k bound (None: same as iw_samples)."""
    ks: list | None = None
    """k of the L>k bounds, each in 0..L-1 (None: 1..L-1); stored in increasing order."""
    seed: int = 0
    """Seed of all noise (posterior samples, dynamic binarization)."""
    precision: str = "fp32"
    """fp32, or bf16 autocast of the network (log-densities fp32, reductions fp64)."""
    binarize: str = "none"
    """Input transform of the model's config (data.binarize); dynamic/dequantize use deterministic noise."""
    sample_chunk: int | str = "auto"
    """Samples per example in one forward pass (rows per pass = batch * sample_chunk), or "auto": chosen per
    batch from the device (`resolve_sample_chunk`). Does not change the values."""

    def check(self) -> None:
        """Every integer in range (`config.check_int_range`: they are stored as int64 in the score file), before
        any model is loaded or file created; ConfigError naming the option."""
        check_int_range("--seed", self.seed)
        if self.iw_samples < 1:
            raise ConfigError(f"--iw-samples must be >= 1, got {self.iw_samples}")
        check_int_range("--iw-samples", self.iw_samples, 1)
        if self.iw_samples_lk is not None and self.iw_samples_lk < 1:
            raise ConfigError(f"--iw-samples-lk must be >= 1 (or left out: the same as --iw-samples), "
                              f"got {self.iw_samples_lk}")
        if self.iw_samples_lk is not None:
            check_int_range("--iw-samples-lk", self.iw_samples_lk, 1)
        for k in self.ks or []:
            check_int_range("--ks", k)

    def resolved(self, num_layers: int) -> ScoreSettings:
        self.check()
        # Increasing order: the score file's columns of lk / llr follow ks, and its readers refuse any other order.
        ks = default_ks(num_layers) if self.ks is None else sorted(int(k) for k in self.ks)
        bad = [k for k in ks if not 0 <= k < num_layers]
        if bad:
            raise ConfigError(f"--ks {bad}: each k must be in 0..{num_layers - 1} for this model with "
                              f"{num_layers} latent layers (L>k decodes layers 1..k from the prior)")
        if len(set(ks)) != len(ks):
            raise ConfigError(f"--ks {ks} repeats a value")
        chunk = self.sample_chunk
        if chunk != "auto" and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ConfigError(f"--sample-chunk must be 'auto' or an integer >= 1, got {chunk!r}")
        if self.precision not in SCORE_PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: choose one of {', '.join(SCORE_PRECISIONS)}")
        lk = self.iw_samples if self.iw_samples_lk is None else int(self.iw_samples_lk)
        return ScoreSettings(int(self.iw_samples), lk, ks, int(self.seed), self.precision, self.binarize, chunk)


class IWScorer:
    """Scores batches of uint8 images with a HierarchicalModel (any hierarchy); see the module docstring."""

    def __init__(self, model: HierarchicalModel, settings: ScoreSettings, device: torch.device | str | None = None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.settings = settings.resolved(model.num_layers)
        self.num_layers = model.num_layers
        self.num_dims = math.prod(model.input_shape)

    def chunk_for(self, batch_size: int) -> int:
        """Samples per example per forward pass for a batch of `batch_size` examples (resolves "auto")."""
        st = self.settings
        return resolve_sample_chunk(st.sample_chunk, batch_size, self.device, max(st.iw_samples, st.iw_samples_lk))

    def _autocast(self):
        return autocast_context(self.settings.precision, self.device)

    def preprocess(self, x_uint8: Tensor, dataset: str, indices: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> model input; dynamic binarization / dequantization from per-example noise."""
        mode = self.settings.binarize
        u = None
        if mode in ("dynamic", "dequantize"):
            keys = noise_mod.example_keys(self.settings.seed, dataset, noise_mod.DATA_STREAM, indices)
            u = noise_mod.uniform_noise(keys, tuple(x_uint8.shape[1:]))
        return preprocess_batch(x_uint8, mode, u)

    def _bound(self, x: Tensor, dataset: str, indices: Tensor, k: int, num_samples: int,
               kl_sum: Tensor | None = None) -> StreamingLogMeanExp:
        """Streamed log-weights of the L>k bound (k=0: ELBO) over num_samples samples; adds KL sums to kl_sum."""
        model, batch = self.model, x.shape[0]
        modes = lk_modes(k, self.num_layers)
        sampled = [i for i, m in enumerate(modes) if m == SAMPLE]
        keys = noise_mod.example_keys(self.settings.seed, dataset, noise_mod.bound_stream(k), indices)
        red = StreamingLogMeanExp()
        with self._autocast():
            pre = model.precompute(x, modes)
        repeated: dict[int, object] = {}
        chunk = self.chunk_for(batch)
        for s0 in range(0, num_samples, chunk):
            c = min(chunk, num_samples - s0)
            if c not in repeated:
                repeated = {c: pre.repeat(c)}
            eps = noise_mod.normal_noise(keys, s0, c, model.latent_shapes, sampled)
            with self._autocast():
                out = model(modes=modes, noise=eps, precomputed=repeated[c])
            red.update(out.elbo.float().view(batch, c))                     # B, C
            if kl_sum is not None:
                kl_sum += out.kl.double().view(batch, c, -1).sum(1)         # B, L
        return red

    @torch.inference_mode()
    def score_batch(self, x_uint8: Tensor, indices: Tensor, dataset: str) -> dict[str, np.ndarray]:
        """Scores of B examples of `dataset` ("Name/split") at positions `indices` (B,) int64.

        Returns float64 numpy arrays, nats: elbo (B,), elbo_1 (B,), lk (B, K), llr (B, K), kl (B, L), bpd (B,).
        """
        with parametrize.cached():   # weight-norm weights computed once per batch, not once per forward
            return self._score_batch(x_uint8, indices, dataset)

    def _score_batch(self, x_uint8: Tensor, indices: Tensor, dataset: str) -> dict[str, np.ndarray]:
        st = self.settings
        x_uint8 = x_uint8.to(self.device)
        indices = indices.to(self.device, torch.int64)
        x = self.preprocess(x_uint8, dataset, indices)
        batch = x.shape[0]
        kl_sum = torch.zeros(batch, self.num_layers, dtype=torch.float64, device=self.device)
        red = self._bound(x, dataset, indices, 0, st.iw_samples, kl_sum)
        elbo = red.result()
        lks = []
        for k in st.ks:
            if k == 0 and st.iw_samples_lk == st.iw_samples:
                lks.append(elbo)  # the same modes and the same noise: L>0 is the ELBO exactly
            else:
                lks.append(self._bound(x, dataset, indices, k, st.iw_samples_lk).result())
        lk = torch.stack(lks, 1) if lks else elbo.new_zeros(batch, 0)           # B, K
        return {
            "elbo": elbo.cpu().numpy(),
            "elbo_1": red.mean().cpu().numpy(),
            "lk": lk.cpu().numpy(),
            "llr": (elbo[:, None] - lk).cpu().numpy(),
            "kl": (kl_sum / st.iw_samples).cpu().numpy(),
            "bpd": bits_per_dim(-elbo, self.num_dims).cpu().numpy(),
        }

