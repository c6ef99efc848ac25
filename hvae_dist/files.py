"""Atomic file writes for every file the package writes (checkpoints, config.json, score files, reports, figures).

    write_bytes_atomic(path, data)   temp file beside `path` (".NAME.PID.tmp"), write, fsync, rename over
                                     `path`, fsync of the folder; the temp file is removed on any failure
    hdf5_image(build)                an HDF5 file built in memory (h5py on a BytesIO), as bytes
    staged_folder(path, keep)        a folder replaced as a whole (a report): written beside, then swapped

So a crash or a full disk leaves the old file or none, never a torn or 0-byte one. HDF5 files are built in
memory and written as bytes because libhdf5 reports a full disk late and badly: inside its caches, as
ignored errors at close, and (h5py 3.16 / HDF5 2.0) with a segfault; a plain write() fails cleanly with
ENOSPC at the first byte that does not fit. Every OSError leaves here carrying the target's path
(`OSError.filename`), which `hvae_dist.cli` turns into one line with the free space on that file system.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable, Iterator
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
