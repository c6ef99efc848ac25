"""LID from the decoder Jacobian (hvae_dist.estimators.lid): known ranks, the spectrum of every way to it,
decode consistency for every model type, and the score file's LID fields under batching and sharding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers.models import preset_model_config, standard_noise
from helpers.score import build, make_run_dir, score_args, small_config
from hvae_dist.cli import build_parser
from hvae_dist.cli import main as hvae
from hvae_dist.errors import ConfigError
from hvae_dist.estimators.lid import (
    LidEstimator,
    LidSettings,
    decoder_mean,
    flat_decoder,
    full_jacobian,
    latent_point,
    lid_estimates,
)
from hvae_dist.model import build_model, lk_modes
from hvae_dist.score.cli import job_from_args
from hvae_dist.score.reader import read_scores


def _small_model():
    """small_config on 1x12x12 images with 4 channels: latents 2x6x6 + 4 + 2 = 78 dims, 144 pixels."""
    config = small_config(channels=4)
    config["model"]["input_shape"] = [1, 12, 12]
    return build(config)[0]


def _linear_map(d: int, big: int, rank: int, seed: int = 0) -> torch.Tensor:
    """A (D, d) matrix of rank `rank` whose nonzero singular values are 1 .. 2."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(big, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64)).Q
    return (u * torch.linspace(1.0, 2.0, rank, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_a_linear_decoder_of_rank_r_has_lid_r_at_small_scales(rank):
    a = _linear_map(d=16, big=30, rank=rank).float()
    g = lambda z: z @ a.T                                              # noqa: E731  (B, 16) -> (B, 30)
    z = torch.randn(3, 16)
    sv = torch.linalg.svdvals(full_jacobian(g, z, chunk=5).double())
    count, lin = lid_estimates(sv, [1e-3, 1e-2, 10.0])
    assert count[:, 0].tolist() == [rank] * 3 and count[:, 1].tolist() == [rank] * 3
    np.testing.assert_allclose(lin[:, 0].numpy(), rank, atol=1e-3)    # s >= 1 >> delta: each direction counts ~1
    assert (count[:, 2] == 0).all() and (lin[:, 2] < 0.05 * rank).all()  # delta >> s: nothing is stretched enough


def test_chunked_jacobian_equals_autograd_reference_for_every_model_type():
    for model_type in ("vae", "lvae", "biva"):
        torch.manual_seed(0)
        model = build_model(preset_model_config("tiny", model_type, channels=4, input_shape=(1, 12, 12))).eval()
        x = torch.bernoulli(torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)))
        for k in (0, 1):
            g, z = flat_decoder(model, latent_point(model, x, k), k)
            jac = full_jacobian(g, z, chunk=37)                           # B, D, d
            for b in range(2):
                ref = torch.autograd.functional.jacobian(lambda v, b=b, g=g: g(v[None])[0], z[b], vectorize=True)  # D, d
                torch.testing.assert_close(jac[b], ref, rtol=1e-4, atol=1e-5, msg=f"{model_type} k={k} b={b}")
            assert jac.shape[1:] == (144, z.shape[1])


def test_decode_of_the_forward_latents_gives_the_forward_likelihood_for_every_model_type():
    for model_type in ("vae", "lvae", "biva"):
        torch.manual_seed(0)
        model = build_model(preset_model_config("tiny", model_type, channels=4, input_shape=(1, 12, 12))).eval()
        x = torch.bernoulli(torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(2)))
        for k in range(model.num_layers):
            out = model(x, modes=lk_modes(k, model.num_layers), noise=standard_noise(model, 3, seed=k))
            torch.testing.assert_close(model.decode(out.zs, k), out.params, msg=f"{model_type} k={k}")
        with pytest.raises(ValueError, match="k=3"):
            model.decode(out.zs, model.num_layers)


