"""Score images held in memory into a normal score file, so that `hvae merge`, `hvae analyze`, `read_scores`
and `to_dataframe` work on them as on any job's output:

    from hvae_dist.score.arrays import score_arrays
    path = score_arrays("runs/fm", {"mine/test": images, "other": (images2, labels2)}, "scores/mine",
                        iw_samples=100)          # -> scores/mine/scores.h5
    # hvae analyze scores/mine/scores.h5 --in-dist mine:test

Each value is an image array (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 0..255 or float in [0, 1] (the
rules of file datasets, `hvae_dist.data.file_datasets`), or a pair (images, labels) with labels int (N,).
A key "NAME/SPLIT" (or "NAME", split "all") is the group; its noise is that of any dataset of that group
name, so "FashionMNIST/test" with the registry's test images in their order scores bitwise as
`hvae score --datasets FashionMNIST:test`. The job runs as one shard (`score.runner`) and is merged; the
checkpoint's provenance (step, numbered file) is stored as by `hvae score`.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hvae_dist.data import ArrayDataset
from hvae_dist.data.pixels import array_layout, to_uint8
from hvae_dist.errors import ConfigError
from hvae_dist.estimators.scorer import ScoreSettings


def as_dataset(group: str, value) -> ArrayDataset:
    """An in-memory ArrayDataset of one entry of `score_arrays` (its pixel rules; DataError on bad values)."""
    images, labels = value if isinstance(value, tuple) else (value, None)
    images = np.asarray(images)
    layout = array_layout(images.shape, f"array {group!r}")
    images = to_uint8(images, f"array {group!r}", np.arange(len(images)))
    images = images[:, None] if layout == "NHW" else (images.transpose(0, 3, 1, 2) if layout == "NHWC" else images)
    name, _, split = group.partition("/")
    return ArrayDataset(np.ascontiguousarray(images), labels, name, split)


def score_arrays(run_dir: str | Path, arrays: Mapping[str, object], out: str | Path, *, iw_samples: int = 1000,
                 iw_samples_lk: int | None = None, ks: list[int] | None = None, seed: int = 0, precision: str = "fp32",
                 checkpoint: str | None = None, use_ema: bool = True, device: str = "auto",
                 batch_size: int | None = None, max_examples: int | None = None, first: int | None = None,
                 force: bool = False) -> Path:
    """Score `arrays` (group -> images or (images, labels)) with the model of `run_dir` into OUT/scores.h5
    (through OUT/shard-00000-of-00001.h5); returns its path. The options are those of `hvae score`."""
    from hvae_dist.score.merge import merge_shards
    from hvae_dist.score.runner import ScoreJob, run_score_job

    if not arrays:
        raise ConfigError("score_arrays: give at least one array")
    data = {}
    for key, value in arrays.items():
        group = key if "/" in key else f"{key}/all"
        name, split = group.split("/", 1)
        if not name or not split or "/" in split or ":" in group:
            raise ConfigError(f"score_arrays: key {key!r} must be NAME or NAME/SPLIT (no ':' and one '/' at most)")
        data[group] = as_dataset(group, value)
    settings = ScoreSettings(iw_samples=iw_samples, iw_samples_lk=iw_samples_lk, ks=ks, seed=seed, precision=precision)
    Path(out).mkdir(parents=True, exist_ok=True)
    job = ScoreJob(run_dir=str(run_dir), datasets=[], out=str(out), settings=settings, checkpoint=checkpoint,
                   use_ema=use_ema, device=device, batch_size=batch_size, max_examples=max_examples, first=first,
                   progress=False, arrays=data)
    run_score_job(job)
    return merge_shards(Path(out), force=force)
