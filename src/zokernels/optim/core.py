"""The machinery every zokernels.optim optimizer shares: directions, queries, estimators, the step and its state.

A step t of an optimizer with seed S:

1. **Layers** (LeZO-style sampling, `layers_per_step=k`): k of the optimizer's layers are active, drawn from the
   Philox words philox_uint32(n_layers, S, stream(t, LAYER_DRAW)) (the k smallest words, ties by index). A layer is
   a parameter group when there are several groups, else one parameter tensor. Only active tensors are perturbed,
   updated and have their rule state advanced (like torch.optim skipping a parameter without a gradient).
2. **Directions**: direction j of step t is the Philox stream `direction_stream(t, j) = t·2^20 + j` over all the
   optimizer's parameters read as one flat vector (tensor i starts at the sum of the numels before it), so a
   tensor's direction never depends on which tensors are active. The basis vector b_j is z (gaussian), sign(z)
   with sign(±0) = +1 (rademacher, FZOO) or fl32(z·s) with s = fl32(1/fl32(√H)) (HiZOO). Nothing is stored: every
   use regenerates z from (S, stream) through the existing sweeps in zokernels.philox.
3. **Queries** (ClosureScope, the query scope of estimators/scope.py): the closure is called at query points
   θ_j = RN_dtype(θ + fl32(fl32(c)·b_j)) written *in place* into the parameters from a restore copy of the active
   tensors (the sweep philox.normal_combination_into for the gaussian basis, the same rounding per tensor
   otherwise). Every call sees the same torch RNG state (common random
   numbers: dropout draws the same masks), TF32 is off, and afterwards the RNG is where one closure call would have
   left it. If the closure raises or returns NaN/inf, the parameters are copied back from the restore copy and the
   RNG reset before the error propagates (error contract of zokernels.estimators.common): parameters, optimizer
   state and RNG are bit-identical to before the step.
4. **Estimate** ĝ = Σ_j c_j b_j (HiZOO: ⊙ s_{t+1}), a list of (stream, c_j) pairs: the estimator's scalars.
5. **Update** by the rule (rules.py). On the gaussian basis without a preconditioner, a fusable rule (SGD,
   replayed momentum, sign without momentum, Adam; each with decoupled weight decay) is one rule sweep
   (philox.rule_sweep_) straight from the restore copy: ĝ = Σ_k fl32(c_k)·z_k is formed per element in fp32
   registers, never materialized, and the rule applied there (Adam reads and writes its fp32 moments in the same
   pass). Otherwise (dense momentum, the Rademacher or HiZOO basis), per active tensor, ĝ_i (fp32) is materialized,
   the rule turns it into Δ_i (fp32, lr included), decoupled weight decay adds fl32(−lr·wd)·θ, and
   θ_new = RN_dtype(θ + Δ). Both give the same bits (tests/test_rule_sweep.py). Rule state is fp32 whatever the
   parameter dtype.

Extra memory during a step, in bytes per trainable parameter element (s = bytes of the parameter dtype):
s·(active fraction) for the restore copy, plus the rule's and estimator's persistent fp32 state (0, 4 or 8), plus
transient fp32 buffers of O(largest tensor) on the materialized path (none on the fused one with the cpu, cuda or
triton backend). Each optimizer's docstring states its total.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import backends, philox
from ..checks import check_int, check_mu, check_nonneg
from ..estimators.common import BASE_QUERY, StepResult, direction_query
from ..estimators.scope import KeptCopies, QueryScope

STREAM_BITS = 20
MAX_DIRECTIONS = (1 << STREAM_BITS) - 2
LAYER_DRAW = (1 << STREAM_BITS) - 1  # the stream index (within step t) of the LeZO layer draw
ESTIMATORS = ("central", "forward", "fzoo", "hizoo")
BASES = ("gaussian", "rademacher")
RESTORED = "parameters, optimizer state and the RNG were restored"
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def direction_stream(t: int, j: int) -> int:
    """Philox stream of direction j in step t (j = LAYER_DRAW: the layer draw of step t)."""
    return (t << STREAM_BITS) | j


def f32(x: float) -> float:
    """x rounded to float32 (the coefficient every sweep and materialization uses)."""
    return float(np.float32(x))


def scaled_coeff(a: float, lr: float) -> float:
    """fl32(fl32(a)·fl32(lr)): a per-tensor scale folded into a coefficient, as philox.add_normal_combination_ does."""
    return float(np.float32(a) * np.float32(lr))


def add_rounded(base: torch.Tensor, delta32: torch.Tensor) -> torch.Tensor:
    """RN_dtype(base + delta32): the sum formed in fp32 (fp64 for fp64 tensors), rounded once to base's dtype."""
    if base.dtype == torch.float64:
        return base + delta32.double()
    if base.dtype == torch.float32:
        return base + delta32
    return (base.float() + delta32).to(base.dtype)


