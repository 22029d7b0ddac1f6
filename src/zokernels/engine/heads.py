"""The loss at the end of the white-box model: its base value and its exact change for K output deltas."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..estimators.common import NonFiniteLossError, finite_scalar
from .delta import Delta, cross_entropy_delta, mse_delta

OutputLoss = Callable[[torch.Tensor, Any], Any]
BUILTIN_OUTPUT_LOSSES = ("cross_entropy", "mse")


def _as_float(value: Any, what: str) -> float:
    return finite_scalar(value, "output_loss", what)


class Head:
    """output_loss(outputs, batch): a built-in name (exact delta formulas) or any callable (a black box: the
    perturbed outputs are handed to it, batched as [K, B, ...] when it sets `accepts_query_axis = True`)."""

    def __init__(self, output_loss: str | OutputLoss, batch: Any):
        self.output_loss, self.batch = output_loss, batch

    def targets(self) -> torch.Tensor:
        if not isinstance(self.batch, (tuple, list)) or len(self.batch) != 2:
            raise TypeError(
                f"batch must be a tuple (x, y) for output_loss={self.output_loss!r} (the default when loss_fn is "
                f"not given), got {type(self.batch).__name__}; pass loss_fn(model, batch) or a callable "
                "output_loss(outputs, batch) for other batches")
        return self.batch[1]

    def loss(self, outputs: torch.Tensor) -> Any:
        if self.output_loss == "cross_entropy":
            return F.cross_entropy(outputs, self.targets())
        if self.output_loss == "mse":
            return F.mse_loss(outputs, self.targets().to(outputs.dtype))
        if getattr(self.output_loss, "accepts_query_axis", False):  # always called with a leading query axis
            return torch.as_tensor(self.output_loss(outputs.unsqueeze(0), self.batch)).reshape(-1)[0]
        return self.output_loss(outputs, self.batch)

    def base(self, outputs: torch.Tensor) -> float:
        try:
            value = self.loss(outputs)
        except Exception as error:
            error.add_note("zokernels: raised by output_loss in the base evaluation; parameters and buffers were "
                           "restored")
            raise
        return _as_float(value, "the base (unperturbed) evaluation")

    def change(self, outputs: torch.Tensor, delta: Delta, base_loss: float, what: str) -> torch.Tensor:
        """Loss(outputs + δ_k) − Loss(outputs) for each replica k, float64 [K]."""
        if delta.perturbed:
            delta = Delta(delta.dense(outputs))
        if self.output_loss == "cross_entropy":
            change = cross_entropy_delta(outputs, self.targets(), delta).double()
        elif self.output_loss == "mse":
            change = mse_delta(outputs, self.targets().to(outputs.dtype), delta).double()
        else:
            change = self._black_box_change(outputs, delta.dense(outputs), base_loss, what)
        if not torch.isfinite(change).all():
            raise NonFiniteLossError(f"the loss change is not finite in {what}; parameters and buffers were restored")
        return change

    def _black_box_change(self, outputs, dense, base_loss: float, what: str) -> torch.Tensor:
        if getattr(self.output_loss, "accepts_query_axis", False):
            values = torch.as_tensor(self.output_loss(outputs.unsqueeze(0) + dense, self.batch), dtype=torch.float64)
            if values.shape != (dense.shape[0],):
                raise ValueError(f"output_loss with accepts_query_axis must return shape ({dense.shape[0]},), "
                                 f"got {tuple(values.shape)} in {what}")
            return values.cpu() - base_loss
        return torch.tensor([_as_float(self.output_loss(outputs + d, self.batch), what) - base_loss
                             for d in dense], dtype=torch.float64)

    def as_loss_fn(self, model_input: Callable[[Any], tuple]):
        """The same loss as a loss_fn(model, batch) for the naive path."""
        def loss_fn(model, batch):
            return Head(self.output_loss, batch).loss(model(*model_input(batch)))
        return loss_fn
