"""Deterministic, counter-based noise for scoring: a value depends only on *what* it is for, never on
how the work was batched, chunked or sharded.

Every random number the scorer uses is a pure function (`hvae_dist.rng`, the package's one hash) of

    (seed, dataset key, stream, example index i, sample index s, element j)

where the dataset key is the 64-bit prefix of sha256("<Name>/<split>") (the score file's group name; for a
file dataset its group, e.g. "my_pngs/all", `hvae_dist.data.specs`), i the position in the source split
(`index`, whatever subset is scored), and the stream is
`DATA_STREAM` (0) for the per-pixel uniforms of dynamic binarization / dequantization (no s), or
`bound_stream(k)` = 1 + k for the posterior noise of the L>k bound (k = 0 is the ELBO, so the ELBO
and L>0 share their noise and LLR>0 = 0 exactly). Element j counts the latent elements of all layers
flattened and concatenated bottom-up (layer i's elements start at sum of the sizes of layers < i),
so a layer's noise does not change with which other layers are sampled.

    key      = absorb(absorb(absorb(mix(seed), dataset_key), stream), i)      (per example)
    key_s    = absorb(key, s)                                                 (per example, sample)
    bits_j   = mix(key_s + GAMMA * (j + 1))                                   (the splitmix64 stream of key_s)
"""
from __future__ import annotations

import hashlib

from torch import Tensor

from hvae_dist.rng import GAMMA, absorb, absorb_int, key_of, mix64, mix64_int, row_keys
from hvae_dist.rng import normal as normal_noise
from hvae_dist.rng import uniform as uniform_noise

DATA_STREAM = 0


def bound_stream(k: int) -> int:
    """Stream id of the posterior noise of the L>k bound (k = 0: the ELBO)."""
    return 1 + int(k)


def dataset_key(name: str) -> int:
    """64-bit key of a dataset group name such as "FashionMNIST/test" (sha256 prefix, stable across runs)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def example_keys(seed: int, dataset: str, stream: int, indices: Tensor) -> Tensor:
    """(B,) int64 keys of examples `indices` (B,) (positions in the source dataset) for one stream."""
    return row_keys(key_of(seed, dataset_key(dataset), stream), indices)


__all__ = [
    "DATA_STREAM",
    "GAMMA",
    "absorb",
    "absorb_int",
    "bound_stream",
    "dataset_key",
    "example_keys",
    "lid_stream",
    "mix64",
    "mix64_int",
    "normal_noise",
    "uniform_noise",
]


LID_STREAM_BASE = 1 << 20
"""Streams from here on: the probe vectors of the randomized LID spectrum (`lid_stream`), apart from the bounds'."""


def lid_stream(k: int) -> int:
    """Stream id of the randomized-SVD probes of the LID Jacobian with respect to z>k."""
    return LID_STREAM_BASE + int(k)