# ---- queries ----------------------------------------------------------------------------------------------------
class _ClosureLoss:
    """The closure seen as a loss_fn(model, batch) for estimators.common.evaluate_loss."""

    def __init__(self, closure: Callable[[], Any]):
        self.closure = closure
        # a closure may name itself in errors (zokernels.ZOSVRG binds loss_fn(model, batch) and keeps its wording)
        self.zokernels_source = getattr(closure, "zokernels_source", "the closure")
        self.zokernels_owned = getattr(closure, "zokernels_owned", False)

    def __call__(self, model: Any, batch: Any) -> Any:
        return self.closure()


class ClosureScope(QueryScope):
    """The query scope of an optimizer step over the closure (no model: the closure owns it); the active tensors
    are its snapshot (`backup`), restored if the step fails."""

    def __init__(self, closure: Callable[[], Any], active: list[torch.Tensor], device: torch.device,
                 snapshot_into: list[torch.Tensor] | None = None):
        if closure is None or not callable(closure):
            raise TypeError("step(closure) needs a closure that returns the loss at the current parameters "
                            f"(zeroth-order optimizers only evaluate losses), got {type(closure).__name__}")
        super().__init__(None, active, restored=RESTORED, device=device, snapshot_into=snapshot_into)
        self.loss_fn = _ClosureLoss(closure)

    def closure_loss(self, query: str, closure: Callable[[], Any] | None = None) -> float:
        """The closure's loss (or `closure`'s: ZOSVRG's full-batch chunks) at the current parameters."""
        loss_fn = self.loss_fn if closure is None else _ClosureLoss(closure)
        with torch.no_grad():
            # the batch a closure declares (zokernels.ZOSVRG binds one) names it when it does not fit the model
            return self.loss(loss_fn, getattr(loss_fn.closure, "batch", None), query)


# ---- directions -------------------------------------------------------------------------------------------------
class Directions:
    """The basis vectors b_j of one step, regenerated per use from (seed, stream) by the Philox sweeps.

    `scale(i)` (HiZOO) returns the fp32 per-element scale s of tensor i; the basis is then fl32(z·s)."""

    def __init__(self, params: list[torch.Tensor], offsets: list[int], seed: int, t: int, backend: str,
                 kind: str = "gaussian", scale: Callable[[int], torch.Tensor] | None = None):
        self.params, self.offsets, self.seed, self.t, self.backend = params, offsets, seed, t, backend
        self.kind, self.scale = kind, scale

    @property
    def swept(self) -> bool:
        """Whether b = z exactly, so perturbations and linear updates are single multi-tensor sweeps."""
        return self.kind == "gaussian" and self.scale is None

    def stream(self, j: int) -> int:
        return direction_stream(self.t, j)

    def z(self, i: int, stream: int) -> torch.Tensor:
        """fp32 z(seed, stream, offsets[i] + ·) shaped like tensor i: 0 + fl32(1·z) through the sweep."""
        p = self.params[i]
        buf = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        philox.add_normal_combination_([buf], [self.offsets[i]], self.seed, [(stream, 1.0)], None, self.backend)
        return buf

    def basis(self, i: int, stream: int) -> torch.Tensor:
        z = self.z(i, stream)
        if self.kind == "rademacher":
            z = torch.where(z >= 0, 1.0, -1.0).to(torch.float32)
        if self.scale is not None:
            z = z * self.scale(i)
        return z

    def write_points(self, active: list[int], backup: list[torch.Tensor], j: int, coeff: float) -> None:
        """params[i] = RN_dtype(backup + fl32(fl32(coeff)·b_j)) for the active tensors (in place)."""
        stream = self.stream(j)
        if self.swept:
            philox.normal_combination_into([self.params[i] for i in active], backup,
                                           [self.offsets[i] for i in active], self.seed, [(stream, coeff)],
                                           None, self.backend)
            return
        c32 = f32(coeff)
        for i, b in zip(active, backup):
            self.params[i].copy_(add_rounded(b, self.basis(i, stream) * c32))

    def combination(self, i: int, terms: Sequence[tuple[int, float]]) -> torch.Tensor:
        """fp32 Σ_k fl32(c_k)·b_k on tensor i, accumulated in term order (streams given, not direction indices)."""
        p = self.params[i]
        if self.swept:
            buf = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if terms:
                philox.add_normal_combination_([buf], [self.offsets[i]], self.seed, list(terms), None, self.backend)
            return buf
        acc = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        for stream, c in terms:
            acc = acc + self.basis(i, stream) * f32(c)
        return acc


