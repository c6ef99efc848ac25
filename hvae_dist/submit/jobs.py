"""The callables that `hvae submit` hands to submitit; they run inside the SLURM jobs.

Each one is pickled by reference (module + class name), so a job imports this module from the same
installed package. They are thin: they call the typed functions behind `hvae train` (train.runner.run_training),
`hvae score` (score.runner.run_job), `hvae merge` (score.merge_shards) and `hvae analyze`
(analysis.run_analysis + report) in-process, never the command line.

Preemption and time-outs. submitit starts every task under `srun` and installs its handlers first:
SIGUSR2 (sent `--signal-delay` seconds before the time limit, and by `scancel --signal=USR2`, which is how
submitit-style preemption arrives) -> call `checkpoint()`, `scontrol requeue` the job, exit; SIGTERM -> log
and ignore. A requeued job re-runs the pickled callable that `checkpoint()` returned.

- TrainJob: the state lives in the run dir, so `checkpoint()` returns the callable unchanged and the
  re-run resumes from `checkpoints/latest.pt`. What matters is that this checkpoint is written *before*
  the requeue: USR2 is turned into the engine's own stop request (finish the step, agree across ranks,
  save collectively), and only after `fit()` returns does rank 0 hand the signal back to submitit,
  which requeues. SIGTERM (an `scontrol requeue` or a preemption by SLURM, which requeues the job itself,
  or an `scancel`) goes to the engine's handler: save, stop, exit without a result, and let SLURM decide.
- ScoreShard: the state lives in the shard's HDF5 file (rows are flagged complete only after their
  values are flushed), so an interrupted shard resumes where it stopped. On USR2 submitit requeues it;
  on SIGTERM it exits at once (closing the file) and SLURM requeues or cancels it.
- MergeAnalyze: idempotent; a requeue runs it again.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from submitit.helpers import Checkpointable

from hvae_dist.score.runner import ScoreJob

log = logging.getLogger("hvae_dist.slurm")


class _StopSignals:
    """Turns the stop signals that arrive before and during training into the Trainer's stop request.

    USR2 is remembered so that, once the checkpoint is written, rank 0 can hand it back to submitit's
    handler (checkpoint() + `scontrol requeue` + exit).
    """

    def __init__(self) -> None:
        self.submitit_usr2 = signal.getsignal(signal.SIGUSR2)   # submitit's checkpoint_and_try_requeue
        self.received: list[int] = []
        self.trainer = None

    def install(self) -> None:
        # TERM / USR1 until the engine installs its own handlers (a signal during start-up is not lost).
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame=None) -> None:
        self.received.append(signum)
        log.warning("got %s: checkpointing at the end of this step", signal.Signals(signum).name)
        if self.trainer is not None:
            self.trainer.request_stop()

    def attach(self, trainer) -> None:
        """main()'s on_trainer hook: the engine now owns TERM / USR1; keep USR2 ours."""
        self.trainer = trainer
        signal.signal(signal.SIGUSR2, self._on_signal)
        if self.received:
            trainer.request_stop()

    @property
    def usr2(self) -> bool:
        return signal.SIGUSR2 in self.received


def _skip_teardown_at_exit() -> None:
    """After a distributed run, end the process right after submitit has written the result.

    Interpreter teardown after gloo sometimes aborts ("terminate called without an active exception",
    see distributed.shutdown); here that would turn a finished job into FAILED and break `afterok`.
    """
    failed: list[bool] = []
    previous = sys.excepthook

    def hook(*exc) -> None:
        failed.append(True)
        previous(*exc)

    def fast_exit() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if failed else 0)

    sys.excepthook = hook
    atexit.register(fast_exit)


