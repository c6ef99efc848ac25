"""The training recipe of issue 13: the lr schedule (linear warm-up, cosine to lr_min) is a pure function of the
step that every backend applies, a resumed run with it is bitwise the uninterrupted one, adamax / adamw are
the optimizers used, and k accumulated micro-batches give the update of one k-times-larger batch in one
process, under 2-process DDP (gloo, torchrun) and under DeepSpeed (CPU)."""
from __future__ import annotations

import math
import subprocess

import pytest
import torch

from helpers import faults
from helpers import train as th
from hvae_dist.distributed import World
from hvae_dist.errors import ConfigError
from hvae_dist.objectives import lr_at
from hvae_dist.train import engine
from hvae_dist.train.engine import Trainer

CPU = torch.device("cpu")
STEPS = 6
# free_nats 0: the free-nats clamp acts on each micro-batch's (and each rank's) mean KL, so with a budget
# k micro-batches are not one k-times-larger batch; without one they are, up to float rounding.
EXACT = {"train__free_nats": 0.0, "train__checkpoint_every": 1000}


one_thread = th.one_thread   # autouse: one intra-op thread in every test of this file


def _trainer(run_dir, **settings) -> Trainer:
    return Trainer(th.small_config(**{"train__checkpoint_every": 1000, **settings}), run_dir, World(), CPU)


def _assert_same_training(got: dict, ref: Trainer, init: dict, what: str) -> None:
    """`got` (a model state_dict) equals `ref`'s trained weights up to the float rounding of a batch mean taken
    in pieces. As in test_train_ddp: Adam turns rounding into O(lr) steps where a gradient is *only* rounding
    (the direction v of a weight-normed 1x1 conv of one input channel, dL/dv = 0 exactly); those raw tensors
    are left out here, and the trained functions are compared on a fixed batch below."""
    want = ref.model.state_dict()
    names = [n for n, _ in ref.model.named_parameters()]
    state = ref.backend.optimizer.state_dict()["state"]
    moment = "exp_inf" if ref.cfg.train.optimizer == "adamax" else "exp_avg_sq"
    noise_only = {n for i, n in enumerate(names) if float(state[i][moment].abs().max().sqrt()) < 1e-6}
    assert len(noise_only) <= 2, f"unexpectedly many parameters without a gradient: {sorted(noise_only)}"
    compared = {k for k in want if k not in noise_only}
    th.assert_close({k: got[k] for k in compared}, {k: want[k] for k in compared}, rtol=1e-4, atol=1e-5, what=what)
    # The comparison can fail: the weights moved far more than the tolerance.
    assert max(float((want[k] - init[k]).abs().max()) for k in compared) > 1e-3, "the weights did not move"
    model = _trainer(ref.run_dir.parent / "check", **EXACT).model
    model.load_state_dict(got)
    x, noise = ref.next_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, noise=noise).elbo, ref.model.eval()(x, noise=noise).elbo,
                                   rtol=1e-5, atol=1e-3)


