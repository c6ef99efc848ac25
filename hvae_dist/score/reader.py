"""Read a score file (merged scores.h5 or one shard) into plain numpy arrays, no pandas.

    >>> s = read_scores("scores/run/scores.h5")
    >>> s["attrs"]["ks"], s["attrs"]["iw_samples"]
    >>> s["groups"]["FashionMNIST/test"]["llr"][:, 0]      # LLR>ks[0] per example, nats

`hvae_dist.analysis.load_scores` builds its validated ScoreFile on the same layout; this helper stays
minimal: it checks only that the file opens and lists its groups.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hvae_dist.errors import ScoreFileError
from hvae_dist.score.writer import open_h5, read_attrs


def read_scores(path: str | Path) -> dict:
    """{"attrs": {...}, "groups": {"<Name>/<split>": {"index": (N,) int64, "elbo": (N,) f8, ...}}}.

    Attributes come back as Python values (ks a list of int, config / datasets / dataset_sizes parsed
    from JSON). Groups are those listed in attrs["datasets"] (file order), each with every dataset
    it holds (shard files include the `complete` flags). Unreadable file -> ScoreFileError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreFileError(f"{path}: no such score file")
    with open_h5(path, "r") as f:
        attrs = read_attrs(f)
        names = attrs.get("datasets") or [f"{a}/{b}" for a in f for b in f[a]]
        groups = {}
        for g in names:
            if g not in f:
                raise ScoreFileError(f"{path}: group {g!r} listed in attrs 'datasets' is missing")
            groups[g] = {k: np.asarray(d[()]) for k, d in f[g].items()}
    return {"attrs": attrs, "groups": groups}
