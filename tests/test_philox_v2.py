"""z v2: the constants' Python source (kernels/philox_constants.py) equals csrc/philox.h, the accuracy bound of
the float32 Box-Muller against float64 on the same uniforms, and the scalar/batched C++ paths against the numpy
twin."""
import re
from pathlib import Path

import numpy as np
import pytest

from zokernels import backends
from zokernels.kernels import philox_constants as C
from zokernels.reference import philox_ref

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "philox.h"
needs_cpu_ext = pytest.mark.skipif(not backends.availability()["cpu"].available,
                                   reason="zokernels._C not built (pure-Python install)")


def _header_constants() -> dict[str, float]:
    text = HEADER.read_text()
    floats = {name: float.fromhex(value) for name, value in
              re.findall(r"\b(k(?:Log|Sin|Cos)C\d|kLn2(?:Hi|Lo)) = (-?0x[0-9a-fA-F.]+p[-+]?\d+)f", text)}
    floats["kSqrtHalfBits"] = int(re.search(r"kSqrtHalfBits = (0x[0-9A-Fa-f]+);", text).group(1), 16)
    return floats


def test_python_constants_equal_the_header():
    # kernels/philox_constants.py is the one Python source (the torch generator, the Triton kernel and the numpy
    # twin import it); csrc/philox.h is the C++/CUDA copy.
    header = _header_constants()
    for prefix, coeffs in (("kLogC", C.LOG_COEFFS), ("kSinC", C.SIN_COEFFS), ("kCosC", C.COS_COEFFS)):
        in_header = [header[name] for name in sorted(k for k in header if k.startswith(prefix))]
        assert in_header == list(coeffs), prefix
    assert (header["kLn2Hi"], header["kLn2Lo"]) == (C.LN2_HI, C.LN2_LO)
    assert header["kSqrtHalfBits"] == C.SQRT_HALF_BITS
    for value in list(C.LOG_COEFFS) + list(C.SIN_COEFFS) + list(C.COS_COEFFS):
        assert float(np.float32(value)) == value  # exactly representable: every backend reads the same fp32
    text = HEADER.read_text()
    philox_round = re.search(r"mulhilo32\((0x[0-9A-F]+)u, c0.*mulhilo32\((0x[0-9A-F]+)u, c2.*k0 \+= (0x[0-9A-F]+)u;"
                             r"\s*k1 \+= (0x[0-9A-F]+)u;", text, re.S)
    assert [int(h, 16) for h in philox_round.groups()] == [C.PHILOX_M0, C.PHILOX_M1, C.PHILOX_W0, C.PHILOX_W1]
    assert f"round < {C.PHILOX_ROUNDS};" in text
    assert "0x1p-24f), 0x1p-25f)" in text and "0x1p-23f)" in text
    assert (C.UNIFORM_SCALE, C.UNIFORM_HALF_STEP, C.ANGLE_SCALE) == (2.0**-24, 2.0**-25, 2.0**-23)
    assert philox_ref.LOG_COEFFS is C.LOG_COEFFS and philox_ref.SIN_COEFFS is C.SIN_COEFFS  # the twin's are these


def _all_uniform_words(stride: int = 1) -> np.ndarray:
    return np.arange(0, 1 << 24, stride, dtype=np.uint32) << np.uint32(8)


# The accuracy bounds below (1 ulp, 9e-8, 7e-7) are the float32 Box-Muller's documented accuracy (docs/philox.md),
# not fitted tolerances: the reference is IEEE float32 +, −, ×, ÷ only (bit-identical on every CPU), checked on
# every input (or 2M of them) against float64 numpy, whose own error (~1e-16) is negligible.
def test_neg2log_within_one_ulp_of_float64():
    u = philox_ref.open_unit_ref(_all_uniform_words(stride=3))
    got = philox_ref.neg2log_ref(u).astype(np.float64)
    want = -2.0 * np.log(u.astype(np.float64))
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - want)[want > 0] / ulp[want > 0]) < 1.0
    assert got[-1] == 0.0 or want[-1] > 0  # u = 1 (top word) gives radius 0, never NaN


def test_sincos_within_9e8_of_float64_on_every_angle():
    bits = _all_uniform_words()
    sine, cosine = philox_ref.sincos_2pi_ref(bits)
    angle = 2 * np.pi * ((bits >> np.uint32(8)).astype(np.float64) + 0.5) / 2**24
    assert np.max(np.abs(sine - np.sin(angle))) < 9e-8
    assert np.max(np.abs(cosine - np.cos(angle))) < 9e-8


def test_box_muller_within_7e7_of_float64_on_the_same_uniforms():
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 2**32, 1 << 21, dtype=np.uint32) for _ in range(2))
    z0, z1 = philox_ref.box_muller_ref(a, b)
    radius = np.sqrt(-2.0 * np.log(philox_ref.open_unit_ref(a).astype(np.float64)))
    angle = 2 * np.pi * ((b >> np.uint32(8)).astype(np.float64) + 0.5) / 2**24
    assert np.max(np.abs(z0 - radius * np.cos(angle))) < 7e-7
    assert np.max(np.abs(z1 - radius * np.sin(angle))) < 7e-7


@needs_cpu_ext
def test_cpu_scalar_definition_equals_reference_on_fresh_seeds():
    rng = np.random.default_rng()
    for _ in range(3):
        seed, stream = (int(v) for v in rng.integers(0, 2**63, 2))
        offset = int(rng.integers(0, 2**40))
        got = np.empty(4099, dtype=np.float32)
        backends._C.philox_normal_scalar(got.ctypes.data, got.size, seed, stream, offset)
        want = philox_ref.philox_normal_ref(got.size, seed, stream, offset)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{seed} {stream} {offset}")


def test_cuda_tile_size_matches_the_host_tables():
    # zokernels.philox builds the CUDA tile table for CUDA_BLOCK elements per tile; the kernel covers 4 * kThreads.
    from zokernels import philox

    source = (HEADER.parent / "cuda" / "philox_sweep.cu").read_text()
    threads = int(re.search(r"constexpr int kThreads = (\d+);", source).group(1))
    assert 4 * threads == philox.CUDA_BLOCK
