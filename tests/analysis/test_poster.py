"""`hvae poster`: the whole chain on a tiny budget; the table holds the paper's rows with ours beside them,
sets that do not resolve are named, and a re-run recomputes nothing."""
from __future__ import annotations

import json

import pytest

from hvae_dist.cli import main as hvae
from hvae_dist.experiments.poster import PAPER, ood_candidates


def test_candidates_cover_the_papers_rows_and_the_self_row():
    fm = ood_candidates("FashionMNIST")
    assert "MNIST" in fm and "Omniglot-28x28-inverted" in fm and "FashionMNIST-28x28" in fm and "FashionMNIST" not in fm
    assert len([k for k in PAPER if k[0] == "MNIST"]) == 8


@pytest.mark.slow
def test_poster_runs_end_to_end_and_resumes_without_recomputing(tmp_path, capsys):
    small = ["--set", "data.max_train_examples=256", "--set", "train.batch_size=32", "--set", "train.eval_every=0"]
    args = ["poster", "--out", str(tmp_path), "--minutes", "0.05", "--iw-samples", "2", "--max-examples", "12", *small]
    assert hvae(args) == 0
    doc = json.loads((tmp_path / "poster.json").read_text())
    rows = {(r["trained_on"], r["ood_paper"]): r for r in doc["rows"]}
    assert rows[("FashionMNIST", "MNIST")]["paper_auroc"] == 0.986
    assert 0 <= rows[("FashionMNIST", "MNIST")]["ours_auroc_llr"] <= 1
    assert rows[("MNIST", "MNIST")]["ood_ours"] == "MNIST-28x28" and rows[("MNIST", "MNIST")]["ours_auroc_llr"] is not None
    not_here = rows[("FashionMNIST", "notMNIST")]
    assert not_here["ours_auroc_llr"] is None and "not scored" in not_here["note"]
    assert any(r["ood_ours"] == "UniformNoise" for r in doc["rows"])      # extra rows: "—" for the paper
    assert (tmp_path / "poster.md").read_text().count("| FashionMNIST |") >= 8
    capsys.readouterr()
    assert hvae(args) == 0
    assert capsys.readouterr().out.count("[done before]") == 8          # 4 stages x 2 models, nothing rerun
