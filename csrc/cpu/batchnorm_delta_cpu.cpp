// The CGE engine's dense stage in exact delta form: the change of a training-mode BN (and the ReLU after it)
// when its input changes by δ, for K replicas at once. In torch this rule is ~10 passes over [K, B, C, H, W]
// (three reductions, the affine combination, the ReLU rule); here it is two: moments of δ, then the output.
#include "batchnorm_delta_cpu.h"
#include "channel_width.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace zokernels {
namespace {

constexpr int64_t kRowsPerBlock = 2048;
constexpr int kMaxChannels = 256;

struct Moments {
  double sum[kMaxChannels], cross[kMaxChannels], square[kMaxChannels];
};

// Σδ, Σc·δ, Σδ² per channel over rows [begin, end). CHANNELS > 0 fixes the width so the loop vectorizes.
template <int CHANNELS>
void block_delta_moments(const float* __restrict delta, const float* __restrict centered, int64_t begin,
                         int64_t end, int64_t channels, Moments* __restrict m) {
  const int64_t width = CHANNELS > 0 ? CHANNELS : channels;
  double sum[kMaxChannels] = {}, cross[kMaxChannels] = {}, square[kMaxChannels] = {};
  for (int64_t n = begin; n < end; ++n) {
    const float* __restrict d_row = delta + n * width;
    const float* __restrict c_row = centered + n * width;
    for (int64_t c = 0; c < width; ++c) {
      const double d = d_row[c];
      sum[c] += d;
      cross[c] += d * static_cast<double>(c_row[c]);
      square[c] += d * d;
    }
  }
  std::copy(sum, sum + width, m->sum);
  std::copy(cross, cross + width, m->cross);
  std::copy(square, square + width, m->square);
}

struct Coefficients {
  std::vector<float> a, b, e;  // δy = a·δ + b·c + e per channel
};

Coefficients replica_coefficients(const float* delta, const float* centered, const float* root,
                                  const float* weight, int64_t rows, int64_t channels) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<Moments> partial(static_cast<size_t>(blocks));
#pragma omp parallel for schedule(static) if (rows * channels > (1 << 16))
  for (int64_t b = 0; b < blocks; ++b) {
    with_channel_width(channels, [&](auto width) {
      block_delta_moments<decltype(width)::value>(delta, centered, b * kRowsPerBlock,
                                                  std::min(rows, (b + 1) * kRowsPerBlock), channels, &partial[b]);
    });
  }
  Coefficients out{std::vector<float>(channels), std::vector<float>(channels), std::vector<float>(channels)};
  for (int64_t c = 0; c < channels; ++c) {
    double sum = 0.0, cross = 0.0, square = 0.0;
    for (const Moments& m : partial) {
      sum += m.sum[c];
      cross += m.cross[c];
      square += m.square[c];
    }
    const double n = static_cast<double>(rows);
    const double d_mean = sum / n;
    const double d_var = 2.0 * cross / n + std::max(0.0, square / n - d_mean * d_mean);
    const double r = root[c], r_new = std::sqrt(r * r + d_var);
    const double gamma = weight != nullptr ? weight[c] : 1.0;
    out.a[c] = static_cast<float>(gamma / r_new);
    out.b[c] = static_cast<float>(-gamma * d_var / (r * r_new * (r + r_new)));
    out.e[c] = static_cast<float>(-gamma * d_mean / r_new);
  }
  return out;
}

// out = a·δ + b·c + e, then the exact ReLU change max(δy, −y) + min(y, 0) when base_out (y) is given.
template <int CHANNELS>
void apply_rows(const float* __restrict delta, const float* __restrict centered, const float* __restrict base_out,
                float* __restrict out, int64_t rows, int64_t channels, const Coefficients& k) {
  const int64_t width = CHANNELS > 0 ? CHANNELS : channels;
  const float* __restrict a = k.a.data();
  const float* __restrict b = k.b.data();
  const float* __restrict e = k.e.data();
#pragma omp parallel for schedule(static) if (rows * width > (1 << 16))
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t c = 0; c < width; ++c) {
      const int64_t i = n * width + c;
      const float dy = delta[i] * a[c] + centered[i] * b[c] + e[c];
      if (base_out == nullptr) {
        out[i] = dy;
      } else {
        const float y = base_out[i];
        out[i] = std::max(dy, -y) + std::min(y, 0.0f);
      }
    }
  }
}

}  // namespace

void batchnorm_delta_cpu(const float* delta, const float* centered, const float* root, const float* weight,
                         const float* base_out, float* out, int64_t replicas, int64_t rows, int64_t channels) {
  if (replicas < 0 || rows < 1 || channels < 1 || channels > kMaxChannels) {
    throw std::invalid_argument("batchnorm_delta_cpu: need rows >= 1 and 1 <= channels <= 256");
  }
  for (int64_t k = 0; k < replicas; ++k) {
    const float* dk = delta + k * rows * channels;
    const Coefficients coefficients = replica_coefficients(dk, centered, root, weight, rows, channels);
    with_channel_width(channels, [&](auto width) {
      apply_rows<decltype(width)::value>(dk, centered, base_out, out + k * rows * channels, rows, channels,
                                         coefficients);
    });
  }
}

}  // namespace zokernels
