"""Reference twins of the MeZO sweeps: one tensor at a time, z materialized explicitly by a sampler
(numel, seed, stream, offset) -> float32 tensor, every rounding written out. With the sampler the fast path uses
(zokernels.philox.philox_normal), the fused sweeps must match these bit for bit. (The first-order baseline of the
training loop is zokernels.apps.common.first_order_step: a helper of the product, not a twin.)"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Sampler = Callable[[int, int, int, int], torch.Tensor]


def _offsets(params: Sequence[torch.Tensor]) -> list[int]:
    out, total = [], 0
    for p in params:
        out.append(total)
        total += p.numel()
    return out


def add_combination_ref(value: torch.Tensor, offset: int, seed: int, terms: Sequence[tuple[int, float]],
                        sampler: Sampler) -> torch.Tensor:
    """fl(value + d), d = Σ_k fl32(coeff_k)·z_k summed in fp32 in term order; fp64 values add d widened."""
    d = torch.zeros(value.numel(), dtype=torch.float32)
    for stream, coeff in terms:
        d = d + np.float32(coeff) * sampler(value.numel(), seed, stream, offset)
    d = d.view_as(value)
    if value.dtype == torch.float64:
        return value + d.double()
    return (value.float() + d).to(value.dtype)


def mezo_step_ref(model: torch.nn.Module, params: Sequence[torch.Tensor], loss: Callable[[], float], mu: float,
                  lr: float, seed: int, q: int, sampler: Sampler, mode: str = "exact") -> list[float]:
    """MeZO step on `params` (in place), per tensor, with explicit z. mode 'exact': query points fl(θ ± fl(μz))
    from the untouched θ, update fl(θ + Σ_j fl(−lr g_j/q) z_j). mode 'inplace': the fused in-place sequence
    +μz, −2μz, (restore + next direction), final (μ − lr g/q) on the last direction. Returns the g_j."""
    offsets = _offsets(params)
    theta = [p.detach().clone() for p in params]
    grads = []

    def set_all(terms_of: Callable[[int], list[tuple[int, float]]], base: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, b, o in zip(params, base, offsets):
                p.copy_(add_combination_ref(b, o, seed, terms_of(o), sampler))

    for j in range(q):
        if mode == "exact":
            set_all(lambda o: [(j, mu)], theta)
            plus = loss()
            set_all(lambda o: [(j, -mu)], theta)
            minus = loss()
            set_all(lambda o: [], theta)
        else:
            set_all(lambda o: ([(j - 1, mu)] if j > 0 else []) + [(j, mu)], [p.detach().clone() for p in params])
            plus = loss()
            set_all(lambda o: [(j, -2.0 * mu)], [p.detach().clone() for p in params])
            minus = loss()
        grads.append((plus - minus) / (2.0 * mu))
    terms = [(j, -lr * g / q) for j, g in enumerate(grads)]
    if mode == "inplace":
        terms[-1] = (q - 1, mu + terms[-1][1])
    set_all(lambda o: terms, [p.detach().clone() for p in params])
    return grads


def spsa_gradient_ref(f: Callable[[torch.Tensor], float], theta: torch.Tensor, z: torch.Tensor, mu: float
                      ) -> torch.Tensor:
    """Central SPSA estimate (f(θ+μz) − f(θ−μz))/(2μ) · z in float64, z given explicitly."""
    theta, z = theta.double(), z.double()
    return (f(theta + mu * z) - f(theta - mu * z)) / (2.0 * mu) * z
