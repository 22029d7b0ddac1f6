// Counter-based Philox4x32-10 and the Box-Muller transform used by every backend.
// z(seed, stream, i) is a pure function of its arguments, so a perturbation is regenerated from its seed
// instead of stored, and the values do not depend on how the work is split into blocks or threads.
// Header-only and torch-free so that the same code compiles for C++ (csrc/cpu) and CUDA (csrc/cuda).
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define ZK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ZK_HOST_DEVICE inline
#endif

namespace zokernels {

struct Uint4 {
  uint32_t x, y, z, w;
};

ZK_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11). counter = (block index lo, hi, stream lo, hi), key = seed.
ZK_HOST_DEVICE Uint4 philox4x32_10(uint64_t block, uint64_t stream, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, &hi0, &lo0);
    mulhilo32(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Uint4{c0, c1, c2, c3};
}

// Maps 32 random bits to a float in the open interval (0, 1): exact in fp32, never 0 (log(0) is avoided).
ZK_HOST_DEVICE float uint_to_open_unit(uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f;
}

// Box-Muller on (a, b): writes two independent N(0, 1) samples.
ZK_HOST_DEVICE void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = uint_to_open_unit(a);
  const float u2 = uint_to_open_unit(b);
  const float radius = sqrtf(-2.0f * logf(u1));
  const float angle = 6.28318548202514648f * u2;
  *z0 = radius * cosf(angle);
  *z1 = radius * sinf(angle);
}

// Element i of the stream uses lane i % 4 of Philox block i / 4; lanes (0,1) and (2,3) are Box-Muller pairs.
ZK_HOST_DEVICE float philox_normal_at(uint64_t seed, uint64_t stream, uint64_t index) {
  const Uint4 r = philox4x32_10(index >> 2, stream, seed);
  float z0, z1;
  const unsigned lane = static_cast<unsigned>(index & 3u);
  if (lane < 2) box_muller(r.x, r.y, &z0, &z1);
  else box_muller(r.z, r.w, &z0, &z1);
  return (lane & 1u) ? z1 : z0;
}

// All four normals of Philox block `block`: elements 4*block .. 4*block+3 of the stream.
ZK_HOST_DEVICE void philox_normal4(uint64_t seed, uint64_t stream, uint64_t block, float out[4]) {
  const Uint4 r = philox4x32_10(block, stream, seed);
  box_muller(r.x, r.y, &out[0], &out[1]);
  box_muller(r.z, r.w, &out[2], &out[3]);
}

}  // namespace zokernels
