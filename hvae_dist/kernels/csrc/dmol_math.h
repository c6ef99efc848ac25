// Per-pixel math of the discretized logistic mixture (DMoL) likelihood, shared by the CPU (OpenMP) and
// CUDA sources. Everything here is a HOST_DEVICE inline function of ONE pixel: the caller decides how
// pixels are spread over threads / SIMD lanes.
//
// Parameter layout (per pixel, channel index k of params (B, K, H, W), K = M * (3C + 1)):
//   [0, M)                        mixture logits
//   [M + c*M, M + (c+1)*M)        means of data channel c            (c = 0..C-1)
//   [M + C*M + c*M, ...)          log-scales of data channel c
//   [M + 2*C*M + q*M, ...)        coefficient slot q (q = 0..C-1); slot q couples the pair
//                                 (c, j) = (1,0), (2,0), (2,1) for q = 0, 1, 2 (PixelCNN++'s c_gr,
//                                 c_br, c_bg); slots without a pair are unused (zero gradient).
// A pixel's parameters are read at prm[k * stride] (NCHW: stride = H*W), so neighbouring pixels
// (SIMD lanes / CUDA threads) read neighbouring addresses.
//
// Semantics follow PixelCNN++ / VDVAE: x in [-1, 1]; log-scale clamped below at DMOL_LOG_SCALE_MIN (-7);
// channel means coupled by tanh(coefficient) * (true x of earlier channels); edge bins use the tail
// mass; the interior uses log(cdf_plus - cdf_min) when that is > DMOL_CDF_DELTA_MIN (1e-5; both
// constants live in dmol_constants.h, shared with the Python reference), else the density at the bin centre
// times the bin width. One deliberate numerical difference from the textbook code: cdf_delta is
// computed on the side of the bin centre where it does not cancel (sigmoid(-z_min) - sigmoid(-z_plus)
// when the bin lies above the mean), which is the same number in exact arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dmol_constants.h"

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline __attribute__((always_inline))
#endif

// Fully unroll the short channel loops (C <= 3) so that a SIMD loop over pixels sees straight-line code.
#if defined(__CUDACC__) || defined(__clang__)
#define DMOL_UNROLL _Pragma("unroll")
#else
#define DMOL_UNROLL _Pragma("GCC unroll 4")
#endif

namespace hvae_dmol {

// ---------------------------------------------------------------------------------------------
// exp / log. double: the library functions (the gradcheck path, accuracy over speed). float on the
// GPU: expf / logf. float on the CPU: Cephes-style polynomials written with plain arithmetic and bit
// casts so that gcc vectorizes them inside `#pragma omp simd` loops WITHOUT -ffast-math (which would
// break the NaN propagation and edge comparisons this code relies on). Max error ~2 ulp on the
// ranges used here; NaN in gives NaN out.
// ---------------------------------------------------------------------------------------------

HOST_DEVICE double d_exp(double x) { return ::exp(x); }
HOST_DEVICE double d_log(double x) { return ::log(x); }

#if !defined(__CUDA_ARCH__)
HOST_DEVICE float bits_as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
HOST_DEVICE int32_t float_as_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
#endif

HOST_DEVICE float d_exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  // exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2.
  const float xc = x > 88.3762626647949f ? 88.3762626647949f : (x < -87.3365447504f ? -87.3365447504f : x);
  // round-to-nearest via truncation (floorf would not vectorize without -fno-trapping-math)
  const float fx = xc * 1.44269504088896341f;
  const int32_t ni = static_cast<int32_t>(fx < 0.0f ? fx - 0.5f : fx + 0.5f);
  const float n = static_cast<float>(ni);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bits_as_float((ni + 127) << 23);
  float y = p * scale;
  y = x > 88.3762626647949f ? __builtin_inff() : y;
  y = x < -87.3365447504f ? 0.0f : y;  // flush the (unused) denormal range to zero
  return x != x ? x : y;
#endif
}

HOST_DEVICE float d_log(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  // Valid for finite x >= FLT_MIN (callers pass arguments in [1e-12, 2]); x <= 0 gives NaN / -inf.
  const int32_t bits = float_as_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_as_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = m + y;
  r = r + e * 0.693359375f;
  r = x == 0.0f ? -__builtin_inff() : r;
  r = x < 0.0f ? __builtin_nanf("") : r;
  r = x == __builtin_inff() ? x : r;
  return x != x ? x : r;
#endif
}

