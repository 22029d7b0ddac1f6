"""MeZO (Malladi et al. 2023): SPSA with seed-regenerated directions, every perturbation one multi-tensor Philox
sweep over the selected parameters. Direction j of a step is the stream z(seed, j, ·) over the selected
parameters read as one flat vector, so z is regenerated from (seed, j), never stored.

Two ways of forming θ ± μz (`mode`):
- "exact" (default): one dual sweep writes θ + μz and θ − μz into two scratch copies and the queries swap the
  parameters' storage to them (O(1)); θ itself is never written until the update. A loss that raises or returns NaN
  therefore leaves θ bit-identical, each query point is rounded once (fl(θ ± fl(μz))), and the update
  θ ← fl(θ + fl(Σ_j c_j z_j)), c_j = fl32(−lr·g_j/q), equals the per-tensor reference bit for bit. Memory: two
  extra copies of the selected parameters; z is generated 2 times per direction.
- "inplace" (MeZO's memory: no copy): θ += μz; θ −= 2μz; θ += (μ − lr·g)z, as in the MeZO code but one sweep per
  phase (restores and the next direction's perturbation share a sweep when q > 1). Each sweep rounds once
  (fp16/bf16: adds in fp32, then rounds to the dtype) and fl32(−2μ)z = −2·fl32(μ)z exactly, so for q = 1, per
  element, with c = −lr·g: |θ_new − (θ + cz)| ≤ ½[ulp(θ⁺) + ulp(θ⁻) + ulp(θ_new)] + 2⁻²³(|μz| + |(μ + c)z|) + h, and
  against the exact mode's update θ_ref = fl(θ + fl32(c)z) add ½ulp(θ_ref) + 2⁻²³|cz| (+ 2⁻²⁴|θ_ref| in half types);
  h = 2⁻²⁴(|θ⁺| + |θ⁻| + |θ_new|) for fp16/bf16, 0 for fp32 (tested on random fp32/fp16/bf16 parameters, where the
  error reaches 60–99.6 % of the bound). On failure the pending perturbation is undone by one sweep and the z terms
  cancel exactly: |θ_restored − θ| ≤ ½[ulp(θ⁺) + ulp(θ_restored)] if ℓ⁺ failed, ½[ulp(θ⁺) + ulp(θ⁻) +
  ulp(θ_restored)] if ℓ⁻ failed (+ h; tested). In bf16 that noise is ~100× a typical update: use "exact".
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import backends, philox
from ..checks import check_bool, check_choice, check_int, check_mu, check_nonneg
from .common import (RESTORED, LossFn, StepResult, check_step_batch, default_loss, direction_query,
                     trainable_parameters, write_grads)
from .scope import KeptCopies, QueryScope

MODES = ("exact", "inplace")
PRESET_FILTERS = ("all", "bias", "norm", "bias_norm")
ParamFilter = Callable[[str, torch.nn.Parameter], bool]


def _is_norm(model: torch.nn.Module) -> dict[str, bool]:
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
    out = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            out[f"{module_name}.{name}" if module_name else name] = (
                isinstance(module, norms) or "layernorm" in type(module).__name__.lower()
                or "rmsnorm" in type(module).__name__.lower())
    return out


def select_parameters(model: torch.nn.Module, param_filter: str | ParamFilter | None
                      ) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters kept by `param_filter`: None/'all', 'bias', 'norm' (LayerNorm/BatchNorm/GroupNorm/RMSNorm
    weights and biases), 'bias_norm', or a callable (name, param) -> bool."""
    named = trainable_parameters(model)
    if param_filter is None or param_filter == "all":
        keep = named
    elif isinstance(param_filter, str):
        check_choice("param_filter", param_filter, PRESET_FILTERS)
        norm = _is_norm(model)
        want_bias, want_norm = param_filter in ("bias", "bias_norm"), param_filter in ("norm", "bias_norm")
        keep = [(n, p) for n, p in named if (want_bias and n.endswith("bias")) or (want_norm and norm.get(n))]
    elif callable(param_filter):
        keep = [(n, p) for n, p in named if param_filter(n, p)]
    else:
        raise TypeError(f"param_filter must be None, one of {PRESET_FILTERS} or a callable (name, param) -> bool, "
                        f"got {type(param_filter).__name__}")
    if not keep:
        raise ValueError(f"param_filter={param_filter!r} selected no trainable parameter of the model")
    devices = {p.device for _, p in keep}
    if len(devices) != 1:
        raise ValueError(f"selected parameters must be on one device, got {sorted(map(str, devices))}")
    for name, p in keep:
        if not p.is_contiguous():
            raise ValueError(f"parameter {name!r} is not contiguous; the sweeps write storage in order "
                             "(call .data = .data.contiguous() first)")
    return keep


