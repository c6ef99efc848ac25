"""The streamed part of `hvae merge`: one dataset group of every shard, checked and copied block by block.

Memory does not grow with the number of rows N: a block (BLOCK_BYTES of one shard's rows, every dataset
of the group) is read, checked and written at a time, plus one bit per row of the group (`seen`, which
row indices are already written: 1.2 MiB for 10^7 rows). Row i of the merged group is the shard row whose
`index` is i, so the merged rows come out sorted by index wherever they were.

Checks, in the order a shard is read: every row complete (the `complete` flags, before any value is
read); per block, every index inside the job's plan 0..size-1 and not already written (no two shards, no
two rows of one shard, hold the same index), every value of `VALUE_FIELDS`, `LID_FIELDS`, `BASELINE_FIELDS`
and `complexity_*` finite, and HDF5's Fletcher32 checksum of every chunk read; at the end, the group holds
exactly `size` rows. Each failure is a ScoreFileError naming the shard file, the dataset and the row.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvae_dist.errors import ScoreFileError
from hvae_dist.score.layout import (
    BASELINE_FIELDS,
    CHUNK_ROWS,
    LID_FIELDS,
    VALUE_FIELDS,
    checked_storage,
    describe,
    open_h5,
    read_checked,
)

BLOCK_BYTES = 8 << 20
"""Bytes of one shard's rows read at a time (all datasets of the group together), at least CHUNK_ROWS rows."""
SHARD_ONLY = ("complete",)
"""Datasets of a shard's group that the merged file does not have."""


@dataclass(frozen=True)
class ShardInfo:
    """A shard file as merge's first pass found it (its lock held until the merge ends): its attributes
    (`layout.read_attrs`) and rows per group."""

    path: Path
    attrs: dict
    rows: dict[str, int]


