"""hvae score: noise scheme, shard plan, exactness of the bounds, invariance to batching and sharding."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from helpers import faults
from helpers.score import build, exact_config, exact_log_px, make_run_dir, score_args, small_config
from hvae_dist.cli import main as hvae
from hvae_dist.errors import ConfigError
from hvae_dist.estimators import noise
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.score.plan import resolve_shard, shard_range
from hvae_dist.score.reader import read_scores

FIELDS = ("elbo", "elbo_1", "lk", "llr", "kl", "bpd")


# ------------------------------------------------------------------------------------------------ noise
def test_splitmix64_on_int64_tensors_matches_python_reference():
    rng = np.random.default_rng(0)
    words = [int(v) for v in rng.integers(0, 2 ** 63, 64, dtype=np.uint64)] + [0, 1, 2 ** 64 - 1, 2 ** 63]
    signed = torch.tensor([w - 2 ** 64 if w >= 2 ** 63 else w for w in words], dtype=torch.int64)
    got = [int(v) % 2 ** 64 for v in noise.mix64(signed).tolist()]
    assert got == [noise.mix64_int(w) for w in words]


def test_noise_depends_only_on_seed_dataset_index_bound_sample_and_element():
    shapes = [(2, 3, 3), (4,)]
    keys = noise.example_keys(7, "FashionMNIST/test", noise.bound_stream(1), torch.arange(5, 11))
    full = noise.normal_noise(keys, 0, 10, shapes)
    a, b = noise.normal_noise(keys, 0, 4, shapes), noise.normal_noise(keys, 4, 6, shapes)
    for i, shape in enumerate(shapes):   # sample chunks: same numbers whatever the split
        f = full[i].view(6, 10, *shape)
        assert torch.equal(f[:, :4], a[i].view(6, 4, *shape)) and torch.equal(f[:, 4:], b[i].view(6, 6, *shape))
    sub = noise.normal_noise(noise.example_keys(7, "FashionMNIST/test", 2, torch.tensor([8])), 0, 10, shapes)
    assert torch.equal(sub[0], full[0].view(6, 10, 2, 3, 3)[3])          # example 8 alone == example 8 in a batch
    only_top = noise.normal_noise(keys, 0, 10, shapes, layers=[1])
    assert only_top[0] is None and torch.equal(only_top[1], full[1])   # layer offsets are global
    for other in (noise.example_keys(8, "FashionMNIST/test", 2, torch.arange(5, 11)),
                  noise.example_keys(7, "MNIST/test", 2, torch.arange(5, 11)),
                  noise.example_keys(7, "FashionMNIST/test", 1, torch.arange(5, 11))):
        assert not torch.equal(noise.normal_noise(other, 0, 10, shapes)[0], full[0])
    z = noise.normal_noise(keys, 0, 4000, [(50,)])[0]
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01 and abs((z ** 4).mean().item() - 3) < 0.05
    u = noise.uniform_noise(keys, (1, 28, 28))
    assert u.shape == (6, 1, 28, 28) and 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


# ------------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("n", [0, 1, 7, 10, 101])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 8, 13])
def test_shard_plan_is_balanced_contiguous_and_covers_every_example_once(n, num_shards):
    ranges = [shard_range(n, i, num_shards) for i in range(num_shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))          # contiguous, no gap, no overlap
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


def test_shard_index_from_slurm_array_torchrun_or_flags():
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_shard(None, None, slurm) == (2, 4)                     # array ids 10..13 -> shards 0..3
    assert resolve_shard(None, None, {"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)
    assert resolve_shard(None, None, {}) == (0, 1)
    assert resolve_shard(3, 5, slurm) == (3, 5)
    with pytest.raises(ConfigError, match="outside"):
        resolve_shard(4, 4, {})
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_MIN"):
        resolve_shard(None, None, {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4"})


# -------------------------------------------------------------------------------------------- exactness
def _exact_model():
    """One dense 2-d latent on 1x4x4; posterior scales widened (q wider than p(z|x): finite weight variance)
    and the likelihood sharpened so that the 1-sample gap is large and S matters."""
    model, _ = build(exact_config(), seed=1)
    with torch.no_grad():
        model.latents[0].posterior.bias[2:] += 1.0
        model.likelihood.head.parametrizations.weight.original0.mul_(3.0)
    return model


def test_iw_bound_is_below_exact_log_px_and_tightens_with_samples():
    torch.set_num_threads(2)
    model = _exact_model()
    x = (torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.uint8) * 255
    exact = exact_log_px(model, (x > 127).float()).numpy()                   # 8, float64 grid integral
    gaps, elbo_1 = {}, None
    for S in (1, 10, 100, 1000):
        runs = []
        for seed in range(8):
            scorer = IWScorer(model, ScoreSettings(iw_samples=S, ks=[], seed=seed, binarize="static", sample_chunk=250))
            out = scorer.score_batch(x, torch.arange(8), "Exact/test")
            runs.append(out["elbo"])
            if S == 1000:
                elbo_1 = out["elbo_1"]
        gaps[S] = np.stack(runs) - exact                                        # seeds, 8
    means = {S: g.mean() for S, g in gaps.items()}
    assert means[1] < means[10] < means[100] < 0.02, means                     # tightens with S, from below
    assert means[1] < -1.0                                                      # S matters in this model
    assert abs(means[1000]) < 0.03, means                                        # and S=1000 is nearly exact
    assert np.abs(gaps[1000].mean(0)).max() < 0.1
    assert (elbo_1 < exact).all()                                               # the ELBO itself is a bound


def test_llr_for_k0_is_exactly_zero_and_kl_bpd_are_consistent():
    model, _ = build(small_config(), seed=0)
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = IWScorer(model, ScoreSettings(iw_samples=6, ks=[0, 1, 2], seed=3, binarize="dynamic",
                                        sample_chunk=4)).score_batch(x, torch.arange(3), "MNIST/test")
    assert np.array_equal(out["llr"][:, 0], np.zeros(3)) and np.array_equal(out["lk"][:, 0], out["elbo"])
    assert out["lk"].shape == (3, 3) and out["kl"].shape == (3, 3)
    np.testing.assert_allclose(out["bpd"], -out["elbo"] / (784 * math.log(2)))
    assert (out["elbo_1"] <= out["elbo"] + 1e-9).all()                           # Jensen on the same samples
    with pytest.raises(ConfigError, match="0..2"):
        IWScorer(model, ScoreSettings(ks=[3]))


def test_bf16_autocast_stays_close_to_fp32():
    model, _ = build(small_config(), seed=0)
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    common = dict(iw_samples=4, seed=0, binarize="dynamic", sample_chunk=4)
    a = IWScorer(model, ScoreSettings(**common)).score_batch(x, torch.arange(2), "MNIST/test")
    b = IWScorer(model, ScoreSettings(precision="bf16", **common)).score_batch(x, torch.arange(2), "MNIST/test")
    np.testing.assert_allclose(b["elbo"], a["elbo"], rtol=0.02)


# ------------------------------------------------------------------------------------- CLI, invariance
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


def _score(run_dir, out, *extra):
    assert hvae(score_args(run_dir, out, *extra)) == 0


def test_scores_are_invariant_to_batch_size_sample_chunk_and_shard_count(run_dir, tmp_path):
    _score(run_dir, tmp_path / "one", "--batch-size", "4", "--sample-chunk", "5")
    for i in range(3):
        _score(run_dir, tmp_path / "three", "--batch-size", "3", "--sample-chunk", "12", "--shard", str(i),
               "--num-shards", "3")
    _score(run_dir, tmp_path / "other", "--batch-size", "7", "--sample-chunk", "1")
    _score(run_dir, tmp_path / "auto")                        # the defaults: batch and chunk from the device
    _score(run_dir, tmp_path / "auto2", "--batch-size", "2", "--sample-chunk", "auto")
    for out in ("one", "three", "other", "auto", "auto2"):
        assert hvae(["merge", str(tmp_path / out)]) == 0
    ref = read_scores(tmp_path / "one" / "scores.h5")
    assert ref.attrs["ks"] == [1, 2] and ref.attrs["iw_samples"] == 12
    assert "sample_chunk" not in ref.attrs and "batch_size" not in ref.attrs   # not part of the scores' identity
    for out in ("three", "other", "auto", "auto2"):
        got = read_scores(tmp_path / out / "scores.h5")
        assert list(got.groups) == ["FashionMNIST/test", "MNIST/test"]
        for g, data in ref.groups.items():
            assert np.array_equal(got.groups[g]["index"], np.arange(7)) and np.array_equal(data["index"], np.arange(7))
            for key in FIELDS:
                np.testing.assert_allclose(got.groups[g][key], data[key], rtol=1e-5, atol=1e-4, err_msg=f"{out} {g} {key}")
    shard = read_scores(tmp_path / "three" / "shard-00001-of-00003.h5")
    assert shard.attrs["shard"] == 1 and shard.attrs["num_shards"] == 3
    assert shard.groups["MNIST/test"]["index"].tolist() == [2, 3] and shard.groups["MNIST/test"]["complete"].all()
    assert "complete" not in ref.groups["MNIST/test"] and "shard" not in ref.attrs


def test_rerun_of_a_finished_shard_computes_nothing_and_other_settings_are_refused(run_dir, tmp_path, capsys, monkeypatch):
    _score(run_dir, tmp_path, "--first", "3")
    trace = tmp_path / "trace.txt"
    faults.trace_scored_rows(monkeypatch, trace)
    _score(run_dir, tmp_path, "--first", "3", "--batch-size", "2")     # batch size may change
    assert not trace.exists()
    for extra, what in ((["--seed", "1"], "seed"), (["--iw-samples-lk", "5"], "iw_samples_lk"),
                        (["--ks", "1"], "ks"), (["--first", "4"], "dataset_sizes")):
        args = score_args(run_dir, tmp_path, *extra)
        if "--first" not in extra:
            args += ["--first", "3"]
        assert hvae(args) == 2
        err = capsys.readouterr().err
        assert "shard-00000-of-00001.h5" in err and what in err, err
    other = make_run_dir(tmp_path / "other_run", seed=5)
    assert hvae(score_args(other, tmp_path, "--first", "3")) == 2
    assert "another model" in capsys.readouterr().err


def test_complexity_scores_and_validation_errors(run_dir, tmp_path, capsys):
    _score(run_dir, tmp_path, "--complexity", "--max-examples", "2", "--ks", "all")
    s = read_scores(tmp_path / "shard-00000-of-00001.h5")
    assert s.attrs["complexity"] == ["png", "zlib"]
    assert (s.groups["MNIST/test"]["complexity_png"] > 0).all()
    assert hvae(score_args(run_dir, tmp_path / "x", "--ks", "5")) == 2
    assert "0..2" in capsys.readouterr().err
    assert hvae(score_args(run_dir, tmp_path / "x", datasets=("Nope:test",))) == 2
    assert "unknown dataset" in capsys.readouterr().err
