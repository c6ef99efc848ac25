"""Objectives: the streaming importance-weighted bound, the free-nats / warm-up schedules, the ELBO loss."""
from __future__ import annotations

import math

import pytest
import torch

from hvae_dist.model import ModelOutput
from hvae_dist.objectives import StreamingLogMeanExp, bits_per_dim, elbo_loss, free_nats_at, kl_warmup_beta


def _exact(w: torch.Tensor) -> torch.Tensor:
    w = w.double()
    return torch.logsumexp(w, dim=1) - math.log(w.shape[1])


# ------------------------------------------------------------------------------------ streaming bound
def iw_bound(log_weights: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """(B, S) log-weights -> (B,) logsumexp(w) - log S through StreamingLogMeanExp, `chunk` samples at a time."""
    red = StreamingLogMeanExp()
    step = chunk or log_weights.shape[1]
    for start in range(0, log_weights.shape[1], step):
        red.update(log_weights[:, start:start + step])
    return red.result()


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 50, 64, 1000])
def test_iw_bound_over_chunks_equals_logsumexp_minus_log_s(chunk):
    g = torch.Generator().manual_seed(0)
    # Log-weights of the scale of real ELBO samples: large negative, spread over tens of nats.
    w = -900.0 + 40.0 * torch.randn(6, 64, generator=g, dtype=torch.float64)
    got = iw_bound(w, chunk=chunk)
    assert got.dtype == torch.float64 and got.shape == (6,)
    torch.testing.assert_close(got, _exact(w), rtol=0, atol=1e-10)


def test_streaming_log_mean_exp_accepts_uneven_float32_chunks_and_computes_in_float64():
    g = torch.Generator().manual_seed(1)
    w = (-300.0 + 25.0 * torch.randn(4, 103, generator=g)).float()
    red = StreamingLogMeanExp()
    for start, stop in ((0, 1), (1, 40), (40, 41), (41, 103)):
        red.update(w[:, start:stop])
    torch.testing.assert_close(red.result(), _exact(w), rtol=0, atol=1e-10)
    torch.testing.assert_close(red.mean(), w.double().mean(1), rtol=0, atol=1e-10)
    assert red.count == 103


@pytest.mark.parametrize("chunk", [1, 2, 4, 8])
def test_iw_bound_handles_minus_inf_log_weights(chunk):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 8, generator=g, dtype=torch.float64) - 50
    w[0, 0] = -math.inf                  # one impossible sample
    w[1, :5] = -math.inf                 # -inf in the first chunks, finite later
    w[2, 3:] = -math.inf                 # finite first, -inf later
    w[3, :] = -math.inf                  # every sample impossible: the bound is -inf, not NaN
    got = iw_bound(w, chunk=chunk)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got[:3], _exact(w)[:3], rtol=0, atol=1e-10)
    assert got[3] == -math.inf


def test_streaming_log_mean_exp_without_samples_raises():
    with pytest.raises(ValueError):
        StreamingLogMeanExp().result()


def test_iw_bound_of_equal_weights_is_that_weight_and_never_below_the_mean():
    w = torch.full((2, 10), -123.25, dtype=torch.float64)
    torch.testing.assert_close(iw_bound(w, chunk=3), w[:, 0])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 20, generator=g, dtype=torch.float64) * 5
    assert torch.all(iw_bound(w) >= w.mean(1))  # Jensen: the IW bound is at least the mean ELBO


# ------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("step, warmup, beta", [
    (0, 0, 1.0), (10**6, 0, 1.0),
    (0, 100, 0.0), (25, 100, 0.25), (50, 100, 0.5), (100, 100, 1.0), (250, 100, 1.0),
])
def test_kl_warmup_beta_is_linear_from_zero_to_one(step, warmup, beta):
    assert kl_warmup_beta(step, warmup) == pytest.approx(beta)


@pytest.mark.parametrize("step, constant, cooldown, budget", [
    (0, 0, 0, 2.0), (10**7, 0, 0, 2.0),                        # both 0: constant budget forever
    (0, 1000, 1000, 2.0), (999, 1000, 1000, 2.0),               # full budget for `constant` steps
    (1000, 1000, 1000, 2.0), (1500, 1000, 1000, 1.0), (1750, 1000, 1000, 0.5),   # linear decay
    (2000, 1000, 1000, 0.0), (5000, 1000, 1000, 0.0),           # then none
    (0, 0, 100, 2.0), (50, 0, 100, 1.0), (100, 0, 100, 0.0),    # decay from the start
    (10, 20, 0, 2.0), (20, 20, 0, 0.0),                         # no cooldown: drops to 0
])
def test_free_nats_schedule_gives_documented_values(step, constant, cooldown, budget):
    assert free_nats_at(step, 2.0, constant, cooldown) == pytest.approx(budget)


