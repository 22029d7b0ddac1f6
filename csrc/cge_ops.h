// The entry points of the CGE kernels, each declared once here: the C++ CPU twins (csrc/cpu/cge_cpu.cpp) and the
// CUDA launchers (csrc/cuda/cge_*.cu: extern "C", device pointers, cudaStream_t passed as uintptr_t). Included by
// both and by the pybind11 glue (python/src/cge_bindings.cpp), which needs no CUDA headers: every launcher returns
// the cudaError_t of its launch as an int, and zk_cge_error_string turns it into text.
// dtype: the codes of zokernels/kernels/native.py DTYPE_CODES (these kernels read 0 float32, 1 float64).
#pragma once
#include <cstdint>

#include "cge_kernels.h"

namespace zokernels {
namespace cge {
// C++ CPU twins of the CUDA kernels: the kernels' per-thread bodies of cge_kernels.h, driven by loops over
// (block, thread) instead of CUDA threads.
void first_layer_delta_cpu(const void* x, const void* y, const int64_t* coords, const void* steps, const void* chan,
                           void* out, int64_t replicas, const FirstLayerShape& shape, int bn_mode, bool relu,
                           int dtype);
void one_channel_conv2d_cpu(const void* delta, const int64_t* channels, const void* weight, void* out,
                            const MixingShape& shape, int dtype);
void one_channel_linear_cpu(const void* delta, const int64_t* channels, const void* weight, void* out,
                            int64_t replicas, int64_t batch, int64_t n_out, int64_t n_in, int dtype);
// Tables hold host addresses; see zk_cge_masked_sgd below for the argument meanings.
void masked_sgd_cpu(const int64_t* params, const int64_t* grads, const int64_t* buffers, const int64_t* numels,
                    int64_t n_params, const int32_t* param_ids, const int64_t* elements, const void* values,
                    int64_t n, const void* hyper, bool update, bool dense, SgdFlags flags, int dtype);
}  // namespace cge
}  // namespace zokernels

extern "C" {
const char* zk_cge_error_string(int error);
int zk_cge_first_layer_delta(const void* x, const void* y, const int64_t* coords, const void* steps,
                             const void* chan, void* out, int64_t replicas,
                             const zokernels::cge::FirstLayerShape* shape, int bn_mode, int relu, int dtype,
                             uintptr_t stream);
int zk_cge_one_channel_conv2d(const void* delta, const int64_t* channels, const void* weight, void* out,
                              const zokernels::cge::MixingShape* shape, int dtype, uintptr_t stream);
int zk_cge_one_channel_linear(const void* delta, const int64_t* channels, const void* weight, void* out,
                              int64_t replicas, int64_t batch, int64_t n_out, int64_t n_in, int dtype,
                              uintptr_t stream);
// Pointer tables: device arrays of n_params addresses (params, grads, buffers), numels [n_params].
// Coordinates: param_ids [n], elements [n], values [n]. update: SGD step at the coordinates (restricted mode);
// dense: instead the SGD step on every element of every parameter, reading .grad (after a coordinates pass).
int zk_cge_masked_sgd(const int64_t* params, const int64_t* grads, const int64_t* buffers, const int64_t* numels,
                      int64_t n_params, const int32_t* param_ids, const int64_t* elements, const void* values,
                      int64_t n, const void* hyper, int update, int dense, int64_t max_numel,
                      zokernels::cge::SgdFlags flags, int dtype, uintptr_t stream);
}
