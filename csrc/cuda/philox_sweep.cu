// Multi-tensor Philox sweeps (CUDA), the twin of zokernels/kernels/triton/philox_sweep.py: for every tensor t of
// one dtype, in one launch, out_t[i] = src_t[i] + d_i (and minus_t[i] = src_t[i] - d_i) with
// d_i = sum_k fl(coeff_k * scale_t) * z(seed, stream_k, offset_t + i). The element logic is csrc/philox.h (shared
// with the C++ CPU path, which the tests run); its zk_add/zk_mul/zk_sqrt are __fadd_rn/__fmul_rn/__fsqrt_rn here,
// so nothing is contracted to FMA and every value is bit-identical to the CPU, Triton and numpy twins.
// Torch-free: tables and tensors arrive as device pointers, the stream as uintptr_t.
#include <cuda_runtime.h>

#include <cstdint>

#include "../philox.h"
#include "storage_io.cuh"

namespace {
using namespace zokernels;

// One thread per Philox block: a CUDA block covers 4 * kThreads consecutive stream positions of one tensor.
constexpr int kThreads = 256;
constexpr int kTile = 4 * kThreads;
// Columns of the int64 tensor table (zokernels/philox.py _geometry): out, src, minus addresses, numel, offset.
constexpr int kCols = 5;

template <typename Io, bool kMinus>
__global__ void __launch_bounds__(kThreads) philox_sweep_kernel(const int64_t* table, const int64_t* tiles,
                                                                const int64_t* words, const float* floats,
                                                                int n_terms) {
  using T = typename Io::Storage;
  using W = typename Io::Wide;
  __shared__ float d[kTile];
  const int64_t tile = blockIdx.x;
  const int64_t t = tiles[2 * tile], start = tiles[2 * tile + 1];  // start: -3..0 for a tensor's first tile
  const int64_t* row = table + kCols * t;
  const uint64_t block = static_cast<uint64_t>(row[4] + start) / 4 + threadIdx.x;
  const uint64_t seed = static_cast<uint64_t>(words[0]) | (static_cast<uint64_t>(words[1]) << 32);
  const float scale = floats[n_terms + t];
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k = 0; k < n_terms; ++k) {
    const uint64_t stream = static_cast<uint64_t>(words[2 + 2 * k]) | (static_cast<uint64_t>(words[3 + 2 * k]) << 32);
    const float coeff = zk_mul(floats[k], scale);
    float z[4];
    philox_normal4(seed, stream, block, z);
    for (int lane = 0; lane < 4; ++lane) acc[lane] = zk_add(acc[lane], zk_mul(coeff, z[lane]));
  }
  for (int lane = 0; lane < 4; ++lane) d[4 * threadIdx.x + lane] = acc[lane];
  __syncthreads();
  // Element j of the tile is read by thread j % kThreads: consecutive threads touch consecutive addresses.
  const int64_t numel = row[3];
  const T* src = reinterpret_cast<const T*>(row[1]);
  T* out = reinterpret_cast<T*>(row[0]);
  T* minus = reinterpret_cast<T*>(row[2]);
  for (int part = 0; part < 4; ++part) {
    const int j = threadIdx.x + kThreads * part;
    const int64_t i = start + j;
    if (i < 0 || i >= numel) continue;
    const W x = Io::load(src[i]), dj = static_cast<W>(d[j]);
    out[i] = Io::store(x + dj);
    if (kMinus) minus[i] = Io::store(x - dj);
  }
}

template <typename Io>
void launch(const int64_t* table, const int64_t* tiles, int64_t n_tiles, const int64_t* words, const float* floats,
            int n_terms, bool has_minus, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n_tiles));
  if (has_minus) philox_sweep_kernel<Io, true><<<grid, kThreads, 0, stream>>>(table, tiles, words, floats, n_terms);
  else philox_sweep_kernel<Io, false><<<grid, kThreads, 0, stream>>>(table, tiles, words, floats, n_terms);
}
}  // namespace

extern "C" const char* zk_philox_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

// tiles: int64 [n_tiles, 2] = (table row, first element), built for tiles of 1024 elements (zokernels.philox
// CUDA_BLOCK). words: seed lo, seed hi, then stream lo, hi per term. floats: coeff per term, then scale per row.
// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. Returns the launch's cudaError_t.
extern "C" int zk_philox_sweep(const int64_t* table, const int64_t* tiles, int64_t n_tiles, const int64_t* words,
                               const float* floats, int n_terms, int dtype, int has_minus, uintptr_t stream) {
  if (n_tiles <= 0) return static_cast<int>(cudaSuccess);
  if (n_tiles > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch<F32>(table, tiles, n_tiles, words, floats, n_terms, has_minus != 0, s); break;
    case 1: launch<F64>(table, tiles, n_tiles, words, floats, n_terms, has_minus != 0, s); break;
    case 2: launch<F16>(table, tiles, n_tiles, words, floats, n_terms, has_minus != 0, s); break;
    case 3: launch<BF16>(table, tiles, n_tiles, words, floats, n_terms, has_minus != 0, s); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}
