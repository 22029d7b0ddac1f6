"""The public verbs. Each computes an estimate, writes it into `param.grad` (so any torch.optim optimizer can
step it) and returns a StepResult. No training policy lives here."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from . import backends
from .engine.cge_engine import DENSE_MODES, EngineUnavailable, engine_base, engine_estimates, prepare
from .engine.heads import BUILTIN_OUTPUT_LOSSES, Head, OutputLoss
from .estimators.cge import cge_estimate, naive_parameter_estimator
from .estimators.common import (LossFn, QueryGuard, StepResult, check_choice, check_mask, check_mu, default_loss,
                                evaluate_loss, trainable_parameters)
from .estimators.rge import DISTRIBUTIONS, rge_estimate
from .philox import _check_seed

SCHEMES = ("forward", "central")


def _write_grads(params: list[torch.Tensor], estimates: list[torch.Tensor], accumulate: bool) -> None:
    for p, g in zip(params, estimates):
        g = g.to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = g.clone() if accumulate else g
        elif accumulate:
            p.grad.add_(g)
        else:
            p.grad.copy_(g)


def _base_loss(loss_fn: LossFn, model: torch.nn.Module, batch: Any, guard: QueryGuard,
               update_running_stats: bool) -> float:
    with guard.same_randomness():
        loss = evaluate_loss(loss_fn, model, batch, "the base (unperturbed) evaluation")
    if not update_running_stats:
        guard.restore_buffers()
    return loss


def _model_device(params: list[torch.Tensor]) -> torch.device:
    return params[0].device


ENGINES = ("auto", "delta", "naive")


def _first_of_batch(batch: Any) -> tuple:
    return (batch[0],) if isinstance(batch, (tuple, list)) else (batch,)


def _choose_engine(engine: str, model: torch.nn.Module, loss_fn: LossFn | None, dense_mode: str):
    """The captured model when the delta engine will run, else None (with the reason warned or raised)."""
    if engine == "naive":
        return None
    if loss_fn is not None:
        if engine == "delta":
            raise ValueError("engine='delta' needs output_loss instead of loss_fn: the engine must see the model "
                             "output to carry deltas to the loss")
        return None
    try:
        return prepare(model, dense_mode)
    except EngineUnavailable as reason:
        if engine == "delta":
            raise RuntimeError(f"engine='delta' cannot run this model: {reason}") from None
        warnings.warn(f"zokernels.cge_step: using full evaluations per coordinate because {reason}", stacklevel=3)
        return None


@torch.no_grad()
def cge_step(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3,
             mask: dict[str, torch.Tensor] | None = None, scheme: str = "forward", *,
             output_loss: str | OutputLoss | None = None, model_input: Callable[[Any], tuple] | None = None,
             engine: str = "auto", max_memory_bytes: int | None = None, dense_mode: str = "delta",
             update_running_stats: bool = True,
             accumulate: bool = False, backend: str | None = None) -> StepResult:
    """Coordinate-wise gradient estimate, written into `.grad`.

    Every coordinate i (or only those where `mask[name]` is True; parameters missing from `mask` get zero) is
    perturbed by mu: forward (ℓ(θ+μe_i) − ℓ(θ))/h_i or central (ℓ(θ+μe_i) − ℓ(θ−μe_i))/(2h_i), where h_i is the
    step actually realized in the parameter's dtype.

    The loss is either `loss_fn(model, batch)` (opaque: one full evaluation per query) or
    `output_loss(model(*model_input(batch)), batch)` with output_loss 'cross_entropy' (default), 'mse' or any
    callable, e.g. a black box (set `accepts_query_axis = True` on it to receive [K, B, ...] outputs at once).
    With output_loss, engine='auto' uses the delta engine (exact incremental queries, K coordinates per pass
    within `max_memory_bytes`) whenever the model can be traced, else full evaluations. Once a convolution has
    made a coordinate's change dense, dense_mode='delta' (default) keeps the exact delta rules all the way;
    'perturbed' carries x + δ through the model's ops and forms δ again at the logits (float32 error at the naive
    difference's level, about the same speed on CPU; see docs/engine.md). The traced capture is cached per model
    and re-traced when its modules change.

    The base evaluation updates BN running statistics once (like a training forward) unless
    update_running_stats=False; the queries never do, and parameters are bit-identical afterwards even if the
    loss raises or returns NaN.
    """
    mu = check_mu(mu)
    check_choice("scheme", scheme, SCHEMES)
    check_choice("engine", engine, ENGINES)
    check_choice("dense_mode", dense_mode, DENSE_MODES)
    if loss_fn is not None and output_loss is not None:
        raise ValueError("pass either loss_fn(model, batch) or output_loss(outputs, batch), not both")
    if isinstance(output_loss, str):
        check_choice("output_loss", output_loss, BUILTIN_OUTPUT_LOSSES)
    if max_memory_bytes is not None and (not isinstance(max_memory_bytes, int) or max_memory_bytes < 1):
        raise ValueError(f"max_memory_bytes must be a positive int, got {max_memory_bytes!r}")
    named = trainable_parameters(model)
    mask = check_mask(mask, named)
    params = [p for _, p in named]
    used_backend = backends.resolve_backend(backend, _model_device(params))
    captured = _choose_engine(engine, model, loss_fn, dense_mode)
    model_input = model_input or _first_of_batch
    head = Head(output_loss or "cross_entropy", batch)
    loss_fn = loss_fn or head.as_loss_fn(model_input)
    guard = QueryGuard(model, params)
    try:
        base, estimates, n_coordinates = _cge_queries(model, batch, loss_fn, mu, named, mask, scheme, captured, head,
                                                      model_input, guard, update_running_stats, max_memory_bytes,
                                                      used_backend)
    finally:
        if captured is not None:
            captured.values.clear()  # the capture is cached per model; its activations are not
    _write_grads(params, [estimates[name] for name, _ in named], accumulate)
    queries = 1 + n_coordinates * (2 if scheme == "central" else 1)
    return StepResult(loss=base, num_queries=queries, backend=used_backend, num_coordinates=n_coordinates,
                      engine="delta" if captured is not None else "naive")


def _cge_queries(model, batch, loss_fn, mu, named, mask, scheme, captured, head, model_input, guard,
                 update_running_stats, max_memory_bytes, backend=None):
    """Base loss, estimates and coordinate count of one CGE step, all queries inside the guard. `backend`: the
    resolved backend; 'triton'/'cuda' make the engine run the GPU kernels where they apply."""
    with guard:
        if captured is not None:
            base = engine_base(captured, batch, head, model_input, guard)
            if not update_running_stats:
                guard.restore_buffers()
        else:
            base = _base_loss(loss_fn, model, batch, guard, update_running_stats)
        guard.keep_current_buffers()
        if captured is not None:
            naive = naive_parameter_estimator(model, batch, loss_fn, mu, scheme == "central", guard, base)
            estimates, n_coordinates = engine_estimates(captured, head, mu, named, mask, scheme, base,
                                                        max_memory_bytes, naive, backend)
        else:
            estimates, n_coordinates = cge_estimate(model, batch, loss_fn, mu, named, mask, scheme, guard, base)
    return base, estimates, n_coordinates


@torch.no_grad()
def rge_step(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3, q: int = 1,
             dist: str = "gaussian", seed: int | None = None, *, update_running_stats: bool = True,
             accumulate: bool = False, backend: str | None = None) -> StepResult:
    """Randomized gradient estimate (1/q) Σ_j w (ℓ(θ+μu_j) − ℓ(θ))/μ · u_j, written into `.grad`.

    u_j is regenerated from (seed, j) by the Philox stream, never stored; `seed=None` draws one from torch's
    global generator and reports it in the result. dist: 'gaussian' (u = z, w = 1), 'sphere' (u = z/||z||,
    w = d), 'per_tensor_unit' (u = z/||z|| per tensor, and the DeepZero code's convention of no 1/μ).
    """
    loss_fn = loss_fn or default_loss
    mu = check_mu(mu)
    check_choice("dist", dist, DISTRIBUTIONS)
    if isinstance(q, bool) or not isinstance(q, int):
        raise TypeError(f"q must be an int >= 1, got {type(q).__name__}")
    if q < 1:
        raise ValueError(f"q must be >= 1 (number of random directions), got {q}")
    seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else _check_seed("seed", seed)
    params = [p for _, p in trainable_parameters(model)]
    used_backend = backends.resolve_backend(backend, _model_device(params))
    guard = QueryGuard(model, params)
    with guard:
        base = _base_loss(loss_fn, model, batch, guard, update_running_stats)
        guard.keep_current_buffers()
        estimates = rge_estimate(model, batch, loss_fn, mu, q, dist, seed, params, guard, base, used_backend)
    _write_grads(params, estimates, accumulate)
    return StepResult(loss=base, num_queries=1 + q, backend=used_backend, seed=seed)