template <typename T>
HOST_DEVICE T d_abs(T x) { return x < T(0) ? -x : x; }
template <typename T>
HOST_DEVICE T d_max(T a, T b) { return a < b ? b : a; }  // NaN in `a` propagates
template <typename T>
HOST_DEVICE T d_min(T a, T b) { return b < a ? b : a; }

// Bin geometry for `bits`-bit data in [-1, 1] units.
template <typename T>
struct Bins {
  T half_width;     // 1 / (2^bits - 1)
  T low_edge;       // x below this is the lowest bin  (-1 + half_width)
  T high_edge;      // x above this is the highest bin (1 - half_width)
  T log_half_bins;  // log((2^bits - 1) / 2): the width of one bin is 1 / exp(log_half_bins)
};

template <typename T>
HOST_DEVICE Bins<T> make_bins(int bits) {
  const double n = static_cast<double>((1LL << bits) - 1);
  Bins<T> b;
  b.half_width = static_cast<T>(1.0 / n);
  b.low_edge = static_cast<T>(-1.0 + 1.0 / n);
  b.high_edge = static_cast<T>(1.0 - 1.0 / n);
  b.log_half_bins = static_cast<T>(::log(n / 2.0));
  return b;
}

// Offsets of the parameter groups for M components and C channels (see the layout above).
struct Layout {
  int M;
  int64_t mean0, ls0, coef0;  // first channel index of each group
};

HOST_DEVICE Layout make_layout(int M, int C) {
  Layout l;
  l.M = M;
  l.mean0 = M;
  l.ls0 = M + static_cast<int64_t>(C) * M;
  l.coef0 = M + 2 * static_cast<int64_t>(C) * M;
  return l;
}

// Coupling pairs: slot q -> (channel c, earlier channel j).
HOST_DEVICE constexpr int pair_c(int q) { return q == 0 ? 1 : 2; }
HOST_DEVICE constexpr int pair_j(int q) { return q == 2 ? 1 : 0; }
template <int C>
HOST_DEVICE constexpr int num_pairs() { return C * (C - 1) / 2; }

// log P(bin of x) for one channel under a logistic(mu, exp(max(ls_raw, DMOL_LOG_SCALE_MIN))).
// With GRAD, also d/dmu and d/dls_raw (zero below the clamp, as torch.clamp's backward).
template <typename T, bool GRAD>
HOST_DEVICE T channel_log_prob(T x, T mu, T ls_raw, const Bins<T>& bins, T& dmu, T& dls) {
  const bool clamped = ls_raw < T(DMOL_LOG_SCALE_MIN);
  const T log_s = clamped ? T(DMOL_LOG_SCALE_MIN) : ls_raw;
  const T inv_s = d_exp(-log_s);
  const T centered = x - mu;
  const T zp = inv_s * (centered + bins.half_width);  // plus_in
  const T zm = inv_s * (centered - bins.half_width);  // min_in
  const T zc = inv_s * centered;                      // mid_in
  // sigmoid(z) and sigmoid(-z) from e = exp(-|z|): no overflow, no cancellation.
  const T ep = d_exp(-d_abs(zp)), em = d_exp(-d_abs(zm)), ec = d_exp(-d_abs(zc));
  const T rp = T(1) / (T(1) + ep), rm = T(1) / (T(1) + em), rc = T(1) / (T(1) + ec);
  const T sp = zp >= T(0) ? rp : ep * rp, sp_n = zp >= T(0) ? ep * rp : rp;
  const T sm = zm >= T(0) ? rm : em * rm, sm_n = zm >= T(0) ? em * rm : rm;
  const T sc = zc >= T(0) ? rc : ec * rc, sc_n = zc >= T(0) ? ec * rc : rc;
  const T delta = zc > T(0) ? sm_n - sp_n : sp - sm;  // cdf_plus - cdf_min

  const bool low = x < bins.low_edge;
  const bool high = !low && x > bins.high_edge;
  const bool interior = !low && !high;
  const bool ok = interior && delta > T(DMOL_CDF_DELTA_MIN);
  const bool fallback = interior && !ok;

  // lp = base + k * log(arg): one log whichever branch is taken (SIMD lanes take all branches).
  //   low:      log sigmoid(zp)  = min(zp, 0) - log(1 + ep)
  //   high:     log sigmoid(-zm) = min(-zm, 0) - log(1 + em)
  //   ok:       log(delta)
  //   fallback: zc - log_s - 2 softplus(zc) - log_half_bins, softplus(zc) = max(zc, 0) + log(1 + ec)
  T base = ok ? T(0) : zc - log_s - T(2) * d_max(zc, T(0)) - bins.log_half_bins;
  base = high ? d_min(-zm, T(0)) : base;
  base = low ? d_min(zp, T(0)) : base;
  T arg = ok ? delta : T(1) + ec;
  arg = high ? T(1) + em : arg;
  arg = low ? T(1) + ep : arg;
  const T k = ok ? T(1) : (fallback ? T(-2) : T(-1));
  const T lp = base + k * d_log(arg);

  if (GRAD) {
    // d lp / d z for each of the three arguments; dz/dmu = -inv_s, dz/dlog_s = -z.
    const T inv_delta = T(1) / (ok ? delta : T(1));
    T gzp = low ? sp_n : (ok ? sp * sp_n * inv_delta : T(0));
    T gzm = high ? -sm : (ok ? -sm * sm_n * inv_delta : T(0));
    T gzc = fallback ? sc_n - sc : T(0);
    dmu = -inv_s * (gzp + gzm + gzc);
    const T dlog_s = -(zp * gzp + zm * gzm + zc * gzc) - (fallback ? T(1) : T(0));
    dls = clamped ? T(0) : dlog_s;
  }
  return lp;
}

