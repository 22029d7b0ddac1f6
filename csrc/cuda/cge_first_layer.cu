// Fused first-layer perturb-and-forward (CUDA): one block per coordinate k. Pass 1 reduces the replica's
// Σδ, Σ(y − mean)·δ, Σδ² (train-mode BN only) in the block; pass 2 writes relu(bn(y + δ)) − relu(bn(y)).
// Formulas in csrc/cge_kernels.h; the Triton twin is zokernels/kernels/triton/cge_first_layer.py.
#include <cuda_runtime.h>

#include "../cge_ops.h"

namespace {
using namespace zokernels::cge;
constexpr int kThreads = kFirstLayerThreads;

// Tree sum over the block, in the order the C++ twin replays (csrc/cpu/cge_cpu.cpp block_tree_sum).
template <typename T>
__device__ T block_sum(T value, T* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) scratch[threadIdx.x] += scratch[threadIdx.x + width];
    __syncthreads();
  }
  const T total = scratch[0];
  __syncthreads();  // scratch is reused by the next sum
  return total;
}

template <typename T>
__global__ void first_layer_delta_kernel(const T* x, const T* y, const int64_t* coords, const T* steps,
                                         const T* chan, T* out, FirstLayerShape s, int bn_mode, bool relu) {
  __shared__ T scratch[kThreads];
  const int64_t k = blockIdx.x;
  const int64_t* coord = coords + 4 * k;
  const T h = steps[k];
  const int64_t n_total = s.batch * s.h_out * s.w_out;
  ChannelOps<T> ops = load_channel(chan, s.c_out, coord[0]);
  if (bn_mode == kBnTrain) {
    T sums[3];
    first_layer_partial_sums(x, y, s, coord, h, ops.mean, threadIdx.x, kThreads, sums);
    for (int i = 0; i < 3; ++i) sums[i] = block_sum(sums[i], scratch);
    train_coefficients(&ops, sums[0], sums[1], sums[2], n_total);
  }
  first_layer_write(x, y, s, coord, h, ops, bn_mode, relu, out + k * n_total, threadIdx.x, kThreads);
}

template <typename T>
int launch(const void* x, const void* y, const int64_t* coords, const void* steps, const void* chan, void* out,
           int64_t replicas, const FirstLayerShape& s, int bn_mode, int relu, cudaStream_t stream) {
  first_layer_delta_kernel<T><<<static_cast<unsigned>(replicas), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(y), coords, static_cast<const T*>(steps),
      static_cast<const T*>(chan), static_cast<T*>(out), s, bn_mode, relu != 0);
  return static_cast<int>(cudaGetLastError());
}
}  // namespace

extern "C" const char* zk_cge_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

extern "C" int zk_cge_first_layer_delta(const void* x, const void* y, const int64_t* coords, const void* steps,
                                        const void* chan, void* out, int64_t replicas, const FirstLayerShape* shape,
                                        int bn_mode, int relu, int dtype, uintptr_t stream) {
  if (replicas <= 0) return static_cast<int>(cudaSuccess);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 1) return launch<double>(x, y, coords, steps, chan, out, replicas, *shape, bn_mode, relu, cuda_stream);
  return launch<float>(x, y, coords, steps, chan, out, replicas, *shape, bn_mode, relu, cuda_stream);
}
