// Host-side glue of the fused DMoL likelihood, shared by the CPU (dmol_cpu.cpp, g++) and CUDA
// (dmol_cuda.cu, nvcc) drivers: the cheap invariants the extension checks, the dtype and channel-count
// dispatch, and the one pybind11 module definition. Each driver is one translation unit (one extension),
// so this header is compiled once into each; nothing here runs on the device.
//
// Arguments are validated in Python (hvae_dist/kernels/reference.py, check_dmol_args) with messages for
// users. The checks below only guard the raw-pointer indexing of the kernels against a caller that
// bypasses Python: they are O(1) metadata reads, no device sync.
//
// A driver supplies only what differs by device, as a struct passed to DMOL_DEFINE_EXTENSION:
//
//   struct Driver {
//     static constexpr const char* kName = "cpu";           // prefix of the error messages
//     static constexpr const char* kWhere = "on the CPU";   // the device requirement, for the message
//     static bool on_device(const torch::Tensor& x, const torch::Tensor& params);
//     using Guard = ...;                                    // made from x.device() around the launch
//     template <int C, typename P, typename T>              // P: params dtype, T: its compute dtype
//     static void forward(const T* x, const P* params, T* out, int64_t B, int64_t K, int64_t HW,
//                         const Layout& L, const Bins<T>& bins);
//     template <int C, typename P, typename T>
//     static void backward(const T* x, const P* params, const T* lp, const T* grad_out, P* grad,
//                          int64_t B, int64_t K, int64_t HW, const Layout& L, const Bins<T>& bins);
//     template <int C, typename T>                          // float / double params only
//     static void forward_grad(const T* x, const T* params, T* out, T* grad, int64_t B, int64_t K,
//                              int64_t HW, const Layout& L, const Bins<T>& bins);
//   };
#pragma once

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "dmol_math.h"

// Runs the lambda with the channel count C (1, 2 or 3) as the compile-time constant kC: the kernels
// unroll their channel loops on it. C was checked to be in [1, 3] before, hence `default` is 3.
#define DMOL_DISPATCH_C(C_, ...)                                  \
  switch (C_) {                                                   \
    case 1: { constexpr int kC = 1; __VA_ARGS__(); break; }       \
    case 2: { constexpr int kC = 2; __VA_ARGS__(); break; }       \
    default: { constexpr int kC = 3; __VA_ARGS__(); break; }      \
  }

namespace hvae_dmol {

// x (B, C, HW) in the compute dtype of params (B, K, HW), both contiguous, K = M * (3C + 1).
template <class Driver>
void check_inputs(const torch::Tensor& x, const torch::Tensor& params, int64_t M) {
  TORCH_CHECK(Driver::on_device(x, params), "dmol ", Driver::kName, ": tensors must be ", Driver::kWhere);
  TORCH_CHECK(x.dim() == 3 && params.dim() == 3, "dmol ", Driver::kName,
              ": expected x (B, C, HW) and params (B, K, HW)");
  TORCH_CHECK(x.is_contiguous() && params.is_contiguous(), "dmol ", Driver::kName, ": inputs must be contiguous");
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1 && C <= 3, "dmol ", Driver::kName, ": C must be 1, 2 or 3");
  TORCH_CHECK(params.size(1) == M * (3 * C + 1), "dmol ", Driver::kName, ": params has ", params.size(1),
              " channels, expected ", M * (3 * C + 1));
  TORCH_CHECK(x.size(0) == params.size(0) && x.size(2) == params.size(2), "dmol ", Driver::kName,
              ": x / params shape mismatch");
  TORCH_CHECK(x.scalar_type() == at::toOpMathType(params.scalar_type()), "dmol ", Driver::kName,
              ": x must have the compute dtype of params");
}

