// Storage <-> wide value of the CUDA sweeps (philox_sweep.cu, rule_sweep.cu): one struct per dtype code of
// zokernels/kernels/native.py. bf16 moves as uint16 bits and rounds to nearest even in integers (NaN stays a quiet
// NaN), exactly like the CPU (cpu/storage_cpu.h) and Triton (_store_narrow) paths; fp16 converts with the PTX
// round-to-nearest instruction.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zokernels {

struct F32 {
  using Storage = float;
  using Wide = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
struct F64 {
  using Storage = double;
  using Wide = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  using Wide = float;
  __device__ static float load(uint16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  __device__ static uint16_t store(float v) {
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};
struct BF16 {
  using Storage = uint16_t;
  using Wide = float;
  __device__ static float load(uint16_t v) { return __int_as_float(static_cast<int>(static_cast<uint32_t>(v) << 16)); }
  __device__ static uint16_t store(float v) {
    const uint32_t bits = static_cast<uint32_t>(__float_as_int(v));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
};

}  // namespace zokernels
