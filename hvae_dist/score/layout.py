"""The HDF5 score-file layout: names, attributes and how they are stored (shared by writer, reader, merge).

One group per dataset, named "<Name>/<split>" (e.g. "FashionMNIST/test"), N rows:

    index (N,) int64   elbo, elbo_1, bpd (N,) float64   lk, llr (N, K) float64   kl (N, L) float64
    [complexity_png, complexity_zlib (N,) float64 with --complexity]    complete (N,) bool (shard files)
    [elbo_refit, likelihood_regret (N,) float64 with --likelihood-regret; grad_norm (N, G) float64 with
     --gradients: `BASELINE_FIELDS`, documented in score.baseline_fields]
    [lid, lid_lin (N, K_lid, S_lid) float64 with --lid: LID counts / linearised LIDs per lid k and scale]

Since issue 21 a group may also hold `label` (N,) int64 (the row's class, -1 unknown) and, for a folder
of images, `path` (N,) fixed-length bytes (the image's path relative to the folder); a file dataset's group
has attributes `source` (the full path, with #KEY) and `source_sha256` (its content hash), and `index` is the
position in the source split (a random subset is sparse; `source_sizes` gives the split's rows).

Root attributes: `IDENTITY_ATTRS` (the settings a resumed shard and a merge must agree on; `precision` is the
network's, was `dtype` before issue 24 and is still read) plus model_checkpoint, checkpoint_step, package_version,
config, created, shard / num_shards in shard files and merged_shards in scores.h5. JSON_ATTRS are stored as
JSON strings and read back parsed. Every dataset has `units` and `description` attributes (`FIELD_DOCS`).

Storage (format 2): every dataset is chunked by CHUNK_ROWS rows (all columns in one chunk) with a
Fletcher32 checksum per chunk, which HDF5 verifies on every read (`create_checked`). A batch write
rewrites only the chunks its rows fall in (one or two for up to 1024 rows: 8 KiB each of a float64
column), and a rewritten chunk keeps its size and place, so a pre-sized shard file still never changes
its HDF5 metadata after creation. Format 1 (contiguous, no checksums) is still read.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from hvae_dist.errors import ScoreFileError

FORMAT_VERSION = 2
"""2: chunked datasets with Fletcher32 checksums. 1: contiguous, unchecked (readable, not resumable or mergeable)."""
READABLE_FORMATS = (1, FORMAT_VERSION)
CHUNK_ROWS = 1024
IDENTITY_ATTRS = ("format_version", "model_sha256", "iw_samples", "iw_samples_lk", "ks", "seed", "precision", "ema",
                  "binarize", "num_layers", "datasets", "dataset_sizes", "complexity", "source_sha256", "lid",
                  "likelihood_regret", "gradients")
SHARD_ATTRS = ("shard", "num_shards")
VALUE_FIELDS = ("elbo", "elbo_1", "lk", "llr", "kl", "bpd")
REQUIRED_FIELDS = ("index", *VALUE_FIELDS)
JSON_ATTRS = ("config", "datasets", "dataset_sizes", "complexity", "source_sizes", "source_sha256", "row_selection",
              "lid", "likelihood_regret", "gradients")
LID_FIELDS = ("lid", "lid_lin")
"""With --lid (attribute `lid`: scales, ks, rank, ...; `hvae_dist.estimators.lid`): (N, len(ks), len(scales))."""
BASELINE_FIELDS = ("elbo_refit", "likelihood_regret", "grad_norm")
"""Optional per-example fields of the baselines (`hvae score --likelihood-regret / --gradients`; score.baseline_fields)."""
PROVENANCE_ATTRS = ("checkpoint_file", "source_sizes", "source_sha256", "row_selection")
"""Root attributes of issue 21 (absent in older files, which stay readable): the numbered checkpoint file of
the scored checkpoint's step (`checkpoint_step`; latest.pt is rewritten by more training), the rows of
each source split (`index` is a position in it), each file dataset's content hash, and how the rows were chosen."""
LABEL_UNKNOWN = -1
"""The `label` of a row whose class is unknown (per-row `label` int64; folders also store `path`)."""


