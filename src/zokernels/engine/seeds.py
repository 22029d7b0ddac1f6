"""How a parameter coordinate seeds a delta: moving coordinate indices[k] of a parameter by steps[k] changes the
output of each op that reads it. Closed forms for the ops whose parameters carry most coordinates (conv, linear,
batch / layer / group norm, embedding) give that change directly, in one-channel form where the op allows; any other
op receives the parameter's change as a dense δ and goes through its rule or the generic path."""
from __future__ import annotations

import math as pymath

import torch
import torch.nn.functional as F

from .delta import Delta
from .ops import canonical
from .rules import CONV_ARGS, Context
from .statistics import BN_ARGS, bn_statistics
from .tape import Node, arguments, value


def dense_parameter_delta(param: torch.Tensor, indices: torch.Tensor, steps: torch.Tensor) -> Delta:
    """[K, *param.shape]: replica k moves coordinate indices[k] by steps[k]."""
    out = param.new_zeros((len(indices), param.numel()))
    out[torch.arange(len(indices), device=param.device), indices.to(param.device)] = steps.to(param)
    return Delta(out.view(len(indices), *param.shape))


def _role(user: Node, param_node: Node, names: tuple[str, ...]) -> str | None:
    """The name of the argument slot the parameter fills in `user` (None if it fills several or none)."""
    a = arguments(user, names)
    roles = [k for k, v in a.items() if v is param_node]
    return roles[0] if len(roles) == 1 else None


def seed_delta(user: Node, param_node: Node, indices: torch.Tensor, steps: torch.Tensor,
               ctx: Context) -> Delta | None:
    """The change of `user`'s output, or None where no closed form applies (the caller then propagates the dense
    parameter change through `user`)."""
    op = canonical(user.func)
    seed = _SEEDS.get(op)
    if seed is None or not isinstance(user.value, torch.Tensor):
        return None
    y = user.value
    return seed(user, param_node, indices.to(y.device), steps.to(device=y.device, dtype=y.dtype), ctx)


