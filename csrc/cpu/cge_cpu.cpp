// C++ CPU twins of csrc/cuda/cge_*.cu. The per-replica sums run sequentially (the CUDA kernel sums in a block
// tree): results agree to rounding, not bitwise. Everything else is element for element the CUDA arithmetic.
#include "cge_cpu.h"

#include <cstdint>

namespace zokernels {
namespace cge {
namespace {

template <typename T>
void first_layer_delta(const T* x, const T* y, const int64_t* coords, const T* steps, const T* chan, T* out,
                       int64_t replicas, const FirstLayerShape& s, int bn_mode, bool relu) {
  const int64_t n_total = s.batch * s.h_out * s.w_out;
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < replicas; ++k) {
    const int64_t* coord = coords + 4 * k;
    ChannelOps<T> ops = load_channel(chan, s.c_out, coord[0]);
    T d, yv;
    if (bn_mode == kBnTrain) {
      T sum_d = 0, sum_cd = 0, sum_dd = 0;
      for (int64_t n = 0; n < n_total; ++n) {
        seed_and_base(x, y, s, coord, steps[k], n, &d, &yv);
        sum_d += d;
        sum_cd += (yv - ops.mean) * d;
        sum_dd += d * d;
      }
      train_coefficients(&ops, sum_d, sum_cd, sum_dd, n_total);
    }
    for (int64_t n = 0; n < n_total; ++n) {
      seed_and_base(x, y, s, coord, steps[k], n, &d, &yv);
      out[k * n_total + n] = channel_delta(d, yv, ops, bn_mode, relu);
    }
  }
}

template <typename T>
void one_channel_conv2d(const T* delta, const int64_t* channels, const T* weight, T* out, const MixingShape& s) {
  const int64_t rows = s.replicas * s.batch;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t k = row / s.batch, b = row - k * s.batch;
    for (int64_t co = 0; co < s.c_out; ++co)
      for (int64_t oh = 0; oh < s.h_out; ++oh)
        for (int64_t ow = 0; ow < s.w_out; ++ow)
          out[row * s.so[0] + co * s.so[1] + oh * s.so[2] + ow * s.so[3]] =
              one_channel_conv_point(delta, weight, s, k, b, channels[k], co, oh, ow);
  }
}

template <typename T>
T* at(const int64_t* table, int64_t param) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[param]));
}

template <typename T>
void masked_sgd(const int64_t* params, const int64_t* grads, const int64_t* buffers, const int64_t* numels,
                int64_t n_params, const int32_t* param_ids, const int64_t* elements, const T* values, int64_t n,
                const T* hyper, bool update, bool dense, SgdFlags flags) {
  if (dense) {
    for (int64_t p = 0; p < n_params; ++p) {
      T *param = at<T>(params, p), *buffer = at<T>(buffers, p), *grad = at<T>(grads, p);
#pragma omp parallel for schedule(static)
      for (int64_t e = 0; e < numels[p]; ++e) sgd_element(param + e, buffer + e, grad[e], hyper, flags);
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = param_ids[j], e = elements[j];
    at<T>(grads, p)[e] = values[j];
    if (update) sgd_element(at<T>(params, p) + e, at<T>(buffers, p) + e, values[j], hyper, flags);
  }
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
