"""One scoring job: load the model of a run dir, plan this shard's rows, score them batch by batch into
OUT/shard-IIIII-of-NNNNN.h5, resuming where an earlier run of the same shard stopped.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hvae_dist import __version__
from hvae_dist.checkpoint import load_for_eval, numbered_twin, record_scored
from hvae_dist.config import check_int_range, config_differences, config_from_dict, describe_differences, load_json
from hvae_dist.data import RootHint, check_image_shape, dataset_shape, open_dataset, parse_specs, select_rows
from hvae_dist.distributed import resolve_device
from hvae_dist.errors import CheckpointError, ConfigError
from hvae_dist.estimators.complexity import METHODS as COMPLEXITY_METHODS
from hvae_dist.estimators.complexity import compressed_size_nats
from hvae_dist.estimators.gradients import GradientSettings
from hvae_dist.estimators.lid import LidEstimator, LidSettings
from hvae_dist.estimators.likelihood_regret import RegretSettings
from hvae_dist.estimators.rows import default_batch_size
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.files import require_folder
from hvae_dist.score.baseline_fields import BaselineFields
from hvae_dist.score.layout import FORMAT_VERSION, PRECISION_ATTR, file_sha256
from hvae_dist.score.plan import ShardPlan
from hvae_dist.score.writer import GroupSpec, ShardWriter, lock_shard
from hvae_dist.signals import stop_note


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
    first: int | None = None          # --first N: rows 0..N-1 (the old --max-examples); exclusive with max_examples
    arrays: dict | None = None        # group "NAME/SPLIT" -> dataset held in memory (score.arrays.score_arrays)
    lid: LidSettings | None = None    # with --lid: the LID fields (hvae_dist.estimators.lid)
    likelihood_regret: RegretSettings | None = None   # None: no elbo_refit / likelihood_regret fields
    gradients: GradientSettings | None = None         # None: no grad_norm field


def check_job(job: ScoreJob) -> None:
    """The job's integers in range (they are stored as int64 in the shard file), before anything is loaded or
    created; ConfigError naming the option."""
    job.settings.check()
    for extra in (job.likelihood_regret, job.gradients):
        if extra is not None:
            extra.check()
    check_int_range("--shard", job.shard)
    check_int_range("--num-shards", job.num_shards, 1)
    for option, value in (("--max-examples", job.max_examples), ("--first", job.first), ("--batch-size", job.batch_size)):
        if value is not None:
            check_int_range(option, value, 1)
    if job.max_examples is not None and job.first is not None:
        raise ConfigError("--max-examples N (a seeded random subset) and --first N (the first rows) exclude each other; "
                          "give one")


def run_job(job: ScoreJob) -> Path:
    """`run_score_job` as `hvae score`, the SLURM score job and the experiments run it: a stop signal that
    unwinds it (hvae_dist.signals, installed by the caller) says what it leaves: the shard file is closed
    (rows are marked complete only after they are written) and a re-run resumes it. Returns the shard file."""
    with stop_note("the shard file is closed; re-running the same command resumes it"):
        return run_score_job(job)


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


def score_log_path(shard_path: Path) -> Path:
    """OUT/score-shard-IIIII-of-NNNNN.log beside the shard: the shard's score lines, appended by every run."""
    return shard_path.with_name("score-" + shard_path.with_suffix(".log").name)