// tanh from exp, NaN-propagating; also returns 1 - tanh^2.
template <typename T>
HOST_DEVICE T tanh_of(T r, T& dtanh) {
  const T e = d_exp(T(-2) * d_abs(r));
  const T a = (T(1) - e) / (T(1) + e);
  const T t = r < T(0) ? -a : a;
  dtanh = T(1) - t * t;
  return t;
}

// log p(x | component m) summed over channels (x already in [-1, 1], xv[c]).
// With GRAD, dmu[c] / dls[c] are d/d(mean_c) and d/d(raw log-scale_c) of the component's log-prob,
// and tc/dtc the coupling tanh values and derivatives per slot.
template <int C, typename T, typename P, bool GRAD>
HOST_DEVICE T component_log_prob(const P* prm, int64_t stride, const Layout& L, int m, const T* xv,
                                 const Bins<T>& bins, T* dmu, T* dls, T* tc, T* dtc) {
  T mu[C];
DMOL_UNROLL
  for (int c = 0; c < C; ++c) mu[c] = static_cast<T>(prm[(L.mean0 + c * L.M + m) * stride]);
DMOL_UNROLL
  for (int q = 0; q < num_pairs<C>(); ++q) {
    const T raw = static_cast<T>(prm[(L.coef0 + q * L.M + m) * stride]);
    tc[q] = tanh_of(raw, dtc[q]);
    mu[pair_c(q)] += tc[q] * xv[pair_j(q)];
  }
  T lp = T(0);
DMOL_UNROLL
  for (int c = 0; c < C; ++c) {
    const T ls = static_cast<T>(prm[(L.ls0 + c * L.M + m) * stride]);
    lp += channel_log_prob<T, GRAD>(xv[c], mu[c], ls, bins, dmu[c], dls[c]);
  }
  return lp;
}

// Online log-sum-exp state: value = mx + log(s). One exp per update.
template <typename T>
struct Lse {
  T mx, s;
  HOST_DEVICE void init(T v) { mx = v; s = T(1); }
  HOST_DEVICE void add(T v) {
    const T d = v - mx;
    const T e = d_exp(-d_abs(d));
    const bool up = d > T(0);
    s = up ? s * e + T(1) : s + e;
    mx = up ? v : mx;
    mx = d != d ? d : mx;  // NaN propagates
  }
  HOST_DEVICE T value() const { return mx + d_log(s); }
};

