"""Multi-tensor Philox sweeps (Triton): for every tensor t of one dtype, in ONE launch,
    out_t[i] = src_t[i] + d_i   (and minus_t[i] = src_t[i] − d_i),   d_i = Σ_k fl(coeff_k·scale_t) · z(seed, s_k, o_t + i)
with z v2 (csrc/philox.h, docs/philox.md) evaluated op by op exactly as the C++/CUDA/numpy twins: launched with
enable_fp_fusion=False and sqrt_rn, so every value is bit-identical to them.

Tensors are reached through a device table of int64 addresses cast with tl.pointer_type. A program owns BLOCK
consecutive stream positions of one tensor, aligned to Philox blocks (4 elements), so each Philox block and each
Box-Muller pair is computed once; the tile table (tensor, first element) is built on the host and cached."""
import triton
import triton.language as tl

from ..philox_constants import (ANGLE_SCALE, COS_COEFFS, LN2_HI, LN2_LO, LOG_COEFFS, PHILOX_M0, PHILOX_M1, PHILOX_W0,
                                PHILOX_W1, SIN_COEFFS, SQRT_HALF_BITS, UNIFORM_HALF_STEP, UNIFORM_SCALE)

# kernels/philox_constants.py (the Python source of the constants; tests compare it with csrc/philox.h), as
# constexpr for the kernel.
M0, M1, W0, W1 = (tl.constexpr(c) for c in (PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1))
U_SCALE, U_HALF_STEP, X_SCALE = (tl.constexpr(c) for c in (UNIFORM_SCALE, UNIFORM_HALF_STEP, ANGLE_SCALE))
L0, L1, L2, L3, L4, L5, L6, L7, L8 = (tl.constexpr(c) for c in LOG_COEFFS)
S0, S1, S2, S3 = (tl.constexpr(c) for c in SIN_COEFFS)
C0, C1, C2, C3 = (tl.constexpr(c) for c in COS_COEFFS)
LN2_HI_C, LN2_LO_C = tl.constexpr(LN2_HI), tl.constexpr(LN2_LO)
SQRT_HALF_BITS_C = tl.constexpr(SQRT_HALF_BITS)

# Table layout (int64 columns of the tensor table).
COL_OUT, COL_SRC, COL_MINUS, COL_NUMEL, COL_OFFSET = (tl.constexpr(c) for c in range(5))
N_COLS = tl.constexpr(5)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, M1) ^ c1 ^ k0
        c2 = tl.umulhi(a0, M0) ^ c3 ^ k1
        c1 = a2 * M1
        c3 = a0 * M0
        k0 = k0 + W0
        k1 = k1 + W1
    return c0, c1, c2, c3


@triton.jit
def _neg2log(u):
    shifted = u.to(tl.int32, bitcast=True) - SQRT_HALF_BITS_C
    e = (shifted >> 23).to(tl.float32)
    f = ((shifted & 0x7FFFFF) + SQRT_HALF_BITS_C).to(tl.float32, bitcast=True) - 1.0
    p = f * L8 + L7
    p = p * f + L6
    p = p * f + L5
    p = p * f + L4
    p = p * f + L3
    p = p * f + L2
    p = p * f + L1
    p = p * f + L0
    log_m = ((f * f) * p + e * LN2_LO_C) + f
    return -2.0 * (log_m + e * LN2_HI_C)


@triton.jit
def _box_muller(a, b):
    u1 = (a >> 8).to(tl.int32).to(tl.float32) * U_SCALE + U_HALF_STEP
    radius = tl.sqrt_rn(_neg2log(u1))
    k = (b >> 8).to(tl.int32)
    j = (k + (1 << 21)) >> 22
    x = (2 * (k - (j << 22)) + 1).to(tl.float32) * X_SCALE
    x2 = x * x
    s = x2 * S3 + S2
    s = s * x2 + S1
    s = s * x2 + S0
    s = x * s
    c = x2 * C3 + C2
    c = c * x2 + C1
    c = c * x2 + C0
    c = 1.0 + x2 * c
    quadrant = j & 3
    swap = (quadrant & 1) != 0
    cos_abs = tl.where(swap, s, c)
    sin_abs = tl.where(swap, c, s)
    cosine = tl.where((quadrant == 1) | (quadrant == 2), -cos_abs, cos_abs)
    sine = tl.where(quadrant >= 2, -sin_abs, sin_abs)
    return radius * cosine, radius * sine


