"""z v2 (docs/philox.md) in torch ops: Philox4x32-10 and the project's Box-Muller transform, on the device of the
caller's choice (CPU or CUDA), with no numpy and no host round trip. This is the `torch` backend's generator.

Bit-identical to csrc/philox.h and to the numpy twin (reference/philox_ref.py) by construction:
- Philox words are uint32 values held in int64 tensors. The 32×32→64 product is formed from two 32×16-bit
  products (each < 2^48) so that no int64 operation overflows; hi and lo words are then exact.
- The transform uses only elementwise fp32 `+ − ×`, `sqrt`, exact int→float conversions, bit reinterpretation
  (`Tensor.view(dtype)`), integer shifts/masks/xors and `torch.where`, one torch op per IEEE operation, in the same order
  as the header. Every such op rounds once to nearest: no op here fuses a multiply and an add (torch's `add` is
  `self + alpha·other` with alpha = 1, which is exact). The one exception is the square root: torch.sqrt on
  float32 is not correctly rounded on CPU, so `sqrt_rn` takes it in float64 and rounds once (exact, see there).
  The polynomials' coefficients and the ln 2 split come from kernels/philox_constants.py, like the Triton kernel's
  and the numpy twin's.

Element i of a stream is lane i % 4 of Philox block i // 4; a block is computed once for its four elements (the
numpy twin computes one Philox block per element), in chunks of chunk_blocks(device) blocks to bound temporaries.
Results do not depend on the chunking."""
from __future__ import annotations

import torch

from .philox_constants import (ANGLE_SCALE, COS_COEFFS, LN2_HI, LN2_LO, LOG_COEFFS, PHILOX_M0, PHILOX_M1,
                               PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1, SIN_COEFFS, SQRT_HALF_BITS, UNIFORM_HALF_STEP,
                               UNIFORM_SCALE)

MASK32 = 0xFFFFFFFF
CHUNK_BLOCKS = 1 << 16  # CPU: 256K elements per chunk, a few MiB of int64 temporaries (cache-sized)
# On a GPU each chunk is a few dozen kernel launches, so small chunks are launch-bound: the first H200 run measured
# 4.87 s for one MeZO step of the 135M shape (513 chunks per sweep), 100x the cuda backend. 1M blocks per chunk cuts
# the launches 16-fold for ~10 int64 temporaries of 8 MiB each.
DEVICE_CHUNK_BLOCKS = 1 << 20


def chunk_blocks(device) -> int:
    """Philox blocks per chunk on `device` (the results do not depend on it)."""
    return CHUNK_BLOCKS if torch.device(device).type == "cpu" else DEVICE_CHUNK_BLOCKS


def _mulhilo(m: int, c):
    """(hi, lo) 32-bit words of the 64-bit product m·c, m a uint32 constant, c a uint32 Python int or int64 tensor of
    uint32 values. m = m_hi·2^16 + m_lo: c·m_hi and c·m_lo are < 2^48, so every int64 intermediate is exact."""
    if not isinstance(c, torch.Tensor):
        product = m * c
        return product >> 32, product & MASK32
    m_hi, m_lo = m >> 16, m & 0xFFFF
    upper = c * m_hi                                 # < 2^48: bits 16.. of the product
    low = c * m_lo + ((upper & 0xFFFF) << 16)        # < 2^48 + 2^32: bits 0.. of the product, plus a carry
    return (upper >> 16) + (low >> 32), low & MASK32