// Component m's logit a and joint term j = a + log p(x | m) into the two running log-sum-exps (m == 0 starts
// them): la over the logits, lj over the joints.
template <typename T>
HOST_DEVICE void push_component(int m, T a, T j, Lse<T>& la, Lse<T>& lj) {
  if (m == 0) {
    la.init(a);
    lj.init(j);
  } else {
    la.add(a);
    lj.add(j);
  }
}

// One component's contribution to the pixel's two running log-sum-exps: la over the logits and lj over
// logit_m + log p(x | m). The pixel's log p(x) is lj.value() - la.value().
template <int C, typename T, typename P>
HOST_DEVICE void component_accumulate(const P* prm, int64_t stride, const Layout& L, int m, const T* xv,
                                      const Bins<T>& bins, Lse<T>& la, Lse<T>& lj) {
  T dmu[C], dls[C], tc[C], dtc[C];
  const T a = static_cast<T>(prm[m * stride]);
  const T j = a + component_log_prob<C, T, P, false>(prm, stride, L, m, xv, bins, dmu, dls, tc, dtc);
  push_component(m, a, j, la, lj);
}

// log p(x) of one pixel: logsumexp_m(log_softmax(logits)_m + sum_c log p_c(x | m)).
template <int C, typename T, typename P>
HOST_DEVICE T pixel_log_prob(const P* prm, int64_t stride, const Layout& L, const T* xv, const Bins<T>& bins) {
  Lse<T> la, lj;
  for (int m = 0; m < L.M; ++m) component_accumulate<C, T, P>(prm, stride, L, m, xv, bins, la, lj);
  return lj.value() - la.value();
}

// Gradient of g * log p(x) wrt the parameters of component m of one pixel, written to gout[k * stride]
// (same layout as prm). lse_a = logsumexp of the pixel's logits; lp = the pixel's log p(x) from the
// forward pass (so the backward needs one pass over the components, not two).
//   d/d logit_m = g (r_m - pi_m), r = posterior responsibilities, pi = softmax(logits)
//   d/d theta_{m,c} = g r_m d log p_c(x | m) / d theta
template <int C, typename T, typename P, typename G>
HOST_DEVICE void component_grad(const P* prm, int64_t stride, const Layout& L, int m, const T* xv,
                                const Bins<T>& bins, T lse_a, T lp, T g, G* gout) {
  T dmu[C], dls[C], tc[C], dtc[C];
  const T a = static_cast<T>(prm[m * stride]) - lse_a;  // log pi_m
  const T lc = component_log_prob<C, T, P, true>(prm, stride, L, m, xv, bins, dmu, dls, tc, dtc);
  const T pi = d_exp(a);
  const T r = d_exp(a + lc - lp);
  const T gr = g * r;
  gout[m * stride] = static_cast<G>(g * (r - pi));
DMOL_UNROLL
  for (int c = 0; c < C; ++c) {
    gout[(L.mean0 + c * L.M + m) * stride] = static_cast<G>(gr * dmu[c]);
    gout[(L.ls0 + c * L.M + m) * stride] = static_cast<G>(gr * dls[c]);
  }
DMOL_UNROLL
  for (int q = 0; q < num_pairs<C>(); ++q)
    gout[(L.coef0 + q * L.M + m) * stride] = static_cast<G>(gr * dmu[pair_c(q)] * xv[pair_j(q)] * dtc[q]);
DMOL_UNROLL
  for (int q = num_pairs<C>(); q < C; ++q)  // unused slots
    gout[(L.coef0 + q * L.M + m) * stride] = static_cast<G>(T(0));
}

// logsumexp of the pixel's M logits.
template <typename T, typename P>
HOST_DEVICE T logit_lse(const P* prm, int64_t stride, int M) {
  Lse<T> la;
  la.init(static_cast<T>(prm[0]));
  for (int m = 1; m < M; ++m) la.add(static_cast<T>(prm[m * stride]));
  return la.value();
}

// Gradient of g * log p(x) wrt every parameter of one pixel (one thread per pixel on the GPU).
template <int C, typename T, typename P, typename G>
HOST_DEVICE void pixel_grad(const P* prm, int64_t stride, const Layout& L, const T* xv, const Bins<T>& bins,
                            T lp, T g, G* gout) {
  const T lse_a = logit_lse<T, P>(prm, stride, L.M);
  for (int m = 0; m < L.M; ++m) component_grad<C, T, P, G>(prm, stride, L, m, xv, bins, lse_a, lp, g, gout);
}

