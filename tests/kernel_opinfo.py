"""The kernel ops as an OpInfo-style table (issue 16), read by tests/test_kernel_matrix.py: one row per public kernel
op, with the function to call (taking `backend=`), its slow twin from zokernels/reference/, a sample-inputs
generator, the dtypes and backends it implements, and how its result is compared with the twin.

Comparisons (no constant fitted to a machine):
- "bitwise": the result equals the twin evaluated in the same dtype, bit for bit (Philox sweeps: every backend forms
  the same fp32 combination and rounds once; one-channel linear: one product, rounded once everywhere).
- "rounding": float64 results are held to a derived bound `float64_bound(sample)` (ulps times the magnitude of what
  the op sums, Higham's γ_n); float32 results to `float32_factor` × the error of the plain float32 evaluation
  (`naive`, default: the twin run in float32) against the float64 twin, both measured on the same inputs, or one
  float32 rounding of the output (u·max|twin|) where the plain evaluation happens to be exact, whichever is larger.
  Factor 1 where the kernel exists to beat the plain difference (docs/engine.md: exact delta forms), 2 where it
  evaluates the same sum in another order (docs/engine.md: paths another kernel instance rounds). The delta forms
  (first layer, BN delta) beat the plain difference by orders of magnitude at CGE-sized steps, so that comparison
  alone would let a 1e-4 relative error pass: they also keep the per-backend tests' stated ceiling, 1e-5 (~170
  float32 ulps; about 2 are seen) of the largest term the rule adds, |γ|·|δ|/σ (`ceiling_scale`), or of the twin's
  largest value if that is larger. Not of the twin alone: where BN makes the change vanish (two values per channel
  in train mode) the rule still adds terms of size |γ|·|δ|/σ that cancel.

Samples are drawn on the CPU from a torch.Generator the matrix seeds from ZOKERNELS_TEST_SEED; the matrix moves the
tensors to kernel_device(backend). A sample with `error` set must be refused with that error on every backend.
To add a row: write a sample generator (fixed awkward shapes with fresh random values, plus a random shape), pick
the twin and the comparison, append an OpInfo to OPS with the kernel function(s) it covers in `covers`.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from zokernels import philox
from zokernels.experimental import masked_sgd
from zokernels.kernels.dispatch import choose_backend
from zokernels.kernels.first_layer import BatchNormSpec, coords_from_flat, first_layer_delta
from zokernels.kernels.mixing import one_channel_conv2d, one_channel_linear
from zokernels.kernels.rule_sweep import RuleSpec
from zokernels.philox import rule_sweep_
from zokernels.reference.engine_ref import batchnorm_delta_ref, batchnorm_replicas_ref, residual_relu_delta_ref
from zokernels.reference.kernels_ref import (first_layer_delta_ref, masked_gradients_ref, masked_sgd_ref,
                                             one_channel_conv2d_ref, one_channel_linear_ref, rule_sweep_ref,
                                             seed_delta_ref)
from zokernels.reference.philox_ref import philox_normal_ref, philox_uint32_ref

try:  # the fused CPU BN kernels' public home is kernels/batchnorm.py; before that move, engine/fused.py held them
    from zokernels.kernels import batchnorm as BN_MODULE  # type: ignore[attr-defined]
    _BN_MOVED = True
except ImportError:
    from zokernels.engine import fused as BN_MODULE
    _BN_MOVED = False

F64, F32 = torch.float64, torch.float32
U64, U32 = 2.0 ** -53, 2.0 ** -24
ALL_BACKENDS = ("torch", "cpu", "triton", "cuda")


@dataclass
class Sample:
    args: tuple
    kwargs: dict = field(default_factory=dict)
    desc: str = ""
    error: tuple[type, str] | None = None  # (exception type, message regex) every backend must raise


@dataclass(frozen=True)
class OpInfo:
    name: str
    call: Callable[[Sample, str], Any]            # runs the kernel on a sample already on the kernel's device
    reference: Callable[[Sample], Any]            # the twin on a CPU sample
    samples: Callable[[torch.dtype, torch.Generator], list[Sample]]
    dtypes: tuple
    backends: tuple[str, ...]
    covers: tuple[Callable, ...]                  # the public kernel functions this row checks
    comparison: str = "rounding"                  # or "bitwise"
    float64_bound: Callable[[Sample], Any] | None = None
    float32_factor: float = 1.0
    float32_ceiling: float | None = None          # and at most this fraction of ceiling_scale (delta forms, above)
    ceiling_scale: Callable[[Sample], float] | None = None
    naive: Callable[[Sample], Any] | None = None  # the plain float32 evaluation(s) (default: reference)
    inputs_kept: Callable[[Sample], list] | None = None  # tensors the op must leave unchanged


# ---- moving samples -------------------------------------------------------------------------------------------
def map_tensors(value, fn):
    """value with every tensor t (inside tuples, lists, dicts, BatchNormSpec, namespaces) replaced by fn(t)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, BatchNormSpec):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def sample_map(sample: Sample, fn) -> Sample:
    return dataclasses.replace(sample, args=map_tensors(sample.args, fn), kwargs=map_tensors(sample.kwargs, fn))


def to_device(sample: Sample, device: torch.device) -> Sample:
    return sample_map(sample, lambda t: t.to(device))