def test_randomized_spectrum_matches_the_full_one_on_a_small_model():
    model = _small_model()
    x = torch.bernoulli(torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(3)))
    full = LidEstimator(model, LidSettings(ks=[0, 1])).singular_values(x, 0)           # B, min(D, d)
    errors = []
    for power_iters in (0, 1, 2):
        est = LidEstimator(model, LidSettings(ks=[0, 1], rank=8, oversample=20, power_iters=power_iters))
        top = est.singular_values(x, 0, "MNIST/test", torch.arange(3))
        assert (top <= full[:, :8] * (1 + 1e-6)).all()                 # a projection never stretches more
        errors.append(float((top / full[:, :8] - 1).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors   # subspace iteration converges
    # z>1 has 6 dims: the randomized spectrum at full rank is exact
    sub = LidEstimator(model, LidSettings(ks=[1])).singular_values(x, 1)
    est6 = LidEstimator(model, LidSettings(ks=[1], rank=6, oversample=0, power_iters=0))
    np.testing.assert_allclose(est6.singular_values(x, 1, "MNIST/test", torch.arange(3)).numpy(), sub.numpy(),
                               rtol=1e-5)


def test_lid_fields_do_not_depend_on_the_batch():
    model = _small_model()
    x = torch.bernoulli(torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(4)))
    for rank in (None, 4):
        est = LidEstimator(model, LidSettings(ks=[0, 2], rank=rank, chunk=7))
        whole = est.score_batch(x, torch.arange(5), "MNIST/test")
        parts = [est.score_batch(x[a:b], torch.arange(a, b), "MNIST/test") for a, b in ((0, 2), (2, 3), (3, 5))]
        for key in ("lid", "lid_lin"):
            assert whole[key].shape == (5, 2, 2)
            np.testing.assert_allclose(np.concatenate([p[key] for p in parts]), whole[key], rtol=1e-5, atol=1e-6)


def test_dmol_mean_is_the_mixture_expectation_and_differentiable():
    cfg = preset_model_config("tiny", "vae", channels=8, likelihood="dmol", input_shape=(3, 8, 8))
    model = build_model(cfg)
    params = torch.randn(2, model.likelihood.head.out_channels, 8, 8, requires_grad=True)
    mean = decoder_mean(model.likelihood, params)
    assert mean.shape == (2, 3, 8, 8)
    mean.sum().backward()
    assert params.grad.abs().sum() > 0
    one = torch.zeros(1, 10 * 10, 1, 1)       # 1 channel, 10 components: equal logits, means 0 .. 0.9
    one[0, 10:20, 0, 0] = torch.linspace(0, 0.9, 10)
    likelihood = build_model(preset_model_config("tiny", "vae", channels=8, likelihood="dmol",
                                                 input_shape=(1, 8, 8))).likelihood
    assert math.isclose(float(decoder_mean(likelihood, one[:, :40])), (0.45 + 1) / 2, rel_tol=1e-6)


def test_bad_lid_settings_are_refused_with_the_option_named():
    for settings, match in ((LidSettings(scales=[0.0]), "--lid-scales"), (LidSettings(scales=[0.1, 0.1]), "repeats"),
                            (LidSettings(ks=[3]), "--lid-ks"), (LidSettings(rank=0), "--lid-rank")):
        with pytest.raises(ConfigError, match=match):
            settings.resolved(3)
    assert LidSettings(scales=[0.1, 0.01], ks=[2, 0]).resolved(3).attrs()["scales"] == [0.01, 0.1]


# ------------------------------------------------------------------------------------- hvae score --lid
def test_score_lid_fields_equal_across_shards_and_batch_sizes_and_are_part_of_the_identity(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", small_config(channels=4))
    lid = ("--lid", "--lid-ks", "1", "2", "--lid-scales", "0.1", "0.001", "--iw-samples", "2")
    args = dict(samples=2, max_examples=4)
    assert hvae(score_args(run_dir, tmp_path / "one", *lid, "--batch-size", "4", **args)) == 0
    for i in range(2):
        assert hvae(score_args(run_dir, tmp_path / "two", *lid, "--batch-size", "1", "--lid-chunk", "1",
                               "--shard", str(i), "--num-shards", "2", **args)) == 0
    for out in ("one", "two"):
        assert hvae(["merge", str(tmp_path / out)]) == 0
    one, two = read_scores(tmp_path / "one" / "scores.h5"), read_scores(tmp_path / "two" / "scores.h5")
    assert one.attrs["lid"] == {"scales": [0.001, 0.1], "ks": [1, 2], "rank": None, "oversample": 10, "power_iters": 2}
    for g in ("FashionMNIST/test", "MNIST/test"):
        assert one.groups[g]["lid"].shape == (4, 2, 2) and one.groups[g]["lid_lin"].shape == (4, 2, 2)
        assert (one.groups[g]["lid"][:, 0, 0] <= 6).all() and (one.groups[g]["lid"][:, 1, 0] <= 2).all()  # <= d_k
        for key in ("lid", "lid_lin"):
            np.testing.assert_allclose(two.groups[g][key], one.groups[g][key], rtol=1e-5, atol=1e-6)
    # the same --out without --lid (or with other scales) is another job: refused, naming the attribute
    assert hvae(score_args(run_dir, tmp_path / "one", "--iw-samples", "2", "--batch-size", "4", **args)) == 2
    with pytest.raises(ConfigError, match="--lid-rank given without --lid"):
        job_from_args(build_parser().parse_args(score_args(run_dir, tmp_path / "x", "--lid-rank", "3")))


def test_submit_score_takes_the_lid_options_into_the_same_job():
    common = ["--run-dir", "r", "--out", "o", "--datasets", "MNIST:test", "--lid", "--lid-ks", "1", "--lid-scales",
              "0.5", "--lid-rank", "4", "--lid-chunk", "8"]
    direct = job_from_args(build_parser("score").parse_args(["score", *common]))
    submitted = job_from_args(build_parser("submit").parse_args(["submit", "score", "--num-shards", "2", *common]))
    assert direct == submitted and direct.lid == LidSettings(scales=[0.5], ks=[1], rank=4, chunk=8)
