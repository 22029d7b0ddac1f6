// Parameter storage <-> the wide value the CPU sweeps compute in (fp32; fp64 stays fp64), shared by the Philox sweep
// (philox_cpu.cpp) and the rule sweep (rule_sweep_cpu.cpp). fp16 converts through the compiler's _Float16 (round
// to nearest even: F16C instructions in the x86-64-v3 clones, library calls otherwise); bf16 in integers, round to
// nearest even, NaN stays a quiet NaN: the same bits as the CUDA (cuda/storage_io.cuh) and Triton paths.
#pragma once

#include <cstdint>
#include <cstring>

namespace zokernels {
namespace storage {

struct HalfBits { uint16_t bits; };
struct BFloatBits { uint16_t bits; };

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(HalfBits v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
inline float load(BFloatBits v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The wide type of storage T: what load returns and store takes.
template <typename T> using Wide = decltype(load(T{}));

template <typename T> T store(Wide<T> w);
template <> inline float store<float>(float w) { return w; }
template <> inline double store<double>(double w) { return w; }
template <> inline HalfBits store<HalfBits>(float w) {
  const _Float16 h = static_cast<_Float16>(w);
  HalfBits out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
template <> inline BFloatBits store<BFloatBits>(float w) {
  uint32_t bits;
  std::memcpy(&bits, &w, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return BFloatBits{static_cast<uint16_t>((bits >> 16) | 0x40u)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return BFloatBits{static_cast<uint16_t>(bits >> 16)};
}

}  // namespace storage
}  // namespace zokernels
