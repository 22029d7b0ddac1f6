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
// Below this many elements a sweep runs on the calling thread: waking the OpenMP team costs more than the work,
// and on a busy machine it can wait a whole scheduler slice (~10 ms).
constexpr int64_t kParallelMin = 1 << 16;

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

// Philox4x32-10 for kBatchBlocks consecutive counter blocks, lanes stored structure-of-arrays. Integer-only and
// branch-free, so the compiler vectorizes it (vpmuludq); results are bit-identical to philox4x32_10 on any ISA.
constexpr int kBatchBlocks = 64;

__attribute__((target_clones("avx512f", "avx2", "default")))
void philox_batch(uint64_t first_block, uint64_t stream, uint64_t seed, uint32_t* __restrict x,
                  uint32_t* __restrict y, uint32_t* __restrict z, uint32_t* __restrict w) {
  const uint32_t c2_init = static_cast<uint32_t>(stream), c3_init = static_cast<uint32_t>(stream >> 32);
  for (int b = 0; b < kBatchBlocks; ++b) {
    const uint64_t block = first_block + static_cast<uint64_t>(b);
    uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
    uint32_t c2 = c2_init, c3 = c3_init;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0, p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    x[b] = c0; y[b] = c1; z[b] = c2; w[b] = c3;
  }
}

// ---- Vectorized Box-Muller that reproduces libm bit for bit ----------------------------------------------------
// box_muller() spends ~90% of a sweep in scalar logf/sincosf. Their arguments take only 2^24 values each
// (u = (bits >> 8) * 2^-24 + 2^-25, and the fp32 angle 2*pi_f*u), so the fast path can be compared with libm on
// *every* possible argument. It evaluates log, sin and cos in double precision (vectorizable, error ~1e-16) and
// rounds to fp32. libm is not correctly rounded (up to ~0.8 ulp), so ~1% of arguments round differently; a
// once-per-process exhaustive pass marks them in two 2 MiB bitmaps, and pairs with a marked argument are
// recomputed with box_muller() itself. Every z is therefore identical to the scalar definition by construction.

inline float open_unit(uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f;
}

inline double log_open_unit(float u) {  // natural log of u in (0, 1), double accuracy
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
  int exponent = static_cast<int>(bits >> 23) - 127;
  double m = static_cast<double>(bits & 0x7fffffu) * (1.0 / 8388608.0) + 1.0;  // u = m * 2^exponent, m in [1, 2)
  const bool high = m > 1.4142135623730951;
  m = high ? 0.5 * m : m;
  exponent += high ? 1 : 0;
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;  // log m = 2 atanh(s), |s| < 0.172
  double p = 1.0 / 21.0;
  p = p * s2 + 1.0 / 19.0; p = p * s2 + 1.0 / 17.0; p = p * s2 + 1.0 / 15.0; p = p * s2 + 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0; p = p * s2 + 1.0 / 9.0; p = p * s2 + 1.0 / 7.0; p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0; p = p * s2 + 1.0;
  return static_cast<double>(exponent) * 0.69314718055994530942 + 2.0 * s * p;
}

inline void sincos_small(float angle, double* sine, double* cosine) {  // angle in [0, 2*pi + ulp]
  const double a = angle;
  const double k = static_cast<double>(static_cast<int>(a * 0.63661977236758134308 + 0.5));
  // pi/2 in three parts (33 + 33 + rest bits): k * part1 is exact, so r carries no cancellation error.
  const double r = ((a - k * 1.5707963267341256) - k * 6.077100506303966e-11) - k * 2.0222662487959506e-21;
  const double r2 = r * r;
  double sp = 1.0 / 355687428096000.0;  // Taylor series of sin and cos to degree 17 and 16; |r| <= pi/4
  sp = sp * r2 - 1.0 / 1307674368000.0; sp = sp * r2 + 1.0 / 6227020800.0; sp = sp * r2 - 1.0 / 39916800.0;
  sp = sp * r2 + 1.0 / 362880.0; sp = sp * r2 - 1.0 / 5040.0; sp = sp * r2 + 1.0 / 120.0; sp = sp * r2 - 1.0 / 6.0;
  const double sr = r + r * r2 * sp;
  double cp = 1.0 / 20922789888000.0;
  cp = cp * r2 - 1.0 / 87178291200.0; cp = cp * r2 + 1.0 / 479001600.0; cp = cp * r2 - 1.0 / 3628800.0;
  cp = cp * r2 + 1.0 / 40320.0; cp = cp * r2 - 1.0 / 720.0; cp = cp * r2 + 1.0 / 24.0; cp = cp * r2 - 0.5;
  const double cr = 1.0 + r2 * cp;
  const int quadrant = static_cast<int>(k) & 3;
  const double s_abs = (quadrant & 1) ? cr : sr, c_abs = (quadrant & 1) ? sr : cr;
  *sine = (quadrant >= 2) ? -s_abs : s_abs;
  *cosine = (quadrant == 1 || quadrant == 2) ? -c_abs : c_abs;
}

