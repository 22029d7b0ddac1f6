"""The delta engine's op rules and parameter seeds as an OpInfo-style table (issues 12 and 16): every row is an op
called the way models call it, with sample inputs. Each row is recorded with the engine's own tape
(`tape.record`, a parameter feeding the op's input through `.clone()`), carried through the registry
(`propagate.node_delta`; `seeds.seed_delta` for the seeds) and compared with the obviously-correct twin
`reference.engine_ref.op_delta_ref`: fn(x + δ_k) − fn(x) with both sides evaluated in float64 and subtracted.

Delta forms: dense δ [K, B, ...]; one-channel δ (`values` [K, B, *spatial], `channels` [K]) wherever the input has
a channel axis; perturbed form (`values` = x + δ, dense_mode='perturbed'). Rows with 4-D inputs run in two
layouts: as the model left them, and channels-last as `cge_engine.record_base` stores them (dense δ in
channels-last rows, what the fused CPU kernels accept). `generic=True` marks calls the registry rule declines by
design; every other row asserts that its rule served the call (delta forms), so a fast path that silently stops
applying fails here.

Tolerances (none fitted to a machine). Notation: J the Jacobian of f in all its float operands (inputs, and the
op's weights and tensor constants), formed by autograd in float64; n the nonzeros of J's row (how many operands the
output element reads: the length of the longest sum forming it); u the unit roundoff of the arithmetic, u_out that
of f's output dtype.
- float64: per output element, |rule − twin| ≤ 4·(n + 2)·u·(|J(x)|·|z| + |J(x+δ)|·|z+δ|) + 4·u_out·(|f(x)| +
  |f(x+δ)|) [+ 4·u·(|x| + |x+δ|) where f keeps its input's shape]. Derivation: a float evaluation of a sum of n
  terms is the exact sum of terms each perturbed by at most γ_n ≈ n·u relatively (Higham, Accuracy and Stability
  of Numerical Algorithms, §3–4): f at operands perturbed by n·u·|z|, which moves the output by ≤ n·u·|J|·|z| to
  first order; libm and the final rounding add ≤ 2 ulps of the output, or of the intermediates of a composite
  pointwise function (x·Φ(x) is computed from |x|-sized values where it is near 0). The twin makes two such
  evaluations and a subtraction; a rule makes no more (its closed forms work on δ, no larger than x); the factor
  4 covers both sides.
- float32, rules with a closed form or linear in δ: the rule's max error against the float64 twin (at the same
  float32 x and δ) is at most that of the plain float32 difference f(fl(x + δ)) − f(x), measured in the same test,
  or one rounding of the output (u·max|f(x)|), whichever is larger.
- float32, paths that evaluate f(x + δ) − f(x) themselves (the generic path, the elementwise and max-pool rules,
  every perturbed form): another kernel instance computes the plain difference (a vectorized body instead of a
  scalar tail, a batched shape), so one draw of its error is as likely above the plain one's as below; these are
  held to the bound above with u = 2⁻²⁴ instead.
The float32 checks use δ of CGE size (|δ| ≤ 1e-3·range(x)), where the rules exist to avoid the plain difference's
cancellation; float64 is checked at that size and at |δ| up to 10 % of the input range.

Inputs are drawn fresh each run from ZOKERNELS_TEST_SEED (default: a new random seed, printed in every failure
message; set it to replay one).
"""
from __future__ import annotations

import copy
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from zokernels.engine import cge_engine
from zokernels.engine.delta import Delta
from zokernels.engine.ops import canonical
from zokernels.engine.propagate import node_delta
from zokernels.engine.rules import RULES, Context, MultiDelta
from zokernels.engine.seeds import _SEEDS, dense_parameter_delta, seed_delta
from zokernels.engine.tape import Node, record
from zokernels.reference.engine_ref import op_delta_ref

