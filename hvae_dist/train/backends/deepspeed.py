"""DeepSpeed backend: ZeRO stage 0/1/2, DeepSpeed's own bf16 / fp16 (dynamic loss scaling), one checkpoint format.

The DeepSpeed JSON is generated from `TrainConfig` (see `deepspeed_config`) and a user JSON given as
`train.deepspeed_config` is deep-merged over it, once per run, by `hvae_dist.train.preflight.check_run`
(which also refuses what DeepSpeed cannot honour before its set-up). The optimizer is always the `torch.optim` optimizer of
`train.optimizer` (`base.build_optimizer`) handed to `deepspeed.initialize`, so DeepSpeed never JIT-builds
its fused Adam; the engine sets its lr before every update (DeepSpeed has no scheduler of its own here).

Gradient accumulation: `gradient_accumulation_steps` = `train.accumulation_steps` (k), micro-batch =
batch_size / (ranks x k). Every micro-batch is `engine.backward(loss)` (DeepSpeed divides the loss by k)
and `engine.step()`; DeepSpeed counts the calls and reduces, clips and applies the update only at the
k-th, so an update never spans two of the engine's updates (either all k calls reach DeepSpeed, or none).

Precision: with bf16/fp16 DeepSpeed casts the module's parameters to 16 bits and keeps fp32 master
weights in its optimizer. The forward still runs under `torch.autocast` (the Backend default): the
model hands fp32 tensors between layers (inputs, the fp32 latent samples it draws from the noise,
likelihood and KL math), and autocast casts them to the 16-bit parameters' dtype at each conv/linear.

Skipping: DeepSpeed applies the update inside `engine.step()`, after clipping, so a grad-norm
threshold (`train.skip_threshold`) cannot be honoured and is refused. What is skipped:
  * a non-finite loss on ANY rank: a finiteness flag is all-reduced (MIN) before each backward and every
    rank skips the update alike (StepResult(nan, skipped=True)). When it is the update's first
    micro-batch, nothing reaches DeepSpeed (as without accumulation). When earlier micro-batches were
    already backwarded, DeepSpeed's count must still reach the boundary: the rest of the update's
    micro-batches backward a zero loss and the boundary `engine.step()` runs with the torch optimizer's
    own `step` disabled for that call, so no weight, moment or step count changes;
  * fp16 overflow: DeepSpeed's own loss scaler skips the step and lowers the scale
    (`engine.was_step_applied()` is False).

Checkpoints use the one format of `hvae_dist.checkpoint`: `"model"` is the full state_dict of
the unwrapped model in fp32 (for bf16/fp16 the fp32 master weights, gathered from the ZeRO partitions),
`"optimizer"` is a list with one entry per rank, `{"zero_stage", "precision", "state"}`, where `state`
is that rank's DeepSpeed optimizer state converted to plain types (weights-only loadable). Resuming
needs the same number of ranks, ZeRO stage and precision.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hvae_dist.config import ZERO_STAGES, TrainConfig, deep_merge
from hvae_dist.distributed import World, device_for, export_slurm_rendezvous
from hvae_dist.errors import CheckpointError, ConfigError
from hvae_dist.train.backends.base import Backend, StepResult, build_optimizer, set_group_hyperparameters

log = logging.getLogger("hvae_dist.train")
# Keys of the generated config that the engine's data flow depends on: micro-batches of
# batch_size / (world x accumulation_steps) per rank, accumulation_steps of them per optimizer step.
_FIXED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_deepspeed_env(world: World) -> None:
    """Set what DeepSpeed needs and create the process group (called before `init_distributed`).

    A single process (no torchrun / srun) gets RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 and a free local
    MASTER_PORT, so DeepSpeed does not go looking for MPI (mpi4py). Under srun the rendezvous
    variables are derived from SLURM's. The group is gloo on CPU and NCCL on GPU;
    `hvae_dist.distributed.init_distributed` then finds it initialised and does nothing.
    """
    export_slurm_rendezvous()
    if world.world_size == 1:
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.distributed.is_initialized():
        return
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(device_for(world))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               rank=world.rank, world_size=world.world_size, verbose=False)


def read_user_deepspeed_config(path: str) -> dict:
    """The JSON object of `train.deepspeed_config`; ConfigError naming the file when it cannot be used."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"config key 'train.deepspeed_config': cannot read {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'train.deepspeed_config': {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config key 'train.deepspeed_config': {path} must hold a JSON object, got {type(data).__name__}")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ConfigError(f"config key 'train.deepspeed_config': {path} sets '{key}', but the optimizer is always "
                              "train.optimizer with train.lr and its schedule (built by hvae_dist); remove the "
                              f"'{key}' section")
    return data


def deepspeed_config(cfg: TrainConfig, world: World) -> dict:
    """The DeepSpeed JSON of a run: generated from `cfg`, then `cfg.deepspeed_config` deep-merged over it."""
    k = cfg.accumulation_steps
    micro = cfg.batch_size // (world.world_size * k)
    generated = {"train_batch_size": micro * world.world_size * k, "train_micro_batch_size_per_gpu": micro,
                 "gradient_accumulation_steps": k}
    ds: dict[str, Any] = {
        **generated,
        "gradient_clipping": float(cfg.grad_clip),   # 0: off
        "zero_optimization": {"stage": cfg.deepspeed_zero_stage},
        "steps_per_print": 2**31 - 1,                 # the engine logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer == "adamax":
        # DeepSpeed lists Adam and AdamW as tested with ZeRO, not Adamax (elementwise too: a partition's
        # update is the whole tensor's).
        ds["zero_allow_untested_optimizer"] = True
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        # loss_scale 0: dynamic loss scaling, starting at 2^initial_scale_power.
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if cfg.deepspeed_config:
        ds = deep_merge(ds, read_user_deepspeed_config(cfg.deepspeed_config))
        for key in _FIXED_KEYS:
            if ds.get(key) != generated[key]:
                raise ConfigError(f"config key 'train.deepspeed_config': {cfg.deepspeed_config} sets {key}={ds.get(key)!r}, "
                                  f"but the run needs {generated[key]!r} (train.batch_size={cfg.batch_size} over "
                                  f"{world.world_size} rank(s) and train.accumulation_steps={k} micro-batches); change "
                                  "train.batch_size / train.accumulation_steps instead")
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in ZERO_STAGES:
            raise ConfigError(f"config key 'train.deepspeed_config': {cfg.deepspeed_config} sets zero_optimization.stage="
                              f"{stage!r}, which is not supported; "
                              f"choose one of {', '.join(map(str, ZERO_STAGES))}")
        want = {"bf16": cfg.precision == "bf16", "fp16": cfg.precision == "fp16"}
        for key, on in want.items():
            if bool(ds.get(key, {}).get("enabled", False)) != on:
                raise ConfigError(f"config key 'train.deepspeed_config': {cfg.deepspeed_config} sets {key}.enabled="
                                  f"{ds.get(key, {}).get('enabled')!r} but train.precision={cfg.precision!r}; "
                                  "set the precision with --precision / train.precision")
    return ds


def _plain(obj: Any) -> Any:
    """DeepSpeed optimizer state -> types `torch.load(weights_only=True)` accepts (tensors moved to CPU).

    ZeRO's state holds a ZeroStageEnum and dataclass `fragment_address` slice mappings (neither is read
    back when loading); they become an int and dicts. The LossScaler objects stay (checkpoint.py allowlists them).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj) if type(obj) in (list, tuple) else [_plain(v) for v in obj]
    return obj


class DeepSpeedBackend(Backend):
    """`forward_module` is the DeepSpeed engine; `raw_model` the HierarchicalModel it wraps."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, world: World, device: torch.device, ds_config: dict):
        """`ds_config`: the run's DeepSpeed config, built and checked once before any work
        (`hvae_dist.train.preflight.check_run`, with the settings DeepSpeed cannot honour)."""
        super().__init__(cfg, world, device)
        if not torch.distributed.is_initialized():
            prepare_deepspeed_env(world)
        import deepspeed

        self.ds_config = ds_config
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        model = model.to(device)
        self.optimizer = build_optimizer(list(model.parameters()), cfg)   # DeepSpeed's wrappers step this one
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        self.raw_model = self.engine.module
        self.forward_module = self.engine
        # Stage 0 in fp32 leaves the optimizer a plain torch Adam: DeepSpeed reports no grad norm then.
        self._own_grad_norm = not (self.engine.zero_optimization() or self.engine.bfloat16_enabled()
                                   or self.engine.fp16_enabled())
        # The update in progress: micro-batches DeepSpeed has seen, and whether the update is skipped.
        self._fed, self._skip = 0, False
        if world.is_main:
            log.info("DeepSpeed engine: zero_stage %d, bf16 %s, fp16 %s, gradient_clipping %g, micro_batch %d, "
                     "gradient_accumulation_steps %d, optimizer %s (%s)", self.engine.zero_optimization_stage(),
                     self.engine.bfloat16_enabled(), self.engine.fp16_enabled(), self.engine.gradient_clipping(),
                     self.engine.train_micro_batch_size_per_gpu(), self.engine.gradient_accumulation_steps(),
                     type(self.engine.optimizer).__name__, type(self.optimizer).__name__)

    # ----- one update -----
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:   # the groups DeepSpeed's ZeRO / bf16 wrappers step with
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.world.distributed:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1.0:
            self._skip = True   # on every rank alike: the flag is all-reduced
        if self._skip and not self._fed:
            # Nothing of this update reached DeepSpeed: no rank runs backward (so none enters its gradient
            # reduction), and its micro-batch count stays on the update boundaries.
            return
        if self._skip:
            # A later micro-batch: the zero gradient of every parameter, whatever their values, so that the
            # count reaches the boundary with finite gradients (discarded there, see step()).
            loss = sum(p.sum() for p in self.raw_model.parameters() if p.requires_grad) * 0.0
        self.engine.backward(loss)
        self._fed += 1
        if self._fed < self.cfg.accumulation_steps:
            self.engine.step()   # not the boundary: DeepSpeed only counts the micro-batch

    def step(self, loss: torch.Tensor | None = None) -> StepResult:
        if loss is not None:
            self.backward(loss)
        fed, skip = self._fed, self._skip
        self._fed, self._skip = 0, False
        if skip:
            if fed:
                _no_optimizer_step(self.optimizer, self.engine.step)   # the boundary, nothing applied
            return StepResult(grad_norm=float("nan"), skipped=True)
        if fed != self.cfg.accumulation_steps:
            raise RuntimeError(f"step() after {fed} micro-batch backward(s); train.accumulation_steps is "
                               f"{self.cfg.accumulation_steps}")
        own_norm = None
        if self._own_grad_norm:  # after backward the gradients are already averaged over ranks
            grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        # DeepSpeed reports None when it has not computed a norm; 0.0 keeps the logged scalar a number.
        grad_norm = float(norm) if norm is not None else 0.0
        if not applied and math.isfinite(grad_norm):
            grad_norm = float("inf")  # fp16 overflow: the scaled gradients were not finite
        return StepResult(grad_norm=grad_norm, skipped=not applied)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ----- state -----
    def _shard(self) -> dict:
        return {"zero_stage": self.zero_stage, "precision": self.cfg.precision,
                "state": _plain(self.engine.optimizer.state_dict())}

    def model_state_dict(self) -> dict:
        """The unwrapped model's state_dict in fp32: for bf16/fp16 the parameters are DeepSpeed's fp32
        master weights (collective: gathered from every rank's ZeRO partition), buffers as they are."""
        state = self.raw_model.state_dict()
        if self.cfg.precision == "fp32":
            return state
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in self.raw_model.named_parameters():
            full = safe_get_full_fp32_param(param)
            state[name] = (full if full is not None else param.detach().float()).detach().cpu().clone()
        return state

    def state_dict(self) -> dict:
        """{"optimizer": [one shard per rank] on rank 0 (None on the others), "scaler": None}. Collective."""
        shard = self._shard()
        shards = [shard]
        if self.world.distributed:
            shards = [None] * self.world.world_size if self.world.is_main else None
            torch.distributed.gather_object(shard, shards, dst=0)
        return {"optimizer": shards, "scaler": None}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a whole checkpoint dict (after its "model" entry was loaded into raw_model)."""
        shards = state.get("optimizer")
        if not isinstance(shards, list) or not all(isinstance(s, dict) and "zero_stage" in s for s in shards):
            made_with = state.get("config", {}).get("train", {}).get("backend", "?")
            raise CheckpointError(f"the checkpoint's optimizer state was not written by the DeepSpeed backend "
                                  f"(train.backend={made_with!r}); resume it with --backend {made_with}, "
                                  "or start a new --run-dir")
        if len(shards) != self.world.world_size:
            raise CheckpointError(f"the checkpoint holds DeepSpeed optimizer shards of {len(shards)} rank(s), but this run has "
                                  f"{self.world.world_size}: resume with {len(shards)} rank(s) (ZeRO partitions the "
                                  "optimizer state by rank)")
        mine = shards[self.world.rank]
        if mine["zero_stage"] != self.zero_stage or mine["precision"] != self.cfg.precision:
            raise CheckpointError(f"the checkpoint was written with ZeRO stage {mine['zero_stage']} / {mine['precision']}, this "
                                  f"run uses ZeRO stage {self.zero_stage} / {self.cfg.precision}: resume with the same "
                                  "train.deepspeed_zero_stage and train.precision")
        optimizer = self.engine.optimizer
        params = list(inspect.signature(optimizer.load_state_dict).parameters)
        if params and params[0] == "state_dict_list":  # ZeRO 1/2 and the bf16 optimizer: every rank's shard
            optimizer.load_state_dict([s["state"] for s in shards], load_optimizer_states=True,
                                      load_from_fp32_weights=True)
        else:  # plain torch Adam (stage 0 fp32) or DeepSpeed's fp16 optimizer: this rank's state
            optimizer.load_state_dict(mine["state"])
        set_group_hyperparameters(self.optimizer, self.cfg)   # train.weight_decay may change on resume


def _no_optimizer_step(optimizer: torch.optim.Optimizer, engine_step) -> None:
    """Run `engine_step()` (DeepSpeed's boundary: clip, step, copy back, zero the gradients, count) with
    `optimizer.step` a no-op: the weights, moments and step counts stay as they were."""
    optimizer.step = lambda *args, **kwargs: None   # an instance attribute shadows the class's step
    try:
        engine_step()
    finally:
        del optimizer.step
