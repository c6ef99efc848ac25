"""hvae merge streams (issue 22): the same file as the in-memory merge of the previous release, every check
still firing on multi-chunk shards read block by block, any dataset / attribute carried; and the merge faults
of issue 25: shards with 0 rows of a dataset (case 1), a scores.h5 of another job (case 2), interrupted
merges and their temp files (case 7)."""
from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from helpers.score import REPO, fill_disk, make_run_dir, score_args, small_tmpfs, write_synthetic_shards
from hvae_dist.cli import main as hvae
from hvae_dist.errors import ScoreFileError
from hvae_dist.files import hdf5_image
from hvae_dist.score import merge_rows
from hvae_dist.score.layout import SHARD_ATTRS, create_checked, write_attrs
from hvae_dist.score.merge import merge_shards
from hvae_dist.score.reader import read_scores

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
SMALL_BLOCKS = 16 * 1024          # bytes per block in the tests: 2 chunks of an index, many blocks per shard


def in_memory_merge(out) -> bytes:
    """The merge of the previous release (hvae_dist 0.x, before streaming): every shard read whole with
    read_scores, rows concatenated and sorted by index, the file built in memory with create_checked."""
    shards = [read_scores(p) for p in sorted(out.glob("shard-*.h5"))]
    ref = shards[0].attrs
    merged = {}
    for g in ref["datasets"]:
        keys = [k for k in shards[0].groups[g] if k != "complete"]
        order = np.argsort(np.concatenate([s.groups[g]["index"] for s in shards]), kind="stable")
        merged[g] = {k: np.concatenate([s.groups[g][k] for s in shards])[order] for k in keys}
    attrs = ({k: v for k, v in ref.items() if k not in SHARD_ATTRS and k != "created"}
             | {"created": ref.get("created", ""), "merged_shards": len(shards)})

    def build(f) -> None:
        write_attrs(f, attrs)
        for g, data in merged.items():
            grp = f.create_group(g)
            for k, v in data.items():
                create_checked(grp, k, v)

    return hdf5_image(build)


def _leftovers(out) -> list[str]:
    return sorted(p for p in os.listdir(out) if p.endswith(".tmp") or p.startswith("scores"))


