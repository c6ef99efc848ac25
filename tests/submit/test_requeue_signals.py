"""The score shard's requeue on SIGUSR2 is not interrupted by the SIGTERM of the same preemption, in either order
(the race behind a flaky SLURM preemption test: shard FAILED instead of REQUEUED)."""
from __future__ import annotations

import os
import signal

import pytest

from hvae_dist.signals import StoppedBySignal, raise_on_stop, restore
from hvae_dist.submit.jobs import _shield_requeue_from_term


@pytest.fixture
def fake_submitit():
    """submitit's USR2 handler as far as it matters here: Python work (the checkpoint pickle, `scontrol
    requeue`), then SystemExit(-1)."""
    calls: list[str] = []

    def checkpoint_and_try_requeue(signum, frame):
        calls.append("start")
        os.kill(os.getpid(), signal.SIGTERM)     # the preemption's TERM arrives while the handler runs
        for _ in range(1000):                    # bytecodes at which a pending handler would run
            pass
        calls.append("requeued")
        raise SystemExit(-1)

    old_usr2, old_term = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGUSR2, checkpoint_and_try_requeue)
    yield calls
    signal.signal(signal.SIGUSR2, old_usr2)
    signal.signal(signal.SIGTERM, old_term)


def _preempt(first: signal.Signals, second: signal.Signals) -> None:
    os.kill(os.getpid(), first)
    os.kill(os.getpid(), second)
    for _ in range(1000):
        pass


@pytest.mark.parametrize("order", [(signal.SIGUSR2, signal.SIGTERM), (signal.SIGTERM, signal.SIGUSR2)],
                         ids=["usr2-first", "term-first"])
def test_usr2_requeue_completes_whatever_the_order_of_term(fake_submitit, order):
    previous = raise_on_stop()
    previous_usr2 = _shield_requeue_from_term()
    try:
        with pytest.raises((SystemExit, StoppedBySignal)) as info:
            _preempt(*order)
        if info.type is StoppedBySignal:          # TERM first: the shard unwinds, then waits for the USR2
            with pytest.raises(SystemExit):
                _preempt(signal.SIGUSR2, signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous_usr2)
        restore(previous)
    assert fake_submitit == ["start", "requeued"]


def test_without_the_shield_the_term_interrupts_the_requeue(fake_submitit):
    """The failure the shield prevents (so the test above tests something)."""
    previous = raise_on_stop()
    try:
        with pytest.raises(StoppedBySignal):
            _preempt(signal.SIGUSR2, signal.SIGTERM)
    finally:
        restore(previous)
    assert fake_submitit == ["start"]