// Per-pixel log p, (B, HW), in the compute dtype.
template <class Driver>
torch::Tensor dmol_forward(const torch::Tensor& x, const torch::Tensor& params, int64_t M, int64_t bits) {
  check_inputs<Driver>(x, params, M);
  const typename Driver::Guard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2), K = params.size(1);
  auto out = torch::empty({B, HW}, x.options());
  if (B * HW == 0) return out;  // nothing to compute: skip the dispatch and, on the GPU, the launch
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dmol_forward", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;  // half / bfloat16 params are upcast to float32 per element
    const Layout L = make_layout(static_cast<int>(M), static_cast<int>(C));
    const Bins<T> bins = make_bins<T>(static_cast<int>(bits));
    DMOL_DISPATCH_C(C, [&] {
      Driver::template forward<kC, P, T>(x.data_ptr<T>(), params.data_ptr<P>(), out.data_ptr<T>(), B, K, HW, L,
                                         bins);
    });
  });
  return out;
}

// Gradient of sum_b grad_out[b] * log p(x_b) wrt params, in params' dtype. lp: (B, HW) from dmol_forward;
// grad_out: (B,), compute dtype.
template <class Driver>
torch::Tensor dmol_backward(const torch::Tensor& x, const torch::Tensor& params, const torch::Tensor& lp,
                            const torch::Tensor& grad_out, int64_t M, int64_t bits) {
  check_inputs<Driver>(x, params, M);
  TORCH_CHECK(lp.is_contiguous() && grad_out.is_contiguous(), "dmol ", Driver::kName,
              ": lp / grad_out must be contiguous");
  TORCH_CHECK(lp.scalar_type() == x.scalar_type() && grad_out.scalar_type() == x.scalar_type(), "dmol ",
              Driver::kName, ": lp / grad_out dtype");
  const typename Driver::Guard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2), K = params.size(1);
  auto grad = torch::empty_like(params);
  if (B * HW == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dmol_backward", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    const Layout L = make_layout(static_cast<int>(M), static_cast<int>(C));
    const Bins<T> bins = make_bins<T>(static_cast<int>(bits));
    DMOL_DISPATCH_C(C, [&] {
      Driver::template backward<kC, P, T>(x.data_ptr<T>(), params.data_ptr<P>(), lp.data_ptr<T>(),
                                          grad_out.data_ptr<T>(), grad.data_ptr<P>(), B, K, HW, L, bins);
    });
  });
  return grad;
}

// Training's one pass: (per-pixel log p (B, HW), d sum_p log p / d params (B, K, HW)), both in params' dtype,
// which must be float32 or float64 (see dmol_math.h, "One-pass forward + gradient").
template <class Driver>
std::vector<torch::Tensor> dmol_forward_grad(const torch::Tensor& x, const torch::Tensor& params, int64_t M,
                                             int64_t bits) {
  check_inputs<Driver>(x, params, M);
  TORCH_CHECK(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble, "dmol ", Driver::kName,
              ": forward_grad takes float32 / float64 params");
  const typename Driver::Guard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2), K = params.size(1);
  auto out = torch::empty({B, HW}, x.options());
  auto grad = torch::empty_like(params);
  if (B * HW == 0) return {out, grad};
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "dmol_forward_grad", [&] {
    using T = scalar_t;
    const Layout L = make_layout(static_cast<int>(M), static_cast<int>(C));
    const Bins<T> bins = make_bins<T>(static_cast<int>(bits));
    DMOL_DISPATCH_C(C, [&] {
      Driver::template forward_grad<kC, T>(x.data_ptr<T>(), params.data_ptr<T>(), out.data_ptr<T>(),
                                           grad.data_ptr<T>(), B, K, HW, L, bins);
    });
  });
  return {out, grad};
}

}  // namespace hvae_dmol

// The extension's Python interface, the same for every driver (fused.py's DmolFunction calls these).
#define DMOL_DEFINE_EXTENSION(Driver)                                                                      \
  PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {                                                               \
    m.def("forward", &hvae_dmol::dmol_forward<Driver>, "per-pixel DMoL log-likelihood (B, HW)");           \
    m.def("backward", &hvae_dmol::dmol_backward<Driver>,                                                   \
          "gradient of sum_b grad_out[b] * log p(x_b) wrt params");                                        \
    m.def("forward_grad", &hvae_dmol::dmol_forward_grad<Driver>,                                           \
          "per-pixel log-likelihood (B, HW) and the unscaled gradient of its sum wrt params");             \
  }
