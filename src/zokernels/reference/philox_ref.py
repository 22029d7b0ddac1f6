"""Reference twin of csrc/philox.h in numpy: Philox4x32-10 plus Box-Muller, element i of a stream taken from
lane i % 4 of counter block i // 4. The product's torch backend has its own generator (kernels/philox_torch.py);
this twin is the oracle the tests compare every backend with.

z v2 (docs/philox.md): the transcendental part of Box-Muller is our own float32 formula built only from correctly
rounded +, −, ×, sqrt, integer/bit operations and exact int→float conversions, evaluated op by op in a fixed order.
numpy float32 arithmetic is IEEE round-to-nearest op by op (np.sqrt included), so this twin is **bit-identical** to
the C++, CUDA, Triton and torch kernels. The constants come from the product's single Python source,
zokernels/kernels/philox_constants.py (constants only: no code of the product is used here), which
tests/test_philox_v2.py checks against csrc/philox.h.
"""
import numpy as np

from ..kernels.philox_constants import (ANGLE_SCALE, COS_COEFFS, LN2_HI, LN2_LO, LOG_COEFFS, PHILOX_M0, PHILOX_M1,
                                        PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1, SIN_COEFFS, SQRT_HALF_BITS,
                                        UNIFORM_HALF_STEP, UNIFORM_SCALE)

__all__ = ["COS_COEFFS", "LN2_HI", "LN2_LO", "LOG_COEFFS", "SIN_COEFFS", "SQRT_HALF_BITS", "box_muller_ref",
           "neg2log_ref", "open_unit_ref", "philox4x32_10_ref", "philox_normal_ref", "philox_uint32_ref",
           "sincos_2pi_ref"]

_M0, _M1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
_W0, _W1 = PHILOX_W0, PHILOX_W1
_MASK32 = np.uint64(0xFFFFFFFF)
_F = np.float32


def philox4x32_10_ref(block: np.ndarray, stream: int, seed: int) -> tuple[np.ndarray, ...]:
    """Four uint32 lanes for each 64-bit counter block, with counter words (block lo, block hi, stream lo,
    stream hi) and key (seed lo, seed hi)."""
    block = np.asarray(block, dtype=np.uint64)
    c0, c1 = block & _MASK32, block >> np.uint64(32)
    c2 = np.full_like(c0, stream & 0xFFFFFFFF)
    c3 = np.full_like(c0, (stream >> 32) & 0xFFFFFFFF)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(PHILOX_ROUNDS):
        product0, product1 = _M0 * c0, _M1 * c2  # < 2^64: exact in uint64
        hi0, lo0 = product0 >> np.uint64(32), product0 & _MASK32
        hi1, lo1 = product1 >> np.uint64(32), product1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return tuple(lane.astype(np.uint32) for lane in (c0, c1, c2, c3))


def philox_uint32_ref(n: int, seed: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    index = np.arange(offset, offset + n, dtype=np.uint64)
    lanes = np.stack(philox4x32_10_ref(index >> np.uint64(2), stream, seed))
    return lanes[(index & np.uint64(3)).astype(np.int64), np.arange(n)]


def open_unit_ref(bits: np.ndarray) -> np.ndarray:
    """u = fl32((bits >> 8) · 2^-24 + 2^-25): in (0, 1] (the top argument rounds to 1, where z = ±0)."""
    return (bits >> np.uint32(8)).astype(np.float32) * _F(UNIFORM_SCALE) + _F(UNIFORM_HALF_STEP)


def _horner(x: np.ndarray, coeffs: tuple) -> np.ndarray:
    acc = np.full_like(x, _F(coeffs[-1]))
    for c in coeffs[-2::-1]:
        acc = acc * x + _F(c)
    return acc


def neg2log_ref(u: np.ndarray) -> np.ndarray:
    """−2 ln u for fp32 u in (0, 1]: u = m · 2^e with m ∈ [√½, √2), f = m − 1 exact (Sterbenz)."""
    u = np.asarray(u, dtype=np.float32)
    shifted = u.view(np.int32) - np.int32(SQRT_HALF_BITS)
    e = (shifted >> np.int32(23)).astype(np.float32)
    m = ((shifted & np.int32(0x7FFFFF)) + np.int32(SQRT_HALF_BITS)).view(np.float32)
    f = m - _F(1.0)
    log = ((f * f) * _horner(f, LOG_COEFFS) + e * _F(LN2_LO)) + f
    return _F(-2.0) * (log + e * _F(LN2_HI))


def sincos_2pi_ref(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos) of 2π·(k + ½)/2^24 with k = bits >> 8: the nearest quarter turn j from k's top bits, and the
    exact remainder x = 4u − j = (2d + 1)/2^23, |x| ≤ ½, as an fp32 value."""
    k = (np.asarray(bits, dtype=np.uint32) >> np.uint32(8)).astype(np.int32)
    j = (k + np.int32(1 << 21)) >> np.int32(22)
    x = (np.int32(2) * (k - (j << np.int32(22))) + np.int32(1)).astype(np.float32) * _F(ANGLE_SCALE)
    x2 = x * x
    s = x * _horner(x2, SIN_COEFFS)
    c = _F(1.0) + x2 * _horner(x2, COS_COEFFS)
    quadrant = j & np.int32(3)
    swap = (quadrant & np.int32(1)) == 1
    cos_abs, sin_abs = np.where(swap, s, c), np.where(swap, c, s)
    cosine = np.where((quadrant == 1) | (quadrant == 2), -cos_abs, cos_abs)
    sine = np.where(quadrant >= 2, -sin_abs, sin_abs)
    return sine, cosine


def box_muller_ref(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pair (z0, z1) = √(−2 ln u1) · (cos, sin)(2π u2) of two uint32 words, float32."""
    radius = np.sqrt(neg2log_ref(open_unit_ref(np.asarray(a, dtype=np.uint32))))
    sine, cosine = sincos_2pi_ref(b)
    return radius * cosine, radius * sine


def philox_normal_ref(n: int, seed: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    """z(seed, stream, offset + i) for i in range(n), float32."""
    index = np.arange(offset, offset + n, dtype=np.uint64)
    x, y, z, w = philox4x32_10_ref(index >> np.uint64(2), stream, seed)
    lane = (index & np.uint64(3)).astype(np.int64)
    first_pair = lane < 2
    z0, z1 = box_muller_ref(np.where(first_pair, x, z), np.where(first_pair, y, w))
    return np.where(lane % 2 == 0, z0, z1).astype(np.float32)