FIELD_DOCS: dict[str, tuple[str, str]] = {
    "index": ("row", "position of the example in its dataset NAME:SPLIT (the source's order)"),
    "elbo": ("nats", "importance-weighted ELBO with iw_samples samples: a lower bound on log p(x)"),
    "elbo_1": ("nats", "mean single-sample ELBO over the iw_samples samples"),
    "lk": ("nats", "L>k bound, one column per k of the root attribute ks (layers 1..k decoded from the prior)"),
    "llr": ("nats", "likelihood ratio LLR>k = elbo - L>k, one column per k of the root attribute ks"),
    "kl": ("nats", "KL term of each latent layer, one column per layer (1 = bottom), mean over the samples"),
    "bpd": ("bits/dim", "-elbo in bits per dimension: -elbo / (C * H * W * ln 2)"),
    "complete": ("flag", "true once the row's values are on disk (shard files; resume and merge read it)"),
    "complexity_png": ("nats", "PNG-compressed size of the image (Serra et al. 2020's complexity L(x))"),
    "complexity_zlib": ("nats", "zlib-compressed size of the image (a complexity L(x))"),
    "lid": ("dimensions", "#singular values above delta of d(decoder mean)/d(z>k), per k of attr lid.ks (axis 1) and "
                          "delta of lid.scales (axis 2)"),
    "lid_lin": ("dimensions", "sum s^2 / (s^2 + delta^2) over the singular values s of d(decoder mean)/d(z>k), per k "
                              "of attr lid.ks (axis 1) and delta of lid.scales (axis 2)"),
    "label": ("class", "the row's class label as its source gives it, -1 where unknown"),
    "path": ("path", "an image folder's row: the image's path relative to the folder (UTF-8 bytes)"),
    "elbo_refit": ("nats", "IW ELBO after Likelihood Regret's per-example encoder refit (the noise of elbo)"),
    "likelihood_regret": ("nats", "Likelihood Regret = elbo_refit - elbo (Xiao et al. 2020)"),
    "grad_norm": ("norm", "per-layer L2 norm of the gradient of ELBO_1, columns: root attribute gradients.layers"),
}
"""Per dataset of a score-file group: (units, description), stored as the dataset's `units` and `description`
attributes (`describe`); the names of the values are those of `hvae_dist.estimators.names`."""

PRECISION_ATTR, LEGACY_PRECISION_ATTR = "precision", "dtype"
"""The root attribute with the network's precision (fp32 / bf16 / fp16; the arrays are float64 whatever it is);
files before issue 24 named it `dtype`, which `read_attrs` still reads as `precision`."""


def describe(dset, name: str) -> None:
    """Set the `units` and `description` attributes of h5py dataset `dset` of field `name` (when known)."""
    if name in FIELD_DOCS:
        units, description = FIELD_DOCS[name]
        dset.attrs["units"], dset.attrs["description"] = units, description


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
    """The root attributes as plain Python; a file's legacy `dtype` is also given as `precision`."""
    attrs = {k: normalize_attr(k, v) for k, v in f.attrs.items()}
    if PRECISION_ATTR not in attrs and LEGACY_PRECISION_ATTR in attrs:
        attrs[PRECISION_ATTR] = attrs[LEGACY_PRECISION_ATTR]
    return attrs


