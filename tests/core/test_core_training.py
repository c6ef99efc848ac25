"""The core learns: finite gradients of the paper's architectures on real images, and a short training
loop on real FashionMNIST that lowers the loss (model + objectives only, no engine)."""
from __future__ import annotations

import math
import time

import pytest
import torch

from helpers.models import preset_model_config
from hvae_dist.config import load_config
from hvae_dist.data import load_arrays, preprocess_batch
from hvae_dist.model import build_model
from hvae_dist.objectives import elbo_loss, free_nats_at, kl_warmup_beta


def _assert_finite_gradients(model: torch.nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"missing or non-finite gradients: {bad}"
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


@pytest.mark.parametrize("model_type", ["vae", "lvae", "biva"])
def test_fashionmnist_preset_gradients_are_finite_on_real_binarized_images(model_type):
    torch.manual_seed(0)
    cfg = load_config("fashionmnist", [f"model.type={model_type}"])
    images = torch.from_numpy(load_arrays("FashionMNIST", "train")[0][:8].copy())       # 8, 1, 28, 28 uint8
    x = preprocess_batch(images, cfg.data.binarize, torch.Generator().manual_seed(0))  # dynamic: {0, 1}
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    model = build_model(cfg.model, x.shape[1:])
    loss = elbo_loss(model(x), beta=kl_warmup_beta(10, 100), free_nats=cfg.train.free_nats)
    assert torch.isfinite(loss.loss)
    loss.loss.backward()
    _assert_finite_gradients(model)


@pytest.mark.parametrize("model_type", ["vae", "lvae", "biva"])
def test_cifar10_structure_gradients_are_finite_on_offline_cifar10_images_with_dmol(model_type):
    torch.manual_seed(0)
    images = torch.from_numpy(load_arrays("CIFAR10", "test")[0].copy())    # 20, 3, 32, 32 uint8 (offline sample)
    assert images.shape == (20, 3, 32, 32)
    x = preprocess_batch(images, "none")                                    # k / 255
    # The cifar10 preset's stages (kernels 5/3, strides, 128/64/32 latents, DMoL) with 16 channels, not 256.
    model = build_model(preset_model_config("cifar10", model_type, channels=16, input_shape=(3, 32, 32)))
    assert model.cfg.likelihood == "dmol"
    out = model(x)
    bpd = -out.elbo / (3 * 32 * 32 * math.log(2.0))
    assert torch.isfinite(bpd).all() and torch.all(bpd > 0)
    elbo_loss(out, beta=1.0, free_nats=2.0).loss.backward()
    _assert_finite_gradients(model)


def _train(cfg, images: torch.Tensor, steps: int, batch: int) -> tuple[list[float], list[float]]:
    """A plain loop: Adam, dynamic binarization, elbo_loss with the config's free nats and KL warm-up."""
    t = cfg.train
    model = build_model(cfg.model, images.shape[1:])
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    data_gen, order_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    losses, elbos, pos = [], [], len(images)
    for step in range(steps):
        if pos + batch > len(images):                       # a new epoch in a new order
            perm, pos = torch.randperm(len(images), generator=order_gen), 0
        idx, pos = perm[pos:pos + batch], pos + batch
        x = preprocess_batch(images[idx], cfg.data.binarize, data_gen)
        loss = elbo_loss(model(x), beta=kl_warmup_beta(step, t.kl_warmup_steps),
                         free_nats=free_nats_at(step, t.free_nats, t.free_nats_steps, t.free_nats_cooldown_steps))
        opt.zero_grad(set_to_none=True)
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        assert math.isfinite(loss.loss.item()), f"non-finite loss at step {step}"
        losses.append(loss.loss.item())
        elbos.append(loss.elbo.mean().item())
    return losses, elbos


def _first_last(values: list[float], n: int = 10) -> tuple[float, float]:
    return sum(values[:n]) / n, sum(values[-n:]) / n


def _fashionmnist_train_images(n: int) -> torch.Tensor:
    return torch.from_numpy(load_arrays("FashionMNIST", "train")[0][:n].copy())   # n, 1, 28, 28 uint8


@pytest.mark.slow
def test_tiny_preset_training_on_1k_real_fashionmnist_images_reduces_the_loss():
    """The tiny preset as shipped: 120 steps of batch 64 (about 22 GFLOP a step: 30-60 s on 2 cores)."""
    torch.manual_seed(0)
    cfg = load_config("tiny")
    start = time.time()
    losses, elbos = _train(cfg, _fashionmnist_train_images(1000), steps=120, batch=64)
    (first, last), (first_elbo, last_elbo) = _first_last(losses), _first_last(elbos)
    print(f"tiny: loss {first:.1f} -> {last:.1f}, ELBO {first_elbo:.1f} -> {last_elbo:.1f} nats, "
          f"{time.time() - start:.1f}s")
    assert last < 0.75 * first, (first, last)
    assert last_elbo > first_elbo + 100, (first_elbo, last_elbo)  # the true (beta = 1) bound improves too


def test_narrow_tiny_architecture_training_on_real_fashionmnist_reduces_the_loss():
    """The same loop, fast: the tiny preset's stages with 8 channels, 80 steps of batch 32."""
    torch.manual_seed(0)
    cfg = load_config("tiny")
    cfg.model = preset_model_config("tiny", channels=8)
    losses, elbos = _train(cfg, _fashionmnist_train_images(1000), steps=80, batch=32)
    (first, last), (first_elbo, last_elbo) = _first_last(losses), _first_last(elbos)
    print(f"narrow tiny: loss {first:.1f} -> {last:.1f}, ELBO {first_elbo:.1f} -> {last_elbo:.1f} nats")
    assert last < 0.8 * first, (first, last)
    assert last_elbo > first_elbo + 50, (first_elbo, last_elbo)
