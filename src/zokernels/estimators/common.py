"""What every estimator shares: the error contract, the default loss, loss evaluation with clear failures, and the
checks of steps, masks and batches (plain argument checks: zokernels.checks; the query scope: estimators/scope.py)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .batching import batch_targets, call_model, check_batch, model_loss, output_logits

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


# ---- the error contract ---------------------------------------------------------------------------------------
# Every verb (cge_step, rge_step, mezo_step, ZOSVRG.step), every loss kind (loss_fn, output_loss, the default loss)
# and every path (the naive evaluations and the delta engine) reports a failed evaluation the same way:
# - bad arguments and malformed batches: ValueError / TypeError naming the argument, before anything is evaluated;
# - a loss that returns NaN or inf: NonFiniteLossError (a FloatingPointError) from `nonfinite_error`;
# - a loss or model that raises: its own exception, unchanged, with one note from `note_query_failure`; except that
#   a RuntimeError / IndexError from zokernels' own loss (the default loss, a built-in output_loss) in the first evaluation of a
#   step, where a batch that does not fit the model shows up, becomes a ValueError naming `batch` (`batch_misfit`).
# Each message names the loss (`source`), the query (`BASE_QUERY`, `coordinate_query`, `direction_query`: which
# evaluation, which coordinate or which direction and seed) and what was restored (`RESTORED`, true by then: the
# query guards restore parameters and buffers bit-identically before the error reaches the caller).
RESTORED = "parameters and buffers were restored"
BASE_QUERY = "the base (unperturbed) evaluation"
NOTE_PREFIX = "zokernels: raised by "


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or inf in a query (`source` and `query` say which); parameters and buffers were restored
    before this was raised."""

    def __init__(self, message: str, source: str = "", query: str = ""):
        super().__init__(message)
        self.source, self.query = source, query


def coordinate_query(name: str, index: int, sign: str = "+") -> str:
    """CGE: the query that moves coordinate `index` (flat) of parameter `name` by +mu or -mu."""
    return f"the {sign}mu query of {name}[{index}]"


def direction_query(direction: int, seed: int, sign: str = "+", where: str = "") -> str:
    """RGE / MeZO / ZO-SVRG: the query at θ ± μu_j, u_j the Philox direction (seed, j); `where` adds the point or
    batch (e.g. ' at the anchor θ̄')."""
    return f"the {sign}mu query along direction {direction} (seed {seed}){where}"


def loss_source(loss_fn: Any) -> str:
    """How errors name a loss: 'loss_fn' for the user's, else what the callable declares (`zokernels_source`:
    'the default loss', 'output_loss', ...). A loss zokernels builds itself (the default loss, a built-in
    output_loss around the model call) also sets `zokernels_owned = True`: then a RuntimeError in the first
    evaluation is reported as a batch that does not fit the model (ValueError)."""
    return getattr(loss_fn, "zokernels_source", "loss_fn")


def is_query_failure(error: BaseException) -> bool:
    """Whether `error` was raised by a loss inside a query (it carries note_query_failure's note): an engine must
    let it through instead of treating it as a limitation of its own."""
    return any(note.startswith(NOTE_PREFIX) for note in getattr(error, "__notes__", ()))


def note_query_failure(error: BaseException, source: str, query: str, restored: str = RESTORED) -> BaseException:
    """Adds the contract's note to an exception raised by `source` in `query` (once: the innermost query wins).
    Returns `error`; call it in an `except` block and re-raise."""
    if not is_query_failure(error):
        error.add_note(f"{NOTE_PREFIX}{source} during {query}; {restored}")
    return error


def nonfinite_error(source: str, value: Any, query: str, restored: str = RESTORED) -> NonFiniteLossError:
    """The NonFiniteLossError for a loss `source` that was `value` (nan, inf, a non-finite tensor) in `query`."""
    return NonFiniteLossError(f"{source} returned {value} during {query}; {restored}", source, query)