# ----- the lr schedule -----
def test_lr_schedule_warms_up_linearly_then_follows_the_cosine_to_lr_min():
    lr, w, n = 1e-3, 4, 24
    assert [lr_at(t, lr, warmup_steps=w) for t in range(6)] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr, lr, lr])
    assert all(lr_at(t, lr) == lr for t in (0, 7, 10**6))   # constant without a warm-up: exactly train.lr
    cos = [lr_at(t, lr, warmup_steps=w, schedule="cosine", max_steps=n, lr_min=1e-5) for t in range(n + 3)]
    assert cos[:w] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])
    assert cos[w] == lr and cos[n] == cos[n + 2] == pytest.approx(1e-5)     # from lr at the warm-up's end ...
    assert cos[(w + n) // 2] == pytest.approx((lr + 1e-5) / 2)               # ... through the midpoint ...
    assert all(a > b for a, b in zip(cos[w:n], cos[w + 1:n + 1]))           # ... decreasing to lr_min at max_steps
    assert lr_at(n - 1, lr, schedule="cosine", max_steps=n) == pytest.approx(lr * (1 + math.cos(math.pi * 23 / 24)) / 2)
    assert lr_at(n, lr, schedule="cosine", max_steps=n) == 0.0               # lr_min defaults to 0


def test_every_update_uses_the_scheduled_lr(tmp_path):
    trainer = _trainer(tmp_path, train__lr_warmup_steps=2, train__lr_schedule="cosine", train__lr_min=1e-5,
                       train__max_steps=STEPS)
    lrs = [trainer.train_step()["lr"] for _ in range(STEPS)]
    assert lrs == [trainer.lr_at(t) for t in range(STEPS)]
    assert lrs[0] == trainer.cfg.train.lr / 2 and lrs[1] == trainer.cfg.train.lr and lrs[-1] < lrs[2]
    assert trainer.backend.optimizer.param_groups[0]["lr"] == lrs[-1]


def test_resume_with_schedule_adamw_and_accumulation_is_bitwise_equal_to_uninterrupted_run(tmp_path):
    settings = {"train__lr_warmup_steps": 2, "train__lr_schedule": "cosine", "train__lr_min": 1e-5,
                "train__max_steps": STEPS, "train__optimizer": "adamw", "train__weight_decay": 0.1,
                "train__accumulation_steps": 2}
    straight = _trainer(tmp_path / "straight", **settings)
    straight.fit()
    first = _trainer(tmp_path / "resumed", **settings)
    first.fit(STEPS // 2)                                  # stops mid-schedule and saves (cfg max_steps unchanged)
    resumed = _trainer(tmp_path / "resumed", **settings)
    assert resumed.maybe_resume() and resumed.step == STEPS // 2
    resumed.fit()
    th.assert_bitwise_equal(th.latest(tmp_path / "resumed"), th.latest(tmp_path / "straight"),
                            "resumed vs uninterrupted checkpoint")
    # A resume may change the peak lr: the next update follows the new train.lr, not the checkpoint's.
    changed = _trainer(tmp_path / "resumed", **{**settings, "train__lr": 1e-3, "train__max_steps": STEPS + 1})
    changed.maybe_resume()
    assert changed.train_step()["lr"] == pytest.approx(lr_at(STEPS, 1e-3, warmup_steps=2, schedule="cosine",
                                                             max_steps=STEPS + 1, lr_min=1e-5))


# ----- optimizers -----
def test_adamax_and_adamw_are_the_optimizers_used_and_train_differently_from_adam(tmp_path):
    runs = {}
    for name, extra in (("adam", {}), ("adamax", {}), ("adamw", {"train__weight_decay": 0.5})):
        trainer = _trainer(tmp_path / name, train__optimizer=name, train__lr=1e-2, **extra)
        for _ in range(3):
            trainer.train_step()
        runs[name] = trainer
    adam, adamax, adamw = (runs[n].backend.optimizer for n in ("adam", "adamax", "adamw"))
    assert type(adam) is torch.optim.Adam and type(adamax) is torch.optim.Adamax and type(adamw) is torch.optim.AdamW
    assert "exp_inf" in next(iter(adamax.state.values())) and "exp_avg_sq" in next(iter(adamw.state.values()))
    assert adamw.param_groups[0]["weight_decay"] == 0.5 and adam.param_groups[0]["weight_decay"] == 0
    assert not runs["adamax"].backend.fused and runs["adamw"].backend.fused
    weights = {n: torch.cat([p.detach().flatten() for p in t.model.parameters()]) for n, t in runs.items()}
    for other in ("adamax", "adamw"):
        assert float((weights[other] - weights["adam"]).abs().max()) > 1e-3, f"{other} trained like adam"
    # adamw's decay shrinks the weights relative to adam's (same gradients at step 0, lr 1e-2, decay 0.5).
    assert weights["adamw"].norm() < weights["adam"].norm()


def test_a_resume_with_another_optimizer_is_refused_naming_the_key(tmp_path):
    _trainer(tmp_path, train__optimizer="adamax").fit(1)
    with pytest.raises(ConfigError, match=r"train.optimizer='adam', but the checkpoint .* holds 'adamax'"):
        _trainer(tmp_path).maybe_resume()


def test_a_nan_loss_in_any_micro_batch_skips_the_whole_update(tmp_path, monkeypatch):
    calls = []
    loss_fn = engine.elbo_loss

    def nan_in_second_micro_batch_of_step_2(out, **kw):
        loss = loss_fn(out, **kw)
        calls.append(1)
        if len(calls) == 2 * 2 + 2:     # step 2 (0-based), micro-batch 1 of 2
            loss.loss = loss.loss * float("nan")
        return loss

    partial, whole = _trainer(tmp_path / "partial", train__accumulation_steps=2), \
        _trainer(tmp_path / "whole", train__accumulation_steps=2)
    monkeypatch.setattr(engine, "elbo_loss", nan_in_second_micro_batch_of_step_2)
    stats = [partial.train_step() for _ in range(4)]
    monkeypatch.setattr(engine, "elbo_loss", loss_fn)
    faults.nan_at_steps(monkeypatch, {2})          # every micro-batch of step 2
    for _ in range(4):
        whole.train_step()
    assert [s["skipped"] for s in stats] == [0, 0, 1, 0] and math.isnan(stats[2]["grad_norm"])
    th.assert_bitwise_equal(partial.model.state_dict(), whole.model.state_dict(), "weights")
    th.assert_bitwise_equal(partial.backend.optimizer.state_dict(), whole.backend.optimizer.state_dict(), "optimizer")


# ----- gradient accumulation -----
@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_give_the_update_of_one_k_times_larger_batch(tmp_path, k):
    one = _trainer(tmp_path / "one", **EXACT)
    init = {n: v.clone() for n, v in one.model.state_dict().items()}
    acc = _trainer(tmp_path / "acc", train__accumulation_steps=k, **EXACT)
    for _ in range(STEPS):
        want, got = one.train_step(), acc.train_step()
        for key in ("loss", "elbo", "log_px", "bpd", "kl/layer1", "kl/layer3", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), key   # stats of the whole update
    assert acc.counters.images_seen == one.counters.images_seen == STEPS * 8
    _assert_same_training(acc.model.state_dict(), one, init, f"{k} micro-batches vs one batch")


# tests/helpers/train.py's per-rank dump script, with every DDP.no_sync() call logged to DUMP_DIR/no_sync-RANK.txt.
NO_SYNC_DRIVER = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from torch.nn.parallel import DistributedDataParallel as DDP
no_sync = DDP.no_sync
def counted(self):
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    with open(Path(sys.argv[1]) / f"no_sync-{{os.environ['RANK']}}.txt", "a") as f:
        f.write("1\\n")
    return no_sync(self)
DDP.no_sync = counted
from helpers import train
sys.exit(train._rank_main(sys.argv[1:]))
"""


def test_ddp_ranks_accumulating_micro_batches_match_one_process_with_the_whole_batch(tmp_path):
    dumps, driver = tmp_path / "dumps", tmp_path / "driver.py"
    driver.write_text(NO_SYNC_DRIVER.format(tests=str(th.REPO / "tests")))
    args = th.train_args(tmp_path / "ddp", STEPS, "ddp", train__accumulation_steps=2, **EXACT)
    th.run(th.command([str(dumps), *args], 2, script=str(driver)))
    ranks = th.rank_dumps(dumps, 2)
    th.assert_bitwise_equal(ranks[0]["model"], ranks[1]["model"], "rank 0 vs rank 1 model")
    for r in range(2):   # micro-batch 0 of every update accumulated locally; micro-batch 1 all-reduced
        assert (dumps / f"no_sync-{r}.txt").read_text().split() == ["1"] * STEPS
    # Each rank drew its 4 rows of the global batch of 8 as two micro-batches of 2, in order.
    for r, dump in enumerate(ranks):
        assert [b["step"] for b in dump["batches"]] == [s for s in range(STEPS) for _ in range(2)]
        for i, b in enumerate(dump["batches"][:2]):
            assert b["keyed_rows"][0].tolist() == list(range(4 * r + 2 * i, 4 * r + 2 * i + 2))
    single = _trainer(tmp_path / "single", **EXACT)
    init = {n: v.clone() for n, v in single.model.state_dict().items()}
    single.fit(STEPS)
    _assert_same_training(ranks[0]["model"], single, init, "DDP x 2 micro-batches vs one process")


# ----- DeepSpeed -----
def _deepspeed(run_dir, steps: int, *settings: str, env_extra: dict | None = None, driver=None, nproc: int = 1) -> None:
    pytest.importorskip("deepspeed")
    args = th.train_args(run_dir, steps, "deepspeed", train__batch_size=16, **EXACT)
    for item in settings:
        args += ["--set", item]
    env = {k: v for k, v in th.env(**(env_extra or {})).items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = th.command(args, nproc, script=str(driver) if driver else None)
    proc = subprocess.run(cmd, cwd=th.REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"


DS_RECIPE = ("train.lr_warmup_steps=2", "train.lr_schedule=cosine", "train.lr_min=1e-5", "train.optimizer=adamw",
             "train.weight_decay=0.1")


@pytest.mark.parametrize("nproc, stage", [(1, 1), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_deepspeed_accumulation_matches_one_larger_batch_and_follows_the_lr_schedule(tmp_path, nproc, stage):
    one, acc = tmp_path / "one", tmp_path / "acc"
    zero = f"train.deepspeed_zero_stage={stage}"
    _deepspeed(one, STEPS, *DS_RECIPE, zero, nproc=nproc)
    _deepspeed(acc, STEPS, *DS_RECIPE, zero, "train.accumulation_steps=2", nproc=nproc)
    # What the DeepSpeed engine itself reports: its micro-batch, accumulation count and the optimizer it steps.
    assert f"micro_batch {16 // (2 * nproc)}, gradient_accumulation_steps 2, " in (acc / "train.log").read_text()
    assert "(AdamW)" in (acc / "train.log").read_text()
    cfg = th.small_config(train__batch_size=16, **EXACT)
    want = [lr_at(t, cfg.train.lr, warmup_steps=2, schedule="cosine", max_steps=STEPS, lr_min=1e-5) for t in range(STEPS)]
    for run in (one, acc):
        assert [v for _, v in th.tb_values(run, "train/lr")] == pytest.approx(want, rel=1e-6)
    model = Trainer(cfg, tmp_path / "init", World(), CPU).model
    init = _effective_weights(model, model.state_dict())
    a, b = (_effective_weights(model, th.latest(run)["model"]) for run in (one, acc))
    th.assert_close(b, a, rtol=1e-4, atol=2e-5, what=f"DeepSpeed ZeRO-{stage} x {nproc}: 2 micro-batches vs one batch")
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3, "the weights did not move"


def _effective_weights(model, state: dict) -> dict[str, torch.Tensor]:
    """Every weight as the layers use it (weight norm applied) and every other parameter of `state`. The raw
    direction v of a 1x1 conv of one input channel has an analytically zero gradient (w = g sign(v)): Adam
    turns its float noise into O(lr) steps of v that w does not see."""
    model.load_state_dict(state)
    out = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "parametrizations"):
                out[f"{name}.weight"] = mod.weight.detach().clone()
        out.update({n: p.detach().clone() for n, p in model.named_parameters() if ".parametrizations." not in n})
    return out


def test_deepspeed_zero_steps_adamax(tmp_path):
    """DeepSpeed lists Adamax as untested with ZeRO: the generated config allows it."""
    _deepspeed(tmp_path / "run", 2, "train.optimizer=adamax")
    assert "(Adamax)" in (tmp_path / "run" / "train.log").read_text()
    (shard,) = th.latest(tmp_path / "run")["optimizer"]
    assert shard["zero_stage"] == 1 and any(k.endswith(".exp_inf") for k, _ in th._flatten(shard["state"]))


# Runs the CLI with the loss of micro-batch 1 of step 2 made NaN (the engine's own NaN injection hits all of a step's).
NAN_DRIVER = """
import sys
import hvae_dist.train.engine as engine
loss_fn, calls = engine.elbo_loss, []
def nan_in_second_micro_batch_of_step_2(out, **kw):
    loss = loss_fn(out, **kw)
    calls.append(1)
    if len(calls) == 6:
        loss.loss = loss.loss * float("nan")
    return loss
engine.elbo_loss = nan_in_second_micro_batch_of_step_2
from hvae_dist.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_deepspeed_skips_an_update_whose_later_micro_batch_is_nan_exactly_like_a_nan_first_one(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(NAN_DRIVER)
    partial, whole = tmp_path / "partial", tmp_path / "whole"
    _deepspeed(partial, 4, "train.accumulation_steps=2", driver=driver)
    _deepspeed(whole, 4, "train.accumulation_steps=2", env_extra={faults.NAN_ENV: "2"})
    got, want = th.latest(partial), th.latest(whole)
    assert got["counters"]["skipped_total"] == want["counters"]["skipped_total"] == 1
    th.assert_bitwise_equal(got["model"], want["model"], "weights")
    (g,), (w,) = got["optimizer"], want["optimizer"]
    assert g["state"].pop("loss_scaler").cur_scale == w["state"].pop("loss_scaler").cur_scale   # an object: no ==
    th.assert_bitwise_equal(g, w, "ZeRO optimizer state (fp32 partitions, Adam moments and step)")


def test_batch_not_divisible_by_ranks_times_micro_batches_is_refused_naming_the_keys(tmp_path):
    cfg = th.small_config(train__accumulation_steps=4, train__backend="ddp")   # 8 rows, 4 micro-batches: fine alone
    with pytest.raises(ConfigError, match=r"train.batch_size=8 .* ranks \(4\) x train.accumulation_steps=4"):
        Trainer(cfg, tmp_path, World(0, 4, 0, "torchrun"), CPU)
