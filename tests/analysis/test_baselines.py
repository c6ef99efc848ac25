"""The baselines in `hvae analyze` (hvae_dist.analysis.baselines): WAIC equals numpy on the stored bounds,
DoSE fits on the training split's rows only, the gradient scores and Likelihood Regret from their fields."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from helpers.analysis import write_score_file
from hvae_dist.analysis import analyze, run_analysis
from hvae_dist.analysis import baselines as bl
from hvae_dist.errors import ConfigError, ScoreFileError

GROUPS = {"A/test": 40, "A/train": 60, "B/test": 50}


def _file(path, seed=0, index_offset=0, add=True):
    f = write_score_file(path, GROUPS, seed=seed, shifts={"B/test": 1.0}, index_offset=index_offset)
    if add:
        rng = np.random.default_rng(seed + 100)
        with h5py.File(f, "a") as h:
            for g, n in GROUPS.items():
                shift = 1.0 if g == "B/test" else 0.0
                h[g]["likelihood_regret"] = rng.gamma(2.0 + 2 * shift, 1.0, n)
                h[g]["elbo_refit"] = h[g]["elbo"][()] + h[g]["likelihood_regret"][()]
                h[g]["grad_norm"] = rng.gamma(3.0 + 3 * shift, 1.0, (n, 4))
    return f


def test_waic_equals_numpy_over_the_ensemble(tmp_path):
    files = [_file(tmp_path / f"s{i}.h5", seed=i) for i in range(3)]
    with h5py.File(files[2], "a") as h:               # another row order: the join must follow `index`
        for g in GROUPS:
            order = np.random.default_rng(0).permutation(GROUPS[g])
            for k in list(h[g]):
                data = h[g][k][()]
                del h[g][k]
                h[g][k] = data[order]
    result = run_analysis(files[0], "A:test", scores=["waic"], ensemble=files[1:])
    for g in ("A/test", "B/test"):
        elbos = []
        for f in files:
            with h5py.File(f) as h:
                order = np.argsort(h[g]["index"][()])
                elbos.append(h[g]["elbo"][()][order])
        e = np.stack(elbos)
        np.testing.assert_allclose(result.values[g]["waic"], -(e.mean(0) - e.var(0)), rtol=1e-12)
    other = write_score_file(tmp_path / "other.h5", GROUPS, index_offset=5)
    with pytest.raises(ScoreFileError, match="other examples"):
        run_analysis(files[0], "A:test", scores=["waic"], ensemble=[other])


@pytest.mark.parametrize("method", ["kde", "svm"])
def test_dose_fits_on_training_rows_only(tmp_path, monkeypatch, method):
    f = _file(tmp_path / "s.h5")
    seen = []
    fit = bl.fit_dose
    monkeypatch.setattr(bl, "fit_dose", lambda m, train: seen.append(train) or fit(m, train))
    result = run_analysis(f, "A:test", dose=method, scores=[f"dose_{method}", "nll"])
    with h5py.File(f) as h:
        train = np.concatenate([h["A/train"]["elbo"][()][:, None], h["A/train"]["kl"][()], h["A/train"]["lk"][()],
                                h["A/train"]["llr"][()]], 1)
    assert len(seen) == 1 and np.array_equal(seen[0], train)           # NAME/train rows, nothing else
    row = next(r for r in result.rows if r["score"] == f"dose_{method}")
    assert row["n_in"] == 40 and row["n_ood"] == 50 and row["auroc"] > 0.6
    assert list(result.ood_groups) == ["B/test"]                  # the train split is never OOD
    no_train = write_score_file(tmp_path / "nt.h5", {"A/test": 10, "B/test": 10})
    with pytest.raises(ConfigError, match="A/train"):
        run_analysis(no_train, "A:test", dose=method)


def test_gradient_scores_and_likelihood_regret(tmp_path):
    f = _file(tmp_path / "s.h5")
    result = run_analysis(f, "A:test", scores=["gradients", "likelihood_regret"])
    assert [s.id for s in result.specs] == ["likelihood_regret", "gradnorm", "score_stat", "fisher"]
    with h5py.File(f) as h:
        train, test = h["A/train"]["grad_norm"][()], h["B/test"]["grad_norm"][()]
        regret = h["B/test"]["likelihood_regret"][()]
    v = result.values["B/test"]
    np.testing.assert_allclose(v["likelihood_regret"], regret)
    np.testing.assert_allclose(v["gradnorm"], np.sqrt((test ** 2).sum(1)))
    np.testing.assert_allclose(v["score_stat"], (test ** 2 / (train ** 2).mean(0)).sum(1))
    p = np.stack([(1 + (train[:, j][None, :] >= test[:, j][:, None]).sum(1)) / (1 + len(train)) for j in range(4)], 1)
    np.testing.assert_allclose(v["fisher"], -2 * np.log(p).sum(1))
    assert all(r["auroc"] > 0.6 for r in result.rows)                  # the shifted set scores higher


def test_comparison_holds_every_baseline_with_intervals(tmp_path):
    files = [_file(tmp_path / f"s{i}.h5", seed=i) for i in range(2)]
    rows = analyze(files[0], "A:test", out_dir=tmp_path / "out", plots=False, bootstrap=50, dose="kde",
                   ensemble=files[1:])
    ids = {r["score"] for r in rows}
    assert {"likelihood_regret", "gradnorm", "score_stat", "fisher", "dose_kde", "waic", "llr1"} <= ids
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "DoSE-KDE" in md and "-WAIC" in md and "Fisher" in md
