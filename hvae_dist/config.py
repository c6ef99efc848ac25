"""Typed configuration: dataclasses for model, data and training; load, override, validate.

A config is JSON with three sections, `model`, `data` and `train`; every key is a dataclass field
below. Presets (`tiny`, `fashionmnist`, `cifar10` and BIVA's `biva-tiny`, `biva-fashionmnist`,
`biva-cifar10`) are JSON files in `hvae_dist/presets/` that override the defaults. `--set section.key=value`
overrides one field; the value is parsed as JSON when it parses (numbers, true/false, null, lists) and as
a plain string otherwise.
Every error names the key, the value and what is allowed; every float must be finite (JSON's and
`--set`'s Infinity / NaN are refused). Resuming a run may change every `train.*` key but
`train.optimizer` (the checkpoint's optimizer state is that optimizer's) and the `data.*` keys of
`RESUMABLE_DATA_KEYS` (they choose what is evaluated and where files are found, not what is trained).
Keys of `REMOVED_KEYS` (removed fields) still load from old configs, with a FutureWarning, and are ignored.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvae_dist.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
LIKELIHOODS = ("bernoulli", "dmol", "discretized_logistic", "gaussian")
MODEL_TYPES = ("vae", "lvae", "biva")
DETERMINISTIC_BLOCKS = ("ResBlockConv2d",)
STOCHASTIC_BLOCKS = ("GaussianConv2d", "GaussianDense")
BINARIZE_MODES = ("none", "dynamic", "static", "dequantize")
ACTIVATIONS = ("silu", "elu", "relu", "leaky_relu")
BACKENDS = ("single", "ddp", "deepspeed")
PRECISIONS = ("fp32", "bf16", "fp16")
SCORE_PRECISIONS = ("fp32", "bf16")     # fp16 has no loss scaling to protect a forward-only pass
# ZeRO-3 shards the parameters themselves; checkpoints hold the full model, so stage 3 is not offered.
ZERO_STAGES = (0, 1, 2)
OPTIMIZERS = ("adam", "adamax", "adamw")
LR_SCHEDULES = ("constant", "cosine")
# data.* keys a resumed run may change (with every train.* key): the validation sets, and where the same
# datasets' files are found. The others (dataset, binarize, max_train_examples, perturb_rate) change what
# is trained.
RESUMABLE_DATA_KEYS = ("val_datasets", "root", "download")
REMOVED_KEYS = {"data.num_workers": "it was never used (datasets are read in memory, in the main process)"}
"""Fields that no longer exist: an old config.json / checkpoint / --set that has one loads with a FutureWarning."""
INT64_MAX = 2**63 - 1
"""The largest integer an option may have: seeds, sample counts, shard numbers and sizes are stored in
checkpoints and HDF5 files as int64."""
MAX_JSON_DEPTH = 32
"""The deepest nesting of lists / objects a config (file, config.json, --set value) may have; the deepest
real config has 5 (config, model, config_deterministic, stage, block)."""

_DET_KEYS = {"block": str, "out_channels": int, "kernel_size": int, "stride": int, "weightnorm": bool,
             "gated": bool}
_STO_KEYS = {"block": str, "latent_features": int, "weightnorm": bool}


@dataclass
class ModelConfig:
    type: str = "vae"
    """Model type: `vae` (bottom-up inference), `lvae` (ladder: top-down inference) or `biva` (bidirectional
    inference: a bottom-up and a top-down latent per intermediate stage, see hvae_dist.model.biva)."""
    likelihood: str = "bernoulli"
    """Observation model p(x|z): bernoulli (binarized data), dmol, discretized_logistic, gaussian."""
    num_mixtures: int = 10
    """Components of the discretized logistic mixture (dmol only)."""
    bits: int = 8
    """Bit depth of the data for the discretized likelihoods (bin width 1 / (2^bits - 1))."""
    activation: str = "silu"
    """Activation of the residual blocks: silu, elu, relu, leaky_relu."""
    min_scale: float = 1e-3
    """Floor added to softplus for every Gaussian scale."""
    input_shape: list | None = None
    """(C, H, W) of the data; filled in from the dataset when a run starts."""
    config_deterministic: list = field(default_factory=list)
    """One list per stage of blocks {"block": "ResBlockConv2d", out_channels, kernel_size, stride, weightnorm, gated}."""
    config_stochastic: list = field(default_factory=list)
    """One entry per stage {"block": "GaussianConv2d" | "GaussianDense", latent_features, weightnorm}."""


@dataclass
class DataConfig:
    dataset: str = "FashionMNIST"
    """Training set name (see `hvae_dist.data.DATASET_NAMES`), or a path to your own data (its `train` split,
    the first 90% of the rows, is trained on; `hvae_dist/data/specs.py`)."""
    root: str | None = None
    """Folder with torchvision's files; unset: the offline sources of this package."""
    download: bool = False
    """Let torchvision download into `root` (needs internet)."""
    binarize: str = "dynamic"
    """Input transform: none (8-bit values k/255), dynamic / static binarization, dequantize."""
    val_datasets: list = field(default_factory=lambda: ["FashionMNIST:validation", "MNIST:validation"])
    """NAME:SPLIT sets evaluated during training; the first is in-distribution, the rest OOD."""
    max_train_examples: int | None = None
    """Use only the first N training examples (quick runs)."""
    perturb_rate: float = 0.0
    """Background-model training (Ren et al. 2019): each pixel replaced by a uniform value with this probability."""


