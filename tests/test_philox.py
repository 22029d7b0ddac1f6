"""The _C Philox generator: independence from chunking and threads, the multi-tensor sweep against per-tensor
calls, rounding at the extremes, bad arguments. Its draws and sweeps against the numpy twin: test_kernel_matrix.py."""
import numpy as np
import pytest
import torch

from zokernels import backends, philox
from zokernels.reference import philox4x32_10_ref

needs_cpu_ext = pytest.mark.skipif(not backends.availability()["cpu"].available,
                                   reason="zokernels._C not built (pure-Python install)")


def test_reference_matches_random123_known_answers():
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    zero = philox4x32_10_ref(np.array([0], dtype=np.uint64), 0, 0)
    assert [int(v[0]) for v in zero] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    counter = np.array([0x85A308D3_243F6A88], dtype=np.uint64)
    pi = philox4x32_10_ref(counter, 0x03707344_13198A2E, 0x299F31D0_A4093822)
    assert [int(v[0]) for v in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@needs_cpu_ext
def test_normals_independent_of_chunking_and_threads():
    whole = philox.philox_normal(50_000, 7, 1, 0, backend="cpu")
    for start, stop in [(0, 1), (1, 6), (3, 16_389), (16_383, 50_000)]:
        part = philox.philox_normal(stop - start, 7, 1, start, backend="cpu")
        assert torch.equal(part, whole[start:stop])
    previous = backends._C.openmp_max_threads()
    try:
        backends._C.set_openmp_threads(1)
        single = philox.philox_normal(50_000, 7, 1, 0, backend="cpu")
        t1 = [torch.zeros(40_000), torch.zeros(10_000)]
        philox.add_normal_combination_(t1, [0, 40_000], 7, [(1, 1.0)], backend="cpu")
    finally:
        backends._C.set_openmp_threads(previous)
    assert torch.equal(single, whole)
    assert torch.equal(torch.cat(t1), whole)


@needs_cpu_ext
def test_multi_tensor_sweep_matches_per_tensor_loop():
    tensors = [torch.randn(5), torch.randn(3, 7), torch.randn(1), torch.randn(20_000)]
    offsets = philox.stream_offsets(tensors)
    terms = [(0, 0.5), (3, -1.25), (9, 2.0)]
    expected = []
    for t, o in zip(tensors, offsets):
        combination = torch.zeros(t.numel())
        for stream, coeff in terms:  # same fp32 order as the kernel: acc += coeff * z
            combination += np.float32(coeff) * philox.philox_normal(t.numel(), 11, stream, o, backend="cpu")
        expected.append(t + combination.view_as(t))
    philox.add_normal_combination_(tensors, offsets, 11, terms, backend="cpu")
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want)


def test_normal_moments():
    z = philox.philox_normal(1_000_000, 2024).double()
    # Statistical bounds for n = 1e6 draws, ≥ 3.5 standard errors each: mean (se 1e-3), variance (se √(2/n) =
    # 1.4e-3), fourth moment (se √(96/n) ≈ 0.01), lag-1 correlation (se 1e-3). z is bit-identical on every CPU.
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.var().item() - 1.0) < 5e-3
    assert abs(((z ** 4).mean() - 3.0).item()) < 0.05
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5e-3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="seed"):
        philox.philox_normal(4, -1)
    with pytest.raises(TypeError, match="seed"):
        philox.philox_normal(4, 1.5)
    with pytest.raises(ValueError, match="contiguous"):
        philox.add_normal_combination_([torch.zeros(4, 4).t()], [0], 1, [(0, 1.0)])
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        philox.add_normal_combination_([torch.zeros(4, dtype=torch.int32)], [0], 1, [(0, 1.0)])
    with pytest.raises(ValueError, match="offsets"):
        philox.add_normal_combination_([torch.zeros(4)], [], 1, [(0, 1.0)])


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_sweep_rounds_like_torch_at_the_extremes(dtype):
    # subnormal results, values near the overflow threshold (fp16: 65504 rounds up to inf past 65520) and zeros
    info = torch.finfo(dtype)
    base = torch.tensor([0.0, info.tiny * 0.25, info.tiny, -info.tiny * 3, info.max * 0.999, -info.max * 0.999])
    x = base.repeat(5000).to(dtype)
    for coeff in (info.tiny * 0.5, info.max * 0.002):
        z = philox.philox_normal(x.numel(), 3, 1, 7, backend="cpu")
        expected = (x.float() + np.float32(coeff) * z).to(dtype)
        got = x.clone()
        philox.add_normal_combination_([got], [7], 3, [(1, coeff)], backend="cpu")
        assert torch.equal(got, expected), coeff
