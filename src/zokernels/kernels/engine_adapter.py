"""The bridge from the delta engine (zokernels/engine) to the GPU kernels: the fused first layer and the
one-channel mixing conv. It reads the engine's captured graph and never changes it. The engine calls both when
cge_step's backend is one of KERNEL_BACKENDS (cge_engine.kernel_backend_for).

`fused_seed_delta(captured, conv_node, module, local, indices, steps)` returns `(relu_node, Delta)` when the
coordinates' conv/linear weight feeds only a BatchNorm whose output feeds only a ReLU: the exact delta *after* the
ReLU, in one launch. The engine then continues from there:

    fused = fused_seed_delta(captured, node, module, local, chunk, steps)
    start, seed = fused if fused is not None else (node, seed_delta(...))
    out = output_delta(captured, start, seed, last_use)

`one_channel_conv2d_delta(delta, conv, backend)` is the next conv on a one-channel delta (graph._conv2d).

Both return None wherever the pattern or the kernels' inputs (float32/float64, dense layouts) do not hold: the
engine keeps its own rules there."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .checks import FLOAT_DTYPES
from .first_layer import BatchNormSpec, coords_from_flat, first_layer_delta
from .mixing import one_channel_conv2d

_RELU_FUNCTIONS = (F.relu, torch.relu)
# The backends whose kernels the engine calls. cpu (the C++ twins) and torch are slower than the engine's own
# rules on CPU (docs/gpu_kernels.md, CPU measurement), so they keep those rules.
KERNEL_BACKENDS = ("triton", "cuda")


def _kernel_readable(*tensors: torch.Tensor) -> bool:
    """Inputs the kernels take: float32/float64, one dtype and device, contiguous (or channels-last when 4-D)."""
    first = tensors[0]
    return all(t.dtype in FLOAT_DTYPES and t.dtype == first.dtype and t.device == first.device
               and (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)))
               for t in tensors)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu(captured, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(captured.module(node), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and not node.kwargs.get("inplace", False) and len(node.args) == 1
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1


def _layer_supported(captured, node: fx.Node, module: nn.Module, local: str) -> bool:
    if local != "weight" or len(node.args) != 1 or node.kwargs:
        return False
    x = captured.values[node.args[0]]
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str) \
            and x.dim() == 4
    return isinstance(module, nn.Linear) and x.dim() == 2


def fused_pattern(captured, node: fx.Node, module: nn.Module, local: str):
    """(bn_node, bn_module, relu_node) when `node` (this weight's layer) → BN → ReLU with no other users; else None."""
    if not _layer_supported(captured, node, module, local):
        return None
    bn_node = _only_user(node)
    if bn_node is None or bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
        return None
    bn = captured.module(bn_node)
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return None
    relu_node = _only_user(bn_node)
    if relu_node is None or not _is_relu(captured, relu_node):
        return None
    return bn_node, bn, relu_node


def _batchnorm_spec(captured, bn_node: fx.Node, bn: nn.Module, y: torch.Tensor) -> BatchNormSpec:
    spec = BatchNormSpec.from_module(bn)
    if not spec.train:
        return spec
    key = (bn_node, "kernel_mean_var")  # base batch statistics: once per node and step, as the engine's own
    if key not in captured.values.derived:
        dims = tuple(d for d in range(y.dim()) if d != 1)
        captured.values.derived[key] = (y.mean(dim=dims), y.var(dim=dims, unbiased=False))
    mean, var = captured.values.derived[key]
    return BatchNormSpec(True, spec.eps, spec.weight, spec.bias, mean, var)


def fused_seed_delta(captured, node: fx.Node, module: nn.Module, local: str, indices: torch.Tensor,
                     steps: torch.Tensor, backend: str | None = None):
    """(relu_node, Delta of relu_node's output) for weight coordinates `indices` moved by `steps`, or None."""
    from ..engine.delta import Delta  # the engine imports nothing from here: no cycle at import time
    pattern = fused_pattern(captured, node, module, local)
    if pattern is None:
        return None
    bn_node, bn, relu_node = pattern
    x, y = captured.values[node.args[0]], captured.values[node]
    if not _kernel_readable(x, y):
        return None
    coords = coords_from_flat(indices.to(y.device), module.weight.shape)
    geometry = (module.stride, module.padding, module.dilation) if isinstance(module, nn.Conv2d) else (1, 0, 1)
    values = first_layer_delta(x, y, coords, steps.to(device=y.device, dtype=y.dtype), *geometry,
                               bn=_batchnorm_spec(captured, bn_node, bn, y), relu=True, backend=backend)
    return relu_node, Delta(values, coords[:, 0].contiguous())



def one_channel_conv2d_delta(delta, conv: nn.Conv2d, backend: str | None = None):
    """The dense delta after `conv` of a one-channel delta (replica k in channel delta.channels[k]), or None where
    the kernel does not apply. Its output is channels-last: the layout the engine's dense convolutions read."""
    from ..engine.delta import Delta
    values, weight = delta.values.contiguous(), conv.weight  # the kernel reads δ contiguous (usually already)
    if conv.groups != 1 or values.dim() != 4 or isinstance(conv.padding, str) or conv.padding_mode != "zeros" \
            or not _kernel_readable(weight, values):
        return None
    replicas, batch = values.shape[:2]
    out = one_channel_conv2d(values, delta.channels, weight.detach(), conv.stride, conv.padding,
                             conv.dilation, channels_last=True, backend=backend)
    return Delta(out.view(replicas, batch, *out.shape[1:]))
