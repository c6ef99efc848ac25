"""The one reader of score files (a merged scores.h5 or a shard), numpy only; analysis builds on it.

    >>> groups, attrs = read_scores("scores/run/scores.h5")
    >>> attrs["ks"], attrs["iw_samples"]
    >>> groups["FashionMNIST/test"]["llr"][:, 0]      # LLR>ks[0] per example, nats

Attributes come back as Python values (`ks` a list of int; config, datasets, dataset_sizes and
complexity parsed from JSON). Groups are those listed in attrs["datasets"] (file order), else every
"<Name>/<split>" group that holds datasets. The root attributes are vouched for by `layout.check_attrs`
(an integer format version this version reads; ks distinct and increasing) and every group is checked
against the layout of `hvae_dist.score.layout` (all fields present, shapes consistent with ks and
num_layers; `layout.check_index`: no example twice); shard files keep their `complete` flags. HDF5
verifies every chunk's Fletcher32 checksum as it reads it, and a format-2 file (the current one) must
have checksums on every dataset. Any problem is a ScoreFileError naming the file, the group and the
field (a failed checksum: the dataset).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hvae_dist.errors import ScoreFileError
from hvae_dist.estimators import names
from hvae_dist.score.layout import (
    REQUIRED_FIELDS,
    check_attrs,
    check_index,
    index_space,
    open_h5,
    read_attrs,
    read_checked,
)


class ScoreFile(NamedTuple):
    """What `read_scores` returns; unpacks as ``groups, attrs = read_scores(path)``."""

    groups: dict[str, dict[str, np.ndarray]]  # "FashionMNIST/test" -> {"elbo": (N,), "lk": (N, K), ...}
    attrs: dict[str, Any]                     # root attributes as Python values


def _group_names(path: Path, f, attrs: dict) -> list[str]:
    import h5py

    if attrs.get("datasets"):
        return list(attrs["datasets"])
    found: dict[str, None] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.setdefault(name.rsplit("/", 1)[0] if "/" in name else "", None)

    f.visititems(visit)
    if "" in found:
        raise ScoreFileError(f"{path}: datasets at the file root; scores must live in '<Dataset>/<split>' groups")
    if not found:
        raise ScoreFileError(f"{path}: contains no score groups")
    return sorted(found)


def read_scores(path: str | Path, fields: Mapping[str, Collection[str]] | None = None) -> ScoreFile:
    """Read every score group of `path` into numpy arrays (see the module docstring).

    With `fields` ({group: dataset names}), only those are read, to keep memory to what a caller needs (e.g.
    `hvae analyze` on 10^7 rows): a named group also gets its `index`, and its other datasets are present
    as None (their names listed, their shapes still checked); a group not named is {name: None, ...}
    and not checked.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ScoreFileError(f"{path}: no such score file")
    try:
        with open_h5(path, "r") as f:
            attrs = check_attrs(path, read_attrs(f))
            checked = attrs["format_version"] >= 2
            groups = {}
            for g in _group_names(path, f, attrs):
                if g not in f or not isinstance(f[g], h5py.Group):
                    raise ScoreFileError(f"{path}: group {g!r} listed in attrs 'datasets' is missing")
                groups[g] = {}
                for k, d in f[g].items():
                    if not isinstance(d, h5py.Dataset):
                        continue
                    if checked and not d.fletcher32:
                        raise ScoreFileError(f"{path}: dataset '{g}/{k}' has no Fletcher32 checksum, which every "
                                             f"dataset of a format-{attrs['format_version']} score file has; the "
                                             "file was rewritten by another tool: re-run the job that wrote it")
                    if fields is not None and (g not in fields or k not in {"index", *fields[g]}):
                        groups[g][k] = _Unread(d.shape)
                        continue
                    groups[g][k] = read_checked(path, f"{g}/{k}", d)
    except ScoreFileError:
        raise
    except Exception as e:
        raise ScoreFileError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is damaged: "
                             "delete it and re-run the job (or the shard) that wrote it") from e
    for name, data in groups.items():
        if fields is None or name in fields:
            _validate_group(path, name, data, attrs)
    if fields is not None:
        groups = {g: {k: None if isinstance(v, _Unread) else v for k, v in data.items()} for g, data in groups.items()}
    return ScoreFile(groups, attrs)


