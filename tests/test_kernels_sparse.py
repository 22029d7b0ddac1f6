"""Sparse mask application (zokernels/experimental/masked_sgd.py), Triton under TRITON_INTERPRET=1 and torch backends,
against torch.optim.SGD and the twin of zokernels/reference/kernels_ref.py, over several steps on fresh random
inputs. float64: agreement to rounding (torch may fuse a multiply-add where the kernels round twice)."""
import pytest
import torch

from zokernels.backends import _C, availability
from zokernels.estimators.cge import coordinate_indices
from zokernels.experimental.masked_sgd import (DENSE_BLOCK, MaskedSGD, SGDHyper, gather_mask_indices, masked_sgd_,
                                               scatter_grad_)
from zokernels.reference.kernels_ref import masked_gradients_ref, masked_sgd_ref
from helpers import kernel_device

pytest.importorskip("triton")
HAS_CPU_TWIN = _C is not None and hasattr(_C, "cge_masked_sgd_cpu") and availability()["cpu"].available
# These cases hand the kernels CPU tensors (the Triton interpreter's); in a GPU run (interpreter off) masked SGD's
# compiled kernels are checked on CUDA tensors by test_kernels_cuda.py::test_cuda_masked_sgd_matches_torch_backend.
_TRITON = availability()["triton"]
CPU_TENSOR_TRITON = pytest.mark.skipif(
    kernel_device("triton").type == "cuda" or not _TRITON.available,
    reason=f"these cases pass CPU tensors to Triton, so they need the interpreter ({_TRITON.reason})")
BACKENDS = (pytest.param("triton", marks=CPU_TENSOR_TRITON), "torch") + (("cpu",) if HAS_CPU_TWIN else ())
F64 = torch.float64
SHAPES = [(3, 5), (7,), (1,), (2, 3, 3), (DENSE_BLOCK + 1,), (DENSE_BLOCK - 1,)]
HYPERS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(lr=0.02, momentum=0.5, weight_decay=0.1, nesterov=True),
]


def random_problem(dtype=F64, density=0.5):
    params = [torch.randn(s, dtype=dtype) for s in SHAPES]
    masks = [torch.rand(s) < density for s in SHAPES]
    masks[2] = torch.ones(1, dtype=torch.bool)  # numel-1 parameter, selected
    return params, masks


