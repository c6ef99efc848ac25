"""`hvae score --likelihood-regret --gradients`: the documented fields and attributes, sharded equals unsharded,
the stored regret is elbo_refit - elbo, and a resume with other refit settings is refused."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.score import make_run_dir, score_args
from hvae_dist.cli import main as hvae
from hvae_dist.score.baseline_fields import FIELDS
from hvae_dist.score.reader import read_scores

BASELINES = ("--likelihood-regret", "--lr-steps", "2", "--gradients", "--grad-samples", "2")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


def test_sharded_equals_unsharded_and_fields_are_documented(run_dir, tmp_path):
    args = dict(samples=4, max_examples=5)
    assert hvae(score_args(run_dir, tmp_path / "one", *BASELINES, "--batch-size", "5", **args)) == 0
    for i in range(2):
        assert hvae(score_args(run_dir, tmp_path / "two", *BASELINES, "--batch-size", "2", "--shard", str(i),
                               "--num-shards", "2", **args)) == 0
    for out in ("one", "two"):
        assert hvae(["merge", str(tmp_path / out)]) == 0
    one, two = read_scores(tmp_path / "one" / "scores.h5"), read_scores(tmp_path / "two" / "scores.h5")
    assert one.attrs["likelihood_regret"]["steps"] == 2 and one.attrs["likelihood_regret"]["lr"] == 2e-4
    layers = one.attrs["gradients"]["layers"]
    assert one.attrs["gradients"]["samples"] == 2 and len(layers) > 5
    for g, data in one.groups.items():
        assert set(FIELDS) <= set(data)
        assert data["grad_norm"].shape == (5, len(layers)) and (data["grad_norm"] > 0).any()
        np.testing.assert_allclose(data["likelihood_regret"], data["elbo_refit"] - data["elbo"], rtol=0, atol=1e-9)
        for key in FIELDS:
            np.testing.assert_allclose(two.groups[g][key], data[key], rtol=1e-4, atol=1e-3, err_msg=f"{g} {key}")
    pytest.importorskip("pandas")
    from hvae_dist.score.reader import to_dataframe

    df = to_dataframe(tmp_path / "one" / "scores.h5")   # the (N, G) grad_norm: one column per layer, by name
    for g, data in one.groups.items():
        rows = df[df["group"] == g].sort_values("index")
        for j, layer in enumerate(layers):
            np.testing.assert_array_equal(rows[f"grad_norm_{layer}"].to_numpy(), data["grad_norm"][:, j])
        np.testing.assert_array_equal(rows["likelihood_regret"].to_numpy(), data["likelihood_regret"])


def test_resume_with_other_refit_steps_is_refused(run_dir, tmp_path, capsys):
    args = dict(samples=2, max_examples=2)
    assert hvae(score_args(run_dir, tmp_path, "--likelihood-regret", "--lr-steps", "1", **args)) == 0
    assert hvae(score_args(run_dir, tmp_path, "--likelihood-regret", "--lr-steps", "3", **args)) == 2
    assert "likelihood_regret" in capsys.readouterr().err
    assert hvae(score_args(run_dir, tmp_path / "bad", "--likelihood-regret", "--lr-steps", "-1", **args)) == 2
    assert "--lr-steps" in capsys.readouterr().err