class MeZOWorkspace(KeptCopies):
    """The exact mode's two scratch copies θ⁺, θ⁻, kept from one mezo_step to the next: pass the same object as
    `workspace=` to every step of a loop. On a CPU this saves writing them into fresh pages every step (measured on
    the MiniLM classifier, 22.6M parameters, one thread: the dual sweep and the update take 0.157 s into fresh
    copies and 0.067 s into kept ones; see KeptCopies). The copies are held (2 × the selected parameters' bytes)
    until `release()` or until the object is dropped; they are reallocated when the selected parameters change."""

    def __init__(self) -> None:
        super().__init__(sets=2)

    @property
    def plus(self) -> list[torch.Tensor]:
        return self.copies[0]

    @property
    def minus(self) -> list[torch.Tensor]:
        return self.copies[1]


class Perturbation:
    """The selected parameters, their stream offsets and (exact mode) the two scratch copies θ⁺, θ⁻ (from
    `workspace` when one is given, else allocated for this step)."""

    def __init__(self, model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]], backend: str | None,
                 scratch: bool, workspace: MeZOWorkspace | None = None):
        self.model, self.named = model, named
        self.params = [p for _, p in named]
        self.offsets = philox.stream_offsets(self.params)
        self.backend = backends.resolve_backend(backend, self.params[0].device)
        self.plus: list[torch.Tensor] = []
        self.minus: list[torch.Tensor] = []
        if workspace is not None and not isinstance(workspace, MeZOWorkspace):
            raise TypeError(f"workspace must be a zokernels.MeZOWorkspace or None, got {type(workspace).__name__}")
        if scratch:
            self.plus, self.minus = (workspace or MeZOWorkspace()).like(self.params)

    def write_points(self, center: list[torch.Tensor], seed: int, stream: int, mu: float) -> None:
        """θ⁺ = center + μz, θ⁻ = center − μz in one sweep (z = z(seed, stream))."""
        philox.normal_combination_into(self.plus, center, self.offsets, seed, [(stream, mu)], self.minus,
                                       self.backend)

    @contextlib.contextmanager
    def swapped(self, values: list[torch.Tensor]) -> Iterator[None]:
        """The parameters read `values` inside the block (storage swap, no copy); always swapped back."""
        saved = [p.data for p in self.params]
        try:
            for p, v in zip(self.params, values):
                p.data = v
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.data = s

    def sweep(self, seed: int, terms: list[tuple[int, float]]) -> None:
        philox.add_normal_combination_(self.params, self.offsets, seed, terms, None, self.backend)


INPLACE_RESTORED = ("parameters were restored up to rounding (mode='inplace'; mode='exact' restores them "
                    "bit-identically) and buffers exactly")


def central_difference_exact(ctx: QueryScope, pert: Perturbation, loss_fn: LossFn, batches: list[Any],
                             center: list[torch.Tensor], seed: int, stream: int, mu: float,
                             where: str = "", signs: str = "+-") -> tuple[float, ...]:
    """Mean losses over `batches` at center ± μz(seed, stream), one per sign in `signs` ('+-' both, in that order;
    '+' or '-' one of them); the parameters are swapped, never written. `where` completes the query's name in
    errors (e.g. ' at the anchor θ̄')."""
    pert.write_points(center, seed, stream, mu)
    losses = []
    for sign in signs:
        with pert.swapped(pert.plus if sign == "+" else pert.minus):
            values = [ctx.loss(loss_fn, b, direction_query(stream, seed, sign, where + (
                f", batch {i} of {len(batches)}" if len(batches) > 1 else ""))) for i, b in enumerate(batches)]
        losses.append(sum(values) / len(values))
    return tuple(losses)


