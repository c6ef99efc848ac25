"""The training engine in one process: NaN steps are skipped and counted, divergence stops the run
with a clear error, TensorBoard gets every scalar and image the monitor promises, bf16 tracks fp32,
fp16 runs with a GradScaler, and the CLI refuses config changes on resume."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import faults
from helpers import train as th
from hvae_dist.distributed import World
from hvae_dist.errors import ConfigError, TrainingDivergedError
from hvae_dist.train.engine import Trainer
from hvae_dist.train.monitor import Monitor

CPU = torch.device("cpu")


one_thread = th.one_thread   # autouse: one intra-op thread in every test of this file


def _trainer(run_dir, monitor: bool = False, **settings) -> Trainer:
    cfg = th.small_config(**{"train__checkpoint_every": 1000, **settings})
    mon = Monitor(run_dir, True, cfg.train.log_every, CPU, progress=False) if monitor else None
    return Trainer(cfg, run_dir, World(), CPU, mon)


def _finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ----- skipped updates -----
def test_nan_loss_on_one_step_is_skipped_counted_and_training_continues(tmp_path, monkeypatch, caplog):
    faults.nan_at_steps(monkeypatch, {3})
    trainer = _trainer(tmp_path, monitor=True)
    with caplog.at_level("WARNING", logger="hvae_dist"):
        result = trainer.fit(8)
    assert result == {"step": 8, "reason": "finished"}
    assert "step 3: skipped update (grad norm nan)" in caplog.text
    ck = th.latest(tmp_path)
    assert ck["step"] == 8 and ck["counters"]["skipped_total"] == 1 and ck["counters"]["skipped_in_row"] == 0
    assert _finite(ck["model"]) and _finite(trainer.model.state_dict())
    assert [v for _, v in th.tb_values(tmp_path, "train/skipped_total")] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert math.isnan(dict(th.tb_values(tmp_path, "train/loss"))[4])
    assert all(math.isfinite(v) for s, v in th.tb_values(tmp_path, "train/loss") if s != 4)


def test_skipped_update_leaves_weights_and_optimizer_untouched(tmp_path, monkeypatch):
    faults.nan_at_steps(monkeypatch, {2})
    trainer = _trainer(tmp_path)
    for _ in range(2):
        trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_before = trainer.backend.optimizer.state_dict()
    stats = trainer.train_step()
    assert stats["skipped"] == 1.0 and not math.isfinite(stats["grad_norm"])
    th.assert_bitwise_equal(trainer.model.state_dict(), before, "weights across the skipped step")
    th.assert_bitwise_equal(trainer.backend.optimizer.state_dict(), opt_before, "Adam across the skip")


def test_too_many_skipped_updates_in_a_row_raise_training_diverged_error(tmp_path, monkeypatch):
    faults.nan_at_steps(monkeypatch, "all")
    trainer = _trainer(tmp_path, train__max_skipped=3)
    with pytest.raises(TrainingDivergedError,
                       match=r"3 updates in a row were skipped at step 2 .*train\.max_skipped"):
        trainer.fit(10)


class _HostReads(TorchDispatchMode):
    """Counts the reads of tensor values back to the host (`.item()`, `float(t)`, `bool(t)`, `if t:`): each is
    one aten._local_scalar_dense (a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_the_training_step_reads_nothing_back_from_the_device(tmp_path, ema_decay):
    """The skip decision, the EMA and the stats stay on the device (the engine read 7 values per step before)."""
    trainer = _trainer(tmp_path, train__ema_decay=ema_decay)
    trainer.train_step()
    with _HostReads() as reads:
        for _ in range(3):
            trainer.train_step()
    assert reads.count == 0
    assert [step for step, _ in trainer.read_updates()] == [1, 2, 3, 4]      # all read back at once, in order


def test_stats_are_read_on_logging_steps_and_before_checkpoints_and_skips_still_stop_the_run(tmp_path, monkeypatch):
    faults.nan_at_steps(monkeypatch, {1, 3, 4, 5})
    trainer = _trainer(tmp_path, monitor=True, train__log_every=4, train__checkpoint_every=6, train__max_skipped=3)
    reads, read = [], Trainer.read_updates
    monkeypatch.setattr(Trainer, "read_updates", lambda self: reads.append(self.step) or read(self))
    with pytest.raises(TrainingDivergedError, match=r"3 updates in a row were skipped at step 5 "):
        trainer.fit(20)
    assert reads == [4, 6]          # the logging step 4, then the checkpoint at step 6 (the third skip in a row)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))   # refused before the checkpoint was written
    # TensorBoard has every skipped update, read late: steps 2 (update 1) and 4 (update 3).
    assert [s for s, _ in th.tb_values(tmp_path, "train/skipped")] == [2, 4]


def test_validate_without_a_monitor_returns_the_evaluation(tmp_path):
    trainer = _trainer(tmp_path, train__eval_every=2, train__eval_examples=8, train__eval_iw_samples=2)
    trainer.train_step()
    result = trainer.validate()
    assert result.scalars.keys() >= {"val/FashionMNIST_validation/elbo", "val/auroc/MNIST_validation/llr1",
                                     "val/active_units/layer1"}
    assert all(math.isfinite(v) for v in result.scalars.values())
    assert all(0 <= result.scalars[f"val/auroc/MNIST_validation/{s}"] <= 1 for s in ("nll", "llr1", "llr2"))
    assert set(result.images) == {"samples/prior", "samples/reconstructions", "visualize/reconstructions"}
    assert not (tmp_path / "tb").exists()      # nothing written: there is no monitor


def test_skipped_updates_that_are_not_in_a_row_do_not_stop_the_run(tmp_path, monkeypatch):
    faults.nan_at_steps(monkeypatch, {1, 3, 5})
    trainer = _trainer(tmp_path, train__max_skipped=2)
    assert trainer.fit(7)["reason"] == "finished"
    assert trainer.counters.skipped_total == 3


# ----- TensorBoard -----
def test_tensorboard_has_train_val_perf_scalars_and_sample_images(tmp_path):
    trainer = _trainer(tmp_path, monitor=True, train__eval_every=2, train__eval_examples=16,
                       train__eval_iw_samples=2, train__kl_warmup_steps=10, train__free_nats=1.0)
    trainer.fit(4)
    acc = th.tb_accumulator(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    want = {f"train/{k}" for k in ("loss", "elbo", "log_px", "bpd", "grad_norm", "skipped", "skipped_total",
                                   "lr", "beta", "free_nats", "images_per_s_total", "images_per_s_per_rank")}
    want |= {f"train/kl/layer{i}" for i in (1, 2, 3)} | {"perf/peak_memory_mb"}
    for tag in ("FashionMNIST_validation", "MNIST_validation"):
        want |= {f"val/{tag}/elbo", f"val/{tag}/bpd", f"val/{tag}/llr1", f"val/{tag}/llr2"}
    want |= {f"val/active_units/layer{i}" for i in (1, 2, 3)}
    want |= {"val/auroc/MNIST_validation/nll", "val/auroc/MNIST_validation/llr1",
             "val/auroc/MNIST_validation/llr2"}     # the AUROC of LLR>k for every k, as the paper's training script
    assert want <= scalars, f"missing: {sorted(want - scalars)}"
    for tag in want:
        values = acc.Scalars(tag)
        expected_steps = [1, 2, 3, 4] if tag.startswith(("train/", "perf/")) else [2, 4]
        assert [e.step for e in values] == expected_steps, tag
        assert all(math.isfinite(e.value) for e in values), tag
    assert all(0 <= e.value <= 1 for e in acc.Scalars("val/auroc/MNIST_validation/llr1"))
    assert [e.value for e in acc.Scalars("train/beta")] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([trainer.cfg.train.lr] * 4)
    assert acc.Scalars("train/images_per_s_total")[-1].value > 0
    images = acc.Tags()["images"]
    assert set(images) >= {"samples/prior", "samples/reconstructions", "visualize/reconstructions"}
    # The hvae visualize grid: 4 examples of each of the 2 validation sets, input + 3 L>k decodes + 3 temperatures.
    grid = acc.Images("visualize/reconstructions")
    assert [e.step for e in grid] == [2, 4]
    assert (grid[0].height, grid[0].width) == (2 + 8 * 30, 2 + 7 * 30)
    for tag in ("samples/prior", "samples/reconstructions"):
        shots = acc.Images(tag)
        assert [e.step for e in shots] == [2, 4] and shots[-1].width > 28 and shots[-1].height > 28


# ----- precision -----
def _losses(run_dir, precision: str, steps: int) -> tuple[list[float], Trainer]:
    trainer = _trainer(run_dir, train__precision=precision)
    return [trainer.train_step()["loss"] for _ in range(steps)], trainer


def test_bf16_autocast_loss_tracks_fp32_on_the_same_data(tmp_path):
    fp32, _ = _losses(tmp_path / "fp32", "fp32", 30)
    bf16, trainer = _losses(tmp_path / "bf16", "bf16", 30)
    assert all(math.isfinite(v) for v in bf16) and trainer.counters.skipped_total == 0
    assert sum(fp32[-5:]) < 0.8 * sum(fp32[:5]), "fp32 did not learn: the comparison would prove nothing"
    for step, (a, b) in enumerate(zip(fp32, bf16)):
        assert abs(a - b) <= 0.03 * abs(a), f"step {step}: bf16 loss {b:.2f} vs fp32 {a:.2f}"
    assert _finite(trainer.model.state_dict())


def test_fp16_with_grad_scaler_trains_and_checkpoints_the_scaler(tmp_path):
    losses, trainer = _losses(tmp_path, "fp16", 20)
    scaler = trainer.backend.scaler
    assert scaler is not None
    # GradScaler starts at 2^16 and halves on each overflow: the first updates may be skipped, then it trains.
    assert trainer.counters.skipped_total < 20 and trainer.counters.skipped_in_row == 0
    assert scaler.get_scale() < 2.0 ** 16
    assert all(math.isfinite(v) for v in losses[-5:]) and sum(losses[-5:]) < sum(losses[:5])
    assert _finite(trainer.model.state_dict())
    trainer.save()
    assert th.latest(tmp_path)["scaler"]["scale"] == scaler.get_scale()


# ----- config on resume / new runs -----
def _train_args(run_dir, *extra: str, config: str | None = "tiny") -> argparse.Namespace:
    from hvae_dist.cli import build_parser
    argv = ["train", "--run-dir", str(run_dir), *extra]
    return build_parser("train").parse_args(argv[:1] + (["--config", config] if config else []) + argv[1:])


@pytest.fixture
def started_run(tmp_path):
    """A run dir as `hvae train --config tiny --set ...` leaves it: config.json with the input shape."""
    trainer = _trainer(tmp_path / "run")
    trainer.write_config()
    sets = [a for item in th.overrides(train__checkpoint_every=1000) for a in ("--set", item)]
    return tmp_path / "run", sets


def test_the_command_that_started_a_run_resumes_it(started_run):
    from hvae_dist.train.cli import resolve_config
    run_dir, sets = started_run
    stored = json.loads((run_dir / "config.json").read_text())
    for args in (_train_args(run_dir, *sets), _train_args(run_dir, config=None)):
        assert resolve_config(args).to_dict() == stored
    changed = resolve_config(_train_args(run_dir, *sets, "--set", "train.lr=0.01", "--max-steps", "7"))
    assert (changed.train.lr, changed.train.max_steps) == (0.01, 7)


def test_a_run_started_with_the_removed_data_num_workers_resumes_with_a_future_warning(started_run):
    from hvae_dist.checkpoint import SCHEMA_VERSION
    from hvae_dist.train.cli import resolve_config
    from hvae_dist.train.preflight import check_resume
    run_dir, sets = started_run
    stored = json.loads((run_dir / "config.json").read_text())
    old = {**stored, "data": {**stored["data"], "num_workers": 2}}      # config.json of an older version
    (run_dir / "config.json").write_text(json.dumps(old))
    with pytest.warns(FutureWarning, match="data.num_workers"):
        cfg = resolve_config(_train_args(run_dir, *sets, "--set", "data.num_workers=4"))
    assert cfg.to_dict() == stored and "num_workers" not in cfg.data.__dict__
    state = {"schema_version": SCHEMA_VERSION, "config": old}      # an old checkpoint's config fits the run
    check_resume(state, cfg, run_dir)


def test_resume_with_changed_model_config_raises_config_error(started_run, capsys):
    from hvae_dist.cli import main
    from hvae_dist.train.cli import resolve_config
    run_dir, sets = started_run
    with pytest.raises(ConfigError, match=r"cannot change model\.type when resuming .*only train\.\* "):
        resolve_config(_train_args(run_dir, *sets, "--set", "model.type=lvae"))
    with pytest.raises(ConfigError, match=r"cannot change model\.config_deterministic"):
        resolve_config(_train_args(run_dir))            # the tiny preset's 32 channels, not the run's 8
    with pytest.raises(ConfigError, match=r"cannot change data\.max_train_examples"):
        resolve_config(_train_args(run_dir, "--set", "data.max_train_examples=100", config=None))
    # The console script reports it as one line and exit status 2, before any training starts.
    assert main(["train", "--run-dir", str(run_dir), "--set", "model.activation=relu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hvae train: error: cannot change model.activation") and err.count("\n") == 1
    assert not (run_dir / "checkpoints").exists()


def test_checkpoint_of_another_model_config_refuses_to_load(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(1)
    other = Trainer(th.small_config(model__type="lvae"), tmp_path, World(), CPU)
    with pytest.raises(ConfigError, match=r'made with another model or data config \(model\.type: checkpoint "vae", '
                                          r'this run "lvae"\)'):
        other.maybe_resume()


def test_new_run_without_config_raises_a_clear_error(tmp_path, capsys):
    from hvae_dist.cli import main
    from hvae_dist.train.cli import resolve_config
    with pytest.raises(ConfigError, match=r"has no config\.json: give --config PRESET\|FILE to start a new"):
        resolve_config(_train_args(tmp_path / "new", config=None))
    assert main(["train", "--run-dir", str(tmp_path / "new")]) == 2
    assert "give --config PRESET|FILE" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
