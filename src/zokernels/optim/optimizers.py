"""The public optimizers. Each is a torch.optim.Optimizer with `step(closure)`; see core.py for the step and
rules.py for the updates. Memory is stated as extra bytes per trainable parameter element over inference
(s = bytes of the parameter dtype; every optimizer holds a restore copy of the active tensors during a step so a
failing closure leaves everything bit-identical), plus transient fp32 buffers of O(largest tensor) where the update
is materialized (`memory_formula()` gives the numbers; bench/zo_optimizers.py measures them)."""
from __future__ import annotations

from typing import Any

import torch

from ..checks import check_int, check_unit
from .core import ClosureScope, Directions, Estimate, StepInfo, ZOOptimizer, f32
from .rules import AdamRule, SGDRule, SignRule

__all__ = ["ZOSGD", "ZOAdam", "ZOSignSGD", "ZOConservative", "FZOO", "HiZOO", "LeZO"]

_SHARED = """mu: perturbation scale; q: directions per step; estimator: 'central' (2q forwards; MeZO for q = 1) or
    'forward' (q directions sharing one base evaluation: q + 1 forwards); clip: clamp each projected gradient g_j to
    [−clip, clip]; weight_decay: decoupled (θ ← θ − lr·wd·θ); layers_per_step: LeZO-style sampling (k layers
    perturbed and updated per step; a layer is a param group when there are several, else a tensor); seed: the
    Philox key of every direction (drawn from torch's RNG when None); backend: sweep backend (None: by device)."""


class ZOSGD(ZOOptimizer):
    """ZO-SGD (MeZO's update with the default central estimator and q = 1), optionally with momentum.

    θ ← θ − lr·ĝ, ĝ = (1/q)Σ_j g_j z_j; momentum β: m ← β·m + ĝ, θ ← θ − lr·m (momentum_buffer 'dense' or
    'replay', see rules.SGDRule).

    Memory (bytes/param): s (restore copy) without momentum or with momentum_buffer='replay' (the update is one
    Philox sweep, nothing materialized); s + 4 with a dense momentum buffer (+ transient fp32 buffers).
    """

    __doc__ += "\n    " + _SHARED

    def __init__(self, params: Any, lr: float, mu: float = 1e-3, q: int = 1, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, estimator: str = "central", momentum_buffer: str = "dense",
                 replay_window: int = 32, clip: float | None = None, layers_per_step: int | None = None,
                 seed: int | None = None, backend: str | None = None):
        self.rule = SGDRule(momentum_buffer, replay_window)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, mu=mu, q=q,
                         estimator=estimator, clip=clip, layers_per_step=layers_per_step, seed=seed,
                         backend=backend)


class LeZO(ZOSGD):
    """LeZO (layer-wise sparse ZO-SGD): ZOSGD that perturbs and updates only `layers_per_step` randomly drawn layers
    per step (Philox-drawn, see core.py). Memory (bytes/param): s × (fraction of parameters in the active layers,
    at most the largest k layers) — the restore copy covers only active tensors; no state."""

    def __init__(self, params: Any, lr: float, layers_per_step: int, mu: float = 1e-3, q: int = 1, **kwargs: Any):
        super().__init__(params, lr, mu, q, layers_per_step=layers_per_step, **kwargs)


class ZOAdam(ZOOptimizer):
    """ZO-Adam (ZO-AdaMM): Adam moments of the ZO estimate ĝ (rules.AdamRule), bias-corrected.

    Memory (bytes/param): s + 8 (fp32 m and v; dense, not seed-replayable since v is quadratic in ĝ); the update
    is one fused rule sweep on the gaussian basis (no transient buffers), else + transient fp32 buffers.
    """

    __doc__ += "\n    " + _SHARED

    def __init__(self, params: Any, lr: float = 1e-3, mu: float = 1e-3, q: int = 1,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 estimator: str = "central", clip: float | None = None, layers_per_step: int | None = None,
                 seed: int | None = None, backend: str | None = None):
        self.rule = AdamRule()
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, mu=mu, q=q,
                         estimator=estimator, clip=clip, layers_per_step=layers_per_step, seed=seed,
                         backend=backend)