@triton.jit
def _tile_combination(first_block, words_ptr, floats_ptr, n_terms, scale, BLOCK: tl.constexpr):
    """Σ_k fl32(coeff_k·scale)·z(seed, stream_k, ·) in fp32 over the BLOCK stream positions from Philox block
    `first_block` on (4 per block), in stream order; words: [seed lo, seed hi, (stream lo, stream hi) per term],
    floats: [coeff per term, ...]. Shared by the Philox sweep and the rule sweep (kernels/triton/rule_sweep.py)."""
    QUADS: tl.constexpr = BLOCK // 4
    blocks = first_block + tl.arange(0, QUADS).to(tl.int64)
    lo = blocks.to(tl.uint32)
    hi = (blocks >> 32).to(tl.uint32)
    k0 = tl.load(words_ptr).to(tl.uint32)
    k1 = tl.load(words_ptr + 1).to(tl.uint32)
    acc0 = tl.zeros([QUADS], dtype=tl.float32)
    acc1 = tl.zeros([QUADS], dtype=tl.float32)
    acc2 = tl.zeros([QUADS], dtype=tl.float32)
    acc3 = tl.zeros([QUADS], dtype=tl.float32)
    for k in range(n_terms):
        s_lo = tl.load(words_ptr + 2 + 2 * k).to(tl.uint32)
        s_hi = tl.load(words_ptr + 3 + 2 * k).to(tl.uint32)
        coeff = tl.load(floats_ptr + k) * scale
        r0, r1, r2, r3 = _philox4x32_10(lo, hi, tl.zeros_like(lo) + s_lo, tl.zeros_like(lo) + s_hi, k0, k1)
        z0, z1 = _box_muller(r0, r1)
        z2, z3 = _box_muller(r2, r3)
        acc0 += coeff * z0
        acc1 += coeff * z1
        acc2 += coeff * z2
        acc3 += coeff * z3
    # element order within a Philox block is lane 0, 1, 2, 3
    return tl.reshape(tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3)), [BLOCK])


@triton.jit
def _philox_sweep_kernel(table_ptr, tiles_ptr, words_ptr, floats_ptr, n_terms,
                         DTYPE: tl.constexpr, WIDE: tl.constexpr, BF16_BITS: tl.constexpr, HAS_MINUS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """words: [seed lo, seed hi, (stream lo, stream hi) per term]; floats: [coeff per term, scale per tensor]."""
    tile = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles_ptr + 2 * tile)
    start = tl.load(tiles_ptr + 2 * tile + 1)  # first element of the tile; may be −3..−1 (block alignment)
    row = table_ptr + N_COLS * t
    numel = tl.load(row + COL_NUMEL)
    first_block = (tl.load(row + COL_OFFSET) + start) // 4
    d = _tile_combination(first_block, words_ptr, floats_ptr, n_terms, tl.load(floats_ptr + n_terms + t), BLOCK)
    i = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = (i >= 0) & (i < numel)
    src = tl.load(row + COL_SRC).to(tl.pointer_type(DTYPE))
    out = tl.load(row + COL_OUT).to(tl.pointer_type(DTYPE))
    x = _load_wide(src + i, mask, WIDE, BF16_BITS)
    dw = d.to(WIDE)
    _store_narrow(out + i, x + dw, mask, DTYPE, BF16_BITS)
    if HAS_MINUS:
        minus = tl.load(row + COL_MINUS).to(tl.pointer_type(DTYPE))
        _store_narrow(minus + i, x - dw, mask, DTYPE, BF16_BITS)


@triton.jit
def _load_wide(ptrs, mask, WIDE: tl.constexpr, BF16_BITS: tl.constexpr):
    if BF16_BITS:  # bf16 held as uint16: widening is a shift (exact)
        return (tl.load(ptrs, mask=mask).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptrs, mask=mask).to(WIDE)


@triton.jit
def _store_narrow(ptrs, value, mask, DTYPE: tl.constexpr, BF16_BITS: tl.constexpr):
    if BF16_BITS:
        # fp32 -> bf16 round to nearest even in integers: the interpreter's cast truncates, the GPU's rounds; this
        # is the same on both (and equals the C++ storage::store<BFloatBits>, csrc/cpu/storage_cpu.h). NaN stays
        # a quiet NaN.
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        tl.store(ptrs, tl.where(nan, (bits >> 16) | 0x40, rounded).to(tl.uint16), mask=mask)
    else:
        tl.store(ptrs, value.to(DTYPE), mask=mask)


_WIDE = {"float64": tl.float64}
# bf16 is moved as its uint16 bits (see _store_narrow).
_TL_DTYPES = {"float32": tl.float32, "float64": tl.float64, "float16": tl.float16, "bfloat16": tl.uint16}


def philox_sweep_triton(table, tiles, words, floats, n_terms: int, dtype_name: str, has_minus: bool,
                        block: int, num_warps: int = 4) -> None:
    """Launches one sweep over the tiles of one dtype group; the tables are built (and checked) by
    zokernels.philox. table: int64 [n_tensors, 5]; tiles: int64 [n_tiles, 2]; words: int64; floats: float32."""
    n_tiles = tiles.shape[0]
    if n_tiles == 0:
        return
    _philox_sweep_kernel[(n_tiles,)](
        table, tiles, words, floats, n_terms, DTYPE=_TL_DTYPES[dtype_name],
        WIDE=_WIDE.get(dtype_name, tl.float32),
        BF16_BITS=dtype_name == "bfloat16", HAS_MINUS=has_minus, BLOCK=block, num_warps=num_warps,
        enable_fp_fusion=False)
