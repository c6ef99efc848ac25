"""The file lock of run dirs and shards: exclusive across processes, names its holder, recovered when the holder died."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hvae_dist.errors import LockedError
from hvae_dist.locking import FileLock

HOLD = """
import sys, time
from hvae_dist.locking import FileLock
FileLock(sys.argv[1], "the test dir").acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_host_and_pid(tmp_path):
    lock = tmp_path / ".lock"
    proc = _holder(lock)
    try:
        with pytest.raises(LockedError, match=rf"the test dir is in use by process {proc.pid} on host "
                                              rf"{socket.gethostname()}"):
            FileLock(lock, "the test dir").acquire()
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    lock = tmp_path / ".lock"
    proc = _holder(lock)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock.exists()                                     # the stale file stays ...
    with FileLock(lock, "the test dir") as mine:             # ... but its OS lock died with the process
        assert mine.held and mine.holder() == f"{socket.gethostname()} {os.getpid()}"
    assert not mine.held


def test_release_lets_the_next_holder_in(tmp_path):
    first = FileLock(tmp_path / ".lock", "x").acquire()
    with pytest.raises(LockedError):
        FileLock(tmp_path / ".lock", "x").acquire()          # a second open file in the same process is refused too
    first.release()
    t0 = time.monotonic()
    FileLock(tmp_path / ".lock", "x").acquire().release()
    assert time.monotonic() - t0 < 5
