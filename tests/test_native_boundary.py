"""The native boundary (kernels/native.py): every kernel call into zokernels._C goes through one declared op, which
checks each tensor (device, dtype, contiguity: the error names the op and the argument), takes dtype codes from the
one table, and the backend from the one decision (backends.choose_backend, also behind philox's sweeps)."""
import importlib

import pytest
import torch

from zokernels import backends, philox
from zokernels.experimental import masked_sgd
from zokernels.kernels import batchnorm, first_layer, mixing, native, rule_sweep

needs_cpu_ext = pytest.mark.skipif(not backends.availability()["cpu"].available, reason="zokernels._C not built")
WRAPPERS = (first_layer, mixing, batchnorm, masked_sgd, philox, rule_sweep)


def _declared_ops() -> list[native.NativeOp]:
    return [v for module in WRAPPERS for v in vars(module).values() if isinstance(v, native.NativeOp)]


def _linear_args(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    delta, weight = torch.randn(3, 2, generator=g, dtype=dtype), torch.randn(5, 4, generator=g, dtype=dtype)
    return delta, torch.tensor([0, 3, 1]), weight, torch.empty(6, 5, dtype=dtype)


@needs_cpu_ext
def test_wrong_device_names_op_and_argument():
    delta, channels, weight, out = _linear_args()
    with pytest.raises(ValueError, match=r"cge_one_channel_linear: weight must be a CPU tensor .* meta"):
        mixing.LINEAR("cpu", delta, channels, weight.to("meta"), out, 3, 2, 5, 4)
    with pytest.raises(ValueError, match=r"cge_one_channel_linear: delta must be a CUDA tensor .* cpu"):
        mixing.LINEAR("cuda", delta, channels, weight, out, 3, 2, 5, 4)


@needs_cpu_ext
def test_wrong_dtype_names_op_and_argument():
    delta, channels, weight, out = _linear_args()
    with pytest.raises(TypeError, match=r"cge_one_channel_linear: channels must have dtype in \['torch.int64'\]"):
        mixing.LINEAR("cpu", delta, channels.int(), weight, out, 3, 2, 5, 4)
    with pytest.raises(TypeError, match=r"cge_one_channel_linear: weight must have the dtype of the other data"):
        mixing.LINEAR("cpu", delta, channels, weight.float(), out, 3, 2, 5, 4)
    with pytest.raises(TypeError, match=r"cge_one_channel_linear: delta must have dtype in"):
        mixing.LINEAR("cpu", delta.half(), channels, weight.half(), out.half(), 3, 2, 5, 4)


@needs_cpu_ext
def test_non_contiguous_names_op_and_argument():
    delta, channels, weight, out = _linear_args()
    strided = torch.randn(4, 5, dtype=torch.float64).t()  # [5, 4], not contiguous
    with pytest.raises(ValueError, match=r"cge_one_channel_linear: weight must be contiguous"):
        mixing.LINEAR("cpu", delta, channels, strided, out, 3, 2, 5, 4)
    with pytest.raises(ValueError, match=r"philox_sweep: tensors\[1\] must be contiguous"):
        philox.SWEEP_CPU("cpu", [torch.zeros(3), strided], [3, 20], [0, 3], 1, [(0, 1.0)])


@needs_cpu_ext
def test_a_checked_call_matches_the_public_function():
    delta, channels, weight, out = _linear_args()
    mixing.LINEAR("cpu", delta, channels, weight, out, 3, 2, 5, 4)
    assert torch.equal(out, mixing.one_channel_linear(delta, channels, weight, backend="cpu"))


@needs_cpu_ext
def test_every_declared_op_is_a_C_function_and_every_C_kernel_is_declared():
    ops = _declared_ops()
    built = ("cpu", "cuda") if backends._C.has_cuda else ("cpu",)
    symbols = {op.symbol(b) for op in ops for b in op.backends if b in built}
    exported = {name for name in dir(backends._C)
                if name.endswith(("_cpu", "_cuda")) and callable(getattr(backends._C, name))}
    # philox_normal_scalar is the tests' scalar oracle, not a kernel op (no backend suffix)
    assert symbols == exported


@needs_cpu_ext
def test_one_dtype_code_table_agrees_with_C():
    assert backends._C.dtype_codes == {str(d).removeprefix("torch."): c for d, c in native.DTYPE_CODES.items()}
    for module in WRAPPERS + (importlib.import_module("zokernels.kernels.dispatch"),):
        tables = [v for v in vars(module).values()
                  if isinstance(v, dict) and v and all(isinstance(k, torch.dtype) for k in v)]
        assert all(t is native.DTYPE_CODES for t in tables), f"{module.__name__} has its own dtype table"


class _Recorder:
    """Stands in for _C: records the kernel calls instead of running them (the patched codes are not real)."""

    def __init__(self, real):
        self.real, self.calls = real, {}

    def __getattr__(self, name):
        if name.endswith("_cpu") and hasattr(self.real, name):
            return lambda *args: self.calls.setdefault(name, args)
        return getattr(self.real, name)


@needs_cpu_ext
def test_every_wrapper_takes_its_dtype_codes_from_the_native_table(monkeypatch):
    recorder = _Recorder(backends._C)
    monkeypatch.setattr(backends, "_C", recorder)
    monkeypatch.setitem(native.DTYPE_CODES, torch.float64, 41)
    monkeypatch.setitem(native.DTYPE_CODES, torch.float32, 40)
    x, y = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 2, 4, 4, dtype=torch.float64)
    first_layer.first_layer_delta(x, y, torch.tensor([[0, 1, 0, 0]]), 0.1, padding=0, backend="cpu")
    delta, channels, weight, _ = _linear_args()
    mixing.one_channel_linear(delta, channels, weight, backend="cpu")
    mixing.one_channel_conv2d(torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.tensor([1]), x[:, :2, :2, :2].
                              contiguous(), backend="cpu")
    params = [torch.zeros(4, dtype=torch.float64)]
    index = masked_sgd.gather_mask_indices(params, [torch.tensor([True, False, True, False])])
    masked_sgd.scatter_grad_(params, index, torch.ones(2, dtype=torch.float64), backend="cpu")
    philox.add_normal_combination_([torch.zeros(3), torch.zeros(2, dtype=torch.float64)], [0, 3], 1, [(0, 1.0)],
                                   backend="cpu")
    calls = recorder.calls
    for name in ("cge_first_layer_delta_cpu", "cge_one_channel_linear_cpu", "cge_one_channel_conv2d_cpu",
                 "cge_masked_sgd_cpu"):
        assert calls[name][-1] == 41, name
    assert calls["philox_sweep_cpu"][3] == [40, 41]


def _pretend_available(monkeypatch, name):
    monkeypatch.setitem(backends._STATUS, name, lambda: backends.BackendStatus(name, True, "pretended"))


def test_philox_triton_on_cpu_tensors_without_interpreter_is_refused_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _pretend_available(monkeypatch, "triton")  # as on a GPU machine: triton runs, but not on CPU tensors
    theta = torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"philox_sweep: backend 'triton' cannot run: triton needs CUDA tensors"):
        philox.add_normal_combination_([theta], [0], 1, [(0, 1.0)], backend="triton")
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run: triton needs CUDA tensors"):
        philox.normal_combination_into([torch.zeros(8)], [theta], [0], 1, [(0, 1.0)], backend="triton")
    assert torch.equal(theta, torch.zeros(8))


def test_model_level_default_is_the_same_decision(monkeypatch):
    _pretend_available(monkeypatch, "cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available: the cuda backend needs CUDA tensors"):
        backends.resolve_backend("cuda", torch.device("cpu"))
    expected = "cpu" if backends.status("cpu").available else "torch"
    assert backends.resolve_backend(None, torch.device("cpu")) == expected
