// CPU (OpenMP) driver of the fused DMoL likelihood. The math lives in dmol_math.h.
//
// Work split: OpenMP threads take (example, block of pixels) units; inside a unit, one
// `#pragma omp simd` loop runs one pixel per SIMD lane over contiguous H*W positions, so every
// parameter read / gradient write is a contiguous vector load / store of the NCHW tensor.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "dmol_math.h"

namespace {

using namespace hvae_dmol;

constexpr int64_t kBlock = 128;  // pixels per work unit: the per-pixel state of a block stays in L1

// One pixel's step, as a function: arrays declared directly in an `omp simd` body become per-lane "simd
// arrays" that defeat gcc's vectorizer; locals of an inlined callee are scalarized instead.
template <int C, typename P, typename T>
inline __attribute__((always_inline)) void accumulate_step(const T (*xs)[kBlock], int64_t i, const P* pb,
                                                           int64_t HW, const Layout& L, int m, const Bins<T>& bins,
                                                           T* a_mx, T* a_s, T* j_mx, T* j_s) {
  T xv[C];
  DMOL_UNROLL for (int c = 0; c < C; ++c) xv[c] = xs[c][i];
  Lse<T> la{a_mx[i], a_s[i]}, lj{j_mx[i], j_s[i]};
  component_accumulate<C, T, P>(pb + i, HW, L, m, xv, bins, la, lj);
  a_mx[i] = la.mx, a_s[i] = la.s, j_mx[i] = lj.mx, j_s[i] = lj.s;
}

template <int C, typename P, typename T>
inline __attribute__((always_inline)) void grad_step(const T (*xs)[kBlock], int64_t i, const P* pb, int64_t HW,
                                                     const Layout& L, int m, const Bins<T>& bins, const T* lse_a,
                                                     const T* lb, T g, P* gb) {
  T xv[C];
  DMOL_UNROLL for (int c = 0; c < C; ++c) xv[c] = xs[c][i];
  component_grad<C, T, P, P>(pb + i, HW, L, m, xv, bins, lse_a[i], lb[i], g, gb + i);
}

// Loops are interchanged with respect to the GPU's one-thread-per-pixel: components outside, pixels
// inside, so that the SIMD loop body is straight-line code (gcc cannot vectorize an outer pixel loop
// around several inner component loops). Per-pixel state lives in small stack arrays.

// One work unit (example b, pixels [p0, p0 + n)). The loop bodies must see the layout and bin constants
// as locals: through references (a capturing lambda) or struct parameters gcc 12 does not vectorize them
// (checked with -fopt-info-vec).
template <int C, typename P, typename T>
void forward_block(const T* xb, const P* pb, T* ob, int64_t n, int64_t HW, const Layout L_, const Bins<T> bins_) {
  const Layout L = L_;  // local copies: gcc does not vectorize the loops below over by-value struct params
  const Bins<T> bins = bins_;
  alignas(64) T xs[C][kBlock];
  alignas(64) T a_mx[kBlock], a_s[kBlock], j_mx[kBlock], j_s[kBlock];
  for (int c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xs[c][i] = xb[c * HW + i] * T(2) - T(1);
  }
  for (int m = 0; m < L.M; ++m) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) accumulate_step<C, P, T>(xs, i, pb, HW, L, m, bins, a_mx, a_s, j_mx, j_s);
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Lse<T> la{a_mx[i], a_s[i]}, lj{j_mx[i], j_s[i]};
    ob[i] = lj.value() - la.value();
  }
}

template <int C, typename P, typename T>
void backward_block(const T* xb, const P* pb, const T* lb, T g, P* gb, int64_t n, int64_t HW, const Layout L_,
                    const Bins<T> bins_) {
  const Layout L = L_;
  const Bins<T> bins = bins_;
  alignas(64) T xs[C][kBlock];
  alignas(64) T a_mx[kBlock], a_s[kBlock], lse_a[kBlock];
  for (int c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xs[c][i] = xb[c * HW + i] * T(2) - T(1);
  }
  // logsumexp of the logits, then one pass over the components writing their gradients.
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a_mx[i] = static_cast<T>(pb[i]), a_s[i] = T(1);
  for (int m = 1; m < L.M; ++m) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      Lse<T> la{a_mx[i], a_s[i]};
      la.add(static_cast<T>(pb[m * HW + i]));
      a_mx[i] = la.mx, a_s[i] = la.s;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) lse_a[i] = Lse<T>{a_mx[i], a_s[i]}.value();
  for (int m = 0; m < L.M; ++m) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) grad_step<C, P, T>(xs, i, pb, HW, L, m, bins, lse_a, lb, g, gb);
  }
}

