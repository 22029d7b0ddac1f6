// Counter-based Philox4x32-10 and the Box-Muller transform used by every backend (definition: docs/philox.md).
// z(seed, stream, i) is a pure function of its arguments, so a perturbation is regenerated from its seed
// instead of stored, and the values do not depend on how the work is split into blocks or threads.
// Header-only and torch-free so that the same code compiles for C++ (csrc/cpu) and CUDA (csrc/cuda).
//
// z v2: log, sin and cos are our own float32 formulas made only of correctly rounded +, -, *, sqrt, integer/bit
// operations and exact int->float conversions, in a fixed order and never contracted to FMA. Every IEEE backend
// (numpy, C++, CUDA, Triton, torch) therefore computes the same bits; libm is not used. The constants' one source
// is zokernels/kernels/philox_constants.py (the Triton kernel, the torch generator and the numpy twin import it);
// the constexpr values below are its C++/CUDA copy, and tests/test_philox_v2.py parses this header and checks that
// every coefficient, the ln 2 split, the Philox multipliers and key increments equal that module's.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ZK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ZK_HOST_DEVICE inline
#endif

namespace zokernels {

// ln(1 + f) = f + f^2 * P(f), f in [sqrt(1/2) - 1, sqrt(2) - 1]; P(f) = sum kLogC<i> f^i.
constexpr float kLogC0 = -0x1.fffffep-2f, kLogC1 = 0x1.555554p-2f, kLogC2 = -0x1.00020cp-2f;
constexpr float kLogC3 = 0x1.99a012p-3f, kLogC4 = -0x1.548382p-3f, kLogC5 = 0x1.22ea5ap-3f;
constexpr float kLogC6 = -0x1.0cda32p-3f, kLogC7 = 0x1.048f72p-3f, kLogC8 = -0x1.3a4ff6p-4f;
// sin(pi x / 2) = x * S(x^2), cos(pi x / 2) = 1 + x^2 * C(x^2), |x| <= 1/2.
constexpr float kSinC0 = 0x1.921fb6p+0f, kSinC1 = -0x1.4abbbap-1f, kSinC2 = 0x1.465ec4p-4f;
constexpr float kSinC3 = -0x1.2d9b40p-8f;
constexpr float kCosC0 = -0x1.3bd3ccp+0f, kCosC1 = 0x1.03c1eap-2f, kCosC2 = -0x1.55cb98p-6f;
constexpr float kCosC3 = 0x1.db6492p-11f;
// ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 12 trailing zero bits, so e * kLn2Hi is exact for the exponents used.
constexpr float kLn2Hi = 0x1.62e300p-1f, kLn2Lo = 0x1.2fefa4p-17f;
constexpr int32_t kSqrtHalfBits = 0x3F3504F3;  // fp32 bits of sqrt(1/2): mantissas are reduced to [sqrt 1/2, sqrt 2)

// Correctly rounded fp32 operations. On the device the intrinsics are never fused into FMA whatever the flags;
// on the host the build uses -ffp-contract=off (CMakeLists.txt).
#if defined(__CUDA_ARCH__)
ZK_HOST_DEVICE float zk_add(float a, float b) { return __fadd_rn(a, b); }
ZK_HOST_DEVICE float zk_mul(float a, float b) { return __fmul_rn(a, b); }
ZK_HOST_DEVICE float zk_sqrt(float a) { return __fsqrt_rn(a); }
ZK_HOST_DEVICE int32_t zk_float_bits(float a) { return __float_as_int(a); }
ZK_HOST_DEVICE float zk_bits_float(int32_t a) { return __int_as_float(a); }
#else
ZK_HOST_DEVICE float zk_add(float a, float b) { return a + b; }
ZK_HOST_DEVICE float zk_mul(float a, float b) { return a * b; }
ZK_HOST_DEVICE float zk_sqrt(float a) { return __builtin_sqrtf(a); }  // a >= 0 (or -0): no errno path needed
ZK_HOST_DEVICE int32_t zk_float_bits(float a) {
  int32_t bits;
  std::memcpy(&bits, &a, 4);
  return bits;
}
ZK_HOST_DEVICE float zk_bits_float(int32_t a) {
  float f;
  std::memcpy(&f, &a, 4);
  return f;
}
#endif

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

// u = fl32((bits >> 8) * 2^-24 + 2^-25), in (0, 1]: the top argument rounds to exactly 1 (then z = +-0).
ZK_HOST_DEVICE float uint_to_open_unit(uint32_t bits) {
  return zk_add(zk_mul(static_cast<float>(static_cast<int32_t>(bits >> 8)), 0x1p-24f), 0x1p-25f);
}

// -2 ln u for u in (0, 1]: u = m * 2^e with m in [sqrt 1/2, sqrt 2) from the bits; f = m - 1 is exact (Sterbenz).
ZK_HOST_DEVICE float neg2log(float u) {
  const int32_t shifted = zk_float_bits(u) - kSqrtHalfBits;
  const float e = static_cast<float>(shifted >> 23);  // arithmetic shift: e <= 0
  const float f = zk_add(zk_bits_float((shifted & 0x7FFFFF) + kSqrtHalfBits), -1.0f);
  float p = kLogC8;
  p = zk_add(zk_mul(p, f), kLogC7); p = zk_add(zk_mul(p, f), kLogC6); p = zk_add(zk_mul(p, f), kLogC5);
  p = zk_add(zk_mul(p, f), kLogC4); p = zk_add(zk_mul(p, f), kLogC3); p = zk_add(zk_mul(p, f), kLogC2);
  p = zk_add(zk_mul(p, f), kLogC1); p = zk_add(zk_mul(p, f), kLogC0);
  const float log_m = zk_add(zk_add(zk_mul(zk_mul(f, f), p), zk_mul(e, kLn2Lo)), f);
  return zk_mul(-2.0f, zk_add(log_m, zk_mul(e, kLn2Hi)));
}

// sin and cos of 2 pi (k + 1/2) / 2^24, k = bits >> 8: the nearest quarter turn j comes from k's top bits and the
// remainder x = 4u - j = (2d + 1) / 2^23 is exact, so no rounding happens before the polynomials.
ZK_HOST_DEVICE void sincos_2pi(uint32_t bits, float* sine, float* cosine) {
  const int32_t k = static_cast<int32_t>(bits >> 8);
  const int32_t j = (k + (1 << 21)) >> 22;
  const float x = zk_mul(static_cast<float>(2 * (k - (j << 22)) + 1), 0x1p-23f);
  const float x2 = zk_mul(x, x);
  float s = kSinC3, c = kCosC3;
  s = zk_add(zk_mul(s, x2), kSinC2); s = zk_add(zk_mul(s, x2), kSinC1); s = zk_add(zk_mul(s, x2), kSinC0);
  c = zk_add(zk_mul(c, x2), kCosC2); c = zk_add(zk_mul(c, x2), kCosC1); c = zk_add(zk_mul(c, x2), kCosC0);
  s = zk_mul(x, s);
  c = zk_add(1.0f, zk_mul(x2, c));
  const int32_t quadrant = j & 3;
  const bool swap = (quadrant & 1) != 0;
  const float cos_abs = swap ? s : c, sin_abs = swap ? c : s;
  *cosine = (quadrant == 1 || quadrant == 2) ? -cos_abs : cos_abs;
  *sine = (quadrant >= 2) ? -sin_abs : sin_abs;
}

// Box-Muller on (a, b): writes two independent N(0, 1) samples sqrt(-2 ln u1) * (cos, sin)(2 pi u2).
ZK_HOST_DEVICE void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float radius = zk_sqrt(neg2log(uint_to_open_unit(a)));
  float sine, cosine;
  sincos_2pi(b, &sine, &cosine);
  *z0 = zk_mul(radius, cosine);
  *z1 = zk_mul(radius, sine);
}

// All four normals of Philox block `block`: elements 4*block .. 4*block+3 of the stream (the CUDA sweep's unit).
ZK_HOST_DEVICE void philox_normal4(uint64_t seed, uint64_t stream, uint64_t block, float out[4]) {
  const Uint4 r = philox4x32_10(block, stream, seed);
  box_muller(r.x, r.y, &out[0], &out[1]);
  box_muller(r.z, r.w, &out[2], &out[3]);
}

// Element i of the stream uses lane i % 4 of Philox block i / 4; lanes (0,1) and (2,3) are Box-Muller pairs.
// Defined through philox_normal4 so that the CPU tests (philox_normal_scalar) execute the CUDA element path.
ZK_HOST_DEVICE float philox_normal_at(uint64_t seed, uint64_t stream, uint64_t index) {
  float out[4];
  philox_normal4(seed, stream, index >> 2, out);
  return out[index & 3u];
}

}  // namespace zokernels
