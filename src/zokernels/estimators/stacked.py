"""Coordinate-wise ZO estimation through a black box that evaluates many parameter sets in one call.

A simulator or a deployed classifier often takes a batch of inputs at the cost of about one: DeepZero's forward
parallelization sends the base point and K perturbed coordinates as one call. `stacked_cge_step` does that for any
black box given as `stacked_loss(stacked) -> [Q] losses`, where `stacked[i]` holds Q parameter sets of the model's
i-th trainable parameter with a leading query axis ([Q, *param.shape]). Row 0 of every chunk is the unperturbed
point; row 1 + j moves one selected coordinate by +mu. The model's parameters are never written: the queries are
copies.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .cge import coordinate_indices
from ..checks import check_int, check_mu
from .common import (StepResult, check_mask, check_realized_steps, nonfinite_error, note_query_failure,
                     trainable_parameters, write_grads)

StackedLoss = Callable[[list[torch.Tensor]], torch.Tensor]
SOURCE = "stacked_loss"
UNTOUCHED = "the parameters were not modified (the queries are copies)"


def _selected(named: list[tuple[str, torch.nn.Parameter]],
              mask: dict[str, torch.Tensor] | None) -> list[tuple[int, int]]:
    """(parameter position, flat index) of every selected coordinate, in the order cge_step uses."""
    return [(k, i) for k, (name, p) in enumerate(named) if mask is None or name in mask
            for i in coordinate_indices(p, None if mask is None else mask[name]).tolist()]


def _chunk_losses(stacked_loss: StackedLoss, stacked: list[torch.Tensor], queries: int, what: str) -> torch.Tensor:
    """The [Q] float64 losses of one call, or an error (contract of estimators/common.py) naming the chunk."""
    try:
        losses = stacked_loss(stacked)
    except Exception as error:
        raise note_query_failure(error, SOURCE, what, UNTOUCHED)
    if not isinstance(losses, torch.Tensor) or losses.shape != (queries,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"{SOURCE} must return a tensor of shape ({queries},) (one loss per parameter set) in "
                         f"{what}, got {got}; {UNTOUCHED}")
    losses = losses.detach().double()
    if not torch.isfinite(losses).all():
        raise nonfinite_error(SOURCE, losses.tolist(), what, UNTOUCHED)
    return losses


@torch.no_grad()
def stacked_cge_step(model: torch.nn.Module, stacked_loss: StackedLoss, mu: float = 5e-3,
                     mask: dict[str, torch.Tensor] | None = None, max_queries: int = 256,
                     accumulate: bool = False) -> StepResult:
    """Forward-difference CGE over the selected coordinates (all, or `mask`'s), written into `.grad` (added with
    accumulate=True), K = max_queries − 1 coordinates per black-box call.

    Each chunk's differences use that chunk's own base value (row 0), so a black box whose output depends on the
    call's composition stays consistent within a chunk. Steps are the ones realized in the parameter's dtype,
    h = fl(θ + μ) − θ, as cge_step divides by them. Returns the base loss of the last call."""
    named = trainable_parameters(model)
    mu, mask, max_queries = check_mu(mu), check_mask(mask, named), check_int("max_queries", max_queries, 2)  # the base point + one coordinate
    check_realized_steps(named, mask, mu, "forward")
    coords = _selected(named, mask)
    if not coords:
        raise ValueError("mask selects no coordinates")
    grads = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for _, p in named]
    per_call, base, queries = max_queries - 1, float("nan"), 0
    for first in range(0, len(coords), per_call):
        chunk = coords[first:first + per_call]
        stacked = [p.detach().unsqueeze(0).repeat(1 + len(chunk), *([1] * p.dim())) for _, p in named]
        realized = torch.empty(len(chunk), dtype=torch.float64)
        for j, (k, i) in enumerate(chunk):
            row = stacked[k][1 + j].view(-1)
            before = row[i].clone()
            row[i] = before + mu
            realized[j] = (row[i] - before).double().item()
        what = f"the call of coordinates {first}..{first + len(chunk) - 1} (+mu queries, row 0 the base point)"
        losses = _chunk_losses(stacked_loss, stacked, 1 + len(chunk), what)
        base, queries = losses[0].item(), queries + 1 + len(chunk)
        estimates = (losses[1:] - losses[0]) / realized
        for j, (k, i) in enumerate(chunk):
            grads[k].view(-1)[i] = estimates[j]
    write_grads([p for _, p in named], grads, accumulate)
    return StepResult(loss=base, num_queries=queries, backend="torch", num_coordinates=len(coords), engine="stacked")
