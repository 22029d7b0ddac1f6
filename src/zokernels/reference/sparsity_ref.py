"""Slow, obviously-correct twins of zokernels.sparsity: explicit direction vectors and explicit sorting.

zo_hessian_gradient_product_ref materializes every query's direction as a float64 vector over the flattened
Conv/Linear weights (Philox stream j = query j, global offsets in module order), sets the weights to θ + μu by
copying, evaluates the loss, and copies θ back. ratios_from_scores_ref sorts (−|score|, position) pairs in Python.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .estimators_ref import LossFn, default_loss
from .philox_ref import philox_normal_ref


def prunable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, weight) of every Conv and Linear layer with a trainable weight, in module order: what the pruning
    ratios apply to (the twin of sparsity.zo_grasp.prunable_parameters, without its checks)."""
    return [(f"{name}.weight" if name else "weight", module.weight) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) and module.weight.requires_grad]


def _direction(sizes: list[int], seed: int, stream: int, dist: str) -> np.ndarray:
    pieces, offset = [], 0
    for n in sizes:
        z = philox_normal_ref(n, seed, stream, offset).astype(np.float64)
        pieces.append(z / np.linalg.norm(z) if dist == "per_tensor_unit" else z)
        offset += n
    return np.concatenate(pieces)


def _set_flat(params: list[torch.Tensor], vector: np.ndarray) -> None:
    offset = 0
    for p in params:
        values = torch.from_numpy(vector[offset:offset + p.numel()].copy()).view_as(p)
        p.copy_(values.to(p.dtype))
        offset += p.numel()


def _loss_at(model, batch, loss_fn, params, vector, buffers) -> float:
    _set_flat(params, vector)
    loss = float(loss_fn(model, batch).item())
    for b, saved in buffers:  # train-mode BN must not drift between queries
        b.copy_(saved)
    return loss


def _rge_ref(model, batch, loss_fn, params, theta, q, mu, dist, seed, buffers) -> np.ndarray:
    sizes = [p.numel() for p in params]
    base = _loss_at(model, batch, loss_fn, params, theta, buffers)
    weight = 1.0 / mu if dist == "gaussian" else 1.0
    estimate = np.zeros_like(theta)
    for j in range(q):
        u = _direction(sizes, seed, j, dist)
        estimate += weight * (_loss_at(model, batch, loss_fn, params, theta + mu * u, buffers) - base) / q * u
    return estimate


@torch.no_grad()
def zo_hessian_gradient_product_ref(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None,
                                    q: int = 192, mu: float = 5e-3, dist: str = "gaussian", seed: int = 0,
                                    same_directions: bool = True) -> dict[str, torch.Tensor]:
    loss_fn = loss_fn or default_loss
    named = prunable_parameters(model)
    params = [p for _, p in named]
    theta = np.concatenate([p.detach().double().reshape(-1).numpy() for p in params])
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        g0 = _rge_ref(model, batch, loss_fn, params, theta, q, mu, dist, seed, buffers)
        shifted = np.concatenate([(torch.from_numpy(piece).to(p.dtype).double()).numpy() for piece, p in
                                  zip(np.split(theta + mu * g0, np.cumsum([p.numel() for p in params])[:-1]),
                                      params)])
        second = seed if same_directions else (seed + 1) % 2**64
        g1 = _rge_ref(model, batch, loss_fn, params, shifted, q, mu, dist, second, buffers)
    finally:
        _set_flat(params, theta)
    hg = (g1 - g0) / mu
    out, offset = {}, 0
    for name, p in named:
        out[name] = torch.from_numpy(hg[offset:offset + p.numel()].copy()).view(p.shape)
        offset += p.numel()
    return out


def ratios_from_scores_ref(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    entries = []
    for name, s in scores.items():
        entries += [(-abs(float(v)), len(entries) + i, name) for i, v in enumerate(s.reshape(-1).tolist())]
    entries.sort()
    keep = round((1.0 - sparsity) * len(entries))
    kept = {name: 0 for name in scores}
    for _, _, name in entries[:keep]:
        kept[name] += 1
    return {name: 1.0 - kept[name] / scores[name].numel() for name in scores}
