// Sparse mask application (CUDA): .grad scatter of the K finite differences and torch.optim.SGD's update,
// restricted to the selected coordinates (one thread per coordinate) or dense (one thread per element of every
// parameter; blockIdx.y = parameter). Parameters are reached through device tables of addresses.
#include <cuda_runtime.h>

#include "../cge_ops.h"

namespace {
using namespace zokernels::cge;
constexpr int kThreads = 256;

template <typename T>
__global__ void masked_coordinates_kernel(const int64_t* params, const int64_t* grads, const int64_t* buffers,
                                          const int32_t* param_ids, const int64_t* elements, const T* values,
                                          int64_t n, const T* hyper, bool update, SgdFlags flags) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j < n) masked_coordinate_at(j, params, grads, buffers, param_ids, elements, values, hyper, update, flags);
}

template <typename T>
__global__ void dense_sgd_kernel(const int64_t* params, const int64_t* grads, const int64_t* buffers,
                                 const int64_t* numels, const T* hyper, SgdFlags flags) {
  const int64_t element = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  dense_sgd_at(static_cast<int64_t>(blockIdx.y), element, params, grads, buffers, numels, hyper, flags);
}

template <typename T>
int launch(const int64_t* params, const int64_t* grads, const int64_t* buffers, const int64_t* numels,
           int64_t n_params, const int32_t* param_ids, const int64_t* elements, const void* values, int64_t n,
           const void* hyper, bool update, bool dense, int64_t max_numel, SgdFlags flags, cudaStream_t stream) {
  const T* h = static_cast<const T*>(hyper);
  if (dense) {
    if (max_numel <= 0 || n_params <= 0) return static_cast<int>(cudaSuccess);
    const dim3 grid(static_cast<unsigned>((max_numel + kThreads - 1) / kThreads), static_cast<unsigned>(n_params));
    dense_sgd_kernel<T><<<grid, kThreads, 0, stream>>>(params, grads, buffers, numels, h, flags);
  } else {
    if (n <= 0) return static_cast<int>(cudaSuccess);
    const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    masked_coordinates_kernel<T><<<blocks, kThreads, 0, stream>>>(
        params, grads, buffers, param_ids, elements, static_cast<const T*>(values), n, h, update, flags);
  }
  return static_cast<int>(cudaGetLastError());
}
}  // namespace

extern "C" int zk_cge_masked_sgd(const int64_t* params, const int64_t* grads, const int64_t* buffers,
                                 const int64_t* numels, int64_t n_params, const int32_t* param_ids,
                                 const int64_t* elements, const void* values, int64_t n, const void* hyper,
                                 int update, int dense, int64_t max_numel, SgdFlags flags, int dtype,
                                 uintptr_t stream) {
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 1) {
    return launch<double>(params, grads, buffers, numels, n_params, param_ids, elements, values, n, hyper,
                          update != 0, dense != 0, max_numel, flags, cuda_stream);
  }
  return launch<float>(params, grads, buffers, numels, n_params, param_ids, elements, values, n, hyper, update != 0,
                       dense != 0, max_numel, flags, cuda_stream);
}
