"""The fused rule sweep (public entry point: zokernels.philox.rule_sweep_): a ZO update rule applied inside the
Philox sweep, the estimate never materialized. This module holds the rules' tables, the native declarations, the
elementwise torch code and the backends' runners.

For every tensor t (out[t] and sources[t] share shape and dtype; out may be sources) and element i:

    g = Σ_k fl32(c_k)·z(seed, stream_k, offsets[t] + i)      fp32, summed in term order from 0 (as the sweeps)
    Δ = rule(g) [+ fl32(x·decay)]                            fp32, x = sources[t][i] widened (fp64 for fp64)
    out[t][i] = RN_dtype(x + Δ)                               the sum in fp32 (fp64 for fp64 tensors)

Rules (`RuleSpec.rule`; its scalars `RuleSpec.hyper` are rounded to fp32):
- "linear": Δ = g; the coefficients carry −lr (SGD with weight decay).
- "sign": Δ = step·sign(g), sign(±0) = 0 (ZO-signSGD; step = −lr).
- "adam": m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², Δ = (m / (√v / √(1−β2^k) + ε))·step, step = −lr/(1−β1^k);
  m and v are fp32 tensors (RuleSpec.state) read and written in the same pass.
- "momentum": SGD's heavy ball (torch.optim.SGD, dampening 0): m ← g if first else β·m + g, Δ = m·step (step = −lr);
  m one fp32 tensor.
- "sign_momentum": signum: m ← β·m + (1−β)·g, Δ = step·sign(m); m one fp32 tensor.
Decoupled weight decay (RuleSpec.decay = −lr·wd, None for none) adds fl32(x·fl32(decay)) to Δ.

Each step is one correctly rounded fp32 operation in the order of zokernels.optim.rules (the materialized path,
whose elementwise code is `rule_delta_torch` below), so every backend equals that path bit for bit: csrc/rule_sweep.h
(the CUDA kernel csrc/cuda/rule_sweep.cu and its C++ twin csrc/cpu/rule_sweep_cpu.cpp), kernels/triton/rule_sweep.py
and the torch backend here. The slow twin is reference/kernels_ref.py rule_sweep_ref (numpy, element by element).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import native
from .philox_torch import philox_normal_torch, sqrt_rn

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")
# The rules, their fp32 scalars in row order (csrc/rule_sweep.h), and their fp32 state tensors.
HYPER = {"linear": (), "sign": ("step",),
         "adam": ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "bias2_root", "eps", "step"),
         "momentum": ("beta", "first", "step"), "sign_momentum": ("beta", "one_minus_beta", "step")}
STATES = {"linear": (), "sign": (), "adam": ("exp_avg", "exp_avg_sq"), "momentum": ("momentum_buffer",),
          "sign_momentum": ("momentum_buffer",)}
RULE_CODES = {"linear": 0, "sign": 1, "adam": 2, "momentum": 3, "sign_momentum": 4}
ROW = 9  # fp32 scalars per tensor: has_decay, decay, the rule's (padded with zeros)

# csrc/cpu/rule_sweep_cpu.cpp: lists of host addresses (m, v empty for stateless rules), rows flattened.
SWEEP_CPU = native.op(
    "rule_sweep", native.tensors("out"), native.tensors("sources"),
    native.tensors("m", dtypes=(torch.float32,), optional=True),
    native.tensors("v", dtypes=(torch.float32,), optional=True), "numels", "offsets",
    native.dtype_codes("dtypes", of="out"), "seed", "terms", "rule", "rows", backends=("cpu",),
    element_types=tuple(native.DTYPE_CODES))
# csrc/cuda/rule_sweep.cu: one launch over a device table (out, src, m, v, numel, offset) of one dtype's tensors.
SWEEP_CUDA = native.op(
    "rule_sweep", native.tensor("table", dtypes=(torch.int64,)), native.tensor("tiles", dtypes=(torch.int64,)),
    "n_tiles", native.tensor("words", dtypes=(torch.int64,)), native.tensor("floats", dtypes=(torch.float32,)),
    "n_terms", "rule", native.dtype_code("dtype"), backends=("cuda",))


@dataclass(frozen=True)
class RuleSpec:
    """How the rule sweep updates one tensor: the rule, its scalars (HYPER[rule] order), the weight-decay
    coefficient −lr·wd (None: no weight decay) and the rule's fp32 state tensors (STATES[rule] order)."""

    rule: str
    hyper: tuple[float, ...] = ()
    decay: float | None = None
    state: tuple[torch.Tensor, ...] = ()

    def row(self) -> list[float]:
        """The fp32 scalars the kernels read (csrc/rule_sweep.h): has_decay, decay, the rule's, zero padding."""
        values = [1.0 if self.decay is not None else 0.0, self.decay or 0.0, *self.hyper]
        return [float(np.float32(v)) for v in values] + [0.0] * (ROW - len(values))