def to_float64(sample: Sample) -> Sample:
    """The same numbers in float64 (exact: every float32 value is a float64 value); layouts kept."""
    return sample_map(sample, lambda t: t.double() if t.is_floating_point() else t)


# ---- the fused first layer ------------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _random_bn(kind, c_out, dtype, g):
    if kind is None:
        return None
    weight = torch.rand(c_out, generator=g, dtype=F64).to(dtype) + 0.5
    bias = torch.randn(c_out, generator=g, dtype=F64).to(dtype)
    if kind == "train":
        return BatchNormSpec(True, 1e-5, weight, bias)
    mean, var = torch.randn(c_out, generator=g, dtype=F64), torch.rand(c_out, generator=g, dtype=F64) + 0.1
    return BatchNormSpec(False, 1e-5, weight, bias, mean.to(dtype), var.to(dtype))


def _steps(k, dtype, g):
    """float64: steps up to ~1 (any size must be exact to rounding); float32: CGE-sized steps (~1e-3), where the
    fused rule exists to avoid the plain difference's cancellation (the numerics rule of docs/engine.md)."""
    scale = 0.3 if dtype == F64 else 1e-3
    return (torch.randn(k, generator=g, dtype=F64) * scale).to(dtype)


FIRST_LAYER_CONV = [  # batch, c_in, (H, W), c_out, kernel, stride, padding, dilation, K
    (3, 2, (7, 5), 4, (3, 3), 1, 1, 1, 5),
    (2, 3, (9, 7), 3, (3, 3), 2, 1, 1, 1),
    (1, 1, (1, 1), 1, (1, 1), 1, 0, 1, 1),  # numel 1 (BN train refuses it)
    (5, 2, (11, 13), 2, (3, 2), 2, 0, 1, 3),
    (2, 2, (8, 9), 3, (3, 3), 1, 2, 2, 4),  # dilation 2
]


def _random_conv_geometry(g):
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    kernel, stride, dilation = (r(1, 3), r(1, 3)), r(1, 2), r(1, 2)
    padding = r(0, 2)
    hw = tuple(max(r(1, 9), (k - 1) * dilation + 1 - 2 * padding) for k in kernel)
    return (r(2, 4), r(1, 3), hw, r(1, 4), kernel, stride, padding, dilation, r(1, 5))


def first_layer_conv_samples(dtype, g) -> list[Sample]:
    out = []
    for case in FIRST_LAYER_CONV + [_random_conv_geometry(g)]:
        batch, c_in, hw, c_out, kernel, stride, padding, dilation, k = case
        x = torch.randn(batch, c_in, *hw, generator=g, dtype=F64).to(dtype)
        w = torch.randn(c_out, c_in, *kernel, generator=g, dtype=F64).to(dtype)
        y = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
        coords = torch.stack([torch.randint(0, n, (k,), generator=g) for n in (c_out, c_in, *kernel)], dim=1)
        steps = _steps(k, dtype, g)
        for bn_kind in (None, "train", "eval"):
            bn = _random_bn(bn_kind, c_out, dtype, g)
            error = None
            if bn_kind == "train" and y[:, 0].numel() == 1:
                error = (ValueError, "more than one value per channel")
            for relu in (False, True):
                out.append(Sample((x, y, coords, steps), dict(stride=stride, padding=padding, dilation=dilation,
                                                              bn=bn, relu=relu),
                                  f"conv case {case} bn={bn_kind} relu={relu}", error))
    return out


def first_layer_linear_samples(dtype, g) -> list[Sample]:
    out = []
    for batch, n_in, n_out, k in [(7, 5, 3, 4), (2, 1, 1, 1), (int(torch.randint(2, 9, (1,), generator=g)), 4, 6, 3)]:
        x = torch.randn(batch, n_in, generator=g, dtype=F64).to(dtype)
        weight = torch.randn(n_out, n_in, generator=g, dtype=F64).to(dtype)
        y = x @ weight.T
        coords = coords_from_flat(torch.randperm(weight.numel(), generator=g)[:k], weight.shape)
        steps = _steps(coords.shape[0], dtype, g)
        for bn_kind in (None, "train", "eval"):
            for relu in (False, True):
                out.append(Sample((x, y, coords, steps), dict(bn=_random_bn(bn_kind, n_out, dtype, g), relu=relu),
                                  f"linear B={batch} in={n_in} out={n_out} K={k} bn={bn_kind} relu={relu}"))
    return out


def call_first_layer(s: Sample, backend: str):
    kw = s.kwargs
    return first_layer_delta(*s.args, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1), kw["bn"],
                             kw["relu"], backend=backend)


def first_layer_reference(s: Sample):
    kw = s.kwargs
    return first_layer_delta_ref(*s.args, _pair(kw.get("stride", 1)), _pair(kw.get("padding", 0)),
                                 _pair(kw.get("dilation", 1)), kw["bn"], kw["relu"])


