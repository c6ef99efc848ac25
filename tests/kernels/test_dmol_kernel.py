"""The fused DMoL kernel (C++ / OpenMP here; its CUDA source is compile-checked with nvcc): float64
gradcheck through every branch, float32 / half-precision agreement with the reference at CIFAR shape,
the one-pass training gradient against the two-pass one, NaN propagation, and the autograd contract (grad
dtype, no M*C*H*W buffers besides the gradient). Tests taking `device` also run on CUDA where it exists."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from test_dmol_reference import random_case

import hvae_dist.kernels.reference as reference
from helpers.devices import DEVICES
from hvae_dist.kernels import dmol_implementation, dmol_log_prob, dmol_reference, dmol_split_params
from hvae_dist.kernels.fused import CSRC, HEADERS, dmol_fused, load_extension


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    try:
        load_extension("cpu")
    except RuntimeError as e:  # the build itself is what these tests check
        pytest.fail(f"the fused CPU kernel did not build: {e}")


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        try:
            load_extension("cuda")
        except RuntimeError as e:
            pytest.fail(f"the fused CUDA kernel did not build: {e}")
    return torch.device(request.param)


def cifar_case(b: int = 8, seed: int = 0, dtype=torch.float32, device="cpu"):
    """CIFAR shape (B, 3, 32, 32), M = 10, params of the magnitude a trained head produces."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, 32, 32), generator=g).to(dtype) / 255
    params = torch.randn(b, 100, 32, 32, generator=g, dtype=dtype)
    logits, means, log_scales, coeffs = dmol_split_params(params, 3)
    log_scales.mul_(1.5).sub_(2.5)
    logits.mul_(2.0)
    return x.to(device), params.to(device)


def test_default_implementation_on_cpu_is_the_fused_kernel(monkeypatch):
    monkeypatch.delenv("HVAE_DMOL", raising=False)
    assert dmol_implementation("cpu") == "fused"
    monkeypatch.setenv("HVAE_DMOL", "fused")
    x, params = cifar_case(2)
    torch.testing.assert_close(dmol_log_prob(x, params), dmol_fused(x, params))


@pytest.mark.parametrize("c", [1, 2, 3])
def test_fused_matches_reference_in_float64_on_every_branch(c, device):
    x, params = (t.to(device) for t in random_case(2, c, 3, 4, 5, seed=10 + c))
    torch.testing.assert_close(dmol_fused(x, params), dmol_reference(x, params), rtol=1e-10, atol=0)


@pytest.mark.parametrize("c", [1, 2, 3])
def test_fused_gradcheck_float64_with_edges_clamp_fallback_and_extreme_logits(c, device):
    x, params = random_case(2, c, 3, 3, 3, seed=20 + c)
    logits = dmol_split_params(params, c)[0]
    logits[:, 2, 2, 2] = -25.0
    logits[0, 0, 1, 2] = 40.0
    x, params = x.to(device), params.to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: dmol_fused(x, p), (params,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_fused_float32_matches_reference_at_cifar_shape(device):
    x, params = cifar_case(8, device=device)
    p_ref = params.clone().requires_grad_()
    p_fused = params.clone().requires_grad_()
    ref, fused = dmol_reference(x, p_ref), dmol_fused(x, p_fused)
    assert fused.dtype == torch.float32 and fused.shape == (8,)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
    w = torch.randn(8, generator=torch.Generator().manual_seed(1)).to(device)   # a non-uniform grad_output
    (ref * w).sum().backward()
    (fused * w).sum().backward()
    assert p_fused.grad.dtype == torch.float32
    # elementwise, with an absolute floor at 1e-4 of the largest gradient (entries near zero)
    torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-4 * p_ref.grad.abs().max().item())
    rel = (p_fused.grad - p_ref.grad).norm() / p_ref.grad.norm()
    assert rel < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_give_float32_results_of_the_upcast_params(dtype, device):
    x, params = cifar_case(2, device=device)
    ph = params.to(dtype).requires_grad_()
    pu = params.to(dtype).float().requires_grad_()
    fused, ref = dmol_fused(x, ph), dmol_reference(x, pu)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
    fused.sum().backward()
    ref.sum().backward()
    assert ph.grad.dtype == dtype
    torch.testing.assert_close(ph.grad.float(), pu.grad.to(dtype).float(), rtol=1e-2,
                               atol=1e-3 * pu.grad.abs().max().item())


def test_non_contiguous_params_and_bits_other_than_8():
    x, params = random_case(2, 3, 4, 6, 7, bits=5, dtype=torch.float32)
    cl = params.to(memory_format=torch.channels_last)
    torch.testing.assert_close(dmol_fused(x, cl, bits=5), dmol_reference(x, params, bits=5), rtol=1e-5, atol=1e-4)


def test_nan_params_give_nan_not_a_finite_number(device):
    x, params = cifar_case(2, device=device)
    params[1, 5, 3, 3] = float("nan")        # one logit of example 1
    params[0, 40, 7, 1] = float("nan")       # one log-scale of example 0
    out = dmol_fused(x, params)
    assert torch.isnan(out).all()
    assert torch.isnan(dmol_reference(x, params)).all()
    p = params.clone().requires_grad_()
    dmol_fused(x, p).sum().backward()        # the one-pass gradient propagates NaN too
    assert torch.isnan(p.grad[1]).any() and torch.isnan(p.grad[0]).any()