def batch_misfit(error: Exception, batch: Any, source: str, query: str, restored: str = RESTORED) -> ValueError:
    """The ValueError for a batch on which zokernels' own loss could not evaluate the model (raise it `from error`)."""
    return ValueError(f"batch does not fit the model: {source} raised {type(error).__name__} during {query} on "
                      f"{describe_batch(batch)}: {error}; {restored}")


def describe_batch(batch: Any) -> str:
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"tensor {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
        return type(value).__name__
    if isinstance(batch, dict):
        return "a dict {" + ", ".join(f"{k!r}: {one(v)}" for k, v in list(batch.items())[:6]) + "}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} (" + ", ".join(one(v) for v in batch[:6]) + ")"
    return one(batch)


def check_step_batch(batch: Any, custom_loss: bool) -> None:
    """batching.check_batch at the start of a step: ValueError / TypeError naming `batch` for batches no verb can
    use (empty, zero samples, None). None passes when the user's loss_fn decides what a batch is."""
    if batch is None and custom_loss:
        return
    check_batch(batch)


@dataclass
class StepResult:
    """What a step did: the one result type of every verb (cge_step, rge_step, mezo_step, stacked_cge_step; the
    zokernels.optim optimizers' `last_step` and ZOSVRG's result extend it).

    `loss`: the loss at the unperturbed parameters (MeZO, which evaluates no base loss: (ℓ⁺ + ℓ⁻)/2 averaged over
    directions, the loss at θ up to O(μ²)). `num_queries`: loss evaluations. `seed`: the Philox seed of random
    directions (drawn when none was given). `projected_grads`: the scalar per random direction (MeZO, the
    optimizers: g_j = (ℓ⁺ − ℓ⁻)/(2μ) or the estimator's own)."""

    loss: float
    num_queries: int
    backend: str
    num_coordinates: int = 0
    seed: int | None = None
    engine: str = ""  # CGE: 'delta' (incremental engine) or 'naive' (one full evaluation per query)
    projected_grads: list[float] = field(default_factory=list)


def default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The loss a user of torch or Hugging Face expects: the model's own `outputs.loss` when it computes one (a
    Hugging Face model given labels), else cross-entropy of the logits against the targets (batch conventions:
    zokernels.estimators.batching)."""
    outputs = call_model(model, batch)
    loss = model_loss(outputs)
    if loss is not None:
        return loss
    return F.cross_entropy(output_logits(outputs), batch_targets(batch, "the default loss (cross-entropy)"))


default_loss.zokernels_source = "the default loss"
default_loss.zokernels_owned = True  # zokernels calls the model: a RuntimeError in the first evaluation is the batch's


def write_grads(params: list[torch.Tensor], estimates: list[torch.Tensor], accumulate: bool) -> None:
    """Writes (or with accumulate adds) each estimate into its parameter's `.grad`, in the parameter's dtype."""
    for p, g in zip(params, estimates):
        g = g.to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = g.clone() if accumulate else g
        elif accumulate:
            p.grad.add_(g)
        else:
            p.grad.copy_(g)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    if not params:
        raise ValueError("model has no trainable floating-point parameters (requires_grad=True); nothing to estimate")
    return params


def realized_step_error(name: str, param: torch.Tensor, indices: torch.Tensor, mu: float,
                        central: bool) -> ValueError | None:
    """The ValueError for a mu that moves no coordinate `indices` (flat) of `param` or overflows its dtype, else
    None. The steps are h = fl(θ ± μ) − θ in the parameter's dtype, as CGE divides by them: μ below half an ulp
    of |θ| gives h = 0 (a division by zero), μ beyond the dtype's range gives inf."""
    if indices.numel() == 0:
        return None
    theta = param.detach().reshape(-1)[indices.to(param.device)].double()
    for sign in ((1.0, -1.0) if central else (1.0,)):
        with torch.no_grad():
            moved = theta + sign * mu
            step = (moved.to(param.dtype).double() - theta) * sign
        step[moved.abs() > torch.finfo(param.dtype).max] = math.inf  # beyond the dtype's range: torch refuses it
        bad = ~torch.isfinite(step) | (step == 0)
        if bad.any():
            j = int(bad.nonzero()[0])
            i, value = int(indices[j]), float(theta[j])
            what = "overflows" if not math.isfinite(float(step[j])) else "does not move"
            return ValueError(f"mu={mu!r} {what} {name}[{i}] = {value!r} in {param.dtype} (θ {'+-'[sign < 0]} mu "
                              f"rounds to {'inf' if what == 'overflows' else 'θ'}): pick mu between about "
                              f"{torch.finfo(param.dtype).eps * max(abs(value), torch.finfo(param.dtype).tiny):.3g} "
                              f"and {torch.finfo(param.dtype).max / 2:.3g} for this parameter")
    return None


