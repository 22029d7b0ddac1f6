"""Op-level capture of a model (torch.fx) with every node's base value cached, and the dispatch from a node to
its delta rule."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..kernels.engine_adapter import one_channel_conv2d_delta
from ..models import ShortcutA
from . import delta as rules
from . import fused
from .delta import Delta

ELEMENTWISE_MODULES = (nn.LeakyReLU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus)
LINEAR_PASSTHROUGH_MODULES = (nn.Identity, nn.Dropout)
POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
CHANNEL_NONLINEAR_MODULES = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
RELU_FUNCTIONS = (F.relu, torch.relu)
ADD_FUNCTIONS = (operator.add, torch.add)
FLATTEN_FUNCTIONS = (torch.flatten,)
POOL_FUNCTIONS = (F.avg_pool2d, F.adaptive_avg_pool2d)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, ShortcutA) or super().is_leaf_module(module, qualified_name)


class NodeValues(dict):
    """node -> base output; `derived` keeps per-step quantities computed from base values (BN statistics)."""

    def __init__(self):
        super().__init__()
        self.derived: dict = {}

    def clear(self) -> None:
        super().clear()
        self.derived.clear()


@dataclass
class CapturedModel:
    """The traced graph, the module of every call_module node, and the base value of every node."""

    graph_module: fx.GraphModule
    nodes: list[fx.Node]
    values: NodeValues = field(default_factory=NodeValues)
    dense_mode: str = "delta"  # how a dense δ is carried: 'delta' (exact rules) or 'perturbed' (x + δ, own ops)
    position: dict[fx.Node, int] = field(default_factory=dict)  # topological index of every node

    def module(self, node: fx.Node) -> nn.Module:
        return self.graph_module.get_submodule(node.target)


def capture(model: nn.Module) -> CapturedModel:
    """Traces `model`; raises fx's error for models with data-dependent control flow (callers fall back)."""
    graph = _Tracer().trace(model)
    graph_module = fx.GraphModule(model, graph)
    nodes = list(graph.nodes)
    return CapturedModel(graph_module, nodes, position={n: i for i, n in enumerate(nodes)})


class _Recorder(fx.Interpreter):
    def __init__(self, captured: CapturedModel):
        super().__init__(captured.graph_module)
        self.captured = captured

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        self.captured.values[node] = value
        return value


def run_base(captured: CapturedModel, inputs: tuple) -> torch.Tensor:
    """One ordinary forward through the real modules (so BN running statistics move as in a training forward),
    keeping every node's output."""
    captured.values.clear()
    output = _Recorder(captured).run(*inputs)
    # Deltas of 4-D activations are carried channels-last (convolutions run ~2x faster on CPU that way); the
    # cached base values take the same layout so that elementwise rules read both in one order.
    for node, value in captured.values.items():
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
            captured.values[node] = value.contiguous(memory_format=torch.channels_last)
    return output


def _is_supported_dropout(module: nn.Module) -> bool:
    return not (isinstance(module, nn.Dropout) and module.training and module.p > 0)


def engine_blockers(captured: CapturedModel) -> list[str]:
    """Reasons the delta engine cannot reproduce this model's queries exactly (empty when it can)."""
    blockers = []
    for node in captured.nodes:
        if node.op == "call_module" and not _is_supported_dropout(captured.module(node)):
            blockers.append(f"{node.target}: dropout in training mode draws new masks per replica")
    return blockers


def propagate(captured: CapturedModel, node: fx.Node, deltas: dict[fx.Node, Delta],
              kernel_backend: str | None = None) -> Delta | None:
    """The delta of `node`'s output given the deltas of its inputs (None if none of its inputs changed).
    kernel_backend: 'triton'/'cuda' runs the one-channel mixing kernel at convolutions (None: torch rules)."""
    inputs = [a for a in node.all_input_nodes if a in deltas]
    if not inputs:
        return None
    if _is_relu(captured, node) and deltas[node.args[0]].relu_applied:
        done = deltas[node.args[0]]  # a fused BN + ReLU kernel already applied this ReLU
        return Delta(done.values, done.channels, perturbed=done.perturbed)
    fused_add = _fused_residual_relu(captured, node, deltas)
    if fused_add is not None:
        return fused_add
    if any(deltas[a].perturbed for a in inputs):
        result = _propagate_perturbed(captured, node, deltas)
        if result is not None:
            return result
    values = captured.values
    if node.op == "call_module":
        rule = _module_rule(captured.module(node), captured, kernel_backend)
    elif node.op == "call_function":
        rule = _function_rule(node)
    elif node.op == "call_method":
        rule = _method_rule(node)
    else:
        rule = None
    if rule is not None and len(node.args) >= 1 and isinstance(node.args[0], fx.Node):
        result = rule(node, values, deltas)
        if result is not NotImplemented:
            return _maybe_perturbed(captured, node, result)
    return generic_delta(captured, node, deltas)


