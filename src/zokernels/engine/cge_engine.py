"""The fast exact CGE engine: one base forward with every op's output cached, then, for K coordinates at a time,
the exact change of the loss carried forward from the coordinate's op as a delta (see engine/delta.py).

It computes the same quantity as the naive per-coordinate forward difference (ℓ(θ + h e_i) − ℓ(θ))/h, with h the
realized step, but formed from δ directly, so no two nearly-equal losses are subtracted."""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..estimators.cge import estimate_each_parameter
from ..estimators.common import QueryGuard
from ..kernels.engine_adapter import KERNEL_BACKENDS, fused_seed_delta
from . import delta as rules
from .allocator import retained_heap
from .delta import Delta
from .graph import CapturedModel, capture, engine_blockers, propagate, run_base
from .heads import Head

DEFAULT_MAX_MEMORY_BYTES = 4 << 30
_TEMPORARIES_PER_ACTIVATION = 6  # live delta + rule intermediates, per replica
# Past this many bytes per activation, larger passes run slower per sample on CPU (the working set leaves the
# caches; ENVIRONMENT.md: one 8192-image batch is ~3x slower per image than 128-image chunks). Measured on
# ResNet-20 (batch 256, fused kernels, retained heap, CPU time per coordinate): K = 4 best at 16 MiB per replica
# (294 ms vs 334 at K = 1, 392 at K = 8), K = 1–8 equal at 8 MiB, K = 8–16 best at 4 MiB: about 64 MiB per pass.
# The cap is fixed, not timed per run, so K, and with it every estimate's last bits, never depends on machine
# load (convolutions round differently at different batch sizes): runs and resumes stay bit-reproducible.
PASS_ACTIVATION_BYTES = 64 << 20


class EngineUnavailable(Exception):
    """The model cannot go through the delta engine; the message says why (the caller falls back)."""


DENSE_MODES = ("perturbed", "delta")


# model -> (structure signature, capture): tracing costs 10–50 ms per step. A model whose modules were replaced,
# added or switched train/eval is traced again.
_CAPTURES: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, CapturedModel]]" = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple:
    return tuple((name, id(module), type(module), module.training) for name, module in model.named_modules())


def prepare(model: nn.Module, dense_mode: str = "delta") -> CapturedModel:
    """The model's capture (cached per model while its module structure is unchanged), ready for a step."""
    structure = _structure(model)
    cached = _CAPTURES.get(model)
    if cached is not None and cached[0] == structure:
        captured = cached[1]
    else:
        try:
            captured = capture(model)
        except Exception as error:  # fx raises many types for untraceable Python
            raise EngineUnavailable(f"torch.fx could not trace the model ({type(error).__name__}: {error})") \
                from error
        _CAPTURES[model] = (structure, captured)
    blockers = engine_blockers(captured)
    if blockers:
        raise EngineUnavailable("; ".join(blockers))
    captured.dense_mode = dense_mode
    return captured


def parameter_sites(captured: CapturedModel) -> dict[str, tuple[fx.Node, nn.Module, str]]:
    """Parameter name -> (the one call_module node using it, module, local name). Parameters of modules called
    more than once are left out (the caller handles them with full evaluations)."""
    calls: dict[str, list[fx.Node]] = {}
    for node in captured.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    sites = {}
    for target, nodes in calls.items():
        if len(nodes) != 1:
            continue
        module = captured.module(nodes[0])
        for local, _ in module.named_parameters(recurse=False):
            sites[f"{target}.{local}" if target else local] = (nodes[0], module, local)
    return sites


