"""Faults of `hvae analyze` (issue 15): partial data is refused, a full disk is one line and leaves no file
(nor, issue 25, part of a report)."""
from __future__ import annotations

import os

import h5py
import pytest

from helpers.score import fill_disk, make_run_dir, score_args, small_tmpfs
from hvae_dist.cli import main as hvae


@pytest.fixture(scope="module")
def first_of_two(tmp_path_factory):
    """Shard 0 of a 2-shard job (FashionMNIST:test + MNIST:test, 7 examples each), finished; shard 1 never ran."""
    root = tmp_path_factory.mktemp("partial")
    run = make_run_dir(root / "run")
    assert hvae(score_args(run, root / "out", "--shard", "0", "--num-shards", "2", "--iw-samples", "3")) == 0
    return root / "out" / "shard-00000-of-00002.h5"


def _error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("hvae analyze: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_analyze_refuses_one_finished_shard_of_a_two_shard_job(first_of_two, tmp_path, capsys):
    with h5py.File(first_of_two, "r") as f:
        assert f["FashionMNIST/test/complete"][()].all()                  # every row it has is complete ...
    assert hvae(["analyze", str(first_of_two), "--in-dist", "FashionMNIST:test", "--out", str(tmp_path / "a")]) == 2
    line = _error(capsys.readouterr().err)                                 # ... but they are 3 of 7 examples
    assert "FashionMNIST/test' holds 3 of the 7 examples" in line and "shard 0 of 2" in line, line
    assert "hvae merge" in line
    assert not (tmp_path / "a").exists()


def test_analyze_refuses_a_shard_with_incomplete_rows(first_of_two, tmp_path, capsys):
    shard = tmp_path / "shard-00000-of-00001.h5"
    shard.write_bytes(first_of_two.read_bytes())
    with h5py.File(shard, "r+") as f:
        f.attrs["num_shards"], f.attrs["dataset_sizes"] = 1, '{"FashionMNIST/test": 3, "MNIST/test": 3}'
        f["MNIST/test/complete"][1] = False
    assert hvae(["analyze", str(shard), "--in-dist", "FashionMNIST:test", "--no-plots"]) == 2
    assert "'MNIST/test' has 1 incomplete rows" in _error(capsys.readouterr().err)


def test_analyze_on_a_full_file_system_is_one_line_error_and_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "out"
    run = make_run_dir(tmp_path / "run")
    assert hvae(score_args(run, out, "--iw-samples", "3")) == 0 and hvae(["merge", str(out)]) == 0
    with small_tmpfs(tmp_path / "small") as disk:
        report = disk / "report"
        report.mkdir()
        fill_disk(disk)
        assert hvae(["analyze", str(out / "scores.h5"), "--in-dist", "FashionMNIST:test", "--out", str(report)]) == 2
        line = _error(capsys.readouterr().err)
        assert str(report / "metrics.md") in line and "No space left on device" in line and "0 B free of" in line, line
        assert os.listdir(report) == []                                    # no 0-byte metrics.md, no temp file
        for filler in disk.glob("filler*"):
            filler.unlink()
        fill_disk(disk, leave=64 * 1024)            # room for the tables (metrics.*, comparison.*: ~44 KiB), not the PNGs
        assert hvae(["analyze", str(out / "scores.h5"), "--in-dist", "FashionMNIST:test", "--out", str(report)]) == 2
        line = _error(capsys.readouterr().err)
        assert f"{report}/" in line and ".png: No space left on device" in line, line
        # The tables fitted but the figures did not: the report is written whole or not at all (issue 25),
        # so the folder keeps its previous contents (here: none) and no staged copy is left beside it.
        assert os.listdir(report) == []
        assert sorted(os.listdir(disk)) == ["filler", "report"]
