"""The fast exact CGE engine: the step's base forward is recorded on a tape (engine/tape.py) with every op's output
cached; then, for K coordinates at a time, the exact change of the loss is carried forward from each op that
reads the coordinate's parameter (engine/seeds.py, engine/propagate.py, engine/rules.py).

It computes the same quantity as the naive per-coordinate forward difference (ℓ(θ + h e_i) − ℓ(θ))/h, with h the
realized step, but formed from δ directly, so no two nearly-equal losses are subtracted."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..estimators.batching import model_call
from ..estimators.cge import estimate_each_parameter
from ..estimators.common import BASE_QUERY, coordinate_query, finite_scalar
from ..estimators.scope import QueryScope
from .allocator import retained_heap
from . import fusion
from .heads import Head
from .propagate import PropagationError, node_delta
from .rules import Context
from .seeds import dense_parameter_delta, seed_delta
from .tape import Node, Tape, record

DEFAULT_MAX_MEMORY_BYTES = 4 << 30
_TEMPORARIES_PER_ACTIVATION = 6  # live delta + rule intermediates, per replica
# Past this many bytes per activation, larger passes run slower per sample on CPU (the working set leaves the
# caches: one 8192-image batch is ~3x slower per image than 128-image chunks). Measured on ResNet-20 (batch 256,
# fused kernels, retained heap, CPU time per coordinate): K = 4 best at 16 MiB per replica (294 ms vs 334 at K = 1,
# 392 at K = 8), K = 1–8 equal at 8 MiB, K = 8–16 best at 4 MiB: about 64 MiB per pass. The cap is fixed, not timed
# per run, so K, and with it every estimate's last bits, never depends on machine load (convolutions round
# differently at different batch sizes): runs and resumes stay bit-reproducible.
PASS_ACTIVATION_BYTES = 64 << 20
# For small activations the caps above allow thousands of replicas; passes are padded to K, so a parameter with few
# selected coordinates would pay for all of them. 32 bounds that waste (and the Triton interpreter tests' cost)
# while keeping small models' passes few.
MAX_REPLICAS_PER_PASS = 32
DENSE_MODES = ("perturbed", "delta")


class RecordingFailed(Exception):
    """The forward raised under the recorder (its cause: the original exception). A plain forward may still work:
    engine='auto' falls back to full evaluations, which report the model's own error if it recurs."""


@dataclass
class Recording:
    """One step's tape with the nodes the estimate ends at."""

    tape: Tape
    head: Head
    loss_node: Node | None           # the loss, when it was computed inside the recording
    output_nodes: list               # (leaf index, node) of model outputs that depend on parameters (black box)
    ctx: Context
    base_loss: float = 0.0

    def final_nodes(self) -> set:
        """The nodes the estimate reads at the end: the loss, or the model outputs handed to a black box."""
        return {n for _, n in self.output_nodes} | ({self.loss_node} if self.loss_node is not None else set())

    def close(self) -> None:
        self.tape.clear()
        self.ctx.derived.clear()
        self.ctx.first_layers.clear()


@torch.no_grad()
def record_base(model: torch.nn.Module, batch: Any, head: Head, model_input, scope: QueryScope,
                params: dict[str, torch.Tensor], dense_mode: str = "delta",
                kernel_backend: str | None = None) -> tuple[float, Recording]:
    """The base forward (a real one, recorded) and the base loss."""
    args, kwargs = model_call(batch, model_input)

    def forward():
        outputs = model(*args, **kwargs)
        return outputs, head.recorded_loss(outputs)

    with scope.same_randomness():
        try:
            tape = record(forward, model, params)
        except Exception as error:
            raise RecordingFailed(f"{type(error).__name__}: {error}") from error
    if tape.loss is not None:
        base = finite_scalar(tape.loss, head.source, BASE_QUERY)
        loss_node, outputs = tape.node_of(tape.loss), []
    else:
        base = head.base(tape.outputs)
        loss_node, outputs = None, head.output_leaves(tape)
    scope.record_loss(base)
    _channels_last(tape)
    ctx = Context({}, dense_mode, kernel_backend)
    if kernel_backend is not None:  # the GPU kernels' plan, matched once for the whole step
        ctx.one_channel_conv = fusion.one_channel_conv2d_delta
        ctx.first_layers = fusion.first_layer_plan(tape)
    return base, Recording(tape, head, loss_node, outputs, ctx, base)


