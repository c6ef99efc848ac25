// CUDA driver of the fused DMoL likelihood: one thread per pixel, the math of dmol_math.h; the checks,
// the dtype dispatch and the Python bindings in dmol_binding.h.
// Parameter reads are params[b, k, p] with consecutive threads on consecutive p: coalesced.
// Built only where torch.cuda.is_available(); compile-checked with nvcc in the tests.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "dmol_binding.h"

namespace {

using namespace hvae_dmol;

constexpr int kThreads = 256;

// Grid-stride loop over the B * HW pixels: consecutive threads take consecutive pixels (coalesced reads).
__device__ __forceinline__ int64_t first_pixel() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}
__device__ __forceinline__ int64_t pixel_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// The C channel values of pixel p of example b, rescaled from [0, 1] to the [-1, 1] of the math.
template <int C, typename T>
__device__ __forceinline__ void load_pixel(const T* __restrict__ x, int64_t b, int64_t p, int64_t HW, T* xv) {
#pragma unroll
  for (int c = 0; c < C; ++c) xv[c] = x[(b * C + c) * HW + p] * T(2) - T(1);
}

template <int C, typename P, typename T>
__global__ void forward_kernel(const T* __restrict__ x, const P* __restrict__ params, T* __restrict__ out,
                               int64_t B, int64_t K, int64_t HW, Layout L, Bins<T> bins) {
  for (int64_t t = first_pixel(); t < B * HW; t += pixel_stride()) {
    const int64_t b = t / HW, p = t - b * HW;
    T xv[C];
    load_pixel<C>(x, b, p, HW, xv);
    out[t] = pixel_log_prob<C, T, P>(params + b * K * HW + p, HW, L, xv, bins);
  }
}

template <int C, typename P, typename T>
__global__ void backward_kernel(const T* __restrict__ x, const P* __restrict__ params, const T* __restrict__ lp,
                                const T* __restrict__ gout_b, P* __restrict__ grad, int64_t B, int64_t K,
                                int64_t HW, Layout L, Bins<T> bins) {
  for (int64_t t = first_pixel(); t < B * HW; t += pixel_stride()) {
    const int64_t b = t / HW, p = t - b * HW;
    T xv[C];
    load_pixel<C>(x, b, p, HW, xv);
    pixel_grad<C, T, P, P>(params + b * K * HW + p, HW, L, xv, bins, lp[t], gout_b[b], grad + b * K * HW + p);
  }
}

template <int C, typename T>
__global__ void forward_grad_kernel(const T* __restrict__ x, const T* __restrict__ params, T* __restrict__ out,
                                    T* __restrict__ grad, int64_t B, int64_t K, int64_t HW, Layout L, Bins<T> bins) {
  for (int64_t t = first_pixel(); t < B * HW; t += pixel_stride()) {
    const int64_t b = t / HW, p = t - b * HW;
    T xv[C];
    load_pixel<C>(x, b, p, HW, xv);
    out[t] = pixel_log_prob_and_grad<C, T>(params + b * K * HW + p, HW, L, xv, bins, grad + b * K * HW + p);
  }
}

int num_blocks(int64_t total) {
  const int64_t want = (total + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

// The CUDA side of dmol_binding.h's driver contract: one grid-stride launch on the current stream of
// x's device (the Guard makes it current, so the stream and the SM count are that device's).
struct CudaDriver {
  static constexpr const char* kName = "cuda";
  static constexpr const char* kWhere = "on the same CUDA device";
  static bool on_device(const torch::Tensor& x, const torch::Tensor& params) {
    return x.is_cuda() && params.is_cuda() && x.device() == params.device();
  }
  using Guard = c10::cuda::CUDAGuard;

  template <int C, typename P, typename T>
  static void forward(const T* x, const P* params, T* out, int64_t B, int64_t K, int64_t HW, const Layout& L,
                      const Bins<T>& bins) {
    forward_kernel<C, P, T><<<num_blocks(B * HW), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x, params, out, B, K, HW, L, bins);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int C, typename P, typename T>
  static void backward(const T* x, const P* params, const T* lp, const T* gout_b, P* grad, int64_t B, int64_t K,
                       int64_t HW, const Layout& L, const Bins<T>& bins) {
    backward_kernel<C, P, T><<<num_blocks(B * HW), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x, params, lp, gout_b, grad, B, K, HW, L, bins);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int C, typename T>
  static void forward_grad(const T* x, const T* params, T* out, T* grad, int64_t B, int64_t K, int64_t HW,
                           const Layout& L, const Bins<T>& bins) {
    forward_grad_kernel<C, T><<<num_blocks(B * HW), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x, params, out, grad, B, K, HW, L, bins);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

DMOL_DEFINE_EXTENSION(CudaDriver)