def first_layer_float64_bound(s: Sample) -> float:
    """4·(n + 2)·u·S (the sum-of-n-terms bound γ_n per side, two sides) with S the magnitude of the normalized
    values. M = max|y| + max|δ| bounds every pre-BN value. BN eval: S = max(|γ|/σ)·(M + max|mean|) + max|β|, n = 4.
    BN train: the batch statistics are sums of N = B·H'·W' terms; an error ε in the variance moves x̂ = (v − m)/σ by
    ε·|v − m|/(2σ³), so S = max over channels and both sides of |γ|·(M/σ)·(1 + M²/σ²) + |β|, n = N + 4. No BN:
    the seed product, one add and the subtraction: S = M, n = 2."""
    x, y, coords, steps = s.args
    bn = s.kwargs["bn"]
    if x.dim() == 2:
        x, y = x[:, :, None, None], y[:, :, None, None]
    big = y.abs().max().item() + steps.abs().max().item() * x.abs().max().item()
    if bn is None:
        return 4 * 4 * U64 * big
    gamma = bn.weight.abs() if bn.weight is not None else torch.ones(y.shape[1], dtype=y.dtype)
    beta = bn.bias.abs().max().item() if bn.bias is not None else 0.0
    if not bn.train:
        sigma = torch.sqrt(bn.var + bn.eps)
        return 4 * 6 * U64 * ((gamma / sigma).max().item() * (big + bn.mean.abs().max().item()) + beta)
    geometry = tuple(_pair(s.kwargs.get(n, d)) for n, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
    sigmas = [torch.sqrt(y.var(dim=(0, 2, 3), unbiased=False) + bn.eps)]
    for coord, step in zip(coords.tolist(), steps.tolist()):
        moved = y[:, coord[0]] + seed_delta_ref(x, coord, step, tuple(y.shape[2:]), *geometry)
        sigma = sigmas[0].clone()
        sigma[coord[0]] = torch.sqrt(moved.var(unbiased=False) + bn.eps)
        sigmas.append(sigma)
    sigma = torch.stack(sigmas).min(dim=0).values
    scale = (gamma * (big / sigma) * (1 + (big / sigma) ** 2)).max().item() + beta
    n = y[:, 0].numel() + 4
    return 4 * (n + 2) * U64 * scale


def first_layer_term_scale(s: Sample) -> float:
    """|γ|·max|δ|/σ over the channels: the size of the terms the fused rule adds (σ: the base batch's in train mode,
    the running one in eval mode, 1 without BN)."""
    x, y, _, steps = s.args
    bn = s.kwargs["bn"]
    delta = steps.abs().max().item() * x.abs().max().item()
    if bn is None:
        return delta
    dims = tuple(d for d in range(y.dim()) if d != 1)
    variance = y.double().var(dim=dims, unbiased=False) if bn.train else bn.var.double()
    gamma = bn.weight.double().abs() if bn.weight is not None else torch.ones_like(variance)
    return (gamma * delta / torch.sqrt(variance + bn.eps)).max().item()


# ---- one-channel mixing ---------------------------------------------------------------------------------------
MIXING_CONV = [  # K, batch, (H, W), C1, C2, kernel, stride, padding, dilation
    (1, 1, (5, 5), 2, 3, (3, 3), 1, 1, 1),
    (3, 2, (7, 5), 4, 6, (3, 3), 2, 0, 1),
    (4, 3, (9, 11), 3, 5, (3, 3), 2, 1, 1),
    (2, 2, (6, 7), 3, 4, (1, 1), 1, 0, 1),
    (2, 1, (8, 9), 2, 3, (3, 2), 1, 2, 2),
    (1, 1, (1, 1), 1, 1, (1, 1), 1, 0, 1),  # numel 1
]


def mixing_conv_samples(dtype, g) -> list[Sample]:
    out = []
    random_case = _random_conv_geometry(g)
    batch, c1, hw, c2, kernel, stride, padding, dilation, k = random_case
    for case in MIXING_CONV + [(k, batch, hw, c1, c2, kernel, stride, padding, dilation)]:
        k, batch, hw, c1, c2, kernel, stride, padding, dilation = case
        delta = torch.randn(k, batch, *hw, generator=g, dtype=F64).to(dtype)
        weight = torch.randn(c2, c1, *kernel, generator=g, dtype=F64).to(dtype)
        channels = torch.randint(0, c1, (k,), generator=g)
        for channels_last_out in (False, True):
            out.append(Sample((delta, channels, weight), dict(stride=stride, padding=padding, dilation=dilation,
                                                              channels_last=channels_last_out),
                              f"conv case {case} channels_last output={channels_last_out}"))
    # a channels-last weight (what channels-last models hold), read through its strides
    delta, weight = torch.randn(3, 2, 9, 8, generator=g, dtype=F64).to(dtype), torch.randn(5, 4, 3, 3, generator=g,
                                                                                           dtype=F64).to(dtype)
    out.append(Sample((delta, torch.tensor([3, 0, 3]), weight.contiguous(memory_format=torch.channels_last)),
                      dict(stride=2, padding=1, dilation=1, channels_last=False), "channels-last weight"))
    return out


def call_mixing_conv(s: Sample, backend: str):
    out = one_channel_conv2d(*s.args, **s.kwargs, backend=backend)
    layout = torch.channels_last if s.kwargs["channels_last"] else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout), f"output not in {layout}: strides {out.stride()}"
    return out


def _mixing_geometry(s: Sample):
    return tuple(_pair(s.kwargs[n]) for n in ("stride", "padding", "dilation"))


def mixing_conv_reference(s: Sample):
    return one_channel_conv2d_ref(*s.args, *_mixing_geometry(s))


