"""The torch-native z v2 (zokernels/kernels/philox_torch.py, the torch backend's generator) against the numpy twin
and the C++ backend: bitwise, on fresh random seeds, streams and offsets, its pieces on (nearly) every input, and
the torch backend's sweeps against the cpu backend's. On a CUDA machine the same checks run on the GPU, with host
synchronization forbidden."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from zokernels import backends, philox
from zokernels.kernels import philox_torch
from zokernels.reference import philox_ref

needs_cpu_ext = pytest.mark.skipif(not backends.availability()["cpu"].available,
                                   reason="zokernels._C not built (pure-Python install)")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _bits(a) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a).view(np.uint32)


def _fresh_cases(count: int):
    """(n, seed, stream, offset) drawn fresh on every run (printed on failure), plus the awkward fixed cases: every
    offset mod 4, a batch crossing the 2^32 carry of the block counter's low word, all-ones seed and stream, and an
    index that wraps past 2^64."""
    rng = np.random.default_rng()
    cases = [(int(rng.integers(0, 3000)), *(int(v) for v in rng.integers(0, 2**64, 2, dtype=np.uint64)),
              int(rng.integers(0, 2**63, dtype=np.int64)) + int(rng.integers(0, 2)) * 2**63) for _ in range(count)]
    cases += [(n, 99, 3, o) for n, o in ((1, 0), (2, 1), (3, 2), (5, 3), (0, 7))]
    cases += [(5003, 7, 0, 2**34 - 301), (4099, 2**64 - 1, 2**64 - 1, 2**40 + 1), (21, 5, 6, 2**64 - 10)]
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_normals_and_words_bitwise_equal_the_numpy_twin_on_fresh_seeds(device):
    for n, seed, stream, offset in _fresh_cases(12):
        case = f"n={n} seed={seed} stream={stream} offset={offset}"
        z = philox_torch.philox_normal_torch(n, seed, stream, offset, device=device)
        assert z.device.type == device and z.dtype == torch.float32 and z.shape == (n,), case
        np.testing.assert_array_equal(_bits(z), _bits(philox_ref.philox_normal_ref(n, seed, stream, offset)),
                                      err_msg=case)
        words = philox_torch.philox_uint32_torch(n, seed, stream, offset, device=device).cpu().numpy()
        np.testing.assert_array_equal(words.astype(np.uint32), philox_ref.philox_uint32_ref(n, seed, stream, offset),
                                      err_msg=case)


def test_random123_known_answers():
    zero = philox_torch.philox4x32_10_torch(torch.tensor([0]), 0, 0)
    assert [int(v[0]) for v in zero] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    counter = 0x85A308D3_243F6A88 - 2**64  # a block >= 2^63, as int64 two's complement
    pi = philox_torch.philox4x32_10_torch(torch.tensor([counter]), 0x03707344_13198A2E,
                                          0x299F31D0_A4093822)
    assert [int(v[0]) for v in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@needs_cpu_ext
def test_bitwise_equal_to_the_cpu_backend_on_fresh_seeds():
    for n, seed, stream, offset in _fresh_cases(6):
        if offset + n > 2**64:
            continue  # the C++ entry point takes offsets with offset + n <= 2^64
        case = f"n={n} seed={seed} stream={stream} offset={offset}"
        got = philox.philox_normal(n, seed, stream, offset, backend="torch")
        want = philox.philox_normal(n, seed, stream, offset, backend="cpu")
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=case)
        np.testing.assert_array_equal(philox.philox_uint32(n, seed, stream, offset, backend="torch"),
                                      philox.philox_uint32(n, seed, stream, offset, backend="cpu"), err_msg=case)
        assert philox.normal_sumsq(n, seed, stream, offset, backend="torch") == pytest.approx(
            philox.normal_sumsq(n, seed, stream, offset, backend="cpu"), rel=1e-12), case


def _uniform_words(stride: int) -> np.ndarray:
    return np.arange(0, 1 << 24, stride, dtype=np.uint32) << np.uint32(8)


def test_transform_pieces_bitwise_equal_the_twin_on_every_fifth_input():
    words = _uniform_words(5)
    tw = torch.from_numpy(words.astype(np.int64))
    u = philox_torch.open_unit_torch(tw)
    np.testing.assert_array_equal(_bits(u), _bits(philox_ref.open_unit_ref(words)))
    log = philox_torch.neg2log_torch(u.clone())
    np.testing.assert_array_equal(_bits(log), _bits(philox_ref.neg2log_ref(philox_ref.open_unit_ref(words))))
    np.testing.assert_array_equal(_bits(philox_torch.sqrt_rn(log)), _bits(np.sqrt(log.numpy())))
    sine, cosine = philox_torch.sincos_2pi_torch(tw)
    want_sine, want_cosine = philox_ref.sincos_2pi_ref(words)
    np.testing.assert_array_equal(_bits(sine), _bits(want_sine))
    np.testing.assert_array_equal(_bits(cosine), _bits(want_cosine))


def test_sqrt_rn_is_correctly_rounded():
    # Across the float32 range (normal and subnormal, 0 and 1) against numpy's float32 sqrt, which is IEEE (the
    # hardware instruction). torch.sqrt on float32 is not, on this project's CPU build (see sqrt_rn).
    rng = np.random.default_rng()
    x = rng.integers(0, 0x7F800000, 1 << 20, dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, np.float32([0.0, 1.0, 2.0, 4.0, 1e-45, 3.4028235e38])])
    np.testing.assert_array_equal(_bits(philox_torch.sqrt_rn(torch.from_numpy(x))), _bits(np.sqrt(x)))


@pytest.mark.parametrize("chunk, n", [(7, 10_001),
                                      (philox_torch.DEVICE_CHUNK_BLOCKS, 3 * 4 * philox_torch.CHUNK_BLOCKS + 9)])
def test_results_do_not_depend_on_the_chunking(monkeypatch, chunk, n):
    """An odd small chunk, and the GPU's (one chunk here where the CPU's takes four), give the same z."""
    whole = philox_torch.philox_normal_torch(n, 3, 4, 4097)
    monkeypatch.setattr(philox_torch, "CHUNK_BLOCKS", chunk)
    assert torch.equal(philox_torch.philox_normal_torch(n, 3, 4, 4097), whole)
    for start, stop in [(0, 1), (1, 6), (3, 4_000), (9_998, 10_001)]:
        assert torch.equal(philox_torch.philox_normal_torch(stop - start, 3, 4, 4097 + start), whole[start:stop])


def test_the_generator_uses_torch_only():
    # No numpy and no reference twin: the torch backend runs on the tensors' device, with the shared constants.
    tree = ast.parse(Path(philox_torch.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "torch", ".philox_constants"}


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _tensors(sizes, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * 3).to(dtype).to(device) for n in sizes]


def _reference_into(src, offset, seed, terms):
    """(src + d, src − d) with d = Σ fl32(coeff)·z in fp32 from the numpy twin, rounded once to src's dtype."""
    d = np.zeros(src.numel(), dtype=np.float32)
    for stream, coeff in terms:
        d = d + np.float32(coeff) * philox_ref.philox_normal_ref(src.numel(), seed, stream, offset)
    d = torch.from_numpy(d).view_as(src)
    wide = torch.float64 if src.dtype == torch.float64 else torch.float32
    x = src.cpu().to(wide)
    return (x + d.to(wide)).to(src.dtype), (x - d.to(wide)).to(src.dtype)


