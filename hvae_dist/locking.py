"""Exclusive locks on run dirs and shard files: an OS file lock (flock) held for the life of the process.

The lock file holds "host pid" of the holder, so a refusal can name who holds it. A holder that dies
(SIGKILL, a node crash on a local file system) releases the OS lock with its process, so a stale lock
file is taken over automatically: only a live process can make the next one wait or fail. flock is
advisory and per open file: every process that writes the protected files must take the lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from hvae_dist.errors import LockedError


class FileLock:
    """`with FileLock(path, what):` or `acquire()` / `release()`. Non-blocking: a held lock raises LockedError."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def holder(self) -> str:
        """'host pid' of the process that wrote the lock file last, or '' when unknown."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self.holder().split()
            who = f"process {holder[1]} on host {holder[0]}" if len(holder) == 2 else "another process"
            raise LockedError(f"{self.what} is in use by {who} (lock {self.path}); wait for it to finish or stop "
                              "it. A lock of a process that died is released automatically") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            os.fsync(fd)
        except OSError:   # e.g. a full disk: do not keep holding a lock that names nobody
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