def realized_steps(param: torch.Tensor, indices: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h_up = fl(θ+μ) − θ and h_down = θ − fl(θ−μ) in float64 (exact differences of two representable values)."""
    theta = param.detach().reshape(-1)[indices.to(param.device)]
    up = (theta + mu).double() - theta.double()
    down = theta.double() - (theta - mu).double()
    return up.cpu(), down.cpu()


def seed_delta(captured: CapturedModel, node: fx.Node, module: nn.Module, local: str, indices: torch.Tensor,
               steps: torch.Tensor, cache: dict) -> Delta:
    """The change of `node`'s output when coordinate indices[k] of its parameter moves by steps[k]."""
    x, y = captured.values[node.args[0]], captured.values[node]
    h = steps.to(device=y.device, dtype=y.dtype)
    idx = indices.to(y.device)
    if isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str) \
            and module.padding_mode == "zeros" and len(node.args) == 1:
        spatial = y.shape[2:]
        if local == "bias":
            return Delta(h.view(-1, 1, 1, 1).expand(-1, y.shape[0], *spatial).clone(), idx)
        per_out = module.weight[0].numel()
        patches = cache.get(node)
        if patches is None:
            patches = cache[node] = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        values = patches.index_select(1, idx % per_out).transpose(0, 1)  # [K, B, L]
        return Delta(values.reshape(len(idx), y.shape[0], *spatial) * h.view(-1, 1, 1, 1), idx // per_out)
    if isinstance(module, nn.Linear) and x.dim() == 2:
        if local == "bias":
            return Delta(h.view(-1, 1).expand(-1, y.shape[0]).clone(), idx)
        columns = x.index_select(1, idx % module.in_features).T  # [K, B]
        return Delta(columns * h.view(-1, 1), idx // module.in_features)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        shape = (-1,) + (1,) * (y.dim() - 1)
        if local == "bias":
            return Delta(h.view(shape).expand(-1, *rules.gather_channels(y, idx).shape[1:]).clone(), idx)
        normalized = cache.get(node)
        if normalized is None:
            normalized = cache[node] = rules.normalized_input(x, module)
        return Delta(rules.gather_channels(normalized, idx) * h.view(shape), idx)
    return _perturbed_module_delta(captured, node, module, local, idx, h)


def _perturbed_module_delta(captured, node, module, local, idx, h) -> Delta:
    """Any other module: evaluate it with the coordinate perturbed (functional_call), once per replica."""
    values, base = captured.values, captured.values[node]
    args = fx.node.map_arg(node.args, lambda a: values[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: values[a])
    param = getattr(module, local)
    outputs = []
    for i, step in zip(idx.tolist(), h):
        perturbed = param.detach().clone()
        perturbed.view(-1)[i] += step.to(param.dtype)
        outputs.append(torch.func.functional_call(module, {local: perturbed}, args, kwargs) - base)
    return Delta(torch.stack(outputs))


def _last_uses(captured: CapturedModel) -> dict[fx.Node, int]:
    position = captured.position
    return {n: max((position[u] for u in n.users), default=position[n]) for n in captured.nodes}


def output_delta(captured: CapturedModel, start: fx.Node, seed: Delta, last_use: dict[fx.Node, int],
                 kernel_backend: str | None = None) -> Delta:
    """Carries `seed` (the delta of `start`'s output) to the model output, freeing deltas after their last use.
    kernel_backend: 'triton' or 'cuda' to run the GPU kernels where they apply (None: the torch rules)."""
    deltas: dict[fx.Node, Delta] = {start: seed}
    begin = captured.position[start] + 1
    for position, node in enumerate(captured.nodes[begin:], start=begin):
        if node.op == "output":
            result = deltas.get(node.args[0])
            return result if result is not None else Delta(torch.zeros(seed.replicas, *captured.values[
                node.args[0]].shape, dtype=seed.values.dtype, device=seed.values.device))
        changed = propagate(captured, node, deltas, kernel_backend)
        if changed is not None:
            deltas[node] = changed
        for source in [n for n in deltas if last_use[n] <= position]:
            del deltas[source]
    raise EngineUnavailable("the traced graph has no output node")


def cached_bytes(captured: CapturedModel) -> int:
    return sum(v.numel() * v.element_size() for v in captured.values.values() if isinstance(v, torch.Tensor))


def replicas_per_pass(captured: CapturedModel, start: fx.Node, max_memory_bytes: int) -> int:
    """K from the memory budget left after the cached base activations and what is derived from them later (BN
    statistics, unfolded conv inputs: about as much again): the largest activation after `start`, times the live
    temporaries, per replica."""
    max_memory_bytes = max_memory_bytes - 2 * cached_bytes(captured)
    begin = captured.position[start]
    largest = max((v.numel() * v.element_size() for n, v in captured.values.items()
                   if isinstance(v, torch.Tensor) and captured.position[n] >= begin), default=1)
    by_memory = int(max_memory_bytes // (largest * _TEMPORARIES_PER_ACTIVATION))
    return max(1, min(by_memory, PASS_ACTIVATION_BYTES // largest))


def kernel_backend_for(backend: str | None) -> str | None:
    """The backend whose GPU kernels the engine calls, or None for the engine's own rules. On CPU the fused kernels
    are slower than those rules (docs/gpu_kernels.md), so only an explicit triton/cuda choice turns them on."""
    return backend if backend in KERNEL_BACKENDS else None


def _start(captured, node, module, local, chunk, steps, cache, kernel_backend) -> tuple[fx.Node, Delta]:
    """The node where propagation starts and its output's delta: after the fused layer → BN → ReLU kernel where it
    applies, else the coordinate's own layer (seed rule)."""
    if kernel_backend is not None:
        fused = fused_seed_delta(captured, node, module, local, chunk, steps, backend=kernel_backend)
        if fused is not None:
            return fused
    return node, seed_delta(captured, node, module, local, chunk, steps, cache)


def _loss_changes(captured, head: Head, node, module, local, chunk, steps, base_loss, cache, last_use, name,
                  kernel_backend=None):
    start, seed = _start(captured, node, module, local, chunk, steps, cache, kernel_backend)
    out = output_delta(captured, start, seed, last_use, kernel_backend)
    outputs = captured.values[captured.nodes[-1].args[0]]
    return head.change(outputs, out, base_loss, f"the queries of {name}[{chunk[0].item()}...]").cpu()


@torch.no_grad()
def _estimate_parameter(captured, head, site, name, param, indices, mu, central, base_loss, budget,
                        last_use, kernel_backend: str | None = None) -> torch.Tensor:
    node, module, local = site
    estimate = torch.zeros(param.numel(), dtype=torch.float64)
    if indices.numel() == 0:
        return estimate.view_as(param).to(param.dtype)
    cache: dict = {}
    # a parameter with fewer coordinates than K runs them all in one unpadded pass
    k = min(replicas_per_pass(captured, node, budget), indices.numel())

    def run_chunk(chunk: torch.Tensor) -> None:
        real = chunk.numel()
        if real < k:  # pad with repeats: every pass has K replicas, so no estimate depends on its neighbours
            chunk = torch.cat([chunk, chunk[-1:].expand(k - real)])
        up, down = realized_steps(param, chunk, mu)
        change_up = _loss_changes(captured, head, node, module, local, chunk, up, base_loss, cache, last_use, name,
                                  kernel_backend)
        if central:
            change_down = _loss_changes(captured, head, node, module, local, chunk, -down, base_loss, cache,
                                        last_use, name, kernel_backend)
            estimate[chunk[:real]] = ((change_up - change_down) / (up + down))[:real]
        else:
            estimate[chunk[:real]] = (change_up / up)[:real]

    for chunk in indices.split(k):
        run_chunk(chunk)
    return estimate.view_as(param).to(param.dtype)


@torch.no_grad()
def engine_base(captured: CapturedModel, batch: Any, head: Head, model_input: Callable[[Any], tuple],
                guard: QueryGuard) -> float:
    """The base forward (through the real modules, caching every op's output) and the base loss."""
    with guard.same_randomness():
        outputs = run_base(captured, model_input(batch))
    if not isinstance(outputs, torch.Tensor):
        raise EngineUnavailable(f"the model returns {type(outputs).__name__}; the engine needs one tensor")
    return head.base(outputs)


@torch.no_grad()
def engine_estimates(captured: CapturedModel, head: Head, mu: float, named, mask, scheme: str, base_loss: float,
                     max_memory_bytes: int | None, naive_parameter: Callable, backend: str | None = None) -> tuple[
                         dict[str, torch.Tensor], int]:
    """Estimates for every trainable parameter (zero outside the mask) and the number of coordinates.

    `naive_parameter(name, param, indices)` handles parameters the engine has no site for (e.g. a module called
    twice) with full evaluations. `backend` (cge_step's resolved backend): 'triton' or 'cuda' runs the fused GPU
    kernels where their pattern holds; anything else keeps the engine's own rules."""
    sites, last_use = parameter_sites(captured), _last_uses(captured)
    budget = DEFAULT_MAX_MEMORY_BYTES if max_memory_bytes is None else max_memory_bytes
    kernel_backend = kernel_backend_for(backend)

    def estimate_one(name, param, indices):
        if name not in sites:
            return naive_parameter(name, param, indices)
        return _estimate_parameter(captured, head, sites[name], name, param, indices, mu, scheme == "central",
                                   base_loss, budget, last_use, kernel_backend)

    with retained_heap():
        return estimate_each_parameter(named, mask, estimate_one)
