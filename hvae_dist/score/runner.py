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
from hvae_dist.config import check_int_range, config_differences, config_from_dict, describe_differences, load_json
from hvae_dist.data import RootHint, check_image_shape, dataset_shape, get_dataset, group_name, parse_dataset_spec
from hvae_dist.distributed import resolve_device
from hvae_dist.errors import CheckpointError, ConfigError
from hvae_dist.estimators.complexity import METHODS as COMPLEXITY_METHODS
from hvae_dist.estimators.complexity import compressed_size_nats
from hvae_dist.estimators.lid import LidEstimator, LidSettings
from hvae_dist.estimators.rows import default_batch_size
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.files import require_folder
from hvae_dist.score.layout import FORMAT_VERSION, file_sha256
from hvae_dist.score.plan import ShardPlan
from hvae_dist.score.writer import GroupSpec, ShardWriter, lock_shard
from hvae_dist.signals import stop_note

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
    batch_size: int | None = None     # None: default_batch_size(device, the fewest samples of a bound)
    use_ema: bool = True
    complexity: bool = False
    device: str = "auto"
    progress: bool | None = None      # None: the bar when stderr is a terminal, else progress lines
    data_root: str | None = None      # None: the run's data.root
    log_every: float = 30.0           # seconds between progress lines (when there is no bar)
    lid: LidSettings | None = None    # with --lid: the LID fields (hvae_dist.estimators.lid)


def check_job(job: ScoreJob) -> None:
    """The job's integers in range (they are stored as int64 in the shard file), before anything is loaded or
    created; ConfigError naming the option."""
    job.settings.check()
    check_int_range("--shard", job.shard)
    check_int_range("--num-shards", job.num_shards, 1)
    for option, value in (("--max-examples", job.max_examples), ("--batch-size", job.batch_size)):
        if value is not None:
            check_int_range(option, value, 1)


def run_job(job: ScoreJob) -> Path:
    """`run_score_job` as `hvae score`, the SLURM score job and the experiments run it: a stop signal that
    unwinds it (hvae_dist.signals, installed by the caller) says what it leaves: the shard file is closed
    (rows are marked complete only after they are written) and a re-run resumes it. Returns the shard file."""
    with stop_note("the shard file is closed; re-running the same command resumes it"):
        return run_score_job(job)


def _trace(rows_group: str, indices: np.ndarray) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:
            f.write("".join(f"{rows_group} {int(i)}\n" for i in indices))


