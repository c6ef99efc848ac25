"""One scoring job: load the model of a run dir, plan this shard's rows, score them batch by batch into
OUT/shard-IIIII-of-NNNNN.h5, resuming where an earlier run of the same shard stopped.

Debug hook: with HVAE_SCORE_TRACE=FILE every computed row is appended to FILE as "<group> <index>"
(after the row's values are computed, before they are written), so tests can prove that a resumed
shard recomputes no row that was already complete.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hvae_dist import __version__
from hvae_dist.checkpoint import load_model_for_eval
from hvae_dist.data import get_dataset, parse_dataset_spec
from hvae_dist.distributed import detect_world, device_for
from hvae_dist.errors import ConfigError
from hvae_dist.score.complexity import METHODS as COMPLEXITY_METHODS
from hvae_dist.score.complexity import compressed_size_nats
from hvae_dist.score.layout import FORMAT_VERSION, file_sha256, group_name
from hvae_dist.score.plan import ShardPlan
from hvae_dist.score.scorer import IWScorer, ScoreSettings
from hvae_dist.score.writer import GroupSpec, ShardWriter

TRACE_ENV = "HVAE_SCORE_TRACE"


@dataclass
class ScoreJob:
    """Arguments of `hvae score` (see hvae_dist.score.cli for their meaning)."""

    run_dir: str
    datasets: list
    out: str
    settings: ScoreSettings = field(default_factory=ScoreSettings)
    checkpoint: str | None = None
    shard: int = 0
    num_shards: int = 1
    max_examples: int | None = None
    batch_size: int = 32
    use_ema: bool = True
    complexity: bool = False
    device: str = "auto"
    progress: bool | None = None      # None: only when stderr is a terminal


def resolve_device(name: str) -> torch.device:
    """`auto`: this rank's GPU when there is one (the distributed world decides which), else the CPU."""
    return device_for(detect_world()) if name == "auto" else torch.device(name)


def _trace(rows_group: str, indices: np.ndarray) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:
            f.write("".join(f"{rows_group} {int(i)}\n" for i in indices))


def run_score_job(job: ScoreJob) -> Path:
    """Score this shard; returns the shard file path. Raises HvaeError subclasses on bad input."""
    from tqdm import tqdm

    if job.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {job.batch_size}")
    device = resolve_device(job.device)
    model, cfg, ckpt_path = load_model_for_eval(job.run_dir, job.checkpoint, job.use_ema)
    model.to(device)
    settings = replace(job.settings, binarize=cfg.data.binarize).resolved(model.num_layers)
    scorer = IWScorer(model, settings, device)
    complexity = compressed_size_nats if job.complexity else None

    groups = [group_name(":".join(parse_dataset_spec(s))) for s in job.datasets]
    if not groups:
        raise ConfigError("--datasets: give at least one NAME:SPLIT")
    if len(set(groups)) != len(groups):
        raise ConfigError(f"--datasets repeats a dataset: {groups}")
    data = {}
    for g in groups:
        name, split = g.split("/")
        data[g] = get_dataset(name, split, cfg.data.root, False, job.max_examples)
        if data[g].shape != tuple(model.input_shape):
            raise ConfigError(f"dataset {name}:{split} has images of shape {data[g].shape} but the model takes "
                              f"{tuple(model.input_shape)}; score datasets of the training set's shape")
    plan = ShardPlan(job.shard, job.num_shards, {g: len(data[g]) for g in groups})
    methods = list(COMPLEXITY_METHODS) if complexity else []
    attrs = {
        "format_version": FORMAT_VERSION, "model_checkpoint": str(Path(ckpt_path).resolve()),
        "model_sha256": file_sha256(ckpt_path), "iw_samples": settings.iw_samples,
        "iw_samples_lk": settings.iw_samples_lk, "ks": settings.ks, "seed": settings.seed,
        "dtype": settings.precision, "ema": bool(job.use_ema), "binarize": settings.binarize,
        "num_layers": model.num_layers, "datasets": groups, "dataset_sizes": plan.sizes,
        "complexity": methods, "package_version": __version__, "config": cfg.to_json(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shard": plan.shard, "num_shards": plan.num_shards,
    }
    specs = [GroupSpec(g, np.arange(*plan.range(g), dtype=np.int64), model.num_layers, len(settings.ks), methods)
             for g in groups]
    path = Path(job.out) / plan.filename
    with ShardWriter.open(path, attrs, specs) as writer:
        pending = {g: writer.pending(g) for g in groups}
        todo, rows = sum(len(p) for p in pending.values()), sum(len(s.index) for s in specs)
        print(f"hvae score: shard {plan.shard} of {plan.num_shards}: {todo} of {rows} rows to score "
              f"(S={settings.iw_samples}, ks={settings.ks}, device={device}) -> {path}", file=sys.stderr)
        show = job.progress if job.progress is not None else sys.stderr.isatty()
        with tqdm(total=todo, unit="ex", desc=f"shard {plan.shard}/{plan.num_shards}", file=sys.stderr,
                  disable=not show, dynamic_ncols=True, smoothing=0.05) as bar:
            for g in groups:
                start = plan.range(g)[0]
                for a in range(0, len(pending[g]), job.batch_size):
                    rows_b = pending[g][a:a + job.batch_size]
                    idx = start + rows_b                                     # positions in the dataset
                    images = np.ascontiguousarray(data[g].images[idx])       # B, C, H, W uint8
                    values = scorer.score_batch(torch.from_numpy(images), torch.from_numpy(idx), g)
                    if complexity is not None:
                        for m in methods:
                            values[f"complexity_{m}"] = complexity(images, m)
                    _trace(g, idx)
                    writer.write(g, rows_b, values)
                    bar.update(len(rows_b))
    return path
