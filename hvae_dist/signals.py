"""The one signal policy of every long command (train, score, merge, analyze, visualize, demo, poster).

SIGTERM (SLURM preemption, scancel, kill) and SIGINT (Ctrl-C) stop a command cleanly, in one of two ways:

- unwind (the default, `raise_on_stop`, installed by `hvae_dist.cli.main` around every command): the
  signal raises StoppedBySignal where the command is, so `finally` blocks and the atomic writes of
  `hvae_dist.files` remove their temp files; every output is the old one or the new one, never torn or
  mixed. A command adds what the stop leaves behind with `stop_note` (score: "the shard file is closed;
  re-running the same command resumes it").
- finish the step (training, `train.engine.Trainer.install_signal_handlers`): the current step ends and a
  checkpoint is saved; a second Ctrl-C unwinds at once.

The console script then prints one line, `hvae CMD: stopped by SIGNAL; NOTE`, and exits 128 + the signal
number (130 for Ctrl-C, 143 for SIGTERM). The exception is `hvae train` stopped by SIGTERM, which exits 0
once its checkpoint is saved, as a preempted SLURM job that saved its state has done its part. `deferred`
holds the signals back over the few system calls that must not be separated (a folder swap).
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(SystemExit):
    """A command unwound on a stop signal; its exit status (`code`) is 128 + the signal number."""

    def __init__(self, signum: int, note: str = ""):
        super().__init__(128 + int(signum))
        self.signum, self.note = int(signum), note
        self.reported = False   # the console script printed its line

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        what = f"{self.name} (Ctrl-C)" if self.signum == signal.SIGINT else self.name
        return f"stopped by {what}" + (f"; {self.note}" if self.note else "")


def _raise(signum: int, _frame=None) -> None:
    raise StoppedBySignal(signum)


def raise_on_stop() -> dict[int, object]:
    """Make SIGTERM and SIGINT raise StoppedBySignal (main thread only); returns the previous handlers."""
    return {sig: signal.signal(sig, _raise) for sig in STOP_SIGNALS}


def restore(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def stop_note(note: str) -> Iterator[None]:
    """Inside: a StoppedBySignal carries `note` (what the stop leaves and how to go on) unless it has one."""
    try:
        yield
    except StoppedBySignal as e:
        e.note = e.note or note
        raise


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back inside (they are delivered, and act, right after it)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
