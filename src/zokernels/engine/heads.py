"""The loss at the end of the model: what it is, its base value, and its exact change for K deltas.

- built-in names ('cross_entropy', 'mse') and the default (the model's own `outputs.loss` when it computes one,
  else cross-entropy of the logits against the batch's targets) are torch ops: the engine records them on the
  step's tape, and their rules (exact closed forms) give the change of the loss;
- a callable `output_loss(outputs, batch)` is a black box: it receives the perturbed outputs, batched as
  [K, B, ...] when it sets `accepts_query_axis = True` and the model returns one tensor, else one query at a time.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..estimators.batching import batch_targets, call_model, model_loss, output_logits
from ..estimators.common import (BASE_QUERY, NonFiniteLossError, finite_scalar, nonfinite_error,
                                 note_query_failure)

OutputLoss = Callable[[Any, Any], Any]
BUILTIN_OUTPUT_LOSSES = ("cross_entropy", "mse")


class Head:
    def __init__(self, output_loss: str | OutputLoss | None, batch: Any):
        self.output_loss, self.batch = output_loss, batch
        self.source = "output_loss" if output_loss is not None else "the default loss"

    @property
    def black_box(self) -> bool:
        return callable(self.output_loss)

    def recorded_loss(self, outputs: Any) -> torch.Tensor | None:
        """The loss as torch ops on the outputs (recorded on the tape), or None for a black box."""
        if self.black_box:
            return None
        if self.output_loss is None:
            own = model_loss(outputs)
            if own is not None:
                return own
        what = f"output_loss={self.output_loss or 'cross_entropy'!r}"
        logits = output_logits(outputs)
        targets = batch_targets(self.batch, what)
        if self.output_loss == "mse":
            return F.mse_loss(logits, targets.to(logits.dtype))
        return F.cross_entropy(logits, targets)

    def loss(self, outputs: Any) -> Any:
        """The loss value of one evaluation (the naive path)."""
        if not self.black_box:
            return self.recorded_loss(outputs)
        if getattr(self.output_loss, "accepts_query_axis", False) and isinstance(outputs, torch.Tensor):
            return torch.as_tensor(self.output_loss(outputs.unsqueeze(0), self.batch)).reshape(-1)[0]
        return self.output_loss(outputs, self.batch)

    def base(self, outputs: Any) -> float:
        try:
            value = self.loss(outputs)
        except Exception as error:
            raise note_query_failure(error, self.source, BASE_QUERY)
        return finite_scalar(value, self.source, BASE_QUERY)

    def output_leaves(self, tape) -> list:
        """(leaf index, node) for every model output that depends on the parameters."""
        leaves, _ = tree_flatten(tape.outputs)
        found = [(i, tape.node_of(leaf)) for i, leaf in enumerate(leaves)]
        return [(i, node) for i, node in found if node is not None]

    def change(self, rec, deltas: dict, k: int, what) -> torch.Tensor:
        """Loss(θ + step_k e_k) − Loss(θ) for each replica k, float64 [K]. `what(j)` names replica j's query (for
        errors: "the +mu query of conv1.weight[17]")."""
        if rec.loss_node is not None:
            d = deltas.get(rec.loss_node)
            change = (torch.zeros(k, dtype=torch.float64) if d is None else
                      d.dense(rec.loss_node.value).reshape(k).double().cpu())
        else:
            change = self._black_box_change(rec, deltas, k, what)
        if not torch.isfinite(change).all():
            bad = int((~torch.isfinite(change)).nonzero()[0])
            raise nonfinite_error(self.source, "a non-finite change", what(bad))
        return change

    def _black_box_change(self, rec, deltas: dict, k: int, what) -> torch.Tensor:
        outputs, base_loss = rec.tape.outputs, rec.base_loss
        leaves, spec = tree_flatten(outputs)
        perturbed = {i: deltas[node].perturbed_values(node.value).to(leaves[i].dtype)
                     for i, node in rec.output_nodes if node in deltas}
        query = 0  # the query an error is reported for
        try:
            if getattr(self.output_loss, "accepts_query_axis", False) and isinstance(outputs, torch.Tensor):
                batched = perturbed.get(0, outputs.unsqueeze(0).expand(k, *outputs.shape))
                values = torch.as_tensor(self.output_loss(batched, self.batch), dtype=torch.float64)
                if values.shape != (k,):
                    raise ValueError(f"output_loss with accepts_query_axis must return shape ({k},), got "
                                     f"{tuple(values.shape)} in {what(0)} and the {k - 1} queries batched with it")
                return values.cpu() - base_loss
            changes = []
            for query in range(k):
                inputs = [perturbed[i][query] if i in perturbed else leaf for i, leaf in enumerate(leaves)]
                value = self.output_loss(tree_unflatten(inputs, spec), self.batch)
                changes.append(finite_scalar(value, self.source, what(query)) - base_loss)
            return torch.tensor(changes, dtype=torch.float64)
        except NonFiniteLossError:
            raise
        except Exception as error:
            raise note_query_failure(error, self.source, what(query))

    def as_loss_fn(self, model_input) -> Callable:
        """The same loss as a loss_fn(model, batch) for the naive path."""
        def loss_fn(model, batch):
            return Head(self.output_loss, batch).loss(call_model(model, batch, model_input))
        loss_fn.zokernels_source = self.source
        # zokernels calls the model; the loss is its own unless a black box: a RuntimeError in the first evaluation
        # is then a batch that does not fit the model (the error contract, estimators/common.py)
        loss_fn.zokernels_owned = not self.black_box
        return loss_fn
