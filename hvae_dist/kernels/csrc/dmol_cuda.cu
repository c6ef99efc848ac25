// CUDA driver of the fused DMoL likelihood: one thread per pixel, the math of dmol_math.h.
// Parameter reads are params[b, k, p] with consecutive threads on consecutive p: coalesced.
// Built only where torch.cuda.is_available(); compile-checked with nvcc in the tests.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "dmol_math.h"

namespace {

using namespace hvae_dmol;

constexpr int kThreads = 256;

template <int C, typename P, typename T>
__global__ void forward_kernel(const T* __restrict__ x, const P* __restrict__ params, T* __restrict__ out,
                               int64_t B, int64_t K, int64_t HW, Layout L, Bins<T> bins) {
  const int64_t total = B * HW;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / HW, p = t - b * HW;
    T xv[C];
#pragma unroll
    for (int c = 0; c < C; ++c) xv[c] = x[(b * C + c) * HW + p] * T(2) - T(1);
    out[t] = pixel_log_prob<C, T, P>(params + b * K * HW + p, HW, L, xv, bins);
  }
}

template <int C, typename P, typename T>
__global__ void backward_kernel(const T* __restrict__ x, const P* __restrict__ params, const T* __restrict__ lp,
                                const T* __restrict__ gout_b, P* __restrict__ grad, int64_t B, int64_t K,
                                int64_t HW, Layout L, Bins<T> bins) {
  const int64_t total = B * HW;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / HW, p = t - b * HW;
    T xv[C];
#pragma unroll
    for (int c = 0; c < C; ++c) xv[c] = x[(b * C + c) * HW + p] * T(2) - T(1);
    pixel_grad<C, T, P, P>(params + b * K * HW + p, HW, L, xv, bins, lp[t], gout_b[b], grad + b * K * HW + p);
  }
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& params, int64_t M) {
  TORCH_CHECK(x.is_cuda() && params.is_cuda() && x.device() == params.device(),
              "dmol cuda: tensors must be on the same CUDA device");
  TORCH_CHECK(x.dim() == 3 && params.dim() == 3, "dmol cuda: expected x (B, C, HW) and params (B, K, HW)");
  TORCH_CHECK(x.is_contiguous() && params.is_contiguous(), "dmol cuda: inputs must be contiguous");
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1 && C <= 3, "dmol cuda: C must be 1, 2 or 3");
  TORCH_CHECK(params.size(1) == M * (3 * C + 1), "dmol cuda: params has ", params.size(1),
              " channels, expected ", M * (3 * C + 1));
  TORCH_CHECK(x.size(0) == params.size(0) && x.size(2) == params.size(2), "dmol cuda: x / params shape mismatch");
  TORCH_CHECK(x.scalar_type() == at::toOpMathType(params.scalar_type()),
              "dmol cuda: x must have the compute dtype of params");
}

int num_blocks(int64_t total) {
  const int64_t want = (total + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

torch::Tensor dmol_forward(const torch::Tensor& x, const torch::Tensor& params, int64_t M, int64_t bits) {
  check_inputs(x, params, M);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2), K = params.size(1);
  auto out = torch::empty({B, HW}, x.options());
  if (B * HW == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dmol_forward_cuda", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    const Layout L = make_layout(static_cast<int>(M), static_cast<int>(C));
    const Bins<T> bins = make_bins<T>(static_cast<int>(bits));
    DMOL_DISPATCH_C(C, [&] {
      forward_kernel<kC, P, T><<<num_blocks(B * HW), kThreads, 0, stream>>>(
          x.data_ptr<T>(), params.data_ptr<P>(), out.data_ptr<T>(), B, K, HW, L, bins);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor dmol_backward(const torch::Tensor& x, const torch::Tensor& params, const torch::Tensor& lp,
                            const torch::Tensor& grad_out, int64_t M, int64_t bits) {
  check_inputs(x, params, M);
  TORCH_CHECK(lp.is_contiguous() && grad_out.is_contiguous(), "dmol cuda: lp / grad_out must be contiguous");
  TORCH_CHECK(lp.scalar_type() == x.scalar_type() && grad_out.scalar_type() == x.scalar_type(),
              "dmol cuda: lp / grad_out dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2), K = params.size(1);
  auto grad = torch::empty_like(params);
  if (B * HW == 0) return grad;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dmol_backward_cuda", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    const Layout L = make_layout(static_cast<int>(M), static_cast<int>(C));
    const Bins<T> bins = make_bins<T>(static_cast<int>(bits));
    DMOL_DISPATCH_C(C, [&] {
      backward_kernel<kC, P, T><<<num_blocks(B * HW), kThreads, 0, stream>>>(
          x.data_ptr<T>(), params.data_ptr<P>(), lp.data_ptr<T>(), grad_out.data_ptr<T>(), grad.data_ptr<P>(),
          B, K, HW, L, bins);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dmol_forward, "per-pixel DMoL log-likelihood (B, HW)");
  m.def("backward", &dmol_backward, "gradient of sum_b grad_out[b] * log p(x_b) wrt params");
}