// ---------------------------------------------------------------------------------------------
// One-pass forward + gradient (training): the forward computes each component's log-probability WITH
// its partial derivatives once, instead of once without them (forward) and again with them (backward).
// The gradient is written unscaled, d log p(x) / d params; the backward only multiplies it by
// grad_output[b]. Two passes over the pixel's components, both writing the gradient tensor itself (no
// other buffer of size M*C*H*W): pass 1 stores the partials and log p(x | m) (in the logit slot) and
// accumulates the two log-sum-exps; pass 2, once log p(x) is known, turns them into the gradient.
// For float / double params only (the gradient slots hold intermediate values in the params' dtype).
// The gradient equals component_grad's with g = 1 up to the order of one multiplication by g.
// ---------------------------------------------------------------------------------------------

// Pass 1 for component m: gout <- [log p(x|m) | dmu_c | dls_c | dmu_pc * x_pj * dtanh_q], la/lj updated.
template <int C, typename T>
HOST_DEVICE void component_partials(const T* prm, int64_t stride, const Layout& L, int m, const T* xv,
                                    const Bins<T>& bins, Lse<T>& la, Lse<T>& lj, T* gout) {
  T dmu[C], dls[C], tc[C], dtc[C];
  const T a = prm[m * stride];
  const T lc = component_log_prob<C, T, T, true>(prm, stride, L, m, xv, bins, dmu, dls, tc, dtc);
  gout[m * stride] = lc;
DMOL_UNROLL
  for (int c = 0; c < C; ++c) {
    gout[(L.mean0 + c * L.M + m) * stride] = dmu[c];
    gout[(L.ls0 + c * L.M + m) * stride] = dls[c];
  }
DMOL_UNROLL
  for (int q = 0; q < num_pairs<C>(); ++q)
    gout[(L.coef0 + q * L.M + m) * stride] = dmu[pair_c(q)] * xv[pair_j(q)] * dtc[q];
DMOL_UNROLL
  for (int q = num_pairs<C>(); q < C; ++q)  // unused slots
    gout[(L.coef0 + q * L.M + m) * stride] = T(0);
  const T j = a + lc;
  push_component(m, a, j, la, lj);
}

// Pass 2 for component m, given lse_a = logsumexp of the logits and lp = log p(x):
//   d/d logit_m = r_m - pi_m, d/d theta_{m,c} = r_m * partial (r_m = exp(log pi_m + log p(x|m) - lp)).
template <int C, typename T>
HOST_DEVICE void component_finish(const T* prm, int64_t stride, const Layout& L, int m, T lse_a, T lp, T* gout) {
  const T a = prm[m * stride] - lse_a;  // log pi_m
  const T lc = gout[m * stride];
  const T pi = d_exp(a);
  const T r = d_exp(a + lc - lp);
  gout[m * stride] = r - pi;
DMOL_UNROLL
  for (int c = 0; c < C; ++c) {
    gout[(L.mean0 + c * L.M + m) * stride] *= r;
    gout[(L.ls0 + c * L.M + m) * stride] *= r;
  }
DMOL_UNROLL
  for (int q = 0; q < num_pairs<C>(); ++q) gout[(L.coef0 + q * L.M + m) * stride] *= r;
}

// log p(x) of one pixel and its unscaled gradient (one thread per pixel on the GPU).
template <int C, typename T>
HOST_DEVICE T pixel_log_prob_and_grad(const T* prm, int64_t stride, const Layout& L, const T* xv,
                                      const Bins<T>& bins, T* gout) {
  Lse<T> la, lj;
  for (int m = 0; m < L.M; ++m) component_partials<C, T>(prm, stride, L, m, xv, bins, la, lj, gout);
  const T lse_a = la.value();
  const T lp = lj.value() - lse_a;
  for (int m = 0; m < L.M; ++m) component_finish<C, T>(prm, stride, L, m, lse_a, lp, gout);
  return lp;
}

}  // namespace hvae_dmol