class ScoreLog:
    """The lines of one shard's scoring: timestamped (UTC), to stderr and appended to `path` (None: stderr only)."""

    def __init__(self, path: Path | None = None, stream=None):
        self.path, self.stream = path, stream

    def __call__(self, line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {line}"
        print(stamped, file=self.stream or sys.stderr, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(stamped + "\n")


class ProgressLog:
    """Progress as log lines (for SLURM logs and other non-terminals): rows done / total, rows/s, ETA.

    A line every `every` seconds (checked after each batch) and one at the end, each through `say` (default:
    a timestamped line on `stream`, default stderr).
    """

    def __init__(self, total: int, what: str, every: float, stream=None, clock=time.monotonic, say=None):
        self.total, self.what, self.every, self.stream, self.clock = total, what, every, stream, clock
        self.say = say or ScoreLog(None, stream)
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
            self.say(self._line(now))

    def close(self) -> None:
        if self.total:
            elapsed = max(self.clock() - self.t0, 1e-9)
            self.say(f"hvae score: {self.what}: done, {self.done}/{self.total} rows in {_duration(elapsed)}, "
                     f"{self.done / elapsed:.2f} rows/s")


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
    model, cfg, ckpt_path, step = load_for_eval(job.run_dir, job.checkpoint, job.use_ema)
    check_run_config(job.run_dir, ckpt_path, cfg)
    model.to(device)
    settings = replace(job.settings, binarize=cfg.data.binarize).resolved(model.num_layers)
    scorer = IWScorer(model, settings, device)
    baselines = BaselineFields(scorer, job.likelihood_regret, job.gradients)
    lid = LidEstimator(model, job.lid, settings.seed) if job.lid is not None else None

    data = open_job_datasets(job, cfg, model.input_shape)
    groups = list(data)
    mode = "first" if job.first is not None else ("all" if job.max_examples is None else "random")
    count = job.first if job.first is not None else job.max_examples
    rows = {g: select_rows(data[g].labels, count, mode=mode, seed=settings.seed, group=g) for g in groups}
    for g in groups:
        if hasattr(data[g], "check"):
            data[g].check(rows[g])              # bad values stop the job before any file is written
    plan = ShardPlan(job.shard, job.num_shards, {g: len(rows[g]) for g in groups})
    methods = list(COMPLEXITY_METHODS) if job.complexity else []
    sha = file_sha256(ckpt_path)
    attrs = {
        "format_version": FORMAT_VERSION, "model_checkpoint": str(Path(ckpt_path).resolve()),
        "model_sha256": sha, "checkpoint_step": step, "iw_samples": settings.iw_samples,
        "iw_samples_lk": settings.iw_samples_lk, "ks": settings.ks, "seed": settings.seed,
        PRECISION_ATTR: settings.precision, "ema": bool(job.use_ema), "binarize": settings.binarize,
        "num_layers": model.num_layers, "datasets": groups, "dataset_sizes": plan.sizes,
        "complexity": methods, "package_version": __version__, "config": cfg.to_json(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shard": plan.shard, "num_shards": plan.num_shards,
        "checkpoint_file": numbered_twin(ckpt_path, step),
        "source_sizes": {g: len(data[g]) for g in groups},
        "source_sha256": {g: data[g].source_sha256 for g in groups if getattr(data[g], "source_sha256", None)},
        "row_selection": {"mode": mode, "count": count, "seed": settings.seed},
        **baselines.attrs(),
    }
    specs = [group_spec(g, data[g], rows[g][slice(*plan.range(g))], model.num_layers, len(settings.ks), methods)
             for g in groups]
    if lid is not None:
        attrs["lid"] = lid.settings.attrs()         # only with --lid: files without LID keep their identity
        for spec in specs:
            spec.lid_shape = (len(lid.settings.ks), len(lid.settings.scales))
    for spec in specs:
        spec.extra = baselines.shapes(len(spec.index))
    path = Path(job.out) / plan.filename
    # The lock comes before the shard file is looked at, created or opened: of two jobs started on the same
    # new shard, the second stops here instead of replacing the first one's file.
    lock = lock_shard(path)
    try:
        with ShardWriter.open(path, attrs, specs) as writer:
            if attrs["checkpoint_file"]:
                note = record_scored(job.run_dir, attrs["checkpoint_file"], step, path)
                if note:
                    print(f"hvae score: note: {note}", file=sys.stderr, flush=True)
            _score_rows(job, writer, scorer, data, {g.name: g.index for g in specs}, batch_size, lid, baselines)
    finally:
        lock.release()
    return path


def open_job_datasets(job: ScoreJob, cfg, input_shape) -> dict:
    """group -> dataset of the job's --datasets (and in-memory `arrays`), each checked against the model's
    input shape (C, H, W) before a pixel is transformed; ConfigError / DataError naming the spec."""
    specs = parse_specs(job.datasets)
    if not specs and not job.arrays:
        raise ConfigError("--datasets: give at least one NAME:SPLIT or a path to your data")
    if job.data_root:
        root, hint = job.data_root, RootHint("--data-root", "--data-root DIR", None)
    else:
        root, hint = cfg.data.root, RootHint(f"data.root of {Path(job.run_dir) / 'config.json'}", "--data-root DIR", None)
    data = {}
    for spec in specs:
        if spec.is_file:
            ds = open_dataset(spec)
            shape = ds.shape
        else:
            shape = dataset_shape(spec.name, spec.split, root, False, hint)   # before any variant transforms a pixel
            ds = None
        check_image_shape(f"dataset {spec}", shape, input_shape, "the model takes", shape_fix(spec, shape, input_shape))
        data[spec.group] = ds if ds is not None else open_dataset(spec, root, False, hint)
    for g, ds in (job.arrays or {}).items():
        if g in data:
            raise ConfigError(f"dataset group {g!r} is given twice")
        check_image_shape(f"array {g!r}", ds.shape, input_shape, "the model takes")
        data[g] = ds
    return data


def shape_fix(spec, shape, expected) -> str:
    """How to give a dataset the model's shape (C, H, W): the variants to add, in the spec's own syntax."""
    tokens = []
    if tuple(shape[1:]) != tuple(expected[1:]):
        tokens.append(f"{expected[1]}x{expected[2]}")
    if shape[0] == 1 and expected[0] == 3:
        tokens.append("rgb")
    if not tokens:
        return ("this model takes grey images: score grey images (a colour set cannot be made grey by a variant)"
                if shape[0] != expected[0] else "")
    suffix = "-" + "-".join(tokens)
    example = f"{spec.path}{'#' + spec.key if spec.key else ''}:{spec.split}{''.join('-' + v for v in spec.variants)}{suffix}" \
        if spec.is_file else f"{spec.name}{suffix}:{spec.split}"
    return f"add the variant{'s' if len(tokens) > 1 else ''} {suffix}, e.g. {example}"


def group_spec(g: str, ds, index: np.ndarray, num_layers: int, num_ks: int, methods: list) -> GroupSpec:
    """The GroupSpec of one dataset: its rows (`index`), their `label` (and folder `path`), its source attributes."""
    static = {"label": np.asarray(ds.labels, np.int64)[index]}
    paths = getattr(ds, "paths", None)
    if paths is not None:
        static["path"] = paths[index]
    attrs = {}
    if getattr(ds, "source", None):
        attrs = {"source": ds.source, "source_sha256": ds.source_sha256}
        if getattr(ds, "classes", None):
            attrs["classes"] = json.dumps(ds.classes)
    return GroupSpec(g, index, num_layers, num_ks, methods, static, attrs)


def _batches(data: dict, index: dict, pending: dict, batch_size: int):
    """(group, shard rows, dataset indices, uint8 images) of every pending batch; the next batch is read in a
    background thread while the current one is scored (a folder decodes its images per batch)."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [(g, pending[g][a:a + batch_size]) for g in data for a in range(0, len(pending[g]), batch_size)]

    def read(item):
        g, rows_b = item
        idx = index[g][rows_b]                                          # positions in the source dataset
        return g, rows_b, idx, np.ascontiguousarray(data[g].images[idx])   # B, C, H, W uint8

    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(read, todo[0]) if todo else None
        for k in range(len(todo)):
            batch = ahead.result()
            ahead = pool.submit(read, todo[k + 1]) if k + 1 < len(todo) else None
            yield batch


def _score_rows(job: ScoreJob, writer: ShardWriter, scorer: IWScorer, data: dict, index: dict,
                batch_size: int, lid: LidEstimator | None = None, baselines: BaselineFields | None = None) -> None:
    """Score every pending row of the shard (data: group -> dataset, index: group -> the shard's dataset
    positions), batch by batch, with progress."""
    from tqdm import tqdm

    groups, settings = list(data), scorer.settings
    plan = ShardPlan(job.shard, job.num_shards, {})
    methods = list(COMPLEXITY_METHODS) if job.complexity else []
    pending = {g: writer.pending(g) for g in groups}
    todo, rows = sum(len(p) for p in pending.values()), sum(len(index[g]) for g in groups)
    chunk = scorer.chunk_for(batch_size)
    say = ScoreLog(score_log_path(Path(writer.path)))
    say(f"hvae score: shard {plan.shard} of {plan.num_shards}: {todo} of {rows} rows to score "
        f"(S={settings.iw_samples}, ks={settings.ks}, device={scorer.device}, batch {batch_size} x sample chunk "
        f"{chunk} = {batch_size * chunk} rows per pass) -> {writer.path}")
    show = job.progress if job.progress is not None else sys.stderr.isatty()
    # On a terminal the bar shows progress, and only the closing line is logged.
    log = ProgressLog(todo, f"shard {plan.shard} of {plan.num_shards}", math.inf if show else job.log_every, say=say)
    with tqdm(total=todo, unit="ex", desc=f"shard {plan.shard}/{plan.num_shards}", file=sys.stderr,
              disable=not show, dynamic_ncols=True, smoothing=0.05) as bar:
        for g, rows_b, idx, images in _batches(data, index, pending, batch_size):
            values = scorer.score_batch(torch.from_numpy(images), torch.from_numpy(idx), g)
            for m in methods:
                values[f"complexity_{m}"] = compressed_size_nats(images, m)
            if lid is not None:
                idx_t = torch.from_numpy(idx).to(scorer.device)
                x = scorer.preprocess(torch.from_numpy(images).to(scorer.device), g, idx_t)
                values.update(lid.score_batch(x, idx_t, g))
            if baselines is not None:
                values.update(baselines.values(torch.from_numpy(images), torch.from_numpy(idx), g, values["elbo"]))
            writer.write(g, rows_b, values)
            bar.update(len(rows_b))
            log.update(len(rows_b))
    log.close()
