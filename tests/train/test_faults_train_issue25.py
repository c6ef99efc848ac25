"""Training faults of issue 25, each with the issue's command on the tests' small tiny model: a resume
that changes the data (checked against the checkpoint's own config), deeply nested JSON, Ctrl-C, a run
dir that is a file, and a model mismatch that names its field. Each asserts the exit status, the one-line
message's key words and what is (not) on disk afterwards."""
from __future__ import annotations

import json
import shutil
import signal

import pytest

from helpers import train as th
from hvae_dist import checkpoint as ck
from hvae_dist.cli import main

one_thread = th.one_thread   # autouse: one intra-op thread in every test of this file


def _line(err: str, command: str = "train") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"hvae {command}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _files(run_dir) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step FashionMNIST run of the small tiny model."""
    run = tmp_path_factory.mktemp("runs") / "two"
    assert main(th.train_args(run, 2, train__checkpoint_every=2)) == 0
    return run


# ------------------------------------------------- 3: the data section is checked against the checkpoint
@pytest.mark.parametrize("config_json", ["missing", "edited"])
def test_a_resume_on_other_data_is_refused_by_the_checkpoints_own_config(two_steps, tmp_path, capsys, config_json):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    if config_json == "missing":       # a checkpoint copied beside nothing, started with the run's command
        (run / "config.json").unlink()
        argv = th.train_args(run, 4, train__checkpoint_every=2, data__dataset="MNIST")
    else:                              # config.json edited to say MNIST
        cfg = json.loads((run / "config.json").read_text())
        cfg["data"]["dataset"] = "MNIST"
        (run / "config.json").write_text(json.dumps(cfg))
        argv = ["train", "--run-dir", str(run), "--max-steps", "4", "--no-progress"]
    before = _files(run)
    assert main(argv) == 2
    line = _line(capsys.readouterr().err)
    assert 'data.dataset: checkpoint "FashionMNIST", this run "MNIST"' in line, line
    assert _files(run) == before       # no checkpoint, config.json or log written


def test_a_resume_may_still_change_the_validation_sets(two_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    assert main(["train", "--run-dir", str(run), "--max-steps", "3", "--no-progress",
                 "--set", 'data.val_datasets=["FashionMNIST:test"]']) == 0
    assert th.latest(run)["step"] == 3


# ------------------------------------------------------------------- 12: deeply nested JSON, one line
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100, 100_000])    # beyond the limit / beyond Python's recursion limit
def test_deeply_nested_json_in_config_file_config_json_or_set_is_one_line(two_steps, tmp_path, capsys, depth):
    deep = tmp_path / "deep.json"
    deep.write_text('{"train": {"lr": ' + _nested(depth) + "}}")
    assert main(["train", "--config", str(deep), "--run-dir", str(tmp_path / "a")]) == 2
    assert f"config file {deep}: lists / objects nested more than 32 levels" in _line(capsys.readouterr().err)
    assert main(["train", "--config", "tiny", "--run-dir", str(tmp_path / "b"),
                 "--set", f"train.lr={_nested(depth)}"]) == 2
    assert "--set train.lr: lists / objects nested more than 32 levels" in _line(capsys.readouterr().err)
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    (run / "config.json").write_text(deep.read_text())
    before = _files(run)
    assert main(["train", "--run-dir", str(run), "--max-steps", "4"]) == 2
    line = _line(capsys.readouterr().err)
    assert f"{run / 'config.json'} cannot be read as a run config" in line and "nested more than 32" in line, line
    assert _files(run) == before and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------- 13: Ctrl-C saves like SIGTERM
def test_ctrl_c_during_training_saves_a_checkpoint_prints_one_line_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = th.start(th.command(th.train_args(run, 400, train__checkpoint_every=1000)), tmp_path / "log")
    th.wait_for_text(run / "train.log", " step 2 loss ", proc)      # the loop is running
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    out = (tmp_path / "log").read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    step = th.latest(run)["step"]
    assert 0 < step < 400
    line = _line(out)
    assert line == (f"hvae train: stopped by SIGINT (Ctrl-C); checkpoint of step {step} saved in "
                    f"{run / 'checkpoints'}; re-run the same command to resume"), line
    assert not [p for p in ck.checkpoint_dir(run).iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------- 15: a run dir that is a file
def test_a_run_dir_that_is_a_file_is_one_clear_line(tmp_path, capsys):
    file = tmp_path / "run"
    file.write_text("x")
    assert main(th.train_args(file, 2)) == 2
    assert f"--run-dir {file} is a file, not a folder" in _line(capsys.readouterr().err)
    assert file.read_text() == "x"


# ------------------------------------------------------- 16: "another model config" names the field
def test_a_checkpoint_of_another_model_names_the_differing_field(two_steps, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    (run / "config.json").unlink()
    before = _files(run)
    assert main(th.train_args(run, 4, model__activation="elu")) == 2
    line = _line(capsys.readouterr().err)
    assert 'model.activation: checkpoint "silu", this run "elu"' in line, line
    assert _files(run) == before
