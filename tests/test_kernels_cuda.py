"""CUDA CGE kernels (csrc/cuda/cge_*.cu through _C) and the CUDA-graph query runner. The GPU tests are marked
`gpu` (skipped with a reason by conftest where no GPU is visible); the rest check what must hold without one:
the graph module imports, refuses clearly, and falls back to plain calls. Each CUDA kernel against its twin is a row
of tests/test_kernel_matrix.py (run there on CUDA tensors)."""
import pytest
import torch
import torch.nn.functional as F

from zokernels import backends
from zokernels.experimental.cuda_graph import GraphedQuery, query_runner
from zokernels.kernels.first_layer import BatchNormSpec, first_layer_delta
from zokernels.experimental.masked_sgd import MaskedSGD, gather_mask_indices
from zokernels.kernels.mixing import one_channel_conv2d
from zokernels.reference.kernels_ref import masked_gradients_ref

F64 = torch.float64


def cuda_backend_or_skip():
    status = backends.availability()["cuda"]
    if not status.available:
        pytest.skip(f"cuda backend unavailable: {status.reason}")


def conv_problem(device, dtype=F64, batch=5, hw=(11, 9), stride=2, padding=1, k=6):
    x = torch.randn(batch, 3, *hw, dtype=dtype, device=device)
    y = F.conv2d(x, torch.randn(4, 3, 3, 3, dtype=dtype, device=device), stride=stride, padding=padding)
    coords = torch.stack([torch.randint(0, n, (k,)) for n in (4, 3, 3, 3)], dim=1).to(device)
    steps = (torch.randn(k, dtype=dtype) * 0.2).to(device)
    bn = BatchNormSpec(True, 1e-5, torch.rand(4, dtype=dtype, device=device) + 0.5,
                       torch.randn(4, dtype=dtype, device=device))
    return x, y, coords, steps, bn


# ---- without a GPU --------------------------------------------------------------------------------------------
def test_query_runner_calls_plainly_off_cuda():
    calls = []
    runner = query_runner(lambda a: calls.append(a) or a * 2, torch.device("cpu"))
    assert not runner.use_graphs
    assert torch.equal(runner(torch.ones(3)), torch.full((3,), 2.0)) and len(calls) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_graphed_query_refuses_without_gpu():
    with pytest.raises(RuntimeError, match="GraphedQuery needs a CUDA GPU"):
        GraphedQuery(lambda a: a, [torch.ones(2)])


# ---- on a GPU -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("restrict", [False, True])
def test_cuda_masked_sgd_matches_torch_backend(restrict):
    cuda_backend_or_skip()
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    shapes = [(3, 5), (1,), (1025,), (2, 3, 3)]
    params = [torch.randn(s, dtype=F64, device="cuda") for s in shapes]
    masks = [torch.rand(s, device="cuda") < 0.5 for s in shapes]
    index = gather_mask_indices(params, masks)
    ours, theirs = [p.clone() for p in params], [p.clone() for p in params]
    a = MaskedSGD(ours, restrict_to_mask=restrict, backend="cuda", **hyper)
    b = MaskedSGD(theirs, restrict_to_mask=restrict, backend="torch", **hyper)
    for _ in range(3):
        values = torch.randn(len(index), dtype=F64, device="cuda")
        a.step(index, values)
        b.step(index, values)
    for p, q, g in zip(ours, theirs, masked_gradients_ref(params, masks, values)):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        assert torch.equal(p.grad, g)


@pytest.mark.gpu
def test_graphed_query_loop_matches_eager():
    """first layer + mixing + a reduction, captured once and replayed on new coordinates: same as eager calls."""
    cuda_backend_or_skip()
    x, y, coords, steps, bn = conv_problem("cuda", torch.float32)
    weight2 = torch.randn(6, 4, 3, 3, device="cuda")

    def query(c, h):
        first = first_layer_delta(x, y, c, h, 2, 1, bn=bn, backend="cuda")
        return one_channel_conv2d(first, c[:, 0], weight2, 1, 1, backend="cuda").square().sum(dim=(1, 2, 3))

    runner = query_runner(query, torch.device("cuda"))
    assert runner.use_graphs
    for _ in range(3):
        _, _, new_coords, new_steps, _ = conv_problem("cuda", torch.float32)
        torch.testing.assert_close(runner(new_coords, new_steps).clone(), query(new_coords, new_steps))
    assert len(runner.graphs) == 1
    small = runner(new_coords[:2], new_steps[:2])  # the last, smaller chunk: a second graph
    torch.testing.assert_close(small, query(new_coords[:2], new_steps[:2]))
    assert len(runner.graphs) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_bench_exits_cleanly_without_gpu():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "cge_gpu.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no GPU" in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cuda_kernels_bitwise_equal_cpu_twins(dtype):
    """The C++ twins replay the CUDA kernels' per-thread code and reduction tree (csrc/cge_kernels.h), both built
    without FMA contraction: results should agree bit for bit. The first layer is compared in float64 with BN
    statistics given, so that its per-channel table (torch ops on each device) is the same correctly rounded
    arithmetic on both sides."""
    cuda_backend_or_skip()
    if not hasattr(backends._C, "cge_first_layer_delta_cpu"):
        pytest.skip("zokernels._C has no C++ twins")
    to_cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    if dtype == F64:
        x, y, coords, steps, bn = conv_problem("cuda", dtype, batch=9, hw=(17, 15))
        dims = (0, 2, 3)
        bn = BatchNormSpec(True, bn.eps, bn.weight, bn.bias, y.mean(dim=dims), y.var(dim=dims, unbiased=False))
        gpu = first_layer_delta(x, y, coords, steps, 2, 1, bn=bn, backend="cuda").cpu()
        cpu_bn = BatchNormSpec(True, bn.eps, *(to_cpu(t) for t in (bn.weight, bn.bias, bn.mean, bn.var)))
        cpu = first_layer_delta(x.cpu(), y.cpu(), coords.cpu(), steps.cpu(), 2, 1, bn=cpu_bn, backend="cpu")
        assert torch.equal(gpu, cpu)
    delta, weight = torch.randn(3, 4, 9, 7, dtype=dtype, device="cuda"), torch.randn(5, 6, 3, 3, dtype=dtype, device="cuda")
    channels = torch.tensor([5, 0, 2], device="cuda")
    gpu = one_channel_conv2d(delta, channels, weight, 2, 1, backend="cuda").cpu()
    assert torch.equal(gpu, one_channel_conv2d(delta.cpu(), channels.cpu(), weight.cpu(), 2, 1, backend="cpu"))