def _channels_last(tape: Tape) -> None:
    """Deltas of 4-D activations are carried channels-last (convolutions run ~2x faster on CPU that way); cached
    base values take the same layout so that elementwise rules read both in one order. The generic path gives ops
    their original layout back (node.converted)."""
    for node in tape.nodes:
        v = node.value
        if (node.kind != "param" and isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point()
                and not v.is_contiguous(memory_format=torch.channels_last)):
            node.value = v.contiguous(memory_format=torch.channels_last)
            node.converted = v.is_contiguous()


def realized_steps(param: torch.Tensor, indices: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h_up = fl(θ+μ) − θ and h_down = θ − fl(θ−μ) in float64 (exact differences of two representable values)."""
    theta = param.detach().reshape(-1)[indices.to(param.device)]
    up = (theta + mu).double() - theta.double()
    down = theta.double() - (theta - mu).double()
    return up.cpu(), down.cpu()


def last_uses(tape: Tape, keep: set) -> dict[Node, int]:
    """The position after which each node's delta can be freed (`keep`: never, e.g. the loss)."""
    position = tape.position
    last = {}
    for n in tape.nodes:
        uses = [position[u] for u in n.users]
        last[n] = len(tape.nodes) if n in keep else max(uses, default=position[n])
    return last


def loss_changes(rec: Recording, param_node: Node, indices: torch.Tensor, steps: torch.Tensor,
                 last_use: dict, what) -> torch.Tensor:
    """ℓ(θ + steps[k] e_indices[k]) − ℓ(θ) for each k, float64 [K]; `what(k)` names query k for errors."""
    tape, ctx = rec.tape, rec.ctx
    fused = fusion.fused_first_layer(param_node, indices, steps, ctx) if ctx.kernel_backend is not None else None
    seeds: dict = {}
    deltas: dict = {}
    if fused is not None:  # the GPU kernel formed the delta after layer → BN → ReLU
        deltas[fused[0]] = fused[1]
        begin = tape.position[fused[0]] + 1
    else:
        users = list(dict.fromkeys(param_node.users))
        seeds = {u: seed_delta(u, param_node, indices, steps, ctx) for u in users}
        if any(s is None for s in seeds.values()):
            deltas[param_node] = dense_parameter_delta(param_node.value.detach(), indices, steps)
        begin = min(tape.position[u] for u in users)
    end = tape.position[rec.loss_node] if rec.loss_node is not None else len(tape.nodes) - 1
    for position in range(begin, end + 1):
        node = tape.nodes[position]
        seed = seeds.get(node)
        others_changed = any(a in deltas for a in node.inputs if a is not param_node)
        if seed is not None and not others_changed:
            deltas[node] = seed
        elif node in seeds or any(a in deltas for a in node.inputs):
            if node in seeds and param_node not in deltas:  # a seeded op whose input changed too: exact generic
                deltas[param_node] = dense_parameter_delta(param_node.value.detach(), indices, steps)
            try:
                changed = node_delta(node, ctx, deltas)
            except Exception as error:  # a rule's bug must not cost the user the step: that parameter goes naive
                raise PropagationError(f"{node.describe()}: {type(error).__name__}: {error}") from error
            if changed is not None:
                deltas[node] = changed
        for source in [n for n in deltas if last_use[n] <= position]:
            del deltas[source]
    return rec.head.change(rec, deltas, len(indices), what)


def replicas_per_pass(tape: Tape, begin: int, max_memory_bytes: int) -> int:
    """K from the memory budget left after the cached base activations and what is derived from them later (BN
    statistics, unfolded conv inputs: about as much again): the largest activation after `begin`, times the live
    temporaries, per replica."""
    def size(v):
        return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0
    cached = sum(size(n.value) for n in tape.nodes if n.kind != "param")
    budget = max_memory_bytes - 2 * cached
    largest = max((size(n.value) for n in tape.nodes[begin:] if n.kind != "param"), default=1) or 1
    by_memory = int(budget // (largest * _TEMPORARIES_PER_ACTIVATION))
    return max(1, min(by_memory, PASS_ACTIVATION_BYTES // largest, MAX_REPLICAS_PER_PASS))


@torch.no_grad()
def estimate_parameter(rec: Recording, name: str, param: torch.Tensor, indices: torch.Tensor, mu: float,
                       central: bool, budget: int, last_use: dict) -> torch.Tensor:
    """CGE estimates of `param`'s coordinates `indices` (zero elsewhere)."""
    estimate = torch.zeros(param.numel(), dtype=torch.float64)
    param_node = rec.tape.params[name]
    if indices.numel() == 0 or not param_node.users:  # the loss does not read this parameter: exactly zero
        return estimate.view_as(param).to(param.dtype)
    begin = min(rec.tape.position[u] for u in param_node.users)
    # K depends on the model and the budget, never on how many coordinates are selected, and every pass is padded
    # to K: a coordinate's estimate is then bitwise the same whichever others are selected with it (a sharded
    # step equals one process's, whatever the shards)
    k = replicas_per_pass(rec.tape, begin, budget)
    for chunk in indices.split(k):
        real = chunk.numel()
        if real < k:  # pad with repeats: every pass has K replicas, so no estimate depends on its neighbours
            chunk = torch.cat([chunk, chunk[-1:].expand(k - real)])
        up, down = realized_steps(param, chunk, mu)
        coordinates = chunk.tolist()
        change_up = loss_changes(rec, param_node, chunk, up, last_use,
                                 lambda j: coordinate_query(name, coordinates[j], "+"))
        if central:
            change_down = loss_changes(rec, param_node, chunk, -down, last_use,
                                       lambda j: coordinate_query(name, coordinates[j], "-"))
            estimate[chunk[:real]] = ((change_up - change_down) / (up + down))[:real]
        else:
            estimate[chunk[:real]] = (change_up / up)[:real]
    return estimate.view_as(param).to(param.dtype)


@torch.no_grad()
def engine_estimates(rec: Recording, mu: float, named, mask, scheme: str, max_memory_bytes: int | None,
                     naive_parameter: Callable, strict: bool) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """Estimates for every trainable parameter (zero outside the mask), the number of coordinates, and the
    parameters that fell back to full evaluations. `naive_parameter(name, param, indices)` serves a parameter
    whose propagation failed (with a warning naming the node); with strict=True that failure raises instead."""
    budget = DEFAULT_MAX_MEMORY_BYTES if max_memory_bytes is None else max_memory_bytes
    last_use = last_uses(rec.tape, rec.final_nodes())
    fell_back: list[str] = []

    def estimate_one(name, param, indices):
        try:
            return estimate_parameter(rec, name, param, indices, mu, scheme == "central", budget, last_use)
        except PropagationError as reason:
            if strict:
                raise RuntimeError(f"engine='delta' cannot serve {name}: {reason}") from reason
            warnings.warn(f"zokernels.cge_step: {name} uses full evaluations per coordinate because the delta "
                          f"engine failed at {reason}", stacklevel=4)
            fell_back.append(name)
            return naive_parameter(name, param, indices)

    with retained_heap():
        estimates, n = estimate_each_parameter(named, mask, estimate_one)
    return estimates, n, fell_back