# ---- the elementwise rule in torch ops (the materialized path of zokernels.optim and the torch backend) ---------
def rule_delta_torch(rule: str, g: torch.Tensor, hyper: Sequence[float], state: Sequence[torch.Tensor] = ()
                     ) -> torch.Tensor:
    """Δ (fp32) of `rule` from the fp32 estimate g, advancing the fp32 state in place; hyper: fp32 values in
    HYPER[rule] order. One torch op per fp32 rounding, in the order of csrc/rule_sweep.h (sqrt correctly rounded)."""
    if rule == "sign":
        return torch.sign(g) * hyper[0]
    if rule == "momentum":
        beta, first, step = hyper
        (m,) = state
        if first:
            m.copy_(g)
        else:
            m.mul_(beta).add_(g)
        return m * step
    if rule == "sign_momentum":
        beta, one_minus_beta, step = hyper
        (m,) = state
        m.mul_(beta).add_(g * one_minus_beta)
        return torch.sign(m) * step
    if rule == "adam":
        beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_root, eps, step = hyper
        m, v = state
        m.mul_(beta1).add_(g * one_minus_beta1)
        v.mul_(beta2).add_((g * g) * one_minus_beta2)
        denom = sqrt_rn(v) / bias2_root + eps
        return (m / denom) * step
    return g


def with_decay_torch(delta: torch.Tensor, x: torch.Tensor, decay: float | None) -> torch.Tensor:
    """Δ + fl32(x·fl32(decay)), the product formed in fp32 (fp64 for fp64 x); Δ unchanged when decay is None."""
    if decay is None:
        return delta
    wide = x.double() if x.dtype == torch.float64 else x.float()
    return delta + (wide * float(np.float32(decay))).float()


