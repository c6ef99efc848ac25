"""`hvae analyze` on large score files (issue 22): metrics from one sort equal scikit-learn's, figures draw a
subsample while the metrics use every row, and only the datasets the chosen scores need are read."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from helpers.analysis import write_score_file
from hvae_dist.analysis import analyze, compute_metrics, metrics, run_analysis
from hvae_dist.score.reader import read_scores


def _sklearn(neg, pos) -> dict[str, float]:
    """The metrics as the previous release computed them, with scikit-learn (three sorts)."""
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    s = np.r_[neg, pos]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    first = int(np.argmax(np.rint(tpr * len(pos)) >= math.ceil(0.8 * len(pos) - 1e-9)))
    return {"auroc": roc_auc_score(y, s), "auprc": average_precision_score(y, s), "fpr80": fpr[first]}


@pytest.mark.parametrize("n_neg, n_pos, decimals", [(7, 5, 0), (1000, 300, 1), (200_000, 150_000, 2), (50, 80, 6)])
def test_metrics_from_one_sort_equal_scikit_learn_with_and_without_ties(n_neg, n_pos, decimals):
    rng = np.random.default_rng(n_neg)
    neg = np.round(rng.normal(0.0, 1.0, n_neg), decimals)          # rounded: many ties, across the classes too
    pos = np.round(rng.normal(0.7, 1.3, n_pos), decimals)
    got, want = compute_metrics(neg, pos), _sklearn(neg, pos)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert compute_metrics(pos, neg)["auroc"] == pytest.approx(1 - got["auroc"], abs=1e-12)


@pytest.fixture
def score_file(tmp_path):
    return write_score_file(tmp_path / "scores.h5", {"A/test": 300, "A/train": 200, "B/test": 250},
                            shifts={"B/test": 1.0})


def test_figures_draw_a_subsample_while_the_metrics_use_every_row(score_file, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "DRAW_ROWS", 60)
    result = run_analysis(score_file, "A:test")
    groups = read_scores(score_file).groups
    for g in ("A/test", "B/test"):
        assert {v.size for v in result.values[g].values()} == {60}
        assert result.groups[g]["kl"].shape == (60, 3) and result.groups[g]["elbo"].shape == (60,)
        rows = np.searchsorted(groups[g]["index"], result.groups[g]["index"])    # the drawn rows, in file order
        assert np.all(np.diff(rows) > 0)
        np.testing.assert_array_equal(result.groups[g]["elbo"], groups[g]["elbo"][rows])
        np.testing.assert_array_equal(result.values[g]["llr1"], groups[g]["llr"][rows, 0])
    row = next(r for r in result.rows if r["score"] == "llr2")
    assert (row["n_in"], row["n_ood"]) == (300, 250)
    assert row["auroc"] == compute_metrics(groups["A/test"]["llr"][:, 1], groups["B/test"]["llr"][:, 1])["auroc"]
    again = run_analysis(score_file, "A:test")                   # the same rows every time
    np.testing.assert_array_equal(again.groups["B/test"]["index"], result.groups["B/test"]["index"])
    written = analyze(score_file, "A:test", out_dir=tmp_path / "report")
    assert [r["auroc"] for r in written] == [r["auroc"] for r in result.rows]
    assert (tmp_path / "report" / "roc_B_test.png").stat().st_size > 0


def test_analyze_reads_only_the_datasets_its_scores_need(score_file, monkeypatch, tmp_path):
    asked = []

    def recording(path, fields=None):
        asked.append(fields)
        return read_scores(path, fields=fields)

    monkeypatch.setattr(metrics, "read_scores", recording)
    rows = analyze(score_file, "A:test", out_dir=tmp_path / "r", scores=["llr2"], plots=False)
    assert [r["score"] for r in rows] == ["llr2"]
    assert None not in asked                                     # never the whole file
    read = {g: set(f[g]) for f in asked for g in f}
    assert read == {"A/test": {"complete", "elbo", "llr"}, "B/test": {"complete", "elbo", "llr"}}, read
    asked.clear()
    run_analysis(score_file, "A:test", scores=["nll", "typicality"])        # figures: kl and llr too
    read = {g: set(f[g]) for f in asked for g in f}
    assert read == {"A/train": {"elbo"}, "A/test": {"complete", "elbo", "kl", "llr"},
                    "B/test": {"complete", "elbo", "kl", "llr"}}, read


def test_read_scores_with_fields_reads_those_and_index_and_lists_the_rest(score_file):
    full = read_scores(score_file)
    some = read_scores(score_file, fields={"B/test": ["llr", "no_such_dataset"]})
    assert some.attrs == full.attrs
    assert {k for k, v in some.groups["B/test"].items() if v is not None} == {"index", "llr"}
    assert set(some.groups["B/test"]) == set(full.groups["B/test"])                # the others listed as None
    np.testing.assert_array_equal(some.groups["B/test"]["llr"], full.groups["B/test"]["llr"])
    assert set(some.groups["A/test"]) == set(full.groups["A/test"]) and not any(some.groups["A/test"].values())