// log(u1), sin(angle), cos(angle) of pair i's Box-Muller arguments, each correctly rounded to fp32.
__attribute__((target_clones("avx512f", "avx2", "default")))
void box_muller_parts(const uint32_t* __restrict a, const uint32_t* __restrict b, int n, float* __restrict log_u,
                      float* __restrict sine, float* __restrict cosine) {
  for (int i = 0; i < n; ++i) {
    double s, c;
    sincos_small(6.28318548202514648f * open_unit(b[i]), &s, &c);
    log_u[i] = static_cast<float>(log_open_unit(open_unit(a[i])));
    sine[i] = static_cast<float>(s);
    cosine[i] = static_cast<float>(c);
  }
}

// Bit k set: argument index k (bits >> 8) rounds differently in libm than in box_muller_parts.
struct LibmFixups {
  static constexpr int64_t kCount = int64_t{1} << 24, kWords = kCount / 64;
  std::vector<uint64_t> log_bits, angle_bits;
  int64_t count = 0;

  LibmFixups() : log_bits(kWords, 0), angle_bits(kWords, 0) {
    int64_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t word = 0; word < kWords; ++word) {
      uint32_t bits[64];
      float log_u[64], sine[64], cosine[64];
      for (int i = 0; i < 64; ++i) bits[i] = static_cast<uint32_t>((word * 64 + i) << 8);
      box_muller_parts(bits, bits, 64, log_u, sine, cosine);
      uint64_t log_word = 0, angle_word = 0;
      for (int i = 0; i < 64; ++i) {
        const float u = open_unit(bits[i]), angle = 6.28318548202514648f * u;
        float libm_sin, libm_cos;
        sincosf(angle, &libm_sin, &libm_cos);
        if (log_u[i] != logf(u)) log_word |= uint64_t{1} << i;
        if (sine[i] != libm_sin || cosine[i] != libm_cos) angle_word |= uint64_t{1} << i;
      }
      log_bits[static_cast<size_t>(word)] = log_word;
      angle_bits[static_cast<size_t>(word)] = angle_word;
      total += __builtin_popcountll(log_word) + __builtin_popcountll(angle_word);
    }
    count = total;
  }

  bool needs_libm(uint32_t a, uint32_t b) const {
    const uint32_t ka = a >> 8, kb = b >> 8;
    return ((log_bits[ka >> 6] >> (ka & 63)) | (angle_bits[kb >> 6] >> (kb & 63))) & 1u;
  }
};

const LibmFixups& libm_fixups() {
  static const LibmFixups fixups;
  return fixups;
}

// fp16 / bf16 tensors: load to fp32, add in fp32, round once to the storage type (and write θ − d when asked).
template <typename ToFloat, typename FromFloat>
void axpy_16bit_chunk(const Chunk& c, const TensorView& t, uint64_t seed, const StreamTerm* terms, int n_terms,
                      ToFloat to_float, FromFloat from_float) {
  uint16_t* p = static_cast<uint16_t*>(t.data);
  const uint16_t* src = t.src ? static_cast<const uint16_t*>(t.src) : p;
  uint16_t* m = static_cast<uint16_t*>(t.minus);
  axpy_chunk(c, seed, terms, n_terms, t.offset, [src, to_float](int64_t i) { return to_float(src[i]); },
             [p, m, from_float](int64_t i, float x, float d) {
               p[i] = from_float(x + d);
               if (m) m[i] = from_float(x - d);
             });
}

}  // namespace

int64_t box_muller_mismatches_cpu() { return libm_fixups().count; }