def copy_group(f, group: str, shards: list[ShardInfo], size: int, ks: list[int], check: Callable[[], None],
               block_bytes: int | None = None, space: int | None = None) -> None:
    """Write `group` of the merged file `f` (an h5py.File open for writing) from every shard, in shard order.

    First the rows: every shard's `complete` flags and `index` (each index in the plan, none twice, all of
    0..size-1 in the end). Then every dataset of the group but `complete`, whatever its name, dtype or
    width, one after the other (each stored in one run, as `create_checked` stores a whole array, and read
    fast on its own by `hvae analyze`): created like the first shard's (checksummed chunks, attributes),
    filled from every shard block by block, values checked. `check()` is called before each block (it
    raises when the write must stop: an I/O error, a signal). The caller holds every shard's lock.

    `space` (default `size`): the rows of the source split, when the job scored a subset of them (`--max-examples`:
    indices are sparse in 0..space-1); merged row r is then the row of the r-th smallest index (`_Ranks`).
    """
    block_bytes = block_bytes or BLOCK_BYTES
    space = size if space is None else int(space)
    with _open_shard(shards[0], group) as first:
        group_attrs = dict(first.attrs)
        like = {k: (d.dtype, d.shape[1:], dict(d.attrs)) for k, d in first.items() if k not in SHARD_ONLY}
    seen = np.zeros((space + 7) // 8, np.uint8)                    # bit i: index i is written
    written = 0
    for k, shard in enumerate(shards):
        with _open_shard(shard, group) as grp:
            _check_like(shard.path, group, grp, like, shards[0].path)
            n = grp["index"].shape[0]
            _check_complete(shard.path, group, grp, n)
            for rows in _blocks(n, 8, block_bytes):
                check()
                index = read_checked(shard.path, f"{group}/index", grp["index"], rows).astype(np.int64)
                _claim(shard.path, group, index, rows.start, seen, space, shards[:k + 1])
            written += n
    if written != size:                                            # no index twice, none outside: all of 0..size-1
        raise ScoreFileError(f"{shards[0].path.parent}: {group} covers {written} distinct indices but the job planned "
                             f"{size}" + (f" (0..{size - 1})" if space == size else f" of 0..{space - 1}")
                             + "; a shard file does not match the plan")
    ranks = None if space == size else _Ranks(seen)
    target = f.create_group(group)
    target.attrs.update(group_attrs)
    for key, (dtype, width, attrs) in like.items():
        shape = (size, *width)
        out = target.create_dataset(key, shape=shape, dtype=dtype, fletcher32=True, **checked_storage(shape))
        # units / description as layout.create_checked writes them (also for shards from before issue 24, which
        # have none), then any other attribute of the first shard's dataset.
        describe(out, key)
        out.attrs.update({k: v for k, v in attrs.items() if k not in out.attrs})
        for shard in shards:
            with _open_shard(shard, group) as grp:
                _copy_dataset(shard.path, group, key, grp, out, ks, check, block_bytes, ranks)
        out.flush()                  # its cached chunks stored now, before the next dataset's header


@contextlib.contextmanager
def _open_shard(shard: ShardInfo, group: str):
    """The shard's h5py group `group` (the caller holds the shard's lock)."""
    with open_h5(shard.path, "r") as src:
        yield src[group]


def _blocks(n: int, row_bytes: int, block_bytes: int) -> Iterator[slice]:
    """Slices of n rows, each of about block_bytes (whole CHUNK_ROWS multiples, at least one chunk)."""
    step = max(CHUNK_ROWS, block_bytes // max(1, row_bytes) // CHUNK_ROWS * CHUNK_ROWS)
    for a in range(0, n, step):
        yield slice(a, min(n, a + step))


def _check_like(path: Path, group: str, grp, like: dict, first: Path) -> None:
    """The shard's datasets are those of the first shard: same names, dtypes and widths."""
    have = {k: (d.dtype, d.shape[1:]) for k, d in grp.items() if k not in SHARD_ONLY}
    want = {k: v[:2] for k, v in like.items()}
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ScoreFileError(f"{path}: {group} has other datasets than {first.name} ({', '.join(diff)}: "
                             f"{[have.get(k) for k in diff]} vs {[want.get(k) for k in diff]}); these shards "
                             "cannot be merged")


class _Ranks:
    """Position of index i among the written indices (the merged row of a sparse index): the bits of `seen`
    below i, from a prefix count per byte (one int64 per 8 source rows)."""

    POPCOUNT = np.array([bin(b).count("1") for b in range(256)], np.int64)

    def __init__(self, seen: np.ndarray):
        self.seen = seen
        self.before = np.concatenate([[0], np.cumsum(self.POPCOUNT[seen])])

    def __call__(self, index: np.ndarray) -> np.ndarray:
        byte = index >> 3
        below = self.seen[byte] & ((1 << (index & 7)) - 1).astype(np.uint8)
        return self.before[byte] + self.POPCOUNT[below]


def _copy_dataset(path: Path, group: str, key: str, grp, out, ks: list[int], check: Callable[[], None],
                  block_bytes: int, ranks: _Ranks | None = None) -> None:
    """Copy one dataset of one shard's group into `out` at the rows its `index` names, block by block."""
    d = grp[key]
    n = d.shape[0]
    row_bytes = d.dtype.itemsize * int(np.prod(d.shape[1:])) + 8
    for rows in _blocks(n, row_bytes, block_bytes):
        check()
        index = read_checked(path, f"{group}/index", grp["index"], rows).astype(np.int64)
        values = index if key == "index" else read_checked(path, f"{group}/{key}", d, rows)
        if key in VALUE_FIELDS or key in LID_FIELDS or key in BASELINE_FIELDS or key.startswith("complexity_"):
            _check_finite(path, group, key, grp, values, rows.start, index, ks, rows.stop - rows.start)
        order = None if np.all(index[1:] > index[:-1]) else np.argsort(index, kind="stable")
        where = index if ranks is None else ranks(index)
        out[_target(where, order)] = values if order is None else values[order]


def _check_complete(path: Path, group: str, grp, n: int) -> None:
    flags = grp["complete"]
    step = 1 << 20
    bad, first = 0, None
    for a in range(0, n, step):
        done = read_checked(path, f"{group}/complete", flags, slice(a, min(n, a + step))).astype(bool)
        missing = np.flatnonzero(~done)
        if len(missing) and first is None:
            first = a + int(missing[0])
        bad += len(missing)
    if bad:
        i = int(read_checked(path, f"{group}/index", grp["index"], slice(first, first + 1))[0])
        raise ScoreFileError(f"{path}: {group} has {bad} incomplete rows (first: dataset index {i}); re-run that shard "
                             "to finish it")


def _claim(path: Path, group: str, index: np.ndarray, start: int, seen: np.ndarray, space: int,
           shards: list[ShardInfo]) -> None:
    """Mark a block's indices written; raises on an index outside 0..space-1 or one already written."""
    outside = np.flatnonzero((index < 0) | (index >= space))
    if len(outside):
        r = int(outside[0])
        raise ScoreFileError(f"{path}: {group} row {start + r} has index {int(index[r])}, outside the job's plan "
                             f"0..{space - 1}; a shard file does not match the plan")
    order = None if np.all(index[1:] > index[:-1]) else np.argsort(index, kind="stable")
    ranked = index if order is None else index[order]
    byte, bit = ranked >> 3, np.left_shift(1, ranked & 7).astype(np.uint8)
    taken = (seen[byte] & bit) != 0
    taken[1:] |= ranked[1:] == ranked[:-1]                         # repeated within the block
    if taken.any():
        i = int(ranked[np.flatnonzero(taken)[0]])
        owner = _first_holder(group, i, shards)
        raise ScoreFileError(f"{path}: {group} index {i} is also in {owner.name} (overlapping shards)")
    starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
    seen[byte[starts]] |= np.bitwise_or.reduceat(bit, starts)


def _target(index: np.ndarray, order: np.ndarray | None):
    """Where a block's rows go in the merged datasets: a slice for consecutive indices, else a sorted list."""
    ranked = index if order is None else index[order]
    if len(ranked) and ranked[-1] - ranked[0] + 1 == len(ranked):
        return slice(int(ranked[0]), int(ranked[-1]) + 1)
    return ranked.tolist()


def _first_holder(group: str, i: int, shards: list[ShardInfo]) -> Path:
    """The first shard file (in merge order) whose `group` holds index i: the other side of an overlap."""
    for shard in shards:
        with open_h5(shard.path, "r") as src:
            d = src[group]["index"]
            for a in range(0, d.shape[0], 1 << 20):
                if np.any(read_checked(shard.path, f"{group}/index", d, slice(a, a + (1 << 20))) == i):
                    return shard.path
    return shards[-1].path


def _check_finite(path: Path, group: str, key: str, grp, values: np.ndarray, start: int, index: np.ndarray,
                  ks: list[int], block: int) -> None:
    """Every value of a block finite, else a ScoreFileError naming file, group, field, row and column."""
    flat = values.reshape(len(values), -1)                          # rows, columns
    finite = np.isfinite(flat).all(1)
    if finite.all():
        return
    r = int(np.flatnonzero(~finite)[0])
    j = int(np.flatnonzero(~np.isfinite(flat[r]))[0])
    count = int((~finite).sum())
    d = grp[key]
    for a in range(start + len(values), d.shape[0], block):        # how many such rows in the rest of the shard
        rest = read_checked(path, f"{group}/{key}", d, slice(a, a + block))
        count += int((~np.isfinite(rest.reshape(len(rest), -1)).all(1)).sum())
    column = ""
    if values.ndim == 2:
        column = f", column {j}" + (f" (k={ks[j]})" if key in ("lk", "llr") and j < len(ks) else "")
    raise ScoreFileError(
        f"{path}: {group}/{key} is {flat[r, j]} in row {start + r}{column} (dataset index {int(index[r])}), "
        f"a row marked complete ({count} such rows in {key}); the model gives a non-finite bound there "
        "or the file was edited. Check the checkpoint (a diverged run?), then delete this shard file and re-run "
        "the shard")
