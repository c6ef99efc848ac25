"""The dual threshold of likelihood and LID (hvae_dist.analysis.dual_threshold) and its rows in hvae analyze."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from helpers.analysis import write_score_file
from hvae_dist.analysis import dual_threshold as dual
from hvae_dist.analysis.report import analyze
from hvae_dist.estimators.detection import compute_metrics

LID_ATTR = {"scales": [0.01, 0.1], "ks": [0, 1], "rank": None, "oversample": 10, "power_iters": 2}


def _add_lid(path, lids: dict[str, float], seed: int = 0):
    """lid / lid_lin fields (N, 2, 2) whose level is lids[group] (the paradox: OOD = lower LID)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "a") as f:
        f.attrs["lid"] = json.dumps(LID_ATTR)
        for name, level in lids.items():
            n = f[name]["index"].shape[0]
            lin = level + rng.normal(0, 2.0, (n, 2, 2))
            f[name]["lid_lin"] = lin
            f[name]["lid"] = np.round(lin)
    return path


def test_dual_threshold_catches_ood_that_likelihood_or_lid_alone_misses(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    in_nll, in_lid = rng.normal(100, 3, n), rng.normal(50, 2, n)
    # half the OOD set: likelier than in-dist but of low LID (the paradox); the other half: unlikely, normal LID
    ood_nll = np.r_[rng.normal(90, 3, n // 2), rng.normal(112, 3, n // 2)]
    ood_lid = np.r_[rng.normal(40, 2, n // 2), rng.normal(50, 2, n // 2)]
    ref = dual.standardiser(in_nll), dual.standardiser(in_lid)
    auroc = lambda a, b: compute_metrics(a, b)["auroc"]               # noqa: E731
    by_nll, by_lid = auroc(in_nll, ood_nll), auroc(-in_lid, -ood_lid)
    by_dual = auroc(dual.dual_score(in_nll, in_lid, *ref), dual.dual_score(ood_nll, ood_lid, *ref))
    assert by_nll < 0.6 and by_lid < 0.8 and by_dual > 0.97, (by_nll, by_lid, by_dual)
    env = dual.envelope_auroc(in_nll, in_lid, ood_nll, ood_lid)
    assert env >= max(by_nll, by_lid, by_dual) - 1e-9 and env <= 1.0   # the envelope bounds every fixed rule


def test_envelope_auroc_of_one_informative_axis_is_that_axis_auroc():
    rng = np.random.default_rng(1)
    in_nll, ood_nll = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    flat_in, flat_ood = np.full(300, 5.0), np.full(200, 5.0)          # LID carries nothing
    expected = compute_metrics(in_nll, ood_nll)["auroc"]
    assert dual.envelope_auroc(in_nll, flat_in, ood_nll, flat_ood) == pytest.approx(expected, abs=1e-12)
    assert dual.envelope_auroc(flat_in, -in_nll, flat_ood, -ood_nll, grid=1000) == pytest.approx(expected, abs=1e-12)
    assert dual.envelope_auroc(flat_in, -in_nll, flat_ood, -ood_nll) == pytest.approx(expected, abs=2e-3)  # 256 LID taus


def test_analyze_reports_lid_and_dual_rows_with_the_reference_split_and_the_scatter(tmp_path):
    path = write_score_file(tmp_path / "scores.h5", {"In/test": 150, "In/validation": 120, "Ood/test": 140},
                            shifts={"Ood/test": 1.0})              # OOD likelier than in-dist: -ELBO fails
    _add_lid(path, {"In/test": 60.0, "In/validation": 60.0, "Ood/test": 50.0})
    rows = analyze(path, "In:test", out_dir=tmp_path / "report")
    by = {r["score"]: r for r in rows}
    ids = {f"{fam}{k}@{d:g}" for fam in ("lid", "lidlin", "dual") for k in (0, 1) for d in (0.01, 0.1)}
    assert ids <= set(by)
    assert by["nll"]["auroc"] < 0.2 and by["lidlin0@0.01"]["auroc"] > 0.95 and by["dual0@0.01"]["auroc"] > 0.9
    assert by["dual0@0.01"]["reference"] == "In/validation"
    assert by["dual0@0.01"]["auroc_envelope"] >= by["dual0@0.01"]["auroc"] - 1e-9
    assert by["lid1@0.1"]["label"] == "-LID>1(0.1)"
    assert (tmp_path / "report" / "lid_scatter.png").stat().st_size > 0
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert any("auroc_envelope" in r for r in doc["rows"])
    only = analyze(path, "In:test", scores=["dual"])
    assert {r["score"] for r in only} == {f"dual{k}@{d:g}" for k in (0, 1) for d in (0.01, 0.1)}


def test_a_file_without_lid_fields_has_no_lid_scores(tmp_path):
    path = write_score_file(tmp_path / "scores.h5", {"In/test": 50, "Ood/test": 40})
    assert not [r for r in analyze(path, "In:test") if r["score"].startswith(("lid", "dual"))]
