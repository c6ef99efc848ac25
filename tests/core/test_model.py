"""HierarchicalVAE and the Gaussian layers: KL estimates, decode modes, precompute/repeat, shapes, images.

Both stage types (vae, lvae) and both paper architectures (the fashionmnist preset's stages on (1, 28, 28)
with Bernoulli; the cifar10 preset's stages on (3, 32, 32) with DMoL) are checked, with the channel
counts shrunk (structure kept: blocks, kernel sizes, strides, latent layers) so the tests run on a CPU.
Without the DMoL kernels the cifar10 structure still runs with a Gaussian likelihood.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers.models import preset_model_config, standard_noise
from hvae_dist.model import PRIOR_MODE, SAMPLE, build_model, lk_modes
from hvae_dist.nn import DiagonalGaussian

ARCHS = {
    # id: (preset, likelihood, input shape)
    "fashionmnist-bernoulli": ("fashionmnist", "bernoulli", (1, 28, 28)),
    "cifar10-gaussian": ("cifar10", "gaussian", (3, 32, 32)),
    "cifar10-dmol": ("cifar10", "dmol", (3, 32, 32)),
}
CASES = [pytest.param(a, t, id=f"{a}-{t}") for a in ARCHS for t in ("vae", "lvae", "biva")]
BATCH = 3


def _model(arch: str, model_type: str, channels: int = 8):
    preset, likelihood, shape = ARCHS[arch]
    torch.manual_seed(0)
    cfg = preset_model_config(preset, model_type, channels=channels, likelihood=likelihood, input_shape=shape)
    return build_model(cfg).eval()


def _data(arch: str, batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    _, likelihood, shape = ARCHS[arch]
    g = torch.Generator().manual_seed(seed)
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.full((batch, *shape), 0.3), generator=g)
    return torch.randint(0, 256, (batch, *shape), generator=g).float() / 255.0  # 8-bit values k / 255


# ----------------------------------------------------------------------------------------------- DiagonalGaussian
def _analytic_kl(mq, sq, mp, sp):
    return torch.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp ** 2) - 0.5


def test_single_sample_gaussian_kl_estimate_averages_to_the_analytic_kl():
    g = torch.Generator().manual_seed(0)
    dims, n = 6, 200_000
    q = DiagonalGaussian(torch.randn(dims, generator=g, dtype=torch.float64),
                 torch.rand(dims, generator=g, dtype=torch.float64) + 0.3)
    p = DiagonalGaussian(torch.randn(dims, generator=g, dtype=torch.float64),
                 torch.rand(dims, generator=g, dtype=torch.float64) + 0.5)
    z = q.rsample(torch.randn(n, dims, generator=g, dtype=torch.float64))   # n, D
    est = q.log_prob(z) - p.log_prob(z)                                      # n, D
    assert est.dtype == torch.float64
    exact = _analytic_kl(q.loc, q.scale, p.loc, p.scale)
    stderr = est.std(0) / math.sqrt(n)
    assert torch.all((est.mean(0) - exact).abs() < 5 * stderr), (est.mean(0), exact)
    assert torch.all(exact > 0)


def test_gaussian_log_prob_matches_torch_normal_in_float64():
    g = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.1
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    expected = torch.distributions.Normal(loc, scale).log_prob(z)
    torch.testing.assert_close(DiagonalGaussian(loc, scale).log_prob(z), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(DiagonalGaussian.standard_log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- modes
def test_lk_modes_truth_table():
    assert lk_modes(0, 3) == [SAMPLE] * 3
    assert lk_modes(2, 3) == [PRIOR_MODE, PRIOR_MODE, SAMPLE]
    assert lk_modes(3, 3) == [PRIOR_MODE] * 3
    for k in (-1, 4):
        with pytest.raises(ValueError, match=str(k)):
            lk_modes(k, 3)


@pytest.mark.parametrize("arch, model_type", CASES)
def test_k0_forward_equals_default_elbo_forward_for_the_same_noise_bitwise(arch, model_type):
    model, x = _model(arch, model_type), _data(arch)
    noise = standard_noise(model, BATCH, seed=2)
    with torch.no_grad():
        a = model(x, noise=noise)
        b = model(x, modes=lk_modes(0, model.num_layers), noise=noise)
        c = model(x, noise=noise)
    for out in (b, c):
        assert torch.equal(a.log_px, out.log_px)
        assert torch.equal(a.kl, out.kl)
        assert torch.equal(a.params, out.params)
    d = model(x, noise=standard_noise(model, BATCH, seed=3))  # other noise, other pass
    assert not torch.equal(a.kl, d.kl)


@pytest.mark.parametrize("arch, model_type", CASES)
def test_prior_mode_layers_have_exactly_zero_kl_and_sampled_layers_do_not(arch, model_type):
    model, x = _model(arch, model_type), _data(arch)
    num_layers = model.num_layers
    noise = standard_noise(model, BATCH, seed=2)
    with torch.no_grad():
        for k in range(num_layers + 1):
            out = model(x, modes=lk_modes(k, num_layers), noise=noise)
            assert torch.all(out.kl[:, :k] == 0), f"k={k}: layers <= k must count no KL"
            assert torch.all(out.kl[:, k:] != 0), f"k={k}: sampled layers must count their KL"
            for i in range(num_layers):
                assert torch.equal(out.kl_dims[i].sum(1), out.kl[:, i])
            assert torch.isfinite(out.log_px).all() and torch.isfinite(out.elbo).all()


@pytest.mark.parametrize("arch, model_type", CASES)
def test_prior_mode_forward_ignores_the_noise_of_its_layers(arch, model_type):
    """L>k uses the conditional-prior mode for layers <= k: their noise entries must not matter."""
    model, x = _model(arch, model_type), _data(arch)
    noise = standard_noise(model, BATCH, seed=2)
    other = list(noise)
    other[0] = torch.randn_like(noise[0]) * 10
    modes = lk_modes(1, model.num_layers)
    with torch.no_grad():
        a, b = model(x, modes=modes, noise=noise), model(x, modes=modes, noise=other)
    assert torch.equal(a.log_px, b.log_px) and torch.equal(a.kl, b.kl)


@pytest.mark.parametrize("arch, model_type", CASES)
def test_precompute_repeat_then_forward_equals_forward_on_repeated_input(arch, model_type):
    model, x = _model(arch, model_type), _data(arch)
    n = 4
    with torch.no_grad():
        for k in (0, 1, model.num_layers):
            modes = lk_modes(k, model.num_layers)
            noise = standard_noise(model, BATCH * n, seed=5 + k)
            pre = model.precompute(x, modes).repeat(n)
            a = model(modes=modes, noise=noise, precomputed=pre)
            b = model(x.repeat_interleave(n, dim=0), modes=modes, noise=noise)   # row b*n + s
            torch.testing.assert_close(a.log_px, b.log_px, rtol=1e-5, atol=1e-3)
            torch.testing.assert_close(a.kl, b.kl, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("arch, model_type", CASES)
def test_forward_output_shapes(arch, model_type):
    model, x = _model(arch, model_type), _data(arch)
    num_layers = model.num_layers
    with torch.no_grad():
        out = model(x)
    assert out.log_px.shape == (BATCH,) and out.log_px.dtype == torch.float32
    assert out.kl.shape == (BATCH, num_layers) and out.kl.dtype == torch.float32
    assert out.elbo.shape == (BATCH,)
    assert len(out.kl_dims) == len(out.posterior_means) == num_layers
    for i, shape in enumerate(model.latent_shapes):
        assert out.kl_dims[i].shape == (BATCH, math.prod(shape))
        assert out.posterior_means[i].shape == (BATCH, math.prod(shape))
    assert out.params.shape[0] == BATCH and out.params.shape[2:] == x.shape[2:]
    assert torch.all(out.log_px <= 0) or ARCHS[arch][1] == "gaussian"  # densities of discrete data are <= 1


@pytest.mark.parametrize("arch, model_type", CASES)
def test_sample_prior_and_reconstruct_give_images_in_unit_interval(arch, model_type):
    model, x = _model(arch, model_type), _data(arch)
    shape = ARCHS[arch][2]
    samples = model.sample_prior(5, generator=torch.Generator().manual_seed(0))
    recon = model.reconstruct(x)
    for img, n in ((samples, 5), (recon, BATCH)):
        assert img.shape == (n, *shape)
        assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    drawn = model.sample_prior(2, generator=torch.Generator().manual_seed(0), mean_image=False)
    assert drawn.shape == (2, *shape) and drawn.min() >= 0 and drawn.max() <= 1


@pytest.mark.parametrize("model_type", ["vae", "lvae", "biva"])
def test_every_parameter_gets_a_gradient_from_the_elbo(model_type):
    """DDP (without find_unused_parameters) fails when a parameter gets no gradient."""
    model, x = _model("fashionmnist-bernoulli", model_type), _data("fashionmnist-bernoulli")
    model.train()
    (-model(x).elbo.mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters unused by the forward pass: {missing}"


@pytest.mark.parametrize("model_type", ["vae", "lvae", "biva"])
def test_every_hierarchy_is_the_one_model_type_and_implements_all_of_it(model_type):
    from hvae_dist.model import HierarchicalModel, Model

    model = _model("fashionmnist-bernoulli", model_type)
    assert Model is HierarchicalModel and isinstance(model, HierarchicalModel) and model.type == model_type
    interface = ("num_layers", "latent_shapes", "precompute", "forward", "sample_prior", "reconstruct")
    inherited = [name for name in interface if getattr(type(model), name) is getattr(HierarchicalModel, name)]
    assert not inherited, f"{type(model).__name__} does not implement {inherited}"
    assert len(model.latent_shapes) == model.num_layers and tuple(model.input_shape) == (1, 28, 28)


def test_the_distribution_and_the_likelihood_head_have_distinct_names():
    from hvae_dist.nn import likelihoods, stochastic

    assert not hasattr(stochastic, "Gaussian") and not hasattr(likelihoods, "Gaussian")
    cfg = preset_model_config("fashionmnist", "vae", channels=8, likelihood="gaussian", input_shape=(1, 28, 28))
    assert type(build_model(cfg).likelihood) is likelihoods.GaussianLikelihood


def test_model_without_input_shape_raises_value_error():
    cfg = preset_model_config("tiny")              # a caller's bug, not the user's: not a ConfigError
    with pytest.raises(ValueError, match="input_shape") as e:
        build_model(cfg)
    assert type(e.value) is ValueError


def test_wrong_number_of_modes_raises():
    model, x = _model("fashionmnist-bernoulli", "vae"), _data("fashionmnist-bernoulli")
    with pytest.raises(ValueError, match="modes"):
        model(x, modes=[SAMPLE])