class ZOSignSGD(ZOOptimizer):
    """ZO-signSGD: θ ← θ − lr·sign(ĝ) (with momentum β: sign of m ← β·m + (1 − β)·ĝ; rules.SignRule).

    Memory (bytes/param): s without momentum (one fused rule sweep on the gaussian basis); s + 4 with momentum
    + transient fp32 buffers (ĝ materialized per tensor).
    """

    __doc__ += "\n    " + _SHARED

    def __init__(self, params: Any, lr: float, mu: float = 1e-3, q: int = 1, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, estimator: str = "central", clip: float | None = None,
                 layers_per_step: int | None = None, seed: int | None = None, backend: str | None = None):
        self.rule = SignRule()
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, mu=mu, q=q,
                         estimator=estimator, clip=clip, layers_per_step=layers_per_step, seed=seed,
                         backend=backend)


class ZOConservative(ZOOptimizer):
    """ZO-SGD-Cons (ZO-Bench): ZO-SGD whose step is kept only if the loss does not increase: ℓ_0 = ℓ(θ) is evaluated
    (shared with the 'forward' estimator), then ℓ(θ_new); if ℓ(θ_new) > ℓ_0 the parameters are restored bit for
    bit. Forwards: 2q + 2 (central) or q + 2 (forward). `sign=True` takes ZO-signSGD steps instead.

    Memory (bytes/param): s (restore copy, which is also the rejected step's restore); the update is a fused
    sweep on the gaussian basis (no transient buffers); no state (a stateful rule cannot be made conservative without a second state copy).
    """

    __doc__ += "\n    " + _SHARED
    needs_base = True

    def __init__(self, params: Any, lr: float, mu: float = 1e-3, q: int = 1, weight_decay: float = 0.0, *,
                 sign: bool = False, estimator: str = "central", clip: float | None = None,
                 layers_per_step: int | None = None, seed: int | None = None, backend: str | None = None):
        self.rule = SignRule() if sign else SGDRule()
        super().__init__(params, {"lr": lr, "momentum": 0.0, "weight_decay": weight_decay}, mu=mu, q=q,
                         estimator=estimator, clip=clip, layers_per_step=layers_per_step, seed=seed,
                         backend=backend)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group.get("momentum", 0.0) != 0.0:
            raise ValueError("ZOConservative takes no momentum: a rejected step would have to restore the buffer")

    def _accept(self, queries: ClosureScope, info: StepInfo, active: list[int], backup: list[torch.Tensor]) -> bool:
        info.candidate_loss = queries.closure_loss(f"the candidate update of step {info.step} (ZO-conservative)")
        return info.candidate_loss <= info.loss


class FZOO(ZOOptimizer):
    """FZOO (Dang et al. 2025): n one-sided Rademacher directions u_j = sign(z_j) sharing ℓ_0 = ℓ(θ),
    σ = population std of the n perturbed losses, θ ← θ − (lr/(n·σ))·Σ_j (ℓ(θ + μu_j) − ℓ_0)·u_j (σ = 0: no
    update). n + 1 forwards per step (run one after another here; the paper batches them into one forward).

    momentum (optional, rules.SGDRule on the normalized estimate): 'dense' (+4 bytes/param) or 'replay'.
    Memory (bytes/param): s (+ 4 with dense momentum) + transient fp32 buffers (the ±1 basis is materialized per
    tensor from the Philox z; nothing is stored).
    """

    basis = "rademacher"

    def __init__(self, params: Any, lr: float, mu: float = 1e-3, n: int = 8, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, momentum_buffer: str = "dense", replay_window: int = 32,
                 layers_per_step: int | None = None, seed: int | None = None, backend: str | None = None):
        self.rule = SGDRule(momentum_buffer, replay_window)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, mu=mu,
                         q=check_int("n", n, 2), estimator="fzoo", layers_per_step=layers_per_step, seed=seed,
                         backend=backend)


