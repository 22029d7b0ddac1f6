"""Fused CPU kernels of the engine's dense stage, on float32 rows of C channels (C last in memory: the kernels'
[K, N, C]; engine/fused.py decides where that layout holds). Backend: cpu only (`_C`, csrc/cpu/*_delta_cpu.cpp,
batchnorm_replicas_cpu.cpp); their torch twins are the engine's own formulas (engine/rules.py), which run wherever
`fused_backend` is not "cpu". Twins for the tests: reference/engine_ref.py.

- `batchnorm_replicas` (perturbed form): training-mode BN (+ReLU) of K replicas, each with its own batch
  statistics; two streaming passes with double accumulation.
- `batchnorm_delta` (exact delta form): the change of training-mode BN (+ReLU) for K dense δs, from δ and the
  base statistics, never forming either side.
- `residual_relu_delta`: ReLU(y + δa + δb) − ReLU(y) in one pass (a residual block's end)."""
from __future__ import annotations

import torch

from . import native
from .dispatch import choose_backend

IMPLEMENTED = ("cpu", "torch")
_F32 = (torch.float32,)
# x, delta, centered, base_out, a, b, y and out are rows the caller laid out ([K, N, C] with C last in memory);
# the parameter vectors are contiguous.
REPLICAS = native.op(
    "batchnorm_replicas", native.tensor("x", contiguous=False), native.tensor("out", contiguous=False),
    "replicas", "rows", "channels", native.tensor("center"), native.tensor("weight", optional=True),
    native.tensor("bias", optional=True), "eps", "relu", backends=("cpu",), element_types=_F32)
DELTA = native.op(
    "batchnorm_delta", native.tensor("delta", contiguous=False), native.tensor("centered", contiguous=False),
    native.tensor("root"), native.tensor("weight", optional=True),
    native.tensor("base_out", contiguous=False, optional=True), native.tensor("out", contiguous=False),
    "replicas", "rows", "channels", backends=("cpu",), element_types=_F32)
RESIDUAL_RELU = native.op(
    "residual_relu_delta", native.tensor("a", contiguous=False), native.tensor("b", contiguous=False, optional=True),
    native.tensor("y", contiguous=False), native.tensor("out", contiguous=False), "replicas", "numel",
    backends=("cpu",), element_types=_F32)


def fused_backend(op: native.NativeOp, device: torch.device) -> str:
    """"cpu" where `op`'s kernel runs on `device`, "torch" (the engine's formulas) elsewhere."""
    return choose_backend(op.name, IMPLEMENTED, None, device)


def _rows_and_channels(replicas: torch.Tensor) -> tuple[int, int]:
    channels = replicas.shape[2]
    return replicas[0].numel() // channels, channels


def batchnorm_replicas(x: torch.Tensor, center: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float, relu: bool) -> torch.Tensor:
    """BN(+ReLU) of each replica of x [K, B, C, ...] with its own batch statistics. center [C]: a value near each
    channel's mean (the base batch mean)."""
    rows, channels = _rows_and_channels(x)
    out = torch.empty_like(x)
    center = center.detach().to(torch.float32).contiguous()
    REPLICAS("cpu", x, out, x.shape[0], rows, channels, center, None if weight is None else weight.detach(),
             None if bias is None else bias.detach(), float(eps), relu)
    return out


def batchnorm_delta(delta: torch.Tensor, centered: torch.Tensor, root: torch.Tensor, weight: torch.Tensor | None,
                    base_out: torch.Tensor | None) -> torch.Tensor:
    """The exact change of training-mode BN for a dense δ [K, B, C, ...] (and of the ReLU after it when base_out,
    BN's base output, is given); centered = x − mean(x), root = sqrt(var(x) + eps) of the base input."""
    rows, channels = _rows_and_channels(delta)
    out = torch.empty_like(delta)
    root = root.detach().to(torch.float32).contiguous()
    DELTA("cpu", delta, centered, root, None if weight is None else weight.detach(), base_out, out, delta.shape[0],
          rows, channels)
    return out


def residual_relu_delta(a: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """ReLU(y + a + b) − ReLU(y) for K replicas of dense deltas a, b [K, *y.shape] (b may be None)."""
    out = torch.empty_like(a)
    RESIDUAL_RELU("cpu", a, b, y, out, a.shape[0], y.numel())
    return out
