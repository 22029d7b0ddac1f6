"""MeZO-SVRG (Gautam et al., ICML 2024, Algorithm 1) on the zokernels.optim core: same closure convention, same
Directions, same restore and error contract as the other optimizers.

Step t with q directions z_j = z(seed, stream(t, j)), anchor period P = `anchor_every`:

    t mod P == 0 (anchor step):  ℓ_F = mean of the full-batch closures;  g^a_j = (ℓ_F(θ_t + μz_j) − ℓ_F(θ_t − μz_j))/(2μ)
                                 ĝ_a = (1/q)Σ_j g^a_j z_j stored;  θ̃ = θ_t stored;  θ_{t+1} = θ_t − η1·ĝ_a
    otherwise (minibatch step):  ℓ = the step's closure (one minibatch), the SAME z_j and batch at θ and θ̃:
                                 d_j = [(ℓ(θ_t + μz_j) − ℓ(θ_t − μz_j)) − (ℓ(θ̃ + μz_j) − ℓ(θ̃ − μz_j))]/(2μ)
                                 θ_{t+1} = θ_t − η2·((1/q)Σ_j d_j z_j + ĝ_a)

η1 = `lr_anchor`, η2 = `lr` (per param group, so torch schedulers anneal η2). The control variate only cancels
noise because both minibatch estimates use the same directions and the same batch: the closure is called four
times per direction on whatever batch it closes over.

Stored between steps (memory, bytes per trainable element, s = bytes of the parameter dtype): the anchor
parameters θ̃ (a copy, s) and the anchor gradient ĝ_a as its q scalars g^a_j/q and their Philox streams (O(q),
not a dense vector: z is regenerated bit-identically, so the update sweep adds −η2·ĝ_a exactly in the same pass as
the minibatch term). During a step: the restore copy (s). Total s + s, no fp32 state; the update is one Philox
sweep (2q terms), nothing materialized.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import check_int, check_nonneg
from ..estimators.common import direction_query
from .core import ClosureScope, Directions, Estimate, StepInfo, ZOOptimizer
from .rules import SGDRule

FullBatch = Callable[[], Any] | Sequence[Callable[[], Any]]


@dataclass
class SVRGEstimate(Estimate):
    """ĝ of this step (coefficients over streams of step t) plus `anchor_terms`, the stored ĝ_a as (stream, g^a_j/q)
    pairs of the anchor step: the update is −lr·(Σ_j c_j z_j + ĝ_a), one sweep."""

    anchor_terms: list[tuple[int, float]] = field(default_factory=list)

    def terms(self, scale: float = 1.0) -> list[tuple[int, float]]:
        return super().terms(scale) + [(s, scale * c) for s, c in self.anchor_terms]


def check_full_batch(full_batch: FullBatch) -> list[Callable[[], Any]]:
    """One closure or a non-empty list of closures whose mean loss is the full-batch loss (chunks)."""
    closures = [full_batch] if callable(full_batch) else full_batch
    if not isinstance(closures, (list, tuple)) or not closures:
        raise TypeError("full_batch must be a closure returning the full-batch loss or a non-empty list of closures "
                        f"whose mean is the full-batch loss, got {type(full_batch).__name__}")
    for k, c in enumerate(closures):
        if not callable(c):
            raise TypeError(f"full_batch[{k}] must be a closure returning a loss, got {type(c).__name__}")
    return list(closures)


class ZOSVRG(ZOOptimizer):
    """MeZO-SVRG (see the module docstring for the algorithm and its memory: s bytes/param for the anchor θ̃ plus
    s for the restore copy; the anchor gradient is q scalars).

    full_batch: a closure returning the full-batch (large-batch) loss at the current parameters, or a list of
    closures whose mean is that loss (chunks of the full batch; each call counts as one forward). It is fixed for
    the optimizer's life, as the full batch of Algorithm 1 is; `step(closure)` takes the minibatch closure, which is
    not called on anchor steps (pass any closure there). Forwards: 2q·len(full_batch) on anchor steps, 4q otherwise.
    lr: η2 (minibatch steps); lr_anchor: η1 (anchor steps); anchor_every: the anchor period (the paper's q);
    mu: perturbation scale; q: directions per step; seed, backend: as for the other optimizers.
    """

    def __init__(self, params: Any, lr: float, full_batch: FullBatch, mu: float = 1e-3, q: int = 1,
                 anchor_every: int = 2, lr_anchor: float = 1e-3, *, seed: int | None = None,
                 backend: str | None = None):
        self.full_batch = check_full_batch(full_batch)
        self.anchor_every = check_int("anchor_every", anchor_every, 1)
        self.rule = SGDRule()
        super().__init__(params, {"lr": lr, "lr_anchor": lr_anchor, "momentum": 0.0, "weight_decay": 0.0}, mu=mu,
                         q=q, estimator="central", seed=seed, backend=backend)
        self.anchor_terms: list[tuple[int, float]] = []
        for p in self._params():  # θ̃ = θ_0 until the first anchor step (step 0) overwrites it
            self.state[p]["anchor"] = p.detach().clone()

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        group["lr_anchor"] = check_nonneg("lr_anchor", group.get("lr_anchor", 1e-3))
        if group["weight_decay"] != 0.0 or group["momentum"] != 0.0:
            raise ValueError("ZOSVRG takes no weight_decay or momentum (Algorithm 1 has neither)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "t"):
            for p in self.param_groups[-1]["params"]:
                self.state[p]["anchor"] = p.detach().clone()

    def is_anchor_step(self, t: int) -> bool:
        return t % self.anchor_every == 0

    def query_name(self, j: int, sign: str, t: int, where: str) -> str:
        """How an error names a query (the estimators.ZOSVRG wrapper keeps its own wording)."""
        return direction_query(j, self.seed, sign, f" (step {t}) {where}")

    def _update_lr(self, group: dict[str, Any]) -> float:
        return group["lr_anchor"] if self.is_anchor_step(self.t) else group["lr"]

    def _pair(self, queries: ClosureScope, dirs: Directions, active: list[int], center: list[torch.Tensor], j: int,
              closures: list[Callable[[], Any]], where: str) -> tuple[float, float]:
        """Mean losses over `closures` at center ± μz_j (written in place into the parameters)."""
        out = []
        for sign, coeff in (("+", self.mu), ("-", -self.mu)):
            dirs.write_points(active, center, j, coeff)
            chunk = (lambda k: f", batch {k} of {len(closures)}") if len(closures) > 1 else (lambda k: "")
            values = [queries.closure_loss(self.query_name(j, sign, dirs.t, where + chunk(k)), c)
                      for k, c in enumerate(closures)]
            out.append(sum(values) / len(values))
        return out[0], out[1]

    def _estimate(self, queries: ClosureScope, dirs: Directions, active: list[int], backup: list[torch.Tensor],
                  info: StepInfo) -> Estimate:
        q, mu = self.q, self.mu
        # every tensor is active (no layer sampling): backup[i] is θ_t of tensor i, read by _prepare_update (after a
        # failed step the reference lives on until the next step overwrites it)
        self._restore_copy = backup
        grads, means = [], []
        if self.is_anchor_step(info.step):
            for j in range(q):
                plus, minus = self._pair(queries, dirs, active, backup, j, self.full_batch,
                                         "on the full batch (anchor step)")
                grads.append((plus - minus) / (2.0 * mu))
                means.append((plus + minus) / 2.0)
            anchor_terms: list[tuple[int, float]] = []
        else:
            minibatch = [queries.loss_fn.closure]
            anchor = [self.state[self._params()[i]]["anchor"] for i in active]
            for j in range(q):
                plus, minus = self._pair(queries, dirs, active, backup, j, minibatch, "at θ (minibatch step)")
                plus_a, minus_a = self._pair(queries, dirs, active, anchor, j, minibatch,
                                             "at the anchor θ̄ (minibatch step)")
                grads.append(((plus - minus) - (plus_a - minus_a)) / (2.0 * mu))
                means.append((plus + minus) / 2.0)
            anchor_terms = list(self.anchor_terms)
        info.loss = sum(means) / q
        info.projected_grads = grads
        info.coefficients = [g / q for g in grads]
        return SVRGEstimate(dirs, active, info.coefficients, anchor_terms=anchor_terms)

    def _prepare_update(self, est: Estimate, info: StepInfo) -> dict[str, Any]:
        """Anchor step: ĝ_a's scalars and θ_t (the restore copy, which holds θ_t while the parameters sit at the
        update), stored only at commit so a failed step leaves θ̃ and ĝ_a untouched."""
        if not self.is_anchor_step(info.step):
            self._restore_copy = None
            return {}
        theta, self._restore_copy = self._restore_copy, None
        return {"anchor_terms": [(est.directions.stream(j), c) for j, c in enumerate(est.coefficients)],
                "theta": theta}

    def _commit_estimator(self, pending: dict[str, Any]) -> None:
        if "anchor_terms" in pending:
            self.anchor_terms = pending["anchor_terms"]
            for p, theta in zip(self._params(), pending["theta"]):
                self.state[p]["anchor"].copy_(theta)

    def memory_formula(self) -> dict[str, int]:
        out = super().memory_formula()
        anchor = sum(p.numel() * p.element_size() for p in self._params())
        out["state"] += anchor
        out["total_bound"] += anchor
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "anchor_every": self.anchor_every, "anchor_terms": list(self.anchor_terms)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        self.anchor_every = state_dict["zo"]["anchor_every"]
        self.anchor_terms = [tuple(x) for x in state_dict["zo"]["anchor_terms"]]