# ---- estimate ---------------------------------------------------------------------------------------------------
@dataclass
class StepInfo(StepResult):
    """What the last step did (a StepResult). `loss`: ℓ(θ) when the estimator evaluates it (forward, fzoo, hizoo,
    conservative), else the mean of (ℓ⁺ + ℓ⁻)/2 (central). `projected_grads`: g_j (central/forward/hizoo) or
    ℓ_j − ℓ_0 (fzoo); `coefficients`: c_j with ĝ = Σ_j c_j b_j. `num_queries` (also `forwards`): closure calls.
    `accepted`: False when ZOConservative rejected the step (parameters unchanged)."""

    step: int = 0
    coefficients: list[float] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    accepted: bool = True
    sigma: float | None = None  # FZOO: std of the N perturbed losses
    curvature: list[float] = field(default_factory=list)  # HiZOO: |ℓ⁺ + ℓ⁻ − 2ℓ_0|/(2μ²) per direction
    candidate_loss: float | None = None  # ZOConservative: ℓ(θ_new)

    @property
    def forwards(self) -> int:
        return self.num_queries


@dataclass
class Estimate:
    """ĝ = Σ_j coefficients[j]·b_j over the active tensors (streams of step t); `precondition(i)` (HiZOO) is the
    fp32 scale applied after the combination."""

    directions: Directions
    active: list[int]
    coefficients: list[float]
    precondition: Callable[[int], torch.Tensor] | None = None

    def terms(self, scale: float = 1.0) -> list[tuple[int, float]]:
        return [(self.directions.stream(j), scale * c) for j, c in enumerate(self.coefficients)]

    def gradient(self, i: int) -> torch.Tensor:
        """ĝ on tensor i, fp32."""
        g = self.directions.combination(i, self.terms())
        return g * self.precondition(i) if self.precondition is not None else g


def _clip(g: float, clip: float | None) -> float:
    return g if clip is None else min(max(g, -clip), clip)


def run_estimator(opt: "ZOOptimizer", queries: ClosureScope, dirs: Directions, active: list[int],
                  backup: list[torch.Tensor], info: StepInfo) -> Estimate:
    """The closure calls of one step and the scalars they give (see each estimator in ZOOptimizer's docstring)."""
    mu, q, kind, clip, seed = opt.mu, opt.q, opt.estimator, opt.clip, opt.seed
    grads, coeffs = [], []

    def two_sided(j: int) -> tuple[float, float]:
        """The losses at θ + μu_j and θ − μu_j (central and HiZOO share these queries)."""
        dirs.write_points(active, backup, j, mu)
        plus = queries.closure_loss(direction_query(j, seed, "+", f" (step {info.step})"))
        dirs.write_points(active, backup, j, -mu)
        return plus, queries.closure_loss(direction_query(j, seed, "-", f" (step {info.step})"))

    if opt.needs_base and kind == "central":
        info.loss = queries.closure_loss(BASE_QUERY)
    if kind == "central":
        means = []
        for j in range(q):
            plus, minus = two_sided(j)
            grads.append((plus - minus) / (2.0 * mu))
            means.append((plus + minus) / 2.0)
        if not opt.needs_base:
            info.loss = sum(means) / q
        coeffs = [_clip(g, clip) / q for g in grads]
    elif kind in ("forward", "fzoo"):
        base = queries.closure_loss(BASE_QUERY)
        info.loss = base
        perturbed = []
        for j in range(q):
            dirs.write_points(active, backup, j, mu)
            perturbed.append(queries.closure_loss(direction_query(j, seed, "+", f" (step {info.step})")))
        if kind == "forward":
            grads = [(lj - base) / mu for lj in perturbed]
            coeffs = [_clip(g, clip) / q for g in grads]
        else:
            grads = [lj - base for lj in perturbed]
            sigma = population_std(perturbed)
            info.sigma = sigma
            coeffs = [d / (q * sigma) if sigma > 0 else 0.0 for d in grads]
    elif kind == "hizoo":
        base = queries.closure_loss(BASE_QUERY)
        info.loss = base
        curvature = []
        for j in range(q):
            plus, minus = two_sided(j)
            grads.append((plus - minus) / (2.0 * mu))
            curvature.append(abs(plus + minus - 2.0 * base) / (2.0 * mu * mu))
        coeffs = [_clip(g, clip) / q for g in grads]
        info.curvature = curvature
    info.projected_grads, info.coefficients = grads, coeffs
    return Estimate(dirs, active, coeffs)