def _conv_seed(user, param_node, idx, h, ctx):
    role = _role(user, param_node, CONV_ARGS)
    x, y = value(user.args[0]), user.value
    geometry = {k: v for k, v in arguments(user, CONV_ARGS).items() if k in ("stride", "padding", "dilation",
                                                                             "groups")}
    spatial = y.shape[2:]
    if role == "bias":
        return Delta(h.view(-1, 1, *([1] * len(spatial))).expand(-1, y.shape[0], *spatial).clone(), idx)
    weight = param_node.value
    if isinstance(geometry.get("padding", 0), str):
        geometry["padding"] = _explicit_padding(geometry, weight.shape[2:])
    if (role != "weight" or geometry["padding"] is None or user.func not in (F.conv1d, F.conv2d)
            or isinstance(user.args[0], Node) and user.args[0] is param_node):
        return None
    patches = ctx.cached(user, "patches", lambda: _patches(user.func, x, weight.shape[2:], geometry))
    kernel = pymath.prod(weight.shape[2:])
    per_out = weight[0].numel()
    groups = geometry.get("groups", 1)
    out_channel, local = idx // per_out, idx % per_out
    in_channel = (out_channel // (weight.shape[0] // groups)) * weight.shape[1] + local // kernel
    rows = in_channel * kernel + local % kernel
    values = patches.index_select(1, rows).transpose(0, 1)  # [K, B, L]
    return Delta(values.reshape(len(idx), y.shape[0], *spatial) * h.view(-1, 1, *([1] * len(spatial))),
                 out_channel)


def _explicit_padding(geometry: dict, kernel) -> tuple | None:
    """'valid' / 'same' as the symmetric padding torch applies, or None where 'same' pads unevenly (even kernel
    extent) and unfold cannot express it."""
    mode = geometry["padding"]
    if mode == "valid":
        return tuple(0 for _ in kernel)
    dilation = geometry.get("dilation", 1)
    dilation = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,) * len(kernel)
    totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
    if mode != "same" or any(t % 2 for t in totals):
        return None
    return tuple(t // 2 for t in totals)


def _patches(conv, x: torch.Tensor, kernel, geometry: dict) -> torch.Tensor:
    """The conv input unfolded: [B, C_in·∏kernel, L]."""
    def pair(v, n):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if conv is F.conv1d:
        return F.unfold(x.unsqueeze(2), (1, kernel[0]), (1, *pair(geometry.get("dilation", 1), 1)),
                        (0, *pair(geometry.get("padding", 0), 1)), (1, *pair(geometry.get("stride", 1), 1)))
    return F.unfold(x, tuple(kernel), pair(geometry.get("dilation", 1), 2), pair(geometry.get("padding", 0), 2),
                    pair(geometry.get("stride", 1), 2))


def _linear_seed(user, param_node, idx, h, ctx):
    role = _role(user, param_node, ("input", "weight", "bias"))
    x, y = value(user.args[0]), user.value
    if role not in ("weight", "bias") or (isinstance(user.args[0], Node) and user.args[0] is param_node):
        return None
    in_features = param_node.value.shape[-1] if role == "weight" else 1
    out_index = idx // in_features if role == "weight" else idx
    columns = (x[..., idx % in_features].movedim(-1, 0) * h.view(-1, *([1] * (x.dim() - 1))) if role == "weight"
               else h.view(-1, *([1] * (y.dim() - 1))).expand(-1, *y.shape[:-1]))
    if y.dim() == 2:
        return Delta(columns.contiguous(), out_index)
    dense = y.new_zeros((len(idx), *y.shape))
    dense[torch.arange(len(idx), device=y.device), ..., out_index] = columns
    return Delta(dense)


def _batch_norm_seed(user, param_node, idx, h, ctx):
    role = _role(user, param_node, BN_ARGS)
    if role not in ("weight", "bias"):
        return None
    return _channel_affine_seed(user, role, idx, h, lambda: bn_statistics(user, ctx).normalized)


def _channel_affine_seed(user, role: str, idx, h, normalized) -> Delta:
    """A per-channel affine after a normalization (BN, GN): bias c moves channel c by h; weight c moves it by
    h·x̂[:, c], x̂ = normalized() (the caller computes it once per node and recording). One-channel form."""
    y = user.value
    shape = (-1,) + (1,) * (y.dim() - 1)
    if role == "bias":
        return Delta(h.view(shape).expand(-1, y.shape[0], *y.shape[2:]).clone(), idx)
    return Delta(normalized().index_select(1, idx).transpose(0, 1) * h.view(shape), idx)


def _layer_norm_seed(user, param_node, idx, h, ctx):
    a = arguments(user, ("input", "normalized_shape", "weight", "bias", "eps"))
    role = _role(user, param_node, ("input", "normalized_shape", "weight", "bias", "eps"))
    if role not in ("weight", "bias"):
        return None
    y = user.value
    n = param_node.value.numel()
    if role == "weight":
        normalized = ctx.cached(user, "normalized_input", lambda: F.layer_norm(
            value(a["input"]), a["normalized_shape"], None, None, a.get("eps", 1e-5)))
        columns = normalized.reshape(-1, n)[:, idx].T * h.view(-1, 1)
    else:
        columns = h.view(-1, 1).expand(-1, y.numel() // n)
    dense = y.new_zeros((len(idx), y.numel() // n, n))
    dense[torch.arange(len(idx), device=y.device), :, idx] = columns
    return Delta(dense.view(len(idx), *y.shape))


def _group_norm_seed(user, param_node, idx, h, ctx):
    a = arguments(user, ("input", "num_groups", "weight", "bias", "eps"))
    role = _role(user, param_node, ("input", "num_groups", "weight", "bias", "eps"))
    if role not in ("weight", "bias"):
        return None

    def normalized():
        return ctx.cached(user, "normalized_input", lambda: F.group_norm(
            value(a["input"]), a["num_groups"], None, None, a.get("eps", 1e-5)))
    return _channel_affine_seed(user, role, idx, h, normalized)


def _embedding_seed(user, param_node, idx, h, ctx):
    a = arguments(user, ("input", "weight", "padding_idx", "max_norm"))
    if _role(user, param_node, ("input", "weight")) != "weight" or a.get("max_norm") is not None:
        return None
    ids, y = value(a["input"]), user.value
    dim = param_node.value.shape[1]
    rows, columns = idx // dim, idx % dim
    hits = (ids.unsqueeze(0) == rows.view(-1, *([1] * ids.dim()))).to(y.dtype) * h.view(-1, *([1] * ids.dim()))
    dense = y.new_zeros((len(idx), *y.shape))
    dense[torch.arange(len(idx), device=y.device), ..., columns] = hits
    return Delta(dense)


_SEEDS = {"conv1d": _conv_seed, "conv2d": _conv_seed, "linear": _linear_seed, "batch_norm": _batch_norm_seed,
          "layer_norm": _layer_norm_seed, "group_norm": _group_norm_seed, "embedding": _embedding_seed}
SEEDED_OPS = tuple(_SEEDS)
