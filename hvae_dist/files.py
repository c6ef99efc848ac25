"""Atomic file writes for every file the package writes (checkpoints, config.json, score files, reports, figures).

    write_atomic(path, write)        `write(f)` into a temp file beside `path` (".NAME.PID.tmp"), fsync,
                                     rename over `path`, fsync of the folder; the temp file is removed on
                                     any failure (torch.save streams a checkpoint through it)
    write_bytes_atomic(path, data)   the same for bytes in memory (write_text_atomic: a str, UTF-8)
    hdf5_image(build)                an HDF5 file built in memory (h5py on a BytesIO), as bytes
    write_hdf5_atomic(path, build, reserve)
                                     an HDF5 file too large for memory (hvae merge's scores.h5), streamed
                                     into the temp file, then fsync and rename as above
    remove_stale_temps(path)         delete the temp files of `path` left by writers that died (SIGKILL)
    staged_folder(path, keep)        a folder replaced as a whole (a report): written beside, then swapped
    describe_os_error(e)             the one line for an OSError naming a file: the file, the reason, the
                                     free space of its file system (free_space) and what to do

Every file written here gets mode 0o666 & ~umask (0644 under umask 022, 0664 under 002), like a file
written with open(): checkpoints and config.json stay readable by colleagues on a shared project folder.

So a crash or a full disk leaves the old file or none, never a torn or 0-byte one. Small HDF5 files are
built in memory and written as bytes because libhdf5 reports a full disk late and badly: inside its
caches, as ignored errors at close, and (h5py 3.16 / HDF5 2.0) with a segfault; a plain write() fails
cleanly with ENOSPC at the first byte that does not fit. `write_hdf5_atomic` keeps that guarantee without
the memory: it allocates `reserve` bytes for the temp file first (posix_fallocate, which fails cleanly on a
full disk before libhdf5 writes a byte), and libhdf5 writes through a file object that never hands it an
I/O error (the first one is recorded, the write is abandoned at the next check, and the error is raised
after libhdf5 has closed the file). Every OSError leaves here carrying the target's path
(`OSError.filename`), which `hvae_dist.cli` turns into one line (`describe_os_error`).

Every temp file is flock'ed by its writer for the writer's life, so a temp file whose lock can be taken
belongs to a process that died (the OS releases a dead process's locks): `remove_stale_temps` deletes
exactly those and reports the live writers.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from hvae_dist.signals import STOP_SIGNALS


def with_path(e: OSError, path: str | Path) -> OSError:
    """`e` as an OSError naming `path` (the file the user asked for, not a temp name), same errno."""
    return OSError(e.errno, e.strerror or str(e), str(path))


def require_folder(path: str | Path, what: str) -> Path:
    """`path` as a Path, when it is a folder or can become one: ConfigError when it, or the nearest of its
    parents that exists, is a file (`what` names the option, e.g. "--run-dir"). Checked before anything is
    written, so that the message is about the option, not a later "File exists" or "no checkpoint"."""
    from hvae_dist.errors import ConfigError

    path = Path(path)
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        problem = "is a file, not a folder" if p == path else f"cannot be a folder: its parent {p} is a file"
        raise ConfigError(f"{what} {path} {problem}; give a folder (it is created when missing)")
    return path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. some network mounts)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temp name of `path` while it is written: hidden, in the same folder (same file system), per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status, thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_temp(tmp: Path) -> int:
    """Create (truncate) `tmp` with mode 0o666 & ~umask and hold its flock: the mark of a live writer (see
    remove_stale_temps). The mode is set explicitly as well: a leftover temp file keeps its old mode."""
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError:
        os.close(fd)
        raise
    return fd


def _discard(tmp: Path, fd: int | None) -> None:
    """Remove a failed write's temp file (still holding its lock), then close it; never raises."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def remove_stale_temps(path: str | Path) -> list[int]:
    """Delete the temp files of `path` (".NAME.PID.tmp" beside it) whose writer is dead; returns the PIDs
    (from the names) of the temp files a live process still writes, which are left alone."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp")
    live = []
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:
        return live
    for name in names:
        m = pattern.fullmatch(name)
        if not m:
            continue
        stale = path.parent / name
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue                       # gone meanwhile (renamed by its writer, removed by another run)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise with_path(e, stale) from e
                live.append(int(m.group(1)))
                continue
            if os.fstat(fd).st_nlink:      # still the file of that name (not renamed over the target since)
                stale.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return live


class _WriteErrors:
    """A binary file that remembers the OSError of a failed write: torch's zip writer reports a full disk as
    a RuntimeError ("unexpected pos ..."), which names neither the cause nor the file."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` (f: a binary file) into a temp file beside `path`, fsync, rename over `path`, fsync the
    folder; returns `path`. On any failure the temp file is removed and `path` is untouched. An OSError,
    also one that `write` turned into another exception (torch: RuntimeError "unexpected pos"), is raised
    as an OSError naming `path` (`describe_os_error` makes it one line)."""
    path = Path(path)
    tmp = temp_path(path)
    fd, sink = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_temp(tmp)
        with open(fd, "wb", closefd=False) as f:
            sink = _WriteErrors(f)
            write(sink)
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp, fd)
        cause = e if isinstance(e, OSError) else (sink.error if sink is not None else None)
        if cause is not None:
            raise with_path(cause, path) from e
        raise
    os.close(fd)
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see write_atomic); returns `path`."""
    return write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see write_atomic); returns `path`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(path: str | Path) -> str:
    """'X free of Y' on the file system that holds `path` (its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def describe_os_error(e: OSError) -> str:
    """One line for an OSError that names a file: the file, what went wrong, the free space there, and
    what to do for a full disk or a refused write."""
    reason = e.strerror or str(e)
    where = f"{e.filename}: {reason} ({free_space(e.filename)} on its file system)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}; free some space or write somewhere else, then re-run"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}; check the folder's permissions and file system, then re-run"
    return where


def hdf5_image(build: Callable) -> bytes:
    """Bytes of an HDF5 file that `build(f)` fills (f: an h5py.File open for writing, in memory)."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        build(f)
    return buf.getvalue()


