"""Forward parallelization of CGE across processes (DeepZero §4): torch.distributed, launched by torchrun.

Every rank holds the same model and sees the same minibatch. The selected coordinates are split into one
contiguous range per rank (in parameter order, so a rank's coordinates stay grouped by layer, which is what a
feature-reusing engine wants), with range boundaries placed so that every rank gets the same *measured* cost:
a coordinate of layer l costs c_l seconds, measured once on rank 0 and broadcast so every rank computes the
same partition. Each rank estimates its range with `zokernels.cge_step`; then only the estimated values (one
float per coordinate) are exchanged with all_gather and scattered into `.grad` on every rank, so all ranks
apply the identical update and no weights are ever broadcast during training.

    torchrun --nproc_per_node 2 -m zokernels.cli train resnet20 ...      (gloo on CPU, NCCL on GPU)
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from . import api
from .estimators.common import LossFn, StepResult, trainable_parameters


def selected_coordinates(model: torch.nn.Module, mask: dict[str, torch.Tensor] | None
                         ) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, flat indices) of the coordinates a CGE step with `mask` estimates, in parameter order."""
    out = []
    for name, p in trainable_parameters(model):
        if mask is None:
            out.append((name, torch.arange(p.numel())))
        elif name in mask:
            out.append((name, torch.nonzero(mask[name].reshape(-1).cpu()).flatten()))
    return out


def partition_by_cost(coordinates: list[tuple[str, torch.Tensor]], costs: dict[str, float],
                      world_size: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Splits the coordinate list into `world_size` contiguous ranges of (nearly) equal total cost."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    missing = [name for name, _ in coordinates if name not in costs]
    if missing:
        raise ValueError(f"costs has no entry for parameters {missing[:4]}")
    per_coordinate = torch.cat([torch.full((len(idx),), float(costs[name]), dtype=torch.float64)
                                for name, idx in coordinates]) if coordinates else torch.zeros(0)
    cumulative = torch.cumsum(per_coordinate, 0)
    total = float(cumulative[-1]) if len(cumulative) else 0.0
    targets = torch.tensor([total * (r + 1) / world_size for r in range(world_size - 1)], dtype=torch.float64)
    # Coordinate k goes to the first rank whose cost target its cumulative cost does not exceed.
    bounds = [0] + torch.searchsorted(cumulative, targets, right=False).add(1).clamp(max=len(cumulative)).tolist()
    bounds.append(len(cumulative))
    shards, starts = [], torch.tensor([0] + [len(idx) for _, idx in coordinates]).cumsum(0).tolist()
    for r in range(world_size):
        lo, hi, shard = bounds[r], max(bounds[r], bounds[r + 1]), []
        for (name, idx), start in zip(coordinates, starts):
            a, b = max(lo, start), min(hi, start + len(idx))
            if a < b:
                shard.append((name, idx[a - start:b - start]))
        shards.append(shard)
    return shards


def _shard_mask(model: torch.nn.Module, shard: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    mask = {}
    for name, idx in shard:
        flat = torch.zeros(params[name].numel(), dtype=torch.bool)
        flat[idx] = True
        mask[name] = flat.view(params[name].shape).to(params[name].device)
    return mask


def measure_layer_costs(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3,
                        probes: int = 3) -> dict[str, float]:
    """Seconds per CGE coordinate of each parameter tensor: time of a cge_step on `probes` coordinates of that
    tensor, minus the time of a step with no coordinates (the base forward), divided by `probes`."""
    saved = {name: (p.grad.clone() if p.grad is not None else None) for name, p in model.named_parameters()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def timed(mask) -> float:
        start = time.perf_counter()
        api.cge_step(model, batch, loss_fn, mu, mask=mask, update_running_stats=False)
        return time.perf_counter() - start

    base = min(timed({}) for _ in range(2))
    costs = {}
    for name, p in trainable_parameters(model):
        k = min(probes, p.numel())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.linspace(0, p.numel() - 1, k).long()] = True
        elapsed = timed({name: flat.view(p.shape).to(p.device)})
        costs[name] = max(elapsed - base, 1e-3 * base) / k
    for name, p in model.named_parameters():
        p.grad = saved[name]
    for b, value in buffers:
        b.copy_(value)
    return costs


class CoordinateSharder:
    """CGE with coordinates sharded across the ranks of the default process group."""

    def __init__(self, rank: int, world_size: int, costs: dict[str, float] | None = None):
        self.rank, self.world_size, self.costs = rank, world_size, costs
        self._shards_key = None
        self._shards = None

    @classmethod
    def from_environment(cls) -> "CoordinateSharder | None":
        """A sharder when launched by torchrun with WORLD_SIZE > 1 (initializing the process group: NCCL when
        CUDA is available, else gloo); None for a single process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def _broadcast_costs(self, model, batch, loss_fn, mu) -> dict[str, float]:
        names = [name for name, _ in trainable_parameters(model)]
        measured = measure_layer_costs(model, batch, loss_fn, mu) if self.rank == 0 else {}
        values = torch.tensor([measured.get(n, 0.0) for n in names], dtype=torch.float64)
        dist.broadcast(values, src=0)  # every rank must build the identical partition
        return dict(zip(names, values.tolist()))

    def shards(self, model, batch, loss_fn, mu, mask) -> list[list[tuple[str, torch.Tensor]]]:
        coordinates = selected_coordinates(model, mask)
        if not self._same_coordinates(coordinates):  # masks change every few epochs; re-partition only then
            if self.costs is None:
                self.costs = self._broadcast_costs(model, batch, loss_fn, mu)
            self._shards = partition_by_cost(coordinates, self.costs, self.world_size)
            self._shards_key = coordinates
        return self._shards

    def _same_coordinates(self, coordinates) -> bool:
        previous = self._shards_key
        return previous is not None and len(previous) == len(coordinates) and all(
            a == c and torch.equal(b, d) for (a, b), (c, d) in zip(previous, coordinates))

    def cge_step(self, model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3,
                 mask: dict[str, torch.Tensor] | None = None) -> StepResult:
        """Same estimate as zokernels.cge_step(model, batch, loss_fn, mu, mask), computed by all ranks together
        and written into `.grad` on every rank."""
        shards = self.shards(model, batch, loss_fn, mu, mask)
        mine = _shard_mask(model, shards[self.rank])
        result = api.cge_step(model, batch, loss_fn, mu, mask=mine)
        params = dict(model.named_parameters())
        first = next(iter(params.values()))
        local = torch.cat([params[n].grad.reshape(-1)[idx.to(first.device)] for n, idx in shards[self.rank]]
                          or [torch.zeros(0, dtype=first.dtype, device=first.device)])
        sizes = [sum(len(idx) for _, idx in shard) for shard in shards]
        padded = torch.zeros(max(sizes), dtype=local.dtype, device=local.device)
        padded[:len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        for shard, values in zip(shards, gathered):
            offset = 0
            for name, idx in shard:
                grad = params[name].grad.view(-1)
                grad[idx.to(grad.device)] = values[offset:offset + len(idx)].to(grad.dtype)
                offset += len(idx)
        coordinates = sum(sizes)
        return StepResult(loss=result.loss, num_queries=1 + coordinates, backend=result.backend,
                          num_coordinates=coordinates)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
