"""Reference twin of csrc/philox.h in numpy: Philox4x32-10 plus Box-Muller, element i of a stream taken from
lane i % 4 of counter block i // 4. It is also the torch backend's generator when `_C` is missing.

The uint32 stream is bit-identical to the C++ one. The normals agree to a few ulp: the transform uses
log/cos/sin, and numpy's float32 versions may round differently from glibc's (both are accurate to ~1 ulp).
"""
import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_TWO_PI_F32 = np.float32(6.28318548202514648)


def philox4x32_10_ref(block: np.ndarray, stream: int, seed: int) -> tuple[np.ndarray, ...]:
    """Four uint32 lanes for each 64-bit counter block, with counter words (block lo, block hi, stream lo,
    stream hi) and key (seed lo, seed hi)."""
    block = np.asarray(block, dtype=np.uint64)
    c0, c1 = block & _MASK32, block >> np.uint64(32)
    c2 = np.full_like(c0, stream & 0xFFFFFFFF)
    c3 = np.full_like(c0, (stream >> 32) & 0xFFFFFFFF)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
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


def _open_unit(bits: np.ndarray) -> np.ndarray:
    return (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24) + np.float32(2.0**-25)


def philox_normal_ref(n: int, seed: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    """z(seed, stream, offset + i) for i in range(n), float32."""
    index = np.arange(offset, offset + n, dtype=np.uint64)
    x, y, z, w = philox4x32_10_ref(index >> np.uint64(2), stream, seed)
    lane = (index & np.uint64(3)).astype(np.int64)
    first_pair = lane < 2
    u1 = _open_unit(np.where(first_pair, x, z))
    u2 = _open_unit(np.where(first_pair, y, w))
    with np.errstate(all="ignore"):
        radius = np.sqrt(np.float32(-2.0) * np.log(u1))
        angle = _TWO_PI_F32 * u2
        return np.where(lane % 2 == 0, radius * np.cos(angle), radius * np.sin(angle)).astype(np.float32)
