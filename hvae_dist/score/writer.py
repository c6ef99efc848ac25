"""The shard writer: pre-sized HDF5 shard files, flushed batch by batch, resumable (layout: `score.layout`).

Crash safety. A shard file is built in memory with every dataset allocated at full size (index filled
from the plan, values NaN, complete False; chunked, with Fletcher32 checksums, see `score.layout`) and
written atomically (`hvae_dist.files`: temp file, fsync, rename), so a full disk leaves no file and no
later write changes HDF5 metadata. A batch's values are written and flushed (H5Fflush) *before* its rows' complete
flags are set and flushed, so after a crash (even SIGKILL) every row flagged complete holds its final
values and a re-run recomputes at most the batch that was in flight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hvae_dist.errors import ScoreFileError
from hvae_dist.files import hdf5_image, with_path, write_bytes_atomic
from hvae_dist.locking import FileLock
from hvae_dist.score.layout import (
    FORMAT_VERSION,
    IDENTITY_ATTRS,
    LID_FIELDS,
    SHARD_ATTRS,
    create_checked,
    format_error,
    normalize_attr,
    open_h5,
    read_attrs,
    read_checked,
    write_attrs,
)
from hvae_dist.score.plan import shard_lock_path


@dataclass
class GroupSpec:
    """One dataset group of a shard: its rows (`index`, positions in the source dataset) and widths."""

    name: str
    index: np.ndarray
    num_layers: int
    num_ks: int
    complexity: list = field(default_factory=list)
    static: dict = field(default_factory=dict)
    """Per-row datasets known before scoring (`label` int64, `path` fixed-length bytes), written with `index`."""
    attrs: dict = field(default_factory=dict)
    """Attributes of the group (a file dataset's `source`, `source_sha256`, `classes`)."""
    lid_shape: tuple[int, int] | None = None    # (K_lid, S_lid) with --lid
    extra: dict = field(default_factory=dict)   # field -> (shape, dtype): the baselines' (score.baseline_fields)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        n = len(self.index)
        out = {"index": ((n,), np.int64), "elbo": ((n,), np.float64), "elbo_1": ((n,), np.float64),
               "lk": ((n, self.num_ks), np.float64), "llr": ((n, self.num_ks), np.float64),
               "kl": ((n, self.num_layers), np.float64), "bpd": ((n,), np.float64)}
        for method in self.complexity:
            out[f"complexity_{method}"] = ((n,), np.float64)
        if self.lid_shape is not None:
            for key in LID_FIELDS:
                out[key] = ((n, *self.lid_shape), np.float64)
        for key, value in self.static.items():
            out[key] = ((n, *np.shape(value)[1:]), np.asarray(value).dtype)
        out.update(self.extra)
        out["complete"] = ((n,), np.bool_)
        return out


def _row_selector(rows: np.ndarray):
    """A slice when rows are consecutive (fast contiguous HDF5 write), else the sorted index list."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows.tolist()


def lock_shard(path: str | Path) -> FileLock:
    """Take the lock of shard file `path` (OUT/.shard-IIIII-of-NNNNN.lock, `plan.shard_lock_path`); held by
    `hvae score` for its whole life and by `hvae merge` while it reads the shard. LockedError names the holder."""
    lock = FileLock(shard_lock_path(path), f"shard file {path}")
    try:
        return lock.acquire()
    except OSError as e:                     # e.g. no space left for the lock file's "host pid" line
        try:
            if lock.path.stat().st_size == 0:  # made by this failed attempt: leave no empty file behind
                lock.path.unlink()
        except OSError:
            pass
        raise with_path(e, lock.path) from e


class ShardWriter:
    """Writes one shard file; `open()` creates it or resumes an existing one with the same identity.

    The caller holds the shard's lock (`hvae_dist.locking.FileLock`) from before `open()` to `close()`.
    """

    def __init__(self, path: Path, f, groups: list[GroupSpec]):
        self.path, self.f, self.groups = path, f, {g.name: g for g in groups}

    @classmethod
    def open(cls, path: str | Path, attrs: dict, groups: list[GroupSpec]) -> ShardWriter:
        path = Path(path)
        if path.exists():
            f = open_h5(path, "r+")
            try:
                cls._check_existing(path, f, attrs, groups)
            except BaseException:
                f.close()
                raise
            return cls(path, f, groups)

        def build(f) -> None:
            write_attrs(f, attrs)
            for g in groups:
                grp = f.create_group(g.name)
                grp.attrs.update(g.attrs)
                for key, (shape, dtype) in g.shapes().items():
                    if key == "index":
                        data = np.asarray(g.index, dtype=np.int64)
                    elif key in g.static:
                        data = np.asarray(g.static[key])
                    else:
                        data = np.full(shape, False if dtype is np.bool_ else np.nan, dtype=dtype)
                    create_checked(grp, key, data)   # written in full: allocated now, never resized

        write_bytes_atomic(path, hdf5_image(build))
        return cls(path, open_h5(path, "r+"), groups)

    @staticmethod
    def _check_existing(path: Path, f, attrs: dict, groups: list[GroupSpec]) -> None:
        have = read_attrs(f)
        if have.get("format_version") != FORMAT_VERSION:
            raise format_error(path, have.get("format_version"), "resume")
        want = {k: normalize_attr(k, v) for k, v in attrs.items()}
        for key in IDENTITY_ATTRS + SHARD_ATTRS:
            if have.get(key) != want.get(key):
                what = "another model (checkpoint sha256)" if key == "model_sha256" else f"other settings ({key})"
                raise ScoreFileError(
                    f"{path}: exists and was made with {what}: file has {key}={have.get(key)!r}, this run has "
                    f"{want.get(key)!r}. Use another --out folder, or delete the file to rescore this shard")
        for g in groups:
            if g.name not in f:
                raise ScoreFileError(f"{path}: group {g.name!r} is missing; the file is not from this job. Delete it")
            grp = f[g.name]
            for key, (shape, _) in g.shapes().items():
                if key not in grp or grp[key].shape != shape:
                    found = grp[key].shape if key in grp else "missing"
                    raise ScoreFileError(f"{path}: {g.name}/{key} should have shape {shape}, found {found}; "
                                         "the file is damaged or from another job. Delete it and re-run")
            if not np.array_equal(read_checked(path, f"{g.name}/index", grp["index"]), g.index):
                raise ScoreFileError(f"{path}: {g.name}/index differs from this run's shard plan "
                                     "(other --max-examples or shard count?). Delete it or use another --out")

    def pending(self, group: str) -> np.ndarray:
        """Row positions (0-based, within this shard's group) not yet complete, ascending."""
        flags = read_checked(self.path, f"{group}/complete", self.f[group]["complete"])
        return np.flatnonzero(~flags.astype(bool))

    def write(self, group: str, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Write `values` (arrays whose first axis matches rows) for `rows`, flush, then mark them complete."""
        grp, sel = self.f[group], _row_selector(np.asarray(rows))
        try:
            for key, value in values.items():
                grp[key][sel] = value
            self.f.flush()                 # values on disk before ...
            grp["complete"][sel] = True
            self.f.flush()                 # ... the flags that vouch for them
        except OSError as e:               # a damaged chunk (its checksum is checked on read-modify-write), I/O
            raise with_path(e, self.path) from e

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