template <int C, typename P, typename T>
void forward_impl(const T* x, const P* params, T* out, int64_t B, int64_t K, int64_t HW, int M, int bits) {
  const Layout L = make_layout(M, C);
  const Bins<T> bins = make_bins<T>(bits);
  const int64_t nblk = (HW + kBlock - 1) / kBlock;
  at::parallel_for(0, B * nblk, 1, [=](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / nblk, p0 = (u % nblk) * kBlock, n = std::min(HW - p0, kBlock);
      forward_block<C, P, T>(x + b * C * HW + p0, params + b * K * HW + p0, out + b * HW + p0, n, HW, L, bins);
    }
  });
}

template <int C, typename P, typename T>
void backward_impl(const T* x, const P* params, const T* lp, const T* gout_b, P* grad, int64_t B, int64_t K,
                   int64_t HW, int M, int bits) {
  const Layout L = make_layout(M, C);
  const Bins<T> bins = make_bins<T>(bits);
  const int64_t nblk = (HW + kBlock - 1) / kBlock;
  at::parallel_for(0, B * nblk, 1, [=](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / nblk, p0 = (u % nblk) * kBlock, n = std::min(HW - p0, kBlock);
      backward_block<C, P, T>(x + b * C * HW + p0, params + b * K * HW + p0, lp + b * HW + p0, gout_b[b],
                              grad + b * K * HW + p0, n, HW, L, bins);
    }
  });
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& params, int64_t M) {
  TORCH_CHECK(x.device().is_cpu() && params.device().is_cpu(), "dmol cpu: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && params.dim() == 3, "dmol cpu: expected x (B, C, HW) and params (B, K, HW)");
  TORCH_CHECK(x.is_contiguous() && params.is_contiguous(), "dmol cpu: inputs must be contiguous");
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1 && C <= 3, "dmol cpu: C must be 1, 2 or 3");
  TORCH_CHECK(params.size(1) == M * (3 * C + 1), "dmol cpu: params has ", params.size(1), " channels, expected ",
              M * (3 * C + 1));
  TORCH_CHECK(x.size(0) == params.size(0) && x.size(2) == params.size(2), "dmol cpu: x / params shape mismatch");
  TORCH_CHECK(x.scalar_type() == at::toOpMathType(params.scalar_type()),
              "dmol cpu: x must have the compute dtype of params");
}

// x: (B, C, HW) in [0, 1], compute dtype; params: (B, K, HW). Returns per-pixel log p, (B, HW), compute dtype.
torch::Tensor dmol_forward(const torch::Tensor& x, const torch::Tensor& params, int64_t M, int64_t bits) {
  check_inputs(x, params, M);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2), K = params.size(1);
  auto out = torch::empty({B, HW}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dmol_forward_cpu", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    DMOL_DISPATCH_C(C, [&] {
      forward_impl<kC, P, T>(x.data_ptr<T>(), params.data_ptr<P>(), out.data_ptr<T>(), B, K, HW,
                             static_cast<int>(M), static_cast<int>(bits));
    });
  });
  return out;
}

// lp: (B, HW) from dmol_forward; grad_out: (B,), compute dtype. Returns grad wrt params (params' dtype).
torch::Tensor dmol_backward(const torch::Tensor& x, const torch::Tensor& params, const torch::Tensor& lp,
                            const torch::Tensor& grad_out, int64_t M, int64_t bits) {
  check_inputs(x, params, M);
  TORCH_CHECK(lp.is_contiguous() && grad_out.is_contiguous(), "dmol cpu: lp / grad_out must be contiguous");
  TORCH_CHECK(lp.scalar_type() == x.scalar_type() && grad_out.scalar_type() == x.scalar_type(),
              "dmol cpu: lp / grad_out dtype");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2), K = params.size(1);
  auto grad = torch::empty_like(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dmol_backward_cpu", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    DMOL_DISPATCH_C(C, [&] {
      backward_impl<kC, P, T>(x.data_ptr<T>(), params.data_ptr<P>(), lp.data_ptr<T>(), grad_out.data_ptr<T>(),
                              grad.data_ptr<P>(), B, K, HW, static_cast<int>(M), static_cast<int>(bits));
    });
  });
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dmol_forward, "per-pixel DMoL log-likelihood (B, HW)");
  m.def("backward", &dmol_backward, "gradient of sum_b grad_out[b] * log p(x_b) wrt params");
}