def test_bits_per_dim_converts_nats():
    d = 3 * 32 * 32
    nats = torch.tensor([d * math.log(2.0) * 3.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(nats, d), torch.tensor([3.5, 0.0], dtype=torch.float64))
    # a uniform model of 8-bit data costs exactly 8 bits/dim
    assert bits_per_dim(torch.tensor(d * math.log(256.0)), d).item() == pytest.approx(8.0)


# ------------------------------------------------------------------------------------------- ELBO loss
def _output(kl_dims: list[torch.Tensor], log_px: torch.Tensor) -> ModelOutput:
    kl = torch.stack([k.sum(1) for k in kl_dims], dim=1)
    return ModelOutput(log_px=log_px, kl=kl, kl_dims=kl_dims, posterior_means=[], params=torch.zeros(0))


def test_elbo_loss_without_free_nats_is_the_negative_mean_elbo():
    g = torch.Generator().manual_seed(0)
    kl_dims = [torch.rand(4, 6, generator=g), torch.rand(4, 3, generator=g)]
    out = _output(kl_dims, -100 * torch.rand(4, generator=g))
    loss = elbo_loss(out)
    torch.testing.assert_close(loss.loss, -out.elbo.mean())
    torch.testing.assert_close(loss.elbo, out.log_px - out.kl.sum(1))
    # beta scales the KL only
    half = elbo_loss(out, beta=0.5)
    torch.testing.assert_close(half.loss, -out.log_px.mean() + 0.5 * out.kl.sum(1).mean())
    torch.testing.assert_close(half.elbo, loss.elbo)  # the reported ELBO is the beta = 1 bound


def test_free_nats_give_zero_gradient_to_dims_below_the_budget_and_full_gradient_above():
    batch, free_nats, beta = 4, 2.0, 0.5
    # layer 0: 4 dims, budget 0.5 nats per dim; dims 0, 1 below it, dims 2, 3 above
    per_dim0 = torch.tensor([0.1, 0.4, 0.6, 3.0])
    # layer 1: 2 dims, budget 1.0 per dim, both below: the whole layer is inside its budget
    per_dim1 = torch.tensor([0.2, 0.9])
    kl0 = per_dim0.repeat(batch, 1).requires_grad_()
    kl1 = per_dim1.repeat(batch, 1).requires_grad_()
    log_px = torch.full((batch,), -50.0, requires_grad=True)
    out = _output([kl0, kl1], log_px)
    loss = elbo_loss(out, beta=beta, free_nats=free_nats)
    expected = 50.0 + beta * (0.5 + 0.5 + 0.6 + 3.0 + 1.0 + 1.0)
    torch.testing.assert_close(loss.loss, torch.tensor(expected))
    loss.loss.backward()
    assert torch.all(kl1.grad == 0), "a layer below its budget must get no KL gradient"
    assert torch.all(kl0.grad[:, :2] == 0)
    torch.testing.assert_close(kl0.grad[:, 2:], torch.full((batch, 2), beta / batch))
    torch.testing.assert_close(log_px.grad, torch.full((batch,), -1.0 / batch))
    # the reported ELBO is never clamped
    torch.testing.assert_close(loss.elbo, log_px.detach() - (per_dim0.sum() + per_dim1.sum()))


def test_free_nats_compare_the_batch_mean_kl_of_each_dim_with_the_budget():
    # per-example KL straddles the budget (0.5 per dim) but its batch mean is below: no gradient
    kl = torch.tensor([[0.9], [0.0]]).requires_grad_()
    out = _output([kl], torch.zeros(2))
    elbo_loss(out, free_nats=0.5).loss.backward()
    assert torch.all(kl.grad == 0)


def test_elbo_loss_trains_a_real_model_output_with_free_nats():
    """The loss accepts a model's output and backpropagates to its parameters."""
    from helpers.models import preset_model_config
    from hvae_dist.model import build_model

    torch.manual_seed(0)
    model = build_model(preset_model_config("tiny", channels=8, input_shape=(1, 28, 28)))
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))
    loss = elbo_loss(model(x), beta=0.3, free_nats=2.0)
    loss.loss.backward()
    assert torch.isfinite(loss.loss)
    assert loss.kl.shape == (2, model.num_layers) and loss.elbo.shape == (2,)
