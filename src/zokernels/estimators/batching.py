"""The batch and output conventions every verb shares, so that a batch means the same thing to cge_step, rge_step,
mezo_step and ZO-SVRG, whichever engine evaluates it.

Batches:
- a tuple or list `(x, y, *rest)`: the model is called as `model(x)`, the targets are `y`;
- a dict (a Hugging Face batch, `BatchEncoding` included): `model(**batch)`, targets `batch["labels"]` if present;
- `model_input(batch)` overrides how the model is called: it returns a tuple (positional arguments) or a dict
  (keyword arguments).

Outputs: a tensor is the logits; a dict / Hugging Face `ModelOutput` gives `outputs["logits"]` and, when the model
computed one, `outputs["loss"]`; a tuple gives its first element.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

ModelInput = Callable[[Any], "tuple | dict"]


def check_batch(batch: Any) -> None:
    """ValueError / TypeError naming `batch` for batches no verb can use (empty, None, a bare scalar)."""
    if batch is None:
        raise TypeError("batch must be a tuple (x, y, ...), a dict of model inputs or a tensor, got None")
    if isinstance(batch, Mapping):
        if len(batch) == 0:
            raise ValueError("batch is an empty dict: there are no model inputs to evaluate")
        first = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError(f"batch is an empty {type(batch).__name__}: expected (inputs, targets, ...)")
        first = batch[0]
    else:
        first = batch
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == 0:
        raise ValueError(f"batch holds no samples: its first input has shape {tuple(first.shape)}")


def model_call(batch: Any, model_input: ModelInput | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) such that the model is evaluated as `model(*args, **kwargs)`."""
    spec = model_input(batch) if model_input is not None else _default_input(batch)
    if isinstance(spec, Mapping):
        return (), dict(spec)
    if isinstance(spec, tuple):
        return spec, {}
    if isinstance(spec, list):
        return tuple(spec), {}
    return (spec,), {}


def _default_input(batch: Any) -> "tuple | dict":
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)):
        return (batch[0],)
    return (batch,)


def call_model(model: torch.nn.Module, batch: Any, model_input: ModelInput | None = None) -> Any:
    args, kwargs = model_call(batch, model_input)
    return model(*args, **kwargs)


def batch_targets(batch: Any, what: str) -> Any:
    """The targets of a batch: `batch[1]` of a tuple, `batch["labels"]` of a dict. `what` names the loss that
    needs them, for the error."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping) and batch.get("labels") is not None:
        return batch["labels"]
    got = (f"a dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else
           f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    raise TypeError(f"batch must hold targets for {what}: a tuple (x, y, ...) or a dict with 'labels', got {got}; "
                    "pass loss_fn(model, batch) or a callable output_loss(outputs, batch) for other batches")


def model_loss(outputs: Any) -> torch.Tensor | None:
    """The loss the model computed itself (a Hugging Face model given labels), or None."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    return None


def output_logits(outputs: Any) -> torch.Tensor:
    """The prediction tensor of a model output: the tensor itself, `outputs["logits"]`, or a tuple's first item."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"the model returned {type(outputs).__name__}, in which no logits tensor was found (expected a "
                    "tensor, a dict / ModelOutput with 'logits', or a tuple starting with a tensor); pass a callable "
                    "output_loss(outputs, batch)")