SEED = int(os.environ.get("ZOKERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
K = 3                     # replicas (coordinates) per pass
B, C, H, W = 3, 4, 5, 5   # batch, channels, spatial
L, T, FEAT = 6, 5, 8      # 1-D length, sequence length, features
SMALL, LARGE = 1e-3, 0.1  # |δ| as a fraction of the input range: CGE-sized, and large


def _constants():
    g = torch.Generator().manual_seed(1234)

    def const(*shape, lo=-1.0, hi=1.0):
        """A float32-representable constant stored in float64: the float32 and float64 builds of an entry compute
        the same function."""
        return (torch.rand(*shape, generator=g) * (hi - lo) + lo).float().double()

    def module(m: nn.Module, train: bool = True) -> nn.Module:
        m = m.float()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(const(*p.shape, lo=0.5, hi=1.5) if p.dim() == 1 and "norm" in type(m).__name__.lower()
                        else const(*p.shape))
            for name, b in m.named_buffers():
                if b.is_floating_point():
                    b.copy_(const(*b.shape, lo=0.5, hi=1.5) if "var" in name else const(*b.shape))
        return m.train(train)

    return g, const, module


_G, const, _module = _constants()


@dataclass
class Case:
    """One table row: the op (canonical name whose rule it exercises), how a model calls it, its sample inputs."""

    id: str
    op: str
    build: Callable[[torch.dtype], Callable]  # dtype -> fn(*inputs), constants in that dtype
    shapes: tuple
    changed: tuple = (0,)      # which inputs get a δ
    domain: tuple = (-2.0, 2.0)
    generic: bool = False      # the registry rule declines this call by design: the generic path serves it
    random: bool = False       # draws random numbers (dropout): every evaluation starts from one seed
    direct: tuple | None = None  # (func, args after x, kwargs): a Node built by hand (names no model call records)

    def forms(self) -> tuple:
        first = self.shapes[self.changed[0]]
        return ("dense", "channel", "perturbed") if len(first) >= 2 else ("dense", "perturbed")


CASES: list[Case] = []


def case(id, op, fn=None, shapes=((B, C, H, W),), *, module=None, **kw):
    if module is not None:
        build = lambda dtype, m=module: copy.deepcopy(m).to(dtype)  # noqa: E731
    else:
        build = lambda dtype, f=fn: f  # noqa: E731  (fn casts its constants to its input's dtype)
    CASES.append(Case(id, op, build, tuple(tuple(s) for s in shapes), **kw))


X4, X3, X2, SEQ = (B, C, H, W), (B, C, L), (B, FEAT), (B, T, FEAT)
POS = (0.5, 2.5)

# ---- elementwise ------------------------------------------------------------------------------------------------
case("relu", "relu", F.relu)
case("nn.ReLU(inplace=True)", "relu", module=nn.ReLU(inplace=True))
case("x.relu_()", "relu", lambda x: x.relu_())
case("tanh", "tanh", torch.tanh, [SEQ])
case("nn.Tanh", "tanh", module=nn.Tanh(), shapes=[X2])
case("gelu", "gelu", F.gelu)
case("gelu-tanh", "gelu", lambda x: F.gelu(x, approximate="tanh"), [SEQ])
case("silu", "silu", F.silu)
case("sigmoid", "sigmoid", lambda x: x.sigmoid(), [X2])
case("nn.Hardswish(inplace=True)", "hardswish", module=nn.Hardswish(inplace=True))
case("hardsigmoid", "hardsigmoid", F.hardsigmoid)
case("relu6", "relu6", F.relu6, domain=(-3.0, 9.0))
case("nn.ReLU6(inplace=True)", "hardtanh", module=nn.ReLU6(inplace=True), domain=(-3.0, 9.0))
case("hardtanh", "hardtanh", lambda x: F.hardtanh(x, -1.0, 1.0))
case("leaky_relu", "leaky_relu", lambda x: F.leaky_relu(x, 0.1))
case("nn.LeakyReLU(inplace=True)", "leaky_relu", module=nn.LeakyReLU(0.2, inplace=True))
case("elu", "elu", F.elu)
case("selu", "selu", F.selu)
case("celu", "celu", lambda x: F.celu(x, 0.5))
case("softplus", "softplus", lambda x: F.softplus(x, beta=2.0))
case("mish", "mish", F.mish)
case("exp", "exp", torch.exp)
case("log", "log", torch.log, domain=POS)
case("sqrt", "sqrt", lambda x: x.sqrt(), domain=POS)
case("rsqrt", "rsqrt", torch.rsqrt, domain=POS)
case("abs", "abs", torch.abs)
case("square", "square", lambda x: x.square())
case("x**2", "pow", lambda x: x ** 2)
case("pow(x, 0.5)", "pow", lambda x: torch.pow(x, 0.5), domain=POS)
case("pow(x, e per channel)", "pow", lambda x, c0=const(1, C, 1, 1, lo=0.5, hi=2.0): x.pow(c0.to(x.dtype)), domain=POS)
case("pow(2, x)", "pow", lambda x: torch.pow(2.0, x), generic=True)  # the base is a number: not x's rule
case("clamp", "clamp", lambda x: x.clamp(-0.5, 0.5))
case("clip", "clamp", lambda x: torch.clip(x, min=-1.0))
case("clamp(min per channel)", "clamp", lambda x, c0=const(1, C, 1, 1): x.clamp(min=c0.to(x.dtype)))
case("clamp_min", "clamp_min", lambda x: x.clamp_min(0.1))
case("clamp_max", "clamp_max", lambda x: torch.clamp_max(x, 0.1))
case("sin", "sin", torch.sin)
case("cos", "cos", lambda x: x.cos())
case("erf", "erf", torch.erf)
case("reciprocal", "reciprocal", lambda x: x.reciprocal(), domain=POS)
case("log1p", "log1p", torch.log1p, domain=POS)
case("expm1", "expm1", torch.expm1)
case("logsigmoid", "logsigmoid", F.logsigmoid)
case("x.float()", "float", lambda x: x.float())
case("x.double()", "double", lambda x: x.double())
case("x.half()", "half", lambda x: x.half())
case("x.bfloat16()", "bfloat16", lambda x: x.bfloat16())
case("x.to(float64)", "to", lambda x: x.to(torch.float64))
case("x.to(dtype=float16)", "to", lambda x: x.to(dtype=torch.float16))
case("x.type(float64)", "type", lambda x: x.type(torch.float64))
# c.to(x) reads only x's dtype and device: a constant of the tape, so the product keeps the mul rule
case("x * c.to(x)", "mul", lambda x, c0=const(*X4): x * c0.to(x))

# ---- dropout and identities --------------------------------------------------------------------------------------
case("F.dropout(train)", "dropout", lambda x: F.dropout(x, 0.3, training=True), random=True)
case("nn.Dropout(train)", "dropout", module=nn.Dropout(0.3), shapes=[SEQ], random=True)
case("F.dropout(inplace)", "dropout", lambda x: F.dropout(x, 0.3, True, True), random=True)
case("nn.Dropout2d(train)", "dropout", module=nn.Dropout2d(0.5), random=True)
case("F.dropout(eval)", "dropout", lambda x: F.dropout(x, 0.3, training=False))
# alpha dropout is affine given its mask, not linear: the generic path replays the base evaluation's RNG state
case("alpha_dropout(train)", "alpha_dropout", lambda x: F.alpha_dropout(x, 0.2, True), random=True, generic=True)
case("feature_alpha_dropout(train)", "feature_alpha_dropout", lambda x: F.feature_alpha_dropout(x, 0.2, True),
     random=True, generic=True)
case("detach", "detach", lambda x: x.detach())
case("contiguous", "contiguous", lambda x: x.transpose(1, 2).contiguous())
case("clone", "clone", lambda x: x.clone() * 1.0)
case("x.data", "data.__get__", lambda x: x.data)

# ---- normalization ------------------------------------------------------------------------------------------------
bn2 = _module(nn.BatchNorm2d(C))
case("BatchNorm2d(train)", "batch_norm", module=bn2)
case("BatchNorm2d(eval)", "batch_norm", module=_module(nn.BatchNorm2d(C), train=False))
case("BatchNorm2d(train)+ReLU", "batch_norm", module=nn.Sequential(copy.deepcopy(bn2), nn.ReLU()))
case("BatchNorm2d(affine=False)", "batch_norm", module=_module(nn.BatchNorm2d(C, affine=False)))
case("F.batch_norm(no running stats)", "batch_norm",
     lambda x, c0=const(C), c1=const(C): F.batch_norm(x, None, None, c0.to(x.dtype), c1.to(x.dtype), training=True))
case("BatchNorm1d(train)[B,F]", "batch_norm", module=_module(nn.BatchNorm1d(FEAT)), shapes=[X2])
case("BatchNorm1d(train)[B,C,L]", "batch_norm", module=_module(nn.BatchNorm1d(C)), shapes=[X3])
case("BatchNorm1d(eval)[B,C,L]", "batch_norm", module=_module(nn.BatchNorm1d(C), train=False), shapes=[X3])
case("layer_norm((8,), w, b)", "layer_norm",
     lambda x, c0=const(FEAT), c1=const(FEAT): F.layer_norm(x, (FEAT,), c0.to(x.dtype), c1.to(x.dtype)), [SEQ])
case("nn.LayerNorm((H,W))", "layer_norm", module=_module(nn.LayerNorm((H, W))))
case("layer_norm(no affine)", "layer_norm", lambda x: F.layer_norm(x, (FEAT,)), [X2])
case("nn.GroupNorm(2,C)", "group_norm", module=_module(nn.GroupNorm(2, C)))
case("group_norm(no affine)[B,C,L]", "group_norm", lambda x: F.group_norm(x, 4), [X3])
case("nn.InstanceNorm2d(affine)", "instance_norm", module=_module(nn.InstanceNorm2d(C, affine=True)))
case("instance_norm(no affine)[B,C,L]", "instance_norm", lambda x: F.instance_norm(x), [X3])

# ---- convolutions, linear, matmul -------------------------------------------------------------------------------
case("Conv2d(3x3,pad1)", "conv2d", module=_module(nn.Conv2d(C, 6, 3, padding=1, bias=False)))
case("Conv2d(stride2,bias)", "conv2d", module=_module(nn.Conv2d(C, 6, 3, stride=2, padding=1)))
case("Conv2d(dilation2)", "conv2d", module=_module(nn.Conv2d(C, 5, 3, padding=2, dilation=2)))
case("Conv2d(groups2)", "conv2d", module=_module(nn.Conv2d(C, 6, 3, padding=1, groups=2)))
case("Conv2d(depthwise)", "conv2d", module=_module(nn.Conv2d(C, 2 * C, 3, padding=1, groups=C)))
case("Conv2d(padding=same)", "conv2d", module=_module(nn.Conv2d(C, 3, 3, padding="same")))
case("Conv2d(reflect)", "conv2d", module=_module(nn.Conv2d(C, 3, 3, padding=1, padding_mode="reflect")))
case("Conv2d(1x1)", "conv2d", module=_module(nn.Conv2d(C, 6, 1, bias=False)))
case("Conv1d(pad1)", "conv1d", module=_module(nn.Conv1d(C, 6, 3, padding=1)), shapes=[X3])
case("Conv1d(stride2,groups2)", "conv1d", module=_module(nn.Conv1d(C, 6, 3, stride=2, groups=2)), shapes=[X3])
case("Conv3d", "conv3d", module=_module(nn.Conv3d(C, 3, 3, padding=1)), shapes=[(2, C, 3, 4, 4)])
case("Linear[B,F]", "linear", module=_module(nn.Linear(FEAT, 5)), shapes=[X2])
case("Linear[B,T,F]", "linear", module=_module(nn.Linear(FEAT, 5)), shapes=[SEQ])
case("x @ W", "matmul", lambda x, c0=const(FEAT, 5): x @ c0.to(x.dtype), [X2])
case("W @ x", "matmul", lambda x, c0=const(5, B): c0.to(x.dtype) @ x, [X2])
case("a @ b, both change", "matmul", lambda a, b: a @ b, [(B, T, FEAT), (B, FEAT, 4)], changed=(0, 1))
case("q @ k^T from one input", "matmul", lambda x: x[..., :4] @ x[..., 4:].transpose(-2, -1), [SEQ])
case("bmm, both change", "matmul", lambda a, b: torch.bmm(a, b), [(B, T, FEAT), (B, FEAT, 4)], changed=(0, 1))
case("mm(x, W)", "matmul", lambda x, c0=const(FEAT, 5): torch.mm(x, c0.to(x.dtype)), [X2])
case("x[B,T,F] @ W", "matmul", lambda x, c0=const(FEAT, 5): x.matmul(c0.to(x.dtype)), [SEQ])
case("A @ v (vector changes)", "matmul", lambda v, c0=const(5, FEAT): c0.to(v.dtype) @ v, [(FEAT,)])
case("v @ A (vector changes)", "matmul", lambda v, c0=const(FEAT, 5): v @ c0.to(v.dtype), [(FEAT,)])

# ---- arithmetic --------------------------------------------------------------------------------------------------
case("x + c", "add", lambda x, c0=const(*X4): x + c0.to(x.dtype))
case("x + 1", "add", lambda x: x + 1.0)
case("x + bias[C,1,1]", "add", lambda x, c0=const(C, 1, 1): x + c0.to(x.dtype))
case("c[C,1,1] + x", "add", lambda x, c0=const(C, 1, 1): c0.to(x.dtype) + x)
case("x + y, both change", "add", lambda x, y: x + y, [X4, X4], changed=(0, 1))
case("x + y, y changes", "add", lambda x, y: x + y, [X4, X4], changed=(1,))
case("add(x, y, alpha=2)", "add", lambda x, y: torch.add(x, y, alpha=2.0), [X4, X4], changed=(0, 1))
case("x + 2x, same channel", "add", lambda x: x + x * 2.0)
case("v[C] + x[B,C] broadcast", "add", lambda v, c0=const(B, C): v + c0.to(v.dtype), [(C,)])
case("out += identity; relu", "add",
     lambda x, c0=const(C, C, 3, 3): F.relu(F.conv2d(x, c0.to(x.dtype), padding=1).__iadd__(x)))
case("residual add+relu, both change", "add", lambda x, y: F.relu(x + y), [X4, X4], changed=(0, 1))
case("x - c", "sub", lambda x, c0=const(*X4): x - c0.to(x.dtype))
case("x - y, both change", "sub", lambda x, y: x - y, [X4, X4], changed=(0, 1))
case("c - x", "rsub", lambda x: 1.0 - x)
case("rsub(x, y)", "rsub", lambda x, y: torch.rsub(x, y), [X4, X4], changed=(0, 1))
case("-x", "neg", lambda x: -x)
case("neg", "neg", torch.neg, [X2])
case("x * c[1,C,1,1]", "mul", lambda x, c0=const(1, C, 1, 1): x * c0.to(x.dtype))
case("x * 2", "mul", lambda x: x * 2.0)
case("x * y, both change", "mul", lambda x, y: x * y, [X4, X4], changed=(0, 1))
case("x * c, c full shape", "mul", lambda x, c0=const(*X4): x * c0.to(x.dtype))
case("x *= c (in place)", "mul", lambda x, c0=const(C, 1, 1): x.mul_(c0.to(x.dtype)))
case("x / c", "div", lambda x, c0=const(C, 1, 1, lo=0.5, hi=2.0): x / c0.to(x.dtype))
case("x / 3 (in place)", "div", lambda x: x.div_(3.0))
case("x / y, y changes", "div", lambda x, y: x / y, [X4, X4], changed=(0, 1), domain=POS, generic=True)

# ---- softmax, losses ------------------------------------------------------------------------------------------
case("softmax(-1)", "softmax", lambda x: F.softmax(x, dim=-1), [SEQ])
case("x.softmax(1)", "softmax", lambda x: x.softmax(1))
case("softmax(dtype=float64)", "softmax", lambda x: torch.softmax(x, -1, dtype=torch.float64), [X2], generic=True)
case("log_softmax(1)", "log_softmax", lambda x: F.log_softmax(x, 1), [X2])
TARGETS = torch.tensor([1, 0, FEAT - 1])
IGNORED = torch.tensor([1, -1, 3])
case("cross_entropy", "cross_entropy", lambda x: F.cross_entropy(x, TARGETS), [X2])
case("cross_entropy(sum)", "cross_entropy", lambda x: F.cross_entropy(x, TARGETS, reduction="sum"), [X2])
case("cross_entropy(ignore_index)", "cross_entropy", lambda x: F.cross_entropy(x, IGNORED, ignore_index=-1), [X2])
case("cross_entropy(label_smoothing)", "cross_entropy",
     lambda x: F.cross_entropy(x, TARGETS, label_smoothing=0.1), [X2], generic=True)
case("cross_entropy[B,C,T]", "cross_entropy",
     lambda x: F.cross_entropy(x, torch.arange(B * L).remainder(C).view(B, L)), [X3])
case("cross_entropy[B,C,H,W](ignore_index)", "cross_entropy",
     lambda x: F.cross_entropy(x, torch.arange(B * H * W).remainder(C + 1).view(B, H, W) - 1, ignore_index=-1))
case("mse_loss", "mse_loss", lambda x, c0=const(*X4): F.mse_loss(x, c0.to(x.dtype)))
case("mse_loss(sum)", "mse_loss", lambda x, c0=const(*X2): F.mse_loss(x, c0.to(x.dtype), reduction="sum"), [X2],
     generic=True)

# ---- reshapes and structural ops ------------------------------------------------------------------------------
case("x.view(x.size(0), -1)", "view", lambda x: x.view(x.size(0), -1))
case("pooled.view(B, -1) (one channel kept)", "view", lambda x: F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))
case("reshape", "reshape", lambda x: x.reshape(B, C, -1))
case("torch.flatten(x, 1)", "flatten", lambda x: torch.flatten(x, 1))
case("nn.Flatten", "flatten", module=nn.Flatten())
case("unflatten", "unflatten", lambda x: x.unflatten(1, (2, 2)))
case("view_as", "view_as", lambda x, c0=const(B, C * H * W): x.view_as(c0), [X4])
case("reshape_as", "reshape_as", lambda x, c0=const(B, C, H * W): x.reshape_as(c0))
case("permute", "permute", lambda x: x.permute(0, 2, 3, 1))
case("transpose", "transpose", lambda x: x.transpose(1, 2), [SEQ])
case("swapaxes", "transpose", lambda x: x.swapaxes(-1, -2))
case("t", "t", lambda x: x.t(), [X2])
case("movedim", "movedim", lambda x: x.movedim(1, -1))
case("unsqueeze", "unsqueeze", lambda x: x.unsqueeze(2))
case("squeeze", "squeeze", lambda x: x.squeeze(2), [(B, C, 1, W)])
case("expand", "expand", lambda x: x.expand(B, C, H, W), [(B, C, 1, W)])
case("expand_as", "expand_as", lambda x, c0=const(B, C, H, W): x.expand_as(c0), [(B, C, H, 1)])
case("repeat", "repeat", lambda x: x.repeat(1, 2, 1, 1))
case("flip", "flip", lambda x: x.flip(-1))
case("roll", "roll", lambda x: torch.roll(x, 2, dims=3))
case("narrow", "narrow", lambda x: x.narrow(2, 1, 3))
case("select", "select", lambda x: x.select(2, 1))
case("x.split(2, 1)[1]", "split", lambda x: x.split(2, 1)[1])
case("torch.split(x, 2, 1)[1]", "functional.split", lambda x: torch.split(x, 2, 1)[1])  # no rule: generic
case("chunk", "chunk", lambda x: x.chunk(2, dim=-1)[0], [SEQ])
case("unbind", "unbind", lambda x: x.unbind(1)[2])
case("tensor_split", "tensor_split", lambda x: torch.tensor_split(x, 3, dim=2)[1])
case("mean((2,3))", "mean", lambda x: x.mean((2, 3)))
case("mean(keepdim)", "mean", lambda x: x.mean(dim=1, keepdim=True), [SEQ])
case("mean(dtype=float64)", "mean", lambda x: x.mean(1, dtype=torch.float64), generic=True)
case("sum()", "sum", lambda x: x.sum())
case("sum(1)", "sum", lambda x: torch.sum(x, 1))
case("x.unfold(2, 2, 1)", "unfold", lambda x: x.unfold(2, 2, 1))
case("F.unfold(x, 2)", "unfold", lambda x: F.unfold(x, 2, padding=1))
case("pixel_shuffle", "pixel_shuffle", lambda x: F.pixel_shuffle(x, 2))
case("pixel_unshuffle", "pixel_unshuffle", lambda x: F.pixel_unshuffle(x, 2), [(B, C, 4, 6)])
case("diagonal", "diagonal", lambda x: x.diagonal(dim1=-2, dim2=-1))
case("tril", "tril", lambda x: x.tril())
case("triu", "triu", lambda x: torch.triu(x, 1))
MASK = torch.rand(*X4, generator=_G) > 0.5
case("masked_fill", "masked_fill", lambda x: x.masked_fill(MASK, 0.5), generic=True)  # affine in the fill value
case("where", "where", lambda x: torch.where(MASK, x, 0.0), generic=True)

# ---- indexing, concatenation, padding ------------------------------------------------------------------------
INDEX = torch.tensor([2, 0, 2])
case("x[:, :, ::2, ::2]", "getitem", lambda x: x[:, :, ::2, ::2])
case("x[:, :, ..., 1:4]", "getitem", lambda x: x[:, :, ..., 1:4])
case("x[..., 1:3]", "getitem", lambda x: x[..., 1:3])
case("x[:, 1]", "getitem", lambda x: x[:, 1])
case("x[:, :, 1]", "getitem", lambda x: x[:, :, 1])
case("x[0]", "getitem", lambda x: x[0])
case("x[None]", "getitem", lambda x: x[None])
case("x[index]", "getitem", lambda x: x[INDEX])
case("x[:, index]", "getitem", lambda x: x[:, INDEX], [X2])
case("x[mask]", "getitem", lambda x: x[MASK])
case("cat([x, c], 1)", "cat", lambda x, c0=const(B, 2, H, W): torch.cat([x, c0.to(x.dtype)], 1))
case("cat([c, x], 1)", "cat", lambda x, c0=const(B, 2, H, W): torch.cat([c0.to(x.dtype), x], dim=1))
case("cat([x, y], 1), both change", "cat", lambda x, y: torch.cat([x, y], 1), [X4, X4], changed=(0, 1))
case("cat([x, c], 0)", "cat", lambda x, c0=const(*X4): torch.cat([x, c0.to(x.dtype)], 0))
case("cat([x, x], -1)", "cat", lambda x: torch.cat([x, x], -1), [SEQ])
case("cat([empty, x]) (KV cache)", "cat", lambda x: torch.cat([x.new_empty(0), x.flatten()]), [X2])
case("stack([x, c], 1)", "stack", lambda x, c0=const(*X4): torch.stack([x, c0.to(x.dtype)], 1))
case("stack([x, y]), both change", "stack", lambda x, y: torch.stack([x, y]), [X2, X2], changed=(0, 1))
case("option-A shortcut", "pad", lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 0))
case("pad spatial", "pad", lambda x: F.pad(x, (1, 1, 2, 0)))
case("pad value 0.5", "pad", lambda x: F.pad(x, (1, 1, 1, 1), value=0.5))
case("pad channels, crop", "pad", lambda x: F.pad(x, (0, 0, 0, 0, -1, 1)))
case("pad reflect", "pad", lambda x: F.pad(x, (1, 2), mode="reflect"), [X3])
case("pad replicate", "pad", lambda x: F.pad(x, (1, 1, 1, 1), mode="replicate"))
case("pad circular", "pad", lambda x: F.pad(x, (1, 1, 2, 2), mode="circular"))

