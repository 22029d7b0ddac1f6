"""Fused CPU kernels for the engine's dense stage, with their layout checks. Each returns None where it does not
apply (not float32, not channels-last rows, no `_C`), and the caller then uses the torch formula.

- `batchnorm_replicas` (perturbed form): training-mode BN (+ReLU) of K replicas, each with its own batch
  statistics; two streaming passes with double accumulation. Twin: `reference.engine_ref.batchnorm_replicas_ref`.
- `batchnorm_delta` (exact delta form): the change of training-mode BN (+ReLU) for K dense δs, from δ and the
  base statistics, never forming either side. Twin: `reference.engine_ref.batchnorm_delta_ref`.
- `residual_relu_delta`: ReLU(y + δa + δb) − ReLU(y) in one pass (a residual block's end). Twin:
  `reference.engine_ref.residual_relu_delta_ref`."""
from __future__ import annotations

import torch
from torch import nn

from .. import backends


def channels_last_rows(t: torch.Tensor) -> bool:
    """True when t stores contiguous rows of C channels, C last in memory: [K, B, C, H, W] or [B, C, H, W] in
    channels-last layout ((B, H, W, C) rows), or contiguous [K, B, C] / [B, C]. That is the kernels' [.., N, C]."""
    if t.dim() in (2, 3):
        return t.is_contiguous()
    if t.dim() not in (4, 5):
        return False
    *lead, c, h, w = t.shape
    expected = [h * w * c, 1, w * c, c]
    if t.dim() == 5:
        expected.insert(0, lead[1] * h * w * c)
    return all(stride == want for stride, want, size in zip(t.stride(), expected, t.shape) if size > 1)


def fused_available(*tensors: torch.Tensor) -> bool:
    return (backends._C is not None and backends.status("cpu").available
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and channels_last_rows(t) for t in tensors))


def _rows_and_channels(replicas: torch.Tensor) -> tuple[int, int]:
    channels = replicas.shape[2]
    return replicas[0].numel() // channels, channels


def _pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def batchnorm_replicas(perturbed: torch.Tensor, module: nn.modules.batchnorm._BatchNorm, center: torch.Tensor,
                       relu: bool) -> torch.Tensor | None:
    """BN(+ReLU) of each replica of `perturbed` [K, B, C, H, W] with its own batch statistics, or None where the
    fused kernel does not apply. `center` [C]: a value near each channel's mean (the base batch mean)."""
    if not fused_available(perturbed):
        return None
    params = [t for t in (module.weight, module.bias) if t is not None]
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in params):
        return None
    rows, channels = _rows_and_channels(perturbed)
    out = torch.empty_like(perturbed)
    center = center.detach().to(torch.float32).contiguous()
    weight = None if module.weight is None else module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    backends._C.batchnorm_replicas(perturbed.data_ptr(), out.data_ptr(), perturbed.shape[0], rows, channels,
                                   center.data_ptr(), _pointer(weight), _pointer(bias), float(module.eps), relu)
    return out


def batchnorm_delta(delta: torch.Tensor, centered: torch.Tensor, root: torch.Tensor, weight: torch.Tensor | None,
                    base_out: torch.Tensor | None) -> torch.Tensor | None:
    """The exact change of training-mode BN for a dense δ [K, B, C, ...] (and of the ReLU after it when base_out,
    BN's base output, is given), or None where the fused kernel does not apply. centered = x − mean(x) and
    root = sqrt(var(x) + eps) of the base input (engine/delta.py `batch_statistics`)."""
    operands = [delta, centered] + ([base_out] if base_out is not None else [])
    if not fused_available(*operands) or delta.shape[1:] != centered.shape or delta.shape[2] > 256:
        return None
    if weight is not None and (weight.dtype != torch.float32 or not weight.is_contiguous()):
        return None
    rows, channels = _rows_and_channels(delta)
    out = torch.empty_like(delta)
    root = root.detach().to(torch.float32).contiguous()
    weight = None if weight is None else weight.detach()
    backends._C.batchnorm_delta(delta.data_ptr(), centered.data_ptr(), root.data_ptr(), _pointer(weight),
                                _pointer(base_out), out.data_ptr(), delta.shape[0], rows, channels)
    return out


def residual_relu_delta(a: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    """ReLU(y + a + b) − ReLU(y) for K replicas of dense deltas a, b [K, *y.shape] (b may be None), or None where
    the fused kernel does not apply. All operands must share one memory layout per replica."""
    operands = [a, y] + ([b] if b is not None else [])
    if not fused_available(*operands) or a.shape[1:] != y.shape or (b is not None and (
            b.shape != a.shape or b.stride() != a.stride())) or a[0].stride() != y.stride():
        return None
    out = torch.empty_like(a)
    backends._C.residual_relu_delta(a.data_ptr(), _pointer(b), y.data_ptr(), out.data_ptr(), a.shape[0], y.numel())
    return out
