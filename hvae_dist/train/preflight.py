"""Everything a training run checks before any work, in one place.

    resolve_run_config(run_dir, config, overrides)   the run's Config: RUN/config.json when resuming (only
                                                      train.* and data.RESUMABLE_DATA_KEYS may change), else
                                                      the preset or file with the overrides
    fit_backend_to_world(cfg, world_size, ...)       `single` becomes `ddp` for several ranks (hvae submit)
    check_run(cfg, world)                            the one validation of config x world x backend x data:
                                                      every refusal a run can meet before its first step,
                                                      returned as a RunPlan (the DeepSpeed config, built once)
    check_resume(state, cfg, run_dir)                does a checkpoint fit the run that resumes it

The config alone is validated when it is built (`hvae_dist.config.validate`, on every load); `check_run`
adds what depends on the world (ranks, devices), on the backend (DeepSpeed's JSON) and on the data (the
training set's size and image shape, the validation sets). `hvae train` and the SLURM job call it once in
`runner.run_training`, before the process group, the run dir's lock or the backend's set-up; a Trainer
built without a plan (tests, benchmarks) calls it itself.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hvae_dist.checkpoint import SCHEMA_VERSION
from hvae_dist.config import (
    REMOVED_KEYS,
    RESUMABLE_DATA_KEYS,
    Config,
    apply_overrides,
    config_differences,
    config_from_dict,
    describe_differences,
    fixed_on_resume,
    load_json,
    parse_override,
    read_config_source,
)
from hvae_dist.data import check_image_shape, open_dataset, parse_spec
from hvae_dist.distributed import World
from hvae_dist.errors import CheckpointError, ConfigError, DataError, DatasetUnavailableError


# ----- the config of a run -----
def _read_saved_config(path: Path) -> dict:
    try:
        data = load_json(path.read_text(), str(path))
    except (OSError, ConfigError) as e:
        raise ConfigError(f"{path} cannot be read as a run config ({e}); restore it, or give the run's --config "
                          "and --set again to rewrite it") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("model", "data", "train")):
        raise ConfigError(f"{path} is not a run config (an object with model, data and train sections)")
    return data


def _resumable(item: str) -> bool:
    """True for a --set that may change on resume: train.*, data.<RESUMABLE_DATA_KEYS>."""
    (section, key), _ = parse_override(item)
    return section == "train" or (section == "data" and key in RESUMABLE_DATA_KEYS) or f"{section}.{key}" in REMOVED_KEYS


def resolve_run_config(run_dir: str | Path, config: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """The config of a run: RUN/config.json when resuming (only train.* and data.RESUMABLE_DATA_KEYS may
    change), else `config` (a preset or a JSON file) with `overrides` (`--set` items, later ones win)."""
    overrides = list(overrides)
    saved = Path(run_dir) / "config.json"
    if saved.exists():
        base = _read_saved_config(saved)
        # The command that started a run must resume it (SLURM requeues re-run the same command line):
        # --config and model.* / data.* overrides may be repeated, but must not change the stored values.
        requested = config_from_dict(apply_overrides(read_config_source(config) if config else base,
                                                     overrides)).to_dict()
        # input_shape is filled in from the data when a run starts: a preset's null is not a change.
        fixed, asked = fixed_on_resume(base), fixed_on_resume(requested)
        fixed["model"].pop("input_shape", None)
        asked["model"].pop("input_shape", None)
        changed = config_differences(fixed, asked)
        if changed:
            given = f"--config {config} with --set" if config else "--set"
            names = ", ".join(path for path, _, _ in changed[:6]) + (", ..." if len(changed) > 6 else "")
            raise ConfigError(f"cannot change {names} when resuming {run_dir} ({given} differs from {saved}: "
                              f"{describe_differences(changed, saved.name, 'requested', limit=3)}): only train.* and "
                              f"data.{{{','.join(RESUMABLE_DATA_KEYS)}}} may change; resume with the run's own "
                              "settings, or start a new --run-dir")
        return config_from_dict(apply_overrides(base, [o for o in overrides if _resumable(o)]))
    if config is None:
        raise ConfigError(f"{run_dir} has no config.json: give --config PRESET|FILE to start a new run")
    return config_from_dict(apply_overrides(read_config_source(config), overrides))


def fit_backend_to_world(cfg: Config, world_size: int, backend_given: str | None = None) -> Config:
    """`cfg` with train.backend `ddp` where it is `single` and the world has several ranks (a SLURM job of
    several tasks); refused when the user asked for `single` (`backend_given`, the --backend flag)."""
    if world_size > 1 and cfg.train.backend == "single":
        if backend_given == "single":
            raise ConfigError(f"--backend single with {world_size} tasks: use --backend ddp or deepspeed")
        return replace(cfg, train=replace(cfg.train, backend="ddp"))
    return cfg


# ----- the one check before any work -----
@dataclass(frozen=True)
class RunPlan:
    """What `check_run` found: the shape of the training images (C, H, W) and, for train.backend deepspeed,
    the DeepSpeed config of the run (generated, with the user's JSON merged in), built once here."""

    input_shape: tuple[int, ...]
    deepspeed_config: dict[str, Any] | None = None


def check_world(cfg: Config, world: World, how: str = "") -> None:
    """The world's refusals: the single backend in a distributed world, a batch that the ranks (x the
    accumulation steps) do not split evenly. `how` says where the number of ranks comes from."""
    t = cfg.train
    if world.distributed and t.backend == "single":
        raise ConfigError(f"train.backend='single' but WORLD_SIZE={world.world_size}: use --backend ddp or deepspeed")
    if t.batch_size % world.world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the number of ranks "
                          f"({world.world_size}{how})")
    if t.batch_size % (world.world_size * t.accumulation_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the number of ranks "
                          f"({world.world_size}{how}) "
                          f"x train.accumulation_steps={t.accumulation_steps}: every rank splits its rows into "
                          "accumulation_steps equal micro-batches")


