// Exact change of ReLU(a + b) for K replicas of dense deltas (see the .cpp).
#pragma once
#include <cstdint>

namespace zokernels {

// out[k, i] = max(a[k, i] + b[k, i], −y[i]) + min(y[i], 0): ReLU(y + δa + δb) − ReLU(y) with y the base value of
// the sum (ReLU's input). b may be null (a plain ReLU delta). a, b, out: [replicas, numel]; y: [numel].
void residual_relu_delta_cpu(const float* a, const float* b, const float* y, float* out, int64_t replicas,
                             int64_t numel);

}  // namespace zokernels