class _ReservedFile(io.RawIOBase):
    """The temp file as libhdf5 sees it (h5py's file-object driver): only the bytes written so far, although
    the file on disk is already `reserve` bytes long. An I/O error is never passed to libhdf5 (see the module
    docstring): the first one is kept in `error`, a failed read returns zeros, a failed write is dropped."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd, self.pos, self.size = fd, 0, 0
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        done = 0
        try:
            while done < n:
                got = os.preadv(self.fd, [view[done:n]], self.pos + done)
                if got == 0:
                    break
                done += got
        except OSError as e:
            self.error = self.error or e
        view[done:] = bytes(len(view) - done)
        self.pos += len(view)
        return len(view)

    def write(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as e:
                self.error = e
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        return self.size

    def flush(self) -> None:
        pass


class _DeferredSignals:
    """While active (main thread only): SIGTERM / SIGINT are recorded instead of handled, so that no Python
    exception is raised inside libhdf5's I/O callbacks; `restore()` reinstates the handlers and re-raises
    the first recorded signal to its own handler (`signals.raise_on_stop`: StoppedBySignal, the one line).

    Not `signals.deferred()`: a signal mask holds the signal back in this thread only, and a process-directed
    signal delivered to another thread (numpy's OpenBLAS threads have it unblocked) still runs the Python
    handler in this one, at any bytecode, also inside libhdf5's callbacks into `_ReservedFile`."""

    def __init__(self):
        self.caught: int | None = None
        self.old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                handler = signal.getsignal(sig)
                if handler is not None and handler is not signal.SIG_IGN:   # None: set outside Python, left alone
                    self.old[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, _frame=None) -> None:
        self.caught = self.caught or signum

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        self.old = {}
        if self.caught is not None:
            signal.raise_signal(self.caught)


def write_hdf5_atomic(path: str | Path, build: Callable, reserve: int,
                      before_replace: Callable[[], None] | None = None) -> Path:
    """Stream an HDF5 file to `path` atomically; returns `path`.

    `build(f, check)` fills `f` (an h5py.File open for writing on the temp file) and calls `check()` every
    so often (e.g. per block of rows): it raises the first recorded I/O error, or an OSError(EINTR) after
    a SIGTERM / SIGINT, so that a doomed write stops early. `reserve` (bytes, an upper bound of the file's
    size) is allocated before libhdf5 writes anything; the unused part is given back before the rename.
    `before_replace()` runs after the temp file is complete and fsynced, right before it replaces `path`.
    SIGTERM / SIGINT during the write are held back until the temp file is removed (or renamed), then
    re-raised to their handlers. A SIGKILL leaves the temp file, which `remove_stale_temps` removes later.
    """
    import h5py

    path = Path(path)
    tmp = temp_path(path)
    fd = None
    signals = _DeferredSignals()
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = _open_temp(tmp)
            _reserve(fd, reserve)
            sink = _ReservedFile(fd)

            def check() -> None:
                if sink.error is not None:
                    raise sink.error
                if signals.caught is not None:
                    raise OSError(errno.EINTR, f"interrupted by {signal.Signals(signals.caught).name}")

            f = h5py.File(sink, "w")
            try:
                build(f, check)
            finally:
                f.close()
            check()
            os.ftruncate(fd, sink.size)        # give back the unused reservation
            os.fsync(fd)
            if before_replace is not None:
                before_replace()
            os.replace(tmp, path)
        except BaseException as e:
            _discard(tmp, fd)
            if isinstance(e, OSError):
                raise with_path(e, path) from e
            raise
        os.close(fd)
        fsync_dir(path.parent)
        return path
    finally:
        signals.restore()


def _reserve(fd: int, size: int) -> None:
    """Allocate `size` bytes for `fd`; ENOSPC (with the size needed) when they do not fit."""
    try:
        os.posix_fallocate(fd, 0, max(1, size))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"{os.strerror(e.errno)} (needs about {size / 2**20:.1f} MiB)") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        free = os.fstatvfs(fd)                # a file system without fallocate: check the free space instead
        if free.f_bavail * free.f_frsize < size:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (needs about {size / 2**20:.1f} MiB)") from e