@dataclass
class TrainConfig:
    batch_size: int = 128
    """Global batch size of one optimizer update, in examples (split evenly over ranks, then over
    `accumulation_steps` micro-batches)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer update (gradient accumulation): each rank runs its batch_size / ranks
    examples as this many forward/backward passes of batch_size / (ranks x accumulation_steps) examples and
    applies one update of their mean gradient, so activation memory falls by this factor and the update is
    that of one batch of batch_size up to float rounding (exactly so with free_nats 0: the free-nats clamp
    acts on each micro-batch's mean KL, as it does on each rank's). Clipping, skipping and the logged stats
    are per update."""
    lr: float = 3e-4
    """Peak learning rate (per update) of `optimizer`; the lr of step t is `objectives.lr_at(t, ...)`."""
    lr_warmup_steps: int = 0
    """Linear lr warm-up over this many steps: step t (0-based) uses lr x (t + 1) / lr_warmup_steps, the
    full lr from step lr_warmup_steps - 1 on (0: off)."""
    lr_schedule: str = "constant"
    """After the warm-up: `constant` (lr) or `cosine` (half a cosine from lr at the end of the warm-up down to
    lr_min at step max_steps, lr_min after it). The cosine is over steps, so a run needs the step budget it
    means to reach: one stopped earlier by max_minutes (or a signal) ends mid-schedule, and a resume goes on
    along the same curve; a new --max-steps on resume stretches the rest of it."""
    lr_min: float = 0.0
    """Final learning rate of the cosine schedule (<= lr; only with lr_schedule 'cosine')."""
    optimizer: str = "adam"
    """adam, adamax (Adam with the infinity norm) or adamw (Adam with decoupled weight decay). Fixed for a
    run: a resume with another optimizer is refused (its state would not fit)."""
    weight_decay: float = 0.0
    """adamw's decoupled weight decay per update: every parameter is scaled by (1 - lr_t x weight_decay)
    before the Adam step (0: none, adamw is then adam). Refused with adam / adamax, whose `weight_decay`
    would be an L2 term added to the gradient instead."""
    max_steps: int = 100_000
    """Optimizer steps (skipped updates count as steps); also the end of the cosine lr schedule."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this wall time, in minutes (the lr schedule does not look at time)."""
    train_samples: int = 1
    """Posterior samples per example in the training ELBO."""
    free_nats: float = 2.0
    """Free-nats budget per latent layer, spread over the layer's dimensions."""
    free_nats_steps: int = 0
    """Steps with the full free-nats budget ..."""
    free_nats_cooldown_steps: int = 0
    """... then linear decay to 0 over this many steps (0 with free_nats_steps 0: constant budget)."""
    kl_warmup_steps: int = 0
    """Linear KL warm-up of beta from 0 to 1 over this many steps (0: beta = 1)."""
    grad_clip: float = 200.0
    """Clip the global gradient norm to this value (0: off)."""
    skip_threshold: float | None = None
    """Skip an update whose gradient norm exceeds this (non-finite norms are always skipped)."""
    max_skipped: int = 100
    """Stop with TrainingDivergedError after this many skipped updates in a row."""
    ema_decay: float = 0.0
    """EMA of the weights used for evaluation (0: off)."""
    checkpoint_every: int = 1000
    """Save checkpoints/step-N.pt and latest.pt every N steps (and at the end)."""
    keep_last: int = 3
    """Numbered checkpoints kept."""
    log_every: int = 50
    """Scalars to TensorBoard every N steps."""
    eval_every: int = 1000
    """Validation ELBO / LLR AUROC and image grids every N steps (0: off)."""
    eval_examples: int = 500
    """Examples per validation set."""
    eval_iw_samples: int = 10
    """Importance samples in the validation bounds."""
    seed: int = 0
    """Seed of parameters, data order and noise."""
    backend: str = "single"
    """single, ddp or deepspeed."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (autocast for the network; likelihood and KL stay fp32)."""
    deepspeed_zero_stage: int = 1
    """ZeRO stage of the generated DeepSpeed config: 0, 1 or 2 (3 is refused: checkpoints hold the full model)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON whose keys override the generated ones."""
    channels_last: bool | None = None
    """Convolutions in NHWC memory order (single / ddp backends; values equal up to float rounding). null:
    on on a CPU (oneDNN is faster in NHWC) and for bf16 / fp16 on a GPU, off for fp32 on a GPU."""
    compile: bool = False
    """torch.compile the forward and backward (single / ddp backends); the first steps pay the compile time."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def check_int_range(name: str, value: Any, low: int = 0, high: int = INT64_MAX) -> int:
    """`value` as an int in [low, high], else ConfigError naming `name` (a config key or an option such as
    --seed). The one bound check of every integer stored in a checkpoint or an HDF5 file (as int64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} is not an integer")
    if not low <= value <= high:
        upper = "2^63 - 1" if high == INT64_MAX else str(high)
        raise ConfigError(f"{name}: {value} is out of range; give an integer in [{low}, {upper}]")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of lists / dicts in `value` (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, d = todo.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, d + 1)
            if d + 1 <= MAX_JSON_DEPTH:
                todo.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def load_json(text: str, where: str, plain_string: bool = False) -> Any:
    """`text` parsed as JSON; nesting deeper than MAX_JSON_DEPTH (which Python's parser would meet with a
    RecursionError) or invalid JSON is a ConfigError naming `where` (a file, or an option).
    `plain_string`: text that is not JSON comes back as the string itself (a --set value)."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        deep = True
    except json.JSONDecodeError as e:
        if plain_string:
            return text
        raise ConfigError(f"{where} is not valid JSON: {e}") from None
    else:
        deep = _depth(value) > MAX_JSON_DEPTH
    if deep:
        raise ConfigError(f"{where}: lists / objects nested more than {MAX_JSON_DEPTH} levels deep; a config "
                          "nests at most 4 levels")
    return value


def config_differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(path, value in a, value in b) of every leaf where two config dicts differ, e.g.
    ("model.config_stochastic[1].latent_features", 16, 17); lists of equal length are compared item by item."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in [*a, *(k for k in b if k not in a)]:   # a's order (a config's field order), then b's others
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append((path, a.get(key, "(missing)"), b.get(key, "(missing)")))
            else:
                out += config_differences(a[key], b[key], path)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in config_differences(x, y, f"{prefix}[{i}]")]
    return [] if a == b else [(prefix, a, b)]


def fixed_on_resume(cfg: dict) -> dict:
    """The part of a config dict that a resumed run must keep: model.*, and data.* but RESUMABLE_DATA_KEYS."""
    return {"model": dict(cfg.get("model", {})),
            "data": {k: v for k, v in cfg.get("data", {}).items()
                     if k not in RESUMABLE_DATA_KEYS and f"data.{k}" not in REMOVED_KEYS}}


def describe_differences(diffs: list[tuple[str, Any, Any]], a_name: str, b_name: str, limit: int = 6) -> str:
    """'model.x: A 16, B 17; ...' for the first `limit` differences (values in full, JSON-like), '+N more'."""
    def show(v: Any) -> str:
        return v if v == "(missing)" else json.dumps(v, sort_keys=True)

    parts = [f"{path}: {a_name} {show(x)}, {b_name} {show(y)}" for path, x, y in diffs[:limit]]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(parts) + more


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}': {value!r} is not allowed; give a finite number")
        return value
    expected = origin or tp
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, float),
        str: isinstance(value, str),
        list: isinstance(value, list),
    }.get(expected, True)
    if not ok:
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _section_from_dict(name: str, data: dict) -> Any:
    cls = SECTIONS[name]
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{name}' must be an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if f"{name}.{key}" in REMOVED_KEYS:
            warnings.warn(f"config key '{name}.{key}' is ignored and will be refused in a later version: "
                          f"{REMOVED_KEYS[f'{name}.{key}']}; remove it", FutureWarning, stacklevel=2)
            continue
        if key not in known:
            raise ConfigError(f"unknown config key '{name}.{key}'; allowed keys of '{name}': {', '.join(known)}")
        kwargs[key] = _check_type(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a JSON object with sections {list(SECTIONS)}, got {type(data).__name__}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"unknown config section '{key}'; allowed: {', '.join(SECTIONS)}")
    cfg = Config(**{name: _section_from_dict(name, data.get(name, {})) for name in SECTIONS})
    validate(cfg)
    return cfg


def deep_merge(base: dict, new: dict) -> dict:
    """A copy of `base` with `new` merged in: nested dicts merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in new.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def read_config_source(name_or_path: str) -> dict:
    """The dict of a preset name or a JSON file path (not yet validated)."""
    path = Path(name_or_path)
    if not path.suffix and (PRESET_DIR / f"{name_or_path}.json").exists():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise ConfigError(f"config '{name_or_path}' is neither a preset ({', '.join(preset_names())}) nor an existing file")
    return load_json(path.read_text(), f"config file {path}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001). Values parse as JSON, else stay strings."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-3)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"override key '{key}' must be section.key with section one of {', '.join(SECTIONS)}")
    return parts, load_json(raw, f"--set {key}", plain_string=True)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        (section, key), value = parse_override(item)
        data = deep_merge(data, {section: {key: value}})
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Load a preset or JSON file, apply `--set` overrides, validate."""
    return config_from_dict(apply_overrides(read_config_source(name_or_path), overrides))


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}': {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}': {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _check_blocks(key: str, blocks: Any, schema: dict, names: tuple) -> None:
    if not isinstance(blocks, dict):
        raise ConfigError(f"config key '{key}': each block must be an object, got {blocks!r}")
    for k, v in blocks.items():
        if k not in schema:
            raise ConfigError(f"config key '{key}.{k}': unknown block field; allowed: {', '.join(schema)}")
        _check_type(f"{key}.{k}", v, schema[k])
    missing = [k for k in ("block", *[k for k in schema if k in ("out_channels", "latent_features")]) if k not in blocks]
    if missing:
        raise ConfigError(f"config key '{key}': missing field(s) {', '.join(missing)}")
    _check_choice(f"{key}.block", blocks["block"], names)
    for k in ("out_channels", "kernel_size", "stride", "latent_features"):
        if k in blocks:
            _check_positive(f"{key}.{k}", blocks[k])
    if blocks.get("kernel_size", 1) % 2 == 0:
        raise ConfigError(f"config key '{key}.kernel_size': {blocks['kernel_size']} must be odd (same padding)")


def validate(cfg: Config) -> None:
    """Raise ConfigError for any impossible value; checks cross-field consistency too."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _check_choice("model.type", m.type, MODEL_TYPES)
    _check_choice("model.likelihood", m.likelihood, LIKELIHOODS)
    _check_choice("model.activation", m.activation, ACTIVATIONS)
    _check_positive("model.num_mixtures", m.num_mixtures)
    _check_positive("model.bits", m.bits)
    _check_positive("model.min_scale", m.min_scale)
    if not m.config_deterministic or not m.config_stochastic:
        raise ConfigError("config keys 'model.config_deterministic' and 'model.config_stochastic' must be non-empty lists")
    if len(m.config_deterministic) != len(m.config_stochastic):
        raise ConfigError(
            f"model.config_deterministic has {len(m.config_deterministic)} stages but model.config_stochastic has "
            f"{len(m.config_stochastic)}: there must be one list of deterministic blocks per stochastic layer")
    for i, stage in enumerate(m.config_deterministic):
        if not isinstance(stage, list) or not stage:
            raise ConfigError(f"config key 'model.config_deterministic[{i}]' must be a non-empty list of blocks")
        for j, block in enumerate(stage):
            _check_blocks(f"model.config_deterministic[{i}][{j}]", block, _DET_KEYS, DETERMINISTIC_BLOCKS)
    for i, block in enumerate(m.config_stochastic):
        _check_blocks(f"model.config_stochastic[{i}]", block, _STO_KEYS, STOCHASTIC_BLOCKS)
    if m.input_shape is not None and (len(m.input_shape) != 3 or not all(isinstance(s, int) and s > 0 for s in m.input_shape)):
        raise ConfigError(f"config key 'model.input_shape': {m.input_shape!r} must be [C, H, W] positive integers")
    _check_choice("data.binarize", d.binarize, BINARIZE_MODES)
    if (m.likelihood == "bernoulli") != (d.binarize in ("dynamic", "static")):
        raise ConfigError(
            f"model.likelihood={m.likelihood!r} does not fit data.binarize={d.binarize!r}: the bernoulli likelihood needs "
            "binarized data (dynamic/static) and the other likelihoods need non-binarized data (none/dequantize)")
    if not 0.0 <= d.perturb_rate < 1.0:
        raise ConfigError(f"config key 'data.perturb_rate': {d.perturb_rate!r} must be in [0, 1)")
    if d.max_train_examples is not None:
        _check_positive("data.max_train_examples", d.max_train_examples)
    for spec in d.val_datasets:
        if not isinstance(spec, str) or (spec.count(":") != 1 and not any(c in spec for c in "/.~")):
            raise ConfigError(f"config key 'data.val_datasets': {spec!r} must look like NAME:SPLIT or be a path to "
                              "your data (PATH[:SPLIT], hvae_dist/data/specs.py)")
    repeated = sorted({s for s in d.val_datasets if d.val_datasets.count(s) > 1})
    if repeated:
        raise ConfigError(f"config key 'data.val_datasets': {', '.join(repeated)} appears more than once")
    if t.eval_every and not d.val_datasets:
        raise ConfigError(f"config key 'data.val_datasets' is empty but train.eval_every={t.eval_every}: name at "
                          "least one NAME:SPLIT (the first is in-distribution) or set train.eval_every=0")
    for key in ("batch_size", "accumulation_steps", "max_steps", "train_samples", "checkpoint_every", "keep_last",
                "log_every", "eval_examples", "eval_iw_samples", "max_skipped"):
        _check_positive(f"train.{key}", getattr(t, key))
    for key in ("free_nats", "free_nats_steps", "free_nats_cooldown_steps", "kl_warmup_steps", "grad_clip",
                "eval_every", "ema_decay", "lr_warmup_steps", "lr_min", "weight_decay"):
        _check_positive(f"train.{key}", getattr(t, key), allow_zero=True)
    _check_positive("train.lr", t.lr)
    _validate_recipe(t)
    if d.max_train_examples is not None and d.max_train_examples < t.batch_size:
        raise ConfigError(f"config key 'data.max_train_examples': {d.max_train_examples} is smaller than train.batch_size="
                          f"{t.batch_size}: not one batch to train on")
    check_int_range("config key 'train.seed'", t.seed)
    if t.ema_decay >= 1.0:
        raise ConfigError(f"config key 'train.ema_decay': {t.ema_decay!r} must be in [0, 1)")
    if t.skip_threshold is not None:
        _check_positive("train.skip_threshold", t.skip_threshold)
    if t.max_minutes is not None:
        _check_positive("train.max_minutes", t.max_minutes)
    _check_choice("train.backend", t.backend, BACKENDS)
    _check_choice("train.precision", t.precision, PRECISIONS)
    if t.deepspeed_zero_stage not in ZERO_STAGES:
        raise ConfigError(f"config key 'train.deepspeed_zero_stage': {t.deepspeed_zero_stage!r} is not allowed; choose "
                          f"one of {', '.join(map(str, ZERO_STAGES))} (ZeRO-3 shards the parameters, but checkpoints "
                          "hold the full model)")


