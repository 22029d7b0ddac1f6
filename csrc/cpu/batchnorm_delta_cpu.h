// Exact delta form of training-mode batch normalization (+ ReLU) for K replicas (see the .cpp).
#pragma once
#include <cstdint>

namespace zokernels {

// For every replica k with input change δ[k] ([N, C] rows, channels-last), writes the change of BN's output
// (and, if base_out is given, of ReLU(BN(x)) with base_out = BN(x)) without forming either side:
//   δvar = 2·mean(c·δ) + mean((δ − mean δ)²),  r' = sqrt(r² + δvar),
//   δy = γ·(δ/r' − c·δvar/(r·r'·(r + r')) − mean(δ)/r'),  δrelu = max(δy, −y) + min(y, 0),
// with c = x − mean(x) (`centered`, [N, C]) and r = sqrt(var(x) + eps) (`root`, [C]) of the base input.
// Statistics are accumulated in double in fixed-size blocks: results do not depend on the thread count.
void batchnorm_delta_cpu(const float* delta, const float* centered, const float* root, const float* weight,
                         const float* base_out, float* out, int64_t replicas, int64_t rows, int64_t channels);

}  // namespace zokernels
