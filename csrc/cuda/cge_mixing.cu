// The next mixing op on one-channel deltas (CUDA): out[k·B + b, co] = Σ_taps δ[k, b] · W[co, o_k] — one thread
// per output element, taps summed in (i, j) order as the Triton twin (zokernels/kernels/triton/cge_mixing.py).
#include <cuda_runtime.h>

#include "../cge_ops.h"

namespace {
using namespace zokernels::cge;
constexpr int kThreads = 256;

template <typename T>
__global__ void one_channel_conv2d_kernel(const T* delta, const int64_t* channels, const T* weight, T* out,
                                          MixingShape s, int64_t total) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index < total) one_channel_conv2d_at(index, delta, channels, weight, out, s);
}

template <typename T>
__global__ void one_channel_linear_kernel(const T* delta, const int64_t* channels, const T* weight, T* out,
                                          int64_t batch, int64_t n_out, int64_t n_in, int64_t total) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index < total) one_channel_linear_at(index, delta, channels, weight, out, batch, n_out, n_in);
}

unsigned blocks_for(int64_t total) { return static_cast<unsigned>((total + kThreads - 1) / kThreads); }
}  // namespace

extern "C" int zk_cge_one_channel_conv2d(const void* delta, const int64_t* channels, const void* weight, void* out,
                                         const MixingShape* shape, int dtype, uintptr_t stream) {
  const MixingShape& s = *shape;
  const int64_t total = s.replicas * s.batch * s.c_out * s.h_out * s.w_out;
  if (total <= 0) return static_cast<int>(cudaSuccess);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 1) {
    one_channel_conv2d_kernel<double><<<blocks_for(total), kThreads, 0, cuda_stream>>>(
        static_cast<const double*>(delta), channels, static_cast<const double*>(weight), static_cast<double*>(out),
        s, total);
  } else {
    one_channel_conv2d_kernel<float><<<blocks_for(total), kThreads, 0, cuda_stream>>>(
        static_cast<const float*>(delta), channels, static_cast<const float*>(weight), static_cast<float*>(out), s,
        total);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int zk_cge_one_channel_linear(const void* delta, const int64_t* channels, const void* weight, void* out,
                                         int64_t replicas, int64_t batch, int64_t n_out, int64_t n_in, int dtype,
                                         uintptr_t stream) {
  const int64_t total = replicas * batch * n_out;
  if (total <= 0) return static_cast<int>(cudaSuccess);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 1) {
    one_channel_linear_kernel<double><<<blocks_for(total), kThreads, 0, cuda_stream>>>(
        static_cast<const double*>(delta), channels, static_cast<const double*>(weight), static_cast<double*>(out),
        batch, n_out, n_in, total);
  } else {
    one_channel_linear_kernel<float><<<blocks_for(total), kThreads, 0, cuda_stream>>>(
        static_cast<const float*>(delta), channels, static_cast<const float*>(weight), static_cast<float*>(out),
        batch, n_out, n_in, total);
  }
  return static_cast<int>(cudaGetLastError());
}
