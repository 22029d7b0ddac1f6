"""The next mixing op on one-channel deltas: K replicas of δ, replica k nonzero in input channel o_k only, through
the next conv2d / linear weight (no bias: a delta). Output [K·B, C2, H2, W2] ([K·B, out] for linear), the layout
a dense tail consumes directly (engine: .view(K, B, ...) gives the dense Delta values).
Backends: cuda, triton, cpu (C++ twins of the CUDA kernels), torch (the engine's grouped-conv rule)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks, native
from .dispatch import choose_backend

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")
AUTOMATIC = ("cuda", "triton", "torch")  # the C++ twins (plain loops) are slower than torch on CPU: on request only
# _C.<op>_cuda (csrc/cuda/cge_mixing.cu) and their C++ CPU twins (csrc/cpu/cge_cpu.cpp). The conv reads weight and
# writes out through the strides passed (weight contiguous or channels-last; out as allocated).
CONV2D = native.op(
    "cge_one_channel_conv2d",
    native.tensor("delta"), native.tensor("channels", dtypes=(torch.int64,)),
    native.tensor("weight", contiguous=False), native.tensor("out", contiguous=False),
    "sizes", "strides", "geometry", native.ELEMENT_CODE)
LINEAR = native.op(
    "cge_one_channel_linear",
    native.tensor("delta"), native.tensor("channels", dtypes=(torch.int64,)), native.tensor("weight"),
    native.tensor("out"), "replicas", "batch", "n_out", "n_in", native.ELEMENT_CODE)


def _check_channels(channels, k: int, n_in: int, device) -> torch.Tensor:
    # a small index vector, copied below: any strides are fine
    if not isinstance(channels, torch.Tensor) or channels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"channels must be an int64/int32 tensor, got {getattr(channels, 'dtype', type(channels))}")
    if channels.shape != (k,):
        raise ValueError(f"channels must have one entry per replica ({k}), got shape {tuple(channels.shape)}")
    if k and not checks.capturing() and (int(channels.min()) < 0 or int(channels.max()) >= n_in):
        raise ValueError(f"channels must lie in [0, {n_in}), got min {int(channels.min())}, "
                         f"max {int(channels.max())}")
    return channels.to(device=device, dtype=torch.int64).contiguous()


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def one_channel_conv2d(delta: torch.Tensor, channels: torch.Tensor, weight: torch.Tensor, stride=1, padding=0,
                       dilation=1, channels_last: bool = False, backend: str | None = None) -> torch.Tensor:
    """out[k·B + b] = conv2d(δ[k, b][None, None], W[:, o_k:o_k+1]) for δ [K, B, H, W] (contiguous), channels o_k
    [K], weight [C2, C1, kh, kw] (contiguous or channels-last). Returns [K·B, C2, H2, W2], channels-last in memory
    when channels_last (what channels-last convolutions downstream read without a copy)."""
    checks.check_tensor("delta", delta, dims=(4,))
    checks.check_tensor("weight", weight, dims=(4,), channels_last_ok=True)
    checks.check_same("weight", weight, delta, "delta")
    geometry = tuple(checks.pair(n, v) for n, v in (("stride", stride), ("padding", padding), ("dilation", dilation)))
    (sh, sw), (ph, pw), (dh, dw) = geometry
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got {geometry}")
    k, batch, h_in, w_in = delta.shape
    channels = _check_channels(channels, k, weight.shape[1], delta.device)
    h_out = conv2d_output_size(h_in, weight.shape[2], sh, ph, dh)
    w_out = conv2d_output_size(w_in, weight.shape[3], sw, pw, dw)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"the kernel {tuple(weight.shape[2:])} does not fit the padded input {(h_in, w_in)}")
    chosen = choose_backend(CONV2D.name, IMPLEMENTED, backend, delta.device, AUTOMATIC)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if chosen == "torch":
        return _one_channel_conv2d_torch(delta, channels, weight, geometry).contiguous(memory_format=fmt)
    out = torch.empty((k * batch, weight.shape[0], h_out, w_out), dtype=delta.dtype, device=delta.device,
                      memory_format=fmt)
    if out.numel() == 0:
        return out
    if chosen == "triton":
        from .triton.cge_mixing import one_channel_conv2d_triton
        one_channel_conv2d_triton(delta, channels, weight, out, geometry)
    else:
        CONV2D(chosen, delta, channels, weight, out,
               [k, batch, h_in, w_in, weight.shape[0], weight.shape[2], weight.shape[3], h_out, w_out],
               [*delta.stride(), *weight.stride(), *out.stride()], [v for p in geometry for v in p])
    return out


def _one_channel_conv2d_torch(delta, channels, weight, geometry) -> torch.Tensor:
    """As engine/delta.py conv2d_delta: a grouped conv, group k = replica k with weight slice W[:, o_k]."""
    k, batch = delta.shape[:2]
    slices = weight.index_select(1, channels).transpose(0, 1)  # [K, C2, kh, kw]
    stride, padding, dilation = geometry
    out = F.conv2d(delta.transpose(0, 1), slices.reshape(-1, 1, *slices.shape[2:]), None, stride, padding,
                   dilation, groups=k)  # [B, K·C2, H2, W2]
    return out.view(batch, k, weight.shape[0], *out.shape[2:]).transpose(0, 1).reshape(k * batch, -1,
                                                                                        *out.shape[2:])


def one_channel_linear(delta: torch.Tensor, channels: torch.Tensor, weight: torch.Tensor,
                       backend: str | None = None) -> torch.Tensor:
    """out[k·B + b] = δ[k, b] · W[:, c_k] for δ [K, B] (contiguous), channels c_k [K], weight [out, in]
    (contiguous): [K·B, out]."""
    checks.check_tensor("delta", delta, dims=(2,))
    checks.check_tensor("weight", weight, dims=(2,))
    checks.check_same("weight", weight, delta, "delta")
    k, batch = delta.shape
    channels = _check_channels(channels, k, weight.shape[1], delta.device)
    chosen = choose_backend(LINEAR.name, IMPLEMENTED, backend, delta.device, AUTOMATIC)
    if chosen == "torch":
        columns = weight.index_select(1, channels).T  # [K, out]
        return (delta.unsqueeze(-1) * columns.unsqueeze(1)).reshape(k * batch, weight.shape[0])
    out = torch.empty((k * batch, weight.shape[0]), dtype=delta.dtype, device=delta.device)
    if out.numel() == 0:
        return out
    if chosen == "triton":
        from .triton.cge_mixing import one_channel_linear_triton
        one_channel_linear_triton(delta, channels, weight, out)
    else:
        LINEAR(chosen, delta, channels, weight, out, k, batch, weight.shape[0], weight.shape[1])
    return out
