"""Fused CPU kernels for the engine's dense stage (perturbed form), with their dispatch and layout checks.

`batchnorm_replicas` is training-mode BN (optionally followed by ReLU) for K replicas at once, each with its own
batch statistics. On float32 channels-last replicas it runs `_C.batchnorm_replicas` (two streaming passes, double
accumulation); elsewhere it returns None and the caller uses the torch formula. Its twin is
`zokernels.reference.engine_ref.batchnorm_replicas_ref`."""
from __future__ import annotations

import torch
from torch import nn

from .. import backends


def channels_last_rows(perturbed: torch.Tensor) -> bool:
    """True when [K, B, C, H, W] stores every replica as contiguous (B, H, W, C) rows: the kernel's [K, N, C]."""
    if perturbed.dim() != 5:
        return False
    k, b, c, h, w = perturbed.shape
    expected = (b * h * w * c, h * w * c, 1, w * c, c)
    return all(stride == want for stride, want, size in zip(perturbed.stride(), expected, perturbed.shape)
               if size > 1)


def fused_available(perturbed: torch.Tensor) -> bool:
    return (backends._C is not None and perturbed.device.type == "cpu" and perturbed.dtype == torch.float32
            and channels_last_rows(perturbed) and backends.availability()["cpu"].available)


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
    k, b, c, h, w = perturbed.shape
    out = torch.empty_like(perturbed)
    center = center.detach().to(torch.float32).contiguous()
    weight = None if module.weight is None else module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    backends._C.batchnorm_replicas(perturbed.data_ptr(), out.data_ptr(), k, b * h * w, c, center.data_ptr(),
                                   _pointer(weight), _pointer(bias), float(module.eps), relu)
    return out
