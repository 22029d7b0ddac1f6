"""Slow, obviously-correct estimators: the oracle every fast path is compared with.

cge_ref perturbs one coordinate at a time in place, runs the full loss, and restores the coordinate's saved
value. rge_ref materializes every direction as an explicit flat vector. Both return {name: estimate}, with the
same conventions as the fast paths:
- a coordinate step divides by the step actually realized, fl(θ_i + μ) − θ_i (exact by Sterbenz), not by μ;
- z(seed, stream=j, offset) is query j's Gaussian direction over the flattened trainable parameters.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .philox_ref import philox_normal_ref

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """zokernels' default loss written out (the twin of estimators.common.default_loss, without its error
    messages): a dict batch calls model(**batch) with targets batch["labels"]; a tuple or list calls model(batch[0])
    with targets batch[1]. The model's own outputs["loss"] when it computed one, else cross-entropy of the logits:
    the output itself, outputs["logits"], or a tuple's first item."""
    if isinstance(batch, Mapping):
        outputs, targets = model(**batch), batch.get("labels")
    elif isinstance(batch, (tuple, list)):
        outputs, targets = model(batch[0]), (batch[1] if len(batch) > 1 else None)
    else:
        outputs, targets = model(batch), None
    if isinstance(outputs, Mapping):
        if isinstance(outputs.get("loss"), torch.Tensor):
            return outputs["loss"]
        outputs = outputs["logits"]
    elif isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return F.cross_entropy(outputs, targets)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """What the estimators estimate: the floating-point parameters with requires_grad, in named_parameters order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]


def _loss(loss_fn: LossFn, model: torch.nn.Module, batch: Any) -> float:
    value = loss_fn(model, batch)
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _coordinate_indices(p: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    if mask is None:
        return list(range(p.numel()))
    return torch.nonzero(mask.reshape(-1)).flatten().tolist()


@torch.no_grad()
def cge_ref(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3,
            mask: dict[str, torch.Tensor] | None = None, scheme: str = "forward") -> dict[str, torch.Tensor]:
    loss_fn = loss_fn or default_loss
    base = _loss(loss_fn, model, batch)
    estimates = {}
    for name, p in trainable_parameters(model):
        flat = p.data.view(-1)
        grad = torch.zeros_like(flat)
        if mask is not None and name not in mask:
            estimates[name] = grad.view_as(p)
            continue
        for i in _coordinate_indices(p, None if mask is None else mask[name]):
            original = flat[i].item()  # a Python float: realized steps below are exact float64 differences
            flat[i] = original + mu
            step_up = flat[i].item() - original
            loss_up = _loss(loss_fn, model, batch)
            if scheme == "central":
                flat[i] = original - mu
                step_down = original - flat[i].item()
                loss_down = _loss(loss_fn, model, batch)
                grad[i] = (loss_up - loss_down) / (step_up + step_down)
            else:
                grad[i] = (loss_up - base) / step_up
            flat[i] = original
        estimates[name] = grad.view_as(p)
    return estimates


def _direction_ref(sizes: list[int], seed: int, stream: int, dist: str) -> np.ndarray:
    """Query `stream`'s direction u as one float64 vector over all parameters, and its estimator weight."""
    z = philox_normal_ref(sum(sizes), seed, stream, 0).astype(np.float64)
    if dist == "gaussian":
        return z
    if dist == "sphere":
        return z / np.linalg.norm(z)
    pieces, start = [], 0  # per_tensor_unit: each tensor's block has unit norm
    for n in sizes:
        block = z[start:start + n]
        pieces.append(block / np.linalg.norm(block))
        start += n
    return np.concatenate(pieces)


@torch.no_grad()
def rge_ref(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3, q: int = 1,
            dist: str = "gaussian", seed: int = 0) -> dict[str, torch.Tensor]:
    """(1/q) Σ_j w · (ℓ(θ + μ u_j) − ℓ(θ)) / μ · u_j with w = 1 (gaussian), d (sphere); per_tensor_unit follows
    the DeepZero code: per-tensor unit u and no division by μ, i.e. (1/q) Σ_j (ℓ(θ + μ u_j) − ℓ(θ)) u_j."""
    loss_fn = loss_fn or default_loss
    params = [p for _, p in trainable_parameters(model)]
    sizes = [p.numel() for p in params]
    originals = [p.detach().clone() for p in params]
    base = _loss(loss_fn, model, batch)
    total = np.zeros(sum(sizes))
    for j in range(q):
        u = _direction_ref(sizes, seed, j, dist)
        start = 0
        for p, original, n in zip(params, originals, sizes):
            p.copy_(original + mu * torch.from_numpy(u[start:start + n]).view_as(p).to(p.dtype))
            start += n
        difference = _loss(loss_fn, model, batch) - base
        for p, original in zip(params, originals):
            p.copy_(original)
        weight = {"gaussian": 1.0 / mu, "sphere": len(u) / mu, "per_tensor_unit": 1.0}[dist]
        total += weight * difference * u / q
    estimates, start = {}, 0
    for (name, p), n in zip(trainable_parameters(model), sizes):
        estimates[name] = torch.from_numpy(total[start:start + n]).view_as(p).to(p.dtype)
        start += n
    return estimates
