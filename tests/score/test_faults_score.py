"""Faults of `hvae score` / `hvae merge` that used to lose data or leave users stuck (issue 15), each
reproduced: concurrent jobs on one shard, flipped bytes and NaNs in shards, old-format shards, a full
disk, a missing data root, a checkpoint of another model, and the progress / help / usage output."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from helpers import faults
from helpers.score import REPO, fill_disk, make_run_dir, score_args, small_config, small_tmpfs
from hvae_dist.cli import HelpFormatter, build_parser
from hvae_dist.cli import main as hvae
from hvae_dist.errors import ScoreFileError
from hvae_dist.estimators.rows import resolve_sample_chunk
from hvae_dist.locking import FileLock
from hvae_dist.score.layout import FORMAT_VERSION
from hvae_dist.score.merge import merge_shards
from hvae_dist.score.plan import shard_lock_path
from hvae_dist.score.reader import read_scores
from hvae_dist.score.runner import ProgressLog

SHARD = "shard-00000-of-00001.h5"
ENV = faults.subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")   # HVAE_SCORE_TRACE: helpers.faults


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


def _err_line(err: str, command: str = "score") -> str:
    """The one error line of a command's stderr (asserting there is exactly one and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith(f"hvae {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _traced(path) -> list[int]:
    return [int(line.split()[1]) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------------ shard lock
def test_second_score_of_a_shard_in_use_exits_2_naming_the_holder_and_replaces_nothing(run_dir, tmp_path):
    out = tmp_path / "out"
    args = score_args(run_dir, out, "--batch-size", "2", "--sample-chunk", "50", datasets=("FashionMNIST:test",),
                      samples=400, max_examples=40)
    first_trace, second_trace = tmp_path / "first.txt", tmp_path / "second.txt"
    first = subprocess.Popen([sys.executable, "-m", "hvae_dist", *args], cwd=REPO,
                             env={**ENV, "HVAE_SCORE_TRACE": str(first_trace)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not _traced(first_trace) and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, f"the first job ended before the second started: {first.stderr.read()}"
        inode = (out / SHARD).stat().st_ino
        second = subprocess.run([sys.executable, "-m", "hvae_dist", *args], cwd=REPO, capture_output=True, text=True,
                                env={**ENV, "HVAE_SCORE_TRACE": str(second_trace)}, timeout=300)
        assert second.returncode == 2, second.stderr
        line = _err_line(second.stderr)
        assert f"process {first.pid}" in line and SHARD in line and ".shard-00000-of-00001.lock" in line, line
        assert not second_trace.exists()                       # the second job scored nothing ...
        assert (out / SHARD).stat().st_ino == inode            # ... and replaced no file
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)                      # the first one closes its file and stops
        first.wait(timeout=120)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    s = read_scores(out / SHARD).groups["FashionMNIST/test"]
    done = set(s["index"][s["complete"].astype(bool)].tolist())
    assert done and done <= set(_traced(first_trace))          # its rows survived


def test_the_shard_lock_is_taken_before_the_shard_file_is_created(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = FileLock(shard_lock_path(out / SHARD), "test").acquire()   # another job that has not created it yet
    try:
        assert hvae(score_args(run_dir, out)) == 2
    finally:
        holder.release()
    line = _err_line(capsys.readouterr().err)
    assert f"process {os.getpid()}" in line and "in use" in line, line
    assert sorted(os.listdir(out)) == [".shard-00000-of-00001.lock"]        # no shard file, no temp file
    assert hvae(score_args(run_dir, out)) == 0                              # a released lock is free again


def test_merge_refuses_a_shard_that_a_running_job_holds(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert hvae(score_args(run_dir, out, "--max-examples", "2")) == 0
    holder = FileLock(shard_lock_path(out / SHARD), "test").acquire()
    try:
        assert hvae(["merge", str(out)]) == 2
    finally:
        holder.release()
    assert f"process {os.getpid()}" in _err_line(capsys.readouterr().err, "merge")
    assert not (out / "scores.h5").exists()


# ------------------------------------------------------------------------------------------- checksums
@pytest.fixture(scope="module")
def shards(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    for i in range(2):
        assert hvae(score_args(run_dir, out, "--shard", str(i), "--num-shards", "2", "--iw-samples", "3")) == 0
    return out


@pytest.fixture
def out(shards, tmp_path):
    import shutil

    dst = tmp_path / "out"
    shutil.copytree(shards, dst)
    return dst


def test_every_dataset_of_shards_and_merged_file_has_a_fletcher32_checksum(out):
    merged = merge_shards(out)
    for path in (out / "shard-00001-of-00002.h5", merged):
        with h5py.File(path, "r") as f:
            assert f.attrs["format_version"] == FORMAT_VERSION == 2
            names = [f"{g}/{k}" for g in ("FashionMNIST/test", "MNIST/test") for k in f[g]]
            assert len(names) >= 14 and all(f[n].fletcher32 and f[n].chunks for n in names), names


def test_merge_refuses_a_flipped_byte_in_a_shards_elbo_naming_file_and_dataset(out, capsys):
    path = out / "shard-00001-of-00002.h5"
    with h5py.File(path, "r") as f:
        d = f["MNIST/test/elbo"]
        info = d.id.get_chunk_info(0)
        before = d.id.read_direct_chunk((0,))[1]                             # raw bytes, filters not applied
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + 5] ^= 0x04                                        # one bit of the second value
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as f:                                          # the flip is in elbo's data ...
        after = f["MNIST/test/elbo"].id.read_direct_chunk((0,))[1]
        assert after != before and len(after) == len(before)
        assert np.isfinite(np.frombuffer(after[:-4], np.float64)).all()      # ... and looks like a fine value
    with pytest.raises(ScoreFileError) as e:
        merge_shards(out)
    msg = str(e.value)
    assert str(path) in msg and "MNIST/test/elbo" in msg and "Fletcher32" in msg and "delete" in msg, msg
    assert not (out / "scores.h5").exists()
    with pytest.raises(ScoreFileError, match="MNIST/test/elbo"):             # the reader refuses it too
        read_scores(path)
    assert hvae(["merge", str(out)]) == 2
    assert "MNIST/test/elbo" in _err_line(capsys.readouterr().err, "merge")


def test_merge_refuses_non_finite_values_in_complete_rows_naming_file_field_and_row(out):
    path = out / "shard-00001-of-00002.h5"
    with h5py.File(path, "r+") as f:
        assert f["MNIST/test/complete"][2]
        f["MNIST/test/lk"][2, 1] = np.nan                                    # k = 2, the second column
        index = int(f["MNIST/test/index"][2])
    with pytest.raises(ScoreFileError) as e:
        merge_shards(out)
    msg = str(e.value)
    for part in (str(path), "MNIST/test/lk", "nan", "row 2", "column 1 (k=2)", f"dataset index {index}"):
        assert part in msg, (part, msg)
    with h5py.File(path, "r+") as f:
        f["MNIST/test/lk"][2, 1] = -1.0
        f["FashionMNIST/test/bpd"][0] = np.inf
    with pytest.raises(ScoreFileError, match=r"FashionMNIST/test/bpd is inf in row 0"):
        merge_shards(out)


def _rewrite_as_format_1(path):
    """The same shard as the previous release wrote it: contiguous datasets, no checksums, format_version 1."""
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        data = {g: {k: d[()] for k, d in f[g].items()} for g in json.loads(attrs["datasets"])}
    path.unlink()
    with h5py.File(path, "w") as f:
        f.attrs.update({**attrs, "format_version": 1})
        for g, fields in data.items():
            for k, v in fields.items():
                f.create_dataset(f"{g}/{k}", data=v)


def test_an_old_format_shard_is_refused_on_resume_and_by_merge(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert hvae(score_args(run_dir, out, "--max-examples", "3")) == 0
    _rewrite_as_format_1(out / SHARD)
    assert hvae(score_args(run_dir, out, "--max-examples", "3")) == 2
    line = _err_line(capsys.readouterr().err)
    assert SHARD in line and "format 1" in line and f"format {FORMAT_VERSION}" in line and "delete it" in line, line
    with pytest.raises(ScoreFileError, match="format 1"):
        merge_shards(out)
    assert read_scores(out / SHARD).attrs["format_version"] == 1             # still readable (no checksums)


# ------------------------------------------------------------------------------------------ full disk
def test_score_on_a_full_file_system_is_one_line_error_and_leaves_no_stray_files(run_dir, tmp_path, capsys):
    with small_tmpfs(tmp_path / "small") as disk:
        fill_disk(disk, leave=8192)                                          # room for the lock, not the shard
        out = disk / "out"
        assert hvae(score_args(run_dir, out)) == 2
        line = _err_line(capsys.readouterr().err)
        assert str(out / SHARD) in line and "No space left on device" in line and "free of" in line, line
        assert sorted(os.listdir(out)) == [".shard-00000-of-00001.lock"]    # no .tmp, no 0-byte shard
        fill_disk(disk)                                                      # no room even for the lock
        assert hvae(score_args(run_dir, disk / "out2")) == 2
        line = _err_line(capsys.readouterr().err)
        assert ".shard-00000-of-00001.lock: No space left on device (0 B free of 300.0 KiB" in line, line
        assert os.listdir(disk / "out2") == []
        for filler in disk.glob("filler*"):
            filler.unlink()
        assert hvae(score_args(run_dir, out, "--max-examples", "2")) == 0   # with room, the same command works
        assert read_scores(out / SHARD).groups["MNIST/test"]["complete"].all()


def test_merge_on_a_full_file_system_is_one_line_error_and_leaves_no_stray_files(run_dir, tmp_path, capsys):
    with small_tmpfs(tmp_path / "small") as disk:
        out = disk / "out"
        assert hvae(score_args(run_dir, out, "--max-examples", "3")) == 0
        before = sorted(os.listdir(out))
        fill_disk(disk)
        assert hvae(["merge", str(out)]) == 2
        line = _err_line(capsys.readouterr().err, "merge")
        assert str(out / "scores.h5") in line and "No space left on device" in line and "0 B free of" in line, line
        assert sorted(os.listdir(out)) == before                             # no scores.h5, no temp file


# ------------------------------------------------------------------------------------- data and model
def test_score_points_to_data_with_data_root_and_a_missing_or_empty_root_is_an_error(run_dir, tmp_path, capsys):
    assert hvae(score_args(run_dir, tmp_path / "o", datasets=("KMNIST:test",))) == 2
    err = capsys.readouterr().err
    assert "--data-root DIR" in err and "--set data.root" not in err, err        # advice that fits the command
    for root, problem in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "is an empty folder")):
        if problem.startswith("is an"):
            root.mkdir()
        assert hvae(score_args(run_dir, tmp_path / "o", "--data-root", str(root), datasets=("FashionMNIST:test",))) == 2
        line = _err_line(capsys.readouterr().err)
        assert f"--data-root '{root}' {problem}" in line, line
        assert str(root / "FashionMNIST/raw/t10k-images-idx3-ubyte") in line, line   # what was expected there
    assert not (tmp_path / "o").exists()
    raw = tmp_path / "tv" / "KMNIST" / "raw"                                 # torchvision's files: they are used
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    for name, arr in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels),
                      ("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
        (raw / name).write_bytes(header + arr.tobytes())
    assert hvae(score_args(run_dir, tmp_path / "kmnist", "--data-root", str(tmp_path / "tv"),
                           datasets=("KMNIST:test",))) == 0
    assert read_scores(tmp_path / "kmnist" / SHARD).groups["KMNIST/test"]["index"].tolist() == [0, 1, 2, 3, 4]


def test_a_checkpoint_of_another_model_than_the_runs_config_is_refused(run_dir, tmp_path, capsys):
    other = make_run_dir(tmp_path / "other", small_config(channels=4))
    ckpt = other / "checkpoints" / "latest.pt"
    assert hvae(score_args(run_dir, tmp_path / "o", "--checkpoint", str(ckpt))) == 2
    line = _err_line(capsys.readouterr().err)
    assert str(ckpt) in line and str(run_dir / "config.json") in line and "model.config_deterministic" in line, line
    assert not (tmp_path / "o").exists()


def test_iw_samples_lk_zero_is_reported_as_an_iw_samples_lk_error(run_dir, tmp_path, capsys):
    assert hvae(score_args(run_dir, tmp_path / "o", "--iw-samples-lk", "0")) == 2
    line = _err_line(capsys.readouterr().err)
    assert "--iw-samples-lk must be >= 1" in line and "got 0" in line, line


@pytest.mark.parametrize("argv, usage", [
    (score_args("r", "o", "--bogus"), "usage: hvae score"),
    (["merge", "out", "--bogus"], "usage: hvae merge"),
    (["submit", "score", "--run-dir", "r", "--datasets", "A:test", "--out", "o", "--num-shards", "2", "--bogus"],
     "usage: hvae submit score"),
    (["analyze", "f.h5", "--in-dist", "A:test", "--bogus"], "usage: hvae analyze"),
])
def test_an_unknown_option_prints_the_subcommands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        hvae(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and "unrecognized arguments: --bogus" in err, err


# --------------------------------------------------------------------------------- progress, defaults
def test_progress_lines_without_a_terminal_give_rows_rate_and_eta(run_dir, tmp_path, capsys):
    assert hvae(score_args(run_dir, tmp_path, "--batch-size", "2", "--log-every", "0",
                           datasets=("FashionMNIST:test",))) == 0
    err = capsys.readouterr().err
    assert "batch 2 x sample chunk 12 = 24 rows per pass" in err, err        # auto: 64 // 2 = 32, capped at S
    lines = [line.split(" ", 2)[2] for line in err.splitlines() if "rows/s" in line]   # after the UTC date and time
    assert len(lines) == 4, err                                               # 2, 4, 6 of 7 rows; then done
    assert lines[0].startswith("hvae score: shard 0 of 1: 2/7 rows (28.6%)") and "ETA" in lines[0], lines
    assert "done, 7/7 rows" in lines[-1]


def test_progress_log_writes_a_line_every_interval_and_at_the_end():
    now = [0.0]
    lines = []

    class Stream:
        def write(self, text):
            lines.extend(t.split(" ", 2)[2] for t in text.splitlines() if t)   # after the UTC date and time

        def flush(self):
            pass

    log = ProgressLog(1000, "shard 0 of 1", every=30.0, stream=Stream(), clock=lambda: now[0])
    for _ in range(9):                                                        # 100 rows every 10 s
        now[0] += 10.0
        log.update(100)
    log.close()
    assert len(lines) == 4, lines                                             # at 30, 60 and 90 s, and the end
    assert lines[0] == "hvae score: shard 0 of 1: 300/1000 rows (30.0%), 10.00 rows/s, elapsed 30s, ETA 1m10s"
    assert lines[-1] == "hvae score: shard 0 of 1: done, 900/1000 rows in 1m30s, 10.00 rows/s"


def test_sample_chunk_auto_follows_the_rows_per_pass_policy_and_an_int_overrides_it():
    from hvae_dist.estimators.rows import ROWS_PER_PASS, default_batch_size

    assert resolve_sample_chunk("auto", 16, "cpu") == ROWS_PER_PASS["cpu"] // 16         # 512 rows per pass
    assert resolve_sample_chunk("auto", 128, "cuda") == ROWS_PER_PASS["cuda"] // 128     # 4096 rows per pass
    assert resolve_sample_chunk("auto", 5000, "cpu") == 1                     # at least one sample
    assert resolve_sample_chunk("auto", 1, "cpu", num_samples=10) == 10      # never more than S
    assert resolve_sample_chunk(7, 16, "cuda") == 7
    assert default_batch_size("cpu", 1000) == 16 and default_batch_size("cuda", 1000) == 128
    assert default_batch_size("cpu", 10) * 10 >= ROWS_PER_PASS["cpu"]       # few samples: more examples per pass
    args = build_parser("score").parse_args(score_args("r", "o"))
    assert args.sample_chunk == "auto" and args.batch_size is None
    assert build_parser("score").parse_args(score_args("r", "o", "--sample-chunk", "3")).sample_chunk == 3
    with pytest.raises(SystemExit):
        build_parser("score").parse_args(score_args("r", "o", "--sample-chunk", "0"))


def _children(parser):
    return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


@pytest.mark.parametrize("command", ["score", "merge", "analyze", "submit", "demo"])
def test_help_has_an_example_and_shows_every_default(command):
    sub = _children(build_parser(command))[command]
    for p in [sub, *_children(sub).values()]:                                # submit: also train / score / pipeline
        assert "example" in p.format_help(), p.prog
        for action in p._actions:
            takes_value = action.option_strings and action.nargs != 0 and action.help != argparse.SUPPRESS
            if takes_value and action.default is not None and action.default != []:
                assert "default" in HelpFormatter(p.prog)._get_help_string(action), (p.prog, action.option_strings)
        none_defaults = [a.option_strings[0] for a in p._actions if a.option_strings and a.nargs != 0
                         and a.default is None and "default" not in (a.help or "").lower() and not a.required]
        assert not none_defaults, (p.prog, none_defaults)                    # the help says what None means