def check_realized_steps(named: list[tuple[str, torch.Tensor]], mask: dict[str, torch.Tensor] | None, mu: float,
                         scheme: str) -> None:
    """cge_step's check before any query: every selected coordinate moves by a finite, non-zero step."""
    for name, param in named:
        if mask is not None and name not in mask:
            continue
        indices = torch.arange(param.numel()) if mask is None else torch.nonzero(mask[name].reshape(-1).cpu()).flatten()
        error = realized_step_error(name, param, indices, mu, scheme == "central")
        if error is not None:
            raise error


def check_mask(mask: dict[str, torch.Tensor] | None,
               params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor] | None:
    """Validates a name -> bool tensor mask. Parameters absent from the mask get no coordinates."""
    if mask is None:
        return None
    if not isinstance(mask, dict):
        raise TypeError(f"mask must be a dict name -> bool tensor, got {type(mask).__name__}")
    shapes = {name: p.shape for name, p in params}
    for name, m in mask.items():
        if name not in shapes:
            raise ValueError(f"mask has key {name!r}, which is not a trainable parameter; "
                             f"expected keys among {sorted(shapes)[:8]}{'...' if len(shapes) > 8 else ''}")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise TypeError(f"mask[{name!r}] must be a torch.bool tensor, got {got}")
        if m.shape != shapes[name]:
            raise ValueError(f"mask[{name!r}] must have the parameter's shape {tuple(shapes[name])}, "
                             f"got {tuple(m.shape)}")
    return mask


def evaluate_loss(loss_fn: LossFn, model: torch.nn.Module, batch: Any, query: str, *, first: bool | None = None,
                  restored: str = RESTORED) -> float:
    """Calls loss_fn and returns a finite Python float; failures follow the error contract above. `first`: this is
    the step's first evaluation (default: when `query` is BASE_QUERY)."""
    source = loss_source(loss_fn)
    try:
        value = loss_fn(model, batch)
    except (RuntimeError, IndexError) as error:  # what torch raises for inputs or targets that do not fit
        first = query == BASE_QUERY if first is None else first
        if first and getattr(loss_fn, "zokernels_owned", False) and not isinstance(error, torch.OutOfMemoryError):
            raise batch_misfit(error, batch, source, query, restored) from error
        raise note_query_failure(error, source, query, restored)
    except Exception as error:
        raise note_query_failure(error, source, query, restored)
    return finite_scalar(value, source, query, restored)


def finite_scalar(value: Any, source: str, query: str, restored: str = RESTORED) -> float:
    """A loss value (scalar tensor, numpy or Python number) as a finite float, or an error naming `source`."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{source} must return a scalar, got a tensor of shape {tuple(value.shape)} in {query}; "
                             f"{restored}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{source} must return a number or a one-element tensor, got {type(value).__name__} in "
                        f"{query}; {restored}") from error
    if not math.isfinite(value):
        raise nonfinite_error(source, value, query, restored)
    return value
