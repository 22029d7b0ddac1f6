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
