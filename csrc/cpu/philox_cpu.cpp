// OpenMP sweeps over Philox normal streams. All entry points take raw pointers so that the bindings stay
// torch-free (the Python side checks dtype, device and contiguity before calling).
#include "philox_cpu.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../philox.h"

namespace zokernels {
namespace {

// Work is split into chunks that never straddle a tensor; each element's value depends only on
// (seed, stream, offset + i), so the chunk size and thread count cannot change results.
constexpr int64_t kChunk = 1 << 14;

struct Chunk {
  int tensor;
  int64_t begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int t = 0; t < static_cast<int>(numels.size()); ++t)
    for (int64_t b = 0; b < numels[t]; b += kChunk) chunks.push_back({t, b, std::min(numels[t], b + kChunk)});
  return chunks;
}

float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  float magnitude;
  if (exponent == 0) magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  else if (exponent == 31) magnitude = mantissa ? NAN : INFINITY;
  else magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even, overflow to inf, gradual underflow
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00u;
  if (a >= 65520.0f) return sign | 0x7c00u;
  if (a < 6.103515625e-05f) {  // subnormal half: quantum 2^-24; nearbyint rounds half to even
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  int exponent;
  std::frexp(a, &exponent);                             // a = m * 2^exponent, m in [0.5, 1)
  const float quantum = std::ldexp(1.0f, exponent - 11);  // 10 explicit mantissa bits
  const float rounded = std::nearbyint(a / quantum) * quantum;
  int e2;
  const float m2 = std::frexp(rounded, &e2);
  const uint32_t biased = static_cast<uint32_t>(e2 - 1 + 15);
  const uint32_t mantissa = static_cast<uint32_t>(std::ldexp(m2 * 2.0f - 1.0f, 10));
  return sign | static_cast<uint16_t>((biased << 10) | mantissa);
}

// Calls visit(i, value) for i in [begin, end) with value = sum_k coeff_k * z(seed, stream_k, base + i), summed in
// fp32 in term order. Each Philox block yields four normals, so whole blocks are generated once.
template <typename Visit>
void for_each_combined_normal(uint64_t seed, const StreamTerm* terms, int n_terms, uint64_t base, int64_t begin,
                              int64_t end, Visit visit) {
  constexpr int64_t kGroup = 64;  // elements per pass over the terms
  float acc[kGroup + 8];
  for (int64_t g = begin; g < end; g += kGroup) {
    const int64_t g_end = std::min(end, g + kGroup);
    const uint64_t first = base + static_cast<uint64_t>(g), last = base + static_cast<uint64_t>(g_end);
    for (int64_t i = 0; i < g_end - g; ++i) acc[i] = 0.0f;
    for (int k = 0; k < n_terms; ++k) {
      for (uint64_t block = first >> 2; block <= (last - 1) >> 2; ++block) {
        float z[4];
        philox_normal4(seed, terms[k].stream, block, z);
        for (int lane = 0; lane < 4; ++lane) {
          const uint64_t index = block * 4 + static_cast<uint64_t>(lane);
          if (index >= first && index < last) acc[index - first] += terms[k].coeff * z[lane];
        }
      }
    }
    for (int64_t i = 0; i < g_end - g; ++i) visit(g + i, acc[i]);
  }
}

template <typename Load, typename Store>
void axpy_chunk(const Chunk& c, uint64_t seed, const StreamTerm* terms, int n_terms, uint64_t base_offset,
                Load load, Store store) {
  for_each_combined_normal(seed, terms, n_terms, base_offset, c.begin, c.end,
                           [&](int64_t i, float delta) { store(i, load(i), delta); });
}

}  // namespace

void philox_uint32_cpu(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t index = offset + static_cast<uint64_t>(i);
    const Uint4 r = philox4x32_10(index >> 2, stream, seed);
    const uint32_t lanes[4] = {r.x, r.y, r.z, r.w};
    out[i] = lanes[index & 3u];
  }
}

void philox_normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
  const StreamTerm unit{stream, 1.0f};
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c)
    for_each_combined_normal(seed, &unit, 1, offset, c * kChunk, std::min(n, (c + 1) * kChunk),
                             [out](int64_t i, float z) { out[i] = z; });
}

double philox_normal_sumsq_cpu(int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
  // Per-chunk partial sums added in chunk order keep the result independent of the thread count.
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(n_chunks), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    double acc = 0.0;
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
      const double z = philox_normal_at(seed, stream, offset + static_cast<uint64_t>(i));
      acc += z * z;
    }
    partial[static_cast<size_t>(c)] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

void philox_axpy_multi_cpu(const std::vector<TensorView>& tensors, uint64_t seed,
                           const std::vector<StreamTerm>& terms) {
  std::vector<int64_t> numels;
  for (const auto& t : tensors) numels.push_back(t.numel);
  const std::vector<Chunk> chunks = make_chunks(numels);
  const StreamTerm* term_ptr = terms.data();
  const int n_terms = static_cast<int>(terms.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t ci = 0; ci < static_cast<int64_t>(chunks.size()); ++ci) {
    const Chunk& c = chunks[static_cast<size_t>(ci)];
    const TensorView& t = tensors[static_cast<size_t>(c.tensor)];
    switch (t.dtype) {
      case DType::kFloat32: {
        float* p = static_cast<float*>(t.data);
        axpy_chunk(c, seed, term_ptr, n_terms, t.offset, [p](int64_t i) { return p[i]; },
                   [p](int64_t i, float x, float d) { p[i] = x + d; });
        break;
      }
      case DType::kFloat64: {
        double* p = static_cast<double*>(t.data);
        axpy_chunk(c, seed, term_ptr, n_terms, t.offset, [p](int64_t i) { return p[i]; },
                   [p](int64_t i, double x, float d) { p[i] = x + static_cast<double>(d); });
        break;
      }
      case DType::kFloat16: {
        uint16_t* p = static_cast<uint16_t*>(t.data);
        axpy_chunk(c, seed, term_ptr, n_terms, t.offset, [p](int64_t i) { return half_to_float(p[i]); },
                   [p](int64_t i, float x, float d) { p[i] = float_to_half(x + d); });
        break;
      }
      case DType::kBFloat16: {
        uint16_t* p = static_cast<uint16_t*>(t.data);
        axpy_chunk(c, seed, term_ptr, n_terms, t.offset, [p](int64_t i) { return bf16_to_float(p[i]); },
                   [p](int64_t i, float x, float d) { p[i] = float_to_bf16(x + d); });
        break;
      }
    }
  }
}

}  // namespace zokernels
