"""hvae merge: every doubtful set of shards is refused with an error naming the file; nothing is merged."""
from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from helpers.score import make_run_dir, score_args
from hvae_dist.cli import main as hvae
from hvae_dist.errors import ScoreFileError
from hvae_dist.score.merge import merge_shards
from hvae_dist.score.reader import read_scores


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A finished 3-shard job (FashionMNIST:test + MNIST:test, 7 examples each)."""
    root = tmp_path_factory.mktemp("merge")
    run = make_run_dir(root / "run")
    for i in range(3):
        assert hvae(score_args(run, root / "out", "--shard", str(i), "--num-shards", "3", "--iw-samples", "3")) == 0
    return root / "out"


@pytest.fixture
def out(shards, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(shards, dst)
    return dst


def _refused(out, *patterns):
    with pytest.raises(ScoreFileError) as e:
        merge_shards(out)
    for p in patterns:
        assert p in str(e.value), str(e.value)
    assert not (out / "scores.h5").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    return str(e.value)


def test_merge_of_good_shards_is_sorted_complete_and_atomic(out, capsys):
    assert hvae(["merge", str(out)]) == 0
    s = read_scores(out / "scores.h5")
    for g in ("FashionMNIST/test", "MNIST/test"):
        assert s.groups[g]["index"].tolist() == list(range(7))
        assert set(s.groups[g]) == {"index", "elbo", "elbo_1", "lk", "llr", "kl", "bpd", "label"}
        assert np.isfinite(s.groups[g]["elbo"]).all()
    assert s.attrs["merged_shards"] == 3 and "shard" not in s.attrs and "num_shards" not in s.attrs
    assert sorted(os.listdir(out)) == ([f".shard-0000{i}-of-00003.lock" for i in range(3)]
                                       + [f"score-shard-0000{i}-of-00003.log" for i in range(3)] + ["scores.h5"]
                                       + [f"shard-0000{i}-of-00003.h5" for i in range(3)])   # the locks, logs stay


def test_merge_refuses_a_truncated_shard(out):
    path = out / "shard-00001-of-00003.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(out, "shard-00001-of-00003.h5", "delete")


def test_merge_refuses_a_shard_of_another_model(out):
    with h5py.File(out / "shard-00002-of-00003.h5", "r+") as f:
        f.attrs["model_sha256"] = "0" * 64
    _refused(out, "shard-00002-of-00003.h5", "another model")


def test_merge_refuses_overlapping_shards(out):
    with h5py.File(out / "shard-00001-of-00003.h5", "r+") as f:
        f["MNIST/test/index"][0] = 0                                  # shard 0 already holds MNIST index 0
    _refused(out, "shard-00001-of-00003.h5", "overlapping", "shard-00000-of-00003.h5")


def test_merge_refuses_a_missing_shard(out):
    (out / "shard-00001-of-00003.h5").unlink()
    _refused(out, "shard-00001-of-00003.h5", "missing")


def test_merge_refuses_incomplete_rows_and_mixed_jobs(out, tmp_path):
    with h5py.File(out / "shard-00000-of-00003.h5", "r+") as f:
        f["FashionMNIST/test/complete"][1] = False
    _refused(out, "shard-00000-of-00003.h5", "incomplete")
    with h5py.File(out / "shard-00000-of-00003.h5", "r+") as f:
        f["FashionMNIST/test/complete"][1] = True
    shutil.copy(out / "shard-00000-of-00003.h5", out / "shard-00000-of-00002.h5")
    _refused(out, "different shard counts")
    (out / "shard-00000-of-00002.h5").unlink()
    with h5py.File(out / "shard-00002-of-00003.h5", "r+") as f:
        f.attrs["iw_samples"] = 4
    _refused(out, "shard-00002-of-00003.h5", "iw_samples")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, "no shard files")


def test_merge_cli_reports_the_problem(out, capsys):
    (out / "shard-00000-of-00003.h5").write_bytes(b"not hdf5")
    assert hvae(["merge", str(out)]) == 2
    assert "shard-00000-of-00003.h5" in capsys.readouterr().err
