// CPU Philox sweeps (see csrc/philox.h for the stream definition, docs/philox.md for the design).
#pragma once
#include <cstdint>
#include <vector>

namespace zokernels {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// A contiguous tensor's storage and the global element offset of its first element in the parameter stream.
// src, when set, is read instead of data (out-of-place sweep data = src + ...); minus, when set, also receives
// src - ... from the same z (both points of a central difference in one pass). Same numel and dtype.
struct TensorView {
  void* data;
  int64_t numel;
  uint64_t offset;
  DType dtype;
  const void* src = nullptr;
  void* minus = nullptr;
};

// One term coeff * z(seed, stream, .) of a linear combination of normal streams.
struct StreamTerm {
  uint64_t stream;
  float coeff;
};

// philox_normal_at element by element: the scalar definition, for tests of the batched path.
void philox_normal_scalar_cpu(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset);
void philox_uint32_cpu(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset);
void philox_normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset);
double philox_normal_sumsq_cpu(int64_t n, uint64_t seed, uint64_t stream, uint64_t offset);
// For every tensor t and element i: t[i] = (src or t)[i] + d_i (and minus[i] = (src or t)[i] - d_i), d_i = sum_k coeff_k * z(seed, stream_k, t.offset + i), one
// pass over all tensors.
void philox_axpy_multi_cpu(const std::vector<TensorView>& tensors, uint64_t seed,
                           const std::vector<StreamTerm>& terms);
// The sweeps' fp32 combination d_i = sum_k coeff_k * z(seed, stream_k, base + i) for the elements [begin, end), in
// batches aligned to Philox blocks, each handed to sink(context, i0, d, n) (d[0..n) are elements i0 .. i0 + n - 1).
// Single-threaded (the caller splits the work); the same summation as philox_axpy_multi_cpu, for kernels that fuse
// their own element update into the sweep (csrc/cpu/rule_sweep_cpu.cpp).
using CombinationSink = void (*)(void* context, int64_t i0, const float* d, int64_t n);
void philox_combination_batches(uint64_t seed, const StreamTerm* terms, int n_terms, uint64_t base, int64_t begin,
                                int64_t end, CombinationSink sink, void* context);

}  // namespace zokernels
