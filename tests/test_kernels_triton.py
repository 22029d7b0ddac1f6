"""Triton CGE kernels (TRITON_INTERPRET=1 on CPU, set by conftest; on CUDA tensors in a GPU run,
ZOKERNELS_TEST_GPU=1): what the op x backend x dtype matrix (tests/test_kernel_matrix.py, each op against its twin
of zokernels/reference/kernels_ref.py) does not check: block edges of the launchers, channels-last inputs, the
engine's rules and seeds as the kernel's oracle, bad arguments and refusals, and compilation for GPU targets. Inputs
are drawn on the CPU and moved to kernel_device(backend); the twins run on the CPU copies."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from zokernels.backends import _C, availability
from zokernels.kernels.first_layer import BatchNormSpec, _channel_table, coords_from_flat, first_layer_delta
from zokernels.kernels.mixing import one_channel_conv2d, one_channel_linear
from zokernels.reference.kernels_ref import first_layer_delta_ref, one_channel_conv2d_ref
from helpers import compile_for_gpus_in_subprocess, kernel_device

pytest.importorskip("triton")
# cpu: the C++ twin of the CUDA kernels (csrc/cpu/cge_cpu.cpp, the per-element code the .cu files run)
HAS_CPU_TWIN = _C is not None and hasattr(_C, "cge_first_layer_delta_cpu") and availability()["cpu"].available
_TRITON = availability()["triton"]
# ZOKERNELS_TEST_GPU=1 turns the interpreter off: without a GPU the triton backend cannot run at all
needs_triton = pytest.mark.skipif(not _TRITON.available, reason=f"the triton backend cannot run here: {_TRITON.reason}")
BACKENDS = (pytest.param("triton", marks=needs_triton), "torch") + (("cpu",) if HAS_CPU_TWIN else ())
F64 = torch.float64
TRITON_DEVICE = kernel_device("triton")


def on(device, *tensors):
    """The tensors on `device` (the same tensor objects when they are there already)."""
    return tuple(t.to(device) for t in tensors)


def bn_on(bn, device):
    """A BatchNormSpec with its tensors (weight, bias, running statistics) on `device`: the kernels read them."""
    if bn is None:
        return None
    return dataclasses.replace(bn, **{f: getattr(bn, f).to(device) for f in ("weight", "bias", "mean", "var")
                                      if getattr(bn, f) is not None})


def random_coords(k, c_out, c_in, kh, kw, generator=None):
    cols = [torch.randint(0, n, (k,), generator=generator) for n in (c_out, c_in, kh, kw)]
    return torch.stack(cols, dim=1)


def random_bn(kind, c_out, dtype=F64):
    if kind is None:
        return None
    weight, bias = torch.rand(c_out, dtype=dtype) + 0.5, torch.randn(c_out, dtype=dtype)
    if kind == "train":
        return BatchNormSpec(True, 1e-5, weight, bias)
    return BatchNormSpec(False, 1e-5, weight, bias, torch.randn(c_out, dtype=dtype), torch.rand(c_out, dtype=dtype) + 0.1)


def conv_case(batch, c_in, hw, c_out, kernel, stride, padding, dilation=1, dtype=F64):
    x = torch.randn(batch, c_in, *hw, dtype=dtype)
    w = torch.randn(c_out, c_in, *kernel, dtype=dtype)
    return x, F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)


# ---- 1. fused first layer ------------------------------------------------------------------------------------
@needs_triton
def test_first_layer_triton_equals_torch_rules_float32():
    """The engine's unfused rules (torch backend) and the fused kernel: same formulas, fp32 rounding apart (each
    output is a few dozen float32 operations: rtol 1e-5 ≈ 170 ulps is a ceiling, ~1 ulp is seen)."""
    x, y = conv_case(4, 3, (7, 7), 5, (3, 3), 2, 1, dtype=torch.float32)
    coords, steps, bn = random_coords(4, 5, 3, 3, 3), torch.randn(4) * 0.1, random_bn("train", 5, torch.float32)
    fused = first_layer_delta(*on(TRITON_DEVICE, x, y, coords, steps), 2, 1, 1, bn_on(bn, TRITON_DEVICE), True,
                              backend="triton").cpu()
    rules = first_layer_delta(x, y, coords, steps, 2, 1, 1, bn, True, backend="torch")
    torch.testing.assert_close(fused, rules, rtol=1e-5, atol=1e-6 * rules.abs().max().item())


@needs_triton
@pytest.mark.parametrize("n_total", [15, 16, 17, 31])  # the sweep's BLOCK (16) minus 1, equal, plus 1; a prime
def test_first_layer_block_edges(n_total):
    from zokernels.kernels.triton.cge_first_layer import first_layer_delta_triton
    x, y = conv_case(n_total, 2, (3, 3), 3, (3, 3), 1, 0)  # H' = W' = 1: B·H'·W' = n_total
    coords, steps, bn = random_coords(3, 3, 2, 3, 3), torch.randn(3, dtype=F64), random_bn("train", 3)
    # the launcher is called directly: every pointer it gets (x, y, coords, steps, chan, out) on the kernel device
    xd, yd, coords_d, steps_d = on(TRITON_DEVICE, x, y, coords, steps)
    chan, mode = _channel_table(yd, bn_on(bn, TRITON_DEVICE))
    out = torch.empty(3, n_total, 1, 1, dtype=F64, device=TRITON_DEVICE)
    geometry = ((1, 1), (0, 0), (1, 1))
    first_layer_delta_triton(xd, yd, coords_d, steps_d, chan, out, geometry, mode, True, block=16)
    torch.testing.assert_close(out.cpu(), first_layer_delta_ref(x, y, coords, steps, *geometry, bn, True),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_layer_channels_last_inputs(backend):
    x, y = conv_case(3, 4, (6, 5), 3, (3, 3), 1, 1)
    coords, steps, bn = random_coords(3, 3, 4, 3, 3), torch.randn(3, dtype=F64), random_bn("train", 3)
    ref = first_layer_delta_ref(x, y, coords, steps, (1, 1), (1, 1), (1, 1), bn, True)
    cl, device = torch.channels_last, kernel_device(backend)
    xd, yd, coords_d, steps_d = on(device, x, y, coords, steps)
    out = first_layer_delta(xd.contiguous(memory_format=cl), yd.contiguous(memory_format=cl), coords_d, steps_d, 1,
                            1, bn=bn_on(bn, device), backend=backend)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)


def test_coords_from_flat_matches_weight_layout():
    weight = torch.zeros(4, 3, 2, 5)
    flat = torch.randperm(weight.numel())[:9]
    for (o, c, i, j), index in zip(coords_from_flat(flat, weight.shape).tolist(), flat.tolist()):
        probe = weight.clone()
        probe.view(-1)[index] = 1
        assert probe[o, c, i, j] == 1


@needs_triton
def test_first_layer_matches_engine_seed_and_rules():
    """Fed what the engine caches (conv input, conv output), the kernel gives what the engine's seed + BN + ReLU
    rules give for the same flat coordinates: the engine can call it in place of those three steps."""
    from zokernels.engine import delta as rules
    from zokernels.engine.cge_engine import record_base
    from zokernels.engine.heads import Head
    from zokernels.engine.seeds import seed_delta
    from zokernels.estimators.scope import QueryScope
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), torch.nn.BatchNorm2d(3),
                                torch.nn.ReLU()).double()
    x = torch.randn(4, 2, 9, 7, dtype=F64)
    y, indices, steps = model[0](x), torch.tensor([0, 17, 40, 53]), torch.randn(4, dtype=F64) * 0.1
    named = dict(model.named_parameters())
    with QueryScope(model, list(named.values())) as guard:  # the engine's recording of the conv (its seed's input)
        _, rec = record_base(model, (x,), Head(lambda out, batch: out.sum(), (x,)), None, guard, named)
    param = rec.tape.params["0.weight"]
    seed = seed_delta(param.users[0], param, indices, steps, rec.ctx)
    bn_out = model[1](y)
    after_bn = rules.batchnorm_train_delta(y, seed, model[1].weight, rules.batch_statistics(y, model[1].eps))
    expected = rules.relu_delta(bn_out, after_bn)
    # the engine's rules ran on the CPU model; the kernel gets the same tensors (and the BN module's) on its device
    coords = coords_from_flat(indices, model[0].weight.shape)
    out = first_layer_delta(*on(TRITON_DEVICE, x, y, coords, steps), 2, 1,
                            bn=bn_on(BatchNormSpec.from_module(model[1]), TRITON_DEVICE), backend="triton")
    torch.testing.assert_close(out.cpu(), expected.values, rtol=1e-10, atol=1e-12)
    assert torch.equal(seed.channels, indices // 18)


# ---- 2. one-channel mixing -----------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("positions,c_out", [(15, 3), (16, 4), (17, 5)])  # BLOCK_P 16, BLOCK_C 4: −1, =, +1
def test_one_channel_conv2d_block_edges(positions, c_out):
    from zokernels.kernels.triton.cge_mixing import one_channel_conv2d_triton
    delta, weight = torch.randn(2, 3, 1, positions, dtype=F64), torch.randn(c_out, 2, 1, 1, dtype=F64)
    channels = torch.tensor([1, 0])
    # the launcher is called directly: delta, channels (int64), weight and out on the kernel device
    out = torch.empty(6, c_out, 1, positions, dtype=F64, device=TRITON_DEVICE)
    one_channel_conv2d_triton(*on(TRITON_DEVICE, delta, channels, weight), out, ((1, 1), (0, 0), (1, 1)),
                              block_p=16, block_c=4)
    torch.testing.assert_close(out.cpu(), one_channel_conv2d_ref(delta, channels, weight), rtol=1e-12, atol=1e-12)


@needs_triton
def test_chained_first_layer_and_mixing_equals_dense_conv_of_dense_delta():
    """First layer then mixing equals the next conv applied to the scattered (dense) delta, per replica."""
    x, y = conv_case(2, 2, (6, 6), 3, (3, 3), 1, 1)
    coords, steps, bn = random_coords(3, 3, 2, 3, 3), torch.randn(3, dtype=F64), random_bn("train", 3)
    weight2 = torch.randn(4, 3, 3, 3, dtype=F64)
    xd, yd, coords_d, steps_d, weight2_d = on(TRITON_DEVICE, x, y, coords, steps, weight2)
    first_d = first_layer_delta(xd, yd, coords_d, steps_d, 1, 1, bn=bn_on(bn, TRITON_DEVICE), backend="triton")
    mixed = one_channel_conv2d(first_d, coords_d[:, 0], weight2_d, 1, 1, backend="triton").cpu().view(3, 2, 4, 6, 6)
    first = first_d.cpu()
    for k in range(3):
        dense = torch.zeros(2, 3, 6, 6, dtype=F64)
        dense[:, coords[k, 0]] = first[k]
        torch.testing.assert_close(mixed[k], F.conv2d(dense, weight2, padding=1), rtol=1e-12, atol=1e-12)


# ---- bad input ------------------------------------------------------------------------------------------------
def _first_layer_args(device=torch.device("cpu")):
    x, y = conv_case(2, 2, (5, 5), 3, (3, 3), 1, 1)
    return on(device, x, y, random_coords(2, 3, 2, 3, 3), torch.randn(2, dtype=F64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_layer_rejects_non_contiguous(backend):
    x, y, coords, steps = _first_layer_args(kernel_device(backend))
    with pytest.raises(ValueError, match="x must be contiguous or channels-last"):
        first_layer_delta(x.transpose(2, 3), y, coords, steps, 1, 1, backend=backend)
    with pytest.raises(ValueError, match="y must be contiguous or channels-last"):
        first_layer_delta(x, y[:, :, ::2].repeat_interleave(2, 2)[:, :, :5].transpose(2, 3), coords, steps, 1, 1,
                          backend=backend)


@needs_triton
def test_first_layer_bad_arguments():
    x, y, coords, steps = _first_layer_args(TRITON_DEVICE)
    cases = [
        (dict(x=x.int()), TypeError, "x must have dtype"),
        (dict(y=y.float()), TypeError, "y must have the dtype of x"),
        (dict(coords=coords.float()), TypeError, "coords must be an int64/int32"),
        (dict(coords=coords[:, :3]), ValueError, r"coords must have shape \[K >= 1, 4\]"),
        (dict(coords=coords[:0]), ValueError, r"coords must have shape \[K >= 1, 4\]"),
        (dict(coords=coords + torch.tensor([3, 0, 0, 0], device=TRITON_DEVICE)), ValueError, "coords out of range"),
        (dict(steps=torch.randn(3, dtype=F64).to(TRITON_DEVICE)), ValueError, r"steps must have shape \(2,\)"),
        (dict(stride=0), ValueError, "stride and dilation must be >= 1"),
        (dict(padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(bn=BatchNormSpec(False, 1e-5)), ValueError, "running statistics"),
    ]
    for change, error, message in cases:
        args = dict(x=x, y=y, coords=coords, steps=steps, stride=1, padding=1, backend="triton") | change
        with pytest.raises(error, match=message):
            first_layer_delta(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_backend_refused_with_reason():
    x, y, coords, steps = _first_layer_args()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        first_layer_delta(x, y, coords, steps, 1, 1, backend="cuda")


def test_mixing_bad_arguments():
    # every refusal comes before the backend is chosen: this runs even where the triton backend cannot
    delta, weight, channels = torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(4, 3, 3, 3, dtype=F64), torch.tensor([0, 2])
    delta, weight, channels = on(TRITON_DEVICE, delta, weight, channels)
    with pytest.raises(ValueError, match="delta must be contiguous"):
        one_channel_conv2d(delta.transpose(2, 3), channels, weight, backend="triton")
    with pytest.raises(ValueError, match="weight must be contiguous or channels-last"):
        one_channel_conv2d(delta, channels, weight.transpose(2, 3).transpose(0, 1), backend="triton")
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 3\)"):
        one_channel_conv2d(delta, torch.tensor([0, 3]), weight, backend="triton")
    with pytest.raises(ValueError, match=r"channels must have one entry per replica \(2\)"):
        one_channel_conv2d(delta, torch.tensor([0]), weight, backend="triton")
    with pytest.raises(ValueError, match="does not fit"):
        one_channel_conv2d(delta[..., :2, :2].contiguous(), channels, weight, backend="triton")
    with pytest.raises(TypeError, match="weight must have the dtype of delta"):
        one_channel_linear(delta[:, :, 0, 0].contiguous(), channels, weight[:, :, 0, 0].float().contiguous())
    with pytest.raises(ValueError, match="delta must be contiguous"):
        one_channel_linear(delta[:, :, 0, 0], channels, weight[:, :, 0, 0].contiguous(), backend="triton")
    with pytest.raises(ValueError, match="has no 'cpu' implementation"):
        from zokernels.kernels.dispatch import choose_backend
        choose_backend("an_op", ("triton", "torch"), "cpu", delta.device)


def test_default_backend_on_cpu_tensors_matches_twin():
    """backend=None on CPU tensors: torch for these two ops (the C++ twins are slower there), never the slow
    interpreter."""
    x, y, coords, steps = _first_layer_args()
    bn = random_bn("train", 3)
    ref = first_layer_delta_ref(x, y, coords, steps, (1, 1), (1, 1), (1, 1), bn, True)
    torch.testing.assert_close(first_layer_delta(x, y, coords, steps, 1, 1, bn=bn), ref, rtol=1e-10, atol=1e-12)
    delta, weight = torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(4, 3, 3, 3, dtype=F64)
    channels = torch.tensor([0, 2])
    torch.testing.assert_close(one_channel_conv2d(delta, channels, weight, 2, 1),
                               one_channel_conv2d_ref(delta, channels, weight, (2, 2), (1, 1)), rtol=1e-12, atol=1e-12)


# ---- the GPU compiler (no GPU needed) -----------------------------------------------------------------------
_GPU_COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from zokernels.kernels.triton import cge_first_layer as fl, cge_mixing as mx, cge_sparse as sp

def signature(fn, pointers, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name, "i32")
    return sig

def compile_one(fn, pointers, constexprs, arch):
    src = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4)).asm["ptx"]

CASES = []
for f in ("fp32", "fp64"):
    p = f"*{f}"
    ptrs = dict(x_ptr=p, y_ptr=p, coord_ptr="*i64", step_ptr=p, chan_ptr=p, out_ptr=p)
    for mode in (0, 1, 2):
        CASES.append(("first_layer", fl._first_layer_delta_kernel, ptrs, dict(BN_MODE=mode, RELU=True, BLOCK=1024)))
    CASES.append(("conv", mx._one_channel_conv2d_kernel, dict(d_ptr=p, ch_ptr="*i64", w_ptr=p, out_ptr=p),
                  dict(BLOCK_P=64, BLOCK_C=16)))
    CASES.append(("linear", mx._one_channel_linear_kernel, dict(d_ptr=p, ch_ptr="*i64", w_ptr=p, out_ptr=p),
                  dict(BLOCK_B=64, BLOCK_C=64)))
    sp_ptrs = dict(base_ptr=p, p_off="*i64", g_off="*i64", b_off="*i64", pid_ptr="*i32", elem_ptr="*i64",
                   value_ptr=p, hyper_ptr=p, numel_ptr="*i64", chunk_pid_ptr="*i32", chunk_start_ptr="*i64")
    flags = dict(WEIGHT_DECAY=True, MOMENTUM=True, FIRST=False, NESTEROV=True)
    CASES.append(("coords", sp._masked_coordinates_kernel, sp_ptrs, dict(UPDATE=True, BLOCK=1024, **flags)))
    CASES.append(("dense", sp._dense_sgd_kernel, sp_ptrs, dict(BLOCK=1024, **flags)))
for arch in (80, 90):
    for name, fn, ptrs, consts in CASES:
        ptx = compile_one(fn, ptrs, consts, arch)
        print(arch, name, ptx.count(".entry"))
"""


def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    """The interpreter accepts code the GPU compiler rejects: compile every kernel variant (fp32/fp64, BN modes,
    SGD flags) through Triton's whole pipeline (PTX and cubin) for sm_80 and sm_90, in a subprocess with the
    interpreter off."""
    lines = compile_for_gpus_in_subprocess(_GPU_COMPILE, tmp_path)
    assert len(lines) == 28
    assert all(line.split()[2] == "1" for line in lines), lines