def mixing_conv_float64_bound(s: Sample) -> torch.Tensor:
    """Per output element 2·(n + 2)·u·Σ|terms| with n = kh·kw taps summed (γ_n per side, kernel and twin): Σ|terms|
    is the twin's conv of |δ| with |W|."""
    delta, channels, weight = s.args
    taps = weight.shape[2] * weight.shape[3]
    return 2 * (taps + 2) * U64 * one_channel_conv2d_ref(delta.abs(), channels, weight.abs(), *_mixing_geometry(s))


def mixing_conv_naive(s: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """Two plain float32 evaluations, each as good as the other: torch's conv (the twin in float32; oneDNN picks its
    algorithm per CPU and shape) and a direct loop, the kh·kw tap products rounded one by one and added in tap
    order. Measured: either can have ~2x the other's error on some shapes, so the kernel is held to the larger."""
    delta, channels, weight = s.args
    (sh, sw), (ph, pw), (dh, dw) = _mixing_geometry(s)
    kh, kw = weight.shape[2:]
    k, batch, h, w = delta.shape
    h_out, w_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(delta, (pw, pw, ph, ph))
    slices = weight.index_select(1, channels).transpose(0, 1)  # [K, C2, kh, kw]
    out = torch.zeros(k, batch, weight.shape[0], h_out, w_out, dtype=delta.dtype)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh: i * dh + sh * (h_out - 1) + 1: sh, j * dw: j * dw + sw * (w_out - 1) + 1: sw]
            out = out + window[:, :, None] * slices[:, None, :, i, j, None, None]
    return mixing_conv_reference(s), out.reshape(k * batch, weight.shape[0], h_out, w_out)


def mixing_linear_samples(dtype, g) -> list[Sample]:
    shapes = [(1, 1, 1, 1), (3, 5, 4, 7), (2, 65, 3, 67),
              tuple(int(v) for v in torch.randint(1, 9, (4,), generator=g))]
    out = []
    for k, batch, n_in, n_out in shapes:
        delta = torch.randn(k, batch, generator=g, dtype=F64).to(dtype)
        weight = torch.randn(n_out, n_in, generator=g, dtype=F64).to(dtype)
        out.append(Sample((delta, torch.randint(0, n_in, (k,), generator=g), weight),
                          desc=f"K={k} B={batch} in={n_in} out={n_out}"))
    return out


# ---- Philox sweeps (zokernels.philox) -------------------------------------------------------------------------
def _philox_terms(g):
    """A fresh 64-bit seed and (stream, coefficient) terms: a fresh large stream, one above 2^32, a fresh small one."""
    draw = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731
    seed = draw(2**62) * 4 + draw(4)
    terms = [(draw(2**62), 0.37), (2**40 + 1, -1.5), (draw(2**20), 1e-3)]
    return seed, terms


def philox_sweep_samples(dtype, g) -> list[Sample]:
    """Sizes around the Triton tile (2048) and the CUDA block (1024), a numel-1 tensor, and one random size; offsets
    are the flat layout shifted by 3 (every offset mod 4 across the tensors), by a shift whose tiles cross the 2^32
    carry of the Philox block counter, and by a fresh random shift."""
    out = []
    for sizes, shift in [([1, 2047, 2048, 2049, 97], 3), ([1023, 1025, 5], 2**34 - 1500),
                         ([int(torch.randint(1, 3000, (1,), generator=g))], int(torch.randint(0, 2**40, (1,),
                                                                                              generator=g)))]:
        tensors = [(torch.randn(n, generator=g, dtype=F64) * 3).to(dtype) for n in sizes]
        offsets = [o + shift for o in philox.stream_offsets(tensors)]
        seed, terms = _philox_terms(g)
        scales = [float(v) for v in (torch.randint(-4, 5, (len(sizes),), generator=g) * 0.5)]
        out.append(Sample((tensors, offsets, seed, terms), dict(scales=scales),
                          f"sizes {sizes} offsets {offsets} seed {seed} terms {terms} scales {scales}"))
    return out


def _sweep_reference(x: torch.Tensor, offset: int, seed: int, terms, scale: float = 1.0):
    """(x + d, x − d) with d = Σ fl32(fl32(coeff)·fl32(scale))·z formed in fp32 in term order from the numpy twin,
    rounded once to x's dtype (float64 adds in float64)."""
    d = np.zeros(x.numel(), dtype=np.float32)
    for stream, coeff in terms:
        d = d + (np.float32(coeff) * np.float32(scale)) * philox_normal_ref(x.numel(), seed, stream, offset)
    d = torch.from_numpy(d).view_as(x)
    wide = F64 if x.dtype == F64 else F32
    return (x.to(wide) + d.to(wide)).to(x.dtype), (x.to(wide) - d.to(wide)).to(x.dtype)


def call_add_combination(s: Sample, backend: str):
    tensors, offsets, seed, terms = s.args
    tensors = [t.clone() for t in tensors]
    philox.add_normal_combination_(tensors, offsets, seed, terms, s.kwargs["scales"], backend=backend)
    return tensors


def add_combination_reference(s: Sample):
    tensors, offsets, seed, terms = s.args
    return [_sweep_reference(t, o, seed, terms, c)[0] for t, o, c in zip(tensors, offsets, s.kwargs["scales"])]


