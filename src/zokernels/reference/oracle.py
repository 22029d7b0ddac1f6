"""The float64 oracle for coordinate-wise estimates on arbitrary models (dropout, drop_path, BN in train mode,
tuple / dict / ModelOutput outputs, Hugging Face models).

cge_oracle(model, batch, mask, mu) answers: what is (L(θ + h e_i) − L(θ)) / h for each selected coordinate i,
when L is the model's loss evaluated in float64 arithmetic at exactly the float32 points the float32 run
evaluates, with exactly the random draws the float32 run makes?

- Points: a float64 deep copy of the model holds the float32 values exactly; coordinate i is set to
  fl32(θ_i + μ) (the value the float32 run writes), so h = fl32(θ_i + μ) − θ_i is the float32 run's realized step
  (exact by Sterbenz). The float32 run writes `original + mu` (a Python double) into the float32 tensor; the
  engine computes θ + μ in float32 tensor arithmetic. The two agree whenever μ is a float32 number (e.g. 2^-8),
  which is why the corpus tests use such a μ.
- Randomness: float64 and float32 draws from one generator state do not always agree (torch.rand does not;
  bernoulli_ happens to), so the oracle does not rely on reseeding. It runs one float32 forward of a copy of the
  model from the caller's RNG state (the state the float32 step starts each evaluation from), records the output
  of every random aten op (bernoulli_, rand, randn, ...: ops tagged nondeterministic_seeded), and replays those
  values, widened to float64, in every float64 evaluation: dropout, drop_path and stochastic depth see the float32
  masks exactly. It checks that the recording is complete — a float32 forward under replay from a different RNG
  state must reproduce the recorded loss bit for bit — and refuses random ops whose values depend on tensor
  inputs (they cannot be replayed at another point).
- Precision: some models downcast on purpose (Hugging Face's RMSNorm does `x.to(torch.float32)`, its loss
  `logits.float()`, its attention `softmax(..., dtype=torch.float32)`). During the float64 evaluations such
  conversions of float64 tensors are kept in float64, and every aten op is checked: one that turns float64
  inputs into a lower-precision float output raises. Constants computed from non-float64 inputs (e.g. rotary
  angles from integer positions) are computed in float64 too where a `.float()` would have narrowed a float64
  buffer; they are the same in L(θ) and L(θ + h e_i), so they change a difference quotient only at O(1e-7) of
  its size.

This module imports nothing from zokernels: it is the independent reference the engines are judged by.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

OracleLoss = Callable[[Any, Any], torch.Tensor]

# Random ops whose outputs depend only on shapes, dtypes and the generator (never on input values): their float32
# outputs can be replayed at any parameter point.
REPLAYABLE = {
    "aten::bernoulli_.float", "aten::bernoulli.p", "aten::uniform_", "aten::normal_", "aten::exponential_",
    "aten::geometric_", "aten::log_normal_", "aten::cauchy_", "aten::random_", "aten::random_.from",
    "aten::random_.to", "aten::rand", "aten::rand.generator", "aten::rand_like", "aten::randn",
    "aten::randn.generator", "aten::randn_like", "aten::randint", "aten::randint.low", "aten::randint_like",
    "aten::randint_like.low_dtype", "aten::randperm", "aten::randperm.generator", "aten::normal.float_float",
}
_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class OracleError(RuntimeError):
    """The oracle cannot answer for this model honestly (randomness it cannot replay, an unavoidable downcast)."""


@dataclass
class OracleResult:
    estimates: dict[str, torch.Tensor]   # float64, each parameter's shape, zero outside the mask
    steps: dict[str, torch.Tensor]       # float64 realized steps h, zero outside the mask
    base_loss: float                     # L64(θ)
    base_loss_fp32: float                # the plain float32 forward (same RNG state) whose draws were replayed
    random_draws: int                    # random ops recorded in that forward and replayed in every evaluation
    downcasts_kept: int                  # float64 -> lower-precision conversions kept in float64, per evaluation
    coordinates: dict[str, list[int]] = field(default_factory=dict)  # flat indices evaluated, per parameter


def _draws(func, args: tuple, kwargs: dict) -> bool:
    """Whether this call draws random numbers: ops tagged nondeterministic_seeded, except attention kernels called
    with dropout_p == 0 (tagged because they could draw, but they do not)."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for position, argument in enumerate(func._schema.arguments):
        if argument.name == "dropout_p":
            value = args[position] if position < len(args) else kwargs.get("dropout_p", argument.default_value)
            return value != 0
    return True


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


