"""The DeepSpeed backend: generated / user-overridden DeepSpeed JSON, refused settings, weights-only
checkpoints, and real runs through the CLI (one process under pytest, two processes under torchrun with
ZeRO-1 / ZeRO-2) that train, skip a NaN loss on every rank, keep the ranks' weights identical and resume
to the same weights as an uninterrupted run."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import faults

pytest.importorskip("deepspeed")

from hvae_dist.checkpoint import load_checkpoint
from hvae_dist.config import TrainConfig, load_config
from hvae_dist.distributed import World
from hvae_dist.errors import ConfigError
from hvae_dist.model import build_model
from hvae_dist.train.backends.deepspeed import _plain, deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = ["--set", "data.max_train_examples=256", "--set", "train.eval_every=0", "--set", "train.log_every=1",
         "--set", "train.batch_size=16", "--set", "train.checkpoint_every=1000"]

# Runs the normal CLI, and after fit() dumps this rank's module weights (fp32) to DIR/rank{R}-step{S}.pt,
# so the test can compare what every rank holds (the checkpoint only has rank 0's view).
DRIVER = textwrap.dedent("""
    import sys
    import torch
    import hvae_dist.train.engine as engine
    _fit = engine.Trainer.fit
    def fit(self, *args, **kwargs):
        out = _fit(self, *args, **kwargs)
        weights = {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}
        torch.save(weights, self.run_dir / f"rank{self.world.rank}-step{self.step}.pt")
        return out
    engine.Trainer.fit = fit
    from hvae_dist.cli import main
    sys.exit(main())
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HVAE_DEBUG_NAN_AT_STEP")}
    env.update(PYTHONPATH=os.pathsep.join([str(faults.INJECT_DIR), str(ROOT)]), OMP_NUM_THREADS="1", **extra)
    return env


def _train(run_dir: Path, steps: int, *args: str, nproc: int = 1, driver: Path | None = None, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """`hvae train --config tiny --backend deepspeed` for `steps` steps, in 1 process or under torchrun."""
    train = ["train", "--config", "tiny", "--run-dir", str(run_dir), "--backend", "deepspeed",
             "--max-steps", str(steps), *SMALL, *args]
    program = [str(driver)] if driver is not None else ["-m", "hvae_dist"]
    if nproc == 1:
        cmd = [sys.executable, *program, *train]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *program, *train]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


def _log(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


def _losses(run_dir: Path) -> list[float]:
    return [float(line.split(" loss ")[1].split()[0]) for line in _log(run_dir).splitlines() if " loss " in line]


def _assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[0]}: max |diff| {float((a[bad[0]] - b[bad[0]]).abs().max())}"


@pytest.fixture
def driver(tmp_path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


# ----- the generated DeepSpeed JSON -----

@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_generated_deepspeed_config_follows_the_train_config(precision):
    cfg = TrainConfig(batch_size=64, grad_clip=50.0, deepspeed_zero_stage=2, precision=precision, backend="deepspeed")
    ds = deepspeed_config(cfg, World(0, 4, 0, "torchrun"))
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["train_batch_size"] == 64
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 50.0
    assert ds["zero_optimization"] == {"stage": 2}
    assert "optimizer" not in ds and "scheduler" not in ds  # ours is a torch Adam handed to deepspeed.initialize
    assert ("bf16" in ds) == (precision == "bf16") and ("fp16" in ds) == (precision == "fp16")
    if precision == "fp16":
        assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_user_deepspeed_json_is_deep_merged_over_the_generated_config(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 5.0, "zero_optimization": {"reduce_bucket_size": 12345}}))
    cfg = TrainConfig(batch_size=32, deepspeed_zero_stage=1, deepspeed_config=str(user))
    ds = deepspeed_config(cfg, World(0, 2, 0, "torchrun"))
    assert ds["gradient_clipping"] == 5.0
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 12345}  # merged, not replaced
    assert ds["train_micro_batch_size_per_gpu"] == 16


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"optimizer": {"type": "AdamW"}}', "optimizer"),
    ('{"train_micro_batch_size_per_gpu": 3}', "train.batch_size"),
    ('{"zero_optimization": {"stage": 3}}', "stage"),
    ('{"bf16": {"enabled": true}}', "train.precision"),
])
def test_unusable_user_deepspeed_json_raises_a_config_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    cfg = TrainConfig(batch_size=32, deepspeed_config=str(path))
    with pytest.raises(ConfigError, match=message) as err:
        deepspeed_config(cfg, World())
    assert "train.deepspeed_config" in str(err.value) and str(path) in str(err.value)


