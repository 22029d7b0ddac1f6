"""Seed-regenerated Gaussian directions z(seed, stream, offset): the public face of the Philox kernels.

A direction over a list of tensors is one stream; tensor t's elements use global offsets starting at the sum of
the numels before it, so z does not depend on how parameters are grouped, chunked or threaded.

Backends (kernels.dispatch.choose_backend, op "philox_sweep"): cpu (`_C`), cuda and triton (one launch per dtype),
and torch, which generates z with torch ops on the tensors' own device (kernels/philox_torch.py). All are
bit-identical. The native signatures are declared below (kernels/native.py).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from .checks import check_seed
from .kernels import native, rule_sweep
from .kernels.dispatch import KERNEL_BACKENDS, choose_backend
from .kernels.philox_torch import philox_normal_torch, philox_uint32_torch

SWEEP_IMPLEMENTED = ("cuda", "triton", "cpu", "torch")
_SWEPT = tuple(native.DTYPE_CODES)  # the sweeps read and write every dtype of the table
# csrc/cpu/philox_cpu.cpp: the listed tensors in place (no sources) or out of place (sources, and minus if given).
SWEEP_CPU = native.op(
    "philox_sweep", native.tensors("tensors"), "numels", "offsets", native.dtype_codes("dtypes", of="tensors"),
    "seed", "terms", native.tensors("sources", optional=True), native.tensors("minus", optional=True),
    backends=("cpu",), element_types=_SWEPT)
# csrc/cuda/philox_sweep.cu: one launch over device tables of addresses (_geometry) for the tensors of one dtype.
SWEEP_CUDA = native.op(
    "philox_sweep", native.tensor("table", dtypes=(torch.int64,)), native.tensor("tiles", dtypes=(torch.int64,)),
    "n_tiles", native.tensor("words", dtypes=(torch.int64,)), native.tensor("floats", dtypes=(torch.float32,)),
    "n_terms", native.dtype_code("dtype"), "has_minus", backends=("cuda",))
# Host-side generators (csrc/cpu/philox_cpu.cpp): the raw words are written as int32 and read back as uint32.
NORMAL = native.op("philox_normal", native.tensor("out", dtypes=(torch.float32,)), "n", "seed", "stream", "offset",
                   backends=("cpu",))
UINT32 = native.op("philox_uint32", native.tensor("out", dtypes=(torch.int32,)), "n", "seed", "stream", "offset",
                   backends=("cpu",))
NORMAL_SUMSQ = native.op("philox_normal_sumsq", "n", "seed", "stream", "offset", backends=("cpu",))
# Elements per program (Triton) / per thread block (CUDA: 256 threads x one Philox block of 4 elements each).
TRITON_BLOCK = 2048
CUDA_BLOCK = 1024


SEED_DRAW_BOUND = 2**62  # drawn seeds are < 2**62: they survive a round trip through int64 and JSON


def step_seed(seed: int | None, name: str = "seed") -> int:
    """The Philox seed of a step or an optimizer: `seed` checked, or (None) one drawn from torch's global generator,
    so that torch.manual_seed makes a run repeatable. Every verb draws its seed here and reports it."""
    if seed is None:
        return int(torch.randint(0, SEED_DRAW_BOUND, (1,)).item())
    return check_seed(name, seed)


def _resolve(tensors: Sequence[torch.Tensor], backend: str | None) -> str:
    devices = {t.device for t in tensors} or {torch.device("cpu")}
    if len(devices) != 1:
        raise ValueError(f"tensors must all be on one device, got {sorted(map(str, devices))}")
    return choose_backend(SWEEP_CPU.name, SWEEP_IMPLEMENTED, backend, devices.pop())


def _use_cpu_ext(op: native.NativeOp, backend: str | None) -> bool:
    """Whether a host-side generator (its result lives on the CPU) runs `op` in _C; otherwise torch's generator.
    A GPU backend asked for is the sweeps' backend: z is the same number on every backend, so torch serves it."""
    requested = "torch" if backend in KERNEL_BACKENDS else backend
    return choose_backend(op.name, ("cpu", "torch"), requested, torch.device("cpu")) == "cpu"


def _check_offsets(offsets: Sequence[int], tensors: Sequence[torch.Tensor]) -> list[int]:
    checked = [check_seed(f"offsets[{i}]", o) for i, o in enumerate(offsets)]
    for i, (o, t) in enumerate(zip(checked, tensors)):
        if o + t.numel() > 2**63:
            raise ValueError(f"offsets[{i}] + numel must stay below 2**63, got {o} + {t.numel()}")
    return checked


