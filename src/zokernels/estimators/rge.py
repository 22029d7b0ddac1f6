"""Randomized gradient estimation (RGE) with seed-regenerated directions: query j's direction is the Philox
stream z(seed, j, .) over the flattened trainable parameters, so nothing of size d is stored per query.

dist: 'gaussian' u = z (the DeepZero paper); 'sphere' u = z/||z|| with weight d; 'per_tensor_unit' u = z/||z||
per tensor and no division by mu (the DeepZero public code's scaling, kept for comparison)."""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import philox
from .common import LossFn, direction_query
from .scope import QueryScope

DISTRIBUTIONS = ("gaussian", "sphere", "per_tensor_unit")


def direction_scales(params: list[torch.Tensor], offsets: list[int], seed: int, stream: int, dist: str,
                     backend: str | None) -> list[float]:
    """Per-tensor factors s_t with u_t = s_t · z_t."""
    if dist == "gaussian":
        return [1.0] * len(params)
    sumsq = [philox.normal_sumsq(p.numel(), seed, stream, o, backend) for p, o in zip(params, offsets)]
    if dist == "sphere":
        return [1.0 / math.sqrt(sum(sumsq))] * len(params)
    return [1.0 / math.sqrt(s) for s in sumsq]


def estimator_weight(dist: str, mu: float, dimension: int) -> float:
    return {"gaussian": 1.0 / mu, "sphere": dimension / mu, "per_tensor_unit": 1.0}[dist]


def rge_estimate(batch: Any, loss_fn: LossFn, mu: float, q: int, dist: str, seed: int,
                 params: list[torch.Tensor], scope: QueryScope, base_loss: float,
                 backend: str | None) -> list[torch.Tensor]:
    offsets = philox.stream_offsets(params)
    dimension = sum(p.numel() for p in params)
    weight = estimator_weight(dist, mu, dimension)
    terms, all_scales = [], []
    for j in range(q):
        scales = direction_scales(params, offsets, seed, j, dist, backend)
        with torch.no_grad():
            philox.add_normal_combination_(params, offsets, seed, [(j, mu)], scales, backend)
        loss = scope.loss(loss_fn, batch, direction_query(j, seed))
        scope.restore_parameters()
        terms.append((j, weight * (loss - base_loss) / q))
        all_scales.append(scales)
    estimates = [torch.zeros(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                             device=p.device) for p in params]
    if dist == "gaussian":  # one sweep over all q streams at once
        philox.add_normal_combination_(estimates, offsets, seed, terms, None, backend)
    else:
        for (j, coeff), scales in zip(terms, all_scales):
            philox.add_normal_combination_(estimates, offsets, seed, [(j, coeff)], scales, backend)
    return [e.to(p.dtype) for e, p in zip(estimates, params)]
