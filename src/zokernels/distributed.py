"""Forward parallelization of CGE across processes (DeepZero §4): torch.distributed, launched by torchrun.

Every rank holds the same model and sees the same minibatch. The selected coordinates are split into one
contiguous range per rank (in parameter order, so a rank's coordinates stay grouped by layer, which is what a
feature-reusing engine wants), with range boundaries placed so that every rank gets the same *measured* cost:
a coordinate of layer l costs c_l seconds, measured once on rank 0 and broadcast so every rank computes the
same partition. Each rank estimates its range with `zokernels.cge_step`; then only the estimated values (one
float per coordinate) are exchanged with all_gather and scattered into `.grad` on every rank, so all ranks
apply the identical update and no weights are ever broadcast during training.

    torchrun --nproc_per_node 2 -m zokernels.cli train resnet20 ...      (gloo on CPU, NCCL on GPU)

Below: data-parallel ZO (DataParallelZO: each rank its own shard of the batch) and perturbation-parallel MeZO
(PerturbationParallelZO: each rank its share of the ± queries on the full batch); both exchange loss scalars only.
"""
from __future__ import annotations

import os
import pickle
import time
from typing import Any

import torch
import torch.distributed as dist

from . import api, philox
from .checks import check_int, check_seed
from .estimators import mezo
from .estimators.common import RESTORED, LossFn, StepResult, check_step_batch, default_loss, trainable_parameters
from .estimators.scope import QueryScope, RngState, rng_state


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