def _maybe_perturbed(captured: CapturedModel, node: fx.Node, delta: Delta) -> Delta:
    """Where a convolution has made δ dense, switch to the perturbed form if the capture asks for it."""
    if captured.dense_mode == "perturbed" and delta.channels is None and not delta.perturbed \
            and node.op == "call_module" and isinstance(captured.module(node), nn.Conv2d):
        return Delta(captured.values[node].unsqueeze(0) + delta.values, perturbed=True)
    return delta


def _first(node: fx.Node, values, deltas) -> tuple[torch.Tensor, Delta | None]:
    source = node.args[0]
    return values[source], deltas.get(source)


def _module_rule(module: nn.Module, captured: CapturedModel, kernel_backend: str | None = None):
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return lambda n, v, d: _conv2d(n, v, d, module, kernel_backend)
    if isinstance(module, nn.Linear):
        return lambda n, v, d: _linear(n, v, d, module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return lambda n, v, d: _batchnorm(n, v, d, module, captured)
    if isinstance(module, nn.ReLU):
        return lambda n, v, d: rules.relu_delta(*_first(n, v, d))
    if isinstance(module, nn.Tanh):
        return lambda n, v, d: rules.tanh_delta(*_first(n, v, d))
    if isinstance(module, ELEMENTWISE_MODULES):
        return lambda n, v, d: rules.elementwise_delta(module, *_first(n, v, d))
    if isinstance(module, LINEAR_PASSTHROUGH_MODULES) and _is_supported_dropout(module):
        return lambda n, v, d: d[n.args[0]]
    if isinstance(module, (*POOL_MODULES, ShortcutA)):
        return lambda n, v, d: _shortcut_or_pool(n, v, d, module)
    if isinstance(module, CHANNEL_NONLINEAR_MODULES):
        return lambda n, v, d: _channel_nonlinear(n, v, d, module)
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return lambda n, v, d: rules.flatten_delta(d[n.args[0]], v[n.args[0]])
    return None


def _conv2d(node, values, deltas, module: nn.Conv2d, kernel_backend: str | None = None):
    if any(a in deltas for a in node.all_input_nodes[1:]):
        return NotImplemented  # the rule covers a change of the input only
    delta = deltas[node.args[0]]
    if kernel_backend is not None and delta.channels is not None:
        mixed = one_channel_conv2d_delta(delta, module, kernel_backend)
        if mixed is not None:
            return mixed
    return rules.conv2d_delta(delta, values[node.args[0]], module)


PER_SAMPLE_MODULES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Tanh, nn.Flatten, *ELEMENTWISE_MODULES, *POOL_MODULES,
                      *CHANNEL_NONLINEAR_MODULES, ShortcutA, nn.Identity)
PER_SAMPLE_FUNCTIONS = (*RELU_FUNCTIONS, torch.tanh, *FLATTEN_FUNCTIONS, *POOL_FUNCTIONS)


