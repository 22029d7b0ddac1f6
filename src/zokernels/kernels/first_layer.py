"""Fused first-layer perturb-and-forward for K coordinates of one conv2d or linear weight: the exact change of
the output channel o_k after BN (train: per-replica batch statistics; eval: running statistics) and ReLU, as the
engine's channel-form Delta ([K, B, H', W'], channels o_k). See triton/cge_first_layer.py for the formulas; they
are the engine's rules (engine/delta.py) fused. Backends: cuda, triton, cpu (C++ twin of the CUDA kernel),
torch (the same formulas in torch ops)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks, native
from .dispatch import choose_backend

BN_NONE, BN_TRAIN, BN_EVAL = 0, 1, 2
IMPLEMENTED = ("cuda", "triton", "cpu", "torch")
# _C.cge_first_layer_delta_cuda (csrc/cuda/cge_first_layer.cu) and its C++ CPU twin (csrc/cpu/cge_cpu.cpp). x and y
# are read through the strides passed (contiguous or channels-last, checked by first_layer_delta).
NATIVE = native.op(
    "cge_first_layer_delta",
    native.tensor("x", contiguous=False), native.tensor("y", contiguous=False),
    native.tensor("coords", dtypes=(torch.int64,)), native.tensor("steps"), native.tensor("chan"),
    native.tensor("out"), "replicas", "sizes", "strides", "geometry", "bn_mode", "relu", native.ELEMENT_CODE)


@dataclass(frozen=True)
class BatchNormSpec:
    """The BN after the layer. train: statistics of each replica's own batch (mean/var: the base batch statistics
    of y, computed from y when None); eval: running statistics (mean/var required)."""
    train: bool
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None

    @classmethod
    def from_module(cls, module: torch.nn.modules.batchnorm._BatchNorm) -> "BatchNormSpec":
        """As the engine decides (engine.statistics.batchnorm_uses_batch_stats): batch statistics in training mode or without
        running statistics."""
        train = module.training or module.running_mean is None
        return cls(train, module.eps, module.weight, module.bias, None if train else module.running_mean,
                   None if train else module.running_var)


def coords_from_flat(indices: torch.Tensor, weight_shape) -> torch.Tensor:
    """Flat weight indices (the engine's coordinate order) -> [K, 4] int64 (o, c, kh, kw); a linear weight
    [out, in] gives (o, c, 0, 0)."""
    shape = tuple(weight_shape) + (1,) * (4 - len(weight_shape))
    if len(shape) != 4:
        raise ValueError(f"weight_shape must have 2 (linear) or 4 (conv2d) dims, got {tuple(weight_shape)}")
    idx = indices.to(torch.int64).reshape(-1)
    per_out, per_in, per_row = shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3]
    o, rest = idx // per_out, idx % per_out
    return torch.stack([o, rest // per_in, (rest % per_in) // per_row, rest % per_row], dim=1).contiguous()


def _channel_table(y: torch.Tensor, bn: BatchNormSpec | None) -> tuple[torch.Tensor, int]:
    """[4, C_out]: mean, root (train) or scale (eval), gamma, beta — per-channel base quantities, computed once."""
    n_channels = y.shape[1]
    ones, zeros = y.new_ones(n_channels), y.new_zeros(n_channels)
    if bn is None:
        return torch.stack([zeros, ones, ones, zeros]).contiguous(), BN_NONE
    gamma = ones if bn.weight is None else bn.weight.detach().to(y.dtype)
    beta = zeros if bn.bias is None else bn.bias.detach().to(y.dtype)
    if bn.train:
        dims = tuple(d for d in range(y.dim()) if d != 1)  # as engine/delta.py batch_statistics
        mean = y.mean(dim=dims) if bn.mean is None else bn.mean.to(y.dtype)
        var = y.var(dim=dims, unbiased=False) if bn.var is None else bn.var.to(y.dtype)
        return torch.stack([mean, torch.sqrt(var + bn.eps), gamma, beta]).contiguous(), BN_TRAIN
    if bn.mean is None or bn.var is None:
        raise ValueError("bn.mean and bn.var (running statistics) are required when bn.train is False")
    scale = torch.rsqrt(bn.var.to(y.dtype) + bn.eps) * gamma  # as engine/delta.py batchnorm_eval_delta
    return torch.stack([bn.mean.to(y.dtype), scale, gamma, beta]).contiguous(), BN_EVAL


def _check(x, y, coords, linear: bool, geometry) -> None:
    checks.check_tensor("x", x, dims=(2,) if linear else (4,), channels_last_ok=True)
    checks.check_tensor("y", y, dims=(x.dim(),), channels_last_ok=True)
    checks.check_same("y", y, x, "x")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have x's batch size {x.shape[0]}, got shape {tuple(y.shape)}")
    if not isinstance(coords, torch.Tensor) or coords.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"coords must be an int64/int32 tensor, got {getattr(coords, 'dtype', type(coords))}")
    if coords.dim() != 2 or coords.shape[1] != 4 or coords.shape[0] == 0:
        raise ValueError(f"coords must have shape [K >= 1, 4] (o, c, kh, kw), got {tuple(coords.shape)}")
    (sh, sw), (ph, pw), (dh, dw) = geometry
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got {geometry}")
    if not checks.capturing():
        _check_coordinate_range(x, y, coords, linear)


def _check_coordinate_range(x, y, coords, linear: bool) -> None:
    low = coords.min(dim=0).values.tolist()
    high = coords.max(dim=0).values.tolist()
    if min(low) < 0 or high[0] >= y.shape[1] or high[1] >= x.shape[1]:
        raise ValueError(f"coords out of range: o must be < {y.shape[1]}, c < {x.shape[1]}, all >= 0; "
                         f"got min {low}, max {high}")
    if linear and (high[2] != 0 or high[3] != 0):
        raise ValueError("coords of a linear layer must have kh = kw = 0")


def first_layer_delta(x: torch.Tensor, y: torch.Tensor, coords: torch.Tensor, steps, stride=1, padding=0,
                      dilation=1, bn: BatchNormSpec | None = None, relu: bool = True,
                      backend: str | None = None) -> torch.Tensor:
    """relu(bn(y + δ_k)) − relu(bn(y)) on channel o_k for every coordinate k, formed without cancellation.

    x: the layer's cached input [B, C_in, H, W] (linear: [B, C_in]); y: its base output before BN [B, C_out, H', W']
    (linear: [B, C_out]); both contiguous or channels-last. coords: [K, 4] (o, c, kh, kw) (see coords_from_flat);
    steps: the realized steps h_k ([K]) or one float μ. Returns [K, B, H', W'] (linear: [K, B]), contiguous."""
    linear = isinstance(x, torch.Tensor) and x.dim() == 2
    geometry = tuple(checks.pair(n, v) for n, v in (("stride", stride), ("padding", padding), ("dilation", dilation)))
    _check(x, y, coords, linear, geometry)
    steps = checks.check_steps(steps, coords.shape[0], x)
    if bn is not None and bn.train and y.numel() == y.shape[1]:
        raise ValueError(f"BN in train mode needs more than one value per channel (as torch's batch_norm), got y "
                         f"of shape {tuple(y.shape)}")
    # the C++ twin replays the CUDA block's 256 strided threads: a correctness twin, slower than torch on CPU
    chosen = choose_backend(NATIVE.name, IMPLEMENTED, backend, x.device, ("cuda", "triton", "torch"))
    if chosen == "torch":
        return _first_layer_delta_torch(x, y, coords, steps, geometry, bn, relu)
    x4, y4 = (x[:, :, None, None], y[:, :, None, None]) if linear else (x, y)
    chan, bn_mode = _channel_table(y4, bn)
    out = torch.empty((coords.shape[0], y4.shape[0], *y4.shape[2:]), dtype=x.dtype, device=x.device)
    coords64 = coords.to(device=x.device, dtype=torch.int64).contiguous()
    if chosen == "triton":
        from .triton.cge_first_layer import first_layer_delta_triton
        first_layer_delta_triton(x4, y4, coords64, steps, chan, out, geometry, bn_mode, relu)
    else:
        NATIVE(chosen, x4, y4, coords64, steps, chan, out, coords64.shape[0],
               [*x4.shape, *y4.shape[1:]], [*x4.stride(), *y4.stride()], [v for p in geometry for v in p], bn_mode,
               relu)
    return out[..., 0, 0] if linear else out


def _seeds_torch(x4: torch.Tensor, coords: torch.Tensor, steps: torch.Tensor, out_hw, geometry) -> torch.Tensor:
    """δ_k = h_k · shifted x[:, c_k] for all k at once: [K, B, H', W'] (zero padding included)."""
    (sh, sw), (ph, pw), (dh, dw) = geometry
    padded = torch.nn.functional.pad(x4, (pw, pw, ph, ph))
    c = coords.to(x4.device)
    rows = c[:, 2:3] * dh + torch.arange(out_hw[0], device=x4.device) * sh  # [K, H']
    cols = c[:, 3:4] * dw + torch.arange(out_hw[1], device=x4.device) * sw  # [K, W']
    batch = torch.arange(x4.shape[0], device=x4.device).view(1, -1, 1, 1)
    picked = padded[batch, c[:, 1].view(-1, 1, 1, 1), rows[:, None, :, None], cols[:, None, None, :]]
    return picked * steps.view(-1, 1, 1, 1)


def _first_layer_delta_torch(x, y, coords, steps, geometry, bn, relu) -> torch.Tensor:
    """The kernels' formulas (the engine's rules) in plain torch ops over all K replicas."""
    linear = x.dim() == 2
    x4, y4 = (x[:, :, None, None], y[:, :, None, None]) if linear else (x, y)
    delta = _seeds_torch(x4, coords, steps, tuple(y4.shape[2:]), geometry)
    chan, mode = _channel_table(y4, bn)
    o = coords[:, 0].to(device=x.device, dtype=torch.int64)
    mean, root, gamma, beta = (row[o].view(-1, 1, 1, 1) for row in chan)
    base = y4.index_select(1, o).transpose(0, 1)  # y[:, o_k]: [K, B, H', W']
    dz, z = delta, base
    if mode == BN_TRAIN:
        centered = base - mean
        d_mean = delta.mean(dim=(1, 2, 3), keepdim=True)
        spread = (delta.square().mean(dim=(1, 2, 3), keepdim=True) - d_mean.square()).clamp(min=0)
        d_var = 2 * (centered * delta).mean(dim=(1, 2, 3), keepdim=True) + spread
        new_root = torch.sqrt(root.square() + d_var)
        a, b = gamma * (1 / new_root), gamma * (-d_var / (root * new_root * (root + new_root)))
        dz = delta * a + centered * b + gamma * (-d_mean / new_root)
        z = gamma * (centered / root) + beta
    elif mode == BN_EVAL:
        dz, z = delta * root, (base - mean) * root + beta
    out = torch.maximum(dz, -z) + z.clamp(max=0) if relu else dz
    out = out.contiguous()
    return out[..., 0, 0] if linear else out
