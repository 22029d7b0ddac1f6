// C++ CPU twins of csrc/cuda/cge_*.cu: the CUDA kernels' per-thread bodies (csrc/cge_kernels.h) called from loops
// over (block, thread), with the first layer's block reduction replayed in the CUDA tree order. Built like the
// CUDA code without FMA contraction, the twins are meant to give the GPU's numbers bit for bit; on the GPU,
// tests/test_kernels_cuda.py checks that.
#include "../cge_ops.h"

#include <cstdint>
#include <vector>

namespace zokernels {
namespace cge {
namespace {

// The CUDA block_sum tree: scratch[t] += scratch[t + width] for width = threads/2, ..., 1.
template <typename T>
T block_tree_sum(std::vector<T>& scratch) {
  for (size_t width = scratch.size() / 2; width > 0; width /= 2)
    for (size_t t = 0; t < width; ++t) scratch[t] += scratch[t + width];
  return scratch[0];
}

template <typename T>
void first_layer_delta(const T* x, const T* y, const int64_t* coords, const T* steps, const T* chan, T* out,
                       int64_t replicas, const FirstLayerShape& s, int bn_mode, bool relu) {
  const int64_t n_total = s.batch * s.h_out * s.w_out;
  const int64_t threads = kFirstLayerThreads;
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < replicas; ++k) {  // one CUDA block per replica
    const int64_t* coord = coords + 4 * k;
    ChannelOps<T> ops = load_channel(chan, s.c_out, coord[0]);
    if (bn_mode == kBnTrain) {
      std::vector<T> scratch[3] = {std::vector<T>(threads), std::vector<T>(threads), std::vector<T>(threads)};
      for (int64_t t = 0; t < threads; ++t) {
        T sums[3];
        first_layer_partial_sums(x, y, s, coord, steps[k], ops.mean, t, threads, sums);
        for (int i = 0; i < 3; ++i) scratch[i][t] = sums[i];
      }
      train_coefficients(&ops, block_tree_sum(scratch[0]), block_tree_sum(scratch[1]), block_tree_sum(scratch[2]),
                         n_total);
    }
    first_layer_write(x, y, s, coord, steps[k], ops, bn_mode, relu, out + k * n_total, 0, 1);
  }
}

template <typename T>
void one_channel_conv2d(const T* delta, const int64_t* channels, const T* weight, T* out, const MixingShape& s) {
  const int64_t total = s.replicas * s.batch * s.c_out * s.h_out * s.w_out;
#pragma omp parallel for schedule(static)
  for (int64_t index = 0; index < total; ++index) one_channel_conv2d_at(index, delta, channels, weight, out, s);
}

template <typename T>
void one_channel_linear(const T* delta, const int64_t* channels, const T* weight, T* out, int64_t replicas,
                        int64_t batch, int64_t n_out, int64_t n_in) {
  const int64_t total = replicas * batch * n_out;
#pragma omp parallel for schedule(static)
  for (int64_t index = 0; index < total; ++index)
    one_channel_linear_at(index, delta, channels, weight, out, batch, n_out, n_in);
}

template <typename T>
void masked_sgd(const int64_t* params, const int64_t* grads, const int64_t* buffers, const int64_t* numels,
                int64_t n_params, const int32_t* param_ids, const int64_t* elements, const T* values, int64_t n,
                const T* hyper, bool update, bool dense, SgdFlags flags) {
  if (dense) {
    for (int64_t p = 0; p < n_params; ++p) {
#pragma omp parallel for schedule(static)
      for (int64_t e = 0; e < numels[p]; ++e) dense_sgd_at(p, e, params, grads, buffers, numels, hyper, flags);
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j)
    masked_coordinate_at(j, params, grads, buffers, param_ids, elements, values, hyper, update, flags);
}
}  // namespace

void first_layer_delta_cpu(const void* x, const void* y, const int64_t* coords, const void* steps, const void* chan,
                           void* out, int64_t replicas, const FirstLayerShape& shape, int bn_mode, bool relu,
                           int dtype) {
  if (dtype == 1) {
    first_layer_delta(static_cast<const double*>(x), static_cast<const double*>(y), coords,
                      static_cast<const double*>(steps), static_cast<const double*>(chan), static_cast<double*>(out),
                      replicas, shape, bn_mode, relu);
  } else {
    first_layer_delta(static_cast<const float*>(x), static_cast<const float*>(y), coords,
                      static_cast<const float*>(steps), static_cast<const float*>(chan), static_cast<float*>(out),
                      replicas, shape, bn_mode, relu);
  }
}

void one_channel_conv2d_cpu(const void* delta, const int64_t* channels, const void* weight, void* out,
                            const MixingShape& shape, int dtype) {
  if (dtype == 1) {
    one_channel_conv2d(static_cast<const double*>(delta), channels, static_cast<const double*>(weight),
                       static_cast<double*>(out), shape);
  } else {
    one_channel_conv2d(static_cast<const float*>(delta), channels, static_cast<const float*>(weight),
                       static_cast<float*>(out), shape);
  }
}

void one_channel_linear_cpu(const void* delta, const int64_t* channels, const void* weight, void* out,
                            int64_t replicas, int64_t batch, int64_t n_out, int64_t n_in, int dtype) {
  if (dtype == 1) {
    one_channel_linear(static_cast<const double*>(delta), channels, static_cast<const double*>(weight),
                       static_cast<double*>(out), replicas, batch, n_out, n_in);
  } else {
    one_channel_linear(static_cast<const float*>(delta), channels, static_cast<const float*>(weight),
                       static_cast<float*>(out), replicas, batch, n_out, n_in);
  }
}

void masked_sgd_cpu(const int64_t* params, const int64_t* grads, const int64_t* buffers, const int64_t* numels,
                    int64_t n_params, const int32_t* param_ids, const int64_t* elements, const void* values,
                    int64_t n, const void* hyper, bool update, bool dense, SgdFlags flags, int dtype) {
  if (dtype == 1) {
    masked_sgd(params, grads, buffers, numels, n_params, param_ids, elements, static_cast<const double*>(values), n,
               static_cast<const double*>(hyper), update, dense, flags);
  } else {
    masked_sgd(params, grads, buffers, numels, n_params, param_ids, elements, static_cast<const float*>(values), n,
               static_cast<const float*>(hyper), update, dense, flags);
  }
}
}  // namespace cge
}  // namespace zokernels