def _validate_recipe(t: TrainConfig) -> None:
    """The lr schedule, optimizer and gradient accumulation keys (their ranges are checked by the caller)."""
    _check_choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _check_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    if t.lr_schedule == "cosine":
        if t.lr_min > t.lr:
            raise ConfigError(f"config key 'train.lr_min': {t.lr_min!r} is above train.lr={t.lr!r}; the cosine schedule "
                              "decays from train.lr down to train.lr_min")
        if t.lr_warmup_steps >= t.max_steps:
            raise ConfigError(f"config key 'train.lr_warmup_steps': {t.lr_warmup_steps} is not below train.max_steps="
                              f"{t.max_steps}: the cosine schedule decays over the steps after the warm-up, up to "
                              "train.max_steps (--max-steps); shorten the warm-up or raise max_steps")
    elif t.lr_min != 0:
        raise ConfigError(f"config key 'train.lr_min': {t.lr_min!r} is only used by train.lr_schedule='cosine' (the "
                          f"schedule is {t.lr_schedule!r}); set train.lr_schedule=cosine or train.lr_min=0")
    if t.weight_decay > 0 and t.optimizer != "adamw":
        raise ConfigError(f"config key 'train.weight_decay': {t.weight_decay!r} is only applied by train.optimizer="
                          f"'adamw' (decoupled weight decay), not by {t.optimizer!r}; set train.optimizer=adamw or "
                          "train.weight_decay=0")
    if t.batch_size % t.accumulation_steps:
        raise ConfigError(f"config key 'train.accumulation_steps': {t.accumulation_steps} does not divide "
                          f"train.batch_size={t.batch_size}: each update's batch is split into accumulation_steps "
                          "equal micro-batches (on every rank)")

