// Per-element arithmetic of the fused rule sweep (zokernels/kernels/rule_sweep.py), shared by the CUDA kernel
// (csrc/cuda/rule_sweep.cu) and its C++ CPU twin (csrc/cpu/rule_sweep_cpu.cpp), so that the CPU tests run the GPU's
// arithmetic. Given the fp32 estimate g = sum_k fl32(c_k) * z_k of one element (formed in registers, never stored),
// the rule gives the fp32 step delta (lr included), advancing its fp32 state in place, and decoupled weight decay
// adds fl32(x * decay). Every operation is one correctly rounded fp32 operation in the order of
// zokernels/optim/rules.py (the materialized path), so the two agree bit for bit.
#pragma once
#include <cstdint>

#include "philox.h"

namespace zokernels {

// Rule codes (zokernels/kernels/rule_sweep.py RULES) and the per-tensor row of fp32 scalars they read.
enum RuleCode : int { kRuleLinear = 0, kRuleSign = 1, kRuleAdam = 2, kRuleMomentum = 3, kRuleSignMomentum = 4 };
constexpr int kRuleLast = kRuleSignMomentum;
// Row: [has_decay (0 or 1), decay = fl32(-lr * wd), then the rule's scalars]
//   sign: step = fl32(-lr)
//   adam: beta1, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^k), eps, step = fl32(-lr / (1 - beta1^k))
//   momentum (SGD, dampening 0): beta, first (1 on the tensor's first step: m = g), step = fl32(-lr)
//   sign_momentum (signum): beta, 1 - beta, step = fl32(-lr)
constexpr int kRuleRow = 9;

// fp32 state tensors per tensor: adam m, v; the momentum rules m; the others none.
ZK_HOST_DEVICE constexpr int rule_states(int rule) {
  return rule == kRuleAdam ? 2 : (rule == kRuleMomentum || rule == kRuleSignMomentum) ? 1 : 0;
}

#if defined(__CUDA_ARCH__)
ZK_HOST_DEVICE float zk_div(float a, float b) { return __fdiv_rn(a, b); }
#else
ZK_HOST_DEVICE float zk_div(float a, float b) { return a / b; }
#endif

// torch.sign: -1, 0 or 1 (0 for +-0 and NaN). Branch-free: the signs of an estimate are coin flips, which a branch
// mispredicts half the time.
ZK_HOST_DEVICE float zk_sign(float g) {
  return static_cast<float>(static_cast<int>(g > 0.0f) - static_cast<int>(g < 0.0f));
}

// The rule's step for one element; m and v point at its state (adam: both; the momentum rules: m) and are updated.
template <int Rule>
ZK_HOST_DEVICE float rule_delta(float g, const float* row, float* m, float* v) {
  if (Rule == kRuleSign) return zk_mul(zk_sign(g), row[2]);
  if (Rule == kRuleMomentum) {
    const float m_new = row[3] != 0.0f ? g : zk_add(zk_mul(*m, row[2]), g);
    *m = m_new;
    return zk_mul(m_new, row[4]);
  }
  if (Rule == kRuleSignMomentum) {
    const float m_new = zk_add(zk_mul(*m, row[2]), zk_mul(g, row[3]));
    *m = m_new;
    return zk_mul(zk_sign(m_new), row[4]);
  }
  if (Rule == kRuleAdam) {
    const float m_new = zk_add(zk_mul(*m, row[2]), zk_mul(g, row[3]));
    const float v_new = zk_add(zk_mul(*v, row[4]), zk_mul(zk_mul(g, g), row[5]));
    *m = m_new;
    *v = v_new;
    const float denom = zk_add(zk_div(zk_sqrt(v_new), row[6]), row[7]);
    return zk_mul(zk_div(m_new, denom), row[8]);
  }
  return g;  // linear: the coefficients already carry -lr
}

// fl32(x * decay), x the parameter widened to fp32 (fp64 for fp64 tensors: the product is formed in fp64 and
// rounded once to fp32, as the materialized path does).
ZK_HOST_DEVICE float decay_term(float x, float decay) { return zk_mul(x, decay); }
#if defined(__CUDA_ARCH__)
ZK_HOST_DEVICE float decay_term(double x, float decay) { return __double2float_rn(__dmul_rn(x, decay)); }
#else
ZK_HOST_DEVICE float decay_term(double x, float decay) { return static_cast<float>(x * static_cast<double>(decay)); }
#endif

// delta + fl32(x * decay) where the row has weight decay (row[0] = 1), else delta.
template <typename W>
ZK_HOST_DEVICE float with_decay(float delta, W x, const float* row) {
  return row[0] == 0.0f ? delta : zk_add(delta, decay_term(x, row[1]));
}

}  // namespace zokernels