def _err_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("hvae merge:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(merge_rows, "BLOCK_BYTES", SMALL_BLOCKS)


@pytest.fixture(scope="module")
def big_job(tmp_path_factory):
    """A synthetic job of 4 shards x 2 groups x 5,000 rows (5 chunks per dataset of a shard's group, shard
    ends inside chunks of the merged file), written by the real ShardWriter."""
    out = tmp_path_factory.mktemp("big") / "out"
    out.mkdir()
    write_synthetic_shards(out, 40_000, 4)
    return out


@pytest.fixture
def big(big_job, tmp_path):
    import shutil

    return shutil.copytree(big_job, tmp_path / "out")


# ------------------------------------------------------------------------------ same file as before
def test_streamed_merge_equals_the_in_memory_merge_bitwise_on_a_scored_job(run_dir, tmp_path):
    out = tmp_path / "out"
    for i in range(3):
        assert hvae(score_args(run_dir, out, "--shard", str(i), "--num-shards", "3", "--iw-samples", "3")) == 0
    assert merge_shards(out).read_bytes() == in_memory_merge(out)


@pytest.mark.parametrize("rows, shards", [(20_000, 7), (300, 5), (5, 8)])
def test_streamed_merge_equals_the_in_memory_merge_bitwise_on_multi_chunk_shards(tmp_path, small_blocks, rows, shards):
    write_synthetic_shards(tmp_path, rows, shards)
    merged = merge_shards(tmp_path)
    assert merged.read_bytes() == in_memory_merge(tmp_path)
    with h5py.File(merged) as f:
        d = f["OOD/test/lk"]
        assert d.fletcher32 and d.chunks == (min(rows // 2, 1024), 2) and d.dtype == np.float64
        assert f["OOD/test/index"][()].tolist() == list(range(rows // 2))


def test_merge_carries_every_dataset_and_attribute_the_shards_have(tmp_path, small_blocks):
    write_synthetic_shards(tmp_path, 6_000, 3)
    for p in sorted(tmp_path.glob("shard-*.h5")):
        with h5py.File(p, "r+") as f:
            f.attrs["checkpoint_step"] = 1234
            g = f["OOD/test"]
            index = g["index"][()]
            create_checked(g, "label", index * 10)
            create_checked(g, "path", np.array([f"img/{i}.png".encode() for i in index], dtype="S16"))  # fixed length:
            # HDF5 puts no checksum filter on variable-length strings
            g["label"].attrs["meaning"] = "class id"
            g.attrs["source"] = "synthetic"
    s = read_scores(merge_shards(tmp_path))
    assert s.attrs["checkpoint_step"] == 1234
    g = s.groups["OOD/test"]
    assert g["label"].tolist() == [10 * i for i in range(3_000)] and g["label"].dtype == np.int64
    assert [p.decode() for p in g["path"][[0, 2999]]] == ["img/0.png", "img/2999.png"]
    with h5py.File(tmp_path / "scores.h5") as f:
        assert f["OOD/test/label"].attrs["meaning"] == "class id" and f["OOD/test"].attrs["source"] == "synthetic"
        assert f["OOD/test/path"].fletcher32 and f["OOD/test/path"].dtype == np.dtype("S16")
        assert "complete" not in f["OOD/test"] and "label" not in f["InDist/test"]


# ----------------------------------------------------------------- checks on blocks of multi-chunk shards
def _refused(out, *parts) -> str:
    with pytest.raises(ScoreFileError) as e:
        merge_shards(out)
    msg = str(e.value)
    for p in parts:
        assert p in msg, (p, msg)
    assert _leftovers(out) == [], _leftovers(out)              # no scores.h5, no temp file
    return msg


LAST = "shard-00003-of-00004.h5"


def test_a_nan_in_the_last_chunk_of_the_last_shard_is_refused(big, small_blocks):
    with h5py.File(big / LAST, "r+") as f:
        f["OOD/test/elbo"][4_998] = np.nan
        f["OOD/test/llr"][4_999, 1] = np.inf
        index = int(f["OOD/test/index"][4_998])
    _refused(big, LAST, "OOD/test/elbo is nan in row 4998", f"dataset index {index}", "(1 such rows in elbo)")


def test_a_missing_row_is_refused(big, small_blocks):
    with h5py.File(big / LAST, "r+") as f:                     # the last row: not finished ...
        f["OOD/test/complete"][4_999] = False
    _refused(big, LAST, "OOD/test has 1 incomplete rows", "dataset index 19999")
    with h5py.File(big / LAST, "r+") as f:                     # ... or not there at all
        f["OOD/test/complete"][4_999] = True
        g = f["OOD/test"]
        data = {k: g[k][:-1] for k in g}
        for k, v in data.items():
            del g[k]
            create_checked(g, k, v)
    _refused(big, "OOD/test has 19999 rows in the shard files but the job planned 20000")


def test_an_index_outside_the_plan_or_in_two_shards_is_refused(big, small_blocks):
    with h5py.File(big / LAST, "r+") as f:
        f["OOD/test/index"][4_999] = 20_000
    _refused(big, LAST, "OOD/test", "20000", "outside the job's")     # read_scores' index check, or merge's
    with h5py.File(big / LAST, "r+") as f:
        f["OOD/test/index"][4_999] = 17                        # shard 0 holds index 17
    _refused(big, LAST, "OOD/test index 17 is also in shard-00000-of-00004.h5 (overlapping shards)")


def test_a_damaged_chunk_in_the_last_chunk_is_refused(big, small_blocks):
    path = big / LAST
    with h5py.File(path, "r") as f:
        d = f["OOD/test/kl"]
        info = d.id.get_chunk_info(d.id.get_num_chunks() - 1)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    _refused(big, str(path), "OOD/test/kl", "Fletcher32")


def test_the_checks_fire_through_the_cli_as_one_line(big, capsys):
    with h5py.File(big / LAST, "r+") as f:
        f["InDist/test/bpd"][-1] = np.nan
    assert hvae(["merge", str(big)]) == 2
    assert "InDist/test/bpd is nan" in capsys.readouterr().err
    assert _leftovers(big) == []


# ------------------------------------------------------------------------ issue 25 case 1: 0-row shards
def test_merge_of_shards_with_0_rows_of_a_dataset_succeeds(run_dir, tmp_path):
    out = tmp_path / "out"
    for s in range(3):                                         # 2 examples over 3 shards: shard 0 has none
        assert hvae(score_args(run_dir, out, "--shard", str(s), "--num-shards", "3", "--iw-samples", "2",
                               max_examples=2)) == 0
    assert read_scores(out / "shard-00000-of-00003.h5").groups["MNIST/test"]["index"].size == 0
    proc = subprocess.run([sys.executable, "-m", "hvae_dist", "merge", str(out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = read_scores(out / "scores.h5")
    for g in ("FashionMNIST/test", "MNIST/test"):
        assert s.groups[g]["index"].tolist() == [0, 1] and np.isfinite(s.groups[g]["elbo"]).all()
    assert [p for p in os.listdir(out) if p.endswith(".tmp")] == []


# ------------------------------------------------------------------ issue 25 case 2: another job's file
def test_a_scores_h5_of_another_job_is_refused_and_force_keeps_it_as_a_backup(run_dir, tmp_path):
    out = tmp_path / "out"
    three = ("FashionMNIST:test", "MNIST:test", "AnimalMNIST:test")
    assert hvae(score_args(run_dir, out, "--iw-samples", "4", datasets=three, max_examples=3)) == 0
    assert hvae(["merge", str(out)]) == 0
    first = (out / "scores.h5").read_bytes()
    assert hvae(["merge", str(out)]) == 0                      # the same job again: replaced, no backup
    assert sorted(p for p in os.listdir(out) if p.startswith("scores")) == ["scores.h5"]
    (out / "shard-00000-of-00001.h5").unlink()
    for s in range(2):
        assert hvae(score_args(run_dir, out, "--iw-samples", "2", "--shard", str(s), "--num-shards", "2",
                               max_examples=3)) == 0
    merge = [sys.executable, "-m", "hvae_dist", "merge", str(out)]
    proc = subprocess.run(merge, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _err_line(proc.stderr)
    for part in (f"{out / 'scores.h5'}: holds the scores of another job", "iw_samples 4 there, 2 in the shards",
                 "AnimalMNIST/test", "--force", "scores.replaced-"):
        assert part in line, (part, line)
    assert (out / "scores.h5").read_bytes() == first and _leftovers(out) == ["scores.h5"]
    proc = subprocess.run([*merge, "--force"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    backups = [p for p in os.listdir(out) if p.startswith("scores.replaced-")]
    assert len(backups) == 1 and (out / backups[0]).read_bytes() == first
    assert backups[0] in proc.stderr
    new = read_scores(out / "scores.h5")
    assert new.attrs["iw_samples"] == 2 and list(new.groups) == ["FashionMNIST/test", "MNIST/test"]


def test_an_unreadable_scores_h5_is_not_replaced_without_force(big):
    (big / "scores.h5").write_bytes(b"not hdf5")
    with pytest.raises(ScoreFileError) as e:
        merge_shards(big)
    msg = str(e.value)
    assert "cannot be read" in msg and "--force" in msg and (big / "scores.h5").read_bytes() == b"not hdf5"
    merge_shards(big, force=True)
    assert [p for p in os.listdir(big) if p.startswith("scores.replaced-")]


# ----------------------------------------------------------------- issue 25 case 7: interrupted merges
# The merge runs in a subprocess through the real CLI entry point, with each dataset copy slowed down (a
# monkeypatch inside that process), so that the signal lands while the temp file is being written.
SLOW_MERGE = """
import sys, time
from hvae_dist.cli import main
from hvae_dist.score import merge_rows
copy = merge_rows._copy_dataset
def slow(*args, **kwargs):
    copy(*args, **kwargs)
    time.sleep(0.1)
merge_rows._copy_dataset = slow
merge_rows.BLOCK_BYTES = 16 * 1024
sys.exit(main(["merge", *sys.argv[1:]]))
"""


def _merge_until_temp(out) -> tuple[subprocess.Popen, str]:
    """A slowed merge of `out` in a subprocess, returned once its temp file exists (and the temp's name)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        temps = [p for p in os.listdir(out) if p.startswith(".scores.h5.") and p.endswith(".tmp")]
        if temps:
            return proc, temps[0]
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no temp file appeared: {proc.communicate()}")


def test_sigterm_during_the_write_leaves_the_old_scores_h5_and_no_temp_file(big):
    old = merge_shards(big).read_bytes()
    inode = (big / "scores.h5").stat().st_ino
    proc, temp = _merge_until_temp(big)
    assert temp == f".scores.h5.{proc.pid}.tmp"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    line = _err_line(err)
    assert line.startswith("hvae merge: stopped by SIGTERM; no temp file is left; scores.h5 is the previous one"), line
    assert _leftovers(big) == ["scores.h5"]
    assert (big / "scores.h5").stat().st_ino == inode and (big / "scores.h5").read_bytes() == old


def test_the_temp_file_of_a_killed_merge_is_removed_by_the_next_merge(big):
    proc, temp = _merge_until_temp(big)
    proc.kill()                                                # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    assert (big / temp).exists() and not (big / "scores.h5").exists()
    done = subprocess.run([sys.executable, "-m", "hvae_dist", "merge", str(big)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _leftovers(big) == ["scores.h5"]
    assert (big / "scores.h5").read_bytes() == in_memory_merge(big)


def test_the_temp_file_of_a_live_merge_is_never_removed(big):
    temp = big / f".scores.h5.{os.getpid()}.tmp"               # held (flock) by this live process
    fd = os.open(temp, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        proc = subprocess.run([sys.executable, "-m", "hvae_dist", "merge", str(big)], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        line = _err_line(proc.stderr)
        assert f"being written by another `hvae merge` (process {os.getpid()}" in line, line
        assert temp.exists() and not (big / "scores.h5").exists()
    finally:
        os.close(fd)                                           # its writer is gone now: the next merge removes it
    assert hvae(["merge", str(big)]) == 0
    assert _leftovers(big) == ["scores.h5"]


def test_a_full_disk_during_the_reservation_is_one_line_and_leaves_nothing(big, tmp_path, capsys):
    import shutil

    with small_tmpfs(tmp_path / "small", size="16m") as disk:
        out = shutil.copytree(big, disk / "out")               # about 4.5 MB of shards
        fill_disk(disk, leave=1 << 20)                         # room for the locks, not for scores.h5
        assert hvae(["merge", str(out)]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{out / 'scores.h5'}: No space left on device (needs about" in line and "free of" in line, line
        assert _leftovers(out) == []
        for filler in disk.glob("filler*"):
            filler.unlink()
        assert hvae(["merge", str(out)]) == 0


@pytest.mark.slow                                              # about 20 s alone, a minute on a loaded machine
def test_the_scale_benchmark_runs_and_prints_its_summary_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/score_files_scale.py", "--rows", "3000", "--shards", "3",
                           "--dir", str(tmp_path), "--no-plots"], cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"merge: [\d,]+ rows/s, peak RSS \d+ MiB; analyze: [\d,]+ rows/s, peak RSS \d+ MiB", last), last
    assert os.listdir(tmp_path) == []                          # its files are removed