def _propagate_perturbed(captured: CapturedModel, node: fx.Node, deltas: dict[fx.Node, Delta]) -> Delta | None:
    """Dense stage in perturbed form: the node's own op on x + δ for all replicas at once. None where the op is
    not known to act per sample (the caller then uses the delta rules or the generic fallback)."""
    values = captured.values
    load = lambda a: deltas[a].perturbed_values(values[a]) if a in deltas else values[a]  # noqa: E731
    single = len(node.all_input_nodes) == 1 and node.args and node.args[0] is node.all_input_nodes[0]
    if node.op == "call_module" and single and not node.kwargs and len(node.args) == 1:
        module = captured.module(node)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            x = load(node.args[0])
            if rules.batchnorm_uses_batch_stats(module):
                return _batchnorm_train_perturbed(captured, node, x, module)
            return Delta(rules.per_sample_apply(module, x), perturbed=True)
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
            return Delta(rules.per_sample_apply(lambda t: rules.conv2d_channels_last(t, module),
                                                load(node.args[0])), perturbed=True)
        if isinstance(module, PER_SAMPLE_MODULES) or (isinstance(module, nn.Dropout) and not module.training):
            return Delta(rules.per_sample_apply(module, load(node.args[0])), perturbed=True)
    if node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
        a, b = (load(x) if isinstance(x, fx.Node) else x for x in node.args)
        return Delta(a + b, perturbed=True)  # base operands broadcast over the replica axis
    if single and ((node.op == "call_function" and node.target in PER_SAMPLE_FUNCTIONS)
                   or (node.op == "call_method" and node.target in ("relu", "flatten"))):
        rest = node.args[1:]
        fn = (lambda t: node.target(t, *rest, **node.kwargs)) if node.op == "call_function" else \
            (lambda t: getattr(t, node.target)(*rest, **node.kwargs))
        return Delta(rules.per_sample_apply(fn, load(node.args[0])), perturbed=True)
    return None


def _is_relu(captured: CapturedModel, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(captured.module(node), nn.ReLU)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1


def _only_user_is_relu(captured: CapturedModel, node: fx.Node) -> bool:
    """Whether a fused kernel may apply the ReLU after `node` itself (nothing else reads the pre-ReLU value)."""
    users = list(node.users)
    return len(users) == 1 and _is_relu(captured, users[0])


def _batchnorm_train_perturbed(captured: CapturedModel, node: fx.Node, x: torch.Tensor, module) -> Delta:
    """Per-replica training-mode BN; fused with the following ReLU when that ReLU is the node's only user."""
    relu = _only_user_is_relu(captured, node)
    key = (node, "input_mean")
    if key not in captured.values.derived:
        base = captured.values[node.args[0]]
        captured.values.derived[key] = base.mean(dim=tuple(d for d in range(base.dim()) if d != 1))
    out = fused.batchnorm_replicas(x, module, captured.values.derived[key], relu)
    if out is None:
        return Delta(rules.batchnorm_train_perturbed(x, module), perturbed=True)
    return Delta(out, perturbed=True, relu_applied=relu)


def _fused_residual_relu(captured: CapturedModel, node: fx.Node, deltas: dict[fx.Node, Delta]) -> Delta | None:
    """a + b followed by its only user, a ReLU, on dense deltas: both rules in one fused pass."""
    if not (node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)):
        return None
    if not _only_user_is_relu(captured, node):
        return None
    present = [deltas[a] for a in node.args if a in deltas]
    if any(d.channels is not None or d.perturbed for d in present):
        return None
    values = captured.values
    if values[node.args[0]].shape != values[node.args[1]].shape:
        return None
    out = fused.residual_relu_delta(present[0].values, present[1].values if len(present) == 2 else None,
                                    values[node])
    return None if out is None else Delta(out, relu_applied=True)


def _linear(node, values, deltas, module: nn.Linear):
    x = values[node.args[0]]
    if x.dim() != 2:  # the channel form is defined on dim 1, not a linear layer's last dim: go dense
        return rules.linear_delta(Delta(deltas[node.args[0]].dense(x)), module)
    return rules.linear_delta(deltas[node.args[0]], module)


def _batchnorm(node, values, deltas, module, captured: CapturedModel):
    x, delta = _first(node, values, deltas)
    if rules.batchnorm_uses_batch_stats(module):
        key = (node, "batch_statistics")
        if key not in values.derived:
            values.derived[key] = rules.batch_statistics(x, module.eps)
        if delta.channels is None:
            fused_result = _fused_batchnorm_delta(captured, node, delta, module, values.derived[key])
            if fused_result is not None:
                return fused_result
        return rules.batchnorm_train_delta(x, delta, module.weight, values.derived[key])
    return rules.batchnorm_eval_delta(x, delta, module)


