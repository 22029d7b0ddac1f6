"""Float64 reference twins of the zokernels.optim optimizers, with directions materialized explicitly from the
reference Philox (philox_ref) and every step written out as formulas. Imports nothing from the product.

A twin step starts from the product's state before the step (parameters and fp32 state tensors are exactly
representable in float64) and returns:
- the query points, formed with the rounding the sweep contract defines (the model is evaluated at points of the
  parameter dtype: RN_dtype(θ + fl32(fl32(c)·b)), b = z, sign(z) or fl32(z·fl32(1/fl32(√H)))); numpy float32
  arithmetic is IEEE round-to-nearest per operation, so these are the product's points bit for bit (tested), the
  losses are the same numbers and so are the scalars (g_j, σ, κ_j: the same float64 formulas);
- the new parameters and state in float64, each with a rigorous bound on the distance of any implementation that
  performs the documented float32 operations (running error analysis: every fp32 operation may add
  u·|result| + 2^-149, u = 2^-24 (sqrt: 2u, torch's is within 1 ulp, not correctly rounded), inputs perturbed by
  their own bounds; fp32-rounded constants carry u·|c|; the final RN_dtype adds u·|x| for the fp32 sum and
  ½ulp_dtype for fp16/bf16). Nothing in the bound is fitted.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .philox_ref import philox_normal_ref, philox_uint32_ref

U = 2.0 ** -24
TINY = 2.0 ** -149
STREAM_BITS = 20
LAYER_DRAW = (1 << STREAM_BITS) - 1
_F32 = np.float32
_DTYPE_BITS = {torch.float16: (11, -14), torch.bfloat16: (8, -126)}  # (precision p, minimum normal exponent)


def stream_of(t: int, j: int) -> int:
    return (t << STREAM_BITS) | j


# ---- running error analysis -------------------------------------------------------------------------------------
@dataclass
class Bounded:
    """value: the float64 result; err: elementwise bound on |fp32 evaluation − value|."""

    value: np.ndarray
    err: np.ndarray

    @staticmethod
    def exact(x: Any) -> "Bounded":
        v = np.asarray(x, dtype=np.float64)
        return Bounded(v, np.zeros_like(v))

    @staticmethod
    def const(c: float, roundings: int = 1) -> "Bounded":
        """A constant used as fl32(c) (roundings = 1) or as fl32(fl32(a)·fl32(b)) with c = a·b (roundings = 3);
        2^-50·|c| covers the float64 roundings of c's own formula (a few operations of 2^-53 each)."""
        rel = (1.0 + U) ** roundings - 1.0 + 2.0 ** -50
        return Bounded(np.float64(c), np.float64(rel * abs(c)))

    def _round(self, v: np.ndarray, prop: np.ndarray) -> "Bounded":
        return Bounded(v, prop + U * (np.abs(v) + prop) + TINY)

    def __add__(self, o: "Bounded") -> "Bounded":
        return self._round(self.value + o.value, self.err + o.err)

    def __mul__(self, o: "Bounded") -> "Bounded":
        prop = np.abs(self.value) * o.err + np.abs(o.value) * self.err + self.err * o.err
        return self._round(self.value * o.value, prop)

    def __truediv__(self, o: "Bounded") -> "Bounded":
        low = np.abs(o.value) - o.err
        assert np.all(low > 0), "divisor's bound reaches zero"
        v = self.value / o.value
        return self._round(v, (self.err + np.abs(v) * o.err) / low)

    def sqrt(self) -> "Bounded":
        """√ within 1 ulp (2u·|result|): torch's fp32 sqrt on CPU is not always correctly rounded."""
        v = np.sqrt(self.value)
        low = np.sqrt(np.maximum(self.value - self.err, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            prop = np.where(v + low > 0, self.err / (v + low), np.sqrt(self.err))
        return Bounded(v, prop + 2 * U * (v + prop) + TINY)

    def sign(self) -> "Bounded":
        return Bounded(np.sign(self.value), np.where(np.abs(self.value) > self.err, 0.0, 2.0))


def final_bound(x: np.ndarray, err: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Bound on |RN_dtype(fl(θ + Δ)) − x| when the computed θ + Δ is within err of x (before its own rounding)."""
    if dtype == torch.float64:
        return err + 2.0 ** -53 * (np.abs(x) + err) + 2.0 ** -1074
    b = err + U * (np.abs(x) + err) + TINY
    if dtype == torch.float32:
        return b
    p, emin = _DTYPE_BITS[dtype]
    y = np.abs(x) + b
    with np.errstate(divide="ignore"):
        e = np.maximum(np.floor(np.log2(np.maximum(y, 2.0 ** (emin - p)))), emin)
    return b + 0.5 * 2.0 ** (e + 1 - p)  # ½ulp at the largest magnitude the result can have


# ---- directions and query points --------------------------------------------------------------------------------
def z_ref(numel: int, seed: int, stream: int, offset: int) -> np.ndarray:
    return philox_normal_ref(numel, seed, stream, offset)


def basis_ref(kind: str, numel: int, seed: int, stream: int, offset: int,
              scale32: np.ndarray | None = None) -> np.ndarray:
    """float32 basis vector: z, sign(z) with sign(±0) = +1, or fl32(z·scale)."""
    z = z_ref(numel, seed, stream, offset)
    if kind == "rademacher":
        z = np.where(z >= 0, _F32(1.0), _F32(-1.0)).astype(np.float32)
    if scale32 is not None:
        z = (z * scale32).astype(np.float32)
    return z


def point_ref(theta: torch.Tensor, pert32: np.ndarray) -> torch.Tensor:
    """RN_dtype(θ + pert): the sum in fp32 (fp64 for fp64 θ), then rounded to θ's dtype."""
    wide = np.float64 if theta.dtype == torch.float64 else np.float32
    base = theta.detach().to(torch.float64 if wide is np.float64 else torch.float32).reshape(-1).numpy()
    return torch.from_numpy((base + pert32.astype(wide)).astype(wide)).to(theta.dtype).view_as(theta)


def inv_sqrt32(h32: np.ndarray) -> np.ndarray:
    """fl32(1/fl32(√H)) in float32 arithmetic."""
    return (_F32(1.0) / np.sqrt(h32.astype(np.float32))).astype(np.float32)


def population_std(values: Sequence[float]) -> float:
    n = len(values)
    mean = 0.0
    for v in values:
        mean += v
    mean /= n
    var = 0.0
    for v in values:
        var += (v - mean) * (v - mean)
    return math.sqrt(var / n)


# ---- the twin step ----------------------------------------------------------------------------------------------
@dataclass
class RefStep:
    points: list[list[torch.Tensor]] = field(default_factory=list)  # parameters at every closure call, in order
    losses: list[float] = field(default_factory=list)
    coefficients: list[float] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    accepted: bool = True
    params: list[np.ndarray] = field(default_factory=list)  # float64 θ_new (θ for inactive / rejected)
    bounds: list[np.ndarray] = field(default_factory=list)  # bound on |product θ_new − params| per element
    state: dict[int, dict[str, Bounded]] = field(default_factory=dict)  # new fp32 state, value and bound
    history: list[tuple[int, tuple[int, ...], tuple[float, ...]]] = field(default_factory=list)
    candidate: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # conservative: θ_new, bound


def layers_ref(group_sizes: Sequence[int]) -> list[list[int]]:
    if len(group_sizes) > 1:
        out, start = [], 0
        for n in group_sizes:
            out.append(list(range(start, start + n)))
            start += n
        return out
    return [[i] for i in range(group_sizes[0])]


def zo_step_ref(cfg: dict[str, Any], params: list[torch.Tensor], groups: list[dict[str, Any]],
                state: dict[int, dict[str, Any]], history: list, loss_at: Callable[[list[torch.Tensor]], float],
                seed: int, t: int) -> RefStep:
    """One step of the optimizer described by `cfg` from `params` (list of tensors, all of them), `groups` (the
    hyperparameters of each tensor's group, per tensor), `state` (per tensor index: fp32 state tensors and ints, as
    before the step), `history` (replayed momentum: (t, active, coefficients) of earlier steps).

    cfg: estimator ('central', 'forward', 'fzoo', 'hizoo'), basis ('gaussian', 'rademacher'), rule ('sgd', 'sign',
    'adam'), mu, q, clip, group_sizes, layers_per_step, momentum_buffer ('dense', 'replay'), replay_window,
    needs_base (conservative), conservative, hessian_smoothing."""
    out = RefStep()
    mu, q, kind = cfg["mu"], cfg["q"], cfg["estimator"]
    offsets = np.cumsum([0] + [p.numel() for p in params])[:-1].tolist()
    layers = layers_ref(cfg["group_sizes"])
    k = cfg.get("layers_per_step")
    if k is None or k >= len(layers):
        out.layers = list(range(len(layers)))
    else:
        words = philox_uint32_ref(len(layers), seed, stream_of(t, LAYER_DRAW), 0)
        out.layers = sorted(sorted(range(len(layers)), key=lambda n: (int(words[n]), n))[:k])
    active = sorted(i for n in out.layers for i in layers[n])
    out.active = active
    hessian = {i: state[i]["hessian"].double().reshape(-1).numpy() for i in active} if kind == "hizoo" else {}
    scale = {i: inv_sqrt32(hessian[i].astype(np.float32)) for i in active} if kind == "hizoo" else {}

    def b(i: int, j: int) -> np.ndarray:
        return basis_ref(cfg["basis"], params[i].numel(), seed, stream_of(t, j), offsets[i], scale.get(i))

    def query(j: int | None, coeff: float) -> float:
        pts = [p.detach().clone() for p in params]
        if j is not None:
            for i in active:
                pts[i] = point_ref(params[i], (_F32(coeff) * b(i, j)).astype(np.float32))
        out.points.append(pts)
        value = loss_at(pts)
        out.losses.append(value)
        return value

    def clip(g: float) -> float:
        c = cfg.get("clip")
        return g if c is None else min(max(g, -c), c)

    base = None
    if kind in ("forward", "fzoo", "hizoo") or cfg.get("needs_base"):
        base = query(None, 0.0)
    grads, curvature = [], []
    if kind in ("central", "hizoo"):
        for j in range(q):
            plus, minus = query(j, mu), query(j, -mu)
            grads.append((plus - minus) / (2.0 * mu))
            if kind == "hizoo":
                curvature.append(abs(plus + minus - 2.0 * base) / (2.0 * mu * mu))
        coeffs = [clip(g) / q for g in grads]
    else:
        perturbed = [query(j, mu) for j in range(q)]
        if kind == "forward":
            coeffs = [clip((lj - base) / mu) / q for lj in perturbed]
        else:
            sigma = population_std(perturbed)
            coeffs = [(lj - base) / (q * sigma) if sigma > 0 else 0.0 for lj in perturbed]
    out.coefficients = coeffs

    # HiZOO: H_{t+1} = H·fl32(1 − α) + (H·acc)·fl32(α), acc = Σ_j z_j²·fl32(κ_j/q); the update uses raw z and
    # s_{t+1} = 1/√H_{t+1}
    precond: dict[int, Bounded] = {}
    if kind == "hizoo":
        alpha = cfg["hessian_smoothing"]
        for i in active:
            h = Bounded.exact(hessian[i])
            acc = Bounded.exact(np.zeros_like(hessian[i]))
            for j, kappa in enumerate(curvature):
                z = Bounded.exact(z_ref(params[i].numel(), seed, stream_of(t, j), offsets[i]))
                acc = acc + (z * z) * Bounded.const(kappa / q)
            h_new = h * Bounded.const(1.0 - alpha) + (h * acc) * Bounded.const(alpha)
            out.state.setdefault(i, {})["hessian"] = h_new
            precond[i] = Bounded.exact(np.ones_like(hessian[i])) / h_new.sqrt()
    update_basis = "gaussian" if kind == "hizoo" else cfg["basis"]

    def combination(i: int, terms: list[tuple[int, float]], roundings: int) -> Bounded:
        acc = Bounded.exact(np.zeros(params[i].numel()))
        for stream, c in terms:
            bv = basis_ref(update_basis, params[i].numel(), seed, stream, offsets[i])
            acc = acc + Bounded.exact(bv) * Bounded.const(c, roundings)
        return acc

    rule = cfg["rule"]
    dense = (rule == "sgd" and cfg.get("momentum_buffer", "dense") == "dense"
             and any(g.get("momentum", 0.0) != 0.0 for g in groups))
    linear = rule == "sgd" and not dense
    replay = (rule == "sgd" and cfg.get("momentum_buffer") == "replay"
              and any(g.get("momentum", 0.0) != 0.0 for g in groups))
    full_history = list(history) + [(t, tuple(active), tuple(coeffs))] if replay else []
    out.history = full_history
    deltas: dict[int, Bounded] = {}
    for i in active:
        group = groups[i]
        lr = group["lr"]
        if linear:
            if replay:
                terms, r = [], 0
                for ht, hactive, hcoeffs in reversed(full_history):
                    if i not in hactive:
                        continue
                    terms += [(stream_of(ht, j), -(group["momentum"] ** r) * c * lr) for j, c in enumerate(hcoeffs)]
                    r += 1
                    if r == cfg["replay_window"]:
                        break
            else:
                terms = [(stream_of(t, j), -c * lr) for j, c in enumerate(coeffs)]
            delta = combination(i, terms, roundings=3)
            if i in precond:
                delta = delta * precond[i]
        else:
            g = combination(i, [(stream_of(t, j), c) for j, c in enumerate(coeffs)], roundings=1)
            if i in precond:
                g = g * precond[i]
            delta = _elementwise(rule, g, group, state.get(i, {}), out.state.setdefault(i, {}))
        if group.get("weight_decay", 0.0) != 0.0:
            theta = Bounded.exact(params[i].detach().double().reshape(-1).numpy())
            delta = delta + theta * Bounded.const(-lr * group["weight_decay"])
        deltas[i] = delta

    for i, p in enumerate(params):
        theta = p.detach().double().reshape(-1).numpy()
        if i in deltas:
            x = theta + deltas[i].value
            out.params.append(x)
            out.bounds.append(final_bound(x, deltas[i].err, p.dtype))
        else:
            out.params.append(theta.copy())
            out.bounds.append(np.zeros_like(theta))

    if cfg.get("conservative"):
        out.candidate = list(zip(out.params, out.bounds))
        candidate = [torch.from_numpy(x).to(p.dtype).view_as(p) for x, p in zip(out.params, params)]
        out.points.append(candidate)
        value = loss_at(candidate)
        out.losses.append(value)
        out.accepted = value <= base
        if not out.accepted:
            out.params = [p.detach().double().reshape(-1).numpy() for p in params]
            out.bounds = [np.zeros(p.numel()) for p in params]
    return out


def _elementwise(rule: str, g: Bounded, group: dict[str, Any], old: dict[str, Any], new: dict[str, Bounded]
                 ) -> Bounded:
    """Δ of an elementwise rule and its new state (written into `new`), from `old` (fp32 tensors, exact)."""
    lr = group["lr"]

    def prev(key: str) -> Bounded | None:
        return Bounded.exact(old[key].double().reshape(-1).numpy()) if key in old else None

    if rule == "sgd":
        beta = group.get("momentum", 0.0)
        if beta == 0.0:
            return g * Bounded.const(-lr)
        m_old = prev("momentum_buffer")
        m = g if m_old is None else m_old * Bounded.const(beta) + g
        new["momentum_buffer"] = m
        return m * Bounded.const(-lr)
    if rule == "sign":
        beta = group.get("momentum", 0.0)
        if beta != 0.0:
            m_old = prev("momentum_buffer") or Bounded.exact(np.zeros_like(g.value))
            g = m_old * Bounded.const(beta) + g * Bounded.const(1.0 - beta)
            new["momentum_buffer"] = g
        return g.sign() * Bounded.const(-lr)
    if rule == "adam":
        beta1, beta2 = group["betas"]
        k = old.get("step", 0) + 1
        zeros = Bounded.exact(np.zeros_like(g.value))
        m = (prev("exp_avg") or zeros) * Bounded.const(beta1) + g * Bounded.const(1.0 - beta1)
        v = (prev("exp_avg_sq") or zeros) * Bounded.const(beta2) + (g * g) * Bounded.const(1.0 - beta2)
        new["exp_avg"], new["exp_avg_sq"] = m, v
        new["step"] = Bounded.exact(np.float64(k))
        bc1, bc2 = 1.0 - beta1 ** k, 1.0 - beta2 ** k
        denom = v.sqrt() / Bounded.const(math.sqrt(bc2)) + Bounded.const(group["eps"])
        return (m / denom) * Bounded.const(-lr / bc1)
    raise ValueError(f"unknown rule {rule!r}")


# ---- MeZO-SVRG --------------------------------------------------------------------------------------------------
@dataclass
class SVRGRefStep(RefStep):
    anchor: list[torch.Tensor] = field(default_factory=list)  # θ̃ after the step (exact copy)
    anchor_terms: list[tuple[int, float]] = field(default_factory=list)  # ĝ_a after the step: (stream, g^a_j/q)


def svrg_step_ref(params: list[torch.Tensor], anchor: list[torch.Tensor], anchor_terms: list[tuple[int, float]],
                  lr: float, lr_anchor: float, mu: float, q: int, anchor_every: int, seed: int, t: int,
                  minibatch_at: Callable[[list[torch.Tensor]], float],
                  full_batch_at: Sequence[Callable[[list[torch.Tensor]], float]]) -> SVRGRefStep:
    """One step of MeZO-SVRG (Gautam et al. 2024, Algorithm 1) written out: `*_at(points)` evaluates a loss with the
    parameters set to `points`. Anchor step (t mod anchor_every = 0): g^a_j = (ℓ_F(θ + μz_j) − ℓ_F(θ − μz_j))/(2μ),
    ℓ_F the mean of the full-batch losses; θ̃ = θ; θ_new = θ − η1·(1/q)Σ g^a_j z_j. Minibatch step: per direction
    ℓ(θ ± μz_j) then ℓ(θ̃ ± μz_j) on the same batch, d_j the difference of the two central differences over 2μ;
    θ_new = θ − η2·((1/q)Σ d_j z_j + ĝ_a). Points RN_dtype(θ + fl32(fl32(±μ)·z)); the update is the linear
    combination with coefficients fl32(fl32(−c)·fl32(lr)) (bounded like zo_step_ref's linear rule)."""
    out = SVRGRefStep()
    offsets = np.cumsum([0] + [p.numel() for p in params])[:-1].tolist()
    is_anchor = t % anchor_every == 0

    def z(i: int, stream: int) -> np.ndarray:
        return z_ref(params[i].numel(), seed, stream, offsets[i])

    def mean_at(center: list[torch.Tensor], j: int, coeff: float, losses: Sequence[Callable]) -> float:
        pts = [point_ref(c, (_F32(coeff) * z(i, stream_of(t, j))).astype(np.float32)) for i, c in enumerate(center)]
        values = []
        for loss_at in losses:
            out.points.append(pts)
            values.append(loss_at(pts))
        out.losses.extend(values)
        return sum(values) / len(values)

    grads = []
    for j in range(q):
        if is_anchor:
            plus, minus = mean_at(params, j, mu, full_batch_at), mean_at(params, j, -mu, full_batch_at)
            grads.append((plus - minus) / (2.0 * mu))
        else:
            plus, minus = mean_at(params, j, mu, [minibatch_at]), mean_at(params, j, -mu, [minibatch_at])
            plus_a, minus_a = mean_at(anchor, j, mu, [minibatch_at]), mean_at(anchor, j, -mu, [minibatch_at])
            grads.append(((plus - minus) - (plus_a - minus_a)) / (2.0 * mu))
    out.coefficients = [g / q for g in grads]
    own = [(stream_of(t, j), c) for j, c in enumerate(out.coefficients)]
    step_lr = lr_anchor if is_anchor else lr
    terms = own if is_anchor else own + list(anchor_terms)
    for i, p in enumerate(params):
        delta = Bounded.exact(np.zeros(p.numel()))
        for stream, c in terms:
            delta = delta + Bounded.exact(z(i, stream)) * Bounded.const(-c * step_lr, 3)
        x = p.detach().double().reshape(-1).numpy() + delta.value
        out.params.append(x)
        out.bounds.append(final_bound(x, delta.err, p.dtype))
    out.active = list(range(len(params)))
    out.anchor = [p.detach().clone() for p in params] if is_anchor else [a.clone() for a in anchor]
    out.anchor_terms = own if is_anchor else list(anchor_terms)
    return out
