"""The public verbs. Each computes an estimate, writes it into `param.grad` (so any torch.optim optimizer can
step it) and returns a StepResult. No training policy lives here."""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch

from . import backends, philox
from .checks import check_choice, check_int, check_mu
from .engine.cge_engine import DENSE_MODES, RecordingFailed, engine_estimates, record_base
from .engine.heads import BUILTIN_OUTPUT_LOSSES, Head, OutputLoss
from .estimators.cge import estimate_each_parameter, naive_parameter_estimator
from .estimators.common import (BASE_QUERY, LossFn, StepResult, batch_misfit, check_mask, check_realized_steps,
                                check_step_batch, default_loss, note_query_failure, trainable_parameters, write_grads)
from .estimators.rge import DISTRIBUTIONS, rge_estimate
from .estimators.scope import QueryScope
from .kernels.dispatch import KERNEL_BACKENDS

SCHEMES = ("forward", "central")


def _model_device(params: list[torch.Tensor]) -> torch.device:
    return params[0].device


ENGINES = ("auto", "delta", "naive")


def _delta_engine_wanted(engine: str, loss_fn: LossFn | None) -> bool:
    if engine == "naive":
        return False
    if loss_fn is not None:
        if engine == "delta":
            raise ValueError("engine='delta' needs output_loss (or the default loss) instead of loss_fn: the engine "
                             "must see the model's ops and output to carry deltas to the loss")
        return False
    return True


@torch.no_grad()
def cge_step(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3,
             mask: dict[str, torch.Tensor] | None = None, scheme: str = "forward", *,
             output_loss: str | OutputLoss | None = None, model_input: Callable[[Any], Any] | None = None,
             engine: str = "auto", max_memory_bytes: int | None = None, dense_mode: str = "delta",
             update_running_stats: bool = True,
             accumulate: bool = False, backend: str | None = None) -> StepResult:
    """Coordinate-wise gradient estimate, written into `.grad`.

    Every coordinate i (or only those where `mask[name]` is True; parameters missing from `mask` get zero) is
    perturbed by mu: forward (ℓ(θ+μe_i) − ℓ(θ))/h_i or central (ℓ(θ+μe_i) − ℓ(θ−μe_i))/(2h_i), where h_i is the
    step actually realized in the parameter's dtype.

    The batch is `(x, y, *rest)` (the model is called as model(x)), a dict (model(**batch), Hugging Face style) or
    anything `model_input(batch)` turns into positional (tuple) or keyword (dict) arguments. The loss is either
    `loss_fn(model, batch)` (opaque: one full evaluation per query) or `output_loss(outputs, batch)`: by default
    the model's own `outputs.loss` when it computes one, else cross-entropy of the logits against the targets;
    'cross_entropy', 'mse', or any callable, e.g. a black box (set `accepts_query_axis = True` on it to receive
    [K, B, ...] outputs at once).

    With output_loss, engine='auto' uses the delta engine: the base forward is recorded op by op, and each
    coordinate's exact change is carried from the ops that read its parameter to the loss, K coordinates per pass
    within `max_memory_bytes`. What the engine cannot prove exact (Python reading a parameter-dependent value, an
    in-place write it cannot see) falls back to full evaluations with a warning naming the op;
    `zokernels.explain(model, batch)` lists the rule every op gets. Once a convolution has made a coordinate's
    change dense, dense_mode='delta' (default) keeps the exact delta rules all the way; 'perturbed' carries x + δ
    through the model's ops and forms δ again at the logits (see docs/engine.md).

    The base evaluation updates BN running statistics once (like a training forward) unless
    update_running_stats=False; the queries never do, dropout and other random ops draw the base evaluation's
    numbers in every query, and parameters are bit-identical afterwards even if the loss raises or returns NaN.
    """
    check_step_batch(batch, custom_loss=loss_fn is not None)
    mu = check_mu(mu)
    check_choice("scheme", scheme, SCHEMES)
    check_choice("engine", engine, ENGINES)
    check_choice("dense_mode", dense_mode, DENSE_MODES)
    if loss_fn is not None and output_loss is not None:
        raise ValueError("pass either loss_fn(model, batch) or output_loss(outputs, batch), not both")
    if isinstance(output_loss, str):
        check_choice("output_loss", output_loss, BUILTIN_OUTPUT_LOSSES)
    if max_memory_bytes is not None:
        check_int("max_memory_bytes", max_memory_bytes)
    named = trainable_parameters(model)
    mask = check_mask(mask, named)
    check_realized_steps(named, mask, mu, scheme)  # a μ that moves no coordinate would divide by zero
    params = [p for _, p in named]
    used_backend = backends.resolve_backend(backend, _model_device(params))
    head = Head(output_loss, batch)
    use_engine = _delta_engine_wanted(engine, loss_fn)
    loss_fn = loss_fn or head.as_loss_fn(model_input)
    with QueryScope(model, params) as scope:
        kernels = _engine_kernels(backend, used_backend)
        rec, base, fallback = (_engine_base(model, batch, head, model_input, scope, named, engine, dense_mode,
                                            kernels) if use_engine else (None, None, None))
        if rec is None:
            base = scope.loss(loss_fn, batch, BASE_QUERY, keep_buffers=update_running_stats)
            if fallback is not None:  # warned only once a plain forward ran: a batch that does not fit gets its error
                warnings.warn(f"zokernels.cge_step: using full evaluations per coordinate because {fallback}",
                              stacklevel=3)
        elif update_running_stats:
            scope.commit_buffers()
        else:
            scope.restore_buffers()
        naive = naive_parameter_estimator(batch, loss_fn, mu, scheme == "central", scope, base)
        try:
            if rec is not None:
                estimates, n_coordinates, fell_back = engine_estimates(rec, mu, named, mask, scheme,
                                                                       max_memory_bytes, naive, engine == "delta")
                served = "delta+naive" if fell_back else "delta"
            else:
                estimates, n_coordinates = estimate_each_parameter(named, mask, naive)
                served = "naive"
        finally:
            if rec is not None:
                rec.close()  # a tape lives for one step: its cached activations go now
    write_grads(params, [estimates[name] for name, _ in named], accumulate)
    queries = 1 + n_coordinates * (2 if scheme == "central" else 1)
    return StepResult(loss=base, num_queries=queries, backend=used_backend, num_coordinates=n_coordinates,
                      engine=served)


