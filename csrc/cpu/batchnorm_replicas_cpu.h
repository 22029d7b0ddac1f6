// Per-replica training-mode batch normalization over channels-last [K, N, C] activations (see the .cpp).
#pragma once
#include <cstdint>

namespace zokernels {

// out[k, n, c] = (x[k, n, c] − mean[k, c]) · γ[c] / sqrt(var[k, c] + eps) + β[c]  (then ReLU if `relu`),
// mean/var over n of replica k, accumulated in double around center[c]. weight/bias may be null.
// Results do not depend on the OpenMP thread count. out must not overlap x.
void batchnorm_replicas_cpu(const float* x, float* out, int64_t replicas, int64_t rows, int64_t channels,
                            const float* center, const float* weight, const float* bias, double eps, bool relu);

}  // namespace zokernels
