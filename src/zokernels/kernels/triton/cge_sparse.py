"""Sparse mask application over many parameters in one launch (Triton).

Tensors of one dtype are addressed relative to one base pointer: element offset (t.data_ptr() − base.data_ptr())
/ itemsize per tensor (the flattened index encoding), so params, grads and momentum buffers of every parameter
are reached from one kernel argument without a device pointer table.

Update (torch.optim.SGD): g ← g + wd·θ; buf ← g (first step) or m·buf + (1 − dampening)·g;
g ← g + m·buf (nesterov) or buf; θ ← θ − lr·g."""
import triton
import triton.language as tl


@triton.jit
def _sgd_update(base_ptr, p_at, b_at, g, hyper_ptr, mask,
                WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr):
    # hyper: lr, momentum, 1 − dampening, weight decay, in the parameters' dtype (fp64 runs stay fp64)
    lr = tl.load(hyper_ptr)
    momentum = tl.load(hyper_ptr + 1)
    keep = tl.load(hyper_ptr + 2)
    weight_decay = tl.load(hyper_ptr + 3)
    p = tl.load(base_ptr + p_at, mask=mask, other=0.0)
    if WEIGHT_DECAY:
        g = g + weight_decay * p
    if MOMENTUM:
        if FIRST:
            buf = g
        else:
            buf = momentum * tl.load(base_ptr + b_at, mask=mask, other=0.0) + keep * g
        tl.store(base_ptr + b_at, buf, mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    tl.store(base_ptr + p_at, p - lr * g, mask=mask)


@triton.jit
def _masked_coordinates_kernel(base_ptr, p_off, g_off, b_off, pid_ptr, elem_ptr, value_ptr, n, hyper_ptr,
                               UPDATE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                               MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                               BLOCK: tl.constexpr):
    """Per selected coordinate j: .grad ← value j; with UPDATE, the SGD step on that coordinate only."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    pid = tl.load(pid_ptr + j, mask=mask, other=0)
    elem = tl.load(elem_ptr + j, mask=mask, other=0)
    g = tl.load(value_ptr + j, mask=mask, other=0.0)
    tl.store(base_ptr + tl.load(g_off + pid, mask=mask, other=0) + elem, g, mask=mask)
    if UPDATE:
        p_at = tl.load(p_off + pid, mask=mask, other=0) + elem
        b_at = tl.load(b_off + pid, mask=mask, other=0) + elem
        _sgd_update(base_ptr, p_at, b_at, g, hyper_ptr, mask, WEIGHT_DECAY, MOMENTUM, FIRST, NESTEROV)


@triton.jit
def _dense_sgd_kernel(base_ptr, p_off, g_off, b_off, numel_ptr, chunk_pid_ptr, chunk_start_ptr, hyper_ptr,
                      WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                      FIRST: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    """The ordinary SGD step on every element of every parameter; program i owns chunk i of one parameter."""
    chunk = tl.program_id(0)
    pid = tl.load(chunk_pid_ptr + chunk)
    elem = tl.load(chunk_start_ptr + chunk) + tl.arange(0, BLOCK)
    mask = elem < tl.load(numel_ptr + pid)
    g = tl.load(base_ptr + tl.load(g_off + pid) + elem, mask=mask, other=0.0)
    _sgd_update(base_ptr, tl.load(p_off + pid) + elem, tl.load(b_off + pid) + elem, g, hyper_ptr, mask,
                WEIGHT_DECAY, MOMENTUM, FIRST, NESTEROV)


def _flags(hyper) -> dict:
    """hyper: zokernels.experimental.masked_sgd.SGDHyper (its .table is the [4] tensor the kernels read)."""
    return dict(WEIGHT_DECAY=hyper.weight_decay != 0, MOMENTUM=hyper.momentum != 0, FIRST=hyper.first_step,
                NESTEROV=hyper.nesterov)


def masked_coordinates_triton(table, index, values, hyper, update: bool, block: int = 1024) -> None:
    """table: (base tensor, p_off, g_off, b_off) from zokernels.experimental.masked_sgd; index: MaskIndex."""
    base, p_off, g_off, b_off = table
    n = values.shape[0]
    if n == 0:
        return
    _masked_coordinates_kernel[(triton.cdiv(n, block),)](
        base, p_off, g_off, b_off, index.param_ids, index.elements, values, n, hyper.table, UPDATE=update, BLOCK=block, **_flags(hyper))


def dense_sgd_triton(table, numels, chunks, hyper, block: int) -> None:
    """chunks: (chunk_pid int32, chunk_start int64) with chunk_start a multiple of `block`."""
    base, p_off, g_off, b_off = table
    chunk_pid, chunk_start = chunks
    if chunk_pid.shape[0] == 0:
        return
    _dense_sgd_kernel[(chunk_pid.shape[0],)](
        base, p_off, g_off, b_off, numels, chunk_pid, chunk_start, hyper.table, BLOCK=block, **_flags(hyper))
