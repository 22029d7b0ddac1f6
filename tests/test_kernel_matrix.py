"""Every kernel op × backend × dtype against its slow twin (issue 16): the table is tests/kernel_opinfo.py (op, public
function with `backend=`, twin from zokernels/reference/, sample inputs, dtypes, backends, comparison rule).

Inputs are drawn fresh each run from ZOKERNELS_TEST_SEED (default: a new random seed, printed in every failure
message; set it to replay one), on the CPU, and moved to kernel_device(backend): CUDA for triton/cuda in a GPU run
(ZOKERNELS_TEST_GPU=1), else the CPU (the Triton interpreter reads CPU tensors). The twins run on the CPU copies.
A backend that cannot run here is skipped with its reason (backends.availability(), or dispatch's refusal).
Block edges, bad arguments, layouts, GPU compilation and cross-backend bitwise checks stay in the per-backend files.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import zlib

import pytest
import torch

from zokernels import backends, philox
from zokernels.experimental import masked_sgd
from helpers import kernel_device
from kernel_opinfo import BN_MODULE, F64, NOT_OPS, OPS, U32, to_device, to_float64

SEED = int(os.environ.get("ZOKERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
# what dispatch (zokernels.backends.choose_backend) raises for a requested backend that cannot run here
REFUSAL = re.compile(r"backend '(\w+)' (cannot run|is not available)")


def _seed(*parts) -> int:
    return (SEED + zlib.crc32(repr(parts).encode())) % 2**62


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


MATRIX = [pytest.param(op, backend, dtype, id=f"{op.name}-{backend}-{_dtype_name(dtype)}")
          for op in OPS for backend in op.backends for dtype in op.dtypes]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def _as_list(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_bitwise(out, expected, where: str) -> None:
    for i, (got, want) in enumerate(zip(_as_list(out), _as_list(expected), strict=True)):
        assert got.shape == want.shape and got.dtype == want.dtype, (
            f"{where}: output {i} is {tuple(got.shape)} {got.dtype}, the twin's {tuple(want.shape)} {want.dtype}")
        differ = (_bits(got) != _bits(want)).sum().item()
        assert differ == 0, f"{where}: output {i} differs from the twin in {differ} of {want.numel()} elements"


def rounding_errors(op, sample, out, dtype, where: str) -> tuple[float, float, float, float] | None:
    """float64: asserts the derived bound per element. float32: (the kernel's max error, the plain float32
    evaluation's max error, one float32 rounding of the output) against the float64 twin, and the op's ceiling scale,
    for check_float32_pooled: pooled over the samples on purpose, as helpers.max_error explains (a two-element
    sample's maximum is one draw of rounding noise, and two such draws differ by any factor)."""
    oracle = op.reference(to_float64(sample))
    got = out.detach().cpu().double()
    assert got.shape == oracle.shape, f"{where}: shape {tuple(got.shape)}, the twin's {tuple(oracle.shape)}"
    error = (got - oracle).abs()
    if dtype == F64:
        bound = torch.as_tensor(op.float64_bound(sample), dtype=F64)
        excess = (error - bound).max().item()
        assert excess <= 0, (f"{where}: float64 error {error.max().item():.3g} exceeds the derived bound (max "
                             f"{bound.max().item():.3g}) by {excess:.3g}; largest twin value "
                             f"{oracle.abs().max().item():.3g}")
        return None
    plain = _as_list((op.naive or op.reference)(sample))  # an op may name several equally plain evaluations
    plain_error = max((p.double() - oracle).abs().max().item() for p in plain)
    scale = max(oracle.abs().max().item(), op.ceiling_scale(sample) if op.ceiling_scale is not None else 0.0)
    return error.max().item(), plain_error, U32 * oracle.abs().max().item(), scale


def check_float32_pooled(op, pooled: list[tuple[float, float, float, float, str]], where: str) -> None:
    """The kernel's float32 error ≤ factor × max(the plain float32 evaluation's error, one rounding of the output),
    and ≤ the op's stated ceiling × the twin's largest value where it has one."""
    if not pooled:
        return
    worst = max(pooled)
    naive_error, floor = max(p[1] for p in pooled), max(p[2] for p in pooled)
    allowed = op.float32_factor * max(naive_error, floor)
    assert worst[0] <= allowed, (
        f"{where}: float32 error {worst[0]:.3g} vs the float64 twin (sample: {worst[4]}) exceeds "
        f"{op.float32_factor} x the plain float32 evaluation's error {naive_error:.3g} (floor: one rounding of the "
        f"output, {floor:.3g}), both measured on these samples")
    if op.float32_ceiling is not None:
        largest = max(p[3] for p in pooled)
        assert worst[0] <= op.float32_ceiling * largest, (
            f"{where}: float32 error {worst[0]:.3g} (sample: {worst[4]}) exceeds the stated ceiling "
            f"{op.float32_ceiling} x the largest term or twin value {largest:.3g}")


@pytest.mark.parametrize("op,backend,dtype", MATRIX)
def test_kernel_matches_twin(op, backend, dtype):
    status = backends.availability()[backend]
    if not status.available:
        pytest.skip(f"backend {backend!r} cannot run here: {status.reason}")
    device = kernel_device(backend)
    samples = op.samples(dtype, torch.Generator().manual_seed(_seed(op.name, backend, str(dtype))))
    assert samples, f"{op.name}: no samples"
    pooled = []
    for sample in samples:
        where = f"{op.name} [{backend}, {_dtype_name(dtype)}; {sample.desc}; ZOKERNELS_TEST_SEED={SEED}]"
        on_device = to_device(sample, device)
        if sample.error is not None:
            with pytest.raises(sample.error[0], match=sample.error[1]):
                op.call(on_device, backend)
            continue
        try:
            out = op.call(on_device, backend)
        except RuntimeError as error:
            if REFUSAL.search(str(error)) and REFUSAL.search(str(error)).group(1) == backend:
                pytest.skip(f"dispatch refuses backend {backend!r} here: {error}")
            raise
        # kernel_device says "cuda", the outputs "cuda:0": compare the device type
        assert all(t.device.type == device.type for t in _as_list(out)), f"{where}: output not on {device}"
        if op.comparison == "bitwise":
            check_bitwise(out, op.reference(sample), where)
        else:
            errors = rounding_errors(op, sample, out, dtype, where)
            pooled += [(*errors, sample.desc)] if errors is not None else []
        if op.inputs_kept is not None:
            check_bitwise(op.inputs_kept(on_device), op.inputs_kept(sample), f"{where} (inputs must not change)")
    check_float32_pooled(op, pooled, f"{op.name} [{backend}, {_dtype_name(dtype)}; ZOKERNELS_TEST_SEED={SEED}]")


# ---- coverage: every kernel op has a row ------------------------------------------------------------------------
def _public_functions(module, needs_backend: bool) -> dict[str, object]:
    found = {}
    for name, fn in vars(module).items():
        if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
            continue
        if needs_backend and "backend" not in inspect.signature(fn).parameters:
            continue
        found[f"{module.__name__}.{name}"] = fn
    return found


def kernel_ops() -> dict[str, object]:
    """The public functions taking `backend=` in zokernels.kernels (its Triton launchers excepted: they sit behind
    those functions), zokernels.philox and zokernels.experimental.masked_sgd, and every public function of the
    fused CPU BN module (no backend argument: cpu only)."""
    import zokernels.kernels as package
    found = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if ".triton" not in info.name:
            found |= _public_functions(importlib.import_module(info.name), needs_backend=True)
    found |= _public_functions(philox, needs_backend=True)
    found |= _public_functions(masked_sgd, needs_backend=True)
    found |= _public_functions(BN_MODULE, needs_backend=False)
    return found


def test_every_kernel_op_has_a_matrix_row():
    """A kernel op added without a row in tests/kernel_opinfo.py fails here: add the row (or, for a helper that is
    not an op, an entry in NOT_OPS saying where it is checked)."""
    covered = {fn for op in OPS for fn in op.covers}
    missing = sorted(name for name, fn in kernel_ops().items()
                     if fn not in covered and name.rsplit(".", 1)[1] not in NOT_OPS)
    assert not missing, f"kernel ops with no matrix row: {missing}"
    assert covered <= set(kernel_ops().values()), "a row covers a function the scan does not find"
