"""The fused DMoL kernel (C++ / OpenMP here; its CUDA source is compile-checked with nvcc): float64
gradcheck through every branch, float32 / half-precision agreement with the reference at CIFAR shape,
NaN propagation, and the autograd contract (grad dtype, no M*C*H*W buffers)."""
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
from hvae_dist.kernels import dmol_implementation, dmol_log_prob, dmol_reference, dmol_split_params
from hvae_dist.kernels.fused import CSRC, HEADERS, dmol_fused, load_extension


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    try:
        load_extension("cpu")
    except RuntimeError as e:  # the build itself is what these tests check
        pytest.fail(f"the fused CPU kernel did not build: {e}")


def cifar_case(b: int = 8, seed: int = 0, dtype=torch.float32):
    """CIFAR shape (B, 3, 32, 32), M = 10, params of the magnitude a trained head produces."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, 32, 32), generator=g).to(dtype) / 255
    params = torch.randn(b, 100, 32, 32, generator=g, dtype=dtype)
    logits, means, log_scales, coeffs = dmol_split_params(params, 3)
    log_scales.mul_(1.5).sub_(2.5)
    logits.mul_(2.0)
    return x, params


def test_default_implementation_on_cpu_is_the_fused_kernel(monkeypatch):
    monkeypatch.delenv("HVAE_DMOL", raising=False)
    assert dmol_implementation("cpu") == "fused"
    monkeypatch.setenv("HVAE_DMOL", "fused")
    x, params = cifar_case(2)
    torch.testing.assert_close(dmol_log_prob(x, params), dmol_fused(x, params))


@pytest.mark.parametrize("c", [1, 2, 3])
def test_fused_matches_reference_in_float64_on_every_branch(c):
    x, params = random_case(2, c, 3, 4, 5, seed=10 + c)
    torch.testing.assert_close(dmol_fused(x, params), dmol_reference(x, params), rtol=1e-10, atol=0)


@pytest.mark.parametrize("c", [1, 2, 3])
def test_fused_gradcheck_float64_with_edges_clamp_fallback_and_extreme_logits(c):
    x, params = random_case(2, c, 3, 3, 3, seed=20 + c)
    logits = dmol_split_params(params, c)[0]
    logits[:, 2, 2, 2] = -25.0
    logits[0, 0, 1, 2] = 40.0
    params.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: dmol_fused(x, p), (params,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_fused_float32_matches_reference_at_cifar_shape():
    x, params = cifar_case(8)
    p_ref = params.clone().requires_grad_()
    p_fused = params.clone().requires_grad_()
    ref, fused = dmol_reference(x, p_ref), dmol_fused(x, p_fused)
    assert fused.dtype == torch.float32 and fused.shape == (8,)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
    w = torch.randn(8, generator=torch.Generator().manual_seed(1))        # a non-uniform grad_output
    (ref * w).sum().backward()
    (fused * w).sum().backward()
    assert p_fused.grad.dtype == torch.float32
    # elementwise, with an absolute floor at 1e-4 of the largest gradient (entries near zero)
    torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-4 * p_ref.grad.abs().max().item())
    rel = (p_fused.grad - p_ref.grad).norm() / p_ref.grad.norm()
    assert rel < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_give_float32_results_of_the_upcast_params(dtype):
    x, params = cifar_case(2)
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


def test_nan_params_give_nan_not_a_finite_number():
    x, params = cifar_case(2)
    params[1, 5, 3, 3] = float("nan")        # one logit of example 1
    params[0, 40, 7, 1] = float("nan")       # one log-scale of example 0
    out = dmol_fused(x, params)
    assert torch.isnan(out).all()
    assert torch.isnan(dmol_reference(x, params)).all()


def test_forward_saves_only_per_pixel_values_for_backward():
    x, params = cifar_case(2)
    p = params.clone().requires_grad_()
    out = dmol_fused(x, p)
    saved = list(out.grad_fn.saved_tensors)
    sizes = sorted(t.numel() for t in saved)
    b, hw = 2, 32 * 32
    assert sizes == sorted([b * 3 * hw, p.numel(), b * hw])   # x, params (inputs) and per-pixel log p
    with torch.no_grad():
        assert dmol_fused(x, params).grad_fn is None


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
