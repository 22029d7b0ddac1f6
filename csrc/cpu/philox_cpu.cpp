// OpenMP sweeps over Philox normal streams. All entry points take raw pointers so that the bindings stay
// torch-free (the Python side checks dtype, device and contiguity before calling).
#include "philox_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../philox.h"
#include "storage_cpu.h"

namespace zokernels {
namespace {

using storage::BFloatBits;
using storage::HalfBits;

// Work is split into chunks that never straddle a tensor; each element's value depends only on
// (seed, stream, offset + i), so the chunk size and thread count cannot change results.
constexpr int64_t kChunk = 1 << 14;
// Below this many elements a sweep runs on the calling thread: waking the OpenMP team costs more than the work,
// and on a busy machine it can wait a whole scheduler slice (~10 ms).
constexpr int64_t kParallelMin = 1 << 16;
// Philox blocks per batch: 256 normals live in a stack buffer between generation and use.
constexpr int kBatchBlocks = 64;
constexpr int kBatch = 4 * kBatchBlocks;

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

// Philox4x32-10 of kBatchBlocks consecutive counter blocks into lanes x, y, z, w (structure of arrays). The generic
// loop is the definition; compilers emulate its 32x32->64 products with three 64-bit multiplies, so x86 uses the
// AVX2 twin below (integer-exact, hence bit-identical; tests compare it with philox4x32_10).
__attribute__((target_clones("avx512f", "avx2", "default")))
void philox_lanes_generic(uint64_t first_block, uint64_t stream, uint64_t seed, uint32_t* __restrict x,
                          uint32_t* __restrict y, uint32_t* __restrict z, uint32_t* __restrict w) {
  for (int b = 0; b < kBatchBlocks; ++b) {
    const Uint4 r = philox4x32_10(first_block + static_cast<uint64_t>(b), stream, seed);
    x[b] = r.x; y[b] = r.y; z[b] = r.z; w[b] = r.w;
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i k, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, k), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), k);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Four independent 8-block vectors per round hide the multiply latency. The low counter word must not wrap inside
// the batch (the caller checks): lanes add 0..31 to it without carrying into the high word.
__attribute__((target("avx2"))) void philox_lanes_avx2(uint64_t first_block, uint64_t stream, uint64_t seed,
                                                       uint32_t* x, uint32_t* y, uint32_t* z, uint32_t* w) {
  constexpr int kVectors = 4;
  const __m256i ka = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i kb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i hi_word = _mm256_set1_epi32(static_cast<int>(first_block >> 32));
  const __m256i s_lo = _mm256_set1_epi32(static_cast<int>(stream)), s_hi = _mm256_set1_epi32(static_cast<int>(stream >> 32));
  for (int b = 0; b < kBatchBlocks; b += 8 * kVectors) {
    __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_block + b + 8 * v)), step);
      c1[v] = hi_word; c2[v] = s_lo; c3[v] = s_hi;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0)), vk1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < kVectors; ++v) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(c0[v], ka, &hi0, &lo0);
        mulhilo8(c2[v], kb, &hi1, &lo1);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), vk0);
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), vk1);
        c1[v] = lo1; c3[v] = lo0;
      }
      k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    for (int v = 0; v < kVectors; ++v) {
      const int o = b + 8 * v;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + o), c0[v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + o), c1[v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(z + o), c2[v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + o), c3[v]);
    }
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

void philox_lanes(uint64_t first_block, uint64_t stream, uint64_t seed, uint32_t* x, uint32_t* y, uint32_t* z,
                  uint32_t* w) {
#if defined(__x86_64__)
  const bool low_word_wraps = static_cast<uint32_t>(first_block) > 0xFFFFFFFFu - (kBatchBlocks - 1);
  if (has_avx2() && !low_word_wraps) return philox_lanes_avx2(first_block, stream, seed, x, y, z, w);
#endif
  philox_lanes_generic(first_block, stream, seed, x, y, z, w);
}

