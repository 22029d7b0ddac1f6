"""Slow, obviously-correct twins of the engine's fused CPU kernels (zokernels/engine/fused.py), and the generic twin
of every op rule and parameter seed (zokernels/engine/rules.py, seeds.py): `op_delta_ref`."""
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


def op_delta_ref(fn, inputs, deltas, rng_seed: int | None = None) -> torch.Tensor:
    """The generic twin of every delta rule (engine/rules.py) and parameter seed (engine/seeds.py):
    fn(x + δ_k) − fn(x) for each replica k, both sides evaluated in float64 and subtracted.

    inputs: the op's tensor inputs x (any float dtype; upcast to float64); deltas: one [K, *x.shape] tensor per
    input, or None where that input does not change. fn must build its constants (weights, buffers) in the dtype
    of its inputs, so that it runs in float64 here. rng_seed: for random ops (dropout), the seed set before each
    evaluation, so that every evaluation draws what the base evaluation drew. Inputs are copied before every call
    (fn may write them in place). Returns [K, *fn(x).shape] in float64: the exact difference of the two float64
    outputs (of the outputs as fn rounds them, when fn casts to a narrower dtype)."""
    def evaluate(args):
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        return fn(*args).to(torch.float64)

    with torch.no_grad():
        base_inputs = [x.to(torch.float64, copy=True) if x.is_floating_point() else x for x in inputs]
        replicas = next(d for d in deltas if d is not None).shape[0]
        base = evaluate([x.clone() for x in base_inputs])
        changes = []
        for k in range(replicas):
            moved = [x + d[k].to(torch.float64) if d is not None else x.clone()
                     for x, d in zip(base_inputs, deltas)]
            changes.append(evaluate(moved) - base)
    return torch.stack(changes)
