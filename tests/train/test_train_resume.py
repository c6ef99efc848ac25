"""Exact resume: a run killed with SIGKILL (a node failure) or stopped with SIGTERM (SLURM preemption)
and restarted with the same command ends bitwise equal to a run that was never interrupted, with the
same TensorBoard step sequence; single process and 2-process DDP (gloo, CPU), fp32."""
from __future__ import annotations

import signal
import time

import pytest

from helpers import train as th

STEPS = 24
CHECKPOINT_EVERY = 6
COMPARED_TAGS = ("train/loss", "train/elbo", "train/kl/layer1", "train/grad_norm", "train/skipped_total")


def _kill_after_checkpoint_and_resume(tmp_path, nproc: int, backend: str, **settings) -> None:
    args = lambda d: th.train_args(d, STEPS, backend, train__checkpoint_every=CHECKPOINT_EVERY, **settings)  # noqa: E731
    ref, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    th.run(th.command(args(ref), nproc))

    proc = th.start(th.command(args(killed), nproc), tmp_path / "killed.log")
    th.wait_for_file(killed / "checkpoints" / "latest.pt", proc)   # appears right after the first step-N.pt
    time.sleep(0.1)  # let it log a few steps past the checkpoint: the resumed run must drop those events
    assert proc.poll() is None, "the run ended before it could be killed"
    th.kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    at_kill = th.latest(killed)["step"]
    if at_kill >= STEPS:
        pytest.fail(f"the kill landed after the last checkpoint (step {at_kill}); raise STEPS")
    assert at_kill >= CHECKPOINT_EVERY

    th.run(th.command(args(killed), nproc))   # the same command resumes

    want, got = th.latest(ref), th.latest(killed)
    assert got["step"] == STEPS
    # Every tensor of the checkpoint (model, optimizer moments, RNG states) and every counter.
    th.assert_bitwise_equal(got, want, "resumed vs uninterrupted checkpoint")
    want_tb, got_tb = th.tb_steps(ref), th.tb_steps(killed)
    assert got_tb == want_tb
    assert want_tb["train/loss"] == list(range(1, STEPS + 1))
    for tag in COMPARED_TAGS:
        assert th.tb_values(killed, tag) == th.tb_values(ref, tag), tag


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    _kill_after_checkpoint_and_resume(tmp_path, nproc=1, backend="single")


@pytest.mark.slow
def test_biva_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    _kill_after_checkpoint_and_resume(tmp_path, nproc=1, backend="single", model__type="biva")


@pytest.mark.slow
def test_ddp_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    _kill_after_checkpoint_and_resume(tmp_path, nproc=2, backend="ddp")


def test_sigterm_saves_a_checkpoint_exits_0_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    cmd = th.command(th.train_args(run_dir, 400, train__checkpoint_every=1000))
    proc = th.start(cmd, tmp_path / "term.log")
    th.wait_for_text(run_dir / "train.log", " step 2 loss ", proc)   # the loop is running
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = (tmp_path / "term.log").read_text()
    assert "(signal)" in log, log[-3000:]
    stopped = th.latest(run_dir)
    assert 0 < stopped["step"] < 400, "no step was checkpointed when the signal came"

    resumed = th.run(th.command(th.train_args(run_dir, stopped["step"] + 3, train__checkpoint_every=1000)))
    assert f"resuming run {run_dir}" in resumed.stderr and f"step={stopped['step']}" in resumed.stderr
    assert th.latest(run_dir)["step"] == stopped["step"] + 3
    assert th.tb_steps(run_dir)["train/loss"] == list(range(1, stopped["step"] + 4))