def philox4x32_10_torch(block: torch.Tensor, stream: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Four lanes (int64 tensors holding uint32 words) for 64-bit counter blocks (int64, read as two's complement:
    block b >= 2^63 is passed as b − 2^64), with counter words (block lo, block hi, stream lo, stream hi) and key
    (seed lo, seed hi); stream and seed are Python ints in [0, 2^64)."""
    c0, c1 = block & MASK32, (block >> 32) & MASK32
    c2, c3 = stream & MASK32, (stream >> 32) & MASK32  # Python ints until the first round mixes them in
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return tuple(lane if isinstance(lane, torch.Tensor) else torch.full_like(block, lane) for lane in (c0, c1, c2, c3))


def _horner(x: torch.Tensor, coeffs: tuple) -> torch.Tensor:
    acc = torch.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc.mul_(x).add_(c)  # fl(fl(acc·x) + c): two roundings, as in the header
    return acc


def neg2log_torch(u: torch.Tensor) -> torch.Tensor:
    """−2 ln u for float32 u in (0, 1] (header: neg2log)."""
    shifted = u.view(torch.int32) - SQRT_HALF_BITS
    e = (shifted >> 23).to(torch.float32)  # arithmetic shift: e <= 0
    f = ((shifted & 0x7FFFFF) + SQRT_HALF_BITS).view(torch.float32) - 1.0
    log_m = (f * f).mul_(_horner(f, LOG_COEFFS)).add_(e * LN2_LO).add_(f)
    return log_m.add_(e.mul_(LN2_HI)).mul_(-2.0)


def sincos_2pi_torch(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of 2π(k + ½)/2^24, k = bits >> 8, for int64 tensors of uint32 words (header: sincos_2pi)."""
    k = (bits >> 8).to(torch.int32)
    j = (k + (1 << 21)) >> 22
    x = ((k - (j << 22)) * 2 + 1).to(torch.float32).mul_(ANGLE_SCALE)  # odd integer < 2^23: exact
    x2 = x * x
    s = x.mul_(_horner(x2, SIN_COEFFS))
    c = _horner(x2, COS_COEFFS).mul_(x2).add_(1.0)
    swap = (j & 1).to(torch.bool)  # quadrants 1 and 3
    cos_abs, sin_abs = torch.where(swap, s, c), torch.where(swap, c, s)
    # The quadrant's signs as sign-bit flips (exactly IEEE negation): cos < 0 in quadrants 1, 2, i.e. when bit 0 of
    # j differs from bit 1; sin < 0 in quadrants 2, 3 (bit 1). The flip word is 0 or −2^31 (the sign bit).
    cos_flip = ((j ^ (j >> 1)) & 1).mul_(-2**31)
    sin_flip = ((j >> 1) & 1).mul_(-2**31)
    sine = sin_abs.view(torch.int32).bitwise_xor_(sin_flip).view(torch.float32)
    cosine = cos_abs.view(torch.int32).bitwise_xor_(cos_flip).view(torch.float32)
    return sine, cosine


def open_unit_torch(bits: torch.Tensor) -> torch.Tensor:
    """u = fl32((bits >> 8)·2^-24 + 2^-25) in (0, 1] (header: uint_to_open_unit)."""
    return (bits >> 8).to(torch.float32).mul_(UNIFORM_SCALE).add_(UNIFORM_HALF_STEP)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root of float32 x >= 0, as the header's zk_sqrt.

    Not torch.sqrt on float32: on CPU it is not correctly rounded (this project's torch 2.13 CPU build, AVX512:
    1 ulp off on ~15% of random inputs; tests/test_philox_torch.py keeps that measurement). Instead the root is
    taken in float64 and rounded once to float32, which is exact whenever the float64 root is faithful (< 1 ulp):
    for a float32 input the exact root lies at least 2^-50 (relative) from any float32 rounding midpoint (x·2^48
    is an even integer and a midpoint's square M²·2^-48 has M odd, so |x − m²| ≥ 2^-48 and |√x − m| ≥ 2^-48/4),
    farther than a float64 ulp (2^-52), so rounding the float64 root to float32 gives the correctly rounded one."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def box_muller_torch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, z1) = √(−2 ln u1)·(cos, sin)(2π u2) of two int64 tensors of uint32 words, float32."""
    radius = sqrt_rn(neg2log_torch(open_unit_torch(a)))
    sine, cosine = sincos_2pi_torch(b)
    return cosine.mul_(radius), sine.mul_(radius)


def _blocks(first_block: int, n_blocks: int, seed: int, stream: int, device, normals: bool) -> torch.Tensor:
    """[n_blocks, 4]: the four normals (float32) or words (int64) of Philox blocks first_block, first_block + 1, ..."""
    out = torch.empty((n_blocks, 4), dtype=torch.float32 if normals else torch.int64, device=device)
    chunk = chunk_blocks(device)
    for start in range(0, n_blocks, chunk):
        count = min(chunk, n_blocks - start)
        block = torch.arange(first_block + start, first_block + start + count, dtype=torch.int64, device=device)
        x, y, z, w = philox4x32_10_torch(block, stream, seed)
        if normals:
            # both Box-Muller pairs of the block in one pass: (x, y) gives elements 0, 1; (z, w) gives 2, 3
            cosine, sine = box_muller_torch(torch.cat((x, z)), torch.cat((y, w)))
            lanes = (cosine[:count], sine[:count], cosine[count:], sine[count:])
        else:
            lanes = (x, y, z, w)
        target = out[start:start + count]
        for lane, values in enumerate(lanes):
            target[:, lane] = values
    return out


def _stream(n: int, seed: int, stream: int, offset: int, device, normals: bool) -> torch.Tensor:
    if n == 0:
        return torch.empty(0, dtype=torch.float32 if normals else torch.int64, device=device)
    if offset + n > 2**64:  # the element index is a uint64: it wraps to 0, as in the header and the numpy twin
        head = 2**64 - offset
        return torch.cat((_stream(head, seed, stream, offset, device, normals),
                          _stream(n - head, seed, stream, 0, device, normals)))
    first_block, last_block = offset >> 2, (offset + n - 1) >> 2
    flat = _blocks(first_block, last_block - first_block + 1, seed, stream, device, normals).view(-1)
    return flat[offset & 3:(offset & 3) + n]


def philox_normal_torch(n: int, seed: int, stream: int = 0, offset: int = 0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """z(seed, stream, (offset + i) mod 2^64) for i < n: a float32 tensor on `device` (default CPU). Arguments are
    checked by zokernels.philox: seed, stream and offset in [0, 2^64)."""
    return _stream(n, seed, stream, offset, torch.device("cpu") if device is None else device, True)


def philox_uint32_torch(n: int, seed: int, stream: int = 0, offset: int = 0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """The raw Philox words behind z, as an int64 tensor of values in [0, 2^32)."""
    return _stream(n, seed, stream, offset, torch.device("cpu") if device is None else device, False)
