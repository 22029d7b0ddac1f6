"""Carrying K coordinates' deltas through the tape: each node gets its registry rule (engine/rules.py) where one
applies, else the generic path, which is exact for any op:
- batched: f(inputs + δ_k) for all k at once through torch.vmap, minus the base output;
- per replica: one call per k where vmap cannot batch the op, and always for ops that drew random numbers in the
  base evaluation — their recorded RNG state is set before every call, so each query sees the same draws.
In-place ops are evaluated on copies; a cached base value is never written."""
from __future__ import annotations

import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .delta import Delta
from .ops import canonical
from .rules import RULES, Context, MultiDelta, is_float
from .tape import Node, mutated_tensor, set_rng_state


class PropagationError(RuntimeError):
    """A node's delta could not be formed; the message names the node (the engine falls back for that parameter)."""


def node_delta(node: Node, ctx: Context, deltas: dict) -> Delta | MultiDelta | None:
    """The change of `node`'s output given the deltas of its inputs (None if none of them changed)."""
    if node.kind == "item":
        parent = deltas.get(node.parent)
        return None if parent is None else parent.items[node.item]
    if not any(a in deltas for a in node.inputs):
        return None
    rule = RULES.get(canonical(node.func))
    if rule is not None:
        result = rule(node, ctx, deltas)
        if result is not NotImplemented:
            return result
    return generic_delta(node, ctx, deltas)


def _loads(node: Node, deltas: dict) -> dict[Node, torch.Tensor]:
    """The perturbed inputs x + δ_k ([K, ...]) of the changed inputs, and a private copy of an input the op writes
    in place, in the layout the model saw."""
    changed = [a for a in node.inputs if a in deltas]
    k = deltas[changed[0]].replicas
    loads = {a: deltas[a].perturbed_values(a.value) for a in changed}
    written = _written_input(node)
    if written is not None:
        source = loads.get(written, written.value.unsqueeze(0).expand(k, *written.value.shape))
        loads[written] = source.clone()
    for a, t in loads.items():
        if a.converted:
            loads[a] = t.contiguous()
    return loads


def _written_input(node: Node) -> Node | None:
    args = tree_map(lambda a: a.value if isinstance(a, Node) else a, (node.args, node.kwargs))
    target = mutated_tensor(node.func, *args)
    if target is None:
        return None
    return next((a for a in node.inputs if a.value is target), None)


def _call(node: Node, substitute: dict) -> object:
    def load(a):
        if not isinstance(a, Node):
            return a
        if a in substitute:
            return substitute[a]
        return a.value.contiguous() if a.converted else a.value
    args, kwargs = tree_map(load, (node.args, node.kwargs))
    out = node.func(*args, **kwargs)
    if out is None:  # __setitem__ and other in-place calls that return nothing: the written tensor
        written = _written_input(node)
        out = substitute.get(written)
    return out


def generic_delta(node: Node, ctx: Context, deltas: dict) -> Delta | MultiDelta:
    if node.noise is not None:  # re-running a dropout would draw a new mask: only its rule may carry it
        raise PropagationError(f"{node.describe()}: dropout with recorded noise reached the generic path")
    loads = _loads(node, deltas)
    order = list(loads)
    k = loads[order[0]].shape[0]
    out = None
    if node.rng_state is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = torch.vmap(lambda *xs: _call(node, dict(zip(order, xs))), randomness="error")(
                    *[loads[a] for a in order])
        except Exception:  # no batching rule for this op: one replica at a time below
            out = None
    if out is None:
        out = _per_replica(node, loads, order, k)
    return _difference(node, out)


def _per_replica(node: Node, loads: dict, order: list, k: int):
    outputs = []
    saved = torch.get_rng_state() if node.rng_state is not None else None
    try:
        for i in range(k):
            if node.rng_state is not None:
                set_rng_state(node.rng_state)
            outputs.append(_call(node, {a: loads[a][i] for a in order}))
    finally:
        if saved is not None:
            torch.set_rng_state(saved)
    first_leaves, spec = tree_flatten(outputs[0])
    per_leaf = [[tree_flatten(o)[0][j] for o in outputs] for j in range(len(first_leaves))]
    stacked = [torch.stack(leaf) if isinstance(leaf[0], torch.Tensor) else leaf[0] for leaf in per_leaf]
    return stacked[0] if isinstance(outputs[0], torch.Tensor) else stacked


def _difference(node: Node, out) -> Delta | MultiDelta:
    """perturbed outputs − base outputs, leaf by leaf (non-float outputs stay in perturbed form)."""
    if isinstance(node.value, torch.Tensor):
        return _leaf_delta(out if isinstance(out, torch.Tensor) else out[0], node.value, node)
    base_leaves, _ = tree_flatten(node.value)
    out_leaves = out if isinstance(out, list) else tree_flatten(out)[0]
    return MultiDelta([_leaf_delta(o, b, node) if isinstance(b, torch.Tensor) else None
                       for o, b in zip(out_leaves, base_leaves)])


def _leaf_delta(perturbed: torch.Tensor, base: torch.Tensor, node: Node) -> Delta:
    if perturbed.shape[1:] != base.shape:
        raise PropagationError(f"{node.describe()}: its output shape changes under a perturbation "
                               f"({tuple(base.shape)} -> {tuple(perturbed.shape[1:])})")
    if not is_float(base):
        return Delta(perturbed, perturbed=True)
    return Delta(perturbed - base.unsqueeze(0))
