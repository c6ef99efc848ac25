"""Bootstrap intervals of the detection metrics (hvae_dist.analysis.intervals): each replicate equals
compute_metrics on the resampled arrays, intervals contain the point estimate, shrink with n, and are
reproducible from the seed."""
from __future__ import annotations

import numpy as np
import pytest

from hvae_dist.analysis.intervals import bootstrap_metrics, draw_indices, replicate_metrics
from hvae_dist.errors import ConfigError
from hvae_dist.estimators.detection import METRICS, compute_metrics


def _sets(n: int, seed: int = 0, shift: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, n), rng.normal(shift, 1, n + 7)


def test_each_replicate_equals_compute_metrics_on_the_resample():
    neg, pos = _sets(60)
    neg = np.round(neg, 1)                      # ties, which replicates must handle as compute_metrics does
    pos = np.round(pos, 1)
    ni, pi = draw_indices(neg.size, pos.size, 25, seed=3)
    reps = replicate_metrics(neg, pos, ni, pi)
    for r in range(25):
        want = compute_metrics(neg[ni[r]], pos[pi[r]])
        for m in METRICS:
            assert reps[m][r] == pytest.approx(want[m], abs=1e-12), (m, r)


def test_block_size_does_not_change_replicates(monkeypatch):
    neg, pos = _sets(50)
    ni, pi = draw_indices(neg.size, pos.size, 30, seed=1)
    full = replicate_metrics(neg, pos, ni, pi)
    monkeypatch.setattr("hvae_dist.analysis.intervals.BLOCK_CELLS", 200)     # 1-2 replicates per block
    small = replicate_metrics(neg, pos, ni, pi)
    for m in METRICS:
        np.testing.assert_allclose(full[m], small[m], rtol=0, atol=1e-12)   # summation order only


def test_interval_contains_point_estimate_and_is_seed_reproducible():
    neg, pos = _sets(300)
    point = compute_metrics(neg, pos)
    ci = bootstrap_metrics(neg, pos, 500, seed=0)
    for m in METRICS:
        lo, hi = ci[m]
        assert lo <= point[m] <= hi, (m, lo, point[m], hi)
        assert lo < hi
    assert bootstrap_metrics(neg, pos, 500, seed=0) == ci
    assert bootstrap_metrics(neg, pos, 500, seed=1) != ci


def test_interval_shrinks_with_n():
    widths = []
    for n in (100, 400, 1600):
        neg, pos = _sets(n, seed=n)
        lo, hi = bootstrap_metrics(neg, pos, 400, seed=0)["auroc"]
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.35)           # ~ 1 / sqrt(n)


def test_bad_arguments_raise():
    neg, pos = _sets(10)
    with pytest.raises(ConfigError, match="--bootstrap"):
        bootstrap_metrics(neg, pos, 0)
    with pytest.raises(ConfigError, match="both classes"):
        bootstrap_metrics(neg, pos[:0], 10)


def test_analyze_writes_the_comparison_table_with_intervals(tmp_path):
    import json

    from helpers.analysis import write_score_file
    from hvae_dist.analysis import analyze

    f = write_score_file(tmp_path / "s.h5", {"FashionMNIST/test": 80, "MNIST/test": 90}, shifts={"MNIST/test": 1.0})
    rows = analyze(f, "FashionMNIST:test", out_dir=tmp_path / "out", plots=False, bootstrap=200, bootstrap_seed=5)
    again = analyze(f, "FashionMNIST:test", bootstrap=200, bootstrap_seed=5)
    assert rows == again                                              # seeded
    for r in rows:
        for m in METRICS:
            assert r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"]
    doc = json.loads((tmp_path / "out" / "comparison.json").read_text())
    llr1 = [x for x in doc["records"] if x["method"] == "llr1" and x["metric"] == "auroc"]
    assert llr1[0]["paper"] == 0.986 and llr1[0]["lo"] == next(r["auroc_lo"] for r in rows if r["score"] == "llr1")
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "## AUROC" in md and "(paper 0.986)" in md and "MNIST/test" in md
    assert (tmp_path / "out" / "comparison.csv").read_text().startswith("in_dist,ood,method")
    assert "<table" in (tmp_path / "out" / "comparison.html").read_text()


def test_the_cli_default_is_the_one_replicate_count():
    """`hvae analyze --bootstrap` keeps a literal default (its parser must not import numpy / torch); it is the
    count the demo, poster and ensemble analyses use (experiments.stages.analyze)."""
    import argparse

    from hvae_dist.analysis.cli import add_arguments
    from hvae_dist.analysis.intervals import REPLICATES

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.get_default("bootstrap") == REPLICATES
