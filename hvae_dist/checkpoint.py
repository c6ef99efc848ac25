"""The one checkpoint format, for every backend, and loading a model for evaluation (train and score share it).

`DIR/checkpoints/latest.pt` and `DIR/checkpoints/step-N.pt` hold a dict:

    schema_version  int   2; 1 = written before the training noise became counter-based (rng.py):
                          its weights still score, but a resume is refused (its data order and noise
                          would change mid-run)
    step, epoch, batch_in_epoch   int   (the next batch to train on is batch_in_epoch of epoch)
    model           state_dict of the unwrapped model (never `module.`-prefixed)
    ema             state_dict of the EMA model, or None
    optimizer       backend optimizer state (DeepSpeed ZeRO: a list with one shard per rank)
    scaler          GradScaler state or None
    rng             list, one entry per rank: {"torch": ByteTensor, "cuda": ByteTensor | None}
    counters        dict of int/float (skipped updates, images seen, ...)
    config          the resolved config as a dict

Files are written atomically (temp file in the same folder, fsync, rename, fsync of the folder) so a
crash leaves either the old or the new checkpoint, never a torn one; a failed write (a full disk)
removes its temp file and raises CheckpointError naming the path and the free space (`hvae_dist.files`;
files get mode 0o666 & ~umask: 0644 under umask 022, readable on a shared project folder). Loading uses
`torch.load(weights_only=True)`: a checkpoint is data, never code. A file that does not load gets a
reason of our own (empty, truncated, not a checkpoint, refused pickle), never torch's advice to load
it with `weights_only=False`.

Recovery (training): `load_newest` resumes from the newest checkpoint that loads: latest.pt, or a
numbered one newer than it (a crash between the two writes), else the numbered ones newest first.
Files that a resumed run would contradict are moved to `checkpoints/superseded-TIME/` (`set_aside`),
never deleted. Scoring never falls back: its scores would silently come from another model.
"""
from __future__ import annotations

import os
import pickle
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch

from hvae_dist.errors import CheckpointError
from hvae_dist.files import describe_os_error, write_atomic

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)   # model weights of these load for evaluation; training resumes SCHEMA_VERSION only
LATEST = "latest.pt"
_STEP_RE = re.compile(r"step-(\d+)\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], what: str = "file") -> None:
    """`write(f)` into a temp file beside `path`, fsync, rename over `path`, fsync the folder
    (`files.write_atomic`: mode 0o666 & ~umask, 0644 under umask 022).

    On any failure the temp file is removed and `path` is untouched; an OSError (a full disk, a read-only
    or vanished folder), also one that torch reports as a RuntimeError, becomes a CheckpointError naming
    `path` and the free space of its file system (`files.describe_os_error`).
    """
    try:
        write_atomic(path, write)
    except OSError as e:
        raise CheckpointError(f"cannot write {what} {describe_os_error(e)}") from e


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, rename over `path`, fsync the folder (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f), "checkpoint")


def step_of(path: Path) -> int | None:
    """N of a `step-N.pt` file name, else None."""
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def save_checkpoint(state: dict, run_dir: str | Path, keep_last: int = 3) -> Path:
    """Write step-N.pt and latest.pt for `state["step"]`, then prune numbered files beyond `keep_last`.

    Pruning removes only files older than the one just written (never it, never a newer one), so a run
    that continues from an older checkpoint cannot delete its own new file.
    """
    ckdir = checkpoint_dir(run_dir)
    state = {"schema_version": SCHEMA_VERSION, **state}
    step = int(state["step"])
    numbered = ckdir / f"step-{step}.pt"
    atomic_torch_save(state, numbered)
    # latest.pt is a copy (not a symlink) so that it survives copying the run dir anywhere.
    atomic_torch_save(state, ckdir / LATEST)
    if keep_last > 0:
        older = [p for p in list_checkpoints(run_dir) if step_of(p) < step]
        pruned = older[:max(0, len(older) - (keep_last - 1))]
        warn_scored(run_dir, pruned, keep_last)
        for old in pruned:
            old.unlink(missing_ok=True)
    return numbered


SCORED_LOG = "score-files.jsonl"
"""RUN_DIR/score-files.jsonl: a line per score file written from this run's checkpoints (`record_scored`), so
that `keep_last` pruning can say which score files lose their checkpoint."""


def record_scored(run_dir: str | Path, checkpoint_file: str, step: int | None, score_file: str | Path) -> str | None:
    """Append {"checkpoint_file", "checkpoint_step", "score_file"} to RUN_DIR/score-files.jsonl (once per
    score file and checkpoint). Returns a one-line note when the run dir cannot be written (the scores do not
    depend on it), else None."""
    import json

    path = Path(run_dir) / SCORED_LOG
    line = json.dumps({"checkpoint_file": checkpoint_file, "checkpoint_step": step,
                       "score_file": str(Path(score_file).resolve())}, sort_keys=True)
    try:
        if path.is_file() and line in path.read_text().splitlines():
            return None
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        return f"cannot record the score file in {path} ({e.strerror or e}); keep_last pruning will not warn about it"
    return None


