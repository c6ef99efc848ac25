// CPU (OpenMP) driver of the fused DMoL likelihood. The math lives in dmol_math.h; the checks, the
// dtype dispatch and the Python bindings in dmol_binding.h.
//
// Work split: OpenMP threads take (example, block of pixels) units; inside a unit, one
// `#pragma omp simd` loop runs one pixel per SIMD lane over contiguous H*W positions, so every
// parameter read / gradient write is a contiguous vector load / store of the NCHW tensor.
#include <ATen/Parallel.h>

#include <algorithm>

#include "dmol_binding.h"

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

template <int C, typename T>
inline __attribute__((always_inline)) void partials_step(const T (*xs)[kBlock], int64_t i, const T* pb, int64_t HW,
                                                         const Layout& L, int m, const Bins<T>& bins, T* a_mx,
                                                         T* a_s, T* j_mx, T* j_s, T* gb) {
  T xv[C];
  DMOL_UNROLL for (int c = 0; c < C; ++c) xv[c] = xs[c][i];
  Lse<T> la{a_mx[i], a_s[i]}, lj{j_mx[i], j_s[i]};
  component_partials<C, T>(pb + i, HW, L, m, xv, bins, la, lj, gb + i);
  a_mx[i] = la.mx, a_s[i] = la.s, j_mx[i] = lj.mx, j_s[i] = lj.s;
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

// Training's one pass (dmol_math.h, "One-pass forward + gradient"): the block's gradient (K x kBlock values,
// ~50 KB for CIFAR) is written in pass 1 and finished in pass 2 while it is still in L2.
template <int C, typename T>
void forward_grad_block(const T* xb, const T* pb, T* ob, T* gb, int64_t n, int64_t HW, const Layout L_,
                        const Bins<T> bins_) {
  const Layout L = L_;
  const Bins<T> bins = bins_;
  alignas(64) T xs[C][kBlock];
  alignas(64) T a_mx[kBlock], a_s[kBlock], j_mx[kBlock], j_s[kBlock], lse_a[kBlock];
  for (int c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xs[c][i] = xb[c * HW + i] * T(2) - T(1);
  }
  for (int m = 0; m < L.M; ++m) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) partials_step<C, T>(xs, i, pb, HW, L, m, bins, a_mx, a_s, j_mx, j_s, gb);
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Lse<T> la{a_mx[i], a_s[i]}, lj{j_mx[i], j_s[i]};
    lse_a[i] = la.value();
    ob[i] = lj.value() - lse_a[i];
  }
  for (int m = 0; m < L.M; ++m) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) component_finish<C, T>(pb + i, HW, L, m, lse_a[i], ob[i], gb + i);
  }
}

// The CPU side of dmol_binding.h's driver contract: one parallel_for over the (example, block) units.
struct CpuDriver {
  static constexpr const char* kName = "cpu";
  static constexpr const char* kWhere = "on the CPU";
  static bool on_device(const torch::Tensor& x, const torch::Tensor& params) {
    return x.device().is_cpu() && params.device().is_cpu();
  }
  struct Guard {  // nothing to select on the CPU
    explicit Guard(const c10::Device&) {}
  };

  template <int C, typename P, typename T>
  static void forward(const T* x, const P* params, T* out, int64_t B, int64_t K, int64_t HW, const Layout& L,
                      const Bins<T>& bins) {
    const int64_t nblk = (HW + kBlock - 1) / kBlock;
    // [=]: the blocks get copies of L and bins, not references (see forward_block on why)
    at::parallel_for(0, B * nblk, 1, [=](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / nblk, p0 = (u % nblk) * kBlock, n = std::min(HW - p0, kBlock);
        forward_block<C, P, T>(x + b * C * HW + p0, params + b * K * HW + p0, out + b * HW + p0, n, HW, L, bins);
      }
    });
  }

  template <int C, typename P, typename T>
  static void backward(const T* x, const P* params, const T* lp, const T* gout_b, P* grad, int64_t B, int64_t K,
                       int64_t HW, const Layout& L, const Bins<T>& bins) {
    const int64_t nblk = (HW + kBlock - 1) / kBlock;
    at::parallel_for(0, B * nblk, 1, [=](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / nblk, p0 = (u % nblk) * kBlock, n = std::min(HW - p0, kBlock);
        backward_block<C, P, T>(x + b * C * HW + p0, params + b * K * HW + p0, lp + b * HW + p0, gout_b[b],
                                grad + b * K * HW + p0, n, HW, L, bins);
      }
    });
  }

  template <int C, typename T>
  static void forward_grad(const T* x, const T* params, T* out, T* grad, int64_t B, int64_t K, int64_t HW,
                           const Layout& L, const Bins<T>& bins) {
    const int64_t nblk = (HW + kBlock - 1) / kBlock;
    at::parallel_for(0, B * nblk, 1, [=](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / nblk, p0 = (u % nblk) * kBlock, n = std::min(HW - p0, kBlock);
        forward_grad_block<C, T>(x + b * C * HW + p0, params + b * K * HW + p0, out + b * HW + p0,
                                 grad + b * K * HW + p0, n, HW, L, bins);
      }
    });
  }
};

}  // namespace

DMOL_DEFINE_EXTENSION(CpuDriver)
