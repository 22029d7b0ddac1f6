// Per-element logic of the CGE kernels, shared by the CUDA kernels (csrc/cuda/cge_*.cu) and their C++ CPU twins
// (csrc/cpu/cge_cpu.cpp), so that the arithmetic the GPU runs is also exercised by CPU tests.
// Formulas: zokernels/kernels/triton/cge_first_layer.py, cge_mixing.py, cge_sparse.py (same definitions).
// No torch headers: tensors arrive as raw pointers with explicit shapes and element strides.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define ZK_HD __host__ __device__ inline
#else
#define ZK_HD inline
#endif

namespace zokernels {
namespace cge {

enum BnMode : int { kBnNone = 0, kBnTrain = 1, kBnEval = 2 };

// x [B, C_in, H, W] and y [B, C_out, H', W'] with element strides; conv geometry of the layer.
struct FirstLayerShape {
  int64_t batch, c_in, h_in, w_in, c_out, h_out, w_out;
  int64_t sx[4], sy[4];
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// δ [K, B, H, W] (element strides sd), weight [C2, C1, kh, kw] (sw), out [K·B, C2, H2, W2] (so).
struct MixingShape {
  int64_t replicas, batch, h_in, w_in, c_out, kh, kw, h_out, w_out;
  int64_t sd[4], sw[4], so[4];
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// δ = h · x[b, c, oh·s − p + kh·d, ow·s − p + kw·d] (0 outside x) and base y[b, o, oh, ow] at flat position n.
template <typename T>
ZK_HD void seed_and_base(const T* x, const T* y, const FirstLayerShape& s, const int64_t* coord, T h, int64_t n,
                         T* delta, T* base) {
  const int64_t hw = s.h_out * s.w_out;
  const int64_t b = n / hw, rem = n - b * hw, oh = rem / s.w_out, ow = rem - oh * s.w_out;
  const int64_t ih = oh * s.stride_h - s.pad_h + coord[2] * s.dil_h;
  const int64_t iw = ow * s.stride_w - s.pad_w + coord[3] * s.dil_w;
  const bool inside = ih >= 0 && ih < s.h_in && iw >= 0 && iw < s.w_in;
  *delta = inside ? h * x[b * s.sx[0] + coord[1] * s.sx[1] + ih * s.sx[2] + iw * s.sx[3]] : T(0);
  *base = y[b * s.sy[0] + coord[0] * s.sy[1] + oh * s.sy[2] + ow * s.sy[3]];
}

// Per-channel table rows (see zokernels/kernels/first_layer.py _channel_table): mean, root|scale, gamma, beta.
template <typename T>
struct ChannelOps {
  T mean, root, gamma, beta;  // root: sqrt(var + eps) in train mode, gamma/sqrt(running_var + eps) in eval mode
  T a, b, e;                  // train-mode coefficients of the replica: δz = a·δ + b·c + e
};

template <typename T>
ZK_HD ChannelOps<T> load_channel(const T* chan, int64_t c_out, int64_t o) {
  ChannelOps<T> ops{chan[o], chan[c_out + o], chan[2 * c_out + o], chan[3 * c_out + o], T(1), T(0), T(0)};
  return ops;
}

// The engine's BN-train rule from the replica's sums Σδ, Σ(y − mean)·δ, Σδ² over its n values.
template <typename T>
ZK_HD void train_coefficients(ChannelOps<T>* ops, T sum_d, T sum_cd, T sum_dd, int64_t n) {
  const T d_mean = sum_d / T(n);
  T spread = sum_dd / T(n) - d_mean * d_mean;
  spread = spread > T(0) ? spread : T(0);
  const T d_var = T(2) * (sum_cd / T(n)) + spread;
  const T r = ops->root;
  const T new_root = std::sqrt(r * r + d_var);
  ops->a = ops->gamma * (T(1) / new_root);
  ops->b = ops->gamma * (-d_var / (r * new_root * (r + new_root)));
  ops->e = ops->gamma * (-d_mean / new_root);
}

// relu(bn(y + δ)) − relu(bn(y)) (or without BN / ReLU) from δ, base y and the channel's coefficients.
template <typename T>
ZK_HD T channel_delta(T d, T y, const ChannelOps<T>& ops, int bn_mode, bool relu) {
  T dz = d, z = y;
  if (bn_mode == kBnTrain) {
    const T centered = y - ops.mean;
    dz = d * ops.a + centered * ops.b + ops.e;
    z = ops.gamma * (centered / ops.root) + ops.beta;
  } else if (bn_mode == kBnEval) {
    dz = d * ops.root;
    z = (y - ops.mean) * ops.root + ops.beta;
  }
  if (!relu) return dz;
  const T low = -z > dz ? -z : dz;  // max(δz, −z) + min(z, 0): the engine's relu_delta
  return low + (z < T(0) ? z : T(0));
}

// One output element of the one-channel conv: Σ_taps δ[k, b, ih, iw] · W[co, o, i, j], taps in (i, j) order.
template <typename T>
ZK_HD T one_channel_conv_point(const T* delta, const T* weight, const MixingShape& s, int64_t k, int64_t b,
                               int64_t o, int64_t co, int64_t oh, int64_t ow) {
  T acc = T(0);
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
    if (ih < 0 || ih >= s.h_in) continue;
    for (int64_t j = 0; j < s.kw; ++j) {
      const int64_t iw = ow * s.stride_w - s.pad_w + j * s.dil_w;
      if (iw < 0 || iw >= s.w_in) continue;
      acc += delta[k * s.sd[0] + b * s.sd[1] + ih * s.sd[2] + iw * s.sd[3]] *
             weight[co * s.sw[0] + o * s.sw[1] + i * s.sw[2] + j * s.sw[3]];
    }
  }
  return acc;
}

// Shapes from the flat integer lists the Python launchers pass (zokernels/kernels/first_layer.py, mixing.py):
// sizes {B, C_in, H, W, C_out, H', W'}, strides {x: 4, y: 4}, geometry {stride h, w, padding h, w, dilation h, w}.
inline FirstLayerShape first_layer_shape(const int64_t* sizes, const int64_t* strides, const int64_t* geometry) {
  FirstLayerShape s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], {}, {},
                    geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]};
  for (int i = 0; i < 4; ++i) {
    s.sx[i] = strides[i];
    s.sy[i] = strides[4 + i];
  }
  return s;
}