def check_run_config(run_dir: str | Path, ckpt_path: str | Path, cfg) -> None:
    """Refuse a checkpoint whose model config differs from RUN_DIR/config.json (when the run dir has one)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    try:
        run_model = config_from_dict(load_json(path.read_text(), str(path))).to_dict()["model"]
    except (OSError, ValueError) as e:   # ConfigError is a ValueError
        raise ConfigError(f"{path}: cannot be read as a run config ({e})") from e
    diff = config_differences({"model": cfg.to_dict()["model"]}, {"model": run_model})
    if diff:
        raise CheckpointError(
            f"checkpoint {ckpt_path} holds another model than {path}: "
            f"{describe_differences(diff, 'checkpoint', 'config.json')}; pass a checkpoint of this run "
            "(--checkpoint) or the run dir it belongs to (--run-dir)")


class ProgressLog:
    """Progress as log lines (for SLURM logs and other non-terminals): rows done / total, rows/s, ETA.

    A line every `every` seconds (checked after each batch) and one at the end.
    """

    def __init__(self, total: int, what: str, every: float, stream=None, clock=time.monotonic):
        self.total, self.what, self.every, self.stream, self.clock = total, what, every, stream, clock
        self.done, self.t0 = 0, clock()
        self.last = self.t0

    def _line(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"hvae score: {self.what}: {self.done}/{self.total} rows ({pct:.1f}%), {rate:.2f} rows/s, "
                f"elapsed {_duration(elapsed)}, ETA {eta}")

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            print(self._line(now), file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self.total:
            elapsed = max(self.clock() - self.t0, 1e-9)
            print(f"hvae score: {self.what}: done, {self.done}/{self.total} rows in {_duration(elapsed)}, "
                  f"{self.done / elapsed:.2f} rows/s", file=self.stream or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_score_job(job: ScoreJob) -> Path:
    """Score this shard; returns the shard file path. Raises HvaeError subclasses on bad input."""
    check_job(job)
    require_folder(job.run_dir, "--run-dir")
    require_folder(job.out, "--out")
    device = resolve_device(job.device)
    st = job.settings
    samples = min(st.iw_samples, st.iw_samples if st.iw_samples_lk is None else st.iw_samples_lk)
    batch_size = default_batch_size(device, samples) if job.batch_size is None else job.batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    model, cfg, ckpt_path = load_model_for_eval(job.run_dir, job.checkpoint, job.use_ema)
    check_run_config(job.run_dir, ckpt_path, cfg)
    model.to(device)
    settings = replace(job.settings, binarize=cfg.data.binarize).resolved(model.num_layers)
    scorer = IWScorer(model, settings, device)
    lid = LidEstimator(model, job.lid, settings.seed) if job.lid is not None else None

    groups = [group_name(":".join(parse_dataset_spec(s))) for s in job.datasets]
    if not groups:
        raise ConfigError("--datasets: give at least one NAME:SPLIT")
    if len(set(groups)) != len(groups):
        raise ConfigError(f"--datasets repeats a dataset: {groups}")
    if job.data_root:
        root, hint = job.data_root, RootHint("--data-root", "--data-root DIR", None)
    else:
        root, hint = cfg.data.root, RootHint(f"data.root of {Path(job.run_dir) / 'config.json'}", "--data-root DIR", None)
    data = {}
    for g in groups:
        name, split = g.split("/")
        shape = dataset_shape(name, split, root, False, hint)   # before any variant transforms a pixel
        check_image_shape(f"dataset {name}:{split}", shape, model.input_shape, "the model takes",
                          "score datasets of the training set's shape")
        data[g] = get_dataset(name, split, root, False, job.max_examples, hint)
    plan = ShardPlan(job.shard, job.num_shards, {g: len(data[g]) for g in groups})
    methods = list(COMPLEXITY_METHODS) if job.complexity else []
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
    lid_shape = None
    if lid is not None:
        attrs["lid"] = lid.settings.attrs()         # only with --lid: files without LID keep their identity
        lid_shape = (len(lid.settings.ks), len(lid.settings.scales))
    specs = [GroupSpec(g, np.arange(*plan.range(g), dtype=np.int64), model.num_layers, len(settings.ks), methods,
                       lid_shape) for g in groups]
    path = Path(job.out) / plan.filename
    # The lock comes before the shard file is looked at, created or opened: of two jobs started on the same
    # new shard, the second stops here instead of replacing the first one's file.
    lock = lock_shard(path)
    try:
        with ShardWriter.open(path, attrs, specs) as writer:
            _score_rows(job, writer, scorer, data, plan, batch_size, lid)
    finally:
        lock.release()
    return path


def _score_rows(job: ScoreJob, writer: ShardWriter, scorer: IWScorer, data: dict, plan: ShardPlan,
                batch_size: int, lid: LidEstimator | None = None) -> None:
    """Score every pending row of the shard (data: group -> dataset), batch by batch, with progress."""
    from tqdm import tqdm

    groups, settings = list(data), scorer.settings
    methods = list(COMPLEXITY_METHODS) if job.complexity else []
    pending = {g: writer.pending(g) for g in groups}
    todo, rows = sum(len(p) for p in pending.values()), sum(hi - lo for lo, hi in map(plan.range, groups))
    chunk = scorer.chunk_for(batch_size)
    print(f"hvae score: shard {plan.shard} of {plan.num_shards}: {todo} of {rows} rows to score "
          f"(S={settings.iw_samples}, ks={settings.ks}, device={scorer.device}, batch {batch_size} x sample chunk "
          f"{chunk} = {batch_size * chunk} rows per pass) -> {writer.path}", file=sys.stderr, flush=True)
    show = job.progress if job.progress is not None else sys.stderr.isatty()
    log = None if show else ProgressLog(todo, f"shard {plan.shard} of {plan.num_shards}", job.log_every)
    with tqdm(total=todo, unit="ex", desc=f"shard {plan.shard}/{plan.num_shards}", file=sys.stderr,
              disable=not show, dynamic_ncols=True, smoothing=0.05) as bar:
        for g in groups:
            start = plan.range(g)[0]
            for a in range(0, len(pending[g]), batch_size):
                rows_b = pending[g][a:a + batch_size]
                idx = start + rows_b                                     # positions in the dataset
                images = np.ascontiguousarray(data[g].images[idx])       # B, C, H, W uint8
                values = scorer.score_batch(torch.from_numpy(images), torch.from_numpy(idx), g)
                for m in methods:
                    values[f"complexity_{m}"] = compressed_size_nats(images, m)
                if lid is not None:
                    idx_t = torch.from_numpy(idx).to(scorer.device)
                    x = scorer.preprocess(torch.from_numpy(images).to(scorer.device), g, idx_t)
                    values.update(lid.score_batch(x, idx_t, g))
                _trace(g, idx)
                writer.write(g, rows_b, values)
                bar.update(len(rows_b))
                if log is not None:
                    log.update(len(rows_b))
    if log is not None:
        log.close()
