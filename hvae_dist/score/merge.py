"""Merge the shard files of one scoring job into OUT/scores.h5, refusing anything doubtful.

Checks, each failure a ScoreFileError naming the file and the problem: at least one shard file; no
shard held by a running `hvae score` (its lock); every file readable (`read_scores`) and every chunk's
Fletcher32 checksum correct as it is copied; the current format version; one shard count across file
names and attributes; shards 0..N-1 all present; the same identity attributes (model sha256, S, ks, seed,
datasets, ...) in every shard; every row complete and every value of it finite; no index in two shards
(or twice in one); and per dataset the union of the shards' indices is exactly 0..size-1 (a shard may
hold 0 rows of a dataset: more shards than examples). The merged file has the shard files' attributes
minus shard / num_shards and every dataset of every group but `complete` (whatever its name and dtype),
rows sorted by index, with checksums.

Memory does not grow with the number of rows: the first pass reads each shard's attributes and index,
the second (`merge_rows.copy_group`) checks and copies the rows block by block into a temp file in OUT
(`files.write_hdf5_atomic`: space reserved first, fsync, rename), so an interrupted or failed merge leaves
the previous scores.h5 or the new one, never a part, and no temp file that the next merge does not remove.

A scores.h5 of another job (other identity attributes) is never replaced silently: merge refuses, naming
the settings of both, and with force=True (`--force`) replaces it, keeping the old file as
OUT/scores.replaced-<UTC time>.h5.
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import sys
import time
from pathlib import Path

from hvae_dist.errors import LockedError, ScoreFileError
from hvae_dist.files import remove_stale_temps, write_hdf5_atomic
from hvae_dist.score.layout import (
    FORMAT_VERSION,
    IDENTITY_ATTRS,
    SHARD_ATTRS,
    format_error,
    index_space,
    open_h5,
    read_attrs,
    write_attrs,
)
from hvae_dist.score.merge_rows import ShardInfo, copy_group
from hvae_dist.score.plan import SHARD_PATTERN, shard_filename
from hvae_dist.score.reader import read_scores
from hvae_dist.score.writer import lock_shard

MERGED_NAME = "scores.h5"
RESERVE_SLACK = 1.05
"""The merged file is reserved at 5% (+ 1 MiB) above the shard files' total size, which it never exceeds
(the same rows without the `complete` flags, in fewer, fuller chunks)."""


def find_shards(out: Path) -> dict[int, tuple[int, Path]]:
    """shard index -> (num_shards from the name, path) of every shard file in `out`."""
    found: dict[int, tuple[int, Path]] = {}
    counts = set()
    for p in sorted(out.iterdir()):
        m = re.fullmatch(SHARD_PATTERN, p.name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), p)
            counts.add(int(m.group(2)))
    if not found:
        raise ScoreFileError(f"{out}: no shard files (shard-IIIII-of-NNNNN.h5) to merge; run `hvae score --out {out}` first")
    if len(counts) > 1:
        raise ScoreFileError(f"{out}: shard files of different shard counts {sorted(counts)} (left over from another "
                             "run?); keep only one job's shards in this folder")
    return found


def merge_shards(out: str | Path, force: bool = False) -> Path:
    """Validate the shards in `out` and write `out`/scores.h5; returns its path (see the module docstring)."""
    out = Path(out)
    if not out.is_dir():
        raise ScoreFileError(f"{out}: no such folder")
    target = out / MERGED_NAME
    live = remove_stale_temps(target)          # temp files of merges that were killed; a live one stops us
    if live:
        raise LockedError(f"{target} is being written by another `hvae merge` (process {live[0]}, temp file "
                          f".{MERGED_NAME}.{live[0]}.tmp); wait for it to finish")
    found = find_shards(out)
    num_shards = next(iter(found.values()))[0]
    missing = [shard_filename(i, num_shards) for i in range(num_shards) if i not in found]
    if missing:
        raise ScoreFileError(f"{out}: {len(missing)} of {num_shards} shard files missing: {', '.join(missing[:10])}"
                             f"{' ...' if len(missing) > 10 else ''}; run those shards, then merge again")
    with contextlib.ExitStack() as locks:     # every shard locked for the whole merge: no `hvae score` writes one
        _allow_open_files(num_shards + 64)
        shards = [_inspect(found[i][1], i, num_shards, locks) for i in range(num_shards)]
        return _merge(out, target, shards, force)


def _merge(out: Path, target: Path, shards: list[ShardInfo], force: bool) -> Path:
    """The checks across shards, then the streamed write of `target`."""
    num_shards = len(shards)
    ref = shards[0]
    for shard in shards[1:]:
        for key in IDENTITY_ATTRS:
            if shard.attrs.get(key) != ref.attrs.get(key):
                what = "another model (checkpoint sha256)" if key == "model_sha256" else f"other settings ({key})"
                raise ScoreFileError(f"{shard.path}: made with {what} than {ref.path.name}: {key}="
                                     f"{shard.attrs.get(key)!r} vs {ref.attrs.get(key)!r}; these shards cannot be merged")
    sizes = {g: int(ref.attrs["dataset_sizes"][g]) for g in ref.attrs["datasets"]}
    for g, size in sizes.items():
        rows = sum(s.rows[g] for s in shards)
        if rows != size:
            raise ScoreFileError(f"{out}: {g} has {rows} rows in the shard files but the job planned {size} "
                                 f"(0..{size - 1}); a shard file does not match the plan")
    attrs = ({k: v for k, v in ref.attrs.items() if k not in SHARD_ATTRS and k != "created"}
             | {"created": ref.attrs.get("created", ""), "merged_shards": num_shards})
    backup = _other_job(target, attrs, force)
    ks = [int(k) for k in ref.attrs["ks"]]

    def build(f, check) -> None:
        write_attrs(f, attrs)
        for g, size in sizes.items():
            copy_group(f, g, shards, size, ks, check, space=index_space(ref.attrs, g))

    def keep_old() -> None:
        try:
            os.link(target, backup)
        except OSError:                        # no hard links here: move it (scores.h5 is absent for a moment)
            os.replace(target, backup)

    reserve = int(sum(s.path.stat().st_size for s in shards) * RESERVE_SLACK) + (1 << 20)
    path = write_hdf5_atomic(target, build, reserve, before_replace=keep_old if backup else None)
    if backup:
        print(f"hvae merge: replaced {target} of another job; the old file is {backup}", file=sys.stderr)
    return path


def _allow_open_files(n: int) -> None:
    """Raise this process's soft limit of open files to n (a lock per shard), as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