def call_combination_into(s: Sample, backend: str):
    sources, offsets, seed, terms = s.args
    plus, minus = [torch.empty_like(t) for t in sources], [torch.empty_like(t) for t in sources]
    philox.normal_combination_into(plus, sources, offsets, seed, terms, minus, backend=backend)
    return plus + minus


def combination_into_reference(s: Sample):
    sources, offsets, seed, terms = s.args
    pairs = [_sweep_reference(t, o, seed, terms) for t, o in zip(sources, offsets)]
    return [p for p, _ in pairs] + [m for _, m in pairs]


# ---- the fused rule sweep (zokernels.philox.rule_sweep_, kernels/rule_sweep.py) ------------------------------
def _rule_scalars(rule: str, g) -> tuple[float, ...]:
    """Fresh scalars of a rule (HYPER order): lr ~ 0.01–0.1; Adam with fresh β1, β2 and a step count k ≤ 5."""
    r = lambda lo, hi: lo + (hi - lo) * float(torch.rand(1, generator=g))  # noqa: E731
    lr = r(0.01, 0.1)
    if rule == "sign":
        return (-lr,)
    if rule == "adam":
        beta1, beta2, k = r(0.5, 0.99), r(0.9, 0.9999), int(torch.randint(1, 6, (1,), generator=g))
        return (beta1, 1 - beta1, beta2, 1 - beta2, (1 - beta2 ** k) ** 0.5, 1e-8, -lr / (1 - beta1 ** k))
    if rule == "momentum":  # a tensor's first step (m = g) or a later one, drawn
        return (r(0.5, 0.99), float(bool(torch.rand(1, generator=g) < 0.3)), -lr)
    if rule == "sign_momentum":
        beta = r(0.5, 0.99)
        return (beta, 1 - beta, -lr)
    return ()


def _rule_state(rule: str, n: int, g) -> tuple[torch.Tensor, ...]:
    """Fresh fp32 state of a rule for a tensor of n elements (Adam: m and a non-negative v)."""
    if rule == "adam":
        return torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    if rule in ("momentum", "sign_momentum"):
        return (torch.randn(n, generator=g) * 0.1,)
    return ()


def rule_sweep_samples(dtype, g) -> list[Sample]:
    """Every rule on the sweep geometries (sizes around the tiles, offsets mod 4, the 2^32 block carry), each tensor
    with or without weight decay (fresh); Adam and the momentum rules with fresh state. Also no terms at all (g = 0:
    sign(0) = 0, Adam decays its moments) and linear without weight decay (the perturbation sweep it delegates to)."""
    out = []
    for rule in ("linear", "sign", "adam", "momentum", "sign_momentum"):
        for sizes, shift, n_terms in [([1, 2047, 2048, 2049, 97], 3, 3), ([1023, 1025, 5], 2**34 - 1500, 1),
                                      ([int(torch.randint(1, 3000, (1,), generator=g))],
                                       int(torch.randint(0, 2**40, (1,), generator=g)), 2), ([7, 300], 1, 0)]:
            sources = [(torch.randn(n, generator=g, dtype=F64) * 3).to(dtype) for n in sizes]
            offsets = [o + shift for o in philox.stream_offsets(sources)]
            seed, terms = _philox_terms(g)
            terms = terms[:n_terms]
            decays = [None if bool(torch.rand(1, generator=g) < 0.4) else -float(torch.rand(1, generator=g)) * 0.01
                      for _ in sizes]
            state = [_rule_state(rule, n, g) for n in sizes]
            kwargs = dict(rule=rule, hyper=[_rule_scalars(rule, g) for _ in sizes], decay=decays, state=state)
            out.append(Sample((sources, offsets, seed, terms), kwargs,
                              f"{rule}: sizes {sizes} offsets {offsets} seed {seed} terms {terms} decay {decays}"))
        if rule == "linear":
            sources = [(torch.randn(n, generator=g, dtype=F64) * 3).to(dtype) for n in (5, 2049)]
            seed, terms = _philox_terms(g)
            out.append(Sample((sources, [1, 6], seed, terms), dict(rule=rule, hyper=[(), ()], decay=[None, None],
                                                                 state=[(), ()]), "linear without weight decay"))
    return out


def call_rule_sweep(s: Sample, backend: str):
    sources, offsets, seed, terms = s.args
    kw = s.kwargs
    state = [tuple(t.clone() for t in st) for st in kw["state"]]
    specs = [RuleSpec(kw["rule"], h, d, st) for h, d, st in zip(kw["hyper"], kw["decay"], state)]
    out = [torch.empty_like(t) for t in sources]
    rule_sweep_(out, sources, offsets, seed, terms, specs, backend=backend)
    return out + [t for st in state for t in st]


def rule_sweep_reference(s: Sample):
    sources, offsets, seed, terms = s.args
    kw = s.kwargs
    results = [rule_sweep_ref(x, o, seed, terms, kw["rule"], h, d, st)
               for x, o, h, d, st in zip(sources, offsets, kw["hyper"], kw["decay"], kw["state"])]
    return [x for x, _ in results] + [t for _, st in results for t in st]


PHILOX_DRAWS = [(20_003, 99, 3, 5), (20_003, 2**64 - 1, 2**64 - 1, 2**40 + 1),
                (20_003, 7, 0, 2**34 - 301)]  # the last crosses the 2^32 carry of the block counter's low word