def test_forward_saves_per_pixel_values_and_at_most_the_gradient_for_backward(device):
    x, params = cifar_case(2, device=device)
    b, hw = 2, 32 * 32
    for p in (params.clone().requires_grad_(), params.to(torch.bfloat16).requires_grad_()):
        out = dmol_fused(x, p)
        sizes = sorted(t.numel() for t in out.grad_fn.saved_tensors)
        assert sizes == sorted([b * 3 * hw, p.numel(), b * hw])   # x, params (inputs) and per-pixel log p
    # float32: the one-pass gradient (params-sized) is the only other buffer held until backward
    assert out.grad_fn.unscaled is None
    held = dmol_fused(x, params.clone().requires_grad_()).grad_fn.unscaled
    assert held.shape == (b, 100, hw) and held.dtype == torch.float32
    with torch.no_grad():
        assert dmol_fused(x, params).grad_fn is None


def test_one_pass_gradient_equals_the_two_pass_gradient_and_repeats_exactly(device):
    """Training's forward computes the gradient with log p (forward_grad); the backward only scales it.
    It must agree with the two-pass backward (recompute per pixel) and a retained second backward."""
    x, params = cifar_case(4, seed=3, device=device)
    ext = load_extension(device.type)
    b, k, hw = params.shape[0], params.shape[1], 32 * 32
    xf, pf = x.reshape(b, 3, hw).contiguous(), params.reshape(b, k, hw).contiguous()
    lp_two = ext.forward(xf, pf, 10, 8)
    lp_one, unscaled = ext.forward_grad(xf, pf, 10, 8)
    torch.testing.assert_close(lp_one, lp_two, rtol=0, atol=0)        # the same per-pixel log p, bitwise
    g = torch.tensor([1.0, -0.25, 3.0, 0.0], device=device)
    two = ext.backward(xf, pf, lp_two, g, 10, 8)
    one = unscaled * g.view(-1, 1, 1)
    torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6 * two.abs().max().item())
    p = params.clone().requires_grad_()
    out = dmol_fused(x, p)
    first = torch.autograd.grad(out, p, g, retain_graph=True)[0]
    second = torch.autograd.grad(out, p, g)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, two.view_as(p), rtol=1e-6, atol=1e-6 * two.abs().max().item())


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_each_entry_point_validates_its_arguments_once(monkeypatch, impl):
    calls = []
    real = reference.check_dmol_args

    def counting(*args):
        calls.append(1)
        return real(*args)

    for module in ("hvae_dist.kernels", "hvae_dist.kernels.fused", "hvae_dist.kernels.reference"):
        monkeypatch.setattr(f"{module}.check_dmol_args", counting)
    checked = []                                    # _check_params: also called by dmol_split_params
    real_params = reference._check_params
    monkeypatch.setattr(reference, "_check_params", lambda *a: checked.append(1) or real_params(*a))
    monkeypatch.setenv("HVAE_DMOL", impl)
    x, params = random_case(2, 3, 2, 4, 4, dtype=torch.float32)
    for fn in (dmol_log_prob, dmol_fused if impl == "fused" else dmol_reference):
        calls.clear()
        checked.clear()
        fn(x, params)
        assert (len(calls), len(checked)) == (1, 1), fn.__name__


def test_the_drivers_share_one_binding_and_every_header_is_in_the_build_hash():
    assert sorted(HEADERS) == sorted(p.name for p in CSRC.glob("*.h"))
    sources = {p.name: p.read_text() for p in CSRC.iterdir()}
    assert [n for n, t in sources.items() if "PYBIND11_MODULE" in t] == ["dmol_binding.h"]
    assert [n for n, t in sources.items() if "AT_DISPATCH" in t] == ["dmol_binding.h"]
    for driver in ("dmol_cpu.cpp", "dmol_cuda.cu"):
        assert '#include "dmol_binding.h"' in sources[driver] and "TORCH_CHECK" not in sources[driver]


def _torch_include_dirs() -> list[str]:
    from torch.utils.cpp_extension import include_paths
    return include_paths()


@pytest.mark.cuda_build
def test_cuda_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA source cannot be compile-checked here")
    nvcc = str(Path(nvcc).resolve())
    # /usr/local/bin/nvcc may be a wrapper script: find the real toolkit from the exec line if so
    text = Path(nvcc).read_bytes()[:4096]
    if text.startswith(b"#!"):
        for tok in text.decode(errors="ignore").split():
            if tok.endswith("/bin/nvcc") and Path(tok).exists():
                nvcc = tok
    cuda_home = Path(nvcc).parent.parent
    site = Path(torch.__file__).parent.parent
    incs = _torch_include_dirs() + [str(CSRC), sysconfig.get_paths()["include"], str(cuda_home / "include")]
    incs += [str(p) for p in sorted(site.glob("nvidia/*/include"))]      # cuBLAS / cuSPARSE headers of the wheels
    cmd = [nvcc, "-std=c++20", "-c", str(CSRC / "dmol_cuda.cu"), "-o", str(tmp_path / "dmol_cuda.o"),
           "-gencode=arch=compute_90,code=sm_90", "-O3", "-Xcompiler", "-fPIC",
           "-DTORCH_EXTENSION_NAME=hvae_dmol_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
           "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    for inc in incs:
        cmd += ["-I", inc]
    env = dict(os.environ, CUDA_HOME=str(cuda_home), TORCH_CUDA_ARCH_LIST="9.0")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}"
    assert (tmp_path / "dmol_cuda.o").stat().st_size > 0
