"""The pure-PyTorch DMoL reference: exact semantics against a brute-force float64 per-pixel computation,
finite gradients through every branch, sampling / mean, argument validation and implementation choice."""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import hvae_dist.kernels as kernels
import hvae_dist.kernels.constants as constants
import hvae_dist.kernels.reference as reference
from hvae_dist.kernels import dmol_log_prob, dmol_mean, dmol_num_params, dmol_reference, dmol_sample, dmol_split_params


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def _logsumexp(v: list[float]) -> float:
    mx = max(v)
    return mx + math.log(sum(math.exp(a - mx) for a in v))


def brute_force_log_prob(x: torch.Tensor, params: torch.Tensor, bits: int) -> list[float]:
    """PixelCNN++'s formula, one pixel, one component, one channel at a time, in float64 Python floats."""
    b_, c_, h_, w_ = x.shape
    m_ = params.shape[1] // (3 * c_ + 1)
    n = 2 ** bits - 1
    x, params = x.double().tolist(), params.double().tolist()
    out = []
    for b in range(b_):
        total = 0.0
        for i in range(h_):
            for j in range(w_):
                xv = [x[b][c][i][j] for c in range(c_)]
                xs = [2 * v - 1 for v in xv]
                prm = [params[b][k][i][j] for k in range(m_ * (3 * c_ + 1))]
                logits = prm[:m_]
                comps = []
                for m in range(m_):
                    mean = [prm[m_ + c * m_ + m] for c in range(c_)]
                    log_s = [max(prm[m_ + c_ * m_ + c * m_ + m], -7.0) for c in range(c_)]
                    coef = [math.tanh(prm[m_ + 2 * c_ * m_ + q * m_ + m]) for q in range(c_)]
                    mu = list(mean)
                    if c_ >= 2:
                        mu[1] += coef[0] * xs[0]
                    if c_ >= 3:
                        mu[2] += coef[1] * xs[0] + coef[2] * xs[1]
                    lp = 0.0
                    for c in range(c_):
                        inv_s = math.exp(-log_s[c])
                        centered = xs[c] - mu[c]
                        plus_in, min_in = inv_s * (centered + 1 / n), inv_s * (centered - 1 / n)
                        if round(xv[c] * n) == 0:
                            lp += _log_sigmoid(plus_in)
                        elif round(xv[c] * n) == n:
                            lp += _log_sigmoid(-min_in)
                        else:
                            delta = 1 / (1 + math.exp(-plus_in)) - 1 / (1 + math.exp(-min_in))
                            if delta > 1e-5:
                                lp += math.log(delta)
                            else:
                                mid = inv_s * centered
                                softplus = max(mid, 0) + math.log1p(math.exp(-abs(mid)))
                                lp += mid - log_s[c] - 2 * softplus - math.log(n / 2)
                    comps.append(lp + logits[m] - _logsumexp(logits))
                total += _logsumexp(comps)
        out.append(total)
    return out


