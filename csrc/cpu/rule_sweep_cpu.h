// The fused rule sweep on the CPU (the C++ twin of csrc/cuda/rule_sweep.cu; element arithmetic: csrc/rule_sweep.h).
#pragma once
#include <cstdint>
#include <vector>

#include "philox_cpu.h"

namespace zokernels {

// One parameter tensor of a rule sweep: out = RN(src + delta), delta from the rule row (kRuleRow fp32 scalars) and
// the fp32 state m, v (adam; null otherwise), all contiguous with `numel` elements; `offset` is the tensor's first
// element in the parameter stream. out may equal src.
struct RuleTensor {
  void* out;
  const void* src;
  float* m;
  float* v;
  int64_t numel;
  uint64_t offset;
  DType dtype;
  const float* row;
};

// For every tensor and element i: g = sum_k coeff_k * z(seed, stream_k, offset + i) in fp32 (never stored), then
// the rule `rule` (RuleCode) and weight decay, one pass over all tensors (OpenMP over chunks of one tensor).
void rule_sweep_cpu(const std::vector<RuleTensor>& tensors, uint64_t seed, const std::vector<StreamTerm>& terms,
                    int rule);

}  // namespace zokernels
