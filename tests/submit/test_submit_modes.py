"""`hvae submit` without a cluster (issue 24 item 5): --time in sbatch's forms, --dry-run, --local."""
from __future__ import annotations

import argparse
import json
import re

import h5py
import pytest

from hvae_dist.cli import main
from hvae_dist.submit.modes import parse_slurm_time

SMALL = ["--set", "data.max_train_examples=64", "--set", "train.batch_size=8", "--set", "train.eval_every=0",
         "--set", "train.log_every=1", "--set", "train.checkpoint_every=2"]


@pytest.mark.parametrize("text, minutes", [("90", 90), ("90:30", 91), ("90:00", 90), ("02:00:00", 120),
                                           ("1:30:01", 91), ("1-02", 1560), ("1-02:30", 1590),
                                           ("1-02:00:00", 1560), ("0-00:00:30", 1)])
def test_time_takes_every_form_of_sbatch(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["", "2h", "1:2:3:4", "1-", "-5", "0", "00:00:00", "1.5"])
def test_time_refuses_other_forms_naming_them(text):
    with pytest.raises(argparse.ArgumentTypeError, match="D-H:MIN:SEC"if text not in ("0", "00:00:00") else "1 minute"):
        parse_slurm_time(text)


def _no_slurm(monkeypatch, tmp_path):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)   # no sbatch / srun anywhere


def test_dry_run_prints_every_job_script_without_a_cluster_and_writes_nothing(tmp_path, monkeypatch, capsys):
    _no_slurm(monkeypatch, tmp_path)
    run = tmp_path / "run"
    assert main(["submit", "pipeline", "--config", "tiny", "--run-dir", str(run), "--datasets", "FashionMNIST:test",
                 "MNIST:test", "--num-shards", "3", "--time", "1-02:00:00", "--score-time", "02:00:00", "--dry-run",
                 "--partition", "gpu", *SMALL]) == 0
    out = capsys.readouterr().out
    params = [json.loads(m) for m in re.findall(r"sbatch parameters:\n(\{.*?\n\})", out, re.S)]
    assert [p["job_name"] for p in params] == ["hvae-train-run", "hvae-score-scores", "hvae-merge-scores"]
    assert params[0]["time"] == 1560 and params[1]["time"] == 120                 # minutes, as SLURM stores them
    assert params[1]["map_count"] == 3 and params[1]["dependency"] == "afterok:DRY-1"
    assert params[2]["dependency"] == "afterok:DRY-2"
    assert "#SBATCH --time=1560" in out and "#SBATCH --array=0-2%3" in out and "#SBATCH --partition=gpu" in out
    assert out.rstrip().endswith("drop --dry-run to submit")
    assert not run.exists()


def test_without_a_cluster_submit_still_says_so_and_bad_time_exits_2(tmp_path, monkeypatch, capsys):
    _no_slurm(monkeypatch, tmp_path)
    argv = ["submit", "train", "--config", "tiny", "--run-dir", str(tmp_path / "r"), *SMALL]
    assert main(argv) == 2 and "needs SLURM" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*argv, "--time", "2h"])
    assert e.value.code == 2 and "MIN:SEC" in capsys.readouterr().err


@pytest.mark.slow
def test_local_runs_the_pipeline_chain_through_submitits_local_executor(tmp_path, capsys):
    """train -> 2 score shards -> merge + analyze, each a submitit LocalExecutor job of the same callables that
    SLURM would run."""
    run = tmp_path / "run"
    assert main(["submit", "pipeline", "--config", "tiny", "--run-dir", str(run), "--max-steps", "2", "--datasets",
                 "FashionMNIST:test", "MNIST:test", "--iw-samples", "2", "--max-examples", "6", "--score-batch-size", "3",
                 "--num-shards", "2", "--local", "--time", "10", *SMALL]) == 0
    out = capsys.readouterr().out
    for stage in ("local train done", "local score done: 2 job(s)", "local merge done"):
        assert stage in out, out
    with h5py.File(run / "scores" / "scores.h5") as f:
        assert f.attrs["merged_shards"] == 2 and int(f.attrs["checkpoint_step"]) == 2
        assert f["MNIST/test/elbo"].shape == (6,)
    assert (run / "scores" / "analysis" / "report.html").exists()
    assert list((run / "slurm").glob("*/*_log.out"))                                 # submitit's job logs
