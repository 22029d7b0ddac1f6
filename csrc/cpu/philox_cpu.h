// CPU Philox sweeps (see csrc/philox.h for the stream definition).
#pragma once
#include <cstdint>
#include <vector>

namespace zokernels {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// A contiguous tensor's storage and the global element offset of its first element in the parameter stream.
struct TensorView {
  void* data;
  int64_t numel;
  uint64_t offset;
  DType dtype;
};

// One term coeff * z(seed, stream, .) of a linear combination of normal streams.
struct StreamTerm {
  uint64_t stream;
  float coeff;
};

void philox_uint32_cpu(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset);
void philox_normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset);
double philox_normal_sumsq_cpu(int64_t n, uint64_t seed, uint64_t stream, uint64_t offset);
// For every tensor t and element i: t[i] += sum_k coeff_k * z(seed, stream_k, t.offset + i), one pass.
void philox_axpy_multi_cpu(const std::vector<TensorView>& tensors, uint64_t seed,
                           const std::vector<StreamTerm>& terms);

}  // namespace zokernels
