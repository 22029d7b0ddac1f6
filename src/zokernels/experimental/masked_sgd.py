"""Sparse mask application for CGE: the selected coordinates of a list of parameters as one flat index list, the
K finite differences scattered into `.grad`, and torch.optim.SGD's update (momentum, dampening, weight decay,
nesterov) either restricted to the mask (only selected coordinates move; their momentum and weight decay only) or
dense (every coordinate takes SGD's step with gradient zero outside the mask — exactly torch.optim.SGD).

Restricted: one launch over the index list (grad write + update fused). Dense: one launch scatters, one launch
updates every element of every parameter. Backends: cuda, triton, cpu (C++ twin of the CUDA kernels), torch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import native
from ..kernels.dispatch import choose_backend

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")
DENSE_BLOCK = 1024
# _C.cge_masked_sgd_cuda (csrc/cuda/cge_sparse.cu) and its C++ CPU twin (csrc/cpu/cge_cpu.cpp). The parameters,
# gradients and buffers travel as address tables (int64 tensors); values and hyper carry the element type.
NATIVE = native.op(
    "cge_masked_sgd",
    *(native.tensor(name, dtypes=(torch.int64,)) for name in ("params", "grads", "buffers", "numels")),
    "n_params", native.tensor("param_ids", dtypes=(torch.int32,)), native.tensor("elements", dtypes=(torch.int64,)),
    native.tensor("values"), "n", native.tensor("hyper"), "update", "dense", "max_numel", "flags",
    native.ELEMENT_CODE)


@dataclass(frozen=True)
class MaskIndex:
    """Coordinate j is element elements[j] (flat) of parameter param_ids[j]; parameters in list order, elements
    ascending within one (the engine's coordinate order: nonzero of the flattened mask)."""
    param_ids: torch.Tensor  # int32 [N]
    elements: torch.Tensor  # int64 [N]
    counts: tuple[int, ...]
    shapes: tuple[torch.Size, ...]

    def __len__(self) -> int:
        return int(self.elements.shape[0])


def gather_mask_indices(params, masks) -> MaskIndex:
    """One flat index list from one bool mask per parameter (None: no coordinates of that parameter)."""
    params, masks = list(params), list(masks)
    if len(params) != len(masks):
        raise ValueError(f"masks must have one entry per parameter ({len(params)}), got {len(masks)}")
    ids, elements, counts = [], [], []
    device = params[0].device if params else torch.device("cpu")
    for i, (param, mask) in enumerate(zip(params, masks)):
        if mask is None:
            counts.append(0)
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != param.shape:
            raise ValueError(f"masks[{i}] must be a bool tensor of shape {tuple(param.shape)}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        where = torch.nonzero(mask.reshape(-1).to(device)).flatten()
        ids.append(torch.full_like(where, i, dtype=torch.int32))
        elements.append(where)
        counts.append(int(where.numel()))
    cat = lambda parts, dtype: torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)  # noqa
    return MaskIndex(cat(ids, torch.int32), cat(elements, torch.int64), tuple(counts),
                     tuple(p.shape for p in params))


@dataclass(frozen=True)
class SGDHyper:
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    first_step: bool = False
    table: torch.Tensor | None = None  # lr, momentum, 1 − dampening, weight decay in the params' dtype

    def with_table(self, like: torch.Tensor) -> "SGDHyper":
        values = [self.lr, self.momentum, 1.0 - self.dampening, self.weight_decay]
        return SGDHyper(self.lr, self.momentum, self.dampening, self.weight_decay, self.nesterov, self.first_step,
                        torch.tensor(values, dtype=like.dtype, device=like.device))


def _check(params, index: MaskIndex, values) -> None:
    if not params:
        raise ValueError("params must be a non-empty list of tensors")
    first = params[0]
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or p.dtype not in NATIVE.element_types or p.device != first.device:
            raise TypeError(f"params[{i}] must be a float32/float64 tensor on {first.device} like params[0]"
                            f" ({first.dtype}), got {getattr(p, 'dtype', type(p).__name__)}")
        if p.dtype != first.dtype or not p.is_contiguous():
            raise ValueError(f"params[{i}] must be contiguous with params[0]'s dtype {first.dtype}")
    if not isinstance(index, MaskIndex) or tuple(p.shape for p in params) != index.shapes:
        raise ValueError("index must be the MaskIndex gather_mask_indices built for these parameters' shapes")
    if not isinstance(values, torch.Tensor) or values.shape != (len(index),):
        raise ValueError(f"values must be a tensor of shape ({len(index)},) (one per coordinate), got "
                         f"{tuple(getattr(values, 'shape', ()))}")


def _ensure_grads(params) -> list[torch.Tensor]:
    """Zeroed .grad tensors (created where missing): the scatter writes the selected entries only."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif not p.grad.is_contiguous() or p.grad.shape != p.shape:
            raise ValueError(f"a parameter's .grad must be contiguous and of its shape, got {p.grad.stride()}")
        else:
            p.grad.zero_()
    return [p.grad for p in params]


def _offset_table(base: torch.Tensor, tensors) -> torch.Tensor:
    """Element offsets of each tensor from `base` (the flattened index encoding the Triton kernels read)."""
    size, offsets = base.element_size(), []
    for t in tensors:
        distance = native.address(t) - native.address(base)
        if distance % size:
            raise ValueError(f"tensor at {native.address(t):#x} is not aligned to {size} bytes from params[0]")
        offsets.append(distance // size)
    return torch.tensor(offsets, dtype=torch.int64, device=base.device)


def _dense_chunks(params, block: int):
    ids, starts = [], []
    for i, p in enumerate(params):
        for start in range(0, p.numel(), block):
            ids.append(i)
            starts.append(start)
    device = params[0].device
    return (torch.tensor(ids, dtype=torch.int32, device=device), torch.tensor(starts, dtype=torch.int64,
                                                                               device=device))


def _run(chosen, params, grads, buffers, index, values, hyper, update: bool, dense: bool) -> None:
    """The kernels: coordinates (grad write, + update when restricted) or the dense update sweep."""
    values = values.to(device=params[0].device, dtype=params[0].dtype).contiguous()
    hyper = hyper.with_table(params[0])
    if chosen == "triton":
        from ..kernels.triton.cge_sparse import dense_sgd_triton, masked_coordinates_triton
        base = params[0]
        table = (base, _offset_table(base, params), _offset_table(base, grads), _offset_table(base, buffers))
        if dense:
            numels = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=base.device)
            dense_sgd_triton(table, numels, _dense_chunks(params, DENSE_BLOCK), hyper, DENSE_BLOCK)
        else:
            masked_coordinates_triton(table, index, values, hyper, update)
        return
    device = params[0].device
    flags = [hyper.weight_decay != 0, hyper.momentum != 0, hyper.first_step, hyper.nesterov]
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
    NATIVE(chosen, *(native.address_table(t, device) for t in (params, grads, buffers)), numels, len(params),
           index.param_ids, index.elements, values, len(index), hyper.table, update, dense,
           max(p.numel() for p in params), flags)


def _torch_coordinates(params, grads, buffers, index, values, hyper, update: bool) -> None:
    start = 0
    for p, g, b, count in zip(params, grads, buffers, index.counts):
        where = index.elements[start:start + count]
        step = values[start:start + count].to(p.dtype)
        start += count
        g.view(-1)[where] = step
        if update:
            _torch_sgd(p.view(-1), b.view(-1), step, hyper, where)


def _torch_sgd(p_flat, buf_flat, g, hyper, where) -> None:
    g = g + hyper.weight_decay * p_flat[where] if hyper.weight_decay != 0 else g
    if hyper.momentum != 0:
        buf = g.clone() if hyper.first_step else hyper.momentum * buf_flat[where] + (1 - hyper.dampening) * g
        buf_flat[where] = buf
        g = g + hyper.momentum * buf if hyper.nesterov else buf
    p_flat[where] = p_flat[where] - hyper.lr * g


def masked_sgd_(params, index: MaskIndex, values: torch.Tensor, hyper: SGDHyper, buffers=None,
                restrict_to_mask: bool = True, update: bool = True, backend: str | None = None) -> None:
    """Writes the finite differences `values` (index order) into each parameter's .grad (zero elsewhere) and, with
    `update`, takes the SGD step in place. buffers: one momentum buffer per parameter (shape of the parameter;
    required when hyper.momentum != 0; hyper.first_step: buf ← g as torch.optim.SGD does on its first step)."""
    params = list(params)
    _check(params, index, values)
    if hyper.momentum != 0 and (buffers is None or len(buffers) != len(params) or any(
            b.shape != p.shape or b.dtype != p.dtype or not b.is_contiguous() for b, p in zip(buffers, params))):
        raise ValueError("buffers must hold one contiguous momentum buffer per parameter, of its shape and dtype")
    buffers = list(buffers) if hyper.momentum != 0 else params  # never read without momentum
    chosen = choose_backend(NATIVE.name, IMPLEMENTED, backend, params[0].device)
    grads = _ensure_grads(params)
    with torch.no_grad():
        if chosen == "torch":
            _torch_coordinates(params, grads, buffers, index, values, hyper, update and restrict_to_mask)
            if update and not restrict_to_mask:
                for p, g, b in zip(params, grads, buffers):
                    _torch_sgd(p.view(-1), b.view(-1), g.view(-1), hyper, slice(None))
            return
        _run(chosen, params, grads, buffers, index, values, hyper, update and restrict_to_mask, dense=False)
        if update and not restrict_to_mask:
            _run(chosen, params, grads, buffers, index, values, hyper, True, dense=True)


def scatter_grad_(params, index: MaskIndex, values: torch.Tensor, backend: str | None = None) -> None:
    """Only the scatter: .grad ← values at the selected coordinates, zero elsewhere (any torch.optim optimizer can
    take the step afterwards)."""
    masked_sgd_(params, index, values, SGDHyper(lr=0.0), update=False, backend=backend)


class MaskedSGD:
    """torch.optim.SGD-style state around masked_sgd_: momentum buffers and the first-step rule."""

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, restrict_to_mask: bool = True,
                 backend: str | None = None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0 (as torch.optim.SGD)")
        self.params = list(params)
        self.hyper = SGDHyper(lr, momentum, dampening, weight_decay, nesterov)
        self.restrict_to_mask, self.backend = restrict_to_mask, backend
        self.buffers = [torch.zeros_like(p) for p in self.params] if momentum != 0 else None
        self.steps = 0

    @torch.no_grad()
    def step(self, index: MaskIndex, values: torch.Tensor) -> None:
        h = self.hyper
        hyper = SGDHyper(h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov, first_step=self.steps == 0)
        masked_sgd_(self.params, index, values, hyper, self.buffers, self.restrict_to_mask, backend=self.backend)
        self.steps += 1
