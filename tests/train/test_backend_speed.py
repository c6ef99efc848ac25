"""The PyTorch backend's speed paths keep its results: channels_last (default on on a CPU, 16-bit on a GPU)
trains like NCHW up to float rounding, the fused-Adam update with the skip decision on the device equals
torch's Adam and skips like before (nothing changes, nothing is synced until read), a resume into the other
memory layout keeps the Adam moments aligned with their parameters, and torch.compile (slow) agrees with
eager. Tests taking `device` also run on CUDA where it exists."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers.devices import DEVICES
from helpers.models import preset_model_config, standard_noise
from hvae_dist.config import TrainConfig
from hvae_dist.distributed import World
from hvae_dist.model import build_model
from hvae_dist.objectives import elbo_loss
from hvae_dist.train.backends import StepResult
from hvae_dist.train.backends.single import SingleBackend, use_channels_last

BATCH = 4


def _model(channels: int = 8):
    torch.manual_seed(0)
    return build_model(preset_model_config("fashionmnist", channels=channels, input_shape=(1, 28, 28)))


def _data(step: int, model, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.bernoulli(torch.full((BATCH, 1, 28, 28), 0.3), generator=g)
    return x.to(device), [n.to(device) for n in standard_noise(model, BATCH, seed=200 + step)]


def _backend(model, device="cpu", **train) -> SingleBackend:
    return SingleBackend(copy.deepcopy(model), TrainConfig(**train), World(), torch.device(device))


def _step(backend: SingleBackend, step: int) -> tuple[float, StepResult]:
    x, noise = _data(step, backend.raw_model, backend.device)
    with backend.autocast():
        out = backend.forward_module(x, noise=noise)
    loss = elbo_loss(out, beta=1.0, free_nats=2.0).loss
    return float(loss.detach()), backend.step(loss)


def _effective_weights(model) -> dict[str, torch.Tensor]:
    """Every weight as the layers use it (weight norm applied) and every other parameter. (A raw v of a
    1x1 conv of 1 channel has an analytically zero gradient: its float noise, normalised by Adam, moves v
    along a direction w does not depend on.)"""
    out = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "parametrizations"):
                out[f"{name}.weight"] = mod.weight.detach().float().cpu()
        for name, p in model.named_parameters():
            if ".parametrizations." not in name:
                out[name] = p.detach().float().cpu()
    return out


def _assert_close_params(a, b, rtol=1e-4, atol=1e-5):
    wa, wb = _effective_weights(a), _effective_weights(b)
    assert sorted(wa) == sorted(wb)
    for n, v in wa.items():
        torch.testing.assert_close(wb[n], v, rtol=rtol, atol=atol, msg=n)


def test_channels_last_default_is_on_on_a_cpu_and_for_16_bit_precisions_on_a_gpu():
    precisions = ("fp32", "bf16", "fp16")
    assert [use_channels_last(TrainConfig(precision=p), "cpu") for p in precisions] == [True, True, True]
    assert [use_channels_last(TrainConfig(precision=p), "cuda") for p in precisions] == [False, True, True]
    assert use_channels_last(TrainConfig(precision="fp32", channels_last=True), "cuda")
    assert not use_channels_last(TrainConfig(precision="bf16", channels_last=False), "cpu")
    backend = _backend(_model(), precision="fp32")
    conv = backend.raw_model.encoders[0][1].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_training_matches_nchw_within_float_tolerance(device):
    model = _model()
    nchw, nhwc = _backend(model, device, channels_last=False), _backend(model, device, channels_last=True)
    for step in range(3):
        loss_a, res_a = _step(nchw, step)
        loss_b, res_b = _step(nhwc, step)
        assert math.isclose(loss_a, loss_b, rel_tol=1e-5), (step, loss_a, loss_b)
        assert math.isclose(res_a.grad_norm, res_b.grad_norm, rel_tol=1e-3)
    _assert_close_params(nchw.raw_model, nhwc.raw_model)
    # the checkpoint format is unchanged: an NHWC model's state_dict loads into a fresh NCHW model
    fresh = _model()
    fresh.load_state_dict(nhwc.raw_model.state_dict())
    _assert_close_params(nhwc.raw_model, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_the_update_equals_torch_adam_with_clipping(device):
    model = _model()
    backend = _backend(model, device, lr=1e-3, grad_clip=5.0)
    ref = copy.deepcopy(model).to(device)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)                 # torch's default (foreach) Adam
    for step in range(3):
        _step(backend, step)
        x, noise = _data(step, ref, device)
        elbo_loss(ref(x, noise=noise), beta=1.0, free_nats=2.0).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _assert_close_params(ref, backend.raw_model)


@pytest.mark.parametrize("device", DEVICES)
def test_an_over_threshold_update_is_decided_on_the_device_and_changes_nothing(device):
    backend = _backend(_model(), device, skip_threshold=1e-3)
    backend.cfg.skip_threshold = None
    _step(backend, 0)                                                   # one real update: Adam has state
    backend.cfg.skip_threshold = 1e-3
    before = copy.deepcopy(backend.raw_model.state_dict())
    opt_before = copy.deepcopy(backend.optimizer.state_dict())
    _, result = _step(backend, 1)
    assert torch.is_tensor(result._skipped) and result._skipped.device.type == torch.device(device).type
    assert result.skipped and math.isfinite(result.grad_norm) and result.grad_norm > 1e-3
    for k, v in backend.raw_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = backend.optimizer.state_dict()["state"]
    for i, st in opt_before["state"].items():
        for k, v in st.items():
            assert torch.equal(after[i][k], v), (i, k)


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_loss_is_skipped_and_the_next_update_applies(device):
    backend = _backend(_model(), device)
    x, noise = _data(0, backend.raw_model, backend.device)
    before = copy.deepcopy(backend.raw_model.state_dict())
    result = backend.step(elbo_loss(backend.forward_module(x, noise=noise), 1.0, 2.0).loss * float("nan"))
    assert result.skipped and math.isnan(result.grad_norm)
    assert all(torch.equal(v, before[k]) for k, v in backend.raw_model.state_dict().items())
    _, result = _step(backend, 1)
    assert not result.skipped
    assert not all(torch.equal(v, before[k]) for k, v in backend.raw_model.state_dict().items())


def test_resume_into_the_other_memory_layout_keeps_adam_moments_with_their_parameters():
    """Fused Adam walks parameters and moments as flat arrays: a moment left in a checkpoint's NCHW order
    beside an NHWC parameter would be applied to the wrong elements (checked: without the re-layout in
    SingleBackend.load_state_dict this test fails)."""
    model = _model()
    first = _backend(model, lr=1e-2, channels_last=False)
    for step in range(2):
        _step(first, step)
    state = {"model": copy.deepcopy(first.raw_model.state_dict()), **copy.deepcopy(first.state_dict())}
    for layout in (False, True):
        resumed = _backend(model, lr=1e-2, channels_last=layout)
        resumed.raw_model.load_state_dict(state["model"])
        resumed.load_state_dict(copy.deepcopy(state))    # loading shares the tensors it is given: copy
        _step(resumed, 2)
        if layout is False:
            reference = resumed
    _assert_close_params(reference.raw_model, resumed.raw_model)


def test_step_result_reads_device_tensors_only_when_asked():
    result = StepResult(grad_norm=torch.tensor(2.5), skipped=torch.tensor(False))
    assert result.grad_norm == 2.5 and result.skipped is False
    assert "grad_norm=2.5" in repr(result)
    assert StepResult(grad_norm=float("nan"), skipped=True).skipped is True


def test_bf16_channels_last_step_is_close_to_fp32():
    """The bf16 default (NHWC) trains the same model: its loss is the fp32 loss up to bf16 rounding."""
    model = _model()
    fp32, bf16 = _backend(model, precision="fp32"), _backend(model, precision="bf16")
    loss32, _ = _step(fp32, 0)
    loss16, res = _step(bf16, 0)
    assert not res.skipped and math.isclose(loss16, loss32, rel_tol=2e-2), (loss16, loss32)


@pytest.mark.slow
def test_compiled_forward_and_backward_match_eager():
    """train.compile (minutes to compile on 2 cores): the same losses and weights as eager."""
    model = _model(channels=4)
    eager, compiled = _backend(model), _backend(model, compile=True)
    for step in range(2):
        a, _ = _step(eager, step)
        b, _ = _step(compiled, step)
        assert math.isclose(a, b, rel_tol=1e-5), (step, a, b)
    _assert_close_params(eager.raw_model, compiled.raw_model)

