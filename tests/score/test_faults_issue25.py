"""Faults of `hvae score`, `merge`, `analyze` and `visualize` found by issue 25, each reproduced with the
issue's command (on a small random-init run dir or a synthetic score file) and asserting the exit status,
the one-line message's key words and what is (not) on disk afterwards. The training faults of the issue are
in tests/train/test_faults_train_issue25.py."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from helpers.analysis import write_score_file
from helpers.score import REPO, make_run_dir, score_args, small_config
from hvae_dist.cli import main as hvae
from hvae_dist.data import get_dataset, variants

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


def _line(err: str, command: str) -> str:
    """The one error line of a command's stderr: exactly one, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith(f"hvae {command}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _synthetic(path, **groups):
    """A score file with FashionMNIST/test and MNIST/test (or `groups`), 40 rows each."""
    return write_score_file(path, groups or {"FashionMNIST/test": 40, "MNIST/test": 40}, shifts={"MNIST/test": 1.0})


def _analyze(path, out, *extra) -> int:
    return hvae(["analyze", str(path), "--in-dist", "FashionMNIST:test", "--out", str(out), *extra])


# ----------------------------------------------------------------- 4: score-file attributes are vouched for
@pytest.mark.parametrize("edit, words", [
    ({"format_version": 3}, "score-file format 3 (written by a newer hvae-dist"),
    ({"format_version": "2"}, "'format_version' is '2' (str), not an integer"),
    ({"format_version": None}, "'format_version' is missing"),
    ({"ks": np.array([2, 1])}, "'ks' is [2, 1]"),
    ({"ks": np.array([1, 1])}, "'ks' is [1, 1]"),
])
def test_analyze_refuses_a_score_file_whose_attributes_it_cannot_vouch_for(tmp_path, capsys, edit, words):
    path = _synthetic(tmp_path / "scores.h5")
    with h5py.File(path, "r+") as f:
        for key, value in edit.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value
    assert _analyze(path, tmp_path / "report") == 2
    line = _line(capsys.readouterr().err, "analyze")
    assert str(path) in line and words in line, line
    assert not (tmp_path / "report").exists()


def test_analyze_refuses_a_repeated_index_row(tmp_path, capsys):
    path = _synthetic(tmp_path / "scores.h5")
    with h5py.File(path, "r+") as f:
        f["MNIST/test/index"][3] = 2
    assert _analyze(path, tmp_path / "report") == 2
    line = _line(capsys.readouterr().err, "analyze")
    assert "'MNIST/test/index' repeats 1 example(s) (e.g. index 2, 2 rows)" in line, line
    assert not (tmp_path / "report").exists()