def test_index_order_is_the_engines_coordinate_order():
    params, masks = random_problem()
    masks[1] = None
    index = gather_mask_indices(params, masks)
    start = 0
    for i, (p, m) in enumerate(zip(params, masks)):
        expected = coordinate_indices(p, m) if m is not None else torch.zeros(0, dtype=torch.int64)
        assert torch.equal(index.elements[start:start + len(expected)], expected)
        assert torch.all(index.param_ids[start:start + len(expected)] == i)
        start += len(expected)
    assert start == len(index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hyper", HYPERS)
def test_dense_mode_equals_torch_optim_sgd(hyper, backend):
    """restrict_to_mask=False is torch.optim.SGD with .grad = the masked gradient, step after step."""
    params, masks = random_problem()
    index = gather_mask_indices(params, masks)
    mine = [p.clone() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    twin, twin_buffers = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    ours, torch_sgd = MaskedSGD(mine, restrict_to_mask=False, backend=backend, **hyper), torch.optim.SGD(theirs,
                                                                                                         **hyper)
    for step in range(3):
        values = torch.randn(len(index), dtype=F64)
        ours.step(index, values)
        masked_sgd_ref(twin, twin_buffers, masks, values, restrict_to_mask=False, first_step=step == 0, **hyper)
        for p, g in zip(theirs, masked_gradients_ref(params, masks, values)):
            p.grad = g
        torch_sgd.step()
    for a, b, c in zip(mine, theirs, twin):
        torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hyper", HYPERS)
def test_restricted_mode_is_sgd_on_the_selected_coordinates(hyper, backend):
    """restrict_to_mask=True: the selected coordinates follow torch.optim.SGD run on them alone (weight decay and
    momentum included); every other coordinate, and its momentum buffer, is untouched."""
    params, masks = random_problem()
    index = gather_mask_indices(params, masks)
    mine = [p.clone() for p in params]
    selected = torch.cat([p[m] for p, m in zip(params, masks)]).requires_grad_()
    ours, torch_sgd = MaskedSGD(mine, restrict_to_mask=True, backend=backend, **hyper), torch.optim.SGD([selected],
                                                                                                        **hyper)
    twin, twin_buffers = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    for step in range(3):
        values = torch.randn(len(index), dtype=F64)
        ours.step(index, values)
        masked_sgd_ref(twin, twin_buffers, masks, values, restrict_to_mask=True, first_step=step == 0, **hyper)
        selected.grad = values.clone()
        torch_sgd.step()
    torch.testing.assert_close(torch.cat([p[m] for p, m in zip(mine, masks)]), selected.detach(), rtol=1e-13,
                               atol=1e-15)
    for p, m, original, c in zip(mine, masks, params, twin):
        assert torch.equal(p[~m], original[~m])
        torch.testing.assert_close(p, c, rtol=1e-13, atol=1e-15)
    if ours.buffers is not None:
        assert all(torch.all(b[~m] == 0) for b, m in zip(ours.buffers, masks))


@CPU_TENSOR_TRITON
@pytest.mark.parametrize("n_selected", [1023, 1024, 1025])  # the coordinate kernel's BLOCK −1, =, +1
def test_coordinate_kernel_block_edges(n_selected):
    params = [torch.randn(700, dtype=F64), torch.randn(3, 300, dtype=F64)]
    flat = torch.zeros(1600, dtype=torch.bool)
    flat[torch.randperm(1600)[:n_selected]] = True
    masks = [flat[:700], flat[700:].view(3, 300)]
    index = gather_mask_indices(params, masks)
    values = torch.randn(n_selected, dtype=F64)
    twin = [p.clone() for p in params]
    masked_sgd_(params, index, values, SGDHyper(lr=0.3, weight_decay=0.2), backend="triton")
    masked_sgd_ref(twin, twin, masks, values, lr=0.3, weight_decay=0.2)
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("restrict", [False, True])
def test_float32_kernels_equal_torch_backend(restrict, backend):
    """fp32: same operations in the same order per element; at most one rounding apart where torch fuses."""
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    params, masks = random_problem(torch.float32)
    index = gather_mask_indices(params, masks)
    a, b = [p.clone() for p in params], [p.clone() for p in params]
    opt_a = MaskedSGD(a, restrict_to_mask=restrict, backend=backend, **hyper)
    opt_b = MaskedSGD(b, restrict_to_mask=restrict, backend="torch", **hyper)
    for _ in range(3):
        values = torch.randn(len(index))
        opt_a.step(index, values)
        opt_b.step(index, values)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2 * 2.0**-24, atol=2.0**-24)


@CPU_TENSOR_TRITON
def test_masked_sgd_bad_arguments():
    params, masks = random_problem()
    index = gather_mask_indices(params, masks)
    values = torch.randn(len(index), dtype=F64)
    with pytest.raises(ValueError, match="masks must have one entry per parameter"):
        gather_mask_indices(params, masks[:-1])
    with pytest.raises(ValueError, match=r"masks\[0\] must be a bool tensor of shape \(3, 5\)"):
        gather_mask_indices(params, [masks[0].T] + masks[1:])
    with pytest.raises(ValueError, match=r"values must be a tensor of shape"):
        scatter_grad_(params, index, values[1:], backend="triton")
    with pytest.raises(ValueError, match=r"params\[0\] must be contiguous"):
        scatter_grad_([params[0].T] + params[1:], gather_mask_indices([params[0].T] + params[1:],
                                                                      [masks[0].T] + masks[1:]), values, "triton")
    with pytest.raises(ValueError, match=r"params\[1\] must be contiguous with params\[0\]'s dtype"):
        scatter_grad_([params[0], params[1].float()] + params[2:], index, values, backend="triton")
    with pytest.raises(ValueError, match="index must be the MaskIndex"):
        scatter_grad_(params[::-1], index, values, backend="triton")
    with pytest.raises(ValueError, match="buffers must hold one contiguous momentum buffer"):
        masked_sgd_(params, index, values, SGDHyper(lr=0.1, momentum=0.9), buffers=None, backend="triton")
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        MaskedSGD(params, lr=0.1, nesterov=True)