# ----- refused settings -----

def test_skip_threshold_with_deepspeed_raises_config_error_before_deepspeed_starts():
    from hvae_dist.train.preflight import check_run

    cfg = load_config("tiny", ["train.backend=deepspeed", "train.skip_threshold=100.0"])
    with pytest.raises(ConfigError, match="skip_threshold.*engine.step"):
        check_run(cfg, World())
    assert not torch.distributed.is_initialized()


def test_zero_stage_3_is_refused_by_config_validation_before_any_deepspeed_setup():
    with pytest.raises(ConfigError, match=r"deepspeed_zero_stage.*choose one of 0, 1, 2 \(ZeRO-3"):
        load_config("tiny", ["train.backend=deepspeed", "train.deepspeed_zero_stage=3"])


def test_deepspeed_optimizer_state_becomes_weights_only_loadable():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from hvae_dist.checkpoint import _safe_globals

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": scaler,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
             "single_partition_of_fp32_groups": [torch.arange(4.0)], "ds_version": "0.19.8"}
    plain = _plain(state)
    assert plain["zero_stage"] == 2 and plain["param_slice_mappings"] == [{"w": {"numel": 4, "start": 0}}]
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    with torch.serialization.safe_globals(_safe_globals()):
        back = torch.load(buf, weights_only=True)
    assert back["loss_scaler"].cur_scale == 2.0**16
    assert torch.equal(back["single_partition_of_fp32_groups"][0], torch.arange(4.0))


# ----- real runs -----

def test_single_process_cli_run_applies_user_json_and_skips_a_nan_loss(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 5.0}))
    run = tmp_path / "run"
    _train(run, 4, "--set", f"train.deepspeed_config={user}", env=_env(HVAE_DEBUG_NAN_AT_STEP="1"))
    log = _log(run)
    assert "gradient_clipping 5," in log and "zero_stage 1" in log  # what the DeepSpeed engine itself reports
    assert "step 1: skipped update (grad norm nan)" in log
    state = load_checkpoint(run / "checkpoints" / "latest.pt")  # weights_only=True
    assert state["step"] == 4 and state["counters"]["skipped_total"] == 1
    assert isinstance(state["optimizer"], list) and len(state["optimizer"]) == 1
    assert state["optimizer"][0]["zero_stage"] == 1 and state["scaler"] is None
    losses = _losses(run)
    assert len(losses) == 4 and math.isnan(losses[1])  # the update of step 1 (0-based) logged its NaN loss ...
    assert all(math.isfinite(losses[i]) for i in (0, 2, 3))  # ... and training went on


def _cpu_accelerator_runs_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


def test_fp16_runs_with_deepspeeds_dynamic_loss_scaling_or_is_refused_where_its_accelerator_cannot(tmp_path):
    """DeepSpeed's CPU accelerator decides from the CPU whether it runs fp16; both outcomes are checked exactly."""
    proc = _train(tmp_path / "run", 3, "--precision", "fp16", check=False)
    if not _cpu_accelerator_runs_fp16():
        assert proc.returncode == 2
        assert "fp16" in proc.stderr and "use bf16 or fp32" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    shard = state["optimizer"][0]
    assert shard["precision"] == "fp16" and shard["state"]["dynamic_loss_scale"] is True
    # The initial scale 2^16 overflows the tiny model's fp16 gradients: DeepSpeed skips those updates and
    # lowers the scale (after its hysteresis of one overflow), and the engine counts the skips like any other.
    skipped = state["counters"]["skipped_total"]
    assert 1 <= skipped <= 3 and shard["state"]["loss_scaler"].cur_scale == 2.0 ** (16 - max(0, skipped - 1))
    assert _log(tmp_path / "run").count("skipped update (grad norm inf)") == skipped


