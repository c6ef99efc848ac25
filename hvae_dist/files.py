"""Atomic file writes for every file the package writes (checkpoints, config.json, score files, reports, figures).

    write_bytes_atomic(path, data)   temp file beside `path` (".NAME.PID.tmp"), write, fsync, rename over
                                     `path`, fsync of the folder; the temp file is removed on any failure
    hdf5_image(build)                an HDF5 file built in memory (h5py on a BytesIO), as bytes

So a crash or a full disk leaves the old file or none, never a torn or 0-byte one. HDF5 files are built in
memory and written as bytes because libhdf5 reports a full disk late and badly: inside its caches, as
ignored errors at close, and (h5py 3.16 / HDF5 2.0) with a segfault; a plain write() fails cleanly with
ENOSPC at the first byte that does not fit. Every OSError leaves here carrying the target's path
(`OSError.filename`), which `hvae_dist.cli` turns into one line with the free space on that file system.
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path


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


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring); returns `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise with_path(e, path) from e
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def hdf5_image(build: Callable) -> bytes:
    """Bytes of an HDF5 file that `build(f)` fills (f: an h5py.File open for writing, in memory)."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        build(f)
    return buf.getvalue()
