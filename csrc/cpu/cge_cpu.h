// C++ CPU twins of the CUDA CGE kernels (csrc/cuda/cge_*.cu): the kernels' per-thread bodies of
// csrc/cge_kernels.h, driven by loops over (block, thread) instead of CUDA threads.
#pragma once
#include <cstdint>

#include "../cge_kernels.h"

namespace zokernels {
namespace cge {
// dtype: 0 float32, 1 float64 (as the CUDA launchers).
void first_layer_delta_cpu(const void* x, const void* y, const int64_t* coords, const void* steps, const void* chan,
                           void* out, int64_t replicas, const FirstLayerShape& shape, int bn_mode, bool relu,
                           int dtype);
void one_channel_conv2d_cpu(const void* delta, const int64_t* channels, const void* weight, void* out,
                            const MixingShape& shape, int dtype);
void one_channel_linear_cpu(const void* delta, const int64_t* channels, const void* weight, void* out,
                            int64_t replicas, int64_t batch, int64_t n_out, int64_t n_in, int dtype);
// Tables hold host addresses; see zk_cge_masked_sgd in csrc/cuda/cge_launch.h for the argument meanings.
void masked_sgd_cpu(const int64_t* params, const int64_t* grads, const int64_t* buffers, const int64_t* numels,
                    int64_t n_params, const int32_t* param_ids, const int64_t* elements, const void* values,
                    int64_t n, const void* hyper, bool update, bool dense, SgdFlags flags, int dtype);
}  // namespace cge
}  // namespace zokernels
