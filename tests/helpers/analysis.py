"""Analysis helpers shared by the tests: synthetic score files in the score-file layout."""
from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np

KS = [1, 2]
L = 3


def write_score_file(path: Path, groups: dict[str, int], seed: int = 0, shifts: dict[str, float] | None = None,
                     index_offset: int = 0, extra: bool = True) -> Path:
    """A score file in the DESIGN.md layout: group -> N rows, K = len(KS), L = 3 latent layers."""
    rng = np.random.default_rng(seed)
    shifts = shifts or {}
    with h5py.File(path, "w") as f:
        f.attrs.update({"format_version": 1, "iw_samples": 4, "ks": np.array(KS), "seed": 7, "dtype": "float32",
                        "config": json.dumps({"model": "tiny"}), "model_checkpoint": "runs/x/checkpoints/latest.pt"})
        for name, n in groups.items():
            shift = shifts.get(name, 0.0)
            elbo = rng.normal(-100.0 + 5 * shift, 3.0, n)
            lk = elbo[:, None] - np.abs(rng.normal(2.0 + 3 * shift, 1.0, (n, len(KS))))
            g = f.create_group(name)
            g["index"] = np.arange(n, dtype=np.int64) + index_offset
            g["elbo"] = elbo
            g["elbo_1"] = elbo - 1.0
            g["lk"] = lk
            g["llr"] = elbo[:, None] - lk
            g["kl"] = np.abs(rng.normal(1.0, 0.1, (n, L)))
            g["bpd"] = -elbo / (784 * math.log(2))
            if extra:
                g["complexity_png"] = rng.uniform(300.0, 400.0, n)
    return path
