"""`zokernels.explain(model, batch)`: which rule the CGE engine gives every op of a model, and why a model (or a
parameter) falls back to full evaluations — the engine's counterpart of `python -m zokernels.info`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..estimators.common import trainable_parameters
from ..estimators.scope import QueryScope
from .cge_engine import record_base
from .heads import Head
from .ops import canonical
from .rules import DESCRIPTIONS
from .seeds import SEEDED_OPS

GENERIC = "generic: f(x+δ) − f(x), batched over replicas (torch.vmap) or one replica at a time"
REPLAYED = "generic, one replica at a time with the base evaluation's RNG state replayed (the op draws random numbers)"


@dataclass
class Explanation:
    """One row per recorded op on a parameter's path to the loss, one per parameter, and the blockers."""

    ops: list[dict] = field(default_factory=list)
    parameters: list[dict] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)

    @property
    def engine(self) -> str:
        return "naive" if self.blockers else "delta"

    def __str__(self) -> str:
        lines = [f"engine: {self.engine}" + ("" if not self.blockers else " (full evaluations per coordinate)")]
        lines += [f"  blocker: {b}" for b in self.blockers]
        lines.append(f"{'#':>4}  {'op':<24} {'where':<40} rule")
        lines += [f"{r['index']:>4}  {r['op']:<24} {r['where'][:40]:<40} {r['rule']}" for r in self.ops]
        lines.append("parameters:")
        lines += [f"  {p['name']:<40} {p['seed']}" for p in self.parameters]
        return "\n".join(lines)


def _rule_of(node) -> str:
    if node.kind == "item":
        return f"output {node.item} of #{node.parent.index}"
    op = canonical(node.func)
    if node.noise is not None:
        return DESCRIPTIONS["dropout"]
    if op in DESCRIPTIONS:
        return DESCRIPTIONS[op]
    if op in SEEDED_OPS and all(i.kind == "param" for i in node.inputs):
        return "only its parameters change: closed-form seed, no input delta"
    return REPLAYED if node.rng_state is not None else GENERIC


@torch.no_grad()
def explain(model: torch.nn.Module, batch: Any, *, output_loss=None, model_input=None) -> Explanation:
    """Records one forward of `model` on `batch` (parameters and buffers are restored afterwards) and lists, for
    every op that depends on a trainable parameter, the rule the delta engine applies."""
    named = trainable_parameters(model)
    head = Head(output_loss, batch)
    with QueryScope(model, [p for _, p in named]) as scope:
        _, rec = record_base(model, batch, head, model_input, scope, dict(named))
        try:
            result = Explanation(blockers=list(rec.tape.blockers))
            for node in rec.tape.nodes:
                if node.kind == "param":
                    result.parameters.append({"name": node.name, "seed": _seed_of(node)})
                else:
                    result.ops.append({"index": node.index, "op": canonical(node.func) if node.func else "item",
                                       "where": node.where or "(no module: the loss or model code)",
                                       "rule": _rule_of(node)})
        finally:
            rec.close()
    return result


def _seed_of(param_node) -> str:
    users = list(dict.fromkeys(param_node.users))
    if not users:
        return "not read by the loss: its estimate is exactly zero"
    parts = []
    for user in users:
        op = canonical(user.func)
        how = "closed-form seed" if op in SEEDED_OPS else "dense change through the op's rule"
        parts.append(f"{op} #{user.index} ({how})")
    return "; ".join(parts)