class HiZOO(ZOOptimizer):
    """HiZOO (Zhao et al., ICLR 2025): SPSA preconditioned by a diagonal Hessian estimate H (fp32, H_0 = 1), in the
    form of the authors' code. Per step, with s = 1/√H elementwise and κ_j = |ℓ⁺_j + ℓ⁻_j − 2ℓ_0|/(2μ²):

        ℓ_0 = ℓ(θ),  ℓ±_j = ℓ(θ ± μ·s_t⊙z_j),  g_j = (ℓ⁺_j − ℓ⁻_j)/(2μ)
        H_{t+1} = (1 − α)·H_t + α·H_t⊙(1/q)Σ_j κ_j z_j²          (α = hessian_smoothing)
        θ ← θ − lr·s_{t+1}⊙(1/q)Σ_j g_j z_j

    2q + 1 forwards per step. Memory (bytes/param): s + 4 (H; dense, it is state of the curvature, not of the
    directions) + transient fp32 buffers (the scaled directions are materialized per tensor).
    """

    estimator_state_bytes = 4

    def __init__(self, params: Any, lr: float, mu: float = 1e-3, q: int = 1, hessian_smoothing: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0, *, clip: float | None = None,
                 layers_per_step: int | None = None, seed: int | None = None, backend: str | None = None):
        self.rule = SGDRule("dense")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, mu=mu, q=q,
                         estimator="hizoo", clip=clip, layers_per_step=layers_per_step, seed=seed,
                         backend=backend)
        self.hessian_smoothing = check_unit("hessian_smoothing", hessian_smoothing)
        for p in self._params():
            self.state[p]["hessian"] = torch.ones(p.shape, dtype=torch.float32, device=p.device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "t"):  # after __init__: the new tensors start at H = 1 like the others
            for p in self.param_groups[-1]["params"]:
                self.state[p]["hessian"] = torch.ones(p.shape, dtype=torch.float32, device=p.device)

    def _inv_sqrt(self, i: int) -> torch.Tensor:
        """fl32(1/fl32(√H)). torch's fp32 sqrt on CPU is not always correctly rounded (1 ulp off, measured), so √H is
        taken in fp64 and rounded to fp32: an fp64 sqrt within 1 ulp rounds to the correctly rounded fp32 root
        (an fp32 root is never closer than 2 fp64 ulps to an fp32 midpoint), which the twin reproduces bit for bit."""
        h = self.state[self._params()[i]]["hessian"]
        return torch.ones_like(h) / torch.sqrt(h.double()).float()

    def _directions(self, params: list[torch.Tensor], offsets: list[int], t: int) -> Directions:
        return Directions(params, offsets, self.seed, t, self.backend, "gaussian", scale=self._inv_sqrt)

    def _prepare_update(self, est: Estimate, info: StepInfo) -> dict[str, Any]:
        """H_{t+1} in place (no closure call follows), then the update reads raw z and s_{t+1}."""
        dirs, alpha, q = est.directions, self.hessian_smoothing, self.q
        for i in est.active:
            h = self.state[self._params()[i]]["hessian"]
            acc = torch.zeros_like(h)
            for j, kappa in enumerate(info.curvature):
                z = dirs.z(i, dirs.stream(j))
                acc = acc + (z * z) * f32(kappa / q)
            h.copy_(h * f32(1.0 - alpha) + (h * acc) * f32(alpha))
        est.directions = Directions(dirs.params, dirs.offsets, dirs.seed, dirs.t, dirs.backend, "gaussian")
        est.precondition = self._inv_sqrt
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "hessian_smoothing": self.hessian_smoothing}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        self.hessian_smoothing = state_dict["zo"]["hessian_smoothing"]