def test_bf16_deepspeed_run_trains_and_resumes_exactly_from_fp32_master_weights(tmp_path, driver):
    """bf16: DeepSpeed casts the module to bf16 and keeps fp32 masters in the ZeRO optimizer; the
    checkpoint's "model" holds those masters, and a resumed run is bitwise equal to an uninterrupted one."""
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, 2, "--precision", "bf16", driver=driver)
    state = load_checkpoint(a / "checkpoints" / "latest.pt")
    masters = {k: v for k, v in state["model"].items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 for v in masters.values())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values()), "checkpoint holds bf16-rounded weights"
    module = torch.load(a / "rank0-step2.pt", weights_only=True)  # the module's own bf16 weights
    for k, v in masters.items():
        assert torch.equal(module[k], v.bfloat16().float()), k
    _train(a, 4, "--precision", "bf16", driver=driver)
    _train(b, 4, "--precision", "bf16", driver=driver)
    assert "resuming run" in _log(a)
    _assert_same_weights(load_checkpoint(a / "checkpoints" / "latest.pt")["model"],
                         load_checkpoint(b / "checkpoints" / "latest.pt")["model"], "bf16 resumed vs uninterrupted")
    assert all(math.isfinite(v) for v in _losses(b))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_two_process_zero_run_trains_keeps_ranks_equal_and_resumes_like_an_uninterrupted_run(tmp_path, driver, stage):
    n = 3
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--set", f"train.deepspeed_zero_stage={stage}"]
    env = _env(HVAE_DEBUG_NAN_AT_STEP="4")  # a NaN loss in the resumed half: every rank must skip it alike
    _train(a, n, *args, nproc=2, driver=driver, env=env)
    first = load_checkpoint(a / "checkpoints" / "latest.pt")
    assert first["step"] == n and len(first["optimizer"]) == 2
    assert [s["zero_stage"] for s in first["optimizer"]] == [stage, stage]
    # ZeRO-1/2 in fp32: the module holds the updated weights, equal to the concatenated fp32 partitions.
    flat = torch.cat([torch.cat([g.flatten() for g in s["state"]["single_partition_of_fp32_groups"]])
                      for s in first["optimizer"]])
    params = torch.cat([v.flatten() for k, v in first["model"].items() if k in dict(build_model(
        load_config("tiny").model, (1, 28, 28)).named_parameters())])
    assert torch.equal(flat[:params.numel()], params)
    if stage == 1:  # ZeRO partitions the optimizer state by rank: another world size is refused clearly
        proc = _train(a, 2 * n, *args, nproc=1, check=False)
        assert proc.returncode == 2 and "shards of 2 rank(s), but this run has 1" in proc.stderr, proc.stderr[-3000:]
    _train(a, 2 * n, *args, nproc=2, driver=driver, env=env)
    _train(b, 2 * n, *args, nproc=2, driver=driver, env=env)
    for run in (a, b):
        _assert_same_weights(torch.load(run / f"rank0-step{2 * n}.pt", weights_only=True),
                             torch.load(run / f"rank1-step{2 * n}.pt", weights_only=True), f"{run.name}: rank 0 vs rank 1")
    resumed, straight = (load_checkpoint(r / "checkpoints" / "latest.pt") for r in (a, b))
    assert resumed["counters"]["skipped_total"] == straight["counters"]["skipped_total"] == 1
    # Bitwise: same data/noise per step, the fp32 partitions and Adam moments are restored exactly, and
    # gloo reduces the same tensors in the same order.
    _assert_same_weights(resumed["model"], straight["model"], f"ZeRO-{stage}: resumed vs uninterrupted")
    losses = _losses(b)
    assert len(losses) == 2 * n and math.isnan(losses[4])
    assert all(math.isfinite(v) for i, v in enumerate(losses) if i != 4) and losses[-1] < losses[0]
