"""zokernels.ZOSVRG: MeZO-SVRG (Gautam et al., ICML 2024) with the model-level interface of the other verbs:
`ZOSVRG(model, anchor_batches, loss_fn).step(batch)`. It lives here, next to the optimizer it wraps (layer 6: a
conventional wrapper; estimators/ may not import optim/). One implementation: a thin wrapper over
zokernels.optim.ZOSVRG (the algorithm, its query order, restore and memory
are documented there), which it feeds with closures loss_fn(model, batch) — one per anchor batch as the full batch,
the step's minibatch as the step closure — and with anchor_every = q, one direction per step (Algorithm 1).

What the wrapper adds: parameter selection (`param_filter`), batch checks, the default loss, errors in this verb's
wording ("... along direction t (seed S) at θ (minibatch step)"), model buffers (e.g. BN running statistics)
restored after every query so queries have no side effects, and an SVRGResult per step.

Memory over inference: the anchor θ̄ (one copy of the selected parameters) and the restore copy (one more); the
anchor gradient ĝ is one scalar and its Philox stream, not a dense vector. (The previous implementation queried
from two scratch copies, 3 copies in all; the optim core perturbs in place from its restore copy.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..estimators.common import LossFn, StepResult, check_step_batch, default_loss, direction_query, loss_source
from ..checks import check_int, check_mu, check_nonneg
from ..estimators.mezo import ParamFilter, select_parameters
from .svrg import ZOSVRG as _CoreSVRG


@dataclass
class SVRGResult(StepResult):
    """anchor: whether this was a full-batch (anchor) step. projected_grad: g_a on anchor steps, the control-variate
    difference g_B(θ) − g_B(θ̄) on minibatch steps. `loss` is (ℓ⁺ + ℓ⁻)/2 at θ (full batch on anchor steps)."""

    anchor: bool = False
    projected_grad: float = 0.0


class _BoundLoss:
    """loss_fn(model, batch) as an optim closure: errors name loss_fn (and the batch), as this verb always did, and
    the model's buffers are restored after the call."""

    def __init__(self, owner: "ZOSVRG", batch: Any):
        self.owner, self.batch = owner, batch
        self.zokernels_source = loss_source(owner.loss_fn)
        self.zokernels_owned = getattr(owner.loss_fn, "zokernels_owned", False)

    def __call__(self) -> Any:
        try:
            return self.owner.loss_fn(self.owner.model, self.batch)
        finally:
            for b, saved in self.owner._saved_buffers:
                b.copy_(saved)


class _LegacyNames(_CoreSVRG):
    """The optim core naming queries as this verb always has: direction t (one direction per step)."""

    def query_name(self, j: int, sign: str, t: int, where: str) -> str:
        return direction_query(t, self.seed, sign, " " + where)


class ZOSVRG:
    """Optimizer-like MeZO-SVRG: `opt.step(batch)` performs one iteration of Algorithm 1, updating the selected
    parameters itself (like mezo_step's default update=True; `.grad` is not used).

    anchor_batches: a list of batches whose mean loss is the full-batch loss (one element for a single batch).
    q: anchor period; lr_anchor: η1; lr: η2; mu: perturbation scale. `lr` and `lr_anchor` may be changed between
    steps (annealing). state_dict()/load_state_dict() make runs resumable. `optimizer`: the zokernels.optim.ZOSVRG
    doing the work.
    """

    def __init__(self, model: torch.nn.Module, anchor_batches: list[Any], loss_fn: LossFn | None = None, *,
                 q: int = 2, lr_anchor: float = 1e-3, lr: float = 1e-6, mu: float = 1e-3,
                 param_filter: str | ParamFilter | None = None, seed: int | None = None,
                 backend: str | None = None):
        if not isinstance(anchor_batches, list):
            raise TypeError("anchor_batches must be a list of batches (mean loss = full-batch loss), got "
                            f"{type(anchor_batches).__name__}; wrap a single batch as [batch]")
        if not anchor_batches:
            raise ValueError("anchor_batches must hold at least one batch")
        for anchor_batch in anchor_batches:
            check_step_batch(anchor_batch, custom_loss=loss_fn is not None)
        self.model, self.anchor_batches = model, anchor_batches
        self.custom_loss = loss_fn is not None
        self.loss_fn = loss_fn or default_loss
        params = [p for _, p in select_parameters(model, param_filter)]
        self._saved_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.optimizer = _LegacyNames(params, lr=check_nonneg("lr", lr), mu=check_mu(mu),
                                      full_batch=[_BoundLoss(self, b) for b in anchor_batches],
                                      anchor_every=check_int("q", q),
                                      lr_anchor=check_nonneg("lr_anchor", lr_anchor), seed=seed, backend=backend)

    # the hyperparameters and state, read from (and written to) the optim core
    q = property(lambda self: self.optimizer.anchor_every)
    mu = property(lambda self: self.optimizer.mu)
    seed = property(lambda self: self.optimizer.seed)
    t = property(lambda self: self.optimizer.t)
    anchor = property(lambda self: [self.optimizer.state[p]["anchor"] for p in self.optimizer._params()],
                      doc="θ̄: the anchor parameters (the optimizer's stored copies)")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.param_groups[0]["lr"] = check_nonneg("lr", value)

    @property
    def lr_anchor(self) -> float:
        return self.optimizer.param_groups[0]["lr_anchor"]

    @lr_anchor.setter
    def lr_anchor(self, value: float) -> None:
        self.optimizer.param_groups[0]["lr_anchor"] = check_nonneg("lr_anchor", value)

    @torch.no_grad()
    def step(self, batch: Any) -> SVRGResult:
        """One iteration; `batch` is the minibatch (unused on anchor steps, which read `anchor_batches`)."""
        anchor = self.optimizer.is_anchor_step(self.optimizer.t)
        if not anchor:
            check_step_batch(batch, self.custom_loss)
        self._saved_buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            loss = self.optimizer.step(_BoundLoss(self, batch))
        finally:
            self._saved_buffers = []
        info = self.optimizer.last_step
        return SVRGResult(loss=loss, num_queries=info.forwards, backend=self.optimizer.backend, seed=self.seed,
                          anchor=anchor, projected_grad=info.projected_grads[0])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" not in state:
            raise ValueError("state is from the previous ZOSVRG implementation (directions z(seed, t), 3 copies); "
                             "its anchor direction cannot be regenerated here: restart the run")
        self.optimizer.load_state_dict(state["optimizer"])
