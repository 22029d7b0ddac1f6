// The end of a residual block in exact delta form, ReLU(bn2 + shortcut): the residual add and the ReLU rule fused
// into one streaming pass (torch needs five: add, neg, maximum, clamp, add).
#include "residual_relu_delta_cpu.h"

#include <algorithm>

namespace zokernels {

void residual_relu_delta_cpu(const float* a, const float* b, const float* y, float* out, int64_t replicas,
                             int64_t numel) {
  const int64_t total = replicas * numel;
#pragma omp parallel for schedule(static) if (total > (1 << 16))
  for (int64_t k = 0; k < replicas; ++k) {
    const float* __restrict ak = a + k * numel;
    const float* __restrict bk = b != nullptr ? b + k * numel : nullptr;
    const float* __restrict yk = y;
    float* __restrict outk = out + k * numel;
    if (bk != nullptr) {
      for (int64_t i = 0; i < numel; ++i) outk[i] = std::max(ak[i] + bk[i], -yk[i]) + std::min(yk[i], 0.0f);
    } else {
      for (int64_t i = 0; i < numel; ++i) outk[i] = std::max(ak[i], -yk[i]) + std::min(yk[i], 0.0f);
    }
  }
}

}  // namespace zokernels
