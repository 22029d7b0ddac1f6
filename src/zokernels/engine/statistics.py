"""One accessor for a batch_norm node's statistics: `bn_statistics(node, ctx)`.

The BN rule (engine/rules.py: the delta closed form, the perturbed replicas), the BN weight seed
(engine/seeds.py: the normalized input) and the GPU first-layer plan (engine/fusion.py: the kernel's BN spec) all
read the same per-channel quantities of one recorded batch_norm call: the mean and biased variance it normalizes
with (the base batch's in training mode or without running statistics, the running ones in eval), eps, the affine
weight and bias. They depend on the base values only, so they are measured once per node per recording and cached
in the recording's Context under one key; what is derived from them (x − mean, sqrt / rsqrt(var + eps), the
normalized input) is computed on first use and kept on the same object."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .tape import Node, arguments, value

BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
STATISTICS_KEY = "bn_statistics"


def batchnorm_uses_batch_stats(a: dict) -> bool:
    """As F.batch_norm decides: batch statistics in training mode or without running statistics."""
    return bool(a.get("training")) or a.get("running_mean") is None


def channel_reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Every axis but the channel axis 1: what BN reduces over."""
    return tuple(d for d in range(x.dim()) if d != 1)


def batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x over the batch and spatial axes, as two reductions (mean, then
    var): the engine's arithmetic since its first release, kept so estimates stay bit-identical."""
    dims = channel_reduce_dims(x)
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


@dataclass(eq=False)
class BNStatistics:
    """What one batch_norm call normalizes with. mean / var [C]: the base batch's (training) or the running
    statistics (eval: the module's own buffers, never copied)."""

    input: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    training: bool                    # batch statistics (see batchnorm_uses_batch_stats)
    reduce_dims: tuple[int, ...]      # the axes the batch statistics reduce over

    @classmethod
    def of_batch(cls, x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> "BNStatistics":
        """Training mode: the statistics of the batch x itself."""
        mean, var = batch_mean_var(x)
        return cls(x, mean, var, eps, weight, bias, True, channel_reduce_dims(x))

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """A [C] tensor viewed to broadcast against the input (1, C, 1, ...)."""
        return t.view(1, -1, *([1] * (self.input.dim() - 2)))

    @cached_property
    def root(self) -> torch.Tensor:
        """sqrt(var + eps) [C] (the delta closed form divides by it)."""
        return torch.sqrt(self.var + self.eps)

    @cached_property
    def inv_std(self) -> torch.Tensor:
        """rsqrt(var + eps) [C] (the eval scale and the normalized input multiply by it)."""
        return torch.rsqrt(self.var + self.eps)

    @cached_property
    def centered(self) -> torch.Tensor:
        """x − mean, the input's shape and layout."""
        return self.input - self.per_channel(self.mean)

    @cached_property
    def normalized(self) -> torch.Tensor:
        """(x − mean)·rsqrt(var + eps): BN's output before its affine weight and bias."""
        return self.centered * self.per_channel(self.inv_std)


def bn_statistics(node: Node, ctx) -> BNStatistics:
    """The statistics of the recorded batch_norm call `node`, measured once per recording (`ctx`: the recording's
    rules Context, whose cache lives as long as the tape)."""
    return ctx.cached(node, STATISTICS_KEY, lambda: measure(node))


def measure(node: Node) -> BNStatistics:
    """The statistics of one batch_norm call, from its base input (bn_statistics caches this)."""
    a = arguments(node, BN_ARGS)
    x, eps, weight, bias = value(a["input"]), a.get("eps", 1e-5), value(a.get("weight")), value(a.get("bias"))
    if batchnorm_uses_batch_stats(a):
        return BNStatistics.of_batch(x, eps, weight, bias)
    return BNStatistics(x, value(a["running_mean"]), value(a["running_var"]), eps, weight, bias, False,
                        channel_reduce_dims(x))
