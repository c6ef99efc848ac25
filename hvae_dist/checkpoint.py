"""The one checkpoint format, for every backend, and loading a model for evaluation (train and score share it).

`DIR/checkpoints/latest.pt` and `DIR/checkpoints/step-N.pt` hold a dict:

    schema_version  int
    step, epoch, batch_in_epoch   int   (the next batch to train on is batch_in_epoch of epoch)
    model           state_dict of the unwrapped model (never `module.`-prefixed)
    ema             state_dict of the EMA model, or None
    optimizer       backend optimizer state (DeepSpeed ZeRO: a list with one shard per rank)
    scaler          GradScaler state or None
    rng             list, one entry per rank: {"torch": ByteTensor, "cuda": ByteTensor | None}
    counters        dict of int/float (skipped updates, images seen, ...)
    config          the resolved config as a dict

Files are written atomically (temp file in the same folder, fsync, rename, fsync of the folder) so a
crash leaves either the old or the new checkpoint, never a torn one. Loading uses
`torch.load(weights_only=True)`: a checkpoint is data, never code.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from hvae_dist.errors import CheckpointError

SCHEMA_VERSION = 1
_STEP_RE = re.compile(r"step-(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, run_dir: str | Path, keep_last: int = 3) -> Path:
    """Write step-N.pt and latest.pt for `state["step"]`, then prune numbered files beyond `keep_last`."""
    ckdir = checkpoint_dir(run_dir)
    state = {"schema_version": SCHEMA_VERSION, **state}
    numbered = ckdir / f"step-{int(state['step'])}.pt"
    atomic_torch_save(state, numbered)
    # latest.pt is a copy (not a symlink) so that it survives copying the run dir anywhere.
    atomic_torch_save(state, ckdir / "latest.pt")
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return numbered


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Numbered checkpoints, oldest first."""
    ckdir = checkpoint_dir(run_dir)
    found = [(int(m.group(1)), p) for p in ckdir.glob("step-*.pt") if (m := _STEP_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def _safe_globals() -> list:
    # DeepSpeed's ZeRO optimizer state carries its loss-scaler object; allow exactly those classes.
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except Exception:  # deepspeed absent or changed: plain checkpoints need none of this
        pass
    return allowed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file as data (weights_only=True); checks the schema version."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as first:
            # Only DeepSpeed checkpoints need more (its loss-scaler classes); importing DeepSpeed costs
            # seconds, so it happens only for them.
            if "deepspeed" not in str(first):
                raise
            with torch.serialization.safe_globals(_safe_globals()):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read as a weights-only checkpoint: {e}") from e
    if not isinstance(state, dict) or state.get("schema_version") != SCHEMA_VERSION:
        found = state.get("schema_version") if isinstance(state, dict) else None
        raise CheckpointError(f"checkpoint {path} has schema_version {found}, expected {SCHEMA_VERSION}")
    return state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    path = checkpoint_dir(run_dir) / "latest.pt"
    return path if path.exists() else None


def load_model_for_eval(run_dir: str | Path, checkpoint: str | Path | None = None, use_ema: bool = True,
                        map_location: str | torch.device = "cpu"):
    """(model in eval mode, Config, checkpoint path) of a run dir; the EMA weights when present and asked for."""
    from hvae_dist.config import config_from_dict
    from hvae_dist.model import build_model

    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"run dir {run_dir} has no checkpoints/latest.pt: train it first (hvae train --run-dir {run_dir})")
    state = load_checkpoint(path, map_location)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg.model)
    weights = state["ema"] if (use_ema and state.get("ema") is not None) else state["model"]
    model.load_state_dict(weights)
    return model.eval(), cfg, path