# ---- pooling and resampling -------------------------------------------------------------------------------------
case("avg_pool1d", "avg_pool1d", lambda x: F.avg_pool1d(x, 2), [X3])
case("avg_pool2d(x, x.size(3))", "avg_pool2d", lambda x: F.avg_pool2d(x, x.size(3)))
case("avg_pool2d(3, 2, pad 1)", "avg_pool2d", lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))
case("avg_pool3d", "avg_pool3d", lambda x: F.avg_pool3d(x, 2), [(2, C, 4, 4, 4)])
case("adaptive_avg_pool1d", "adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 4), [X3])
case("nn.AdaptiveAvgPool2d(1)", "adaptive_avg_pool2d", module=nn.AdaptiveAvgPool2d(1))
case("adaptive_avg_pool2d(2)", "adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (2, 3)))
case("adaptive_avg_pool3d", "adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, 2), [(2, C, 3, 4, 4)])
case("interpolate(nearest, 2)", "interpolate", lambda x: F.interpolate(x, scale_factor=2))
case("interpolate(bilinear)", "interpolate", lambda x: F.interpolate(x, size=(7, 8), mode="bilinear",
                                                                        align_corners=False))
case("interpolate(linear)[B,C,L]", "interpolate", lambda x: F.interpolate(x, scale_factor=1.5, mode="linear"), [X3])
case("nn.Upsample(bicubic)", "interpolate", module=nn.Upsample(scale_factor=2, mode="bicubic", align_corners=True))
# torch records F.upsample* as the interpolate call they make: these registry names are reached by hand-built nodes
case("upsample (node)", "upsample", direct=(F.upsample, (), {"scale_factor": 2, "mode": "nearest"}))
case("upsample_nearest (node)", "upsample_nearest", direct=(F.upsample_nearest, (), {"scale_factor": 2}))
case("upsample_bilinear (node)", "upsample_bilinear", direct=(F.upsample_bilinear, (), {"size": (7, 6)}))
case("max_pool1d", "max_pool1d", lambda x: F.max_pool1d(x, 2), [X3])
case("nn.MaxPool2d(2)", "max_pool2d", module=nn.MaxPool2d(2))
case("max_pool2d(3, 2, 1)", "max_pool2d", lambda x: F.max_pool2d(x, 3, 2, 1))
# with return_indices torch calls max_pool2d_with_indices (no rule: two outputs, the indices not float): generic
case("max_pool2d(return_indices)", "max_pool2d_with_indices",
     lambda x: F.max_pool2d(x, 2, return_indices=True)[0])
case("max_pool3d", "max_pool3d", lambda x: F.max_pool3d(x, 2), [(2, C, 4, 4, 4)])
case("adaptive_max_pool1d", "adaptive_max_pool1d", lambda x: F.adaptive_max_pool1d(x, 3), [X3])
case("adaptive_max_pool2d", "adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, (2, 3)))


# ---- the harness ------------------------------------------------------------------------------------------------
def _seed(*parts) -> int:
    return (SEED + zlib.crc32(repr(parts).encode())) % 2**62


def _channels_last_replicas(t: torch.Tensor) -> torch.Tensor:
    """[K, B, C, H, W] with each replica in channels-last rows, as the engine carries dense 4-D deltas."""
    k = t.shape[0]
    return t.reshape(k * t.shape[1], *t.shape[2:]).contiguous(memory_format=torch.channels_last).view(t.shape)


def _uniform(shape, lo, hi, dtype, g) -> torch.Tensor:
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def sample(c: Case, form: str, dtype: torch.dtype, scale: float, layout: str, g: torch.Generator):
    """(inputs, engine deltas, the twin's dense float64 δ per input)."""
    lo, hi = c.domain
    inputs = [_uniform(s, lo, hi, dtype, g) for s in c.shapes]
    size = scale * (hi - lo)
    engine, twin = [], []
    for i, x in enumerate(inputs):
        if i not in c.changed:
            engine.append(None)
            twin.append(None)
            continue
        if form == "channel":
            values = _uniform((K, x.shape[0], *x.shape[2:]), -size, size, dtype, g)
            channels = torch.randint(0, x.shape[1], (K,), generator=g)
            channels[0], channels[-1] = 0, x.shape[1] - 1  # the edge channels, where offsets go wrong, always
            d = Delta(values, channels)
            engine.append(d)
            twin.append(d.dense(x).double())
            continue
        dense = _uniform((K, *x.shape), -size, size, dtype, g)
        if layout == "engine" and dense.dim() == 5:
            dense = _channels_last_replicas(dense)
        if form == "perturbed":
            moved = x.unsqueeze(0) + dense
            if layout == "engine" and moved.dim() == 5:
                moved = _channels_last_replicas(moved)
            engine.append(Delta(moved, perturbed=True))
            twin.append(moved.double() - x.double().unsqueeze(0))  # the δ it really carries
        else:
            engine.append(Delta(dense))
            twin.append(dense.double())
    return inputs, engine, twin


# Rules that evaluate f(x + δ) − f(x) themselves (no closed form), like the generic path: in float32 they compute the
# plain difference with another kernel instance (a vectorized body instead of a scalar tail, a batched shape).
PLAIN_DIFFERENCE_RULES = {"_elementwise", "_max_pool"}


@contextmanager
def spying_on_rules():
    """Every registry rule call as (node, rule function name, served): served is False where the rule returned
    NotImplemented (the generic path then served the node)."""
    calls: list[tuple[Node, str, bool]] = []
    saved = dict(RULES)

    def spy(rule):
        def wrapped(node, ctx, deltas):
            out = rule(node, ctx, deltas)
            calls.append((node, rule.__name__, out is not NotImplemented))
            return out
        return wrapped

    for name, rule in saved.items():
        RULES[name] = spy(rule)
    try:
        yield calls
    finally:
        RULES.clear()
        RULES.update(saved)


def _direct_tape(c: Case, x: torch.Tensor):
    func, rest, kwargs = c.direct
    source = Node(0, "param", name="x0", value=x)
    node = Node(1, "call", func=func, args=(source, *rest), kwargs=dict(kwargs), value=func(x, *rest, **kwargs),
                name=getattr(func, "__name__", ""))
    source.users.append(node)
    return [source, node], {"x0": source}, node


def _direct_fn(c: Case):
    func, rest, kwargs = c.direct
    return lambda x: func(x, *rest, **kwargs)


@torch.no_grad()
def record_case(c: Case, inputs, layout: str, rng_seed: int | None):
    """(nodes, input name -> node, the output's node): the case's op recorded as the engine records a model."""
    if c.direct is not None:
        return _direct_tape(c, inputs[0])
    fn = c.build(inputs[0].dtype)
    holder = nn.Module()
    if isinstance(fn, nn.Module):
        holder.op = fn
    tensors = {f"x{i}": nn.Parameter(x.clone(), requires_grad=False) for i, x in enumerate(inputs)}

    def forward():
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        return fn(*[p.clone() for p in tensors.values()]), None

    tape = record(forward, holder, tensors)
    assert not tape.blockers, tape.blockers
    if layout == "engine":
        cge_engine._channels_last(tape)  # as record_base stores the base values
    final = tape.node_of(tape.outputs)
    assert final is not None
    return tape.nodes, tape.params, final


@torch.no_grad()
def engine_change(c: Case, inputs, deltas, layout: str, rng_seed: int | None):
    """The engine's δ of the case's output (dense, in the output's dtype) and the path of every node it carried δ
    through: (canonical name, serving rule function or 'generic')."""
    nodes, params, final = record_case(c, inputs, layout, rng_seed)
    current = {params[f"x{i}"]: d for i, d in enumerate(deltas) if d is not None}
    ctx = Context({})
    paths = []
    with spying_on_rules() as calls:
        for node in nodes:
            if node.kind == "param":
                continue
            if node.kind == "item" or any(a in current for a in node.inputs):
                asked = len(calls)
                out = node_delta(node, ctx, current)
                served = [rule for n, rule, ok in calls[asked:] if n is node and ok]
                if node.kind == "call":
                    paths.append((canonical(node.func), served[0] if served else "generic"))
                if out is not None:
                    current[node] = out
    out = current[final]
    assert not isinstance(out, MultiDelta)
    return out.dense(final.value), paths


def check_path(c: Case, form: str, paths) -> None:
    """The rule under test was asked, and served the node unless the table says it declines by design."""
    if c.op not in RULES:
        return
    mine = [path != "generic" for name, path in paths if name == c.op]
    assert mine, f"{c.id}: no {c.op} node was carried ({paths})"
    if form != "perturbed":
        if c.generic:
            assert not any(mine), f"{c.id}: the {c.op} rule now serves this call: update the table (generic=False)"
        else:
            assert all(mine), f"{c.id}: the {c.op} rule declined this call ({paths}); the generic path served it"


def with_constants(fn):
    """(call, constants): fn's tensor constants (a module's parameters and buffers, a lambda's tensor defaults) as
    explicit trailing operands, call(*inputs, *constants) == fn(*inputs). Rounding also acts on them."""
    if isinstance(fn, nn.Module):  # parameters only: autograd does not differentiate BN's running statistics
        state = dict(fn.named_parameters())
        names = list(state)

        def call(*zs):
            k = len(zs) - len(names)
            return functional_call(fn, {n: z.clone() for n, z in zip(names, zs[k:])}, tuple(zs[:k]))
        return call, [state[n].detach() for n in names]
    defaults = getattr(fn, "__defaults__", None) or ()
    if getattr(fn, "__name__", "") == "<lambda>" and defaults and all(isinstance(d, torch.Tensor) for d in defaults):
        return fn, list(defaults)
    return fn, []


def _condition(fn, point, rng_seed):
    """Per output element: Σ_j |J_ij|·|z_j| over the float operands z, and the number of nonzeros of J's row."""
    floats = [i for i, z in enumerate(point) if z.is_floating_point()]

    def f(*zs):
        args = list(point)
        for i, z in zip(floats, zs):
            args[i] = z.clone()
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        return fn(*args).to(torch.float64)

    zs = tuple(point[i].double() for i in floats)
    try:
        jac = torch.autograd.functional.jacobian(f, zs, vectorize=True, strategy="forward-mode")
    except Exception:  # ops without a batching rule or with random draws: one backward per output element
        jac = torch.autograd.functional.jacobian(f, zs)
    out_numel = f(*zs).numel()
    scale = torch.zeros(out_numel, dtype=torch.float64)
    reads = torch.zeros(out_numel, dtype=torch.float64)
    for j, z in zip(jac, zs):
        m = j.reshape(out_numel, -1).abs()
        scale += m @ z.abs().reshape(-1)
        reads += (m != 0).sum(1)
    return scale, reads


def _evaluate(fn, operands, rng_seed):
    with torch.no_grad():
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        return fn(*[z.clone() for z in operands]).double()


def rounding_bound(fn, operands, twin, rng_seed, error: torch.Tensor, u: float = 2.0 ** -53,
                   u_out: float | None = None) -> torch.Tensor:
    """[K, *out]: the bound stated in the module docstring, for fn(*operands) (evaluated in float64) with the
    twin's δ per operand (None: unchanged), for evaluations that round with unit roundoff u (and u_out at the
    output; default: fn's output dtype). Its output-rounding term alone is formed first; the Jacobian term only
    where `error` exceeds it (every term is nonnegative, so that is the same test)."""
    call, constants = with_constants(fn)
    operands, twin = list(operands) + constants, list(twin) + [None] * len(constants)
    y0 = _evaluate(call, operands, rng_seed)
    if u_out is None:
        with torch.no_grad():
            u_out = torch.finfo(call(*[z.clone() for z in operands]).dtype).eps / 2
    moved = [[z + d[k] if d is not None else z for z, d in zip(operands, twin)] for k in range(K)]
    rounding = torch.stack([4 * u_out * (y0.abs() + _evaluate(call, m, rng_seed).abs()) for m in moved])
    first = operands[0]
    if first.is_floating_point() and first.shape == y0.shape:
        # an op that keeps its input's shape may be a composite pointwise function (x·Φ(x), x·σ(x)) whose
        # intermediates are as large as |x| where the output is near 0: 4 ulps of them too
        rounding += torch.stack([4 * u * (first.double().abs() + m[0].double().abs()) for m in moved])
    if bool((error <= rounding).all()):
        return rounding
    s0, n0 = _condition(call, operands, rng_seed)
    bounds = []
    for k in range(K):
        s1, n1 = _condition(call, moved[k], rng_seed)
        n = torch.maximum(n0, n1)
        bounds.append(rounding[k] + (4 * (n + 2) * u * (s0 + s1)).view(y0.shape))
    return torch.stack(bounds)


def _layouts(c: Case) -> tuple:
    return ("model", "engine") if any(len(s) == 4 for s in c.shapes) else ("model",)


MATRIX = [pytest.param(c, form, id=f"{c.id}-{form}") for c in CASES for form in c.forms()]


@pytest.mark.parametrize("c,form", MATRIX)
def test_rule_matches_float64_twin(c, form):
    fn = _direct_fn(c) if c.direct else c.build(torch.float64)
    for layout in _layouts(c):
        for scale in (SMALL, LARGE):
            g = torch.Generator().manual_seed(_seed(c.id, form, layout, scale, "float64"))
            rng_seed = _seed(c.id, "rng") if c.random else None
            inputs, deltas, twin = sample(c, form, torch.float64, scale, layout, g)
            got, paths = engine_change(c, inputs, deltas, layout, rng_seed)
            check_path(c, form, paths)
            expected = op_delta_ref(fn, inputs, twin, rng_seed)
            assert got.shape == expected.shape
            error = (got.double() - expected).abs()
            bound = rounding_bound(fn, inputs, twin, rng_seed, error)
            worst = (error / bound.clamp(min=1e-300)).max().item()
            assert worst <= 1.0, (
                f"{c.id} [{form}, layout {layout}, |δ| ≤ {scale}·range, ZOKERNELS_TEST_SEED={SEED}]: error "
                f"{error.max().item():.3g} is {worst:.3g}× the float64 bound (largest twin change "
                f"{expected.abs().max().item():.3g}; path {paths})")


def float32_errors(c: Case, form: str, layout: str, seed: int):
    """Against the float64 twin at the same float32 x and δ: (the rule's error [K, *out], the plain float32
    difference's error [K, *out], whether the engine's path evaluated f(x + δ) − f(x) itself, f(x) in float32, the
    twin's inputs (fn64, inputs, twin δ, rng seed) for the derived bound)."""
    fn32 = _direct_fn(c) if c.direct else c.build(torch.float32)
    fn64 = _direct_fn(c) if c.direct else c.build(torch.float64)
    g = torch.Generator().manual_seed(seed)
    rng_seed = _seed(c.id, "rng") if c.random else None
    inputs, deltas, twin = sample(c, form, torch.float32, SMALL, layout, g)
    got, paths = engine_change(c, inputs, deltas, layout, rng_seed)
    expected = op_delta_ref(fn64, inputs, twin, rng_seed)
    # the plain float32 difference at the same x and δ: f(fl(x + δ)) − f(x), both sides in float32
    with torch.no_grad():
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        base = fn32(*[x.clone() for x in inputs])
        plain = []
        for k in range(K):
            if rng_seed is not None:
                torch.manual_seed(rng_seed)
            plain.append(fn32(*[x + d[k].float() if d is not None else x.clone() for x, d in zip(inputs, twin)])
                         - base)
        plain = torch.stack(plain)
    plain_like = form == "perturbed" or any(p == "generic" or p in PLAIN_DIFFERENCE_RULES for _, p in paths)
    return ((got.double() - expected).abs(), (plain.double() - expected).abs(), plain_like, base, paths,
            (fn64, [x.double() for x in inputs], twin, rng_seed))


@pytest.mark.parametrize("c,form", MATRIX)
def test_rule_float32_error_within_plain_difference(c, form):
    for layout in _layouts(c):
        rule_error, plain_error, plain_like, base, paths, twin_inputs = float32_errors(
            c, form, layout, _seed(c.id, form, layout, "float32"))
        where = f"{c.id} [{form}, layout {layout}, ZOKERNELS_TEST_SEED={SEED}; path {paths}]"
        if plain_like:
            # the engine computes the plain difference itself (another kernel instance rounds it): held to the
            # derived bound of a float32 evaluation of f(x + δ) − f(x), not to one draw of the plain one's error
            bound = rounding_bound(*twin_inputs, rule_error, u=2.0 ** -24, u_out=torch.finfo(base.dtype).eps / 2)
            worst = (rule_error / bound.clamp(min=1e-300)).max().item()
            assert worst <= 1.0, f"{where}: error {rule_error.max().item():.3g} is {worst:.3g}× the float32 bound"
        else:
            floor = torch.finfo(base.dtype).eps / 2 * base.abs().max().item()  # one rounding of the output
            assert rule_error.max().item() <= max(plain_error.max().item(), floor), (
                f"{where}: rule error {rule_error.max().item():.3g} vs plain float32 difference "
                f"{plain_error.max().item():.3g} (floor {floor:.3g})")


def test_every_registered_rule_has_a_table_entry():
    """A rule registered without a row here fails this test: add the row (an op call, sample inputs)."""
    recorded = set()
    for c in CASES:
        g = torch.Generator().manual_seed(_seed(c.id, "coverage"))
        inputs, _, _ = sample(c, "dense", torch.float64, SMALL, "model", g)
        nodes, _, _ = record_case(c, inputs, "model", _seed(c.id, "rng") if c.random else None)
        recorded |= {canonical(n.func) for n in nodes if n.kind == "call"}
    missing = sorted(set(RULES) - recorded)
    assert not missing, f"registered rules with no table entry that reaches them: {missing}"


# ---- parameter seeds ----------------------------------------------------------------------------------------------
@dataclass
class SeedCase:
    id: str
    op: str
    module: nn.Module
    input_shape: tuple
    param: str
    declines: bool = False  # the seed has no closed form here: the dense parameter δ goes through the rule
    ids: bool = False       # integer inputs (embedding)


SEED_CASES: list[SeedCase] = []


def seed_case(id, op, module, input_shape, params=("weight", "bias"), **kw):
    for p in params:
        SEED_CASES.append(SeedCase(f"{id}.{p}", op, module, input_shape, p, **kw))


seed_case("Conv2d(3x3,pad1)", "conv2d", _module(nn.Conv2d(C, 6, 3, padding=1)), X4)
seed_case("Conv2d(stride2,dilation2)", "conv2d", _module(nn.Conv2d(C, 5, 3, stride=2, padding=2, dilation=2)), X4)
seed_case("Conv2d(groups2)", "conv2d", _module(nn.Conv2d(C, 6, 3, padding=1, groups=2)), X4)
seed_case("Conv2d(depthwise)", "conv2d", _module(nn.Conv2d(C, 2 * C, 3, padding=1, groups=C)), X4)
seed_case("Conv2d(padding=same)", "conv2d", _module(nn.Conv2d(C, 3, 3, padding="same")), X4)  # symmetric: unfold
seed_case("Conv1d(stride2)", "conv1d", _module(nn.Conv1d(C, 6, 3, stride=2, padding=1)), X3)
seed_case("Conv1d(groups2,dilation2)", "conv1d", _module(nn.Conv1d(C, 6, 3, groups=2, dilation=2)), X3)
seed_case("Linear[B,F]", "linear", _module(nn.Linear(FEAT, 5)), X2)
seed_case("Linear[B,T,F]", "linear", _module(nn.Linear(FEAT, 5)), SEQ)
seed_case("BatchNorm2d(train)", "batch_norm", _module(nn.BatchNorm2d(C)), X4)
seed_case("BatchNorm2d(eval)", "batch_norm", _module(nn.BatchNorm2d(C), train=False), X4)
seed_case("BatchNorm1d(train)[B,F]", "batch_norm", _module(nn.BatchNorm1d(FEAT)), X2)
seed_case("BatchNorm1d(eval)[B,C,L]", "batch_norm", _module(nn.BatchNorm1d(C), train=False), X3)
seed_case("LayerNorm(F)", "layer_norm", _module(nn.LayerNorm(FEAT)), SEQ)
seed_case("LayerNorm((H,W))", "layer_norm", _module(nn.LayerNorm((H, W))), X4)
seed_case("GroupNorm(2,C)", "group_norm", _module(nn.GroupNorm(2, C)), X4)
seed_case("GroupNorm(C,C)[B,C,L]", "group_norm", _module(nn.GroupNorm(C, C)), X3)
seed_case("Embedding", "embedding", _module(nn.Embedding(10, 6)), (B, T), ("weight",), ids=True)
seed_case("Embedding(padding_idx)", "embedding", _module(nn.Embedding(10, 6, padding_idx=0)), (B, T), ("weight",),
          ids=True)


def _seed_sample(s: SeedCase, dtype, step: float, g):
    module = copy.deepcopy(s.module).to(dtype)
    x = torch.randint(0, 10, s.input_shape, generator=g) if s.ids else _uniform(s.input_shape, -2.0, 2.0, dtype, g)
    param = dict(module.named_parameters())[s.param]
    indices = torch.randperm(param.numel(), generator=g)[:K]
    mu = step * (1 + torch.rand(K, generator=g, dtype=torch.float64))
    mu = torch.where(torch.rand(K, generator=g) < 0.5, -mu, mu)
    theta = param.detach().reshape(-1)[indices]
    steps = (theta + mu.to(dtype)).double() - theta.double()  # realized: fl(θ + μ) − θ, exact in float64
    return module, x, param, indices, steps


@torch.no_grad()
def seed_change(s: SeedCase, module, x, indices, steps):
    """The seed's δ of the op's output, the op's node, and whether the seed declined (None)."""
    params = dict(module.named_parameters())
    tape = record(lambda: (module(x), None), module, params)
    param_node = tape.params[s.param]
    (user,) = list(dict.fromkeys(param_node.users))
    assert canonical(user.func) == s.op
    seeded = seed_delta(user, param_node, indices, steps, Context({}))
    declined = seeded is None
    if declined:  # what the engine then does: the dense parameter change through the op's rule
        dense = dense_parameter_delta(param_node.value.detach(), indices, steps)
        seeded = node_delta(user, Context({}), {param_node: dense})
    return seeded.dense(user.value), declined


def _seed_twin(s: SeedCase, module64, x, indices, steps):
    """The module as a function of all its parameters and its input, those operands in float64,
    and the twin's δ per operand (the parameter's coordinate steps; None elsewhere)."""
    state = dict(module64.named_parameters())  # the buffers (BN's running statistics) stay in the module
    names = list(state)

    def fn(*zs):
        return functional_call(module64, {n: z.clone() for n, z in zip(names, zs[:-1])}, (zs[-1],))

    operands = [state[n].detach().double() for n in names] + [x if s.ids else x.double()]
    twin = [dense_parameter_delta(state[n].detach().double(), indices, steps).values if n == s.param else None
            for n in names] + [None]
    return fn, operands, twin


@pytest.mark.parametrize("s", SEED_CASES, ids=lambda s: s.id)
def test_seed_matches_float64_twin(s):
    for step in (5e-3, 0.3):
        g = torch.Generator().manual_seed(_seed(s.id, step, "float64"))
        module, x, _, indices, steps = _seed_sample(s, torch.float64, step, g)
        got, declined = seed_change(s, module, x, indices, steps)
        assert declined == s.declines, f"{s.id}: the seed {'declines' if declined else 'serves'} this call"
        fn, operands, twin = _seed_twin(s, copy.deepcopy(module), x, indices, steps)
        expected = op_delta_ref(fn, operands, twin)
        error = (got.double() - expected).abs()
        bound = rounding_bound(fn, operands, twin, None, error)
        worst = (error / bound.clamp(min=1e-300)).max().item()
        assert worst <= 1.0, (f"{s.id} [step {step}, ZOKERNELS_TEST_SEED={SEED}]: error {error.max().item():.3g} is "
                              f"{worst:.3g}× the float64 bound")


@pytest.mark.parametrize("s", SEED_CASES, ids=lambda s: s.id)
def test_seed_float32_error_within_plain_difference(s):
    g = torch.Generator().manual_seed(_seed(s.id, "float32"))
    module, x, param, indices, steps = _seed_sample(s, torch.float32, 5e-3, g)
    got, _ = seed_change(s, module, x, indices, steps)
    fn, operands, twin = _seed_twin(s, copy.deepcopy(module).double(), x, indices, steps)
    expected = op_delta_ref(fn, operands, twin)
    with torch.no_grad():
        base = module(x)
        plain = []
        for k in range(K):
            flat = param.data.view(-1)
            saved = flat[indices[k]].clone()
            flat[indices[k]] = (saved.double() + steps[k]).float()  # fl(θ + μ): exactly θ + the realized step
            plain.append(module(x) - base)
            flat[indices[k]] = saved
        plain = torch.stack(plain)
    floor = 2.0 ** -24 * base.abs().max().item()  # one rounding of the output
    seed_error = (got.double() - expected).abs().max().item()
    plain_error = (plain.double() - expected).abs().max().item()
    assert seed_error <= max(plain_error, floor), (
        f"{s.id} [ZOKERNELS_TEST_SEED={SEED}]: seed error {seed_error:.3g} vs plain float32 difference "
        f"{plain_error:.3g} (floor {floor:.3g})")


def test_every_seed_has_a_table_entry():
    missing = sorted(set(_SEEDS) - {s.op for s in SEED_CASES})
    assert not missing, f"parameter seeds with no table entry: {missing}"
