"""Merge the shard files of one scoring job into OUT/scores.h5, refusing anything doubtful.

Checks, each failure a ScoreFileError naming the file and the problem: at least one shard file; no
shard held by a running `hvae score` (its lock); every file readable and every dataset's Fletcher32
checksum correct (`read_scores`); the current format version; one shard count across file names and
attributes; shards 0..N-1 all present; the same identity attributes (model sha256, S, ks, seed,
datasets, ...) in every shard; every row complete and every value of it finite; no index in two
shards; and per dataset the union of the shards' indices is exactly 0..size-1. The merged file has the
shard files' attributes minus shard / num_shards and groups without `complete`, rows sorted by index,
with checksums; it is built in memory and written atomically (`score.atomic`).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from hvae_dist.errors import ScoreFileError
from hvae_dist.files import hdf5_image, write_bytes_atomic
from hvae_dist.score.layout import (
    FORMAT_VERSION,
    IDENTITY_ATTRS,
    SHARD_ATTRS,
    VALUE_FIELDS,
    create_checked,
    format_error,
    write_attrs,
)
from hvae_dist.score.plan import SHARD_PATTERN, shard_filename
from hvae_dist.score.reader import read_scores
from hvae_dist.score.writer import lock_shard

MERGED_NAME = "scores.h5"


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


def merge_shards(out: str | Path) -> Path:
    """Validate the shards in `out` and write `out`/scores.h5; returns its path."""
    out = Path(out)
    if not out.is_dir():
        raise ScoreFileError(f"{out}: no such folder")
    found = find_shards(out)
    num_shards = next(iter(found.values()))[0]
    missing = [shard_filename(i, num_shards) for i in range(num_shards) if i not in found]
    if missing:
        raise ScoreFileError(f"{out}: {len(missing)} of {num_shards} shard files missing: {', '.join(missing[:10])}"
                             f"{' ...' if len(missing) > 10 else ''}; run those shards, then merge again")
    shards = []
    for i in range(num_shards):
        path = found[i][1]
        lock = lock_shard(path)                  # not while `hvae score` writes it
        try:
            groups, attrs = read_scores(path)
        finally:
            lock.release()
        if attrs.get("format_version") != FORMAT_VERSION:
            raise format_error(path, attrs.get("format_version"), "merge")
        if attrs.get("shard") != i or attrs.get("num_shards") != num_shards:
            raise ScoreFileError(f"{path}: attributes say shard {attrs.get('shard')} of {attrs.get('num_shards')}, "
                                 f"the file name says {i} of {num_shards}")
        shards.append((path, attrs, groups))
    ref_path, ref_attrs, _ = shards[0]
    for path, attrs, _ in shards[1:]:
        for key in IDENTITY_ATTRS:
            if attrs.get(key) != ref_attrs.get(key):
                what = "another model (checkpoint sha256)" if key == "model_sha256" else f"other settings ({key})"
                raise ScoreFileError(f"{path}: made with {what} than {ref_path.name}: {key}={attrs.get(key)!r} vs "
                                     f"{ref_attrs.get(key)!r}; these shards cannot be merged")
    merged: dict[str, dict[str, np.ndarray]] = {}
    for g in ref_attrs["datasets"]:
        owner: dict[int, Path] = {}
        for path, _, groups in shards:
            data = groups[g]
            if "complete" not in data or "index" not in data:
                raise ScoreFileError(f"{path}: {g} has no 'complete' / 'index' dataset; not a shard file")
            incomplete = np.flatnonzero(~data["complete"].astype(bool))
            if len(incomplete):
                raise ScoreFileError(f"{path}: {g} has {len(incomplete)} incomplete rows (first: dataset index "
                                     f"{int(data['index'][incomplete[0]])}); re-run that shard to finish it")
            check_finite(path, g, data, ref_attrs["ks"])
            for i in data["index"].tolist():
                if i in owner:
                    raise ScoreFileError(f"{path}: {g} index {i} is also in {owner[i].name} (overlapping shards)")
                owner[i] = path
        size = int(ref_attrs["dataset_sizes"][g])
        if len(owner) != size or (size and (min(owner) != 0 or max(owner) != size - 1)):
            raise ScoreFileError(f"{out}: {g} covers {len(owner)} distinct indices but the job planned 0..{size - 1}; "
                                 "a shard file does not match the plan")
        keys = [k for k in shards[0][2][g] if k != "complete"]
        index = np.concatenate([s[2][g]["index"] for s in shards])
        order = np.argsort(index, kind="stable")
        merged[g] = {k: np.concatenate([s[2][g][k] for s in shards])[order] for k in keys}
    attrs = ({k: v for k, v in ref_attrs.items() if k not in SHARD_ATTRS and k != "created"}
             | {"created": ref_attrs.get("created", ""), "merged_shards": num_shards})

    def build(f) -> None:
        write_attrs(f, attrs)
        for g, data in merged.items():
            grp = f.create_group(g)
            for k, v in data.items():
                create_checked(grp, k, v)

    return write_bytes_atomic(out / MERGED_NAME, hdf5_image(build))


def check_finite(path: Path, group: str, data: dict[str, np.ndarray], ks: list[int]) -> None:
    """Every value of every complete row is finite, else a ScoreFileError naming file, group, field and row."""
    complete = np.flatnonzero(data["complete"].astype(bool) if "complete" in data else np.ones(len(data["index"]), bool))
    for key in [k for k in data if k in VALUE_FIELDS or k.startswith("complexity_")]:
        values = data[key][complete].reshape(len(complete), -1)             # rows, columns
        bad_rows = np.flatnonzero(~np.isfinite(values).all(1))
        if not len(bad_rows):
            continue
        r = int(bad_rows[0])
        j = int(np.flatnonzero(~np.isfinite(values[r]))[0])
        row = int(complete[r])
        column = ""
        if data[key].ndim == 2:
            column = f", column {j}" + (f" (k={ks[j]})" if key in ("lk", "llr") and j < len(ks) else "")
        raise ScoreFileError(
            f"{path}: {group}/{key} is {values[r, j]} in row {row}{column} (dataset index {int(data['index'][row])}), "
            f"a row marked complete ({len(bad_rows)} such rows in {key}); the model gives a non-finite bound there "
            "or the file was edited. Check the checkpoint (a diverged run?), then delete this shard file and re-run "
            "the shard")
