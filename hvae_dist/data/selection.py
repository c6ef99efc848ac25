"""Which rows of a dataset a job scores: all, the first N (`--first N`), or a seeded random subset of N
(`--max-examples N`), stratified by class where the labels are known.

The random subset is a pure function of (seed, group name, N, labels): the same rows for the same seed and
N on every machine and in every shard. Stratified: class c (rows with label c; the unknown label -1 is one
more class) gets round(N n_c / n) rows by the largest-remainder rule (ties to the smaller label), drawn
without replacement by numpy's PCG64 seeded with (seed, the 64-bit key of the group); the rows come back
sorted, so a shard's rows are increasing source positions. AnimalMNIST:test (sorted by class) with N = 100
gets 10 rows of each of its 10 classes, where the first 100 rows are all class 0.
"""
from __future__ import annotations

import hashlib

import numpy as np

from hvae_dist.errors import ConfigError

MODES = ("all", "first", "random")


def _rng(seed: int, group: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32, key & 0xFFFFFFFF, key >> 32])


def stratified_counts(labels: np.ndarray, n: int) -> dict[int, int]:
    """Rows per class of a stratified subset of n of `labels` (largest remainder; ties to the smaller label)."""
    classes, sizes = np.unique(labels, return_counts=True)
    quota = n * sizes / sizes.sum()
    counts = np.floor(quota).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda j: (-(quota[j] - counts[j]), classes[j]))
    for j in order[:n - int(counts.sum())]:
        counts[j] += 1
    return {int(c): int(k) for c, k in zip(classes, counts)}


def select_rows(labels: np.ndarray, count: int | None, *, mode: str = "random", seed: int = 0,
                group: str = "") -> np.ndarray:
    """Sorted int64 positions of the rows to score among len(labels) rows (see the module docstring).

    mode "all" (or count None or >= len(labels)): every row; "first": rows 0..count-1; "random": the seeded,
    stratified subset. ConfigError for a count < 1 or an unknown mode."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if mode not in MODES:
        raise ConfigError(f"row selection {mode!r}: choose one of {', '.join(MODES)}")
    if count is not None and int(count) < 1:
        raise ConfigError(f"the number of examples must be >= 1, got {count}")
    if mode == "all" or count is None or int(count) >= n:
        return np.arange(n, dtype=np.int64)
    count = int(count)
    if mode == "first":
        return np.arange(count, dtype=np.int64)
    rng = _rng(seed, group)
    parts = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in stratified_counts(labels, count).items()
             if k]
    return np.sort(np.concatenate(parts)).astype(np.int64)