def check_attrs(path: Path, attrs: dict) -> dict:
    """The root attributes of a score file, vouched for before any value is used (merge, analyze, resume):
    `format_version` an int this version reads (not a string, not missing: a format-2 file must have
    checksums, so a wrong version would skip that check); `ks` present, integers >= 0, strictly increasing
    (the order the scorer writes; a file whose ks were rewritten, e.g. [2, 1], would silently swap the
    columns of LLR>1 and LLR>2) and below num_layers when that is stored. Returns `attrs` with ks as a list
    of int; any problem is a ScoreFileError naming the file and the attribute."""
    version = attrs.get("format_version")
    readable = " and ".join(map(str, READABLE_FORMATS))
    if version is None:
        raise ScoreFileError(f"{path}: root attribute 'format_version' is missing; not a score file of hvae-dist "
                             f"(this version reads formats {readable})")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ScoreFileError(f"{path}: root attribute 'format_version' is {version!r} ({type(version).__name__}), "
                             f"not an integer; hvae-dist writes an integer (this version reads formats {readable}): "
                             "the file was rewritten by another tool")
    if version not in READABLE_FORMATS:
        newer = " (written by a newer hvae-dist: upgrade to read it)" if version > FORMAT_VERSION else ""
        raise ScoreFileError(f"{path}: score-file format {version}{newer}; this version of hvae-dist reads formats "
                             f"{readable}")
    if "ks" not in attrs:
        raise ScoreFileError(f"{path}: root attribute 'ks' (the list of k of L>k) is missing")
    raw = np.atleast_1d(np.asarray(attrs["ks"]))
    if raw.ndim != 1 or not (raw.size == 0 or np.issubdtype(raw.dtype, np.integer)):
        raise ScoreFileError(f"{path}: root attribute 'ks' is {attrs['ks']!r}; expected a list of integers")
    ks = [int(k) for k in raw]
    if any(k < 0 for k in ks) or any(b <= a for a, b in itertools.pairwise(ks)):
        raise ScoreFileError(f"{path}: root attribute 'ks' is {ks}; hvae score writes distinct k >= 0 in increasing "
                             "order, so the columns of lk / llr cannot be told apart: the file was edited")
    layers = attrs.get("num_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and ks and ks[-1] >= layers:
        raise ScoreFileError(f"{path}: root attribute 'ks' is {ks} but num_layers is {layers}; each k must be in "
                             f"0..{layers - 1}")
    return {**attrs, "ks": ks}


def index_space(attrs: dict, group: str) -> int | None:
    """The rows of `group`'s source split (indices lie in 0..space-1): `source_sizes`, else (older files, or a
    job that scores every row or the first N) `dataset_sizes`; None when neither is stored."""
    for key in ("source_sizes", "dataset_sizes"):
        sizes = attrs.get(key)
        if isinstance(sizes, dict) and isinstance(sizes.get(group), int):
            return int(sizes[group])
    return None


def check_index(path: Path, group: str, index: np.ndarray, size: int | None = None) -> None:
    """A group's `index` (N,) int: every row a distinct example, in 0..size-1 when the planned size is known.
    A repeated index would count one example twice in every metric."""
    if index.size and not np.issubdtype(index.dtype, np.integer):
        raise ScoreFileError(f"{path}: '{group}/index' has dtype {index.dtype}; expected integers")
    values, counts = np.unique(index, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise ScoreFileError(f"{path}: '{group}/index' repeats {dup.size} example(s) (e.g. index {int(dup[0])}, "
                             f"{int(counts[counts > 1][0])} rows); every row must be a distinct example: the file was "
                             "edited or merged by another tool")
    if values.size and (values[0] < 0 or (size is not None and values[-1] >= size)):
        bad = int(values[0]) if values[0] < 0 else int(values[-1])
        raise ScoreFileError(f"{path}: '{group}/index' holds {bad}, outside the job's 0..{'' if size is None else size - 1}")


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
    # Created empty, described, filled, flushed: what the streamed merge does (merge_rows.copy_group), so that
    # both lay out a file byte for byte alike.
    dset = group.create_dataset(name, shape=data.shape, dtype=data.dtype, fletcher32=True,
                                **checked_storage(data.shape))
    describe(dset, name)
    if data.size:
        dset[...] = data
        dset.flush()
    return dset


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