@dataclass
class TrainJob(Checkpointable):
    """One task (rank) of a training job: `hvae train` in-process with `config` (a resolved Config dict)."""

    config: dict
    run_dir: str
    signal_grace_s: float = 30.0   # after a SIGTERM stop: how long to wait for submitit's USR2 (SLURM's KillWait)

    def __call__(self) -> dict:
        from hvae_dist.config import config_from_dict
        from hvae_dist.distributed import detect_world
        from hvae_dist.train.runner import run_training

        stops = _StopSignals()
        stops.install()
        world = detect_world()
        result = run_training(config_from_dict(self.config), self.run_dir, progress=False,
                      on_trainer=stops.attach, exit_process=False)
        if result["reason"] != "signal":
            if world.distributed:
                _skip_teardown_at_exit()
            return {**result, "run_dir": self.run_dir, "rank": world.rank}
        # The checkpoint is on disk. A SIGTERM comes from SLURM (requeue, preemption, scancel: the kill follows
        # within KillWait) or precedes submitit's USR2 (preemption as submitit sends it): wait for either.
        deadline = time.monotonic() + self.signal_grace_s
        while not stops.usr2 and time.monotonic() < deadline:
            time.sleep(0.2)
        if stops.usr2 and world.rank == 0 and callable(stops.submitit_usr2):
            log.warning("checkpoint saved at step %d: requeueing through submitit", result["step"])
            stops.submitit_usr2(signal.SIGUSR2, None)   # checkpoint() + scontrol requeue + exit
        if stops.usr2 and world.rank != 0:
            time.sleep(self.signal_grace_s)             # rank 0 requeues the job, which ends this task
        names = ", ".join(sorted({signal.Signals(s).name for s in stops.received})) or "a signal"
        # No result file: the job is not finished (SLURM requeues it, or it was cancelled).
        raise SystemExit(f"hvae: training stopped by {names} at step {result['step']}; checkpoint saved in "
                         f"{Path(self.run_dir) / 'checkpoints'}; a re-run of this job resumes from it")


def _shield_requeue_from_term():
    """Wrap submitit's USR2 handler (checkpoint + `scontrol requeue` + exit) so that a SIGTERM cannot interrupt it.

    A preemption sends TERM and USR2 with no order between them. When USR2 is handled first, a TERM arriving
    during submitit's handler (or pending behind it: CPython runs pending handlers in signal-number order and
    re-runs the rest after one raises, here submitit's SystemExit) would raise StoppedBySignal inside it,
    before or after the requeue, and the shard would end FAILED without being requeued. Once the requeue is
    under way TERM is ignored; SLURM's kill after KillWait still ends the task. Returns the previous handler."""
    submitit_usr2 = signal.getsignal(signal.SIGUSR2)
    if not callable(submitit_usr2):
        return submitit_usr2

    def requeue(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        submitit_usr2(signum, frame)

    signal.signal(signal.SIGUSR2, requeue)
    return submitit_usr2


@dataclass
class ScoreShard(Checkpointable):
    """One array task: `score.runner.run_job` of `job` as shard `shard` of `num_shards`; a re-run resumes the
    shard's HDF5 file."""

    job: ScoreJob
    shard: int
    num_shards: int

    signal_grace_s: float = 30.0   # after a SIGTERM stop: how long to wait for submitit's USR2 (SLURM's KillWait)

    def __call__(self) -> str:
        from hvae_dist.score.runner import run_job
        from hvae_dist.signals import StoppedBySignal, raise_on_stop, restore

        previous = raise_on_stop()   # SIGTERM unwinds the shard (hvae_dist.signals), as under `hvae score`
        previous_usr2 = _shield_requeue_from_term()
        try:
            run_job(replace(self.job, shard=self.shard, num_shards=self.num_shards, progress=False))
        except StoppedBySignal:
            # The shard file is closed. As for TrainJob: a SIGTERM precedes submitit's USR2 in a preemption, and
            # a USR2 that arrived while this process was already exiting would kill it instead of requeueing.
            # Wait, with submitit's USR2 handler in place (it requeues and exits); SLURM's own requeue or
            # scancel ends the task within KillWait.
            time.sleep(self.signal_grace_s)
            raise
        finally:
            signal.signal(signal.SIGUSR2, previous_usr2)
            restore(previous)
        return self.job.out


@dataclass
class MergeAnalyze(Checkpointable):
    """After every shard succeeded: `merge_shards(out)`, then the analysis of OUT/scores.h5 (metrics, tables
    and figures in analysis_out, the table printed to the job's log) when in_dist is set."""

    out: str
    in_dist: str | None = None
    analysis_out: str | None = None

    def __call__(self) -> dict:
        from hvae_dist.analysis import format_text, report, run_analysis
        from hvae_dist.score import merge_shards
        from hvae_dist.signals import raise_on_stop, restore

        previous = raise_on_stop()   # a stop unwinds: the atomic writes leave the old files or the new ones
        try:
            scores = merge_shards(self.out)
            print(scores, flush=True)
            if self.in_dist:
                result = run_analysis(scores, self.in_dist)
                report(result, self.analysis_out)
                print(format_text(result), flush=True)
        finally:
            restore(previous)
        return {"scores": str(scores), "analysis": self.analysis_out if self.in_dist else None}
