"""SUPERSEDED: zokernels.ZOSVRG is now src/zokernels/optim/model_svrg.py, a wrapper over zokernels.optim.ZOSVRG (the
one implementation). This class remains only because apps/lm_train.py imports it from here and estimators/ may not
import optim/ (layering); delete this file once lm_train imports `from ..optim.model_svrg import ZOSVRG`.

MeZO-SVRG (Gautam et al., ICML 2024), Algorithm 1 as written:

    t mod q == 0:  ĝ = SPSA estimate on the full batch at θ_t;  θ̄ = θ_t (a real copy);  θ_{t+1} = θ_t − η1 ĝ
    otherwise:     one minibatch B, one z:  θ_{t+1} = θ_t − η2 (ĝ_B(θ_t; z) − ĝ_B(θ̄; z) + ĝ)

Both minibatch estimates use the same z and the same batch (the control variate only cancels noise when they do);
the public code draws two seeds and keeps θ̄ aliased to θ, which this does not copy. Direction t is the stream
z(seed, t); ĝ = g_a · z(seed, t_anchor) is kept as its scalar g_a and its stream, which represents it exactly
(z is regenerated bit-identically), so the update sweep adds −η2 g_a z(seed, t_anchor) in the same pass.

Memory over MeZO-exact: θ̄ (one copy of the selected parameters); the paper's dense ĝ is not needed. Queries use
the exact scheme of mezo.py (two scratch copies), so θ and θ̄ are never perturbed in place and a failing loss
leaves both bit-identical. Total: 3 extra copies of the selected parameters, no gradients or optimizer state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common import LossFn, StepResult, check_mu, check_step_batch, default_loss
from .mezo import (ParamFilter, Perturbation, QueryContext, central_difference_exact, check_lr, check_positive_int,
                   select_parameters)
from ..philox import _check_seed


@dataclass
class SVRGResult(StepResult):
    """anchor: whether this was a full-batch (anchor) step. projected_grad: g_a on anchor steps, the control-variate
    difference g_B(θ) − g_B(θ̄) on minibatch steps. `loss` is (ℓ⁺ + ℓ⁻)/2 at θ (full batch on anchor steps)."""

    anchor: bool = False
    projected_grad: float = 0.0


class ZOSVRG:
    """Optimizer-like MeZO-SVRG: `opt.step(batch)` performs one iteration of Algorithm 1, updating the selected
    parameters itself (like mezo_step's default update=True; `.grad` is not used).

    anchor_batches: a list of batches whose mean loss is the full-batch loss (one element for a single batch).
    q: anchor period; lr_anchor: η1; lr: η2; mu: perturbation scale. `lr` and `lr_anchor` may be changed between
    steps (annealing). state_dict()/load_state_dict() make runs resumable.
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
        self.q = check_positive_int("q", q)
        self.lr_anchor, self.lr = check_lr("lr_anchor", lr_anchor), check_lr("lr", lr)
        self.mu = check_mu(mu)
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else _check_seed("seed", seed)
        self.pert = Perturbation(model, select_parameters(model, param_filter), backend, scratch=True)
        self.anchor = [p.detach().clone() for p in self.pert.params]  # θ̄ = θ_0 until the first anchor step
        self.t = 0
        self.anchor_stream, self.anchor_grad = -1, 0.0

    @torch.no_grad()
    def step(self, batch: Any) -> SVRGResult:
        """One iteration; `batch` is the minibatch (unused on anchor steps, which read `anchor_batches`)."""
        if self.t % self.q != 0:
            check_step_batch(batch, self.custom_loss)
        with QueryContext(self.model, [self.pert.params[0].device]) as ctx:
            if self.t % self.q == 0:
                result = self._anchor_step(ctx)
            else:
                result = self._minibatch_step(ctx, batch)
        self.t += 1
        return result

    def _anchor_step(self, ctx: QueryContext) -> SVRGResult:
        pert, stream = self.pert, self.t
        plus, minus = central_difference_exact(ctx, pert, self.loss_fn, self.anchor_batches, pert.params, self.seed,
                                               stream, self.mu, " on the full batch (anchor step)")
        g = (plus - minus) / (2.0 * self.mu)
        for a, p in zip(self.anchor, pert.params):
            a.copy_(p)
        self.anchor_stream, self.anchor_grad = stream, g
        if self.lr_anchor != 0.0:
            pert.sweep(self.seed, [(stream, -self.lr_anchor * g)])
        return SVRGResult(loss=(plus + minus) / 2.0, num_queries=2 * len(self.anchor_batches),
                          backend=pert.backend, seed=self.seed, anchor=True, projected_grad=g)

    def _minibatch_step(self, ctx: QueryContext, batch: Any) -> SVRGResult:
        pert, stream = self.pert, self.t
        plus, minus = central_difference_exact(ctx, pert, self.loss_fn, [batch], pert.params, self.seed, stream,
                                               self.mu, " at θ (minibatch step)")
        plus_bar, minus_bar = central_difference_exact(ctx, pert, self.loss_fn, [batch], self.anchor, self.seed,
                                                       stream, self.mu, " at the anchor θ̄ (minibatch step)")
        difference = ((plus - minus) - (plus_bar - minus_bar)) / (2.0 * self.mu)
        if self.lr != 0.0:
            pert.sweep(self.seed, [(stream, -self.lr * difference),
                                   (self.anchor_stream, -self.lr * self.anchor_grad)])
        return SVRGResult(loss=(plus + minus) / 2.0, num_queries=4, backend=pert.backend, seed=self.seed,
                          anchor=False, projected_grad=difference)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "seed": self.seed, "q": self.q, "lr": self.lr, "lr_anchor": self.lr_anchor,
                "mu": self.mu, "anchor_stream": self.anchor_stream, "anchor_grad": self.anchor_grad,
                "anchor": [a.clone() for a in self.anchor]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["anchor"]) != len(self.anchor):
            raise ValueError(f"state has {len(state['anchor'])} anchor tensors, this optimizer {len(self.anchor)}")
        for key in ("t", "seed", "q", "lr", "lr_anchor", "mu", "anchor_stream", "anchor_grad"):
            setattr(self, key, state[key])
        for a, saved in zip(self.anchor, state["anchor"]):
            a.copy_(saved)
