"""hvae_dist.files: the one atomic writer (mode 0o666 & ~umask, temp removed on failure) and the one
free-space message, used by checkpoints, config.json and every other file the package writes."""
from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from hvae_dist import checkpoint as ck
from hvae_dist import files
from hvae_dist.errors import CheckpointError


@pytest.fixture
def umask():
    """Set a umask for the test (os.umask(mask)); the old one is restored after it."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_trained_runs_checkpoints_and_config_json_are_0644_under_umask_022(tmp_path, umask):
    threads = torch.get_num_threads()
    try:
        _train_one_step_and_check(tmp_path, umask)
    finally:
        torch.set_num_threads(threads)


def _train_one_step_and_check(tmp_path, umask):
    # The real code paths: `hvae train` writes config.json (Trainer.write_config) and step-N.pt / latest.pt
    # (checkpoint.save_checkpoint). mkstemp made them 0600: unreadable to colleagues on a shared folder.
    from helpers import train as th
    from hvae_dist.cli import main

    umask(0o022)
    run = tmp_path / "run"
    torch.set_num_threads(1)
    assert main(th.train_args(run, 1, train__checkpoint_every=1, train__eval_every=0)) == 0
    written = [run / "config.json", *sorted((run / "checkpoints").iterdir())]
    assert {p.name for p in written} >= {"config.json", "latest.pt", "step-1.pt"}
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: "0o644" for p in written}


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_writer_honours_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    ck.save_checkpoint({"step": 3, "model": {"w": torch.zeros(2)}}, tmp_path, keep_last=2)
    paths = [tmp_path / "checkpoints" / "step-3.pt", tmp_path / "checkpoints" / "latest.pt",
             files.write_text_atomic(tmp_path / "a.json", "{}\n"),
             files.write_bytes_atomic(tmp_path / "b.png", b"\x89PNG")]
    assert [oct(_mode(p)) for p in paths] == [oct(expected)] * len(paths)


def test_a_leftover_temp_file_does_not_pass_its_mode_on(tmp_path, umask):
    target = tmp_path / "config.json"
    tmp = files.temp_path(target)
    tmp.write_text("torn")
    os.chmod(tmp, 0o600)
    files.write_text_atomic(target, "{}")
    assert _mode(target) == 0o644 and target.read_text() == "{}" and not tmp.exists()


def test_write_atomic_streams_and_leaves_the_old_file_and_no_temp_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    files.write_atomic(target, lambda f: (f.write(b"old"), f.write(b"!")))
    assert target.read_bytes() == b"old!"

    def full_disk(f):
        f.write(b"new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        files.write_atomic(target, full_disk)
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old!" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_an_oserror_hidden_behind_another_exception_is_raised_naming_the_file(tmp_path):
    # torch's zip writer turns ENOSPC into RuntimeError("unexpected pos ..."): the recorded OSError comes out.
    def refuse(data):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    def torch_like(f):
        f.f.write = refuse                 # the file under the writer's wrapper: the disk is full from here on
        try:
            f.write(b"x")
        except OSError:
            raise RuntimeError("unexpected pos 64 vs 0") from None

    with pytest.raises(OSError) as e:
        files.write_atomic(tmp_path / "y.pt", torch_like)
    assert e.value.errno == errno.EDQUOT and e.value.filename == str(tmp_path / "y.pt")
    assert not list(tmp_path.iterdir())


def test_the_one_message_names_the_file_the_free_space_and_what_to_do(tmp_path):
    line = files.describe_os_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a" / "b.h5")))
    assert line.startswith(f"{tmp_path / 'a' / 'b.h5'}: No space left on device (") and " free of " in line
    assert line.endswith("free some space or write somewhere else, then re-run")
    assert "permissions" in files.describe_os_error(OSError(errno.EACCES, "Permission denied", str(tmp_path)))


def test_a_checkpoint_write_failure_is_a_checkpoint_error_with_the_one_message(tmp_path, monkeypatch):
    def save_then_fail(obj, f, *a, **k):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", save_then_fail)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-1\.pt: No space left on device \(.* free of "):
        ck.save_checkpoint({"step": 1}, tmp_path)
    assert not list((tmp_path / "checkpoints").iterdir())


def test_the_cli_uses_the_files_module_message():
    from hvae_dist import cli

    assert cli.describe_os_error is files.describe_os_error
