"""The engine's fusion plan for the GPU kernels (kernels/ is a leaf layer of ops on plain tensors; the engine
decides where they apply). Used when cge_step's backend is 'triton' or 'cuda':

- `fused_first_layer`: a conv2d/linear weight whose layer feeds only a batch_norm that feeds only a ReLU: the exact
  delta after the ReLU for K coordinates in one launch (kernels.first_layer_delta); propagation continues from the
  ReLU;
- `one_channel_conv2d_delta`: the next conv on a one-channel delta (kernels.one_channel_conv2d).

Both return None wherever the pattern or the kernels' inputs (float32/float64, one dtype and device, dense
layouts) do not hold: the engine keeps its own rules there. The first-layer patterns are matched once per
recording, at capture (`first_layer_plan`, kept in the recording's Context), not per pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.checks import FLOAT_DTYPES
from ..kernels.first_layer import BatchNormSpec, coords_from_flat, first_layer_delta
from ..kernels.mixing import one_channel_conv2d
from .delta import Delta
from .ops import canonical
from .rules import CONV_ARGS, Context, only_user_is_relu
from .statistics import BN_ARGS, bn_statistics
from .tape import Node, Tape, arguments, value


def _kernel_readable(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return all(t.dtype in FLOAT_DTYPES and t.dtype == first.dtype and t.device == first.device
               and (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)))
               for t in tensors)


def _only_user(node: Node) -> Node | None:
    users = list(dict.fromkeys(node.users))
    return users[0] if len(users) == 1 else None


def fused_pattern(param_node: Node) -> tuple[Node, Node, Node] | None:
    """(layer, batch_norm, relu) when the parameter is the weight of one conv2d/linear whose output feeds only a
    batch_norm (as its input) whose output feeds only a ReLU; else None."""
    layer = _only_user(param_node)
    if layer is None or layer.kind != "call" or layer.func not in (F.conv2d, F.linear):
        return None
    names = CONV_ARGS if layer.func is F.conv2d else ("input", "weight", "bias")
    a = arguments(layer, names)
    if (a.get("weight") is not param_node or a.get("input") is param_node or isinstance(a.get("padding"), str)
            or a.get("groups", 1) != 1):
        return None
    x = value(a["input"])
    if x.dim() != (4 if layer.func is F.conv2d else 2):
        return None
    bn = _only_user(layer)
    if (bn is None or bn.kind != "call" or canonical(bn.func) != "batch_norm" or bn.args[0] is not layer
            or any(arguments(bn, BN_ARGS).get(k) is layer for k in BN_ARGS[1:]) or not only_user_is_relu(bn)):
        return None
    return layer, bn, bn.users[0]


@dataclass(frozen=True)
class FirstLayer:
    """One matched conv2d/linear → batch_norm → ReLU start: its nodes, the layer's input (a node or a constant)
    and its geometry (stride, padding, dilation)."""

    layer: Node
    bn: Node
    relu: Node
    input: object
    geometry: tuple


def first_layer_plan(tape: Tape) -> dict[Node, FirstLayer]:
    """The parameters whose coordinates the fused first-layer kernel serves, matched once at capture (after the
    base values took their final layout: the kernels' layout check reads them)."""
    plan = {}
    for param_node in tape.params.values():
        pattern = fused_pattern(param_node)
        if pattern is None:
            continue
        layer, bn, relu = pattern
        a = arguments(layer, CONV_ARGS if layer.func is F.conv2d else ("input", "weight", "bias"))
        if not _kernel_readable(value(a["input"]), layer.value):
            continue
        geometry = ((a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1)) if layer.func is F.conv2d
                    else (1, 0, 1))
        plan[param_node] = FirstLayer(layer, bn, relu, a["input"], geometry)
    return plan


def _batchnorm_spec(bn: Node, ctx: Context) -> BatchNormSpec:
    stats = bn_statistics(bn, ctx)
    return BatchNormSpec(stats.training, stats.eps, stats.weight, stats.bias, stats.mean, stats.var)


def fused_first_layer(param_node: Node, indices: torch.Tensor, steps: torch.Tensor,
                      ctx: Context) -> tuple[Node, Delta] | None:
    """(relu node, Delta of its output) for weight coordinates `indices` moved by `steps`, or None where the
    recording's plan has no fused start for this parameter."""
    start = ctx.first_layers.get(param_node)
    if start is None:
        return None
    y = start.layer.value
    coords = coords_from_flat(indices.to(y.device), param_node.value.shape)
    values = first_layer_delta(value(start.input), y, coords, steps.to(device=y.device, dtype=y.dtype),
                               *start.geometry, bn=_batchnorm_spec(start.bn, ctx), relu=True,
                               backend=ctx.kernel_backend)
    return start.relu, Delta(values, coords[:, 0].contiguous())


def one_channel_conv2d_delta(delta: Delta, weight: torch.Tensor, geometry: dict, backend: str) -> Delta | None:
    """The dense delta after a conv2d of a one-channel delta, or None where the kernel does not apply. Its output
    is channels-last: the layout the engine's dense convolutions read."""
    values = delta.values.contiguous()  # the kernel reads δ contiguous (usually already)
    if (geometry.get("groups", 1) != 1 or values.dim() != 4 or isinstance(geometry.get("padding", 0), str)
            or not _kernel_readable(weight, values)):
        return None
    replicas, batch = values.shape[:2]
    out = one_channel_conv2d(values, delta.channels, weight.detach(), geometry.get("stride", 1),
                             geometry.get("padding", 0), geometry.get("dilation", 1), channels_last=True,
                             backend=backend)
    return Delta(out.view(replicas, batch, *out.shape[1:]))
