// The fused rule sweep on the CPU: the sweeps' fp32 combination (philox_combination_batches) feeds the element
// arithmetic of csrc/rule_sweep.h batch by batch, so the estimate g is never written to memory.
#include "rule_sweep_cpu.h"

#include <algorithm>
#include <cstring>

#include "../rule_sweep.h"
#include "storage_cpu.h"

namespace zokernels {
namespace {

// As in philox_cpu.cpp: chunks never straddle a tensor, and every element depends only on its own inputs, so the
// split and the thread count cannot change results.
constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kParallelMin = 1 << 16;

using storage::BFloatBits;
using storage::HalfBits;
using storage::load;
using storage::store;

// The sink of one batch: elements i0 .. i0 + n of the tensor, g[j] their combination.
template <typename T, int Rule>
void apply_rule(void* context, int64_t i0, const float* g, int64_t n) {
  const RuleTensor& t = *static_cast<const RuleTensor*>(context);
  const T* src = static_cast<const T*>(t.src) + i0;
  T* out = static_cast<T*>(t.out) + i0;
  for (int64_t j = 0; j < n; ++j) {
    const auto x = load(src[j]);
    float delta;
    if constexpr (rule_states(Rule) == 2) delta = rule_delta<Rule>(g[j], t.row, t.m + i0 + j, t.v + i0 + j);
    else if constexpr (rule_states(Rule) == 1) delta = rule_delta<Rule>(g[j], t.row, t.m + i0 + j, nullptr);
    else delta = rule_delta<Rule>(g[j], t.row, nullptr, nullptr);
    delta = with_decay(delta, x, t.row);
    out[j] = store<T>(x + static_cast<decltype(x)>(delta));
  }
}

template <int Rule>
CombinationSink sink_for(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return &apply_rule<double, Rule>;
    case DType::kFloat16: return &apply_rule<HalfBits, Rule>;
    case DType::kBFloat16: return &apply_rule<BFloatBits, Rule>;
    default: return &apply_rule<float, Rule>;
  }
}

CombinationSink sink_for(int rule, DType dtype) {
  if (rule == kRuleSign) return sink_for<kRuleSign>(dtype);
  if (rule == kRuleAdam) return sink_for<kRuleAdam>(dtype);
  if (rule == kRuleMomentum) return sink_for<kRuleMomentum>(dtype);
  if (rule == kRuleSignMomentum) return sink_for<kRuleSignMomentum>(dtype);
  return sink_for<kRuleLinear>(dtype);
}

}  // namespace

void rule_sweep_cpu(const std::vector<RuleTensor>& tensors, uint64_t seed, const std::vector<StreamTerm>& terms,
                    int rule) {
  struct Chunk { size_t tensor; int64_t begin, end; };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    for (int64_t b = 0; b < tensors[t].numel; b += kChunk)
      chunks.push_back({t, b, std::min(tensors[t].numel, b + kChunk)});
    total += tensors[t].numel;
  }
  const int n_terms = static_cast<int>(terms.size());
#pragma omp parallel for schedule(dynamic, 1) if (total >= kParallelMin)
  for (int64_t ci = 0; ci < static_cast<int64_t>(chunks.size()); ++ci) {
    const Chunk& c = chunks[static_cast<size_t>(ci)];
    const RuleTensor& t = tensors[c.tensor];
    philox_combination_batches(seed, terms.data(), n_terms, t.offset, c.begin, c.end, sink_for(rule, t.dtype),
                               const_cast<RuleTensor*>(&t));
  }
}

}  // namespace zokernels
