"""Slow, obviously-correct twins of the CGE GPU kernels (zokernels/kernels): each forms the perturbed quantity
naively with plain torch ops, one replica at a time, so that it can be trusted by reading it.

- first_layer_delta_ref: relu(bn(y + δ)) − relu(bn(y)) per coordinate, δ = h·shifted x[:, c] into channel o.
- one_channel_conv2d_ref / one_channel_linear_ref: the next mixing op on one-channel deltas.
- masked_sgd_ref: the scatter of K finite differences into .grad and the SGD update, restricted to the mask or not.
- rule_sweep_ref: the fused rule sweep (kernels/rule_sweep.py) in numpy float32 operations on whole arrays, z from
  the numpy Philox twin: each numpy op rounds once, so it is compared bit for bit.
Run them in float64 where the fast path must be matched to rounding level.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .philox_ref import philox_normal_ref


def seed_delta_ref(x: torch.Tensor, coord: tuple[int, int, int, int], step: float, out_hw: tuple[int, int],
                   stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """δ[b, oh, ow] = step · x[b, c, oh·s − p + kh·d, ow·s − p + kw·d] (zero outside x): the change of output
    channel o of a conv when weight (o, c, kh, kw) moves by step. [B, H', W']."""
    _, c, kh, kw = coord
    padded = F.pad(x[:, c], (padding[1], padding[1], padding[0], padding[0]))
    rows = torch.arange(out_hw[0]) * stride[0] + kh * dilation[0]
    cols = torch.arange(out_hw[1]) * stride[1] + kw * dilation[1]
    return step * padded[:, rows][:, :, cols]


def channel_ops_ref(y_channel: torch.Tensor, bn, relu: bool, channel: int) -> torch.Tensor:
    """The channel-wise ops after the layer on one channel [B, H', W']: BN (batch statistics of this very tensor in
    train mode, running statistics in eval mode; `bn` has .train .weight .bias .eps .mean .var), then ReLU."""
    out = y_channel
    if bn is not None:
        pick = lambda t: None if t is None else t[channel:channel + 1]  # noqa: E731
        stats = (None, None) if bn.train else (pick(bn.mean), pick(bn.var))
        out = F.batch_norm(out.unsqueeze(1), *stats, pick(bn.weight), pick(bn.bias), training=bn.train,
                           eps=bn.eps)[:, 0]
    return torch.relu(out) if relu else out


def first_layer_delta_ref(x: torch.Tensor, y: torch.Tensor, coords: torch.Tensor, steps: torch.Tensor,
                          stride=(1, 1), padding=(0, 0), dilation=(1, 1), bn=None,
                          relu: bool = True) -> torch.Tensor:
    """[K, B, H', W'] (or [K, B] for a linear layer: x [B, C_in], y [B, C_out], coords (o, c, 0, 0)):
    ops(y[:, o_k] + δ_k) − ops(y[:, o_k]), the perturbed and base channels evaluated separately."""
    linear = x.dim() == 2
    if linear:
        x, y = x[:, :, None, None], y[:, :, None, None]
    out = []
    for coord, step in zip(coords.tolist(), steps.tolist()):
        o = coord[0]
        delta = seed_delta_ref(x, coord, step, tuple(y.shape[2:]), stride, padding, dilation)
        base = y[:, o]
        out.append(channel_ops_ref(base + delta, bn, relu, o) - channel_ops_ref(base, bn, relu, o))
    result = torch.stack(out)
    return result[..., 0, 0] if linear else result


def one_channel_conv2d_ref(delta: torch.Tensor, channels: torch.Tensor, weight: torch.Tensor, stride=(1, 1),
                           padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """out[k] = conv2d(δ_k[:, None], W[:, o_k:o_k+1]) for δ [K, B, H, W]; returned as [K·B, C2, H2, W2]."""
    outs = [F.conv2d(delta[k].unsqueeze(1), weight[:, o:o + 1], None, stride, padding, dilation)
            for k, o in enumerate(channels.tolist())]
    return torch.cat(outs)


def one_channel_linear_ref(delta: torch.Tensor, channels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[k·B + b] = δ[k, b] · W[:, c_k] for δ [K, B] and W [out, in]: [K·B, out]."""
    outs = [delta[k].unsqueeze(1) * weight[:, c].unsqueeze(0) for k, c in enumerate(channels.tolist())]
    return torch.cat(outs)