def _fused_batchnorm_delta(captured: CapturedModel, node: fx.Node, delta: Delta, module, statistics) -> \
        Delta | None:
    """The dense BN-train delta (and the ReLU delta after it, when that ReLU is BN's only user) in one kernel."""
    relu = _only_user_is_relu(captured, node)
    centered, root = statistics
    out = fused.batchnorm_delta(delta.values, centered, root, module.weight,
                                captured.values[node] if relu else None)
    if out is None:
        return None
    return Delta(out, relu_applied=relu)  # β cancels in a delta; γ is applied in the kernel


def _shortcut_or_pool(node, values, deltas, module):
    x, delta = _first(node, values, deltas)
    if isinstance(module, ShortcutA):
        if delta.channels is None:
            return rules.per_replica_linear(module, delta, x)
        sub = delta.values[..., ::module.stride, ::module.stride]
        return Delta(sub, delta.channels + module.pad_before)
    return rules.per_replica_linear(module, delta, x)


def _channel_nonlinear(node, values, deltas, module):
    """Per-channel but nonlinear (max pooling): f(x_c + δ) − f(x_c) on the affected channels only."""
    x, delta = _first(node, values, deltas)
    k, batch = delta.replicas, x.shape[0]
    xb = rules.base_like(x, delta)
    if delta.channels is not None:
        flat = lambda t: t.reshape(k * batch, 1, *t.shape[2:])  # noqa: E731
        out = module(flat(xb + delta.values)) - module(flat(xb.expand_as(delta.values)))
        return Delta(out.view(k, batch, *out.shape[2:]), delta.channels)
    perturbed = module((xb + delta.values).reshape(k * batch, *x.shape[1:]))
    base = values[node].unsqueeze(0)
    return Delta(perturbed.view(k, *base.shape[1:]) - base)


def _function_rule(node: fx.Node):
    fn = node.target
    if fn in RELU_FUNCTIONS and not node.kwargs.get("inplace", False):
        return lambda n, v, d: rules.relu_delta(*_first(n, v, d))
    if fn is torch.tanh:
        return lambda n, v, d: rules.tanh_delta(*_first(n, v, d))
    if fn in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
        return _add
    if fn in FLATTEN_FUNCTIONS and tuple(node.args[1:]) in ((1,), (1, -1)) and not node.kwargs:
        return lambda n, v, d: rules.flatten_delta(d[n.args[0]], v[n.args[0]])
    return None


def _method_rule(node: fx.Node):
    if node.target == "relu" and len(node.args) == 1:
        return lambda n, v, d: rules.relu_delta(*_first(n, v, d))
    if node.target == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)) and not node.kwargs:
        return lambda n, v, d: rules.flatten_delta(d[n.args[0]], v[n.args[0]])
    return None


def _add(node, values, deltas):
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return deltas[a if isinstance(a, fx.Node) else b]  # adding a constant does not change δ
    va, vb = values[a], values[b]
    if va.shape != vb.shape:
        return NotImplemented  # broadcasting add: generic
    return rules.add_deltas(deltas.get(a), deltas.get(b), va, vb)


def generic_delta(captured: CapturedModel, node: fx.Node, deltas: dict[fx.Node, Delta]) -> Delta:
    """f(inputs + δ_k) − f(inputs) for each replica, through the node's own module/function: any op, any
    coupling across the batch; one evaluation per replica."""
    values = captured.values
    replicas = next(deltas[a].replicas for a in node.all_input_nodes if a in deltas)
    dense = {a: deltas[a].dense(values[a]) for a in node.all_input_nodes if a in deltas}
    outputs = []
    for k in range(replicas):
        load = lambda a: values[a] + dense[a][k] if a in dense else values[a]  # noqa: E731
        args = fx.node.map_arg(node.args, load)
        kwargs = fx.node.map_arg(node.kwargs, load)
        outputs.append(_call(captured, node, args, kwargs) - values[node])
    return Delta(torch.stack(outputs))


def _call(captured: CapturedModel, node: fx.Node, args, kwargs):
    if node.op == "call_module":
        return captured.module(node)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    self_obj, *rest = args
    return getattr(self_obj, node.target)(*rest, **kwargs)
