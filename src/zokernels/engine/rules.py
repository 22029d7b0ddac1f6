"""The op-rule registry: for each canonical op (engine/ops.py), how a change δ of its inputs becomes the change of
its output. One entry per op, in one place; `explain` reads the same table.

A rule returns a Delta (or a MultiDelta for ops with several outputs), or NotImplemented where its closed form does
not cover the call (another argument changed too, an unusual keyword); propagate.py then uses the generic path,
f(inputs + δ_k) − f(inputs) evaluated batched over the K replicas (torch.vmap) or one replica at a time, which is
exact for any deterministic op and, with the recorded RNG state replayed, for random ones.

Closed forms avoid forming f(x + δ) and f(x) separately where that would cancel (ReLU, tanh, BN, softmax,
cross-entropy); linear ops are applied to δ alone; the one-channel form of δ survives every op that acts channel by
channel, so a convolution after it costs 1/C_in of a dense one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from . import delta as math
from . import fused
from .delta import Delta
from .ops import canonical
from .statistics import bn_statistics
from .tape import Node, arguments, value


@dataclass
class Context:
    """What rules read besides the deltas: per-step quantities derived from base values, and the options."""

    derived: dict
    dense_mode: str = "delta"
    kernel_backend: str | None = None
    # the GPU kernel for a conv on a one-channel δ (engine/fusion.py), set when kernel_backend is
    one_channel_conv: Callable | None = None
    # parameter node -> its fused first-layer start (engine/fusion.py first_layer_plan), matched at capture
    first_layers: dict = field(default_factory=dict)

    def cached(self, node: Node, key: str, compute: Callable):
        slot = (node, key)
        if slot not in self.derived:
            self.derived[slot] = compute()
        return self.derived[slot]


@dataclass
class MultiDelta:
    """Deltas of an op with several tensor outputs (LSTM, split): one per flattened output, None where unchanged."""

    items: list


Rule = Callable[[Node, Context, dict], "Delta | MultiDelta | None"]
RULES: dict[str, Rule] = {}
DESCRIPTIONS: dict[str, str] = {}


def rule(*names: str, describe: str):
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
            DESCRIPTIONS[name] = describe
        return fn
    return register


# ---- argument access (value, arguments: engine/tape.py) ------------------------------------------------------------
def constant_arguments(node: Node) -> tuple[tuple, dict]:
    """The call's arguments after the first, with recorded nodes replaced by their base values."""
    args, kwargs = tree_map(value, (node.args[1:], node.kwargs))
    return args, kwargs


def only_first_changes(node: Node, deltas: dict) -> bool:
    first = node.args[0] if node.args else None
    return isinstance(first, Node) and first in deltas and all(
        a is first or a not in deltas for a in node.inputs)


def first(node: Node, deltas: dict) -> tuple[torch.Tensor, Delta]:
    return node.args[0].value, deltas[node.args[0]]


def is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