// box_muller is fp32 +, *, sqrt, integer ops and selects only, so this loop vectorizes (one pair per SIMD lane).
__attribute__((target_clones("avx512f", "avx2", "default")))
void box_muller_lanes(const uint32_t* __restrict x, const uint32_t* __restrict y, const uint32_t* __restrict z,
                      const uint32_t* __restrict w, float* __restrict out) {
  for (int b = 0; b < kBatchBlocks; ++b) {
    float z0, z1, z2, z3;
    box_muller(x[b], y[b], &z0, &z1);
    box_muller(z[b], w[b], &z2, &z3);
    out[4 * b] = z0; out[4 * b + 1] = z1; out[4 * b + 2] = z2; out[4 * b + 3] = z3;
  }
}

// The four normals of each of kBatchBlocks consecutive Philox blocks, in stream order.
void normals_batch(uint64_t first_block, uint64_t stream, uint64_t seed, float* out) {
  alignas(64) uint32_t x[kBatchBlocks], y[kBatchBlocks], z[kBatchBlocks], w[kBatchBlocks];
  philox_lanes(first_block, stream, seed, x, y, z, w);
  box_muller_lanes(x, y, z, w, out);
}

// acc[j] = sum_k coeff_k * z(seed, stream_k, 4 * first_block + j), summed in fp32 in term order from 0.
void combined_batch(uint64_t first_block, uint64_t seed, const StreamTerm* terms, int n_terms, float* acc) {
  alignas(64) float normals[kBatch];
  for (int j = 0; j < kBatch; ++j) acc[j] = 0.0f;
  for (int k = 0; k < n_terms; ++k) {
    normals_batch(first_block, terms[k].stream, seed, normals);
    const float coeff = terms[k].coeff;
    for (int j = 0; j < kBatch; ++j) acc[j] += coeff * normals[j];
  }
}

// Calls apply(i0, d, n): d[0..n) = combined normals of elements i0 .. i0 + n of a tensor whose element 0 sits at
// stream offset `base`, for the elements [begin, end). Batches are aligned to Philox blocks.
template <typename Apply>
void for_each_batch(uint64_t seed, const StreamTerm* terms, int n_terms, uint64_t base, int64_t begin, int64_t end,
                    Apply apply) {
  alignas(64) float acc[kBatch];
  const uint64_t first = base + static_cast<uint64_t>(begin), last = base + static_cast<uint64_t>(end);
  for (uint64_t start = first & ~uint64_t{3}; start < last; start += kBatch) {
    combined_batch(start >> 2, seed, terms, n_terms, acc);
    const uint64_t lo = std::max(first, start), hi = std::min(last, start + kBatch);
    apply(static_cast<int64_t>(lo - base), acc + (lo - start), static_cast<int64_t>(hi - lo));
  }
}

// out[j] = src[j] + d[j] (and minus[j] = src[j] - d[j]) for one batch; the branch on `minus` stays outside the
// element loops so that they vectorize.
template <typename T>
void apply_batch(const T* src, const float* d, int64_t n, T* out, T* minus) {
  using W = storage::Wide<T>;
  if (minus) {
    for (int64_t j = 0; j < n; ++j) {
      const W x = storage::load(src[j]), dj = static_cast<W>(d[j]);
      out[j] = storage::store<T>(x + dj);
      minus[j] = storage::store<T>(x - dj);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = storage::store<T>(storage::load(src[j]) + static_cast<W>(d[j]));
  }
}

// fp16: without F16C the _Float16 conversions are library calls (~18 ns/element); the x86-64-v3 clone (AVX2 + F16C)
// turns them into vcvtph2ps / vcvtps2ph, which round the same way (to nearest even).
__attribute__((target_clones("arch=x86-64-v3", "default")))
void apply_batch_half(const HalfBits* src, const float* d, int64_t n, HalfBits* out, HalfBits* minus) {
  apply_batch<HalfBits>(src, d, n, out, minus);
}

template <typename T>
void sweep_chunk(const Chunk& c, const TensorView& t, uint64_t seed, const StreamTerm* terms, int n_terms) {
  T* out = static_cast<T*>(t.data);
  const T* src = t.src ? static_cast<const T*>(t.src) : out;
  T* minus = static_cast<T*>(t.minus);
  for_each_batch(seed, terms, n_terms, t.offset, c.begin, c.end, [&](int64_t i0, const float* d, int64_t n) {
    T* m = minus ? minus + i0 : nullptr;
    if constexpr (std::is_same_v<T, HalfBits>) apply_batch_half(src + i0, d, n, out + i0, m);
    else apply_batch<T>(src + i0, d, n, out + i0, m);
  });
}

}  // namespace

