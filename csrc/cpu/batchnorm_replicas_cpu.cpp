// Batch normalization in training mode for K replicas at once (the CGE engine's dense stage, perturbed form):
// every replica k normalizes with its own batch statistics, as the model would on that replica alone.
//
// Layout: channels-last activations viewed as [K, N, C] (N = B·H·W, C contiguous), which is how the engine keeps
// a channels-last [K·B, C, H, W] tensor. torch offers no per-replica reduction that is both fast and accurate here:
// var_mean over (B, H, W) runs ~20x slower than a plain sum on this layout, and the native channels-last
// batch_norm accumulates its statistics in float (errors ~1e-4 on 2^18 elements). This kernel makes two streaming
// passes: statistics accumulated in double around a per-channel center (the base batch mean, so that the
// perturbed replica's variance is formed without cancellation), then normalize (+ ReLU) in float.
#include "batchnorm_replicas_cpu.h"
#include "channel_width.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace zokernels {
namespace {

// Rows per statistics block. Blocks are summed in a fixed order, so results do not depend on the thread count.
constexpr int64_t kRowsPerBlock = 2048;

// Sums of (x − center) and (x − center)² per channel over rows [begin, end) of one replica. CHANNELS > 0 fixes
// the channel count at compile time so the inner loop vectorizes (ResNet widths); 0 is the generic loop.
template <int CHANNELS>
void block_moments(const float* __restrict x, int64_t begin, int64_t end, int64_t channels,
                   const float* __restrict center, double* __restrict sum, double* __restrict sum_sq) {
  constexpr int kMaxLocal = 64;
  const int64_t width = CHANNELS > 0 ? CHANNELS : channels;
  if (CHANNELS == 0 || width > kMaxLocal) {
    for (int64_t c = 0; c < width; ++c) sum[c] = sum_sq[c] = 0.0;
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < width; ++c) {
        const double d = static_cast<double>(x[n * width + c]) - static_cast<double>(center[c]);
        sum[c] += d;
        sum_sq[c] += d * d;
      }
    }
    return;
  }
  // Local accumulators (no aliasing with the inputs) let the compiler keep them in vector registers.
  double local_sum[kMaxLocal] = {}, local_sq[kMaxLocal] = {};
  float local_center[kMaxLocal];
  for (int64_t c = 0; c < width; ++c) local_center[c] = center[c];
  for (int64_t n = begin; n < end; ++n) {
    const float* __restrict row = x + n * width;
    for (int c = 0; c < CHANNELS; ++c) {
      const double d = static_cast<double>(row[c] - local_center[c]);
      local_sum[c] += d;
      local_sq[c] += d * d;
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    sum[c] = local_sum[c];
    sum_sq[c] = local_sq[c];
  }
}

// Per-channel mean and 1/sqrt(var + eps) of one replica (biased variance, as BN uses for normalization).
void replica_statistics(const float* x, int64_t rows, int64_t channels, const float* center, double eps,
                        std::vector<float>& mean, std::vector<float>& inv_std) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<double> partial(static_cast<size_t>(blocks * channels * 2));
#pragma omp parallel for schedule(static) if (rows * channels > (1 << 16))
  for (int64_t b = 0; b < blocks; ++b) {
    double* sum = partial.data() + b * channels * 2;
    with_channel_width(channels, [&](auto width) {
      block_moments<decltype(width)::value>(x, b * kRowsPerBlock, std::min(rows, (b + 1) * kRowsPerBlock), channels,
                                            center, sum, sum + channels);
    });
  }
  for (int64_t c = 0; c < channels; ++c) {
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      sum += partial[b * channels * 2 + c];
      sum_sq += partial[b * channels * 2 + channels + c];
    }
    const double shift = sum / static_cast<double>(rows);
    const double var = std::max(0.0, sum_sq / static_cast<double>(rows) - shift * shift);
    mean[c] = static_cast<float>(static_cast<double>(center[c]) + shift);
    inv_std[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
}

// out = (x − mean)·(inv_std·γ) + β, then max(·, 0) if relu; float arithmetic, one streaming pass.
template <int CHANNELS, bool RELU>
void normalize_rows(const float* __restrict x, float* __restrict out, int64_t rows, int64_t channels,
                    const float* __restrict mean, const float* __restrict scale, const float* __restrict shift) {
  const int64_t width = CHANNELS > 0 ? CHANNELS : channels;
#pragma omp parallel for schedule(static) if (rows * width > (1 << 16))
  for (int64_t n = 0; n < rows; ++n) {
    const float* in_row = x + n * width;
    float* out_row = out + n * width;
    for (int64_t c = 0; c < width; ++c) {
      const float value = (in_row[c] - mean[c]) * scale[c] + shift[c];
      out_row[c] = RELU ? (value > 0.0f ? value : 0.0f) : value;
    }
  }
}

}  // namespace

void batchnorm_replicas_cpu(const float* x, float* out, int64_t replicas, int64_t rows, int64_t channels,
                            const float* center, const float* weight, const float* bias, double eps, bool relu) {
  if (replicas < 0 || rows < 1 || channels < 1) throw std::invalid_argument("batchnorm_replicas_cpu: bad shape");
  std::vector<float> mean(static_cast<size_t>(channels)), inv_std(static_cast<size_t>(channels));
  std::vector<float> scale(static_cast<size_t>(channels)), shift(static_cast<size_t>(channels));
  for (int64_t k = 0; k < replicas; ++k) {
    const float* xk = x + k * rows * channels;
    replica_statistics(xk, rows, channels, center, eps, mean, inv_std);
    for (int64_t c = 0; c < channels; ++c) {
      scale[c] = weight != nullptr ? inv_std[c] * weight[c] : inv_std[c];
      shift[c] = bias != nullptr ? bias[c] : 0.0f;
    }
    float* outk = out + k * rows * channels;
    with_channel_width(channels, [&](auto width) {
      constexpr int kWidth = decltype(width)::value;
      if (relu) normalize_rows<kWidth, true>(xk, outk, rows, channels, mean.data(), scale.data(), shift.data());
      else normalize_rows<kWidth, false>(xk, outk, rows, channels, mean.data(), scale.data(), shift.data());
    });
  }
}

}  // namespace zokernels