def philox_draw_samples(dtype, g) -> list[Sample]:
    fresh = [(int(torch.randint(0, 5000, (1,), generator=g)), int(torch.randint(0, 2**62, (1,), generator=g)),
              int(torch.randint(0, 2**62, (1,), generator=g)), int(torch.randint(0, 2**40, (1,), generator=g)) + o)
             for o in range(4)]  # every offset mod 4
    return [Sample(case, desc=f"n, seed, stream, offset = {case}") for case in PHILOX_DRAWS + fresh]


# ---- the fused CPU BN kernels (float32, channels-last rows) ----------------------------------------------------
BN_SHAPES = [(1, 4, 16, 5, 7), (3, 2, 5, 3, 3), (2, 3, 64, 4, 4), (2, 5, 32, 1, 3)]


def _replicas_channels_last(k, b, c, h, w, g):
    """[K, B, C, H, W] float32, each replica contiguous channels-last rows, as the engine keeps them."""
    x = torch.randn(k * b, c, h, w, generator=g) * 2.0 + 3.0
    return x.contiguous(memory_format=torch.channels_last).view(k, b, c, h, w)


def _affine(c, affine, g):
    if not affine:
        return None, None
    return torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)


def bn_replicas_samples(dtype, g) -> list[Sample]:
    out = []
    for shape in BN_SHAPES + [(1, 2, 1, 1, 1)]:
        for affine in (True, False):
            x = _replicas_channels_last(*shape, g)
            weight, bias = _affine(shape[2], affine, g)
            center = x[0].mean(dim=(0, 2, 3)) + 0.1  # near, not at, each replica's mean
            for relu in (False, True):
                out.append(Sample((x, weight, bias, center), dict(eps=1e-5, relu=relu),
                                  f"shape {shape} affine={affine} relu={relu}"))
    return out


def _bn_kernel(name: str, device: torch.device):
    """BN_MODULE.<name>, after dispatch agreed that its cpu kernel runs here (its refusal names the reason)."""
    if _BN_MOVED:
        choose_backend(name, BN_MODULE.IMPLEMENTED, "cpu", device)
    return getattr(BN_MODULE, name)


def _declined(out, what: str):
    assert out is not None, f"the fused kernel declined {what}"
    return out


def call_bn_replicas(s: Sample, backend: str):
    x, weight, bias, center = s.args
    eps, relu = s.kwargs["eps"], s.kwargs["relu"]
    kernel = _bn_kernel("batchnorm_replicas", x.device)
    if _BN_MOVED:
        return kernel(x, center, weight, bias, eps, relu)
    return _declined(kernel(x, types.SimpleNamespace(weight=weight, bias=bias, eps=eps), center, relu),
                     "float32 channels-last replicas")


def bn_replicas_reference(s: Sample):
    x, weight, bias, _ = s.args
    return batchnorm_replicas_ref(x, weight, bias, s.kwargs["eps"], s.kwargs["relu"])


def bn_replicas_naive(s: Sample):
    """The textbook formula evaluated op by op in float32 per replica: batch mean and biased variance, then
    γ·(x − mean)/sqrt(var + eps) + β (and ReLU)."""
    x, weight, bias, _ = s.args
    dims, view = (0, 2, 3), (1, -1, 1, 1)
    outs = []
    for r in x:
        root = torch.sqrt(r.var(dim=dims, unbiased=False) + s.kwargs["eps"])
        out = (r - r.mean(dim=dims).view(view)) / root.view(view)
        if weight is not None:
            out = out * weight.view(view) + bias.view(view)
        outs.append(out.relu() if s.kwargs["relu"] else out)
    return torch.stack(outs)


def bn_delta_samples(dtype, g) -> list[Sample]:
    out = []
    for k, b, c, h, w in BN_SHAPES:
        for affine in (True, False):
            x = _replicas_channels_last(1, b, c, h, w, g)[0]
            delta = (torch.randn(k * b, c, h, w, generator=g) * 1e-3).contiguous(memory_format=torch.channels_last)
            weight, bias = _affine(c, affine, g)
            base_out = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)  # BN's float32 base output
            for relu in (False, True):
                out.append(Sample((x, delta.view(k, b, c, h, w), weight, bias),
                                  dict(eps=1e-5, base_out=base_out.contiguous(memory_format=torch.channels_last)
                                       if relu else None), f"shape {(k, b, c, h, w)} affine={affine} relu={relu}"))
    return out


def call_bn_delta(s: Sample, backend: str):
    from zokernels.engine.delta import batch_statistics
    x, delta, weight, _ = s.args
    centered, root = batch_statistics(x, s.kwargs["eps"])
    out = _bn_kernel("batchnorm_delta", x.device)(delta, centered, root, weight, s.kwargs["base_out"])
    return _declined(out, "float32 channels-last deltas")


def bn_delta_reference(s: Sample):
    return batchnorm_delta_ref(*s.args, s.kwargs["eps"], s.kwargs["base_out"])


def bn_delta_term_scale(s: Sample) -> float:
    """|γ|·max|δ|/σ over the channels (σ of the base batch): the size of the terms the fused rule adds."""
    x, delta, weight, _ = s.args
    sigma = torch.sqrt(x.double().var(dim=(0, 2, 3), unbiased=False) + s.kwargs["eps"])
    gamma = weight.double().abs() if weight is not None else torch.ones_like(sigma)
    return (gamma * delta.abs().max().item() / sigma).max().item()


