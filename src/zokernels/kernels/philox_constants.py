"""The constants of z v2 (docs/philox.md), in one place for every Python side: the torch-native generator
(kernels/philox_torch.py), the Triton kernel (kernels/triton/philox_sweep.py) and the numpy twin
(reference/philox_ref.py) import them from here. csrc/philox.h holds the C++/CUDA copy as constexpr;
tests/test_philox_v2.py parses the header and checks that it equals this module, value by value.

Plain Python ints and floats (every float exactly representable in fp32), so importing this needs neither numpy,
torch nor triton."""

# Philox4x32-10 (Salmon et al., SC'11): round multipliers and Weyl key increments.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10

# ln(1 + f) = f + f² · P(f) on f ∈ [√½ − 1, √2 − 1]; P of degree 8 (Chebyshev interpolation, rounded to fp32).
LOG_COEFFS = tuple(float.fromhex(h) for h in (
    "-0x1.fffffep-2", "0x1.555554p-2", "-0x1.00020cp-2", "0x1.99a012p-3", "-0x1.548382p-3", "0x1.22ea5ap-3",
    "-0x1.0cda32p-3", "0x1.048f72p-3", "-0x1.3a4ff6p-4"))
# sin(πx/2) = x · S(x²), cos(πx/2) = 1 + x² · C(x²) on |x| ≤ ½; S and C of degree 3 in x².
SIN_COEFFS = tuple(float.fromhex(h) for h in ("0x1.921fb6p+0", "-0x1.4abbbap-1", "0x1.465ec4p-4", "-0x1.2d9b40p-8"))
COS_COEFFS = tuple(float.fromhex(h) for h in ("-0x1.3bd3ccp+0", "0x1.03c1eap-2", "-0x1.55cb98p-6", "0x1.db6492p-11"))
# ln 2 = LN2_HI + LN2_LO with LN2_HI's low 12 mantissa bits zero, so e · LN2_HI is exact for |e| < 2^12.
LN2_HI = float.fromhex("0x1.62e300p-1")
LN2_LO = float.fromhex("0x1.2fefa4p-17")
SQRT_HALF_BITS = 0x3F3504F3  # fp32 bits of √½: the mantissa is reduced to [√½, √2)

# Uniforms: u = fl32(k · 2^-24 + 2^-25), k = word >> 8; the angle's remainder is an odd integer times 2^-23.
UNIFORM_SCALE = 2.0**-24
UNIFORM_HALF_STEP = 2.0**-25
ANGLE_SCALE = 2.0**-23
