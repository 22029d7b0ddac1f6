"""Running one corpus case (a model of tests/foreign_models.py in train or eval mode) the way the test and the
bench both need: random coordinates, cge_step with each engine, the float64 oracle, side-effect checks.

Everything measured here is measured in the same run: the oracle's estimates, each engine's estimates, the errors
against the oracle, the buffers a plain forward leaves. Nothing is compared with a stored number."""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import zokernels
from zokernels.reference.oracle import cge_oracle

from foreign_models import CORPUS, Entry

MU = 2.0**-8  # a float32 number: fl32(θ + μ) is the same whether μ is added in float32 or in double
MODES = ("train", "eval")
CASES = [(entry, mode) for entry in CORPUS for mode in MODES]
STEP_SEED = 20240  # the RNG state every step (and the oracle, and the reference forward) starts from


def case_id(entry: Entry, mode: str) -> str:
    return f"{entry.name}-{mode}"


def _call(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch[0])


def _token_ids(batch: Any) -> torch.Tensor | None:
    x = batch.get("input_ids") if isinstance(batch, Mapping) else batch[0]
    return x if isinstance(x, torch.Tensor) and not x.is_floating_point() else None


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rpartition(".")[0]) if "." in name else model


def _random_index(model, batch, name, p, g) -> int:
    """A flat index into p; for an embedding table, in the row of a token the batch uses (other rows have an
    exactly zero gradient and would make the check trivial)."""
    owner = _owner(model, name)
    tokens = _token_ids(batch)
    if (isinstance(owner, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and tokens is not None
            and name.endswith("weight")):
        used = torch.unique(tokens)
        used = used[used != (owner.padding_idx if owner.padding_idx is not None else -1)]
        row = int(used[torch.randint(0, used.numel(), (1,), generator=g)])
        return row * p.shape[1] + int(torch.randint(0, p.shape[1], (1,), generator=g))
    return int(torch.randint(0, p.numel(), (1,), generator=g))


def pick_mask(model: torch.nn.Module, batch: Any, first: str, seed: int, n_first: int = 6,
              n_random: int = 10) -> dict[str, torch.Tensor]:
    """n_first coordinates of the first layer's weight and n_random more, each in a parameter tensor drawn
    uniformly (so small tensors — BN, LayerNorm, biases, cls_token, layer scale — are picked as often as large
    ones). At most n_first + n_random coordinates (repeats merge)."""
    g = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = dict(named)
    flat = {n: torch.zeros(p.numel(), dtype=torch.bool) for n, p in named}
    for _ in range(n_first):
        flat[first][_random_index(model, batch, first, params[first], g)] = True
    others = [n for n, _ in named if n != first]
    for _ in range(n_random):
        name = others[int(torch.randint(0, len(others), (1,), generator=g))]
        flat[name][_random_index(model, batch, name, params[name], g)] = True
    return {n: m.view(params[n].shape) for n, m in flat.items() if m.any()}


def first_layer_mask(model: torch.nn.Module, batch: Any, first: str, n: int, seed: int = 0):
    """n distinct coordinates of the first layer's weight (used rows for an embedding), for the speed bench."""
    p = dict(model.named_parameters())[first]
    g = torch.Generator().manual_seed(seed)
    chosen: set[int] = set()
    limit = p.numel()
    owner = _owner(model, first)
    tokens = _token_ids(batch)
    if isinstance(owner, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and tokens is not None:
        limit = torch.unique(tokens).numel() * p.shape[1]
    for _ in range(20 * n):
        if len(chosen) >= min(n, limit):
            break
        chosen.add(_random_index(model, batch, first, p, g))
    mask = torch.zeros(p.numel(), dtype=torch.bool)
    mask[sorted(chosen)] = True
    return {first: mask.view(p.shape)}


@dataclass
class EngineRun:
    engine: str                                     # the engine cge_step was asked for
    served: str = ""                                # result.engine
    error: str = ""                                 # the exception, if the step raised
    warnings: list[str] = field(default_factory=list)
    max_abs_error: float = float("nan")             # vs the oracle, over the selected coordinates
    base_loss: float = float("nan")
    changed_parameters: list[str] = field(default_factory=list)
    wrong_buffers: list[str] = field(default_factory=list)
    nonzero_outside_mask: list[str] = field(default_factory=list)
    seconds: float = float("nan")


@dataclass
class CaseRun:
    name: str
    mode: str
    n_coordinates: int
    oracle_base_loss: float = float("nan")
    oracle_base_loss_fp32: float = float("nan")
    random_draws: int = 0
    runs: dict[str, EngineRun] = field(default_factory=dict)


def build_case(entry: Entry, mode: str, seed: int = 0):
    model, batch = entry.build(seed)
    model.train(mode == "train")
    return model, batch


def _expected_buffers(model, batch, rng_state) -> dict[str, torch.Tensor]:
    """Buffers after one plain forward (the only change a step may make: BN running stats move once)."""
    reference = copy.deepcopy(model)
    torch.set_rng_state(rng_state)
    with torch.no_grad():
        _call(reference, batch)
    return {n: b.detach().clone() for n, b in reference.named_buffers()}


def run_engine(model, batch, mask, engine: str, rng_state, oracle=None, params_before=None,
               buffers_before=None, expected_buffers=None) -> EngineRun:
    run = EngineRun(engine)
    for p in model.parameters():
        p.grad = None
    if buffers_before is not None:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers_before[n])
    torch.set_rng_state(rng_state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            result = zokernels.cge_step(model, batch, mu=MU, mask=mask, engine=engine)
        except Exception as error:  # recorded, the test asserts on it
            run.error = f"{type(error).__name__}: {error}"
            return run
        run.seconds = time.perf_counter() - start
    run.warnings = [str(w.message) for w in caught]
    run.served, run.base_loss = result.engine, result.loss
    named = dict(model.named_parameters())
    if params_before is not None:
        run.changed_parameters = [n for n, p in named.items() if not torch.equal(p.detach(), params_before[n])]
    if expected_buffers is not None:
        run.wrong_buffers = [n for n, b in model.named_buffers() if not torch.equal(b, expected_buffers[n])]
    errors = []
    for n, p in named.items():
        grad = torch.zeros(p.shape, dtype=torch.float64) if p.grad is None else p.grad.detach().double()
        selected = mask.get(n, torch.zeros(p.shape, dtype=torch.bool))
        if torch.count_nonzero(grad[~selected]):
            run.nonzero_outside_mask.append(n)
        if oracle is not None and selected.any():
            errors.append((grad - oracle.estimates[n])[selected].abs().max().item())
    if errors:
        run.max_abs_error = max(errors)
    return run


def run_case(entry: Entry, mode: str, engines=("auto", "naive"), with_oracle: bool = True,
             seed: int = 0) -> CaseRun:
    model, batch = build_case(entry, mode, seed)
    mask = pick_mask(model, batch, entry.first, seed)
    case = CaseRun(entry.name, mode, sum(int(m.sum()) for m in mask.values()))
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.detach().clone() for n, b in model.named_buffers()}
    torch.manual_seed(STEP_SEED)
    rng_state = torch.get_rng_state()
    expected = _expected_buffers(model, batch, rng_state)
    oracle = None
    if with_oracle:
        oracle = cge_oracle(model, batch, mask, MU, rng_state=rng_state)
        case.oracle_base_loss, case.oracle_base_loss_fp32 = oracle.base_loss, oracle.base_loss_fp32
        case.random_draws = oracle.random_draws
    for engine in engines:
        case.runs[engine] = run_engine(model, batch, mask, engine, rng_state, oracle, params_before,
                                       buffers_before, expected)
    return case