class _Unread(NamedTuple):
    """A dataset `read_scores(fields=...)` did not read: its shape, for the checks of `_validate_group`."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _validate_group(path: Path, name: str, data: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    ks = attrs["ks"]
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise ScoreFileError(f"{path}: group '{name}' lacks dataset(s) {', '.join(missing)} "
                             f"(has: {', '.join(sorted(data)) or 'nothing'})")
    n = data["index"].shape[0] if data["index"].ndim == 1 else -1
    expect = {"index": (n,), "elbo": (n,), "elbo_1": (n,), "bpd": (n,), "lk": (n, len(ks)), "llr": (n, len(ks))}
    for key, shape in expect.items():
        if data[key].shape != shape:
            raise ScoreFileError(f"{path}: '{name}/{key}' has shape {data[key].shape}, expected {shape} "
                                 f"(N = len(index), K = len(ks) = {len(ks)})")
    layers = attrs.get("num_layers") if isinstance(attrs.get("num_layers"), int) else None
    if data["kl"].ndim != 2 or data["kl"].shape[0] != n or (layers is not None and data["kl"].shape[1] != layers):
        raise ScoreFileError(f"{path}: '{name}/kl' has shape {data['kl'].shape}, expected ({n}, "
                             f"{'L' if layers is None else layers})")
    check_index(path, name, data["index"], index_space(attrs, name))
    for key, value in data.items():
        if key not in REQUIRED_FIELDS and value.shape[:1] != (n,):
            raise ScoreFileError(f"{path}: extra dataset '{name}/{key}' has shape {value.shape}, expected ({n}, ...)")


def to_dataframe(path: str | Path):
    """The score file as one long pandas DataFrame: a row per example, columns group, dataset, split,
    index, elbo, elbo_1, bpd, lk<k>, llr<k>, kl<layer> (1 = bottom; the names of `estimators.names`, were
    lk_<k>, llr_<k>, kl_<layer> before issue 24) and any extra per-example values; nats unless bpd.
    A 2-D extra field gives a column per entry, `<field>_<label>`: grad_norm's labels are the layer names of
    the file's `gradients` attribute, e.g. `grad_norm_encoders.0` (other fields: 1, 2, ...)."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("to_dataframe needs pandas (pip install pandas); "
                          "read_scores(path) returns the same data as numpy arrays") from e
    groups, attrs = read_scores(path)
    frames = []
    for name, data in groups.items():
        cols: dict[str, Any] = {"group": name, "dataset": name.rsplit("/", 1)[0], "split": name.rsplit("/", 1)[-1]}
        for key, value in data.items():
            if key in ("lk", "llr"):
                column = names.lk if key == "lk" else names.llr
                cols.update({column(k): value[:, j] for j, k in enumerate(attrs["ks"])})
            elif key == "kl":
                cols.update({names.kl(i + 1): value[:, i] for i in range(value.shape[1])})
            elif value.ndim == 1:
                cols[key] = value
            elif value.ndim == 2:
                cols.update({f"{key}_{label}": value[:, j] for j, label in enumerate(_column_labels(attrs, key, value))})
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def _column_labels(attrs: dict[str, Any], key: str, value: np.ndarray) -> list[str]:
    """Labels of the columns of a 2-D extra field: grad_norm's layers (attrs gradients.layers), else 1..M."""
    gradients = attrs.get("gradients")
    layers = gradients.get("layers") if isinstance(gradients, dict) else None
    if key == "grad_norm" and isinstance(layers, list) and len(layers) == value.shape[1]:
        return [str(layer) for layer in layers]
    return [str(j + 1) for j in range(value.shape[1])]
