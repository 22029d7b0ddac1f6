"""Slow, obviously-correct twins of the engine's fused CPU kernels (zokernels/engine/fused.py)."""
from __future__ import annotations

import torch


def batchnorm_replicas_ref(perturbed: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float, relu: bool) -> torch.Tensor:
    """Each replica k of [K, B, C, H, W] through training-mode BN on its own, in float64, via torch's
    functional batch_norm: the definition the fused kernel must reproduce."""
    outputs = []
    for replica in perturbed.double():
        out = torch.nn.functional.batch_norm(replica, None, None, None if weight is None else weight.double(),
                                             None if bias is None else bias.double(), training=True, eps=eps)
        outputs.append(out.relu() if relu else out)
    return torch.stack(outputs)


def batchnorm_delta_ref(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float, base_out: torch.Tensor | None) -> torch.Tensor:
    """BN(x + δ_k) − BN(x) in float64 for training-mode BN, both sides formed and subtracted (exact enough in
    float64 for float32-sized inputs); then, if base_out (BN's base output y) is given, ReLU(y + dy) − ReLU(y)
    around that y, as the engine does (it carries changes around the base values it cached)."""
    base = batchnorm_replicas_ref(x.unsqueeze(0), weight, bias, eps, False)
    change = batchnorm_replicas_ref(x.unsqueeze(0).double() + delta.double(), weight, bias, eps, False) - base
    if base_out is None:
        return change
    y = base_out.double().unsqueeze(0)
    return torch.relu(y + change) - torch.relu(y)


def residual_relu_delta_ref(a: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """ReLU(y + a + b) − ReLU(y) in float64, both sides formed."""
    total = a.double() + (0 if b is None else b.double())
    return torch.relu(y.double() + total) - torch.relu(y.double())