def add_rounded_torch(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """RN_dtype(x + Δ): the sum in fp32 (fp64 for fp64 x), rounded once to x's dtype."""
    if x.dtype == torch.float64:
        return x + delta.double()
    return (x.float() + delta).to(x.dtype)


# ---- the backends (the checked entry point is zokernels.philox.rule_sweep_) ------------------------------------
def check_specs(specs: Sequence[RuleSpec], out: Sequence[torch.Tensor]) -> list[RuleSpec]:
    """The specs, one per output tensor, all naming one rule, each with its scalars and fp32 state (errors name the
    spec and the field)."""
    specs = list(specs)
    if len(specs) != len(out):
        raise ValueError(f"specs must have one entry per output tensor ({len(out)}), got {len(specs)}")
    for i, spec in enumerate(specs):
        _check_spec(i, spec, out[i])
    if len({spec.rule for spec in specs}) > 1:
        raise ValueError(f"specs must all name one rule (one sweep per rule), got {sorted({s.rule for s in specs})}")
    return specs


def _check_spec(i: int, spec: RuleSpec, like: torch.Tensor) -> None:
    if not isinstance(spec, RuleSpec):
        raise TypeError(f"specs[{i}] must be a RuleSpec, got {type(spec).__name__}")
    if spec.rule not in HYPER:
        raise ValueError(f"specs[{i}].rule must be one of {tuple(HYPER)}, got {spec.rule!r}")
    if len(spec.hyper) != len(HYPER[spec.rule]):
        raise ValueError(f"specs[{i}].hyper must hold {HYPER[spec.rule]} for rule {spec.rule!r}, got {spec.hyper}")
    if len(spec.state) != len(STATES[spec.rule]):
        raise ValueError(f"specs[{i}].state must hold {STATES[spec.rule]} for rule {spec.rule!r}, got "
                         f"{len(spec.state)} tensors")
    for name, s in zip(STATES[spec.rule], spec.state):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.shape != like.shape:
            raise TypeError(f"specs[{i}].state {name} must be a float32 tensor of shape {tuple(like.shape)}, got "
                            f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
        if not s.is_contiguous():
            raise ValueError(f"specs[{i}].state {name} must be contiguous, got strides {s.stride()}")


def sweep_cpu(out, sources, offsets, seed, terms32, specs) -> None:
    """The C++ sweep (csrc/cpu/rule_sweep_cpu.cpp); arguments checked by the caller, terms32 fp32-rounded."""
    keep = [i for i, o in enumerate(out) if o.numel() > 0]
    if not keep:
        return
    states = len(STATES[specs[0].rule])
    SWEEP_CPU("cpu", [out[i] for i in keep], [sources[i] for i in keep],
              [specs[i].state[0] for i in keep] if states >= 1 else None,
              [specs[i].state[1] for i in keep] if states == 2 else None,
              [out[i].numel() for i in keep], [offsets[i] for i in keep], seed, terms32, RULE_CODES[specs[0].rule],
              [x for i in keep for x in specs[i].row()])


def sweep_torch(out, sources, offsets, seed, terms32, specs) -> None:
    """The torch backend: z from the torch Philox generator on the tensors' device, the rule in torch ops."""
    for o, s, offset, spec in zip(out, sources, offsets, specs):
        g = torch.zeros(o.numel(), dtype=torch.float32, device=o.device)
        for stream, coeff in terms32:
            g += coeff * philox_normal_torch(o.numel(), seed, stream, offset, device=o.device)
        hyper = spec.row()[2:2 + len(spec.hyper)]
        delta = rule_delta_torch(spec.rule, g.view_as(o), hyper, spec.state)
        delta = with_decay_torch(delta, s, spec.decay)
        with torch.no_grad():
            o.copy_(add_rounded_torch(s, delta))


def device_rule_sweep(backend: str, out, sources, offsets, seed, terms32, specs, block: int,
                      tiles: Callable[[list[tuple[int, int, int, int, int]], torch.device], torch.Tensor]) -> None:
    """One launch per dtype group (cuda: csrc/cuda/rule_sweep.cu, triton: kernels/triton/rule_sweep.py) over tiles
    of `block` stream positions; `tiles(rows, device)` is the sweeps' tile table of rows (0, 0, 0, numel, offset)
    (zokernels.philox). Arguments checked by the caller."""
    rule = specs[0].rule
    words = native.philox_key_words(seed, [stream for stream, _ in terms32])
    for dtype, keep in native.dtype_groups(out):
        device = out[keep[0]].device
        state = [[native.address(s) for s in specs[i].state] + [0, 0] for i in keep]
        table = torch.tensor([(native.address(out[i]), native.address(sources[i]), st[0], st[1], out[i].numel(),
                               offsets[i]) for i, st in zip(keep, state)], dtype=torch.int64).to(device)
        tile_table = tiles([(0, 0, 0, out[i].numel(), offsets[i]) for i in keep], device)
        words_t = torch.tensor(words, dtype=torch.int64).to(device)
        floats = torch.tensor([c for _, c in terms32] + [x for i in keep for x in specs[i].row()],
                              dtype=torch.float32).to(device)
        if backend == "cuda":
            SWEEP_CUDA("cuda", table, tile_table, tile_table.shape[0], words_t, floats, len(terms32),
                       RULE_CODES[rule], dtype)
        else:
            from .triton.rule_sweep import rule_sweep_triton

            rule_sweep_triton(table, tile_table, words_t, floats, len(terms32), rule,
                              str(dtype).removeprefix("torch."), block)