class RandomRecorder(TorchDispatchMode):
    """Records the output of every random aten op (a float32 forward)."""

    def __init__(self):
        super().__init__()
        self.draws: list[tuple[str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _draws(func, args, kwargs):
            name = func.name()
            if name not in REPLAYABLE:
                raise OracleError(f"the model draws random numbers with {name}, whose values depend on its tensor "
                                  "inputs; the oracle can only replay draws that depend on shapes alone")
            outputs = _outputs(out)
            if len(outputs) != 1:
                raise OracleError(f"random op {name} returned {len(outputs)} tensors; expected one")
            self.draws.append((name, outputs[0].detach().clone()))
        return out


class RandomReplay(TorchDispatchMode):
    """Replays recorded draws in order: each random op runs (for its output's dtype and layout), then its output
    is overwritten with the recorded values. With `check_float64`, also raises on any op that narrows float64
    inputs to a lower-precision float output."""

    def __init__(self, draws: list[tuple[str, torch.Tensor]], check_float64: bool = False):
        super().__init__()
        self.draws, self.position, self.check_float64 = draws, 0, check_float64

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _draws(func, args, kwargs):
            name = func.name()
            if self.position >= len(self.draws):
                raise OracleError(f"the evaluation made more random draws than the recorded float32 forward "
                                  f"({len(self.draws)}); extra draw: {name}")
            recorded_name, recorded = self.draws[self.position]
            outputs = _outputs(out)
            if recorded_name != name or len(outputs) != 1 or outputs[0].shape != recorded.shape:
                raise OracleError(f"random draw {self.position} differs from the recorded float32 forward: "
                                  f"{name} {[tuple(o.shape) for o in outputs]} vs {recorded_name} "
                                  f"{tuple(recorded.shape)}")
            outputs[0].copy_(recorded)
            self.position += 1
        elif self.check_float64:
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if any(a.dtype == torch.float64 for a in inputs):
                narrowed = [o for o in _outputs(out) if o.dtype in _LOW_FLOATS]
                if narrowed:
                    raise OracleError(f"{func.name()} narrowed float64 inputs to {narrowed[0].dtype} in the float64 "
                                      "evaluation; the oracle would not be float64")
        return out

    def finish(self) -> None:
        if self.position != len(self.draws):
            raise OracleError(f"the evaluation made {self.position} random draws, the recorded float32 forward "
                              f"{len(self.draws)}")


def _target_dtype(args: tuple, kwargs: dict):
    for a in list(args) + [kwargs.get("dtype")]:
        if isinstance(a, torch.dtype):
            return a
        if isinstance(a, torch.Tensor):
            return a.dtype
    return None


class KeepFloat64(TorchFunctionMode):
    """Float64 tensors stay float64: `.float()`, `.half()`, `.to(float32)`, `.type(float32)`, `.type_as(fp32)`
    and `dtype=float32` arguments of functions with float64 tensor inputs are widened to float64."""

    def __init__(self):
        super().__init__()
        self.kept = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        this = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if this is not None and this.dtype == torch.float64:
            if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
                self.kept += 1
                return this
            if func is torch.Tensor.type_as and isinstance(args[1], torch.Tensor) and args[1].dtype in _LOW_FLOATS:
                self.kept += 1
                return this
            if func in (torch.Tensor.to, torch.Tensor.type):
                target = _target_dtype(args[1:], kwargs)
                if target in _LOW_FLOATS:
                    self.kept += 1
                    rest = [torch.float64 if isinstance(a, torch.dtype) else
                            (a.to(torch.float64) if isinstance(a, torch.Tensor) and a.dtype in _LOW_FLOATS else a)
                            for a in args[1:]]
                    if "dtype" in kwargs:
                        kwargs["dtype"] = torch.float64
                    return func(this, *rest, **kwargs)
        if kwargs.get("dtype") in _LOW_FLOATS:
            leaves = torch.utils._pytree.tree_leaves(args)
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in leaves):
                self.kept += 1
                kwargs["dtype"] = torch.float64
        args, kwargs = self._widen_mixed(func, args, kwargs)
        return func(*args, **kwargs)

    def _widen_mixed(self, func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A float64 tensor meeting a low-precision float tensor (made from integers, e.g. RoPE's
        `position_ids.float()`): the low one is widened, as type promotion does for elementwise ops, so matmul-like
        ops that refuse mixed dtypes also compute in float64. An in-place op keeps its own first argument."""
        leaves = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if not (any(a.dtype == torch.float64 for a in leaves) and any(a.dtype in _LOW_FLOATS for a in leaves)):
            return args, kwargs
        in_place = getattr(func, "__name__", "").endswith("_") or "out" in kwargs
        widen = lambda a: a.to(torch.float64) if isinstance(a, torch.Tensor) and a.dtype in _LOW_FLOATS else a  # noqa: E731
        first, rest = (args[:1], args[1:]) if in_place else ((), args)
        self.kept += 1
        kwargs = {k: v if k == "out" else torch.utils._pytree.tree_map(widen, v) for k, v in kwargs.items()}
        return first + tuple(torch.utils._pytree.tree_map(widen, list(rest))), kwargs


def _call(model: torch.nn.Module, batch: Any):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def default_oracle_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """The model's own `outputs.loss` when it computed one, else cross-entropy of the logits (a tensor output,
    `outputs['logits']`, or a tuple's first item) against batch[1] / batch['labels']."""
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    if isinstance(outputs, torch.Tensor):
        logits = outputs
    elif isinstance(outputs, Mapping):
        logits = outputs["logits"]
    else:
        logits = outputs[0]
    targets = batch["labels"] if isinstance(batch, Mapping) else batch[1]
    return F.cross_entropy(logits, targets)


def widen_batch(batch: Any) -> Any:
    """Floating tensors of a batch (tuple, list, dict, tensor) as float64; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return (type(batch)({k: widen_batch(v) for k, v in batch.items()}) if isinstance(batch, dict) else
                {k: widen_batch(v) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(widen_batch(v) for v in batch)
    return batch


def _scalar(loss: torch.Tensor) -> float:
    return float(loss.item() if isinstance(loss, torch.Tensor) else loss)


def record_randomness(model: torch.nn.Module, batch: Any, rng_state: torch.Tensor,
                      loss: OracleLoss = default_oracle_loss) -> tuple[float, list]:
    """One float32 forward of a copy of `model` from `rng_state`: its loss and its recorded random draws. Checks
    that the recording is complete (a replayed forward from another RNG state gives the same loss, bit for bit)."""
    copy32 = copy.deepcopy(model)
    recorder = RandomRecorder()
    with torch.no_grad():
        torch.set_rng_state(rng_state)
        with recorder:
            loss32 = _scalar(loss(_call(copy32, batch), batch))
        other = torch.Generator().manual_seed(int(rng_state[:8].sum().item()) + 12345).get_state()
        copy32.load_state_dict(model.state_dict())  # undo the recording's BN running-stat update
        torch.set_rng_state(other)
        replay = RandomReplay(recorder.draws)
        with replay:
            again = _scalar(loss(_call(copy32, batch), batch))
        replay.finish()
    if again != loss32 and not (again != again and loss32 != loss32):
        raise OracleError(f"the model's loss depends on random numbers the oracle cannot see (a float32 forward "
                          f"replaying every recorded draw gave {again!r}, the recorded forward {loss32!r}); it "
                          "cannot give the float64 evaluation the same randomness")
    return loss32, recorder.draws


class Float64Evaluator:
    """L64 at the current values of a float64 copy, with the recorded draws replayed and float64 kept."""

    def __init__(self, model64: torch.nn.Module, batch64: Any, draws: list, rng_state: torch.Tensor,
                 loss: OracleLoss):
        self.model, self.batch, self.draws, self.rng_state, self.loss = model64, batch64, draws, rng_state, loss
        self.buffers = [(b, b.detach().clone()) for b in model64.buffers()]
        self.kept = 0

    def __call__(self) -> float:
        torch.set_rng_state(self.rng_state)
        keep, replay = KeepFloat64(), RandomReplay(self.draws, check_float64=True)
        with keep, replay:
            value = self.loss(_call(self.model, self.batch), self.batch)
        replay.finish()
        self.kept = keep.kept
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float64:
            raise OracleError(f"the float64 evaluation returned a {getattr(value, 'dtype', type(value))} loss")
        for b, saved in self.buffers:  # train-mode BN: every evaluation starts from the same running stats
            b.copy_(saved)
        return _scalar(value)


@torch.no_grad()
def cge_oracle(model: torch.nn.Module, batch: Any, mask: dict[str, torch.Tensor], mu: float,
               loss: OracleLoss = default_oracle_loss, rng_state: torch.Tensor | None = None) -> OracleResult:
    """Float64 forward-difference estimates on the coordinates `mask` selects (name -> bool tensor of the
    parameter's shape; parameters missing from the mask get zero). `rng_state`: the CPU generator state the
    float32 step starts its evaluations from (default: the current state). The model, its buffers and the global
    RNG state are left as they were."""
    if rng_state is None:
        rng_state = torch.get_rng_state()
    saved_rng = torch.get_rng_state()
    try:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        unknown = set(mask) - {n for n, _ in named}
        if unknown:
            raise ValueError(f"mask names parameters the model does not have: {sorted(unknown)}")
        base32, draws = record_randomness(model, batch, rng_state, loss)
        model64 = copy.deepcopy(model).double()
        params64 = dict(model64.named_parameters())
        evaluate = Float64Evaluator(model64, widen_batch(batch), draws, rng_state, loss)
        base64 = evaluate()
        estimates, steps, coordinates = {}, {}, {}
        for name, p in named:
            estimate = torch.zeros(p.numel(), dtype=torch.float64)
            step = torch.zeros(p.numel(), dtype=torch.float64)
            indices = [] if name not in mask else torch.nonzero(mask[name].reshape(-1)).flatten().tolist()
            flat64 = params64[name].data.view(-1)
            flat32 = p.detach().reshape(-1)
            for i in indices:
                original = flat32[i].item()
                perturbed = torch.tensor(original + mu, dtype=p.dtype).item()  # what the float32 run writes
                h = perturbed - original  # exact in float64: a difference of two float32 numbers
                flat64[i] = perturbed
                try:
                    up = evaluate()
                finally:
                    flat64[i] = original
                estimate[i] = (up - base64) / h
                step[i] = h
            estimates[name] = estimate.view(p.shape)
            steps[name] = step.view(p.shape)
            coordinates[name] = indices
        return OracleResult(estimates, steps, base64, base32, len(draws), evaluate.kept, coordinates)
    finally:
        torch.set_rng_state(saved_rng)