# On CPU tensors the torch backend's sweeps against the twin are rows of tests/test_kernel_matrix.py; here they run
# on CUDA tensors, with host synchronization forbidden.
@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_sweeps_bitwise_equal_the_twin(dtype, device):
    rng = np.random.default_rng()
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    terms = [(int(rng.integers(0, 2**62)), 0.37), (int(rng.integers(0, 2**62)), -1.5)]
    sync = torch.cuda.set_sync_debug_mode if device == "cuda" else (lambda mode: None)
    sources = _tensors([1, 97, 2049, 5], dtype, device, seed=seed % 1000)
    offsets = [o + 3 for o in philox.stream_offsets(sources)]
    out, minus = [torch.empty_like(s) for s in sources], [torch.empty_like(s) for s in sources]
    in_place = [s.clone() for s in sources]
    sync("error")  # on CUDA: any host synchronization (a device->host copy) raises
    try:
        philox.normal_combination_into(out, sources, offsets, seed, terms, minus=minus, backend="torch")
        philox.add_normal_combination_(in_place, offsets, seed, terms, backend="torch")
    finally:
        sync("default")
    for i, (s, o) in enumerate(zip(sources, offsets)):
        want_plus, want_minus = _reference_into(s, o, seed, terms)
        assert out[i].device == s.device
        assert torch.equal(out[i].cpu(), want_plus), f"out[{i}] seed={seed} terms={terms}"
        assert torch.equal(minus[i].cpu(), want_minus), f"minus[{i}] seed={seed} terms={terms}"
        assert torch.equal(in_place[i].cpu(), want_plus), f"in place [{i}] seed={seed} terms={terms}"


@needs_cpu_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_sweeps_bitwise_equal_the_cpu_backend(dtype):
    rng = np.random.default_rng()
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    terms = [(int(rng.integers(0, 2**62)), 1e-3), (2**40 + 1, 0.25)]
    scales = [1.0, -0.5, 2.0]
    results = {}
    for backend in ("torch", "cpu"):
        tensors = _tensors([3, 4099, 20_000], dtype, "cpu", seed=1)
        offsets = [o + 1 for o in philox.stream_offsets(tensors)]
        philox.add_normal_combination_(tensors, offsets, seed, terms, scales=scales, backend=backend)
        results[backend] = tensors
    for got, want in zip(results["torch"], results["cpu"]):
        assert torch.equal(got, want), f"seed={seed} terms={terms}"