# ---- data-parallel ZO -------------------------------------------------------------------------------------------
# Every rank holds the same parameters and evaluates the loss on its own shard of the batch. A ZO step needs only
# loss values, so the ranks exchange one (samples, loss, failed) triple per query (all_gather, float64) and every
# rank forms the same global loss Σ_r n_r ℓ_r / Σ_r n_r, summed in rank order in Python float64 arithmetic: the same
# operations on the same numbers on every rank, hence the same bits. With the same Philox seed, every rank then
# regenerates the same directions and applies the same update sweeps, so the parameters stay bit-identical without
# ever being communicated; `check_replicas` verifies it.
#
# What equals one process bit for bit: a single process that evaluates the ranks' shards one after another, each
# as its own forward (loss_fn = SequentialShardLoss), and combines them with the same formula, gets the identical
# projected gradients and parameters (tests/test_torchrun.py) — the forwards see the same shard shapes, so the same
# kernels produce the same per-shard losses. One forward over the whole batch is the same objective mathematically
# (for equal shards and per-sample-mean losses) but not the same bits: a forward over 2B samples sums in another order.


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (dict values, tuple items or the tensor); a
    list of dict batches (micro-batches) counts all of them."""
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(b, dict) or hasattr(b, "keys") for b in batch):
        return sum(_batch_size(b) for b in batch)
    items = (list(batch.values()) if isinstance(batch, dict) or hasattr(batch, "keys") else
             list(batch) if isinstance(batch, (tuple, list)) else [batch])
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return int(item.shape[0])
    raise ValueError("cannot count the samples of this batch (no tensor with a leading batch dimension); pass "
                     "samples=callable(batch) -> int")


def combine_losses(samples: list[float], losses: list[float]) -> float:
    """Σ_r n_r ℓ_r / Σ_r n_r in rank order, in Python float64: the global loss every rank (and the single-process
    reference) computes from the same numbers."""
    total, count = 0.0, 0.0
    for n, value in zip(samples, losses):
        total += n * value
        count += n
    return total / count


class ShardedLoss:
    """A loss_fn for any verb (mezo_step, rge_step, cge_step, ZOSVRG): evaluates `loss_fn(model, shard)` on this
    rank's shard and returns the global loss over all ranks' shards (a float64 scalar, identical on every rank).

    Only three float64 numbers per rank cross the process group per evaluation. A rank whose loss raises still takes
    part in the exchange (with a failure flag), so no rank waits forever: the failing rank re-raises its own error,
    the others raise a RuntimeError naming it."""

    def __init__(self, loss_fn: LossFn | None = None, group: Any = None, samples: Any = None):
        from .estimators.common import default_loss, loss_source
        self.inner = loss_fn or default_loss
        self.group = group
        self.samples = samples or _batch_size
        self.zokernels_source = f"{loss_source(self.inner)} (all-gathered over the ranks)"
        self.zokernels_owned = getattr(self.inner, "zokernels_owned", False)
        self.evaluations = 0

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        error, value, count = None, float("nan"), 0.0
        try:
            count = float(self.samples(batch))
            out = self.inner(model, batch)
            value = float(out.detach().double().item() if isinstance(out, torch.Tensor) else out)
        except Exception as caught:  # keep the collective going; re-raised below
            error = caught
        mine = torch.tensor([count, value, 1.0 if error is not None else 0.0], dtype=torch.float64)
        world = dist.get_world_size(self.group)
        device = _collective_device(self.group)
        gathered = [torch.empty(3, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(gathered, mine.to(device), group=self.group)
        rows = [g.cpu().tolist() for g in gathered]
        self.evaluations += 1
        if error is not None:
            raise error
        failed = [r for r, row in enumerate(rows) if row[2] != 0.0]
        if failed:
            raise RuntimeError(f"the loss raised on rank(s) {failed} (see their error); this rank's shard evaluated")
        return torch.tensor(combine_losses([row[0] for row in rows], [row[1] for row in rows]), dtype=torch.float64)


class SequentialShardLoss:
    """The single-process twin of ShardedLoss: `batch` is the list of the ranks' shards, evaluated one after
    another and combined by `combine_losses` — what a data-parallel run computes, bit for bit. Every shard's
    forward starts from the RNG state the call started from, as each rank's does (dropout draws what rank r's
    forward draws)."""

    def __init__(self, loss_fn: LossFn | None = None, samples: Any = None):
        from .estimators.common import default_loss, loss_source
        self.inner = loss_fn or default_loss
        self.samples = samples or _batch_size
        self.zokernels_source = f"{loss_source(self.inner)} (over the shards in sequence)"

    def __call__(self, model: torch.nn.Module, shards: list[Any]) -> torch.Tensor:
        values = []
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        start = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
        for shard in shards:
            torch.set_rng_state(start[0])
            if cuda:
                torch.cuda.set_rng_state_all(start[1])
            out = self.inner(model, shard)
            values.append(float(out.detach().double().item() if isinstance(out, torch.Tensor) else out))
        return torch.tensor(combine_losses([float(self.samples(s)) for s in shards], values), dtype=torch.float64)


def _collective_device(group: Any = None) -> torch.device:
    """NCCL exchanges CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's contiguous share of a global batch (every tensor with the batch's leading dimension is split by
    torch.tensor_split, so shard sizes differ by at most one sample); for ranks loading the same global batch."""
    n = _batch_size(batch)

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return torch.tensor_split(value, world_size)[rank]
        return value
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


_FINGERPRINT_CHUNK = 1 << 22
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (so NaN payloads and -0.0 compare as bits, not values)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(_INT_VIEW[flat.element_size()]) if flat.is_floating_point() else flat


def fingerprint(tensor: torch.Tensor) -> int:
    """A 64-bit checksum of a tensor's bits: Σ_i bits_i · (2i + 1) mod 2^64 (odd weights: any change of one entry,
    or of a few entries that do not cancel exactly, changes it). Computed where the tensor lives, in chunks."""
    bits = _bits(tensor.detach())
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _FINGERPRINT_CHUNK):
        chunk = bits[start:start + _FINGERPRINT_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), device=bits.device, dtype=torch.int64).mul_(2).add_(1)
        total += (chunk * weights).sum()  # int64 arithmetic wraps mod 2^64
    return int(total.item())


class ReplicaMismatchError(RuntimeError):
    """The ranks' parameters (or buffers) differ: a multi-process ZO run is no longer one model."""


