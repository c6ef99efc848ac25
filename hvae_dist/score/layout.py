"""The HDF5 score-file layout: names, attributes and how they are stored (shared by writer, reader, merge).

One group per dataset, named "<Name>/<split>" (e.g. "FashionMNIST/test"), N rows:

    index (N,) int64   elbo, elbo_1, bpd (N,) float64   lk, llr (N, K) float64   kl (N, L) float64
    [complexity_png, complexity_zlib (N,) float64 with --complexity]    complete (N,) bool (shard files)

Root attributes: `IDENTITY_ATTRS` (the settings a resumed shard and a merge must agree on) plus
model_checkpoint, package_version, config, created, shard / num_shards in shard files and
merged_shards in scores.h5. JSON_ATTRS are stored as JSON strings and read back parsed.

Storage (format 2): every dataset is chunked by CHUNK_ROWS rows (all columns in one chunk) with a
Fletcher32 checksum per chunk, which HDF5 verifies on every read (`create_checked`). A batch write
rewrites only the chunks its rows fall in (one or two for up to 1024 rows: 8 KiB each of a float64
column), and a rewritten chunk keeps its size and place, so a pre-sized shard file still never changes
its HDF5 metadata after creation. Format 1 (contiguous, no checksums) is still read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from hvae_dist.errors import ScoreFileError

FORMAT_VERSION = 2
"""2: chunked datasets with Fletcher32 checksums. 1: contiguous, unchecked (readable, not resumable or mergeable)."""
CHUNK_ROWS = 1024
IDENTITY_ATTRS = ("format_version", "model_sha256", "iw_samples", "iw_samples_lk", "ks", "seed", "dtype", "ema",
                  "binarize", "num_layers", "datasets", "dataset_sizes", "complexity")
SHARD_ATTRS = ("shard", "num_shards")
VALUE_FIELDS = ("elbo", "elbo_1", "lk", "llr", "kl", "bpd")
REQUIRED_FIELDS = ("index", *VALUE_FIELDS)
JSON_ATTRS = ("config", "datasets", "dataset_sizes", "complexity")


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (the checkpoint the scores come from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def normalize_attr(key: str, value: Any) -> Any:
    """An HDF5 attribute as plain Python: JSON attributes parsed, arrays as lists, numpy scalars as Python."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if key in JSON_ATTRS and isinstance(value, str):
        return json.loads(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(f) -> dict:
    return {k: normalize_attr(k, v) for k, v in f.attrs.items()}


def write_attrs(f, attrs: dict) -> None:
    for key, value in attrs.items():
        if key in JSON_ATTRS and not isinstance(value, str):
            value = json.dumps(value, sort_keys=True)
        elif key == "ks":
            value = np.asarray(value, dtype=np.int64)
        f.attrs[key] = value


def create_checked(group, name: str, data: np.ndarray):
    """group[name] = data as a chunked dataset with a Fletcher32 checksum per chunk (the format-2 storage).

    Chunks hold CHUNK_ROWS rows and every column; an axis of length 0 is made extensible, because HDF5
    chunks have at least one element per axis.
    """
    data = np.asarray(data)
    return group.create_dataset(name, data=data, fletcher32=True, **checked_storage(data.shape))


def checked_storage(shape: tuple[int, ...]) -> dict[str, tuple]:
    """chunks and maxshape of a format-2 dataset of `shape` (see `create_checked`); with `fletcher32=True`
    they make the storage of `create_checked`, e.g. for a dataset created empty and filled block by block."""
    chunks = tuple([max(1, min(shape[0], CHUNK_ROWS))] + [max(1, d) for d in shape[1:]])
    maxshape = tuple(None if d == 0 else d for d in shape)
    return {"chunks": chunks, "maxshape": maxshape}


def read_checked(path: Path, name: str, dset, rows: slice = slice(None)) -> np.ndarray:
    """`rows` (default: all) of h5py dataset `dset` (its name in the file: `name`); a failed read, such as a
    chunk whose Fletcher32 checksum does not match, is a ScoreFileError naming the file and the dataset."""
    try:
        return np.asarray(dset[()] if rows == slice(None) else dset[rows])
    except OSError as e:
        what = "fails its Fletcher32 checksum" if dset.fletcher32 else "cannot be read"
        raise ScoreFileError(f"{path}: dataset '{name}' {what} (HDF5: {e}); the file is damaged (a flipped bit, "
                             "a torn copy): delete it and re-run the job or shard that wrote it") from e


def format_error(path: Path, found: Any, what: str) -> ScoreFileError:
    """The refusal of a score file of another format version (resume, merge)."""
    return ScoreFileError(f"{path}: score-file format {found!r}, but this version of hvae-dist writes format "
                          f"{FORMAT_VERSION} (chunks with Fletcher32 checksums) and cannot {what} older files; "
                          "delete it and re-run the shard (or use another --out)")


def open_h5(path: Path, mode: str):
    """h5py.File or ScoreFileError naming the file (truncated / not HDF5 / locked)."""
    import h5py

    try:
        return h5py.File(path, mode)
    except (OSError, ValueError) as e:
        raise ScoreFileError(f"{path}: cannot be opened as an HDF5 score file ({e}). It is truncated, corrupt or "
                             f"in use by another process; if no job is writing it, delete it and re-run") from e