Query = tuple[int, str]  # (direction j, '+' or '-'): the loss at θ ± μz(seed, j)


def all_queries(q: int) -> list[Query]:
    """The 2q queries of a MeZO step in the order a single process evaluates them: (0,+), (0,−), (1,+), ..."""
    return [(j, sign) for j in range(q) for sign in "+-"]


def exact_query_losses(ctx: QueryScope, pert: Perturbation, loss_fn: LossFn, batch: Any, seed: int, mu: float,
                       queries: list[Query]) -> list[float]:
    """The losses of `queries` (a run of all_queries(q), in its order) on `batch`, exact mode: θ is never written.
    mezo_step evaluates all of them; a perturbation-parallel rank (zokernels.distributed) a contiguous block."""
    losses: list[float] = []
    for j, group in itertools.groupby(queries, key=lambda query: query[0]):
        signs = "".join(sign for _, sign in group)
        losses.extend(central_difference_exact(ctx, pert, loss_fn, [batch], pert.params, seed, j, mu, signs=signs))
    return losses


def pair_losses(losses: list[float]) -> list[tuple[float, float]]:
    """(ℓ⁺_j, ℓ⁻_j) per direction from the losses of all_queries(q), in that order."""
    return list(zip(losses[0::2], losses[1::2]))


def projected_grads(pairs: list[tuple[float, float]], mu: float) -> list[float]:
    """g_j = (ℓ⁺_j − ℓ⁻_j) / (2μ) in Python float64: the same bits wherever the same losses are combined."""
    return [(plus - minus) / (2.0 * mu) for plus, minus in pairs]


def _inplace_directions(ctx: QueryScope, pert: Perturbation, loss_fn: LossFn, batch: Any, seed: int, q: int,
                        mu: float) -> list[tuple[float, float]]:
    """θ += μz_j; ℓ⁺; θ −= 2μz_j; ℓ⁻ for each j, leaving θ at θ − μz_{q−1} (+ rounding): the caller's final sweep
    restores and updates. The restore of z_j shares the sweep that perturbs along z_{j+1}."""
    pending: list[tuple[int, float]] = []  # what has to be added to return θ to its value
    pairs = []
    try:
        for j in range(q):
            pert.sweep(seed, [(stream, coeff) for stream, coeff in pending] + [(j, mu)])
            pending = [(j, -mu)]
            plus = ctx.loss(loss_fn, batch, direction_query(j, seed, "+"))
            pert.sweep(seed, [(j, -2.0 * mu)])
            pending = [(j, mu)]
            minus = ctx.loss(loss_fn, batch, direction_query(j, seed, "-"))
            pairs.append((plus, minus))
    except BaseException:
        if pending:
            pert.sweep(seed, pending)
        raise
    return pairs


def mezo_update_terms(grads: list[float], lr: float) -> list[tuple[int, float]]:
    q = len(grads)
    return [(j, -lr * g / q) for j, g in enumerate(grads)]


def check_update_args(update: bool, accumulate: bool, mode: str) -> None:
    check_bool("update", update)
    check_bool("accumulate", accumulate)
    if not update and mode != "exact":
        raise ValueError("update=False writes .grad and leaves the parameters bit-identical, which needs "
                         "mode='exact' (mode='inplace' restores them only up to rounding)")
    if accumulate and update:
        raise ValueError("accumulate=True adds the estimate to .grad, which only update=False writes")


def spsa_estimate(pert: Perturbation, seed: int, grads: list[float]) -> list[torch.Tensor]:
    """ĝ = (1/q) Σ_j g_j z(seed, j) per selected parameter (float32, float64 for float64 parameters): one sweep,
    the combination formed in float32 like every sweep."""
    q = len(grads)
    estimates = [torch.zeros(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                             device=p.device) for p in pert.params]
    philox.add_normal_combination_(estimates, pert.offsets, seed, [(j, g / q) for j, g in enumerate(grads)], None,
                                   pert.backend)
    return estimates


