"""The fused rule sweep (Triton): for every tensor t of one dtype, in ONE launch, per element i
    g = Σ_k fl32(c_k)·z(seed, s_k, o_t + i)   (fp32, in registers only)
    out_t[i] = RN(src_t[i] + Δ),   Δ = rule(g, state) + fl32(src_t[i]·decay)
with the element arithmetic of csrc/rule_sweep.h (and zokernels/optim/rules.py) op by op: launched with
enable_fp_fusion=False, sqrt_rn and div_rn, so every value is bit-identical to the C++, CUDA and torch twins.

Philox, Box-Muller and the storage conversions are philox_sweep.py's; the tiling is the same (a program owns BLOCK
consecutive stream positions of one tensor, aligned to Philox blocks)."""
import triton
import triton.language as tl

from .philox_sweep import _TL_DTYPES, _WIDE, _load_wide, _store_narrow, _tile_combination

# The layout of zokernels/kernels/rule_sweep.py (device_rule_sweep: table columns; ROW, RULE_CODES), which imports
# this module, and of csrc/rule_sweep.h; the matrix row rule_sweep_ fails bit for bit if they disagree.
COL_OUT, COL_SRC, COL_M, COL_V, COL_NUMEL, COL_OFFSET = (tl.constexpr(c) for c in range(6))
N_COLS = tl.constexpr(6)
ROW = tl.constexpr(9)  # fp32 scalars per tensor: has_decay, decay, then the rule's
RULE_CODES = {"linear": 0, "sign": 1, "adam": 2, "momentum": 3, "sign_momentum": 4}
SIGN, ADAM = tl.constexpr(RULE_CODES["sign"]), tl.constexpr(RULE_CODES["adam"])
MOMENTUM, SIGN_MOMENTUM = tl.constexpr(RULE_CODES["momentum"]), tl.constexpr(RULE_CODES["sign_momentum"])


@triton.jit
def _rule_sweep_kernel(table_ptr, tiles_ptr, words_ptr, floats_ptr, n_terms, RULE: tl.constexpr,
                       DTYPE: tl.constexpr, WIDE: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """words: [seed lo, seed hi, (stream lo, stream hi) per term]; floats: [coeff per term, ROW scalars per tensor]."""
    tile = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles_ptr + 2 * tile)
    start = tl.load(tiles_ptr + 2 * tile + 1)  # first element of the tile; may be −3..−1 (block alignment)
    row = table_ptr + N_COLS * t
    numel = tl.load(row + COL_NUMEL)
    first_block = (tl.load(row + COL_OFFSET) + start) // 4
    g = _tile_combination(first_block, words_ptr, floats_ptr, n_terms, 1.0, BLOCK)  # ×1.0: the coefficient exactly
    i = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = (i >= 0) & (i < numel)
    hyper = floats_ptr + n_terms + ROW * t
    x = _load_wide(tl.load(row + COL_SRC).to(tl.pointer_type(DTYPE)) + i, mask, WIDE, BF16_BITS)
    delta = _rule_delta(g, hyper, row, i, mask, RULE)
    decayed = delta + (x * tl.load(hyper + 1)).to(tl.float32)
    delta = tl.where(tl.load(hyper) != 0.0, decayed, delta)
    _store_narrow(tl.load(row + COL_OUT).to(tl.pointer_type(DTYPE)) + i, x + delta.to(WIDE), mask, DTYPE, BF16_BITS)


@triton.jit
def _sign(x):
    """torch.sign: −1, 0 or 1 (0 for ±0 and NaN), as csrc/rule_sweep.h zk_sign."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


@triton.jit
def _rule_delta(g, hyper, row, i, mask, RULE: tl.constexpr):
    """Δ of the rule (csrc/rule_sweep.h rule_delta); adam reads and writes its fp32 state m, v, the momentum
    rules their m."""
    if RULE == SIGN:
        return _sign(g) * tl.load(hyper + 2)
    elif RULE == MOMENTUM:
        m_ptrs = tl.load(row + COL_M).to(tl.pointer_type(tl.float32)) + i
        m = tl.where(tl.load(hyper + 3) != 0.0, g, tl.load(m_ptrs, mask=mask) * tl.load(hyper + 2) + g)
        tl.store(m_ptrs, m, mask=mask)
        return m * tl.load(hyper + 4)
    elif RULE == SIGN_MOMENTUM:
        m_ptrs = tl.load(row + COL_M).to(tl.pointer_type(tl.float32)) + i
        m = tl.load(m_ptrs, mask=mask) * tl.load(hyper + 2) + g * tl.load(hyper + 3)
        tl.store(m_ptrs, m, mask=mask)
        return _sign(m) * tl.load(hyper + 4)
    elif RULE == ADAM:
        m_ptrs = tl.load(row + COL_M).to(tl.pointer_type(tl.float32)) + i
        v_ptrs = tl.load(row + COL_V).to(tl.pointer_type(tl.float32)) + i
        m = tl.load(m_ptrs, mask=mask) * tl.load(hyper + 2) + g * tl.load(hyper + 3)
        v = tl.load(v_ptrs, mask=mask) * tl.load(hyper + 4) + (g * g) * tl.load(hyper + 5)
        tl.store(m_ptrs, m, mask=mask)
        tl.store(v_ptrs, v, mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v), tl.load(hyper + 6)) + tl.load(hyper + 7)
        return tl.div_rn(m, denom) * tl.load(hyper + 8)
    else:
        return g



def rule_sweep_triton(table, tiles, words, floats, n_terms: int, rule: str, dtype_name: str, block: int,
                      num_warps: int = 4) -> None:
    """Launches one rule sweep over the tiles of one dtype group; the tables are built (and checked) by
    zokernels.kernels.rule_sweep. table: int64 [n_tensors, 6]; tiles: int64 [n_tiles, 2]; words: int64;
    floats: float32."""
    n_tiles = tiles.shape[0]
    if n_tiles == 0:
        return
    _rule_sweep_kernel[(n_tiles,)](
        table, tiles, words, floats, n_terms, RULE=RULE_CODES[rule], DTYPE=_TL_DTYPES[dtype_name],
        WIDE=_WIDE.get(dtype_name, tl.float32), BF16_BITS=dtype_name == "bfloat16", BLOCK=block,
        num_warps=num_warps, enable_fp_fusion=False)
