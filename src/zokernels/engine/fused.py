"""Where the engine's dense stage uses the fused CPU kernels of kernels/batchnorm.py: each function returns None
where its kernel does not apply (not float32, not channels-last rows, the cpu backend cannot run), and the caller
then uses the torch formula.

- `batchnorm_replicas` (perturbed form): training-mode BN (+ReLU) of K replicas, each with its own batch
  statistics. Twin: `reference.engine_ref.batchnorm_replicas_ref`.
- `batchnorm_delta` (exact delta form): the change of training-mode BN (+ReLU) for K dense δs. Twin:
  `reference.engine_ref.batchnorm_delta_ref`.
- `residual_relu_delta`: ReLU(y + δa + δb) − ReLU(y) in one pass (a residual block's end). Twin:
  `reference.engine_ref.residual_relu_delta_ref`."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import batchnorm as kernels


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


def fused_available(op, *tensors: torch.Tensor) -> bool:
    """The kernel `op` (kernels/batchnorm.py) runs here (the backend decision: kernels.dispatch) on these tensors:
    CPU float32 rows of channels (the layout decision: the engine's)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and channels_last_rows(t) for t in tensors)
            and kernels.fused_backend(op, tensors[0].device) == "cpu")


def batchnorm_replicas(perturbed: torch.Tensor, module: nn.modules.batchnorm._BatchNorm, center: torch.Tensor,
                       relu: bool) -> torch.Tensor | None:
    """BN(+ReLU) of each replica of `perturbed` [K, B, C, H, W] with its own batch statistics, or None where the
    fused kernel does not apply. `center` [C]: a value near each channel's mean (the base batch mean)."""
    if not fused_available(kernels.REPLICAS, perturbed):
        return None
    params = [t for t in (module.weight, module.bias) if t is not None]
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in params):
        return None
    return kernels.batchnorm_replicas(perturbed, center, module.weight, module.bias, module.eps, relu)


def batchnorm_delta(delta: torch.Tensor, centered: torch.Tensor, root: torch.Tensor, weight: torch.Tensor | None,
                    base_out: torch.Tensor | None) -> torch.Tensor | None:
    """The exact change of training-mode BN for a dense δ [K, B, C, ...] (and of the ReLU after it when base_out,
    BN's base output, is given), or None where the fused kernel does not apply. centered = x − mean(x) and
    root = sqrt(var(x) + eps) of the base input (engine/delta.py `batch_statistics`)."""
    operands = [delta, centered] + ([base_out] if base_out is not None else [])
    if not fused_available(kernels.DELTA, *operands) or delta.shape[1:] != centered.shape or delta.shape[2] > 256:
        return None
    if weight is not None and (weight.dtype != torch.float32 or not weight.is_contiguous()):
        return None
    return kernels.batchnorm_delta(delta, centered, root, weight, base_out)


def residual_relu_delta(a: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    """ReLU(y + a + b) − ReLU(y) for K replicas of dense deltas a, b [K, *y.shape] (b may be None), or None where
    the fused kernel does not apply. All operands must share one memory layout per replica."""
    operands = [a, y] + ([b] if b is not None else [])
    if not fused_available(kernels.RESIDUAL_RELU, *operands) or a.shape[1:] != y.shape or (b is not None and (
            b.shape != a.shape or b.stride() != a.stride())) or a[0].stride() != y.stride():
        return None
    return kernels.residual_relu_delta(a, b, y)