// sizes {K, B, H, W, C2, kh, kw, H2, W2}, strides {δ: 4, weight: 4, out: 4}, geometry as above.
inline MixingShape mixing_shape(const int64_t* sizes, const int64_t* strides, const int64_t* geometry) {
  MixingShape s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7], sizes[8], {}, {}, {},
                geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]};
  for (int i = 0; i < 4; ++i) {
    s.sd[i] = strides[i];
    s.sw[i] = strides[4 + i];
    s.so[i] = strides[8 + i];
  }
  return s;
}

struct SgdFlags {
  bool weight_decay, momentum, first_step, nesterov;
};

// torch.optim.SGD on one element; hyper = {lr, momentum, 1 − dampening, weight decay}.
template <typename T>
ZK_HD void sgd_element(T* param, T* buffer, T g, const T* hyper, SgdFlags f) {
  const T p = *param;
  if (f.weight_decay) g = g + hyper[3] * p;
  if (f.momentum) {
    const T buf = f.first_step ? g : hyper[1] * *buffer + hyper[2] * g;
    *buffer = buf;
    g = f.nesterov ? g + hyper[1] * buf : buf;
  }
  *param = p - hyper[0] * g;
}

// ---- per-thread bodies of the CUDA kernels: the CPU twins call them from loops over (block, thread) -------------
constexpr int kFirstLayerThreads = 256;  // threads per replica block; the reduction tree below assumes a power of 2