namespace {

// z for n_blocks Philox blocks (lanes x, y, z, w) into out[4 * n_blocks], bit-identical to box_muller().
void box_muller_blocks(const uint32_t* x, const uint32_t* y, const uint32_t* z, const uint32_t* w, int n_blocks,
                       const LibmFixups& fixups, float* out) {
  alignas(64) uint32_t a[2 * kBatchBlocks], bb[2 * kBatchBlocks];
  alignas(64) float log_u[2 * kBatchBlocks], sine[2 * kBatchBlocks], cosine[2 * kBatchBlocks];
  for (int i = 0; i < n_blocks; ++i) {  // pair 2i = lanes (x, y), pair 2i + 1 = lanes (z, w)
    a[2 * i] = x[i]; bb[2 * i] = y[i]; a[2 * i + 1] = z[i]; bb[2 * i + 1] = w[i];
  }
  box_muller_parts(a, bb, 2 * n_blocks, log_u, sine, cosine);
  for (int p = 0; p < 2 * n_blocks; ++p) {
    if (fixups.needs_libm(a[p], bb[p])) {
      box_muller(a[p], bb[p], &out[2 * p], &out[2 * p + 1]);
    } else {  // the same fp32 operations as box_muller()
      const float radius = sqrtf(-2.0f * log_u[p]);
      out[2 * p] = radius * cosine[p];
      out[2 * p + 1] = radius * sine[p];
    }
  }
}

// Calls visit(i, value) for i in [begin, end) with value = sum_k coeff_k * z(seed, stream_k, base + i), summed in
// fp32 in term order. Philox runs batched over whole blocks; Box-Muller uses the same box_muller() (libm logf,
// sincosf) as philox_normal_at, so every value is bit-identical to the scalar definition in csrc/philox.h.
template <typename Visit>
void for_each_combined_normal(uint64_t seed, const StreamTerm* terms, int n_terms, uint64_t base, int64_t begin,
                              int64_t end, Visit visit) {
  if (end <= begin) return;
  alignas(64) uint32_t x[kBatchBlocks], y[kBatchBlocks], z[kBatchBlocks], w[kBatchBlocks];
  alignas(64) float acc[4 * kBatchBlocks], normals[4 * kBatchBlocks];
  const LibmFixups& fixups = libm_fixups();
  const uint64_t first = base + static_cast<uint64_t>(begin), last = base + static_cast<uint64_t>(end);
  for (uint64_t batch = first >> 2; batch <= (last - 1) >> 2; batch += kBatchBlocks) {
    // Box-Muller (the expensive part) only for blocks that hold requested elements.
    const int n_blocks = static_cast<int>(std::min<uint64_t>(kBatchBlocks, ((last - 1) >> 2) - batch + 1));
    for (int i = 0; i < 4 * n_blocks; ++i) acc[i] = 0.0f;
    for (int k = 0; k < n_terms; ++k) {
      philox_batch(batch, terms[k].stream, seed, x, y, z, w);
      const float coeff = terms[k].coeff;
      box_muller_blocks(x, y, z, w, n_blocks, fixups, normals);
      for (int i = 0; i < 4 * n_blocks; ++i) acc[i] += coeff * normals[i];
    }
    const uint64_t lo = std::max(first, batch * 4), hi = std::min(last, (batch + kBatchBlocks) * 4);
    for (uint64_t index = lo; index < hi; ++index)
      visit(static_cast<int64_t>(index - base), acc[index - batch * 4]);
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

void philox_normal_scalar_cpu(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = philox_normal_at(seed, stream, offset + static_cast<uint64_t>(i));
}

void philox_normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
  const StreamTerm unit{stream, 1.0f};
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
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
  int64_t total = 0;
  for (int64_t n : numels) total += n;
#pragma omp parallel for schedule(dynamic, 1) if (total >= kParallelMin)
  for (int64_t ci = 0; ci < static_cast<int64_t>(chunks.size()); ++ci) {
    const Chunk& c = chunks[static_cast<size_t>(ci)];
    const TensorView& t = tensors[static_cast<size_t>(c.tensor)];
    switch (t.dtype) {
      case DType::kFloat32: {
        float* p = static_cast<float*>(t.data);
        const float* src = t.src ? static_cast<const float*>(t.src) : p;
        float* m = static_cast<float*>(t.minus);
        axpy_chunk(c, seed, term_ptr, n_terms, t.offset, [src](int64_t i) { return src[i]; },
                   [p, m](int64_t i, float x, float d) {
                     p[i] = x + d;
                     if (m) m[i] = x - d;
                   });
        break;
      }
      case DType::kFloat64: {
        double* p = static_cast<double*>(t.data);
        const double* src = t.src ? static_cast<const double*>(t.src) : p;
        double* m = static_cast<double*>(t.minus);
        axpy_chunk(c, seed, term_ptr, n_terms, t.offset, [src](int64_t i) { return src[i]; },
                   [p, m](int64_t i, double x, float d) {
                     p[i] = x + static_cast<double>(d);
                     if (m) m[i] = x - static_cast<double>(d);
                   });
        break;
      }
      case DType::kFloat16:
        axpy_16bit_chunk(c, t, seed, term_ptr, n_terms, half_to_float, float_to_half);
        break;
      case DType::kBFloat16:
        axpy_16bit_chunk(c, t, seed, term_ptr, n_terms, bf16_to_float, float_to_bf16);
        break;
    }
  }
}

}  // namespace zokernels