def _inspect(path: Path, i: int, num_shards: int, locks: contextlib.ExitStack) -> ShardInfo:
    """A shard's attributes and rows per group, its layout checked (`read_scores` reads only the index); its
    lock is taken and released by `locks`."""
    locks.callback(lock_shard(path).release)   # not while `hvae score` writes it
    attrs = read_scores(path, fields={}).attrs
    if attrs.get("format_version") != FORMAT_VERSION:
        raise format_error(path, attrs.get("format_version"), "merge")
    lacking = [k for k in ("datasets", "dataset_sizes") if not isinstance(attrs.get(k), (list, dict))]
    if lacking:
        raise ScoreFileError(f"{path}: root attribute(s) {', '.join(lacking)} missing; not a shard file of hvae score")
    if attrs.get("shard") != i or attrs.get("num_shards") != num_shards:
        raise ScoreFileError(f"{path}: attributes say shard {attrs.get('shard')} of {attrs.get('num_shards')}, "
                             f"the file name says {i} of {num_shards}")
    groups = read_scores(path, fields=dict.fromkeys(attrs["datasets"], ())).groups
    for g in attrs["datasets"]:
        if "complete" not in groups[g] or "index" not in groups[g]:
            raise ScoreFileError(f"{path}: {g} has no 'complete' / 'index' dataset; not a shard file")
    return ShardInfo(path, attrs, {g: len(groups[g]["index"]) for g in attrs["datasets"]})


def _other_job(target: Path, attrs: dict, force: bool) -> Path | None:
    """None when `target` is absent or holds this job's scores (same identity attributes: a re-merge); else
    the name to keep it under when force is set, else a ScoreFileError naming both jobs' settings."""
    if not target.exists():
        return None
    try:
        with open_h5(target, "r") as f:
            old = read_attrs(f)
    except (ScoreFileError, OSError, ValueError) as e:
        found = f"or none: it cannot be read, {e}"
    else:
        diff = [k for k in IDENTITY_ATTRS if old.get(k) != attrs.get(k)]
        if not diff:
            return None
        found = "; ".join(f"{k} {_short(k, old.get(k))} there, {_short(k, attrs.get(k))} in the shards" for k in diff)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = target.with_name(f"scores.replaced-{stamp}.h5")
    n = 1
    while backup.exists():
        n += 1
        backup = target.with_name(f"scores.replaced-{stamp}-{n}.h5")
    if not force:
        raise ScoreFileError(f"{target}: holds the scores of another job ({found}); merging these shards would "
                             f"replace them. Merge in another folder, or pass --force to replace it (the old file is "
                             f"kept as {backup.name})")
    return backup


def _short(key: str, value) -> str:
    """An attribute for a message: a checkpoint's sha256 by its first 12 digits, else repr."""
    if key == "model_sha256" and isinstance(value, str):
        return value[:12]
    return repr(value)