def population_std(values: Sequence[float]) -> float:
    """√(Σ(x − mean)²/N), float64, summed left to right (the reference twin uses the same formula)."""
    n = len(values)
    mean = 0.0
    for v in values:
        mean += v
    mean /= n
    var = 0.0
    for v in values:
        var += (v - mean) * (v - mean)
    return math.sqrt(var / n)


# ---- the optimizer ----------------------------------------------------------------------------------------------
class ZOOptimizer(torch.optim.Optimizer):
    """Base of the zokernels.optim optimizers: a torch.optim.Optimizer whose `step(closure)` estimates the gradient
    from closure calls at Philox-perturbed parameters and applies an update rule (rules.py).

    Subclasses fix `rule` (an UpdateRule), the estimator and their defaults. Per-group hyperparameters (lr,
    weight_decay and the rule's) follow torch.optim (param groups, schedulers); mu, q, the estimator, seed and
    layer sampling are optimizer-wide.

    Estimators (forwards per step): 'central' ℓ(θ ± μb_j), g_j = (ℓ⁺ − ℓ⁻)/(2μ) (2q, MeZO for q = 1); 'forward'
    one shared base ℓ_0 = ℓ(θ), g_j = (ℓ(θ + μb_j) − ℓ_0)/μ (q + 1); 'fzoo' (q + 1, Rademacher); 'hizoo' (2q + 1).
    c_j = clip(g_j)/q; ĝ = Σ_j c_j b_j.
    """

    rule: Any = None
    estimator: str = "central"
    basis: str = "gaussian"
    needs_base = False  # evaluate ℓ(θ) first even with the central estimator (ZOConservative)
    estimator_state_bytes = 0  # persistent fp32 bytes per parameter element held by the estimator (HiZOO: 4)

    def __init__(self, params: Any, defaults: dict[str, Any], *, mu: float, q: int, estimator: str,
                 clip: float | None = None, layers_per_step: int | None = None, seed: int | None = None,
                 backend: str | None = None):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        for key in ("mu", "q", "seed", "estimator"):
            if key in defaults:
                raise ValueError(f"{key} is optimizer-wide, not a per-group hyperparameter")
        super().__init__(params, defaults)
        for g in self.param_groups:
            for key in ("mu", "q", "estimator"):
                if key in g:
                    raise ValueError(f"{key} is optimizer-wide; a param group may not set it")
            self._check_group(g)
        self.mu = check_mu(mu)
        self.q = check_int("q", q, 1, MAX_DIRECTIONS)
        self.estimator = estimator
        self.clip = None if clip is None else check_nonneg("clip", clip)
        self.seed = philox.step_seed(seed)
        self.t = 0
        self.last_step: StepInfo | None = None
        # the restore copies (`backup`) of the active tensors, kept for the next step while the active set stays (a
        # new set frees them first, so what is held stays within memory_formula()'s restore copy); not in state_dict
        self._restore_copies = KeptCopies(1)
        params_ = self._params()
        devices = {p.device for p in params_}
        if len(devices) != 1:
            raise ValueError(f"parameters must all be on one device, got {sorted(map(str, devices))}")
        for i, p in enumerate(params_):
            if p.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"parameter {i} must be float32/float64/float16/bfloat16, got {p.dtype}")
            if not p.is_contiguous():
                raise ValueError(f"parameter {i} is not contiguous; the sweeps write storage in order "
                                 "(call .data = .data.contiguous() first)")
        self.backend = backends.resolve_backend(backend, params_[0].device)
        n_layers = len(self._layers())
        self.layers_per_step = None if layers_per_step is None else check_int("layers_per_step", layers_per_step,
                                                                              1, n_layers)

    # -- structure --
    def _check_group(self, group: dict[str, Any]) -> None:
        group["lr"] = check_nonneg("lr", group["lr"])
        group["weight_decay"] = check_nonneg("weight_decay", group.get("weight_decay", 0.0))
        self.rule.check(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "t"):  # after __init__: validate like the initial groups
            self._check_group(self.param_groups[-1])

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_of(self) -> list[dict[str, Any]]:
        return [g for g in self.param_groups for _ in g["params"]]

    def _layers(self) -> list[list[int]]:
        """Layers for sampling: the param groups when there are several, else one tensor each."""
        sizes = [len(g["params"]) for g in self.param_groups]
        if len(sizes) > 1:
            out, start = [], 0
            for n in sizes:
                out.append(list(range(start, start + n)))
                start += n
            return out
        return [[i] for i in range(sizes[0])]

    def active_layers(self, t: int) -> list[int]:
        layers = self._layers()
        if self.layers_per_step is None or self.layers_per_step >= len(layers):
            return list(range(len(layers)))
        words = philox.philox_uint32(len(layers), self.seed, direction_stream(t, LAYER_DRAW), 0)
        order = sorted(range(len(layers)), key=lambda k: (int(words[k]), k))
        return sorted(order[:self.layers_per_step])

    # -- hooks for subclasses --
    def _directions(self, params: list[torch.Tensor], offsets: list[int], t: int) -> Directions:
        return Directions(params, offsets, self.seed, t, self.backend, self.basis)

    def _estimate(self, queries: ClosureScope, dirs: Directions, active: list[int], backup: list[torch.Tensor],
                  info: StepInfo) -> Estimate:
        """The step's closure calls and the estimate they give (ZOSVRG: anchor and control-variate queries)."""
        return run_estimator(self, queries, dirs, active, backup, info)

    def _update_lr(self, group: dict[str, Any]) -> float:
        """The learning rate of this step's update (ZOSVRG: η1 on anchor steps)."""
        return group["lr"]

    def _prepare_update(self, est: Estimate, info: StepInfo) -> dict[str, Any]:
        """Estimator-owned state after the queries (HiZOO: H_{t+1}); returns what _commit_estimator stores."""
        return {}

    def _commit_estimator(self, pending: dict[str, Any]) -> None:
        pass

    def _accept(self, queries: ClosureScope, info: StepInfo, active: list[int], backup: list[torch.Tensor]) -> bool:
        """ZOConservative: evaluates the updated parameters; False restores them."""
        return True

    # -- the step --
    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: zeroth-order optimizers neither read nor write `.grad`."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """One step; `closure()` must return the loss at the current parameters (it is called under no_grad, q + 1
        to 2q + 2 times, always on the same batch). Returns the loss (see StepInfo.loss); details in `last_step`."""
        params = self._params()
        t = self.t
        layer_ids = self.active_layers(t)
        layers = self._layers()
        active = sorted(i for k in layer_ids for i in layers[k])
        queries = ClosureScope(closure, [params[i] for i in active], params[0].device,
                               snapshot_into=self._restore_copies.like([params[i] for i in active])[0])
        dirs = self._directions(params, philox.stream_offsets(params), t)
        info = StepInfo(loss=float("nan"), num_queries=0, backend=self.backend, seed=self.seed, step=t, layers=layer_ids)
        try:
            with queries:  # a failure anywhere inside restores the active tensors from `backup`
                backup = queries.snapshot
                est = self._estimate(queries, dirs, active, backup, info)
                pending_estimator = self._prepare_update(est, info)
                pending_rule = self.rule.prepare(self, est, info)
                self._write_update(est, backup, pending_rule)
                queries.commit_parameters()
                info.accepted = self._accept(queries, info, active, backup)
        finally:
            info.num_queries, info.losses = len(queries.losses), list(queries.losses)
        if info.accepted:
            self._commit_estimator(pending_estimator)
            self.rule.commit(self, est, pending_rule)
        else:
            for i, b in zip(active, backup):
                params[i].copy_(b)
        self.t = t + 1
        self.last_step = info
        return info.loss

    def _write_update(self, est: Estimate, backup: list[torch.Tensor], pending: dict[str, Any]) -> None:
        """θ_new for every active tensor, written from the restore copy (no separate restore pass). Where the rule is
        sweepable on this basis (gaussian, no preconditioner): one fused rule sweep per distinct term list
        (philox.rule_sweep_, ĝ never materialized); else ĝ materialized per tensor and the rule's `delta`."""
        params, groups, dirs = self._params(), self._group_of(), est.directions
        if dirs.swept and est.precondition is None and self.rule.fuse and self.rule.sweepable(self):
            # one sweep per distinct term list (LeZO replay histories and per-group lr can differ per tensor)
            plans = [self.rule.sweep_spec(self, est, i, groups[i], pending) for i in est.active]
            by_terms: dict[tuple, list[int]] = {}
            for n, (terms, _) in enumerate(plans):
                by_terms.setdefault(tuple(terms), []).append(n)
            for terms, ns in by_terms.items():
                philox.rule_sweep_([params[est.active[n]] for n in ns], [backup[n] for n in ns],
                                   [dirs.offsets[est.active[n]] for n in ns], dirs.seed, list(terms),
                                   [plans[n][1] for n in ns], dirs.backend)
            return
        linear = self.rule.linear
        for n, i in enumerate(est.active):
            group, theta = groups[i], backup[n]
            if linear:
                delta = dirs.combination(i, [(s, scaled_coeff(a, self._update_lr(group)))
                                             for s, a in self.rule.terms(self, est, i, pending)])
                if est.precondition is not None:
                    delta = delta * est.precondition(i)
            else:
                delta = self.rule.delta(self, est.gradient(i), i, group, pending)
            if group["weight_decay"] != 0.0:
                theta32 = theta.double() if theta.dtype == torch.float64 else theta.float()
                delta = delta + (theta32 * f32(-group["lr"] * group["weight_decay"])).float()
            params[i].copy_(add_rounded(theta, delta))

    # -- memory --
    def memory_formula(self) -> dict[str, int]:
        """Extra bytes of a step over inference, from the stated formula: the restore copy of the active tensors
        (their dtype; with layer sampling the largest k layers; kept between steps), the persistent fp32 state
        (estimator + rule, all tensors), the saved RNG states (start and after the first call), and a bound on
        transient fp32 buffers (`transient_buffers()` × 4 × largest tensor numel; 0 on the pure sweep path)."""
        params = self._params()
        layers = self._layers()
        sizes = sorted((sum(params[i].numel() * params[i].element_size() for i in layer) for layer in layers),
                       reverse=True)
        copy = sum(sizes[:self.layers_per_step]) if self.layers_per_step else sum(sizes)
        numel = sum(p.numel() for p in params)
        state = (self.estimator_state_bytes + self.rule.state_bytes_per_param(self)) * numel
        rng = 2 * torch.get_rng_state().numel()
        if params[0].device.type == "cuda":
            rng += 2 * torch.cuda.get_rng_state(params[0].device).numel()
        transient = self.transient_buffers() * 4 * max(p.numel() for p in params)
        return {"restore_copy": copy, "state": state, "rng": rng, "transient_bound": transient,
                "total_bound": copy + state + rng + transient}

    def transient_buffers(self) -> int:
        """Upper bound on simultaneously live fp32 buffers of one tensor's size during a step (from the code)."""
        swept = self.basis == "gaussian" and self.estimator != "hizoo"
        if swept and self.rule.fuse and self.rule.sweepable(self) and self.backend != "torch":
            return 0  # the fused rule sweep: ĝ and Δ live in registers (the torch backend's ops allocate, below)
        # queries: z, basis, scaled basis, perturbation, wide sum; update: combination, basis, product, rule
        # temporaries, weight decay terms, wide sum.
        return 6 + self.rule.transient_buffers

    # -- state --
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Per-tensor rule/estimator state (cloned, fp32), param groups (torch layout: params as indices), and the
        optimizer-wide state: seed, step t, mu, q, estimator, clip, layers_per_step, replay history."""
        index = {id(p): n for n, p in enumerate(self._params())}
        state = {index[id(p)]: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                 for p, s in self.state.items() if isinstance(p, torch.Tensor)}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        zo = {"seed": self.seed, "t": self.t, "mu": self.mu, "q": self.q, "estimator": self.estimator,
              "clip": self.clip, "layers_per_step": self.layers_per_step, **self._extra_state()}
        return {"state": state, "param_groups": groups, "zo": zo}

    def _extra_state(self) -> dict[str, Any]:
        return self.rule.extra_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded state has param groups of sizes "
                             f"{[len(g['params']) for g in groups]}, this optimizer "
                             f"{[len(g['params']) for g in self.param_groups]}")
        params = self._params()
        for own, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    own[k] = v
        self.state.clear()
        for n, s in state_dict["state"].items():
            p = params[int(n)]
            self.state[p] = {k: (v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) else v)
                             for k, v in s.items()}
        zo = state_dict["zo"]
        self.seed, self.t, self.mu, self.q = zo["seed"], zo["t"], zo["mu"], zo["q"]
        self.estimator, self.clip, self.layers_per_step = zo["estimator"], zo["clip"], zo["layers_per_step"]
        self.rule.load_extra_state(self, zo)