def random_case(b: int, c: int, m: int, h: int, w: int, bits: int = 8, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random data with edge pixels (0 and 2^bits - 1) and params with log-scales at and below the clamp,
    tiny and huge scales (fallback branch) and large logits."""
    g = torch.Generator().manual_seed(seed)
    n = 2 ** bits - 1
    x = torch.randint(0, n + 1, (b, c, h, w), generator=g).to(dtype) / n
    x[:, :, 0, 0] = 0.0
    x[:, :, 0, 1] = 1.0
    if h * w > 2:
        x[:, 0, -1, -1] = 0.0
    params = torch.randn(b, dmol_num_params(c, m), h, w, generator=g, dtype=dtype)
    logits, means, log_scales, coeffs = dmol_split_params(params, c)
    means.mul_(0.7)
    log_scales.uniform_(-5.0, 0.5, generator=g)
    log_scales[:, :, 0, 0, 0] = -7.0                       # exactly at the clamp
    log_scales[:, :, 0, 0, 1] = -9.0                       # below the clamp
    if m > 1:
        log_scales[:, :, 1, 1, 0] = 9.0                    # huge scale: cdf_delta < 1e-5 -> fallback
        logits[:, 1, 0, 0] = 12.0                          # extreme-ish logit
    coeffs.mul_(2.0)
    return x, params


@pytest.mark.parametrize("c", [1, 2, 3])
@pytest.mark.parametrize("bits", [8, 5])
def test_reference_equals_brute_force_float64_per_pixel_mixture(c, bits):
    x, params = random_case(2, c, 3, 3, 4, bits=bits, seed=c + bits)
    expected = torch.tensor(brute_force_log_prob(x, params, bits), dtype=torch.float64)
    got = dmol_reference(x, params, bits)
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)
    got32 = dmol_reference(x.float(), params.float(), bits)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=2e-6, atol=1e-4)


def test_reference_sees_every_branch_on_the_test_case():
    """The random case above really exercises both edges, the clamp and the low-probability fallback."""
    x, params = random_case(1, 3, 3, 3, 4)
    logits, means, log_scales, coeffs = dmol_split_params(params, 3)
    assert (x == 0).any() and (x == 1).any()
    assert (log_scales < -7).any() and (log_scales == -7).any()
    # component 0 at pixel (1, 1) has a huge scale: the bin mass is far below the 1e-5 threshold
    hw = 1 / 255
    assert 2 * hw / (4 * math.exp(9.0)) < 1e-5


def test_reference_gradients_are_finite_where_edges_and_fallback_trigger():
    x, params = random_case(2, 3, 4, 4, 4, seed=3, dtype=torch.float32)
    logits, means, log_scales, coeffs = dmol_split_params(params, 3)
    means[:, :, 2] = 50.0       # far above every bin: lowest bin ~ 0 mass, interior cdf_delta == 0 in float32
    log_scales[:, :, 2] = -6.0
    p = params.clone().requires_grad_()
    lp = dmol_reference(x.float(), p)
    lp.sum().backward()
    assert torch.isfinite(lp).all()
    assert torch.isfinite(p.grad).all()


def test_reference_half_precision_params_compute_in_float32():
    x, params = random_case(2, 3, 3, 4, 4, dtype=torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        got = dmol_reference(x, params.to(dt))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, dmol_reference(x, params.to(dt).float()))


def test_split_params_layout_is_logits_then_means_log_scales_coeffs_channel_major():
    m, c = 2, 3
    params = torch.arange(dmol_num_params(c, m), dtype=torch.float32).view(1, -1, 1, 1)
    logits, means, log_scales, coeffs = dmol_split_params(params, c)
    assert logits.flatten().tolist() == [0, 1]
    assert means[0, :, :, 0, 0].tolist() == [[2, 3], [4, 5], [6, 7]]
    assert log_scales[0, :, :, 0, 0].tolist() == [[8, 9], [10, 11], [12, 13]]
    assert coeffs[0, :, :, 0, 0].tolist() == [[14, 15], [16, 17], [18, 19]]


def test_sample_and_mean_lie_on_the_data_grid_and_follow_a_sharp_distribution():
    b, c, m, h, w, bits = 2, 3, 4, 5, 6, 8
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 256, (b, c, h, w), generator=g).float() / 255
    params = torch.zeros(b, dmol_num_params(c, m), h, w)
    logits, means, log_scales, coeffs = dmol_split_params(params, c)
    logits[:, 2] = 30.0                                    # component 2 dominates
    means[:, :, 2] = target * 2 - 1
    log_scales.fill_(-7.0)                                 # sharp
    coeffs.fill_(0.0)
    sample, mean = dmol_sample(params, c, bits, generator=g), dmol_mean(params, c, bits)
    for out in (sample, mean):
        assert out.shape == (b, c, h, w) and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        torch.testing.assert_close(out * 255, torch.round(out * 255))
    torch.testing.assert_close(mean, target)
    # logistic noise of scale e^-7 leaves a bin with probability ~3%, and then only to the next bin
    assert (sample - target).abs().max() <= 1 / 255 + 1e-6
    assert (sample == target).float().mean() > 0.9


def test_sample_is_reproducible_with_a_generator_and_uses_the_coupling():
    x, params = random_case(2, 3, 3, 4, 4, dtype=torch.float32)
    a = dmol_sample(params, 3, generator=torch.Generator().manual_seed(5))
    b = dmol_sample(params, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    one = dmol_sample(params[:, :, :, :], 3, bits=4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(one * 15, torch.round(one * 15))


@pytest.mark.parametrize("bad, err, match", [
    (lambda x, p: (x, p[:, :-1]), ValueError, "multiple of 3C\\+1"),
    (lambda x, p: (x[:, :1].repeat(1, 4, 1, 1), torch.zeros(2, 13 * 2, 4, 4)), ValueError, "C must be 1, 2 or 3"),
    (lambda x, p: ((x * 255).long(), p), TypeError, "floating point"),
    (lambda x, p: (x, p.long()), TypeError, "params dtype"),
    (lambda x, p: (x[0], p), ValueError, "B, C, H, W"),
    (lambda x, p: (x[:1], p), ValueError, "does not match"),
])
def test_bad_arguments_raise_clear_errors(bad, err, match):
    x, params = random_case(2, 3, 2, 4, 4, dtype=torch.float32)
    xb, pb = bad(x, params)
    with pytest.raises(err, match=match):
        dmol_reference(xb, pb)
    with pytest.raises(err, match=match):
        dmol_log_prob(xb, pb)


@pytest.mark.parametrize("bits", [0, 17, 8.0])
def test_bad_bits_raise(bits):
    x, params = random_case(1, 1, 2, 2, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="bits"):
        dmol_log_prob(x, params, bits=bits)


def test_env_var_forces_the_reference(monkeypatch):
    monkeypatch.setenv("HVAE_DMOL", "reference")
    assert kernels.dmol_implementation("cpu") == "reference"
    monkeypatch.setenv("HVAE_DMOL", "bogus")
    with pytest.raises(ValueError, match="HVAE_DMOL"):
        kernels.dmol_implementation("cpu")


def test_build_failure_warns_once_and_falls_back_to_the_reference(monkeypatch):
    def broken(kind, verbose=False):
        raise RuntimeError("the fused DMoL cpu extension did not build: no compiler")

    monkeypatch.delenv("HVAE_DMOL", raising=False)
    monkeypatch.setattr(kernels, "load_extension", broken)
    monkeypatch.setattr(kernels, "_warned", set())
    x, params = random_case(2, 3, 2, 4, 4, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="reference DMoL"):
        got = dmol_log_prob(x, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dmol_log_prob(x, params)                          # no second warning
    torch.testing.assert_close(got, dmol_reference(x, params))
    monkeypatch.setenv("HVAE_DMOL", "fused")
    with pytest.raises(RuntimeError, match="did not build"):
        dmol_log_prob(x, params)


def test_dmol_constants_are_owned_by_the_header_the_kernel_includes():
    header = (constants.CSRC / "dmol_constants.h").read_text()
    in_header = {name: float(re.search(rf"^#define {name} (\S+)$", header, re.M)[1])
                 for name in ("DMOL_LOG_SCALE_MIN", "DMOL_CDF_DELTA_MIN")}
    assert in_header == {"DMOL_LOG_SCALE_MIN": -7.0, "DMOL_CDF_DELTA_MIN": 1e-5}
    assert (constants.LOG_SCALE_MIN, constants.CDF_DELTA_MIN) == (-7.0, 1e-5)
    assert (reference.LOG_SCALE_MIN, reference.CDF_DELTA_MIN) == (constants.LOG_SCALE_MIN, constants.CDF_DELTA_MIN)
    math_h = (constants.CSRC / "dmol_math.h").read_text()
    assert '#include "dmol_constants.h"' in math_h
    assert "T(DMOL_LOG_SCALE_MIN)" in math_h and "T(DMOL_CDF_DELTA_MIN)" in math_h
    assert not re.search(r"T\(-7|T\(1e-5", math_h)                 # no second copy in the kernel


def test_the_reference_reads_its_constants_from_the_shared_names(monkeypatch):
    x, params = random_case(2, 3, 3, 4, 4, seed=3)
    base = dmol_reference(x, params)
    # a higher floor equals clamping the log-scales by hand (none of them then falls below -7)
    monkeypatch.setattr(reference, "LOG_SCALE_MIN", 0.0)
    clamped = params.clone()
    dmol_split_params(clamped, 3)[2].clamp_(min=0.0)
    torch.testing.assert_close(dmol_reference(x, params), dmol_reference(x, clamped), rtol=0, atol=0)
    assert not torch.equal(dmol_reference(x, params), base)
    monkeypatch.setattr(reference, "LOG_SCALE_MIN", constants.LOG_SCALE_MIN)
    monkeypatch.setattr(reference, "CDF_DELTA_MIN", 2.0)           # every interior bin takes the fallback
    assert not torch.equal(dmol_reference(x, params), base)
    monkeypatch.setattr(reference, "CDF_DELTA_MIN", constants.CDF_DELTA_MIN)
    assert torch.equal(dmol_reference(x, params), base)


def test_a_missing_or_malformed_constant_fails_loudly():
    with pytest.raises(RuntimeError, match="#define DMOL_CDF_DELTA_MIN <number>"):
        constants.parse_define("#define DMOL_LOG_SCALE_MIN -7.0\n", "DMOL_CDF_DELTA_MIN")
    with pytest.raises(RuntimeError, match="not a plain number"):
        constants.parse_define("#define DMOL_CDF_DELTA_MIN (1e-5)\n", "DMOL_CDF_DELTA_MIN")
    assert constants.parse_define("  #define DMOL_X 1e-5  // why\n", "DMOL_X") == 1e-5