void philox_uint32_cpu(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t index = offset + static_cast<uint64_t>(i);
    const Uint4 r = philox4x32_10(index >> 2, stream, seed);
    const uint32_t lanes[4] = {r.x, r.y, r.z, r.w};
    out[i] = lanes[index & 3u];
  }
}

void philox_normal_scalar_cpu(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = philox_normal_at(seed, stream, offset + static_cast<uint64_t>(i));
}

void philox_normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
  const StreamTerm unit{stream, 1.0f};
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c)
    for_each_batch(seed, &unit, 1, offset, c * kChunk, std::min(n, (c + 1) * kChunk),
                   [out](int64_t i0, const float* z, int64_t m) { std::memcpy(out + i0, z, 4 * m); });
}

double philox_normal_sumsq_cpu(int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
  // Per-chunk partial sums added in chunk order keep the result independent of the thread count.
  const StreamTerm unit{stream, 1.0f};
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(n_chunks), 0.0);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c) {
    double acc = 0.0;
    for_each_batch(seed, &unit, 1, offset, c * kChunk, std::min(n, (c + 1) * kChunk),
                   [&acc](int64_t, const float* z, int64_t m) {
                     for (int64_t j = 0; j < m; ++j) acc += static_cast<double>(z[j]) * z[j];
                   });
    partial[static_cast<size_t>(c)] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

void philox_combination_batches(uint64_t seed, const StreamTerm* terms, int n_terms, uint64_t base, int64_t begin,
                                int64_t end, CombinationSink sink, void* context) {
  for_each_batch(seed, terms, n_terms, base, begin, end,
                 [sink, context](int64_t i0, const float* d, int64_t n) { sink(context, i0, d, n); });
}

void philox_axpy_multi_cpu(const std::vector<TensorView>& tensors, uint64_t seed,
                           const std::vector<StreamTerm>& terms) {
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (const auto& t : tensors) {
    numels.push_back(t.numel);
    total += t.numel;
  }
  const std::vector<Chunk> chunks = make_chunks(numels);
  const StreamTerm* term_ptr = terms.data();
  const int n_terms = static_cast<int>(terms.size());
#pragma omp parallel for schedule(dynamic, 1) if (total >= kParallelMin)
  for (int64_t ci = 0; ci < static_cast<int64_t>(chunks.size()); ++ci) {
    const Chunk& c = chunks[static_cast<size_t>(ci)];
    const TensorView& t = tensors[static_cast<size_t>(c.tensor)];
    switch (t.dtype) {
      case DType::kFloat32: sweep_chunk<float>(c, t, seed, term_ptr, n_terms); break;
      case DType::kFloat64: sweep_chunk<double>(c, t, seed, term_ptr, n_terms); break;
      case DType::kFloat16: sweep_chunk<HalfBits>(c, t, seed, term_ptr, n_terms); break;
      case DType::kBFloat16: sweep_chunk<BFloatBits>(c, t, seed, term_ptr, n_terms); break;
    }
  }
}

}  // namespace zokernels