def philox_normal(n: int, seed: int, stream: int = 0, offset: int = 0, backend: str | None = None) -> torch.Tensor:
    """float32 tensor of z(seed, stream, offset + i), i < n."""
    seed, stream, offset = (check_seed(k, v) for k, v in (("seed", seed), ("stream", stream), ("offset", offset)))
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if _use_cpu_ext(NORMAL, backend):
        out = torch.empty(n, dtype=torch.float32)
        NORMAL("cpu", out, n, seed, stream, offset)
        return out
    return philox_normal_torch(n, seed, stream, offset)


def philox_uint32(n: int, seed: int, stream: int = 0, offset: int = 0, backend: str | None = None) -> np.ndarray:
    """The raw uint32 Philox words behind z (for tests and cross-backend checks)."""
    seed, stream, offset = (check_seed(k, v) for k, v in (("seed", seed), ("stream", stream), ("offset", offset)))
    if _use_cpu_ext(UINT32, backend):
        out = torch.empty(n, dtype=torch.int32)
        UINT32("cpu", out, n, seed, stream, offset)
        return out.numpy().view(np.uint32)
    return philox_uint32_torch(n, seed, stream, offset).numpy().astype(np.uint32)


def stream_offsets(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Global element offset of each tensor when the list is read as one flat vector."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += t.numel()
    return offsets


def normal_sumsq(numel: int, seed: int, stream: int, offset: int, backend: str | None = None) -> float:
    """Σ z(seed, stream, offset + i)² over i < numel, without materializing z on the cpu backend."""
    if _use_cpu_ext(NORMAL_SUMSQ, backend):
        return float(NORMAL_SUMSQ("cpu", numel, check_seed("seed", seed), stream, offset))
    # z is generated on the CPU (the result is a host float); the float64 sum keeps numpy's dot order.
    z = philox_normal_torch(numel, seed, stream, offset).numpy().astype(np.float64)
    return float(np.dot(z, z))


def _terms32(terms: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """(stream, coeff rounded to fp32) per term; every backend forms the combination from these fp32 values."""
    checked = []
    for k, term in enumerate(terms):
        if not (isinstance(term, (tuple, list)) and len(term) == 2):
            raise TypeError(f"terms[{k}] must be a (stream, coeff) pair, got {term!r}")
        checked.append((check_seed(f"terms[{k}] stream", term[0]), float(np.float32(term[1]))))
    return checked


def _check_sweep_targets(tensors: Sequence[torch.Tensor], name: str = "tensors") -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in native.DTYPE_CODES:
            raise TypeError(f"{name}[{i}] must be float32/float64/float16/bfloat16, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous (the sweep reads and writes its storage in order), "
                             f"got strides {t.stride()} for shape {tuple(t.shape)}")


def add_normal_combination_(
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int],
    seed: int,
    terms: Sequence[tuple[int, float]],
    scales: Sequence[float] | None = None,
    backend: str | None = None,
) -> None:
    """In place, for every tensor t: t += scales[t] · Σ_k coeff_k · z(seed, stream_k, offsets[t] + i).

    One pass over all tensors (multi-tensor sweep); z is regenerated, never stored. The combination is formed in
    fp32 and added in fp32 (rounded once to the tensor's dtype)."""
    if len(offsets) != len(tensors):
        raise ValueError(f"offsets must have one entry per tensor ({len(tensors)}), got {len(offsets)}")
    scales = [1.0] * len(tensors) if scales is None else list(scales)
    if len(scales) != len(tensors):
        raise ValueError(f"scales must have one entry per tensor ({len(tensors)}), got {len(scales)}")
    _check_sweep_targets(tensors)
    offsets = _check_offsets(offsets, tensors)
    seed = check_seed("seed", seed)
    resolved = _resolve(tensors, backend)
    if resolved in ("triton", "cuda"):
        scales32 = [float(np.float32(s)) for s in scales]
        device_sweep(resolved, list(tensors), list(tensors), None, offsets, seed, _terms32(terms), scales32)
        return
    if resolved == "cpu":
        # Per-tensor scales are folded into the coefficients: one call per distinct scale keeps one pass each.
        for scale in sorted(set(scales)):
            group = [(t, o) for t, o, s in zip(tensors, offsets, scales) if s == scale and t.numel() > 0]
            scaled_terms = [(int(stream), float(np.float32(coeff) * np.float32(scale))) for stream, coeff in terms]
            if group:
                SWEEP_CPU("cpu", [t for t, _ in group], [t.numel() for t, _ in group], [o for _, o in group], seed,
                          scaled_terms)
        return
    for t, offset, scale in zip(tensors, offsets, scales):
        combination = torch.zeros(t.numel(), dtype=torch.float32, device=t.device)
        for stream, coeff in terms:
            coeff32 = float(np.float32(coeff) * np.float32(scale))
            z = philox_normal_torch(t.numel(), seed, stream, offset, device=t.device)
            combination += coeff32 * z
        with torch.no_grad():
            t.copy_((t.float() + combination.view_as(t)).to(t.dtype) if t.dtype != torch.float64
                    else t + combination.view_as(t).double())


def normal_combination_into(
    out: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
    offsets: Sequence[int],
    seed: int,
    terms: Sequence[tuple[int, float]],
    minus: Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
) -> None:
    """Out of place, for every tensor t: out[t] = sources[t] + d and, if given, minus[t] = sources[t] − d, with
    d = Σ_k coeff_k · z(seed, stream_k, offsets[t] + i) formed in fp32 exactly as in add_normal_combination_.

    One pass writes both points θ ± d of a central difference from the same regenerated z; `sources` is only read,
    so the unperturbed values stay bit-exact."""
    for name, group in (("sources", sources), ("offsets", offsets)) + ((("minus", minus),) if minus is not None
                                                                      else ()):
        if len(group) != len(out):
            raise ValueError(f"{name} must have one entry per output tensor ({len(out)}), got {len(group)}")
    _check_sweep_targets(out, "out")
    _check_sweep_targets(sources, "sources")
    if minus is not None:
        _check_sweep_targets(minus, "minus")
    targets = list(out) + list(sources) + (list(minus) if minus is not None else [])
    offsets = _check_offsets(offsets, out)
    for i, (o, s) in enumerate(zip(out, sources)):
        others = [s] + ([minus[i]] if minus is not None else [])
        if any(x.shape != o.shape or x.dtype != o.dtype for x in others):
            raise ValueError(f"out[{i}], sources[{i}] (and minus[{i}]) must share shape and dtype, got "
                             f"{[(tuple(x.shape), x.dtype) for x in [o] + others]}")
    seed = check_seed("seed", seed)
    terms32 = _terms32(terms)
    resolved = _resolve(targets, backend)
    if resolved in ("triton", "cuda"):
        device_sweep(resolved, list(out), list(sources), None if minus is None else list(minus), offsets, seed,
                     terms32, [1.0] * len(out))
        return
    if resolved == "cpu":
        keep = [i for i, o in enumerate(out) if o.numel() > 0]
        SWEEP_CPU("cpu", [out[i] for i in keep], [out[i].numel() for i in keep], [offsets[i] for i in keep], seed,
                  terms32, [sources[i] for i in keep], [minus[i] for i in keep] if minus else None)
        return
    for i, (o, s, offset) in enumerate(zip(out, sources, offsets)):
        d = torch.zeros(o.numel(), dtype=torch.float32, device=o.device)
        for stream, coeff in terms32:
            d += coeff * philox_normal_torch(o.numel(), seed, stream, offset, device=o.device)
        d = d.view_as(o)
        wide = torch.float64 if o.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            o.copy_((s.to(wide) + d.to(wide)).to(o.dtype))
            if minus is not None:
                minus[i].copy_((s.to(wide) - d.to(wide)).to(o.dtype))


def rule_sweep_(
    out: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
    offsets: Sequence[int],
    seed: int,
    terms: Sequence[tuple[int, float]],
    specs: Sequence[rule_sweep.RuleSpec],
    backend: str | None = None,
) -> None:
    """Out of place, for every tensor t: out[t] = RN(sources[t] + Δ_t), Δ_t the update rule specs[t] applied
    elementwise to g = Σ_k coeff_k · z(seed, stream_k, offsets[t] + i), formed in fp32 exactly as in
    add_normal_combination_ and never materialized (kernels/rule_sweep.py: linear, sign, Adam with its fp32 moments
    read and written in the same pass, decoupled weight decay). out may be sources. Every spec names one rule;
    all-linear without weight decay is normal_combination_into (its element loop is vectorized)."""
    for name, group in (("sources", sources), ("offsets", offsets)):
        if len(group) != len(out):
            raise ValueError(f"{name} must have one entry per output tensor ({len(out)}), got {len(group)}")
    _check_sweep_targets(out, "out")
    _check_sweep_targets(sources, "sources")
    for i, (o, s) in enumerate(zip(out, sources)):
        if s.shape != o.shape or s.dtype != o.dtype:
            raise ValueError(f"out[{i}] and sources[{i}] must share shape and dtype, got {tuple(o.shape)} {o.dtype} "
                             f"and {tuple(s.shape)} {s.dtype}")
    specs = rule_sweep.check_specs(specs, out)
    offsets, seed, terms32 = _check_offsets(offsets, out), check_seed("seed", seed), _terms32(terms)
    targets = list(out) + list(sources) + [s for spec in specs for s in spec.state]
    devices = {t.device for t in targets} or {torch.device("cpu")}
    if len(devices) != 1:
        raise ValueError(f"out, sources and state tensors must all be on one device, got {sorted(map(str, devices))}")
    resolved = choose_backend(rule_sweep.SWEEP_CPU.name, rule_sweep.IMPLEMENTED, backend, devices.pop())
    args = (list(out), list(sources), offsets, seed, terms32, specs)
    if all(spec.rule == "linear" and spec.decay is None for spec in specs):
        normal_combination_into(out, sources, offsets, seed, terms32, None, resolved)
    elif resolved in ("triton", "cuda"):
        block = CUDA_BLOCK if resolved == "cuda" else TRITON_BLOCK
        rule_sweep.device_rule_sweep(resolved, *args, block, lambda rows, device: _geometry(rows, block, device)[1])
    elif resolved == "cpu":
        rule_sweep.sweep_cpu(*args)
    else:
        rule_sweep.sweep_torch(*args)


# ---- GPU sweeps (cuda, triton): one launch per dtype over device tables -----------------------------------------
_GEOMETRY_CACHE: OrderedDict = OrderedDict()
_GEOMETRY_CACHE_SIZE = 32


def _geometry(rows: list[tuple[int, int, int, int, int]], block: int, device: torch.device):
    """Device tables for rows (out, src, minus addresses, numel, offset): the tensor table [n, 5] and the tile
    table [n_tiles, 2] = (row, first element). A tile covers `block` stream positions starting on a Philox block
    (4 elements), so a tensor's first tile may start up to 3 elements before it. Cached: a pure function of its key."""
    key = (str(device), block, tuple(rows))
    if key in _GEOMETRY_CACHE:
        _GEOMETRY_CACHE.move_to_end(key)
        return _GEOMETRY_CACHE[key]
    tiles = []
    for r, (_, _, _, numel, offset) in enumerate(rows):
        first = (offset & ~3) - offset
        starts = np.arange(first, numel, block, dtype=np.int64)
        tiles.append(np.stack([np.full_like(starts, r), starts], axis=1))
    tile_array = np.concatenate(tiles) if tiles else np.zeros((0, 2), dtype=np.int64)
    tables = (torch.tensor(rows, dtype=torch.int64).reshape(-1, 5).to(device),
              torch.from_numpy(np.ascontiguousarray(tile_array)).to(device))
    _GEOMETRY_CACHE[key] = tables
    if len(_GEOMETRY_CACHE) > _GEOMETRY_CACHE_SIZE:
        _GEOMETRY_CACHE.popitem(last=False)
    return tables


def device_sweep(backend: str, out: list, sources: list, minus: list | None, offsets: list[int], seed: int,
                 terms32: list[tuple[int, float]], scales32: list[float], block: int | None = None) -> None:
    """out[t] = sources[t] + d_t (and minus[t] = sources[t] − d_t) with d_t = Σ_k fl(coeff_k·scale_t)·z(...), one
    launch per dtype group on the `backend` ("cuda" or "triton"). Arguments are checked by the callers; `block`
    (Triton only, a power of two ≥ 16) changes the tiling, never the values."""
    if backend == "cuda":
        block = CUDA_BLOCK
    elif block is None:
        block = TRITON_BLOCK
    elif block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    words = native.philox_key_words(seed, [stream for stream, _ in terms32])
    for dtype, keep in native.dtype_groups(out):
        device = out[keep[0]].device
        rows = [(native.address(out[i]), native.address(sources[i]), native.address(minus[i] if minus else None),
                 out[i].numel(), offsets[i]) for i in keep]
        table, tiles = _geometry(rows, block, device)
        words_t = torch.tensor(words, dtype=torch.int64).to(device)
        floats_t = torch.tensor([c for _, c in terms32] + [scales32[i] for i in keep], dtype=torch.float32).to(device)
        if backend == "cuda":
            SWEEP_CUDA("cuda", table, tiles, tiles.shape[0], words_t, floats_t, len(terms32), dtype,
                       minus is not None)
        else:
            from .kernels.triton.philox_sweep import philox_sweep_triton

            philox_sweep_triton(table, tiles, words_t, floats_t, len(terms32), str(dtype).removeprefix("torch."),
                                minus is not None, block)