def check_deepspeed(cfg: Config, world: World) -> dict[str, Any]:
    """The DeepSpeed config of the run (`backends.deepspeed.deepspeed_config`) and the settings DeepSpeed
    cannot honour; refused here rather than after DeepSpeed's set-up (~45 s)."""
    t = cfg.train
    if t.skip_threshold is not None:
        raise ConfigError(
            f"train.skip_threshold={t.skip_threshold} is not supported with train.backend='deepspeed': DeepSpeed "
            "clips and applies the update inside engine.step(), so an update cannot be skipped on its gradient norm "
            "(non-finite losses and fp16 overflows are still skipped); unset train.skip_threshold or use --backend ddp")
    from hvae_dist.train.backends.deepspeed import deepspeed_config

    ds = deepspeed_config(t, world)   # reads train.deepspeed_config; ConfigError for ZeRO-3, fixed keys, ...
    if t.precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ConfigError(f"train.precision='fp16' with train.backend='deepspeed' needs a device that DeepSpeed runs "
                              f"in fp16 (a GPU); its {get_accelerator().device_name()} accelerator does not: use bf16 "
                              "or fp32")
    return ds


def check_data(cfg: Config) -> tuple[int, ...]:
    """The training set holds a batch and has model.input_shape (when set); every data.val_datasets entry
    loads and has the training images' shape (when evaluation is on). Returns the training images' shape.

    Checked when the run starts: a bad validation set found at the first evaluation would stop a run after
    its training. data.val_datasets may change on resume, so the message says how to fix it.
    """
    d, t = cfg.data, cfg.train
    train_spec = parse_spec(f"{d.dataset}:train")
    name, split = train_spec.name, train_spec.split
    train_set = open_dataset(train_spec, d.root, d.download, max_examples=d.max_train_examples)
    if len(train_set) < t.batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the training set ({len(train_set)} examples)")
    if cfg.model.input_shape is not None:
        check_image_shape(f"the training set {name}:{split}", train_set.shape, cfg.model.input_shape,
                          "model.input_shape is")
    if t.eval_every:
        fix = ("fix it with --set 'data.val_datasets=[\"NAME:SPLIT\", ...]' (may change on resume) or turn "
               "evaluation off with --set train.eval_every=0")
        for spec in d.val_datasets:
            try:
                shape = open_dataset(spec, d.root, d.download, max_examples=1).shape
            except (ConfigError, DatasetUnavailableError, DataError) as e:
                why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())   # one line
                raise type(e)(f"config key 'data.val_datasets': {spec!r}: {why}; {fix}") from None
            check_image_shape(f"config key 'data.val_datasets': {spec!r}", shape, train_set.shape,
                              f"the model is trained on {d.dataset} images of shape", fix)
    return tuple(train_set.shape)


def check_run(cfg: Config, world: World) -> RunPlan:
    """The one validation of a run before any work (see the module docstring); ConfigError (or
    DatasetUnavailableError) naming the setting and the fix."""
    check_world(cfg, world)
    ds = check_deepspeed(cfg, world) if cfg.train.backend == "deepspeed" else None
    return RunPlan(input_shape=check_data(cfg), deepspeed_config=ds)


# ----- resuming -----
def check_resume(state: dict, cfg: Config, run_dir: str | Path) -> None:
    """A checkpoint resumes this run only with the same optimizer, the current schema, and the same model and
    data (but RESUMABLE_DATA_KEYS) as its own config: the one "does this checkpoint fit the run" of training."""
    saved_optimizer = state.get("config", {}).get("train", {}).get("optimizer", "adam")
    if saved_optimizer != cfg.train.optimizer:
        raise ConfigError(f"train.optimizer={cfg.train.optimizer!r}, but the checkpoint of {run_dir} holds "
                          f"{saved_optimizer!r} optimizer state, which does not fit it; resume with --set "
                          f"train.optimizer={saved_optimizer}, or start over with --restart or a new --run-dir")
    if state.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"the checkpoint of {run_dir} has schema_version {state.get('schema_version')}: it was written "
            f"before this version of hvae-dist drew its training noise and data order from counter-based keys "
            f"(schema {SCHEMA_VERSION}), so resuming it would change the run's data and noise mid-run; finish it "
            "with the version that started it, or start over with --restart or a new --run-dir (its weights "
            "still load for hvae score)")
    # Against the checkpoint's own config, not config.json: an edited or missing config.json must not let
    # a FashionMNIST model resume on MNIST.
    changed = config_differences(fixed_on_resume(state["config"]), fixed_on_resume(cfg.to_dict()))
    if changed:
        raise ConfigError(f"the checkpoint in {run_dir} was made with another model or data config "
                          f"({describe_differences(changed, 'checkpoint', 'this run')}); only train.* and "
                          f"data.{{{','.join(RESUMABLE_DATA_KEYS)}}} may change on resume: use the run's own "
                          "config, or start a new --run-dir")