class ReplicatedZO:
    """What every multi-process ZO scheme here shares: the ranks hold the same model and apply the identical update,
    computed from exchanged scalars and seed-regenerated directions, so the replicas stay bit-identical without any
    weight ever being sent. Agreement on the seed, and the replica check.

    `check_every` (default 1): after every that many steps, the parameters' fingerprints are compared across the
    ranks (one int64 per tensor exchanged) and ReplicaMismatchError names the tensors that differ; 0 disables it.
    `check_replicas(model, exact=True)` instead compares every bit against rank 0 (broadcasts the parameters)."""

    def __init__(self, group: Any = None, check_every: int = 1):
        if not dist.is_initialized():
            raise RuntimeError(f"torch.distributed is not initialized: call dist.init_process_group (or use "
                               f"{type(self).__name__}.from_environment() under torchrun)")
        self.group, self.check_every = group, check_int("check_every", check_every, 0)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.steps = 0

    @classmethod
    def from_environment(cls, check_every: int = 1):
        """Initializes the default process group from torchrun's environment if needed (NCCL when CUDA is
        available, else gloo; a single process gets a 1-rank gloo group on a free local port)."""
        if not dist.is_initialized():
            if "RANK" not in os.environ:
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        return cls(check_every=check_every)

    def _global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def agree_on_seed(self, seed: int | None) -> int:
        """`seed`, or one drawn on rank 0, broadcast: every rank must regenerate the same directions. A given seed
        is checked to be the same on every rank."""
        drawn = philox.step_seed(seed)
        if seed is None:
            return self._broadcast_int(drawn)
        seeds = [row[0] for row in self._gathered([drawn], torch.int64)]
        if len(set(seeds)) != 1:
            raise ValueError(f"seed differs across ranks ({seeds}): every rank must pass the same seed (or None)")
        return seeds[0]

    def agree_on_rng_state(self, device: torch.device) -> RngState:
        """Rank 0's RNG state (CPU, and CUDA for a CUDA `device`) on every rank: a query scope started from it
        draws rank 0's dropout masks, as one process would."""
        cpu, cuda = rng_state(device)
        return self._broadcast(cpu), (None if cuda is None else self._broadcast(cuda))

    def _broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        return int(self._broadcast(torch.tensor([value], dtype=torch.int64)).item())

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` (same shape and dtype on every rank) on every rank, on the CPU."""
        sent = tensor.to(_collective_device(self.group))
        dist.broadcast(sent, src=self._global_rank(0), group=self.group)
        return sent.cpu()

    def _gathered(self, values: list, dtype: torch.dtype) -> list[list]:
        """Every rank's `values`, in rank order."""
        mine = torch.tensor(values, dtype=dtype, device=_collective_device(self.group))
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        return [g.cpu().tolist() for g in gathered]

    def _before_step(self, model: torch.nn.Module) -> None:
        if self.check_every and self.steps == 0:  # the replicas must start identical
            self.check_replicas(model)

    def _after_step(self, model: torch.nn.Module) -> None:
        self.steps += 1
        if self.check_every and self.steps % self.check_every == 0:
            self.check_replicas(model)

    def check_replicas(self, model: torch.nn.Module, exact: bool = False, buffers: bool = True) -> None:
        """Raises ReplicaMismatchError naming the tensors (parameters, and buffers if `buffers`) whose bits differ
        from rank 0's. exact=False compares 64-bit fingerprints; exact=True broadcasts rank 0's tensors."""
        named = list(model.named_parameters()) + (list(model.named_buffers()) if buffers else [])
        device = _collective_device(self.group)
        src = self._global_rank(0)
        if exact:
            differ = []
            for name, t in named:
                theirs = t.detach().clone().to(device)
                dist.broadcast(theirs, src=src, group=self.group)
                if not torch.equal(_bits(theirs), _bits(t.detach().to(device))):
                    differ.append(name)
            flags = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(self.world_size)]
            dist.all_gather(flags, torch.tensor([len(differ)], dtype=torch.int64, device=device), group=self.group)
            if any(int(f.item()) for f in flags):
                raise ReplicaMismatchError(f"rank {self.rank}: tensors differing from rank 0: {differ[:8]}; "
                                           f"mismatches per rank {[int(f.item()) for f in flags]}")
            return
        mine = torch.tensor([fingerprint(t) for _, t in named], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        differ = sorted({name for g in gathered for (name, _), a, b in zip(named, g.tolist(), gathered[0].tolist())
                         if a != b})
        if differ:
            raise ReplicaMismatchError(f"after step {self.steps}: the ranks' bits differ in {len(differ)} tensors, "
                                       f"e.g. {differ[:8]}")


class DataParallelZO(ReplicatedZO):
    """Data-parallel zeroth-order steps on the default (or given) process group: each rank passes its own shard
    of the batch, only loss scalars are exchanged, and every rank applies the identical update.

        zo = DataParallelZO.from_environment()        # under torchrun: gloo on CPU, NCCL on GPU
        result = zo.mezo_step(model, my_shard, mu=1e-3, lr=1e-6)   # seed agreed by the ranks
        zo.rge_step(model, my_shard); optimizer.step()             # .grad identical on every rank

    Replicas are checked as ReplicatedZO says (`check_every`)."""

    def loss_fn(self, loss_fn: LossFn | None = None, samples: Any = None) -> ShardedLoss:
        return ShardedLoss(loss_fn, self.group, samples)

    def shard(self, batch: Any) -> Any:
        """This rank's share of a global batch every rank holds (see shard_batch)."""
        return shard_batch(batch, self.rank, self.world_size)

    def mezo_step(self, model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 1e-3,
                  lr: float = 1e-6, seed: int | None = None, q: int = 1, param_filter: Any = None,
                  **kwargs: Any):
        """zokernels.mezo_step on the global loss over all ranks' shards (`batch` is this rank's shard)."""
        from .estimators.mezo import mezo_step
        self._before_step(model)
        result = mezo_step(model, batch, self.loss_fn(loss_fn), mu, lr, self.agree_on_seed(seed), q, param_filter,
                           **kwargs)
        self._after_step(model)
        return result

    def rge_step(self, model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 5e-3,
                 q: int = 1, dist_name: str = "gaussian", seed: int | None = None, **kwargs: Any) -> StepResult:
        """zokernels.rge_step on the global loss: `.grad` is identical on every rank, so any optimizer's step
        keeps the replicas identical (checked at the next step)."""
        if self.check_every and self.steps % self.check_every == 0:  # the previous step's optimizer update
            self.check_replicas(model)
        result = api.rge_step(model, batch, self.loss_fn(loss_fn), mu, q, dist_name, self.agree_on_seed(seed),
                              **kwargs)
        self.steps += 1
        return result


# ---- perturbation-parallel ZO -----------------------------------------------------------------------------------
# Every rank holds the same parameters and the FULL batch; the 2q queries of a MeZO step, (0,+), (0,−), (1,+), ...
# in the order one process evaluates them, are cut into one contiguous block per rank (q = 1 on 2 ranks: ℓ⁺ on rank
# 0, ℓ⁻ on rank 1; q = 4: two directions each). Each rank evaluates its block with mezo.py's own query code (exact
# mode: θ is swapped, never written), the loss values (float64 scalars) are all-gathered, and every rank forms the
# g_j, the update terms and the update sweep with mezo.py's own functions, on the same numbers in the same order.
# Every query's value is a deterministic function of (θ, batch, seed, j, sign, forward seed) — the forward (dropout)
# seed is rank 0's, broadcast — so the step equals a single process's mezo_step bit for bit, and the replicas stay
# bit-identical. mode='inplace' is refused: its restores round, differently on each rank (each perturbs along its
# own directions), so the replicas would drift apart.


def query_blocks(q: int, world_size: int) -> list[list[tuple[int, str]]]:
    """The 2q queries of a MeZO step in single-process order, cut into `world_size` contiguous blocks whose sizes
    differ by at most one (the first ones larger; ranks beyond 2q get none)."""
    queries = mezo.all_queries(q)
    base, extra = divmod(len(queries), world_size)
    sizes = [base + (1 if r < extra else 0) for r in range(world_size)]
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [queries[start:start + size] for start, size in zip(starts, sizes)]


def _portable_error(error: BaseException) -> BaseException:
    """`error` itself when it survives pickling (so other ranks can raise the same type and message), else a
    RuntimeError carrying its type, message and notes."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # an exception holding unpicklable state: send its description
        copy = RuntimeError(f"{type(error).__name__}: {error}")
        for note in getattr(error, "__notes__", ()):
            copy.add_note(note)
        return copy


class PerturbationParallelZO(ReplicatedZO):
    """Perturbation-parallel MeZO (DistZO2-style): every rank holds the same model and the same full batch, and
    the 2q ± queries of a step are split across the ranks (query_blocks). Only loss scalars travel.

        zo = PerturbationParallelZO.from_environment()     # under torchrun: gloo on CPU, NCCL on GPU
        result = zo.mezo_step(model, batch, mu=1e-3, lr=1e-6, q=4)   # batch: the same on every rank

    The step equals zokernels.mezo_step(model, batch, ..., q=q) in one process bit for bit (parameters, projected
    gradients, loss) when that process's global RNG is where rank 0's is (dropout draws from it) and the forwards compute the same bits as in the ranks (same kernels, same thread count's reduction
    order). Replicas are checked as ReplicatedZO says (`check_every`)."""

    def agree_on_arguments(self, q: int, mu: float, lr: float) -> None:
        """Every rank must split the same 2q queries and apply the same update: ValueError if q, mu or lr differ."""
        rows = self._gathered([float(q), mu, lr], torch.float64)
        if any(row != rows[0] for row in rows):
            raise ValueError(f"(q, mu, lr) differ across ranks: {rows}; every rank must pass the same values")

    @torch.no_grad()
    def mezo_step(self, model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None, mu: float = 1e-3,
                  lr: float = 1e-6, seed: int | None = None, q: int = 1, param_filter: Any = None, *,
                  mode: str = "exact", update: bool = True, accumulate: bool = False, backend: str | None = None,
                  workspace: mezo.MeZOWorkspace | None = None):
        """zokernels.mezo_step(model, batch, ...) with the 2q queries split across the ranks (`batch`: the full
        batch, the same on every rank). A loss that raises or returns NaN on any rank makes every rank raise the
        error of the earliest failing query (the one a single process would have raised), parameters unchanged."""
        if mode != "exact":
            raise ValueError(f"mode must be 'exact' for perturbation-parallel MeZO, got {mode!r}: mode='inplace' "
                             "restores θ only up to rounding, differently on each rank (each perturbs along its own "
                             "directions), so the replicas would drift apart")
        check_step_batch(batch, custom_loss=loss_fn is not None)
        loss_fn = loss_fn or default_loss
        seed = self.agree_on_seed(None if seed is None else check_seed("seed", seed))
        mu, lr, q, seed = mezo.check_step_args(mu, lr, q, mode, seed)
        mezo.check_update_args(update, accumulate, mode)
        self.agree_on_arguments(q, mu, lr)
        pert = mezo.Perturbation(model, mezo.select_parameters(model, param_filter), backend, scratch=True,
                                 workspace=workspace)
        self._before_step(model)
        blocks = query_blocks(q, self.world_size)
        start = self.agree_on_rng_state(pert.params[0].device)  # dropout draws rank 0's masks in every rank's queries
        with QueryScope(model, rng_state=start, restored=RESTORED) as ctx:
            losses, error = [], None
            try:
                losses = mezo.exact_query_losses(ctx, pert, loss_fn, batch, seed, mu, blocks[self.rank])
            except Exception as caught:  # keep the collective going; every rank raises below
                error = caught
        losses = self._gather_losses(losses, error, blocks)
        pairs = mezo.pair_losses(losses)
        grads = mezo.projected_grads(pairs, mu)
        result = mezo.finish_step(pert, seed, pairs, grads, mezo.mezo_update_terms(grads, lr), update, accumulate)
        self._after_step(model)
        return result

    def _gather_losses(self, losses: list[float], error: BaseException | None,
                       blocks: list[list[tuple[int, str]]]) -> list[float]:
        """All ranks' query losses in single-process order; if a rank failed, raises on every rank the error of the
        first failing rank (its block holds the earliest failing query, as blocks are in query order)."""
        device = _collective_device(self.group)
        width = max(len(block) for block in blocks)
        mine = torch.full((1 + width,), float("nan"), dtype=torch.float64)
        mine[0] = 1.0 if error is not None else 0.0
        mine[1:1 + len(losses)] = torch.tensor(losses, dtype=torch.float64)
        gathered = [torch.empty(1 + width, dtype=torch.float64, device=device) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine.to(device), group=self.group)
        rows = [g.cpu().tolist() for g in gathered]
        failed = [r for r, row in enumerate(rows) if row[0] != 0.0]
        if failed:
            self._raise_first_failure(failed, error)
        return [value for row, block in zip(rows, blocks) for value in row[1:1 + len(block)]]

    def _raise_first_failure(self, failed: list[int], error: BaseException | None) -> None:
        first = failed[0]
        sent = [_portable_error(error) if self.rank == first else None]
        dist.broadcast_object_list(sent, src=self._global_rank(first), group=self.group)
        if self.rank == first:
            raise error
        copy = sent[0]
        copy.add_note(f"zokernels: perturbation-parallel MeZO: this query ran on rank {first} (ranks that failed: "
                      f"{failed}); rank {self.rank}'s parameters and buffers are unchanged")
        if error is not None:
            copy.add_note(f"zokernels: rank {self.rank}'s own later query also failed: {type(error).__name__}: {error}")
        raise copy


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
