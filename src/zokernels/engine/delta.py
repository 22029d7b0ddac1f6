"""Exact delta propagation: how a perturbation δ at one op's output moves through the ops after it.

A Delta holds K replicas (one per coordinate) of the change δ = perturbed value − base value of one node's output:
- channel form: δ is nonzero in one channel (dim 1) per replica: `values` [K, B, *spatial], `channels` [K];
- dense form: `values` [K, B, *feature_shape].
Rules never form f(x+δ) and f(x) separately where a closed form avoids the cancellation (ReLU, tanh, BN, the
loss); linear ops are applied to δ alone. Unsupported ops use `generic_delta`: f(x+δ_k) − f(x), one replica at a
time — slower, never wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .statistics import BNStatistics


@dataclass
class Delta:
    values: torch.Tensor
    channels: torch.Tensor | None = None  # None: dense
    # perturbed form: `values` holds the perturbed output x + δ itself ([K, B, ...]), carried through fused torch
    # ops once δ is dense (cheaper than the delta rules); δ is formed again where it is needed (at the loss).
    perturbed: bool = False
    # a fused kernel (BN + ReLU, residual add + ReLU) already applied the ReLU that is the node's only user
    relu_applied: bool = False

    @property
    def replicas(self) -> int:
        return self.values.shape[0]

    def dense(self, base: torch.Tensor) -> torch.Tensor:
        """[K, *base.shape] with the channel replicas scattered into zeros."""
        if self.perturbed:
            return self.values - base.unsqueeze(0)
        if self.channels is None:
            return self.values
        out = self.values.new_zeros((self.replicas, *base.shape))
        out[torch.arange(self.replicas), :, self.channels] = self.values
        return out

    def perturbed_values(self, base: torch.Tensor) -> torch.Tensor:
        """x + δ for every replica: [K, *base.shape]."""
        return self.values if self.perturbed else base.unsqueeze(0) + self.dense(base)

    def scaled(self, factor: torch.Tensor) -> "Delta":
        return Delta(self.values * factor, self.channels)


def gather_channels(base: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """base[:, channels[k]] for every replica: [K, B, *spatial]."""
    return base.index_select(1, channels).transpose(0, 1)


def per_channel(vector: torch.Tensor, delta: Delta, base: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against delta.values."""
    spatial = base.dim() - 2
    if delta.channels is not None:
        return vector[delta.channels].view(-1, 1, *([1] * spatial))
    return vector.view(1, 1, -1, *([1] * spatial))


def base_like(base: torch.Tensor, delta: Delta) -> torch.Tensor:
    """The base values aligned with delta.values."""
    return gather_channels(base, delta.channels) if delta.channels is not None else base.unsqueeze(0)


# ---- elementwise nonlinearities ------------------------------------------------------------------------------
def relu_delta(x: torch.Tensor, delta: Delta) -> Delta:
    xb = base_like(x, delta)
    # relu(x+δ) − relu(x) = max(δ, −x) + min(x, 0): one rounding at most, no cancellation, two passes.
    out = torch.maximum(delta.values, -xb)
    out.add_(xb.clamp(max=0))
    return Delta(out, delta.channels)


def tanh_delta(x: torch.Tensor, delta: Delta) -> Delta:
    xb, d = base_like(x, delta), delta.values
    tx = torch.tanh(xb)
    # tanh(x+δ) − tanh(x) = tanh(δ)·(1 − tanh(x)·tanh(x+δ))
    return Delta(torch.tanh(d) * (1 - tx * torch.tanh(xb + d)), delta.channels)