def scored_checkpoints(run_dir: str | Path) -> dict[str, list[str]]:
    """checkpoint file name -> score files (that still exist) recorded in RUN_DIR/score-files.jsonl."""
    import json

    path = Path(run_dir) / SCORED_LOG
    found: dict[str, list[str]] = {}
    try:
        lines = path.read_text().splitlines() if path.is_file() else []
    except OSError:
        return found
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        name, score = entry.get("checkpoint_file"), entry.get("score_file")
        if isinstance(name, str) and isinstance(score, str) and Path(score).exists():
            found.setdefault(name, []).append(score)
    return found


def warn_scored(run_dir: str | Path, pruned: list[Path], keep_last: int) -> None:
    """A RuntimeWarning for each checkpoint about to be pruned that a score file names (`record_scored`)."""
    if not pruned:
        return
    scored = scored_checkpoints(run_dir)
    for p in pruned:
        if p.name in scored:
            files = scored[p.name]
            warnings.warn(f"removing {p} (train.keep_last={keep_last}), the checkpoint of {len(files)} score file(s) "
                          f"(e.g. {files[0]}); copy it elsewhere first to keep those scores reproducible, or raise "
                          "train.keep_last", RuntimeWarning, stacklevel=3)


def numbered_twin(path: str | Path, step: int | None) -> str:
    """The name of the numbered checkpoint that `path` is: itself when numbered; for latest.pt, the step-N.pt of
    its step N (`save_checkpoint` writes both from one state; their bytes differ only in torch's archive names),
    "" when that file does not exist (pruned, or the run was copied without it)."""
    path = Path(path)
    if step_of(path) is not None:
        return path.name
    twin = path.parent / f"step-{step}.pt"
    return twin.name if step is not None and twin.is_file() else ""


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Numbered checkpoints, oldest first."""
    ckdir = checkpoint_dir(run_dir)
    found = [(n, p) for p in ckdir.glob("step-*.pt") if (n := step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """Every checkpoint file of a run dir (latest.pt, step-N.pt newest first, any other *.pt)."""
    ckdir = checkpoint_dir(run_dir)
    numbered = list_checkpoints(run_dir)[::-1]
    others = sorted(p for p in ckdir.glob("*.pt") if p.name != LATEST and p not in numbered)
    return [p for p in [ckdir / LATEST] if p.exists()] + numbered + others


def _safe_globals() -> list:
    # DeepSpeed's ZeRO optimizer state carries its loss-scaler object; allow exactly those classes.
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except Exception:  # deepspeed absent or changed: plain checkpoints need none of this
        pass
    return allowed


def _failure_reason(path: Path, exc: BaseException) -> str:
    """Why `path` did not load, in our words: torch's messages advise `weights_only=False`, which a user must not do."""
    if isinstance(exc, OSError) and not isinstance(exc, EOFError):
        return f"cannot be read ({exc.strerror or exc})"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "empty file (0 bytes; a write that never finished, or a full disk)"
    text = str(exc)
    if head == _ZIP_MAGIC and "zip archive" in text:
        return f"truncated or damaged ({size} bytes; the end of its zip archive is missing or unreadable)"
    if isinstance(exc, pickle.UnpicklingError) and (head == _ZIP_MAGIC or head[:1] == bytes([_PICKLE_PROTO])):
        m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"[Uu]nsupported global:? (?:GLOBAL )?([\w.]+)", text)
        if m:
            return (f"refused pickle: it would call or build {m.group(1)}, and a checkpoint is loaded as data "
                    "(tensors, numbers, strings), never code; do not use a file from an untrusted source")
        if head == _ZIP_MAGIC:
            return ("refused pickle: it holds objects other than tensors and plain data; a checkpoint is loaded as "
                    "data, never code")
    return f"not a checkpoint ({size} bytes that are neither a torch zip archive nor a torch pickle)"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file as data (weights_only=True); checks the schema version.

    Raises CheckpointError with a `reason` attribute (one clause: "empty file ...", "truncated ...", ...).
    """
    path = Path(path)
    if not path.exists():
        err = CheckpointError(f"checkpoint {path} does not exist")
        err.reason = "missing"
        raise err
    try:
        try:
            with warnings.catch_warnings():   # torch warns about the pickle protocol of files it then refuses
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as first:
            # Only DeepSpeed checkpoints need more (its loss-scaler classes); importing DeepSpeed costs
            # seconds, so it happens only for them.
            if "deepspeed" not in str(first):
                raise
            with torch.serialization.safe_globals(_safe_globals()):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = _failure_reason(path, e)
        err = CheckpointError(f"checkpoint {path} cannot be loaded: {reason}")
        err.reason = reason
        raise err from None
    if not isinstance(state, dict) or state.get("schema_version") not in READABLE_SCHEMAS:
        found = state.get("schema_version") if isinstance(state, dict) else None
        reason = f"schema_version {found}, expected one of {', '.join(map(str, READABLE_SCHEMAS))}"
        err = CheckpointError(f"checkpoint {path} has {reason}")
        err.reason = reason
        raise err
    return state


@dataclass
class Resumable:
    """The checkpoint a run resumes from, and why each newer candidate was passed over."""

    path: Path
    state: dict
    passed_over: list[tuple[Path, str]] = field(default_factory=list)   # (file, reason), newest first


def _listing(failures: list[tuple[Path, str]]) -> str:
    return "; ".join(f"{p.name}: {why}" for p, why in failures)


def load_newest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> Resumable | None:
    """The newest checkpoint of `run_dir` that loads; None when it has no checkpoint file at all.

    Order: latest.pt, unless a numbered file is newer than it (then those first); else the numbered
    files newest first. Raises CheckpointError listing every file and why when none loads.
    """
    ckdir = checkpoint_dir(run_dir)
    files = checkpoint_files(run_dir)
    if not files:
        return None
    numbered = list_checkpoints(run_dir)[::-1]
    failures: list[tuple[Path, str]] = []
    fallback: Resumable | None = None
    try:
        latest = load_checkpoint(ckdir / LATEST, map_location)
    except CheckpointError as e:
        failures.append((ckdir / LATEST, e.reason))
    else:
        numbered = [p for p in numbered if step_of(p) > int(latest["step"])]
        fallback = Resumable(ckdir / LATEST, latest)
        if not numbered:
            return fallback
    for path in numbered:
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as e:
            failures.append((path, e.reason))
            continue
        return Resumable(path, state, failures)
    if fallback is not None:
        fallback.passed_over = failures
        return fallback
    others = [p for p in files if p.name != LATEST and step_of(p) is None]
    failures += [(p, "not named latest.pt or step-N.pt") for p in others]
    raise CheckpointError(
        f"no checkpoint in {ckdir} can be loaded ({_listing(failures)}); resume from a good copy with "
        f"--checkpoint FILE, or start over at step 0 with --restart (moves these files to "
        f"{ckdir}/superseded-TIME/, nothing is deleted)")


def set_aside(paths: list[Path], run_dir: str | Path) -> Path | None:
    """Move `paths` into checkpoints/superseded-TIME/ (never deleted); returns that folder (None: nothing moved)."""
    paths = [Path(p) for p in paths if Path(p).exists()]
    if not paths:
        return None
    base = checkpoint_dir(run_dir) / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    try:
        folder.mkdir(parents=True)
        for p in paths:
            os.replace(p, folder / p.name)
    except OSError as e:
        raise CheckpointError(f"cannot move checkpoints into {folder}: {e.strerror or e}") from e
    return folder


def load_model_for_eval(run_dir: str | Path, checkpoint: str | Path | None = None, use_ema: bool = True,
                        map_location: str | torch.device = "cpu"):
    """(model in eval mode, Config, checkpoint path) of a run dir: `load_for_eval` without the step."""
    loaded = load_for_eval(run_dir, checkpoint, use_ema, map_location)
    return loaded.model, loaded.cfg, loaded.path


class EvalModel(NamedTuple):
    """What `load_for_eval` returns."""

    model: torch.nn.Module
    cfg: Any
    path: Path
    step: int
    """The training step the checkpoint was saved at (shown in figures, reports and TensorBoard)."""


def load_for_eval(run_dir: str | Path, checkpoint: str | Path | None = None, use_ema: bool = True,
                  map_location: str | torch.device = "cpu") -> EvalModel:
    """(model in eval mode, Config, checkpoint path, step) of a run dir; the EMA weights when present and asked for.

    Without `checkpoint`, latest.pt and nothing else: when it is missing or broken the error names the
    numbered checkpoints that exist and `--checkpoint`, which picks one.
    """
    from hvae_dist.config import config_from_dict
    from hvae_dist.model import build_model

    path = Path(checkpoint) if checkpoint else checkpoint_dir(run_dir) / LATEST
    try:
        state = load_checkpoint(path, map_location)
    except CheckpointError as e:
        if checkpoint:
            raise
        numbered = [p.name for p in list_checkpoints(run_dir)[::-1]]
        problem = "does not exist" if e.reason == "missing" else f"cannot be loaded: {e.reason}"
        if not numbered:
            raise CheckpointError(f"{path} {problem}, and {checkpoint_dir(run_dir)} has no step-N.pt: "
                                  f"train the run first (hvae train --run-dir {run_dir})") from None
        raise CheckpointError(f"{path} {problem}; numbered checkpoints of this run, newest first: {', '.join(numbered)}; "
                              f"pick one with --checkpoint {checkpoint_dir(run_dir) / numbered[0]} (or resume training, "
                              "which rewrites latest.pt)") from None
    cfg = config_from_dict(state["config"])
    model = build_model(cfg.model)
    weights = state["ema"] if (use_ema and state.get("ema") is not None) else state["model"]
    model.load_state_dict(weights)
    return EvalModel(model.eval(), cfg, path, int(state["step"]))