def check_step_args(mu: float, lr: float, q: int, mode: str, seed: int | None) -> tuple[float, float, int, int]:
    mu, lr, q = check_mu(mu), check_nonneg("lr", lr), check_int("q", q)
    check_choice("mode", mode, MODES)
    seed = philox.step_seed(seed)
    return mu, lr, q, seed


@torch.no_grad()
def mezo_step(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 1e-3,
              lr: float = 1e-6, seed: int | None = None, q: int = 1, param_filter: str | ParamFilter | None = None,
              *, mode: str = "exact", update: bool = True, accumulate: bool = False,
              backend: str | None = None, workspace: MeZOWorkspace | None = None) -> StepResult:
    """One MeZO step: for each direction j < q, g_j = (ℓ(θ + μz_j) − ℓ(θ − μz_j)) / (2μ) on `batch`, then
    θ ← θ − (lr/q) Σ_j g_j z_j, z_j = z(seed, j) regenerated by the Philox sweeps (never stored).

    update=True (MeZO): the step updates the selected parameters itself and leaves `.grad` alone (no gradient
    memory). update=False: like cge_step and rge_step, it writes the estimate ĝ = (1/q) Σ_j g_j z_j into `.grad`
    of the selected parameters (added to it with accumulate=True), leaves parameters and buffers bit-identical,
    and lets any torch.optim optimizer step (SGD with lr gives update=True's step up to rounding); mode 'exact'
    only, `lr` unused.

    Works on any torch module (Hugging Face models included) with fp32/fp64/fp16/bf16 parameters; `param_filter`
    picks what is tuned (see select_parameters). `mode` 'exact' (bit-exact restore, +2 parameter copies) or
    'inplace' (MeZO's memory); see the module docstring for the rounding each gives. Both queries of a direction
    see the same dropout randomness; buffers are left as they were. `seed=None` draws one (reported).
    `workspace`: a MeZOWorkspace that keeps the exact mode's two copies between steps (on a CPU this saves
    writing them into fresh pages every step; see MeZOWorkspace); unused by mode 'inplace'.
    """
    check_step_batch(batch, custom_loss=loss_fn is not None)
    loss_fn = loss_fn or default_loss
    mu, lr, q, seed = check_step_args(mu, lr, q, mode, seed)
    check_update_args(update, accumulate, mode)
    named = select_parameters(model, param_filter)
    pert = Perturbation(model, named, backend, scratch=mode == "exact", workspace=workspace)
    restored = RESTORED if mode == "exact" else INPLACE_RESTORED
    with QueryScope(model, restored=restored) as ctx:
        if mode == "exact":
            pairs = pair_losses(exact_query_losses(ctx, pert, loss_fn, batch, seed, mu, all_queries(q)))
            grads = projected_grads(pairs, mu)
            terms = mezo_update_terms(grads, lr)
        else:
            pairs = _inplace_directions(ctx, pert, loss_fn, batch, seed, q, mu)
            grads = projected_grads(pairs, mu)
            terms = mezo_update_terms(grads, lr)
            last, coeff = terms[-1]
            terms[-1] = (last, mu + coeff)  # the restore of the last direction joins the update sweep
    return finish_step(pert, seed, pairs, grads, terms, update, accumulate)


def finish_step(pert: Perturbation, seed: int, pairs: list[tuple[float, float]], grads: list[float],
                terms: list[tuple[int, float]], update: bool, accumulate: bool) -> StepResult:
    """After the queries: the update sweep `terms` (update=True) or ĝ into `.grad` (update=False), and the result.
    Every process that holds the same pairs, grads and terms writes the same bits."""
    if not update:
        write_grads(pert.params, spsa_estimate(pert, seed, grads), accumulate)
    elif any(c != 0.0 for _, c in terms):
        pert.sweep(seed, terms)
    q = len(pairs)
    loss = sum((a + b) / 2.0 for a, b in pairs) / q
    return StepResult(loss=loss, num_queries=2 * q, backend=pert.backend, seed=seed, projected_grads=grads)