def batch_statistics(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − mean, sqrt(var + eps)) per channel over the batch and spatial dims: what BN in train mode uses, for
    callers holding plain tensors. The engine reads the same quantities once per node and recording through
    engine/statistics.py `bn_statistics`."""
    stats = BNStatistics.of_batch(x, eps)
    return stats.centered, stats.root


def batchnorm_train_delta(x: torch.Tensor, delta: Delta, weight: torch.Tensor | None,
                          statistics: tuple[torch.Tensor, torch.Tensor]) -> Delta:
    """BN with batch statistics, per replica: the change of the output when the input changes by δ, computed from
    δ directly (mean and variance changes are formed without subtracting large numbers).

    With c = x − mean, r = sqrt(var + eps), δm = mean(δ), dc = δ − δm:
      δvar = 2·mean(c·δ) + mean(dc²)   (mean(c) = 0),   r' = sqrt(r² + δvar),
      δy/γ = c·(1/r' − 1/r) + dc/r' = a·δ + b·c + e   with a = 1/r', b = −δvar/(r r' (r + r')), e = −δm/r'."""
    first_spatial = 2 if delta.channels is not None else 3
    reduce = (1,) + tuple(range(first_spatial, delta.values.dim()))  # over B and spatial, per replica, channel
    centered_base, root_base = statistics
    gamma = None if weight is None else per_channel(weight, delta, x)
    out = normalization_delta(delta.values, base_like(centered_base, delta), per_channel(root_base, delta, x),
                              reduce, gamma)
    return Delta(out, delta.channels)


def normalization_delta(d: torch.Tensor, centered: torch.Tensor, root: torch.Tensor, reduce: tuple,
                        gamma: torch.Tensor | None) -> torch.Tensor:
    """The change of (x − mean)/sqrt(var + eps)·γ over the axes `reduce` of δ (per replica: axis 0 is never
    reduced) when x changes by d, from d directly (the closed form of batchnorm_train_delta). `centered` and `root`
    (x − mean, sqrt(var + eps)) broadcast against d."""
    d_mean = d.mean(dim=reduce, keepdim=True)
    cross = (centered * d).mean(dim=reduce, keepdim=True)
    # mean((δ − δm)²) directly: mean(δ²) − δm² cancels when δ is nearly constant over few values (a 1×1 map at a
    # small batch), which cost ResNet-18's last stage 10x the naive difference's error on single coordinates
    spread = (d - d_mean).square().mean(dim=reduce, keepdim=True)
    d_var = 2 * cross + spread
    new_root = torch.sqrt(root.square() + d_var)
    a, b, e = 1 / new_root, -d_var / (root * new_root * (root + new_root)), -d_mean / new_root
    if gamma is not None:
        a, b, e = a * gamma, b * gamma, e * gamma
    out = d * a
    out.addcmul_(centered, b)
    out.add_(e)
    return out


def conv_delta(delta: Delta, x: torch.Tensor, conv, weight: torch.Tensor, geometry: dict) -> Delta:
    """δy = conv(δx, W) (no bias), `conv` one of F.conv1d/2d/3d. A one-channel δx with groups == 1 costs 1/C_in of
    a dense conv: a grouped conv with each replica's weight slice W[:, c_k]."""
    k, batch = delta.replicas, x.shape[0]
    groups = geometry["groups"]
    if delta.channels is not None and groups == x.shape[1] == weight.shape[0] and groups > 1:
        # depthwise: output channel c reads input channel c alone, so δ stays in one channel
        kernels = weight.index_select(0, delta.channels)  # [K, 1, *kernel]
        out = conv(delta.values.transpose(0, 1), kernels, None, geometry["stride"], geometry["padding"],
                   geometry["dilation"], k)
        return Delta(out.transpose(0, 1), delta.channels)
    if delta.channels is None or groups != 1:
        out = conv_channels_last(delta.dense(x).reshape(k * batch, *x.shape[1:]), conv, weight, None, geometry)
        return Delta(out.view(k, batch, *out.shape[1:]))
    slices = weight.index_select(1, delta.channels).transpose(0, 1)  # [K, C_out, *kernel]
    out = conv(delta.values.transpose(0, 1), slices.reshape(-1, 1, *slices.shape[2:]), None,
               geometry["stride"], geometry["padding"], geometry["dilation"], k)
    out = out.view(batch, k, weight.shape[0], *out.shape[2:]).transpose(0, 1)
    return Delta(out)


def conv_channels_last(x: torch.Tensor, conv, weight: torch.Tensor, bias: torch.Tensor | None,
                       geometry: dict) -> torch.Tensor:
    """The convolution with 4-D input and weight in channels-last layout (~2x faster on CPU than NCHW)."""
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    return conv(x, weight, bias, geometry["stride"], geometry["padding"], geometry["dilation"], geometry["groups"])


def linear_delta(delta: Delta, weight: torch.Tensor) -> Delta:
    if delta.channels is None:
        return Delta(delta.values @ weight.T)
    columns = weight.index_select(1, delta.channels).T  # [K, out]
    return Delta(delta.values.unsqueeze(-1) * columns.unsqueeze(1))


def channel_nonlinear(fn, delta: Delta, x: torch.Tensor, y: torch.Tensor) -> Delta:
    """A per-channel nonlinear op (max pooling): fn(x_c + δ) − fn(x_c) on the affected channels only."""
    k, batch = delta.replicas, x.shape[0]
    xb = base_like(x, delta)
    if delta.channels is not None:
        flat = lambda t: t.reshape(k * batch, 1, *t.shape[2:])  # noqa: E731
        out = fn(flat(xb + delta.values)) - fn(flat(xb.expand_as(delta.values)))
        return Delta(out.view(k, batch, *out.shape[2:]), delta.channels)
    perturbed = fn((xb + delta.values).reshape(k * batch, *x.shape[1:]))
    return Delta(perturbed.view(k, *y.shape) - y.unsqueeze(0))


def per_replica_linear(fn, delta: Delta, x: torch.Tensor) -> Delta:
    """A linear, per-sample, per-channel op (pooling, subsampling) applied to δ; keeps the channel form."""
    k, batch = delta.replicas, x.shape[0]
    if delta.channels is None:
        out = fn(delta.values.reshape(k * batch, *delta.values.shape[2:]))
        return Delta(out.view(k, batch, *out.shape[1:]))
    out = fn(delta.values.reshape(k * batch, 1, *delta.values.shape[2:]))
    return Delta(out.view(k, batch, *out.shape[2:]), delta.channels)


# ---- losses ---------------------------------------------------------------------------------------------------
def cross_entropy_delta(logits: torch.Tensor, targets: torch.Tensor, delta: Delta, ignore_index: int = -100,
                        reduction: str = "mean") -> torch.Tensor:
    """Change of cross-entropy per replica: Σ_b w_b [log1p(Σ_j p_j expm1(δz_j)) − δz_y] with w_b = 1/(rows not
    ignored) for 'mean', 1 for 'sum' (exact, stable)."""
    p = torch.softmax(logits, dim=1)
    kept = targets != ignore_index
    safe = torch.where(kept, targets, torch.zeros_like(targets))
    if delta.channels is not None:  # only logit c_k changes
        pc = p.index_select(1, delta.channels).T  # [K, B]
        hit = (safe.unsqueeze(0) == delta.channels.unsqueeze(1)).to(delta.values.dtype)
        per_sample = torch.log1p(pc * torch.expm1(delta.values)) - delta.values * hit
    else:
        per_sample = torch.log1p((p.unsqueeze(0) * torch.expm1(delta.values)).sum(-1))
        per_sample = per_sample - delta.values.gather(2, safe.view(1, -1, 1).expand(delta.replicas, -1, 1))[..., 0]
    per_sample = per_sample * kept.to(per_sample.dtype)
    # contiguous rows: each replica's sum is then reduced in the same order whatever K is (a strided [K, B]
    # view is reduced across replicas in vector lanes, and its rounding changed with K)
    total = per_sample.contiguous().sum(dim=1)
    return total / kept.sum() if reduction == "mean" else total


def mse_delta(outputs: torch.Tensor, targets: torch.Tensor, delta: Delta) -> torch.Tensor:
    """Change of mean squared error: mean[δ·(2(y − t) + δ)]."""
    d = delta.dense(outputs)
    return (d * (2 * (outputs - targets).unsqueeze(0) + d)).flatten(1).mean(dim=1)


# ---- perturbed form (dense stage) ---------------------------------------------------------------------------
def per_sample_apply(fn, perturbed: torch.Tensor) -> torch.Tensor:
    """A per-sample op on [K, B, ...] replicas as one batch of K·B samples."""
    k, batch = perturbed.shape[:2]
    out = fn(perturbed.reshape(k * batch, *perturbed.shape[2:]))
    return out.view(k, batch, *out.shape[1:])


def batchnorm_train_perturbed(perturbed: torch.Tensor, module) -> torch.Tensor:
    """BN with each replica's own batch statistics (over B and spatial), as the module would compute it."""
    dims = (1,) + tuple(range(3, perturbed.dim()))
    var, mean = torch.var_mean(perturbed, dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + module.eps)
    shape = (1, 1, -1) + (1,) * (perturbed.dim() - 3)
    if module.weight is not None:
        scale = scale * module.weight.view(shape)
    shift = -mean * scale
    if module.bias is not None:
        shift = shift + module.bias.view(shape)
    return torch.addcmul(shift, perturbed, scale)