def _stale(entry: Path) -> bool:
    """A ".NAME.PID.tmp" / ".NAME.PID.old" folder of `staged_folder` whose process is gone (killed mid-swap)."""
    try:
        pid = int(entry.name.rsplit(".", 2)[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError):
        return False
    except ProcessLookupError:
        return True
    except OSError:      # alive, owned by another user
        return False
    return pid == os.getpid()


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` as a hard-linked copy of `src` (file or folder; a plain copy where links are refused)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(str(src), str(dst))


@contextlib.contextmanager
def staged_folder(path: str | Path, keep: Callable[[Path], bool]) -> Iterator[Path]:
    """Replace folder `path` as a whole: readers see the old folder or the new one, never a mix.

    Yields an empty folder beside `path` (".NAME.PID.tmp", same file system) to write the new contents
    into. When the block ends without error, the old folder's entries for which `keep(entry)` is true (files
    that are not the writer's own) are hard-linked into it, it takes `path`'s place (two renames, with
    SIGTERM / SIGINT held back between them) and the old folder is removed. On an error or a stop signal the
    temp folder is removed and `path` is untouched. Leftovers of a process killed mid-swap (SIGKILL) are
    removed by the next call.
    """
    from hvae_dist import signals

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for entry in path.parent.glob(f".{path.name}.*.*"):
        if entry.suffix in (".tmp", ".old") and entry.is_dir() and _stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{what}") for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        existed = path.is_dir()
        try:
            if existed:
                for entry in path.iterdir():
                    if keep(entry) and not (tmp / entry.name).exists():
                        _link_tree(entry, tmp / entry.name)
            with signals.deferred():
                if existed:
                    os.replace(path, old)
                os.replace(tmp, path)
        except OSError as e:
            raise with_path(e, path) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(path.parent)
    if existed:
        for entry in old.iterdir():   # written into the old folder by another process meanwhile: keep them
            if keep(entry) and not (path / entry.name).exists():
                os.replace(entry, path / entry.name)
        shutil.rmtree(old, ignore_errors=True)
