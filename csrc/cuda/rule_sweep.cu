// The fused rule sweep (CUDA), the twin of zokernels/kernels/triton/rule_sweep.py and of the C++ CPU path
// (csrc/cpu/rule_sweep_cpu.cpp): for every tensor t of one dtype, in one launch, per element i
//   g = sum_k fl32(coeff_k) * z(seed, stream_k, offset_t + i)   (fp32, in registers and shared memory only)
//   out_t[i] = RN(src_t[i] + delta),  delta = rule(g, state) + fl32(src_t[i] * decay)
// The element arithmetic is csrc/rule_sweep.h (shared with the CPU twin); its zk_* operations are the _rn intrinsics
// here, so nothing is contracted to FMA. Layout as csrc/cuda/philox_sweep.cu: one thread per Philox block, tiles of
// 4 * kThreads stream positions of one tensor. Torch-free: tables arrive as device pointers, the stream as uintptr_t.
#include <cuda_runtime.h>

#include <cstdint>

#include "../rule_sweep.h"
#include "storage_io.cuh"

namespace {
using namespace zokernels;

constexpr int kThreads = 256;
constexpr int kTile = 4 * kThreads;
// Columns of the int64 tensor table (zokernels/kernels/rule_sweep.py): out, src, m, v addresses, numel, offset.
constexpr int kCols = 6;

__device__ inline float wide_add(float x, float d) { return __fadd_rn(x, d); }
__device__ inline double wide_add(double x, float d) { return __dadd_rn(x, static_cast<double>(d)); }

template <typename Io, int Rule>
__global__ void __launch_bounds__(kThreads) rule_sweep_kernel(const int64_t* table, const int64_t* tiles,
                                                              const int64_t* words, const float* floats,
                                                              int n_terms) {
  using T = typename Io::Storage;
  __shared__ float g[kTile];
  const int64_t tile = blockIdx.x;
  const int64_t t = tiles[2 * tile], start = tiles[2 * tile + 1];  // start: -3..0 for a tensor's first tile
  const int64_t* row = table + kCols * t;
  const uint64_t block = static_cast<uint64_t>(row[5] + start) / 4 + threadIdx.x;
  const uint64_t seed = static_cast<uint64_t>(words[0]) | (static_cast<uint64_t>(words[1]) << 32);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k = 0; k < n_terms; ++k) {
    const uint64_t stream = static_cast<uint64_t>(words[2 + 2 * k]) | (static_cast<uint64_t>(words[3 + 2 * k]) << 32);
    float z[4];
    philox_normal4(seed, stream, block, z);
    for (int lane = 0; lane < 4; ++lane) acc[lane] = zk_add(acc[lane], zk_mul(floats[k], z[lane]));
  }
  for (int lane = 0; lane < 4; ++lane) g[4 * threadIdx.x + lane] = acc[lane];
  __syncthreads();
  const float* hyper = floats + n_terms + kRuleRow * t;
  const int64_t numel = row[4];
  const T* src = reinterpret_cast<const T*>(row[1]);
  T* out = reinterpret_cast<T*>(row[0]);
  float* m = reinterpret_cast<float*>(row[2]);
  float* v = reinterpret_cast<float*>(row[3]);
  // Element j of the tile is handled by thread j % kThreads: consecutive threads touch consecutive addresses.
  for (int part = 0; part < 4; ++part) {
    const int j = threadIdx.x + kThreads * part;
    const int64_t i = start + j;
    if (i < 0 || i >= numel) continue;
    const auto x = Io::load(src[i]);
    float delta = rule_states(Rule) == 2   ? rule_delta<Rule>(g[j], hyper, m + i, v + i)
                  : rule_states(Rule) == 1 ? rule_delta<Rule>(g[j], hyper, m + i, nullptr)
                                           : rule_delta<Rule>(g[j], hyper, nullptr, nullptr);
    delta = with_decay(delta, x, hyper);
    out[i] = Io::store(wide_add(x, delta));
  }
}

template <typename Io>
void launch(const int64_t* table, const int64_t* tiles, int64_t n_tiles, const int64_t* words, const float* floats,
            int n_terms, int rule, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n_tiles));
  auto kernel = rule == kRuleSign           ? rule_sweep_kernel<Io, kRuleSign>
                : rule == kRuleAdam         ? rule_sweep_kernel<Io, kRuleAdam>
                : rule == kRuleMomentum     ? rule_sweep_kernel<Io, kRuleMomentum>
                : rule == kRuleSignMomentum ? rule_sweep_kernel<Io, kRuleSignMomentum>
                                            : rule_sweep_kernel<Io, kRuleLinear>;
  kernel<<<grid, kThreads, 0, stream>>>(table, tiles, words, floats, n_terms);
}
}  // namespace

// tiles: int64 [n_tiles, 2] = (table row, first element), tiles of 1024 elements (rule_sweep.py CUDA_BLOCK).
// words: seed lo, seed hi, then stream lo, hi per term. floats: fp32 coeff per term, then kRuleRow scalars per row.
// rule: RuleCode; dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. Returns the launch's cudaError_t.
extern "C" int zk_rule_sweep(const int64_t* table, const int64_t* tiles, int64_t n_tiles, const int64_t* words,
                             const float* floats, int n_terms, int rule, int dtype, uintptr_t stream) {
  if (n_tiles <= 0) return static_cast<int>(cudaSuccess);
  if (n_tiles > 0x7fffffff || rule < kRuleLinear || rule > kRuleLast) return static_cast<int>(cudaErrorInvalidValue);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch<F32>(table, tiles, n_tiles, words, floats, n_terms, rule, s); break;
    case 1: launch<F64>(table, tiles, n_tiles, words, floats, n_terms, rule, s); break;
    case 2: launch<F16>(table, tiles, n_tiles, words, floats, n_terms, rule, s); break;
    case 3: launch<BF16>(table, tiles, n_tiles, words, floats, n_terms, rule, s); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}