# ---- elementwise ----------------------------------------------------------------------------------------------
@rule("relu", describe="exact: max(δ, −x) + min(x, 0); keeps one channel")
def _relu(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    x, d = first(node, deltas)
    if d.relu_applied:  # a fused BN/add kernel already applied this ReLU
        return Delta(d.values, d.channels)
    return math.relu_delta(x, d)


@rule("tanh", describe="exact: tanh(δ)(1 − tanh(x)tanh(x+δ)); keeps one channel")
def _tanh(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    return math.tanh_delta(*first(node, deltas))


ELEMENTWISE = ("gelu", "silu", "sigmoid", "hardswish", "hardsigmoid", "relu6", "hardtanh", "leaky_relu", "elu",
               "selu", "celu", "softplus", "mish", "exp", "log", "sqrt", "rsqrt", "abs", "square", "pow", "clamp",
               "clamp_min", "clamp_max", "sin", "cos", "erf", "reciprocal", "log1p", "expm1", "logsigmoid",
               "float", "double", "half", "bfloat16", "to", "type")


@rule(*ELEMENTWISE, describe="elementwise: f(x+δ) − f(x) on the changed channels only")
def _elementwise(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    x, d = first(node, deltas)
    y = node.value
    if not is_float(y) or y.shape != x.shape:
        return NotImplemented
    rest, kwargs = constant_arguments(node)
    if d.channels is not None and any(isinstance(t, torch.Tensor) and t.numel() > 1
                                      for t in (*rest, *kwargs.values())):
        d = Delta(d.dense(x))  # tensor arguments broadcast against the whole input, not one gathered channel
    xb = math.base_like(x, d)
    perturbed = node.func(xb + d.values.to(xb.dtype), *rest, **kwargs)
    return Delta(perturbed - math.base_like(y, d), d.channels)


@rule("dropout", "alpha_dropout", "feature_alpha_dropout",
      describe="dropout in training mode: δ times the base evaluation's mask; identity in eval mode")
def _dropout(node, ctx, deltas):
    if not only_first_changes(node, deltas):
        return NotImplemented
    x, d = first(node, deltas)
    if node.noise is not None:  # never re-drawn: the base evaluation's noise, in every form
        if d.perturbed:
            return Delta(d.values * node.noise, perturbed=True)
        return Delta(d.values * math.base_like(node.noise.expand_as(x), d), d.channels)
    if node.rng_state is None and torch.equal(node.value, x):
        return d  # eval mode (or p = 0): the identity
    return NotImplemented


@rule("detach", "contiguous", "clone", "data.__get__", describe="identity: δ unchanged")
def _identity(node, ctx, deltas):
    if not only_first_changes(node, deltas):
        return NotImplemented
    return deltas[node.args[0]]


# ---- batch normalization ----------------------------------------------------------------------------------------
# The statistics every BN consumer reads: engine/statistics.py (bn_statistics, once per node per recording).
def only_user_is_relu(node: Node) -> bool:
    users = [u for u in node.users]
    return (len(users) == 1 and users[0].kind == "call" and canonical(users[0].func) == "relu"
            and users[0].args[0] is node and len(users[0].inputs) == 1)


@rule("batch_norm", describe="exact: per-replica batch statistics formed from δ (train); per-channel scale (eval); "
                             "fused with the following ReLU on a dense δ")
def _batch_norm(node, ctx, deltas):
    if not only_first_changes(node, deltas):
        return NotImplemented
    x, d = first(node, deltas)
    stats = bn_statistics(node, ctx)
    if not stats.training:
        if d.perturbed:
            return NotImplemented
        scale = stats.inv_std if stats.weight is None else stats.inv_std * stats.weight
        return d.scaled(math.per_channel(scale, d, x))
    if d.perturbed:
        return perturbed_batchnorm(node, ctx, d)
    if d.channels is None:
        relu = only_user_is_relu(node)
        out = fused.batchnorm_delta(d.values, stats.centered, stats.root, stats.weight, node.value if relu else None)
        if out is not None:
            return Delta(out, relu_applied=relu)
    return math.batchnorm_train_delta(x, d, stats.weight, (stats.centered, stats.root))


def perturbed_batchnorm(node: Node, ctx: Context, d: Delta) -> Delta:
    """Training-mode BN of the perturbed replicas x + δ, each with its own batch statistics (dense_mode
    'perturbed'), fused with the ReLU after it where the C++ kernel applies. The base batch mean centres the
    kernel's accumulation; the statistics object carries the weight, bias and eps the kernels read."""
    x = node.args[0].value
    relu = only_user_is_relu(node)
    stats = bn_statistics(node, ctx)
    out = fused.batchnorm_replicas(d.perturbed_values(x), stats, stats.mean, relu)
    if out is None:
        return Delta(math.batchnorm_train_perturbed(d.perturbed_values(x), stats), perturbed=True)
    return Delta(out, perturbed=True, relu_applied=relu)


def _normalization_statistics(ctx, node, x: torch.Tensor, dims: tuple[int, ...], eps: float, shape=None):
    """(x − mean, sqrt(var + eps)) of the base input (viewed as `shape`, if given) over `dims` (biased variance,
    keepdim), once per node: what the layer / instance / group norm closed forms divide by."""
    def statistics():
        base = x if shape is None else x.reshape(shape)
        var, mean = torch.var_mean(base, dim=dims, correction=0, keepdim=True)
        return base - mean, torch.sqrt(var + eps)
    return ctx.cached(node, "normalization_statistics", statistics)


@rule("layer_norm", describe="exact: per-sample statistics formed from δ (the BN closed form over the normalized "
                             "axes)")
def _layer_norm(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    a = arguments(node, ("input", "normalized_shape", "weight", "bias", "eps"))
    x, d = first(node, deltas)
    n = len(a["normalized_shape"])
    dims = tuple(range(x.dim() - n, x.dim()))
    eps = a.get("eps", 1e-5)

    centered, root = _normalization_statistics(ctx, node, x, dims, eps)
    weight = value(a.get("weight"))
    out = math.normalization_delta(d.dense(x), centered.unsqueeze(0), root.unsqueeze(0),
                                   tuple(i + 1 for i in dims), weight)
    return Delta(out)


@rule("instance_norm", describe="exact: per-sample, per-channel statistics formed from δ (the BN closed form over the "
                                "spatial axes); keeps one channel")
def _instance_norm(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    a = arguments(node, ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum",
                         "eps"))
    x, d = first(node, deltas)
    if not a.get("use_input_stats", True) or x.dim() < 3:
        return NotImplemented  # running statistics: the generic path (rare: InstanceNorm with track_running_stats)
    spatial = tuple(range(2, x.dim()))
    eps = a.get("eps", 1e-5)

    centered, root = _normalization_statistics(ctx, node, x, spatial, eps)
    weight = value(a.get("weight"))
    first_spatial = 2 if d.channels is not None else 3
    reduce = tuple(range(first_spatial, d.values.dim()))
    gamma = None if weight is None else math.per_channel(weight, d, x)
    out = math.normalization_delta(d.values, math.base_like(centered, d), math.base_like(root, d), reduce, gamma)
    return Delta(out, d.channels)


@rule("group_norm", describe="exact: per-sample, per-group statistics formed from δ (the BN closed form)")
def _group_norm(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    a = arguments(node, ("input", "num_groups", "weight", "bias", "eps"))
    x, d = first(node, deltas)
    groups, eps = a["num_groups"], a.get("eps", 1e-5)
    grouped = (x.shape[0], groups, -1)

    centered, root = _normalization_statistics(ctx, node, x, (2,), eps, grouped)
    k = d.replicas
    out = math.normalization_delta(d.dense(x).reshape(k, *grouped), centered.unsqueeze(0), root.unsqueeze(0),
                                   (3,), None).reshape(k, *x.shape)
    weight = value(a.get("weight"))
    if weight is not None:
        out = out * weight.view(1, 1, -1, *([1] * (x.dim() - 2)))
    return Delta(out)


# ---- mixing ops -------------------------------------------------------------------------------------------------
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def conv_geometry(node: Node) -> dict:
    a = arguments(node, CONV_ARGS)
    return {"stride": a.get("stride", 1), "padding": a.get("padding", 0), "dilation": a.get("dilation", 1),
            "groups": a.get("groups", 1)}


@rule("conv1d", "conv2d", "conv3d", describe="linear in the input: conv(δ, W); a one-channel δ costs 1/C_in")
def _conv(node, ctx, deltas):
    if not only_first_changes(node, deltas):
        return NotImplemented
    x, d = first(node, deltas)
    weight = value(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
    geometry = conv_geometry(node)
    if d.perturbed:
        out = math.per_sample_apply(lambda t: math.conv_channels_last(t, node.func, weight, value(
            arguments(node, CONV_ARGS).get("bias")), geometry), d.values)
        return Delta(out, perturbed=True)
    if ctx.one_channel_conv is not None and d.channels is not None and node.func is F.conv2d:
        mixed = ctx.one_channel_conv(d, weight, geometry, ctx.kernel_backend)
        if mixed is not None:
            return mixed
    out = math.conv_delta(d, x, node.func, weight, geometry)
    if ctx.dense_mode == "perturbed" and out.channels is None:
        return Delta(node.value.unsqueeze(0) + out.values, perturbed=True)
    return out


@rule("linear", describe="linear in the input: δ Wᵀ (a one-feature δ: an outer product)")
def _linear(node, ctx, deltas):
    if not only_first_changes(node, deltas):
        return NotImplemented
    x, d = first(node, deltas)
    weight = value(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
    if d.perturbed:
        bias = value(node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        return Delta(F.linear(d.values, weight, bias), perturbed=True)
    if x.dim() != 2 and d.channels is not None:
        d = Delta(d.dense(x))
    return math.linear_delta(d, weight)


@rule("matmul", describe="bilinear: δa·b + a·δb + δa·δb")
def _matmul(node, ctx, deltas):
    if len(node.args) != 2 or node.kwargs:
        return NotImplemented
    a, b = node.args
    da = _dense_or_none(a, deltas)
    db = _dense_or_none(b, deltas)
    if da is NotImplemented or db is NotImplemented:
        return NotImplemented
    # batched over the replica axis with vmap: a leading axis would change what matmul means for a vector operand
    def times(x, y, x_changes, y_changes):
        return torch.vmap(torch.matmul, in_dims=(0 if x_changes else None, 0 if y_changes else None))(x, y)
    return _shaped(_bilinear(value(a), value(b), da, db, times), node)


def _bilinear(a, b, da, db, times) -> torch.Tensor | None:
    """δ(a∘b) = δa∘b + a∘δb + δa∘δb for a bilinear ∘ given as times(x, y, x_changes, y_changes): exact, no two
    nearly equal products are subtracted. None when neither operand changed."""
    terms = []
    if da is not None:
        terms.append(times(da, b, True, False))
    if db is not None:
        terms.append(times(a, db, False, True))
    if da is not None and db is not None:
        terms.append(times(da, db, True, True))
    return sum(terms[1:], terms[0]) if terms else None


def _dense_or_none(x, deltas):
    if not isinstance(x, Node) or x not in deltas:
        return None
    d = deltas[x]
    if d.perturbed or not is_float(x.value):
        return NotImplemented
    return d.dense(x.value)


def _shaped(out: torch.Tensor | None, node: Node):
    """δ with the replica axis in front and the output's shape, or NotImplemented (broadcasting moved an axis)."""
    if out is None:
        return None
    base = node.value
    if out.shape[1:] != base.shape:
        if out.dim() == base.dim() + 1 and out.shape[0] >= 1:
            try:
                return Delta(out.expand(out.shape[0], *base.shape).contiguous())
            except RuntimeError:
                return NotImplemented
        return NotImplemented
    return Delta(out)


# ---- arithmetic ---------------------------------------------------------------------------------------------------
def _lift(t: torch.Tensor, base_dim: int, out_dim: int) -> torch.Tensor:
    """A [K, *shape] delta viewed with singleton axes after K so it broadcasts like its base against out_dim axes."""
    return t.view(t.shape[0], *([1] * (out_dim - base_dim)), *t.shape[1:])


def _binary_terms(node: Node, deltas: dict):
    """(a, b, δa, δb) with δ None where the operand did not change; NotImplemented where a δ is not dense-able."""
    if len(node.args) < 2:
        return NotImplemented
    a, b = node.args[0], node.args[1]
    da, db = _dense_or_none(a, deltas), _dense_or_none(b, deltas)
    if da is NotImplemented or db is NotImplemented:
        return NotImplemented
    out_dim = node.value.dim()
    if da is not None:
        da = _lift(da, value(a).dim(), out_dim)
    if db is not None:
        db = _lift(db, value(b).dim() if isinstance(value(b), torch.Tensor) else 0, out_dim)
    return value(a), value(b), da, db


def _channel_add(node: Node, deltas: dict):
    """a + b where only one operand changes in one channel and the other has the output's shape or is a number:
    δ unchanged (keeps one channel)."""
    a, b = node.args[0], node.args[1]
    changed = [x for x in (a, b) if isinstance(x, Node) and x in deltas]
    if len(changed) != 1 or len(node.args) > 2 or node.kwargs:
        return None
    d = deltas[changed[0]]
    if d.channels is None or d.perturbed or changed[0].value.shape != node.value.shape:
        return None
    return d


@rule("add", describe="linear: δa + α·δb (fused with a following ReLU on dense residual deltas)")
def _add(node, ctx, deltas):
    if not is_float(node.value):
        return NotImplemented
    kept = _channel_add(node, deltas)
    if kept is not None:
        return kept
    both = [x for x in node.args[:2] if isinstance(x, Node) and x in deltas]
    if (len(both) == 2 and deltas[both[0]].channels is not None and deltas[both[1]].channels is not None
            and torch.equal(deltas[both[0]].channels, deltas[both[1]].channels)
            and both[0].value.shape == both[1].value.shape and not node.kwargs):
        return Delta(deltas[both[0]].values + deltas[both[1]].values, deltas[both[0]].channels)
    fused_result = _fused_residual_relu(node, deltas)
    if fused_result is not None:
        return fused_result
    terms = _binary_terms(node, deltas)
    if terms is NotImplemented or set(node.kwargs) - {"alpha"}:
        return NotImplemented
    _, _, da, db = terms
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if db is not None and alpha != 1:
        db = db * alpha
    return _shaped(da if db is None else (db if da is None else da + db), node)


def _fused_residual_relu(node: Node, deltas: dict) -> Delta | None:
    """a + b followed by its only user, a ReLU, on dense deltas: both rules in one pass of the C++ kernel."""
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, Node) for a in node.args):
        return None
    if not only_user_is_relu(node):
        return None
    present = [deltas[a] for a in node.args if a in deltas]
    if any(d.channels is not None or d.perturbed for d in present):
        return None
    if node.args[0].value.shape != node.args[1].value.shape or node.args[0].value.shape != node.value.shape:
        return None
    out = fused.residual_relu_delta(present[0].values, present[1].values if len(present) == 2 else None,
                                    node.value)
    return None if out is None else Delta(out, relu_applied=True)


@rule("sub", "rsub", describe="linear: ±δa ∓ δb")
def _sub(node, ctx, deltas):
    terms = _binary_terms(node, deltas)
    if terms is NotImplemented or node.kwargs or not is_float(node.value):
        return NotImplemented
    _, _, da, db = terms
    if canonical_name(node) == "rsub":
        da, db = db, da
    out = da if db is None else (-db if da is None else da - db)
    return _shaped(out, node)


@rule("neg", describe="linear: −δ")
def _neg(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    d = deltas[node.args[0]]
    return Delta(-d.values, d.channels)


@rule("mul", describe="exact: δa·b + a·δb + δa·δb; by a constant per channel keeps one channel")
def _mul(node, ctx, deltas):
    if not is_float(node.value) or node.kwargs:
        return NotImplemented
    kept = _channel_scale(node, deltas, torch.mul, commutative=True)
    if kept is not None:
        return kept
    terms = _binary_terms(node, deltas)
    if terms is NotImplemented:
        return NotImplemented
    a, b, da, db = terms
    return _shaped(_bilinear(a, b, da, db, lambda x, y, *_: x * y), node)


@rule("div", describe="linear in the numerator: δa / b")
def _div(node, ctx, deltas):
    if not is_float(node.value) or node.kwargs:
        return NotImplemented
    if isinstance(node.args[1], Node) and node.args[1] in deltas:
        return NotImplemented
    kept = _channel_scale(node, deltas, torch.div, commutative=False)
    if kept is not None:
        return kept
    terms = _binary_terms(node, deltas)
    if terms is NotImplemented:
        return NotImplemented
    _, b, da, _ = terms
    return _shaped(da / b, node)


def _channel_scale(node: Node, deltas: dict, op, commutative: bool) -> Delta | None:
    """x ∘ c with c constant (a number, or a tensor of the output's shape or broadcasting per channel) on a
    one-channel δ of x: stays one channel."""
    if len(node.args) != 2:
        return None
    x, c = node.args
    if commutative and not (isinstance(x, Node) and x in deltas):
        x, c = c, x
    if not (isinstance(x, Node) and x in deltas) or (isinstance(c, Node) and c in deltas):
        return None
    d = deltas[x]
    if d.channels is None or d.perturbed or x.value.shape != node.value.shape:
        return None
    c = value(c)
    if isinstance(c, torch.Tensor):
        if c.dim() > x.value.dim():
            return None
        c = math.base_like(c.expand_as(x.value), d)
    return Delta(op(d.values, c), d.channels)


# ---- softmax and normalization ------------------------------------------------------------------------------------
def _softmax_operands(node: Node, deltas: dict):
    """(base input, its dense δ, the softmax axis on the [K, ...] replicas), or None where the closed form does not
    cover the call (another input changed, a dtype cast, a perturbed-form δ)."""
    if (not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed or node.kwargs.get("dtype")
            or len(node.args) > 2):
        return None
    x, d = first(node, deltas)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dim is None or node.value.dtype != x.dtype:
        return None
    return x, d.dense(x), dim % x.dim() + 1


@rule("softmax", describe="exact: p ⊙ (expm1(δ) − Σp·expm1(δ)) / (1 + Σp·expm1(δ))")
def _softmax(node, ctx, deltas):
    operands = _softmax_operands(node, deltas)
    if operands is None:
        return NotImplemented
    _, dense, dim = operands
    p = node.value.unsqueeze(0)
    e = torch.expm1(dense)
    s = (p * e).sum(dim=dim, keepdim=True)
    return Delta(p * (e - s) / (1 + s))


@rule("log_softmax", describe="exact: δ − log1p(Σp·expm1(δ))")
def _log_softmax(node, ctx, deltas):
    operands = _softmax_operands(node, deltas)
    if operands is None:
        return NotImplemented
    _, dense, dim = operands
    p = node.value.exp().unsqueeze(0)
    return Delta(dense - torch.log1p((p * torch.expm1(dense)).sum(dim=dim, keepdim=True)))


# ---- structure: views, indexing, concatenation, padding, pooling -------------------------------------------------
RESHAPES = ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as")


@rule(*RESHAPES, describe="linear: δ reshaped like the output (one channel kept where the spatial size is 1)")
def _reshape(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    x, d = first(node, deltas)
    y = node.value
    if d.channels is not None and y.dim() == 2 and x[0, 0].numel() == 1 and y.shape == (x.shape[0], x.shape[1]):
        return Delta(d.values.reshape(d.replicas, x.shape[0]), d.channels)
    return Delta(d.dense(x).reshape(d.replicas, *y.shape))


STRUCTURAL = ("permute", "transpose", "t", "movedim", "unsqueeze", "squeeze", "expand", "expand_as", "repeat",
              "flip", "roll", "narrow", "select", "split", "chunk", "unbind", "tensor_split", "mean", "sum",
              "unfold", "pixel_shuffle", "pixel_unshuffle", "diagonal", "tril", "triu", "masked_fill", "where")


@rule(*STRUCTURAL, describe="linear: the same op on δ, batched over replicas (torch.vmap)")
def _structural(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    name = canonical_name(node)
    if name in ("masked_fill", "where"):
        return NotImplemented  # affine in their fill value: the generic path
    if name in ("mean", "sum") and node.kwargs.get("dtype") is not None:
        return NotImplemented
    x, d = first(node, deltas)
    rest, kwargs = constant_arguments(node)
    out = torch.vmap(lambda t: node.func(t, *rest, **kwargs))(d.dense(x))
    return _as_delta(out, node)


def _as_delta(out, node: Node):
    if isinstance(out, torch.Tensor):
        return _shaped(out, node)
    return MultiDelta([Delta(o) for o in out])


@rule("getitem", describe="indexing: the same index on δ; spatial slicing keeps one channel")
def _getitem(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    x, d = first(node, deltas)
    index = node.args[1]
    if isinstance(index, Node):
        index = index.value
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, Node) for i in index):
        return NotImplemented
    if (d.channels is not None and len(index) >= 2 and all(isinstance(i, slice) and i == slice(None)
                                                             for i in index[:2])
            and all(isinstance(i, (slice, int)) or i is Ellipsis for i in index[2:])):
        values = d.values[(slice(None), slice(None)) + index[2:]]
        if values.shape[1:] == (node.value.shape[0], *node.value.shape[2:]):
            return Delta(values, d.channels)
    try:
        out = d.dense(x)[(slice(None),) + index]
    except (IndexError, RuntimeError, TypeError):
        return NotImplemented
    return _shaped(out, node)


@rule("cat", describe="linear: δ concatenated with zeros; one channel kept when concatenating channels")
def _cat(node, ctx, deltas):
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(tensors, (list, tuple)) or set(node.kwargs) - {"dim", "tensors"}:
        return NotImplemented
    # torch.cat skips 1-D empty tensors (an empty KV cache, for one): so does δ
    tensors = [t for t in tensors if not (value(t).dim() == 1 and value(t).numel() == 0)]
    changed = [t for t in tensors if isinstance(t, Node) and t in deltas]
    if any(deltas[t].perturbed for t in changed):
        return NotImplemented
    out_dim = node.value.dim()
    dim = dim % out_dim
    if dim == 1 and len(changed) == 1 and deltas[changed[0]].channels is not None:
        offset = 0
        for t in tensors:
            if t is changed[0]:
                break
            offset += value(t).shape[1]
        d = deltas[changed[0]]
        return Delta(d.values, d.channels + offset)
    k = deltas[changed[0]].replicas
    parts = [deltas[t].dense(t.value) if isinstance(t, Node) and t in deltas
             else value(t).new_zeros((k, *value(t).shape)).expand(k, *value(t).shape) for t in tensors]
    return _shaped(torch.cat(parts, dim=dim + 1), node)


@rule("stack", describe="linear: δ stacked with zeros")
def _stack(node, ctx, deltas):
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(tensors, (list, tuple)) or set(node.kwargs) - {"dim"}:
        return NotImplemented
    changed = [t for t in tensors if isinstance(t, Node) and t in deltas]
    if any(deltas[t].perturbed for t in changed):
        return NotImplemented
    k = deltas[changed[0]].replicas
    parts = [deltas[t].dense(t.value) if isinstance(t, Node) and t in deltas
             else value(t).new_zeros((k, *value(t).shape)) for t in tensors]
    return _shaped(torch.stack(parts, dim=dim % node.value.dim() + 1), node)


@rule("pad", describe="linear (fill value 0 for δ); channel padding keeps one channel")
def _pad(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    a = arguments(node, ("input", "pad", "mode", "value"))
    x, d = first(node, deltas)
    pad, mode = list(a["pad"]), a.get("mode", "constant")
    spatial = x.dim() - 2
    channel_pad = pad[2 * spatial:2 * spatial + 2] if len(pad) > 2 * spatial else [0, 0]
    if d.channels is not None and mode == "constant" and len(pad) <= 2 * (spatial + 1) and min(channel_pad) >= 0:
        values = d.values
        if any(pad[:2 * spatial]):
            values = F.pad(values, pad[:2 * spatial], "constant", 0.0)
        return Delta(values, d.channels + channel_pad[0])
    k, batch = d.replicas, x.shape[0]
    if len(pad) > 2 * (x.dim() - 1):
        return NotImplemented
    dense = d.dense(x).reshape(k * batch, *x.shape[1:])
    out = F.pad(dense, pad, mode, 0.0) if mode == "constant" else F.pad(dense, pad, mode)
    return _shaped(out.view(k, batch, *out.shape[1:]), node)


LINEAR_POOLS = ("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                "adaptive_avg_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear")


@rule(*LINEAR_POOLS, describe="linear, channel by channel: the op on δ; keeps one channel")
def _linear_pool(node, ctx, deltas):
    if not only_first_changes(node, deltas):
        return NotImplemented
    x, d = first(node, deltas)
    rest, kwargs = constant_arguments(node)
    fn = lambda t: node.func(t, *rest, **kwargs)  # noqa: E731
    if d.perturbed:
        return Delta(math.per_sample_apply(fn, d.values), perturbed=True)
    return math.per_replica_linear(fn, d, x)


MAX_POOLS = ("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d")


@rule(*MAX_POOLS, describe="channel by channel: pool(x+δ) − pool(x) on the changed channels only")
def _max_pool(node, ctx, deltas):
    if not only_first_changes(node, deltas) or not isinstance(node.value, torch.Tensor):
        return NotImplemented
    x, d = first(node, deltas)
    rest, kwargs = constant_arguments(node)
    fn = lambda t: node.func(t, *rest, **kwargs)  # noqa: E731
    if d.perturbed:
        return Delta(math.per_sample_apply(fn, d.values), perturbed=True)
    return math.channel_nonlinear(fn, d, x, node.value)


# ---- losses ---------------------------------------------------------------------------------------------------------
CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


@rule("cross_entropy", describe="exact: log1p(Σ p_j expm1(δz_j)) − δz_y per sample (mean / sum, ignore_index)")
def _cross_entropy(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    a = arguments(node, CE_ARGS)
    logits, d = first(node, deltas)
    target = value(a["target"])
    if (value(a.get("weight")) is not None or a.get("label_smoothing", 0.0) or a.get("size_average") is not None
            or a.get("reduce") is not None or logits.dim() < 2 or target.dtype != torch.long
            or target.shape != (logits.shape[0], *logits.shape[2:])
            or a.get("reduction", "mean") not in ("mean", "sum")):
        return NotImplemented
    if logits.dim() > 2:  # per-pixel / per-token classes: one row per position, classes last (as torch reduces)
        classes = logits.shape[1]
        logits, target = logits.movedim(1, -1).reshape(-1, classes), target.reshape(-1)
        d = (Delta(d.values.reshape(d.replicas, -1), d.channels) if d.channels is not None else
             Delta(d.values.movedim(2, -1).reshape(d.replicas, -1, classes)))
    change = math.cross_entropy_delta(logits, target, d, a.get("ignore_index", -100), a.get("reduction", "mean"))
    return Delta(change.to(node.value.dtype))


@rule("mse_loss", describe="exact: mean[δ·(2(y − t) + δ)]")
def _mse(node, ctx, deltas):
    if not only_first_changes(node, deltas) or deltas[node.args[0]].perturbed:
        return NotImplemented
    a = arguments(node, ("input", "target", "size_average", "reduce", "reduction"))
    outputs, d = first(node, deltas)
    target = value(a["target"])
    if (a.get("reduction", "mean") != "mean" or not isinstance(target, torch.Tensor)
            or target.shape != outputs.shape or a.get("size_average") is not None or a.get("reduce") is not None):
        return NotImplemented
    return Delta(math.mse_delta(outputs, target.to(outputs.dtype), d).to(node.value.dtype))


def canonical_name(node: Node) -> str:
    return canonical(node.func)
