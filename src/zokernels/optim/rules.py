"""Update rules: what an optimizer does with the estimate ĝ = Σ_j c_j b_j of a step (core.Estimate).

A rule is either
- **linear** (`terms`): Δ = −lr·Σ_k a_k b_k over streams of this or earlier steps; nothing is stored
  (seed-replayed). SGD; momentum with `momentum_buffer="replay"`.
- **elementwise** (`delta`): given ĝ_i materialized in fp32 for tensor i, returns Δ_i (fp32, lr included) and
  advances its fp32 state in place (only after every closure call of the step has succeeded, so a failing closure
  leaves it untouched). Momentum with a dense buffer, Adam, sign.

**Fused** (`sweepable`, `sweep_spec`): on the gaussian basis without a preconditioner, a linear rule, sign, Adam and
dense momentum (SGD's heavy ball, signum; each with weight decay) update every tensor in one Philox sweep from the
restore copy (zokernels.kernels.rule_sweep): ĝ is formed per element in fp32 registers and never materialized, and
the result equals the materialized path (`delta`) bit for bit (tests/test_rule_sweep.py). Param groups that mix
momentum 0 and momentum > 0 take the materialized path (one rule per sweep). `fuse = False` on a rule forces the
materialized path (the path the fused one is tested against).

Adding a rule touches three files: this one (the rule), optimizers.py (the public class, a few lines) and
reference/optim_ref.py (its float64 twin, which tests/test_optim.py then compares automatically).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..checks import check_int, check_unit
from ..kernels.rule_sweep import RuleSpec, rule_delta_torch
from .core import Estimate, StepInfo, f32, scaled_coeff

if TYPE_CHECKING:
    from .core import ZOOptimizer

MOMENTUM_BUFFERS = ("dense", "replay")
Plan = tuple[list[tuple[int, float]], RuleSpec]  # (terms, spec) of one tensor's fused update


def _decay(group: dict[str, Any]) -> float | None:
    """The decoupled weight-decay coefficient −lr·wd of the fused sweep (None: no weight decay)."""
    return -group["lr"] * group["weight_decay"] if group["weight_decay"] != 0.0 else None


def fp32_state(opt: "ZOOptimizer", i: int, *names: str) -> tuple[bool, tuple[torch.Tensor, ...]]:
    """Tensor i's fp32 state tensors `names` (the fused sweep reads and writes them in place), created as zeros the
    first time; also whether they were created just now (the tensor's first step)."""
    p = opt._params()[i]
    state = opt.state[p]
    first = names[0] not in state
    if first:
        for name in names:
            state[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    return first, tuple(state[name] for name in names)


class UpdateRule:
    """Base: stateless, elementwise Δ = −lr·ĝ (subclasses override)."""

    name = "rule"
    linear = False
    stateful = False  # holds per-tensor state (ZOConservative refuses such rules)
    transient_buffers = 1  # fp32 temporaries of one tensor's size live in delta()
    fuse = True  # take the fused rule sweep where sweepable (False: always materialize ĝ)

    def check(self, group: dict[str, Any]) -> None:
        pass

    def state_bytes_per_param(self, opt: "ZOOptimizer") -> int:
        return 0

    def prepare(self, opt: "ZOOptimizer", est: Estimate, info: StepInfo) -> dict[str, Any]:
        return {}

    def commit(self, opt: "ZOOptimizer", est: Estimate, pending: dict[str, Any]) -> None:
        pass

    def terms(self, opt: "ZOOptimizer", est: Estimate, i: int, pending: dict[str, Any]) -> list[tuple[int, float]]:
        raise NotImplementedError

    def delta(self, opt: "ZOOptimizer", g: torch.Tensor, i: int, group: dict[str, Any],
              pending: dict[str, Any]) -> torch.Tensor:
        return g * f32(-group["lr"])

    def sweepable(self, opt: "ZOOptimizer") -> bool:
        """Whether every tensor's update is one fused rule sweep (given the gaussian basis, no preconditioner)."""
        return False

    def sweep_spec(self, opt: "ZOOptimizer", est: Estimate, i: int, group: dict[str, Any],
                   pending: dict[str, Any]) -> Plan:
        """(terms, RuleSpec) of tensor i's fused update; advances the rule's state as `delta` would."""
        raise NotImplementedError

    def extra_state(self, opt: "ZOOptimizer") -> dict[str, Any]:
        return {}

    def load_extra_state(self, opt: "ZOOptimizer", zo: dict[str, Any]) -> None:
        pass


class SGDRule(UpdateRule):
    """θ ← θ − lr·ĝ, or with momentum β: m ← β·m + ĝ (torch.optim.SGD, dampening 0; m = ĝ on a tensor's first
    step), θ ← θ − lr·m.

    momentum_buffer="dense": m is an fp32 tensor per parameter (4 bytes/param), exact.
    momentum_buffer="replay": m is never stored: m_t = Σ_{r<K} β^r ĝ_{t_r} over the tensor's K = replay_window most
    recent active steps, regenerated from their seeds in the update sweep (0 bytes/param, K·q terms per sweep; it
    differs from the dense buffer only by the dropped tail, |β|^K relative to the dense sum's terms)."""

    name = "sgd"

    def __init__(self, momentum_buffer: str = "dense", replay_window: int = 32):
        if momentum_buffer not in MOMENTUM_BUFFERS:
            raise ValueError(f"momentum_buffer must be one of {MOMENTUM_BUFFERS}, got {momentum_buffer!r}")
        self.momentum_buffer = momentum_buffer
        self.replay_window = check_int("replay_window", replay_window, 1)
        self.groups: list[dict[str, Any]] = []
        self.history: list[tuple[int, tuple[int, ...], tuple[float, ...]]] = []  # (t, active, coefficients)

    def check(self, group: dict[str, Any]) -> None:
        group["momentum"] = check_unit("momentum", group.get("momentum", 0.0))
        self.groups.append(group)

    @property
    def dense(self) -> bool:
        return self.momentum_buffer == "dense" and any(g["momentum"] != 0.0 for g in self.groups)

    @property
    def linear(self) -> bool:  # type: ignore[override]
        return not self.dense

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return any(g["momentum"] != 0.0 for g in self.groups)

    def state_bytes_per_param(self, opt: "ZOOptimizer") -> int:
        return 4 if self.dense else 0

    def sweepable(self, opt: "ZOOptimizer") -> bool:
        # a dense buffer fuses when every group has one (a group without momentum would need a second rule)
        return self.linear or all(g["momentum"] != 0.0 for g in self.groups)

    def sweep_spec(self, opt: "ZOOptimizer", est: Estimate, i: int, group: dict[str, Any],
                   pending: dict[str, Any]) -> Plan:
        if self.dense:
            hyper, buffer = self._advance(opt, i, group)
            return est.terms(), RuleSpec("momentum", hyper, _decay(group), (buffer,))
        lr = opt._update_lr(group)
        terms = [(s, scaled_coeff(a, lr)) for s, a in self.terms(opt, est, i, pending)]
        return terms, RuleSpec("linear", decay=_decay(group))

    def _advance(self, opt: "ZOOptimizer", i: int, group: dict[str, Any]) -> tuple[tuple[float, ...], torch.Tensor]:
        """kernels.rule_sweep's "momentum" scalars (β, first, −lr) of tensor i and its fp32 buffer, created as zeros
        on the tensor's first step (first = 1: the rule then writes m = ĝ, torch SGD's first-step buffer)."""
        first, (buffer,) = fp32_state(opt, i, "momentum_buffer")
        return (f32(group["momentum"]), 1.0 if first else 0.0, f32(-group["lr"])), buffer

    def prepare(self, opt: "ZOOptimizer", est: Estimate, info: StepInfo) -> dict[str, Any]:
        if self.momentum_buffer != "replay" or not self.stateful:
            return {}
        history = self.history + [(info.step, tuple(est.active), tuple(est.coefficients))]
        return {"history": history}

    def commit(self, opt: "ZOOptimizer", est: Estimate, pending: dict[str, Any]) -> None:
        if "history" not in pending:
            return
        history, keep, seen = pending["history"], [], {}
        for entry in reversed(history):  # keep an entry while some tensor still counts it among its K latest
            needed = False
            for i in entry[1]:
                seen[i] = seen.get(i, 0) + 1
                needed |= seen[i] <= self.replay_window
            if needed:
                keep.append(entry)
        self.history = keep[::-1]

    def terms(self, opt: "ZOOptimizer", est: Estimate, i: int, pending: dict[str, Any]) -> list[tuple[int, float]]:
        if "history" not in pending:
            return est.terms(-1.0)
        from .core import direction_stream

        beta = opt._group_of()[i]["momentum"]
        out, r = [], 0
        for t, active, coeffs in reversed(pending["history"]):
            if i not in active:
                continue
            out += [(direction_stream(t, j), -(beta ** r) * c) for j, c in enumerate(coeffs)]
            r += 1
            if r == self.replay_window:
                break
        return out

    def delta(self, opt: "ZOOptimizer", g: torch.Tensor, i: int, group: dict[str, Any],
              pending: dict[str, Any]) -> torch.Tensor:
        if group["momentum"] == 0.0:
            return g * f32(-group["lr"])
        hyper, buffer = self._advance(opt, i, group)
        return rule_delta_torch("momentum", g, hyper, (buffer,))

    def extra_state(self, opt: "ZOOptimizer") -> dict[str, Any]:
        return {"history": [(t, list(a), list(c)) for t, a, c in self.history],
                "momentum_buffer": self.momentum_buffer, "replay_window": self.replay_window}

    def load_extra_state(self, opt: "ZOOptimizer", zo: dict[str, Any]) -> None:
        self.history = [(int(t), tuple(a), tuple(c)) for t, a, c in zo.get("history", [])]
        self.momentum_buffer = zo.get("momentum_buffer", self.momentum_buffer)
        self.replay_window = zo.get("replay_window", self.replay_window)


class SignRule(UpdateRule):
    """ZO-signSGD (Liu et al. 2019): θ ← θ − lr·sign(ĝ); with momentum β (signum): m ← β·m + (1 − β)·ĝ (dense fp32,
    4 bytes/param, m = 0 initially), θ ← θ − lr·sign(m). sign(0) = 0."""

    name = "sign"
    transient_buffers = 2

    def __init__(self) -> None:
        self.groups: list[dict[str, Any]] = []

    def check(self, group: dict[str, Any]) -> None:
        group["momentum"] = check_unit("momentum", group.get("momentum", 0.0))
        self.groups.append(group)

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return any(g["momentum"] != 0.0 for g in self.groups)

    def state_bytes_per_param(self, opt: "ZOOptimizer") -> int:
        return 4 if self.stateful else 0

    def sweepable(self, opt: "ZOOptimizer") -> bool:
        # one rule per sweep: every group without momentum ("sign") or every group with it ("sign_momentum")
        return len({g["momentum"] != 0.0 for g in self.groups}) <= 1

    def sweep_spec(self, opt: "ZOOptimizer", est: Estimate, i: int, group: dict[str, Any],
                   pending: dict[str, Any]) -> Plan:
        if group["momentum"] == 0.0:
            return est.terms(), RuleSpec("sign", (-group["lr"],), _decay(group))
        hyper, buffer = self._advance(opt, i, group)
        return est.terms(), RuleSpec("sign_momentum", hyper, _decay(group), (buffer,))

    def _advance(self, opt: "ZOOptimizer", i: int, group: dict[str, Any]) -> tuple[tuple[float, ...], torch.Tensor]:
        """kernels.rule_sweep's "sign_momentum" scalars (β, 1 − β, −lr) of tensor i and its fp32 buffer (zeros at
        first)."""
        _, (buffer,) = fp32_state(opt, i, "momentum_buffer")
        beta = group["momentum"]
        return (f32(beta), f32(1.0 - beta), f32(-group["lr"])), buffer

    def delta(self, opt: "ZOOptimizer", g: torch.Tensor, i: int, group: dict[str, Any],
              pending: dict[str, Any]) -> torch.Tensor:
        if group["momentum"] == 0.0:
            return rule_delta_torch("sign", g, (f32(-group["lr"]),))
        hyper, buffer = self._advance(opt, i, group)
        return rule_delta_torch("sign_momentum", g, hyper, (buffer,))


class AdamRule(UpdateRule):
    """ZO-Adam (ZO-AdaMM, Chen et al. 2019, with Adam's bias correction): per tensor and active step k,
    m ← β1·m + (1 − β1)·ĝ, v ← β2·v + (1 − β2)·ĝ², θ ← θ − (lr/(1 − β1^k))·m/(√v/√(1 − β2^k) + ε).
    m and v are dense fp32 (8 bytes/param): v is not linear in the directions, so it cannot be replayed in one
    sweep (replaying it would regenerate K past estimates per element per step)."""

    name = "adam"
    stateful = True
    transient_buffers = 4

    def check(self, group: dict[str, Any]) -> None:
        betas = group.get("betas", (0.9, 0.999))
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        group["betas"] = (check_unit("betas[0]", betas[0]), check_unit("betas[1]", betas[1]))
        eps = group.get("eps", 1e-8)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        group["eps"] = float(eps)

    def state_bytes_per_param(self, opt: "ZOOptimizer") -> int:
        return 8

    def _advance(self, opt: "ZOOptimizer", i: int, group: dict[str, Any]) -> tuple[tuple[float, ...], tuple]:
        """Counts tensor i's step k and returns the fp32 scalars of kernels.rule_sweep's "adam" (β1, 1 − β1, β2,
        1 − β2, √(1 − β2^k), ε, −lr/(1 − β1^k)) and its moments (m, v), created as fp32 zeros on its first step.
        (The √ of v is correctly rounded on every path; torch.sqrt on CPU float32 is not.)"""
        first, moments = fp32_state(opt, i, "exp_avg", "exp_avg_sq")
        state = opt.state[opt._params()[i]]
        state["step"] = 1 if first else state["step"] + 1
        k = state["step"]
        beta1, beta2 = group["betas"]
        hyper = (beta1, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2 ** k), group["eps"],
                 -group["lr"] / (1.0 - beta1 ** k))
        return tuple(f32(h) for h in hyper), moments

    def delta(self, opt: "ZOOptimizer", g: torch.Tensor, i: int, group: dict[str, Any],
              pending: dict[str, Any]) -> torch.Tensor:
        hyper, moments = self._advance(opt, i, group)
        return rule_delta_torch("adam", g, hyper, moments)

    def sweepable(self, opt: "ZOOptimizer") -> bool:
        return True

    def sweep_spec(self, opt: "ZOOptimizer", est: Estimate, i: int, group: dict[str, Any],
                   pending: dict[str, Any]) -> Plan:
        hyper, moments = self._advance(opt, i, group)
        return est.terms(), RuleSpec("adam", hyper, _decay(group), moments)
