"""The speed-related layer changes do not change results: our weight norm is torch's (values, gradients,
state_dict keys), a channels_last model stays NHWC from layer to layer and computes what the NCHW model
computes, and a training forward computes each weight norm once."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

from helpers.models import preset_model_config, standard_noise
from hvae_dist.model import build_model
from hvae_dist.nn.layers import WeightNorm, conv2d, dense
from hvae_dist.objectives import elbo_loss


def _fashionmnist_model(channels: int = 8):
    torch.manual_seed(0)
    return build_model(preset_model_config("fashionmnist", channels=channels, input_shape=(1, 28, 28)))


def _batch(n: int = 4) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1))


def test_weight_norm_equals_torch_weight_norm_bitwise_with_the_same_state_dict():
    for ours, ref in ((conv2d(3, 5, 3), nn.Conv2d(3, 5, 3, padding=1)), (dense(6, 4), nn.Linear(6, 4))):
        ref = torch_weight_norm(ref)
        assert sorted(ours.state_dict()) == sorted(ref.state_dict())   # checkpoints load either way
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(2, *((3, 7, 7) if isinstance(ours, nn.Conv2d) else (6,)))
        a, b = ours(x), ref(x)
        assert torch.equal(a, b)
        a.square().sum().backward()
        b.square().sum().backward()
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            assert torch.equal(p.grad, q.grad), n


def test_weight_norm_keeps_the_memory_layout_of_v():
    layer = conv2d(8, 16, 5).to(memory_format=torch.channels_last)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    ref = conv2d(8, 16, 5)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer.weight, ref.weight, rtol=0, atol=0)


def _conv_output_layouts(model, x, noise) -> dict[str, bool]:
    """{conv name: output is NHWC} over one forward, for the convs with more than one output channel whose
    weight has a layout at all (a 1x1 conv of a 1-channel input has the same strides either way)."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.out_channels > 1 and mod.in_channels * mod.kernel_size[0] > 1:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, o.is_contiguous(memory_format=torch.channels_last))))
    model(x, noise=noise)
    for h in hooks:
        h.remove()
    return seen


def test_channels_last_model_stays_nhwc_and_matches_the_nchw_model():
    model = _fashionmnist_model()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = _batch()
    noise = standard_noise(model, 4, seed=2)
    layouts = _conv_output_layouts(cl, x, noise)
    assert layouts and all(layouts.values()), [n for n, ok in layouts.items() if not ok]
    assert not any(_conv_output_layouts(model, x, noise).values())     # the check can fail: NCHW stays NCHW
    losses = []
    for m in (model, cl):
        loss = elbo_loss(m(x, noise=noise), beta=1.0, free_nats=2.0).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-4)
    for (n, p), (_, q) in zip(model.named_parameters(), cl.named_parameters()):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4 * max(scale, 1.0), msg=n)


def test_a_training_forward_computes_each_weight_norm_once(monkeypatch):
    """No weight norm is recomputed within a forward + backward (so parametrize.cached() gains nothing in
    training; the scorer, which runs many forwards per batch, uses it)."""
    model = _fashionmnist_model()
    calls = []
    real = WeightNorm.forward
    monkeypatch.setattr(WeightNorm, "forward", lambda self, g, v: calls.append(1) or real(self, g, v))
    normed = sum(1 for m in model.modules() if isinstance(m, WeightNorm))
    elbo_loss(model(_batch(), noise=standard_noise(model, 4, seed=2)), beta=1.0, free_nats=2.0).loss.backward()
    assert normed > 40 and len(calls) == normed