def bn_delta_naive(s: Sample):
    """The plain float32 difference BN(x + δ_k) − BN(x), then ReLU(y + change) − ReLU(y) around the base output."""
    x, delta, weight, bias = s.args
    bn = lambda v: F.batch_norm(v, None, None, weight, bias, True, 0.0, s.kwargs["eps"])  # noqa: E731
    base = bn(x)
    change = torch.stack([bn(x + d) - base for d in delta])
    y = s.kwargs["base_out"]
    return change if y is None else torch.relu(y + change) - torch.relu(y)


def residual_samples(dtype, g) -> list[Sample]:
    out = []
    for shape in [(1, 4, 16, 5, 7), (3, 2, 5, 3, 3), (2, 1, 1, 1, 1)]:
        for with_b in (True, False):
            y = _replicas_channels_last(1, *shape[1:], g)[0] - 3.0  # about half the base values negative
            a = _replicas_channels_last(*shape, g) - 3.0
            b = _replicas_channels_last(*shape, g) - 3.0 if with_b else None
            out.append(Sample((a, b, y), desc=f"shape {shape} with_b={with_b}"))
    return out


def call_residual(s: Sample, backend: str):
    return _declined(_bn_kernel("residual_relu_delta", s.args[0].device)(*s.args), "float32 channels-last operands")


def residual_naive(s: Sample):
    a, b, y = s.args
    return torch.relu(y + (a if b is None else a + b)) - torch.relu(y)


# ---- masked SGD (experimental) ---------------------------------------------------------------------------------
MASKED_SHAPES = [(3, 5), (7,), (1,), (2, 3, 3), (masked_sgd.DENSE_BLOCK + 1,), (masked_sgd.DENSE_BLOCK - 1,)]
MASKED_HYPERS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(lr=0.02, momentum=0.5, weight_decay=0.1, nesterov=True),
]
MASKED_STEPS = 3


def _masked_problem(dtype, g):
    params = [torch.randn(shape, generator=g, dtype=F64).to(dtype) for shape in MASKED_SHAPES]
    masks = [torch.rand(shape, generator=g) < 0.5 for shape in MASKED_SHAPES]
    masks[2] = torch.ones(1, dtype=torch.bool)  # a numel-1 parameter, selected
    return params, masks


def masked_sgd_samples(dtype, g) -> list[Sample]:
    out = []
    for hyper in MASKED_HYPERS:
        for restrict in (False, True):
            params, masks = _masked_problem(dtype, g)
            count = int(sum(m.sum() for m in masks))
            values = [torch.randn(count, generator=g, dtype=F64).to(dtype) for _ in range(MASKED_STEPS)]
            out.append(Sample((params, masks, values), dict(hyper=hyper, restrict=restrict),
                              f"{MASKED_STEPS} steps, {hyper}, restrict_to_mask={restrict}"))
    return out


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def call_masked_sgd(s: Sample, backend: str):
    """MaskedSGD (torch.optim.SGD's state around masked_sgd_) over the steps: parameters, last .grad, buffers."""
    params, masks, values = s.args
    params = [p.clone() for p in params]
    index = masked_sgd.gather_mask_indices(params, masks)
    optimizer = masked_sgd.MaskedSGD(params, restrict_to_mask=s.kwargs["restrict"], backend=backend,
                                     **s.kwargs["hyper"])
    for step_values in values:
        optimizer.step(index, step_values)
    return _flat(params + [p.grad for p in params] + (optimizer.buffers or []))


def masked_sgd_reference(s: Sample):
    params, masks, values = s.args
    params, buffers = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    for step, step_values in enumerate(values):
        grads = masked_sgd_ref(params, buffers, masks, step_values, restrict_to_mask=s.kwargs["restrict"],
                               first_step=step == 0, **s.kwargs["hyper"])
    return _flat(params + grads + (buffers if s.kwargs["hyper"].get("momentum", 0) else []))


def masked_sgd_float64_bound(s: Sample) -> float:
    """2 (kernel and twin) × 8 roundings per step (weight decay, momentum, nesterov, update) × the steps × 2 (an
    error in θ or the buffer carries into the next step at most doubled: lr·wd, momentum ≤ 1) × u × the largest
    magnitude any of them sees (the twin's outputs and the step values)."""
    largest = max(masked_sgd_reference(s).abs().max().item(), max(v.abs().max().item() for v in s.args[2]))
    return 2 * 8 * MASKED_STEPS * 2 * U64 * largest


def call_scatter_grad(s: Sample, backend: str):
    """scatter_grad_ onto parameters holding a stale .grad (which must be cleared outside the mask)."""
    params, masks, values = s.args
    params = [p.clone() for p in params]
    params[0].grad = torch.full_like(params[0], 7.0)
    masked_sgd.scatter_grad_(params, masked_sgd.gather_mask_indices(params, masks), values[0], backend=backend)
    return [p.grad for p in params] + params


def scatter_grad_reference(s: Sample):
    params, masks, values = s.args
    return masked_gradients_ref(params, masks, values[0]) + list(params)  # the parameters do not move