def _engine_kernels(requested: str | None, resolved: str) -> str | None:
    """Which GPU kernels the delta engine calls (None: its own torch rules). A kernel backend asked for (argument or
    ZOKERNELS_BACKEND) is used as asked. Chosen automatically, it is Triton where it runs: on an H200 the CUDA
    first-layer and mixing kernels took 2-2.6x the engine's torch rules and Triton 0.57-0.66x (docs/kernels.md)."""
    if resolved not in KERNEL_BACKENDS:
        return None
    if requested or os.environ.get("ZOKERNELS_BACKEND"):
        return resolved
    return "triton" if backends.status("triton").available else None


def _engine_base(model, batch, head, model_input, scope, named, engine, dense_mode, kernel_backend):
    """(the step's recording, base loss, None), or (None, None, reason) where the delta engine cannot serve this
    step (engine='auto'; the caller warns once the naive base evaluation has run, so a batch that does not fit the
    model gets its error and no fallback warning), with buffers put back for that evaluation. engine='delta'
    raises instead."""
    try:
        base, rec = record_base(model, batch, head, model_input, scope, dict(named), dense_mode, kernel_backend)
    except RecordingFailed as failure:  # the forward raised under the recorder: let a plain forward decide
        if engine == "delta":
            error = failure.__cause__
            if (not head.black_box and isinstance(error, (RuntimeError, IndexError))
                    and not isinstance(error, torch.OutOfMemoryError)):
                raise batch_misfit(error, batch, head.source, BASE_QUERY) from error
            raise note_query_failure(error, head.source, BASE_QUERY)
        reason = f"recording the forward raised {failure}"
    else:
        if not rec.tape.blockers:
            return rec, base, None
        reason = "; ".join(rec.tape.blockers)
        rec.close()
        if engine == "delta":
            raise RuntimeError(f"engine='delta' cannot run this model exactly: {reason}")
    scope.restore_buffers()
    return None, None, reason


@torch.no_grad()
def rge_step(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3, q: int = 1,
             dist: str = "gaussian", seed: int | None = None, *, update_running_stats: bool = True,
             accumulate: bool = False, backend: str | None = None) -> StepResult:
    """Randomized gradient estimate (1/q) Σ_j w (ℓ(θ+μu_j) − ℓ(θ))/μ · u_j, written into `.grad`.

    u_j is regenerated from (seed, j) by the Philox stream, never stored; `seed=None` draws one from torch's
    global generator and reports it in the result. dist: 'gaussian' (u = z, w = 1), 'sphere' (u = z/||z||,
    w = d), 'per_tensor_unit' (u = z/||z|| per tensor, and the DeepZero code's convention of no 1/μ).
    """
    check_step_batch(batch, custom_loss=loss_fn is not None)
    loss_fn = loss_fn or default_loss
    mu = check_mu(mu)
    check_choice("dist", dist, DISTRIBUTIONS)
    q = check_int("q", q)
    seed = philox.step_seed(seed)
    params = [p for _, p in trainable_parameters(model)]
    used_backend = backends.resolve_backend(backend, _model_device(params))
    with QueryScope(model, params) as scope:
        base = scope.loss(loss_fn, batch, BASE_QUERY, keep_buffers=update_running_stats)
        estimates = rge_estimate(batch, loss_fn, mu, q, dist, seed, params, scope, base, used_backend)
    write_grads(params, estimates, accumulate)
    return StepResult(loss=base, num_queries=1 + q, backend=used_backend, seed=seed)