def test_merge_refuses_a_shard_with_a_repeated_index_or_a_string_format_version(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert hvae(score_args(run_dir, out, "--iw-samples", "2", max_examples=4)) == 0
    shard = out / "shard-00000-of-00001.h5"
    with h5py.File(shard, "r+") as f:
        f["MNIST/test/index"][1] = 0
    assert hvae(["merge", str(out)]) == 2
    assert "'MNIST/test/index' repeats" in _line(capsys.readouterr().err, "merge")
    with h5py.File(shard, "r+") as f:
        f["MNIST/test/index"][1] = 1
        f.attrs["format_version"] = "2"
    assert hvae(["merge", str(out)]) == 2
    assert "'format_version' is '2' (str), not an integer" in _line(capsys.readouterr().err, "merge")
    assert not (out / "scores.h5").exists()


def test_score_writes_ks_in_increasing_order_whatever_order_they_are_given(run_dir, tmp_path):
    assert hvae(score_args(run_dir, tmp_path / "out", "--ks", "2", "1", "--iw-samples", "2", max_examples=2)) == 0
    with h5py.File(tmp_path / "out" / "shard-00000-of-00001.h5") as f:
        assert f.attrs["ks"].tolist() == [1, 2]


# ------------------------------------------------- 5, 10: integers stored in HDF5 are bound-checked up front
@pytest.mark.parametrize("option, value, words", [
    ("--seed", "-1", "--seed: -1 is out of range; give an integer in [0, 2^63 - 1]"),
    ("--seed", "18446744073709551615", "--seed: 18446744073709551615 is out of range"),
    ("--seed", str(2**64 + 5), "--seed: 18446744073709551621 is out of range"),
    ("--iw-samples", "99999999999999999999", "--iw-samples: 99999999999999999999 is out of range; give an integer in [1,"),
    ("--ks", "99999999999999999999", "--ks: 99999999999999999999 is out of range"),
])
def test_an_integer_option_outside_int64_is_one_line_and_creates_nothing(run_dir, tmp_path, capsys, option, value,
                                                                          words):
    out = tmp_path / "out"
    assert hvae(score_args(run_dir, out, option, value)) == 2
    line = _line(capsys.readouterr().err, "score")
    assert words in line, line
    assert not out.exists()                                       # no shard, no lock file


def test_visualize_refuses_negative_and_non_finite_temperatures(run_dir, tmp_path, capsys):
    out = tmp_path / "vis"
    assert hvae(["visualize", "--run-dir", str(run_dir), "--datasets", "FashionMNIST:test", "--examples", "1",
                 "--temperatures", "-1", "nan", "--out", str(out)]) == 2
    line = _line(capsys.readouterr().err, "visualize")
    assert "--temperatures -1.0 nan" in line and "finite numbers >= 0" in line, line
    assert not out.exists()


# -------------------------------------------------------------------------------- 6: group names escaped
def test_group_names_with_pipe_newline_or_a_formula_are_escaped_in_md_and_neutralised_in_csv(tmp_path):
    names = ["A|B/test", "x\ny/test", '=HYPERLINK("https:x.example","click")/test']
    path = write_score_file(tmp_path / "scores.h5", {"FashionMNIST/test": 30, **dict.fromkeys(names, 30)})
    assert _analyze(path, tmp_path / "report", "--no-plots", "--scores", "nll") == 0
    md = (tmp_path / "report" / "metrics.md").read_text()
    table = [line for line in md.splitlines() if line.endswith("| 30 | 30 |")]
    assert len(table) == 3, md                                     # one line per OOD group: none broken
    for line in table:
        unescaped = len(line) - len(line.replace("|", "")) - line.count("\\|")
        assert unescaped == 8, line                                # 7 columns, so no extra cell
    assert "| A\\|B/test |" in md and "| x y/test |" in md and "x\ny" not in md
    with open(tmp_path / "report" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["ood"] for r in rows} == {"A|B/test", "x\ny/test", "'" + names[2]}
    assert not any(cell.startswith(("=", "+", "@")) for r in rows for cell in r.values())
    assert {r["label"] for r in rows} == {"-ELBO"}                 # our own labels are written as they are


# --------------------------------------------------- 8: an interrupted analyze leaves the old report, whole
def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sigterm_to_analyze_into_an_existing_report_leaves_the_old_report_untouched(tmp_path):
    old = _synthetic(tmp_path / "old.h5")
    new = write_score_file(tmp_path / "new.h5", {"FashionMNIST/test": 40, "KMNIST/test": 40}, seed=3)
    report = tmp_path / "report"
    assert _analyze(old, report) == 0
    (report / "notes.txt").write_text("mine")                      # a file of the user's: kept
    before = _snapshot(report)
    proc = subprocess.Popen([sys.executable, "-m", "hvae_dist", "analyze", str(new), "--in-dist",
                             "FashionMNIST:test", "--out", str(report)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    staged = []
    while not staged and proc.poll() is None and time.monotonic() < deadline:
        staged = [p for p in tmp_path.glob(".report.*.tmp") if (p / "metrics.md").exists()]
        time.sleep(0.002)
    assert staged, "the new report was never staged beside the old one"
    proc.send_signal(signal.SIGTERM)                               # while its figures are being drawn
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = _line(err, "analyze")
    assert "stopped by SIGTERM" in line and "holds the previous report" in line, line
    assert _snapshot(report) == before                             # the old report, whole: no new file in it
    assert not list(tmp_path.glob(".report.*"))                    # and no staged folder left


def test_a_finished_analyze_replaces_the_whole_report_and_keeps_other_files(tmp_path):
    report = tmp_path / "report"
    assert _analyze(_synthetic(tmp_path / "old.h5"), report) == 0
    assert (report / "roc_MNIST_test.png").exists()
    (report / "notes.txt").write_text("mine")
    stale = tmp_path / ".report.999999999.tmp"                     # a swap killed with SIGKILL long ago
    stale.mkdir()
    new = write_score_file(tmp_path / "new.h5", {"FashionMNIST/test": 40, "KMNIST/test": 40}, seed=3)
    assert _analyze(new, report) == 0
    names = set(os.listdir(report))
    assert "roc_KMNIST_test.png" in names and "roc_MNIST_test.png" not in names   # no figure of the old run
    assert (report / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".report.*"))


# -------------------------------------------- 9, 14: resize variants: sizes named, only the rows asked for
@pytest.mark.parametrize("spec", ["MNIST-0x0:test", "MNIST-99999x99999:test", "MNIST-9999x9999:test"])
def test_a_resize_outside_the_allowed_sizes_says_which_sizes_are_allowed(run_dir, tmp_path, capsys, spec):
    assert hvae(score_args(run_dir, tmp_path / "out", datasets=(spec,), max_examples=4)) == 2
    line = _line(capsys.readouterr().err, "score")
    assert "a resize takes a height and a width in 1..1024" in line, line
    assert not (tmp_path / "out").exists()


def test_a_resize_of_the_wrong_shape_is_refused_before_any_pixel_is_resized(run_dir, tmp_path, capsys, monkeypatch):
    resized = []
    real = variants.apply_variant
    monkeypatch.setattr(variants, "apply_variant", lambda images, token: resized.append(images.shape) or real(images, token))
    assert hvae(score_args(run_dir, tmp_path / "out", datasets=("MNIST-1024x1024:test",), max_examples=4)) == 2
    line = _line(capsys.readouterr().err, "score")
    assert "has images of shape (1, 1024, 1024) but the model takes (1, 28, 28)" in line, line
    assert resized == [] and not (tmp_path / "out").exists()


def test_max_examples_resizes_only_its_rows_and_they_equal_the_whole_splits(monkeypatch):
    resized = []
    real = variants.apply_variant
    monkeypatch.setattr(variants, "apply_variant", lambda images, token: resized.append(len(images)) or real(images, token))
    few = get_dataset("MNIST-20x20nearest-inverted", "validation", max_examples=5)
    assert resized == [5, 5]
    whole = get_dataset("MNIST-20x20nearest-inverted", "validation")
    assert np.array_equal(few.images, whole.images[:5]) and few.shape == (1, 20, 20)


# ------------------------------------------------------------------------------------------- 11: --device
@pytest.mark.parametrize("device, words", [
    ("foo", "--device 'foo' is not a device; give auto, cpu, cuda or cuda:N"),
    pytest.param("cuda", "--device cuda: CUDA is not available here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
    ("cuda:99", "--device cuda:99: "),
])
def test_a_device_that_is_not_here_is_one_line(run_dir, tmp_path, capsys, device, words):
    assert hvae(score_args(run_dir, tmp_path / "out", "--device", device)) == 2
    line = _line(capsys.readouterr().err, "score")
    assert words in line, line
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------- 15: a folder that is a file
def test_a_run_dir_or_out_dir_that_is_a_file_is_one_clear_line(run_dir, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    scores = _synthetic(tmp_path / "scores.h5")
    for command, argv in (
        ("score", score_args(file, tmp_path / "o")),
        ("score", score_args(run_dir, file)),
        ("merge", ["merge", str(file)]),
        ("analyze", ["analyze", str(scores), "--in-dist", "FashionMNIST:test", "--tensorboard", str(file)]),
        ("analyze", ["analyze", str(scores), "--in-dist", "FashionMNIST:test", "--out", str(file)]),
        ("analyze", ["analyze", str(scores), "--in-dist", "FashionMNIST:test", "--out", str(file / "sub")]),
    ):
        assert hvae(argv) == 2
        line = _line(capsys.readouterr().err, command)
        assert f"{file} is a file, not a folder" in line or f"its parent {file} is a file" in line, line
    assert file.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file", "scores.h5"]


# --------------------------------------------------------------- 16: the model mismatch names the field
def test_the_model_mismatch_names_the_differing_field_with_both_values_in_full(run_dir, tmp_path, capsys):
    config = small_config()
    config["model"]["config_stochastic"][2]["latent_features"] = 17
    other = make_run_dir(tmp_path / "other", config)
    ckpt = other / "checkpoints" / "latest.pt"
    assert hvae(score_args(run_dir, tmp_path / "o", "--checkpoint", str(ckpt))) == 2
    line = _line(capsys.readouterr().err, "score")
    assert "model.config_stochastic[2].latent_features: checkpoint 17, config.json 2" in line, line
    assert "..." not in line and not (tmp_path / "o").exists()


# ----------------------------------------------------------- 17: --in-dist in any case, as score takes it
def test_analyze_takes_the_in_dist_name_in_any_case(tmp_path):
    path = _synthetic(tmp_path / "scores.h5")
    assert hvae(["analyze", str(path), "--in-dist", "fashionmnist:TEST", "--out", str(tmp_path / "r"),
                 "--no-plots"]) == 0
    assert "# OOD metrics: FashionMNIST/test (in-distribution) vs MNIST/test" in (tmp_path / "r" / "metrics.md").read_text()