# ---- the table --------------------------------------------------------------------------------------------------
FLOATS = (F64, F32)
SWEEP_DTYPES = (F32, torch.float16, torch.bfloat16, F64)

OPS: list[OpInfo] = [
    OpInfo("first_layer_delta[conv]", call_first_layer, first_layer_reference, first_layer_conv_samples, FLOATS,
           ALL_BACKENDS, (first_layer_delta,), float64_bound=first_layer_float64_bound, float32_factor=1,
           float32_ceiling=1e-5, ceiling_scale=first_layer_term_scale),
    OpInfo("first_layer_delta[linear]", call_first_layer, first_layer_reference, first_layer_linear_samples, FLOATS,
           ALL_BACKENDS, (first_layer_delta,), float64_bound=first_layer_float64_bound, float32_factor=1,
           float32_ceiling=1e-5, ceiling_scale=first_layer_term_scale),
    OpInfo("one_channel_conv2d", call_mixing_conv, mixing_conv_reference, mixing_conv_samples, FLOATS, ALL_BACKENDS,
           (one_channel_conv2d,), float64_bound=mixing_conv_float64_bound, float32_factor=2, naive=mixing_conv_naive),
    OpInfo("one_channel_linear", lambda s, backend: one_channel_linear(*s.args, backend=backend),
           lambda s: one_channel_linear_ref(*s.args), mixing_linear_samples, FLOATS, ALL_BACKENDS,
           (one_channel_linear,), comparison="bitwise"),
    OpInfo("philox.add_normal_combination_", call_add_combination, add_combination_reference, philox_sweep_samples,
           SWEEP_DTYPES, ALL_BACKENDS, (philox.add_normal_combination_,), comparison="bitwise"),
    OpInfo("philox.normal_combination_into", call_combination_into, combination_into_reference,
           philox_sweep_samples, SWEEP_DTYPES, ALL_BACKENDS, (philox.normal_combination_into,), comparison="bitwise",
           inputs_kept=lambda s: list(s.args[0])),
    OpInfo("rule_sweep_", call_rule_sweep, rule_sweep_reference, rule_sweep_samples, SWEEP_DTYPES, ALL_BACKENDS,
           (rule_sweep_,), comparison="bitwise", inputs_kept=lambda s: list(s.args[0]) + [
               t for st in s.kwargs["state"] for t in st]),
    # the generators' backends: cpu (_C) and torch; triton and cuda generate only inside the sweeps
    OpInfo("philox.philox_normal", lambda s, backend: philox.philox_normal(*s.args, backend=backend),
           lambda s: torch.from_numpy(philox_normal_ref(*s.args)), philox_draw_samples, (F32,), ("torch", "cpu"),
           (philox.philox_normal,), comparison="bitwise"),
    OpInfo("philox.philox_uint32",
           lambda s, backend: torch.from_numpy(philox.philox_uint32(*s.args, backend=backend).astype(np.int64)),
           lambda s: torch.from_numpy(philox_uint32_ref(*s.args).astype(np.int64)), philox_draw_samples,
           (torch.uint32,), ("torch", "cpu"), (philox.philox_uint32,), comparison="bitwise"),
    OpInfo("masked_sgd_", call_masked_sgd, masked_sgd_reference, masked_sgd_samples, FLOATS, ALL_BACKENDS,
           (masked_sgd.masked_sgd_,), float64_bound=masked_sgd_float64_bound, float32_factor=2),
    OpInfo("scatter_grad_", call_scatter_grad, scatter_grad_reference, masked_sgd_samples, FLOATS, ALL_BACKENDS,
           (masked_sgd.scatter_grad_,), comparison="bitwise"),
    # the fused CPU BN kernels: float32 channels-last rows, cpu backend only (None elsewhere: torch formulas)
    OpInfo("fused.batchnorm_replicas", call_bn_replicas, bn_replicas_reference, bn_replicas_samples, (F32,),
           ("cpu",), (BN_MODULE.batchnorm_replicas,), float32_factor=2, naive=bn_replicas_naive),
    OpInfo("fused.batchnorm_delta", call_bn_delta, bn_delta_reference, bn_delta_samples, (F32,), ("cpu",),
           (BN_MODULE.batchnorm_delta,), float32_factor=1, float32_ceiling=1e-5,
           ceiling_scale=bn_delta_term_scale, naive=bn_delta_naive),
    OpInfo("fused.residual_relu_delta", call_residual, lambda s: residual_relu_delta_ref(*s.args), residual_samples,
           (F32,), ("cpu",), (BN_MODULE.residual_relu_delta,), float32_factor=1, naive=residual_naive),
]

# Public kernel functions the coverage check finds that are not ops with a twin: helpers, and ops checked elsewhere.
NOT_OPS = {
    "normal_sumsq": "a host float (Σ z²), checked against the cpu backend in tests/test_philox_torch.py",
    "device_sweep": "the GPU launcher behind the two sweeps (block edges: tests/test_philox_triton.py)",
    "device_rule_sweep": "the GPU launcher behind philox.rule_sweep_ (its row runs it on triton and cuda)",
    "fused_backend": "the cpu/torch decision of the fused BN kernels (dispatch)",
    "channels_last_rows": "layout test of the fused BN kernels (engine/fused.py)",
    "fused_available": "layout and backend test of the fused BN kernels (engine/fused.py)",
}