// Thread t's strided share (n = t, t + threads, ...) of the replica's three BN-train sums.
template <typename T>
ZK_HD void first_layer_partial_sums(const T* x, const T* y, const FirstLayerShape& s, const int64_t* coord, T h,
                                    T mean, int64_t thread, int64_t threads, T sums[3]) {
  const int64_t n_total = s.batch * s.h_out * s.w_out;
  sums[0] = sums[1] = sums[2] = T(0);
  for (int64_t n = thread; n < n_total; n += threads) {
    T d, yv;
    seed_and_base(x, y, s, coord, h, n, &d, &yv);
    sums[0] += d;
    sums[1] += (yv - mean) * d;
    sums[2] += d * d;
  }
}

// Thread t's strided share of the replica's output.
template <typename T>
ZK_HD void first_layer_write(const T* x, const T* y, const FirstLayerShape& s, const int64_t* coord, T h,
                             const ChannelOps<T>& ops, int bn_mode, bool relu, T* out_k, int64_t thread,
                             int64_t threads) {
  const int64_t n_total = s.batch * s.h_out * s.w_out;
  for (int64_t n = thread; n < n_total; n += threads) {
    T d, yv;
    seed_and_base(x, y, s, coord, h, n, &d, &yv);
    out_k[n] = channel_delta(d, yv, ops, bn_mode, relu);
  }
}

// One output element (flat index over [K·B, C2, H2, W2] in logical NCHW order; stored through out's strides).
template <typename T>
ZK_HD void one_channel_conv2d_at(int64_t index, const T* delta, const int64_t* channels, const T* weight, T* out,
                                 const MixingShape& s) {
  const int64_t ow = index % s.w_out, oh = (index / s.w_out) % s.h_out;
  const int64_t co = (index / (s.w_out * s.h_out)) % s.c_out, row = index / (s.w_out * s.h_out * s.c_out);
  const int64_t k = row / s.batch, b = row - k * s.batch;
  out[row * s.so[0] + co * s.so[1] + oh * s.so[2] + ow * s.so[3]] =
      one_channel_conv_point(delta, weight, s, k, b, channels[k], co, oh, ow);
}

// One output element of the linear case: out[k·B + b, co] = δ[k, b] · W[co, c_k] (contiguous tensors).
template <typename T>
ZK_HD void one_channel_linear_at(int64_t index, const T* delta, const int64_t* channels, const T* weight, T* out,
                                 int64_t batch, int64_t n_out, int64_t n_in) {
  const int64_t co = index % n_out, row = index / n_out, k = row / batch;
  out[index] = delta[row] * weight[co * n_in + channels[k]];
}

template <typename T>
ZK_HD T* table_at(const int64_t* table, int64_t param) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[param]));
}

// Coordinate j: .grad ← value j; with update, the SGD step on that coordinate only.
template <typename T>
ZK_HD void masked_coordinate_at(int64_t j, const int64_t* params, const int64_t* grads, const int64_t* buffers,
                                const int32_t* param_ids, const int64_t* elements, const T* values,
                                const T* hyper, bool update, SgdFlags flags) {
  const int64_t param = param_ids[j], element = elements[j];
  const T g = values[j];
  table_at<T>(grads, param)[element] = g;
  if (update)
    sgd_element(table_at<T>(params, param) + element, table_at<T>(buffers, param) + element, g, hyper, flags);
}

// Element `element` of parameter `param`: the dense SGD step reading .grad (no-op past the parameter's end).
template <typename T>
ZK_HD void dense_sgd_at(int64_t param, int64_t element, const int64_t* params, const int64_t* grads,
                        const int64_t* buffers, const int64_t* numels, const T* hyper, SgdFlags flags) {
  if (element >= numels[param]) return;
  sgd_element(table_at<T>(params, param) + element, table_at<T>(buffers, param) + element,
              table_at<T>(grads, param)[element], hyper, flags);
}

}  // namespace cge
}  // namespace zokernels
