"""`hvae analyze`: metrics against hand-computed values, the CLI end to end on a synthetic score file,
error messages, the background-model join and the compressed-size complexity."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers.analysis import KS as SCORE_FILE_KS
from helpers.analysis import write_score_file
from hvae_dist.analysis import analyze, compute_metrics, run_analysis
from hvae_dist.errors import ConfigError, ScoreFileError
from hvae_dist.estimators.complexity import compressed_size_nats
from hvae_dist.score.reader import read_scores as load_scores
from hvae_dist.score.reader import to_dataframe

REPO = Path(__file__).resolve().parents[2]
KS = SCORE_FILE_KS


@pytest.fixture
def score_file(tmp_path: Path) -> Path:
    return write_score_file(tmp_path / "scores.h5", {"A/test": 40, "A/train": 30, "B/test": 50, "C/test": 35},
                            shifts={"B/test": 1.0, "C/test": -0.5})


# ----------------------------------------------------------------------------------------------- metrics
def test_perfect_separation_gives_auroc_1_and_fpr80_0():
    m = compute_metrics([0.0, 0.1, 0.2], [1.0, 2.0, 3.0, 4.0])
    assert m == {"auroc": 1.0, "auprc": 1.0, "fpr80": 0.0}


def test_inverted_scores_give_auroc_0_and_fpr80_1():
    m = compute_metrics([5.0, 6.0], [1.0, 2.0, 3.0])
    assert m["auroc"] == 0.0 and m["fpr80"] == 1.0


def test_all_equal_scores_give_auroc_half_and_fpr80_1():
    m = compute_metrics(np.ones(7), np.ones(5))
    assert m["auroc"] == 0.5 and m["fpr80"] == 1.0 and m["auprc"] == pytest.approx(5 / 12)


def test_small_example_matches_hand_computation():
    # neg 0 1 2 3; pos 1.5 2.5 4 5 6. Pairs won by pos: 2 + 3 + 4 + 4 + 4 = 17 of 20 -> AUROC 0.85.
    # Ranked: 6p 5p 4p 3n 2.5p 2n 1.5p 1n 0n; precision at each positive: 1, 1, 1, 4/5, 5/7 -> AP = mean.
    # TPR = 4/5 = 0.8 exactly at threshold 2.5, where one negative (3) of four is above: FPR80 = 0.25.
    m = compute_metrics([0, 1, 2, 3], [1.5, 2.5, 4, 5, 6])
    assert m["auroc"] == pytest.approx(0.85)
    assert m["auprc"] == pytest.approx((1 + 1 + 1 + 4 / 5 + 5 / 7) / 5)
    assert m["fpr80"] == pytest.approx(0.25)


def test_fpr80_moves_tied_scores_together():
    # Reaching TPR 0.8 needs threshold 1, which also flags the negative tied at 1: FPR80 = 1/5, not 0.
    m = compute_metrics([1, 0, 0, 0, 0], [2, 1, 1, 1, 1])
    assert m["fpr80"] == pytest.approx(0.2)


def test_fpr80_is_not_fooled_by_collinear_roc_points():
    # 7 positives on top, then three (positive, negative) ties: ROC (0, .7) (.1, .8) (.2, .9) (.3, 1) is one
    # straight line, which roc_curve's default drop_intermediate thins to its ends; TPR 0.8 is at FPR 0.1.
    neg = [50, 40, 30, 0, 0, 0, 0, 0, 0, 0]
    pos = [100, 99, 98, 97, 96, 95, 94, 50, 40, 30]
    assert compute_metrics(neg, pos)["fpr80"] == pytest.approx(0.1)


# -------------------------------------------------------------------------------------------- end to end
def test_cli_writes_tables_and_plots_that_match_compute_metrics(score_file: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hvae_dist", "analyze", str(score_file), "--in-dist", "A:test",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LLR>1" in proc.stdout and "higher = more OOD" in proc.stdout
    for name in ("metrics.md", "metrics.csv", "metrics.json", "roc_B_test.png", "roc_C_test.png",
                 "hist_B_test.png", "hist_C_test.png", "hist_all.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("roc_B_test.png", "hist_B_test.png", "hist_all.png"):
        with Image.open(out / name) as img:
            pixels = np.asarray(img.convert("RGB"))
        assert img.format == "PNG" and min(pixels.shape[:2]) >= 200, (name, pixels.shape)
        # A drawn figure, not a blank canvas: white background plus many other (line / bar) colours.
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 20 and (pixels < 250).any(axis=2).mean() > 0.01, name
    doc = json.loads((out / "metrics.json").read_text())
    rows = doc["rows"]
    assert {r["ood"] for r in rows} == {"B/test", "C/test"}  # A/train is in-dist, never OOD
    assert {r["score"] for r in rows} == {"nll", "lk1", "lk2", "llr1", "llr2", "complexity_png", "typicality"}
    assert doc["typicality_reference"] == "A/train"

    groups, _ = load_scores(score_file)
    a, b = groups["A/test"], groups["B/test"]
    typical = np.mean(-groups["A/train"]["elbo"])
    expected = {"nll": (-a["elbo"], -b["elbo"]), "lk2": (-a["lk"][:, 1], -b["lk"][:, 1]),
                "llr1": (a["llr"][:, 0], b["llr"][:, 0]),
                "complexity_png": (-a["elbo"] - a["complexity_png"], -b["elbo"] - b["complexity_png"]),
                "typicality": (np.abs(-a["elbo"] - typical), np.abs(-b["elbo"] - typical))}
    by_key = {(r["ood"], r["score"]): r for r in rows}
    with (out / "metrics.csv").open() as f:
        csv_rows = {(r["ood"], r["score"]): r for r in csv.DictReader(f)}
    for score, (neg, pos) in expected.items():
        m = compute_metrics(neg, pos)
        for metric, value in m.items():
            assert by_key["B/test", score][metric] == pytest.approx(value)
            assert float(csv_rows["B/test", score][metric]) == pytest.approx(value)
    md = (out / "metrics.md").read_text()
    assert f"{by_key['B/test', 'llr1']['auroc']:.4f}" in md and "higher = more OOD" in md


def test_analyze_without_out_dir_writes_nothing_and_scores_filter(score_file: Path):
    rows = analyze(score_file, "A:test", scores=["llr", "nll"])
    assert {r["score"] for r in rows} == {"nll", "llr1", "llr2"}
    assert not (score_file.parent / "analysis").exists()
    with pytest.raises(ConfigError, match="background"):
        analyze(score_file, "A:test", scores=["background"])


def test_missing_in_dist_group_lists_the_groups(score_file: Path):
    with pytest.raises(ScoreFileError, match=r"no in-distribution group 'Z/test'.*A/test.*B/test"):
        analyze(score_file, "Z:test")


def test_cli_reports_errors_without_traceback(score_file: Path, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "hvae_dist", "analyze", str(score_file), "--in-dist", "Z:test",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "A/test" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_dataset_names_file_group_and_dataset(tmp_path: Path):
    path = write_score_file(tmp_path / "s.h5", {"A/test": 5, "B/test": 5})
    with h5py.File(path, "a") as f:
        del f["B/test/llr"]
    with pytest.raises(ScoreFileError, match=r"s\.h5.*'B/test' lacks dataset\(s\) llr"):
        load_scores(path)


def test_non_finite_score_is_an_error_naming_group_and_score(tmp_path: Path):
    path = write_score_file(tmp_path / "s.h5", {"A/test": 5, "B/test": 5})
    with h5py.File(path, "a") as f:
        f["B/test/llr"][2, 0] = np.nan
    with pytest.raises(ScoreFileError, match=r"LLR>1 \(llr1\) of 'B/test' is not finite.*1 NaN"):
        analyze(path, "A:test")


def test_background_ratio_joins_on_index(tmp_path: Path):
    fg = write_score_file(tmp_path / "fg.h5", {"A/test": 20, "B/test": 25}, seed=1, shifts={"B/test": 1.0})
    bg = write_score_file(tmp_path / "bg.h5", {"A/test": 20, "B/test": 25}, seed=2)
    with h5py.File(bg, "a") as f:  # store the background rows in another order: the join must realign them
        for g in ("A/test", "B/test"):
            perm = np.random.default_rng(3).permutation(f[g]["index"].shape[0])
            for key in ("index", "elbo"):
                f[g][key][...] = f[g][key][()][perm]
    result = run_analysis(fg, "A:test", background=bg)
    fgs, bgs = load_scores(fg).groups, load_scores(bg).groups
    for g in ("A/test", "B/test"):
        bg_by_index = dict(zip(bgs[g]["index"].tolist(), bgs[g]["elbo"].tolist()))
        expected = -(fgs[g]["elbo"] - np.array([bg_by_index[i] for i in fgs[g]["index"].tolist()]))
        np.testing.assert_allclose(result.values[g]["background"], expected)
    row = next(r for r in result.rows if r["score"] == "background")
    assert row["auroc"] == pytest.approx(compute_metrics(result.values["A/test"]["background"],
                                                         result.values["B/test"]["background"])["auroc"])


def test_background_index_mismatch_is_an_error(tmp_path: Path):
    fg = write_score_file(tmp_path / "fg.h5", {"A/test": 10, "B/test": 10})
    bg = write_score_file(tmp_path / "bg.h5", {"A/test": 10, "B/test": 10}, index_offset=3)
    with pytest.raises(ScoreFileError, match=r"'A/test' indices do not match.*3 only in the foreground"):
        analyze(fg, "A:test", background=bg)
    bg2 = write_score_file(tmp_path / "bg2.h5", {"A/test": 10})
    with pytest.raises(ScoreFileError, match=r"lacks group\(s\) B/test"):
        analyze(fg, "A:test", background=bg2)


def test_tensorboard_gets_a_run_dir_tb_folder(score_file: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    (run_dir / "tb").mkdir(parents=True)
    analyze(score_file, "A:test", scores=["llr1"], tensorboard=run_dir)
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_to_dataframe_needs_pandas_or_says_so(score_file: Path):
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            to_dataframe(score_file)
    else:
        df = to_dataframe(score_file)
        assert len(df) == 40 + 30 + 50 + 35 and {"llr1", "lk2", "kl3"} <= set(df.columns)


# ------------------------------------------------------------------------------------------- complexity
def test_compressed_sizes_are_positive_method_specific_and_track_complexity():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    constant = np.full((2, 1, 28, 28), 128, dtype=np.uint8)
    x = np.concatenate([noise, constant])
    png, zl = compressed_size_nats(x, "png"), compressed_size_nats(x, "zlib")
    assert png.dtype == np.float64 and png.shape == (4,)
    assert (png > 0).all() and (zl > 0).all() and not np.allclose(png, zl)
    assert png[2] < png[0] and zl[2] < zl[0]
    assert zl[0] == pytest.approx(8 * math.log(2) * len(__import__("zlib").compress(noise[0].tobytes(), 9)))
    rgb = compressed_size_nats(rng.integers(0, 256, (1, 3, 8, 8), dtype=np.uint8), "png")
    assert rgb[0] >= 8 * 8 * 3 * 8 * math.log(2)     # 192 random bytes do not compress: at least 192 bytes, in nats
    with pytest.raises(TypeError):
        compressed_size_nats(x.astype(np.float32), "png")
    with pytest.raises(ValueError) as e:
        compressed_size_nats(x, "gzip")
    assert type(e.value) is ValueError


def test_no_figure_cuts_a_title_label_or_legend_of_long_dataset_names(tmp_path):
    """The issue 24 case: auroc_by_k's title was cut at "(dashed: -ELB"; long names are wrapped or laid out."""
    from test_visualize import _texts_inside_the_figure

    from helpers.analysis import write_score_file
    from hvae_dist.analysis.metrics import run_analysis
    from hvae_dist.analysis.plots import make_figures

    names = {"FashionMNIST-inverted/test": 60, "SmallNORB-28x28-grayscale/test": 50, "MNIST/test": 40}
    path = write_score_file(tmp_path / "s.h5", names, shifts={"MNIST/test": 1.0})
    figures = make_figures(run_analysis(path, "FashionMNIST-inverted:test"))
    assert {"auroc_by_k", "kl_layers", "hist_all", "roc_SmallNORB-28x28-grayscale_test"} <= set(figures)
    assert {name: problems for name, fig in figures.items() if (problems := _texts_inside_the_figure(fig))} == {}
