"""Coordinate-wise gradient estimation (CGE), the torch-backend evaluation: one in-place coordinate
perturbation and one loss evaluation per query, restored by writing back the saved value.

The incremental engine of zokernels/engine replaces the per-query full forward; this module defines what is
estimated and the conventions every engine follows (realized step, forward/central schemes)."""
from __future__ import annotations

from typing import Any

import torch

from .common import LossFn, coordinate_query, realized_step_error
from .scope import QueryScope


def coordinate_indices(param: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.arange(param.numel())
    return torch.nonzero(mask.reshape(-1).cpu()).flatten()


def _cge_one_parameter(name: str, param: torch.Tensor, indices: torch.Tensor, base_loss: float, mu: float,
                       central: bool, loss_fn: LossFn, batch: Any, scope: QueryScope) -> torch.Tensor:
    error = realized_step_error(name, param, indices, mu, central)
    if error is not None:
        raise error
    flat = param.data.view(-1)
    estimate = torch.zeros(flat.numel(), dtype=torch.float64)
    for i in indices.tolist():
        original = flat[i].item()
        flat[i] = original + mu
        step_up = flat[i].item() - original
        loss_up = scope.loss(loss_fn, batch, coordinate_query(name, i, "+"))
        if central:
            flat[i] = original - mu
            step_down = original - flat[i].item()
            loss_down = scope.loss(loss_fn, batch, coordinate_query(name, i, "-"))
            estimate[i] = (loss_up - loss_down) / (step_up + step_down)
        else:
            estimate[i] = (loss_up - base_loss) / step_up
        flat[i] = original
    return estimate.view_as(param).to(param.dtype)


def naive_parameter_estimator(batch, loss_fn, mu, central, scope: QueryScope, base_loss):
    """A per-parameter naive estimator with the step's scope bound (for engines that delegate some parameters)."""
    def estimate(name, param, indices):
        return _cge_one_parameter(name, param, indices, base_loss, mu, central, loss_fn, batch, scope)
    return estimate


def estimate_each_parameter(named_params, mask, estimate_one) -> tuple[dict[str, torch.Tensor], int]:
    """Runs estimate_one(name, param, flat_indices) on every parameter's selected coordinates; parameters missing
    from the mask get zero. Returns the estimates and the number of coordinates."""
    estimates, n_coordinates = {}, 0
    for name, param in named_params:
        if mask is not None and name not in mask:
            estimates[name] = torch.zeros_like(param)
            continue
        indices = coordinate_indices(param, None if mask is None else mask[name])
        n_coordinates += indices.numel()
        estimates[name] = estimate_one(name, param, indices)
    return estimates, n_coordinates


def cge_estimate(batch: Any, loss_fn: LossFn, mu: float, named_params, mask, scheme: str, scope: QueryScope,
                 base_loss: float) -> tuple[dict[str, torch.Tensor], int]:
    """Estimates for every trainable parameter (zero outside the mask) and the number of coordinates."""
    naive = naive_parameter_estimator(batch, loss_fn, mu, scheme == "central", scope, base_loss)
    return estimate_each_parameter(named_params, mask, naive)