def masked_gradients_ref(params: list[torch.Tensor], masks: list[torch.Tensor],
                         values: torch.Tensor) -> list[torch.Tensor]:
    """Dense gradients: the finite differences, in the order of each mask's flattened True entries (parameters in
    list order), written where the masks are True; zero elsewhere."""
    grads, start = [], 0
    for param, mask in zip(params, masks):
        flat = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
        where = torch.nonzero(mask.reshape(-1)).flatten()
        flat[where] = values[start:start + where.numel()].to(param.dtype)
        start += where.numel()
        grads.append(flat.view_as(param))
    return grads


def masked_sgd_ref(params: list[torch.Tensor], buffers: list[torch.Tensor], masks: list[torch.Tensor],
                   values: torch.Tensor, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                   weight_decay: float = 0.0, nesterov: bool = False, restrict_to_mask: bool = True,
                   first_step: bool = False) -> list[torch.Tensor]:
    """torch.optim.SGD's update on the masked gradient, in place on params and buffers; returns the gradients.
    restrict_to_mask: only masked coordinates change (their weight decay and momentum included); otherwise every
    coordinate takes the ordinary dense step with gradient zero outside the mask."""
    grads = masked_gradients_ref(params, masks, values)
    for param, buf, mask, grad in zip(params, buffers, masks, grads):
        where = mask if restrict_to_mask else torch.ones_like(mask)
        g = grad[where] + weight_decay * param[where] if weight_decay != 0 else grad[where]
        if momentum != 0:
            b = g.clone() if first_step else momentum * buf[where] + (1 - dampening) * g
            buf[where] = b
            g = g + momentum * b if nesterov else b
        param[where] = param[where] - lr * g
    return grads


def rule_sweep_ref(x: torch.Tensor, offset: int, seed: int, terms, rule: str, hyper=(), decay: float | None = None,
                   state: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(x updated, the new state) of one tensor: g = Σ fl32(c)·z in float32 from 0 in term order; Δ by the rule
    (sign: step·sign(g) with sign(0) = 0; adam: the moments, then (m / (√v / bias2_root + ε))·step; momentum:
    m = g on the first step, else β·m + g, then m·step; sign_momentum: m = β·m + (1−β)·g, then step·sign(m);
    linear: g), every scalar rounded to float32; with decay, Δ + fl32(x·fl32(decay)) (the product in float64 for
    float64 x); then x + Δ in float32 (float64 for float64 x), rounded once to x's dtype. `state` is not modified."""
    f32 = np.float32
    n = x.numel()
    g = np.zeros(n, dtype=f32)
    for stream, coeff in terms:
        g = g + f32(coeff) * philox_normal_ref(n, seed, stream, offset)
    h = [f32(v) for v in hyper]
    new_state = [s.detach().reshape(-1).numpy().copy() for s in state]
    sign = lambda a: np.where(a > 0, f32(1), np.where(a < 0, f32(-1), f32(0)))  # noqa: E731
    if rule == "sign":
        delta = sign(g) * h[0]
    elif rule == "momentum":
        beta, first, step = h
        m = g.copy() if first else new_state[0] * beta + g
        new_state = [m]
        delta = m * step
    elif rule == "sign_momentum":
        beta, one_minus_beta, step = h
        m = new_state[0] * beta + g * one_minus_beta
        new_state = [m]
        delta = sign(m) * step
    elif rule == "adam":
        beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_root, eps, step = h
        m = new_state[0] * beta1 + g * one_minus_beta1
        v = new_state[1] * beta2 + (g * g) * one_minus_beta2
        new_state = [m, v]
        delta = (m / (np.sqrt(v) / bias2_root + eps)) * step
    else:
        delta = g
    wide = np.float64 if x.dtype == torch.float64 else f32
    xw = x.detach().reshape(-1).to(torch.float64 if wide is np.float64 else torch.float32).numpy()
    if decay is not None:
        delta = delta + (xw * wide(f32(decay))).astype(f32)
    out = torch.from_numpy(xw + delta.astype(wide)).to(x.dtype).view_as(x)
    return out, [torch.from_numpy(s).view_as(x) for s in new_state]
