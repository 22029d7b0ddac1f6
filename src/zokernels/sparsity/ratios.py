"""Layer-wise pruning ratios (LPR): name of a Conv/Linear weight -> fraction of its coordinates pruned.

DeepZero keeps only these per-layer ratios from pruning-at-init, not the pruned positions: training then draws
random coordinate sets with the same per-layer sizes (see masks.py). Ratios are saved as JSON so an expensive
ZO-GraSP pass runs once per (model, seed, sparsity).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .zo_grasp import prunable_layers, prunable_parameters


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of Conv/Linear weights pruned), got {sparsity}")
    return float(sparsity)


def ratios_from_scores(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Global magnitude pruning of the scores: keep the round((1−s)·N) largest |score| over all layers, and
    report each layer's pruned fraction. Ties are broken by position (stable sort), so the result is exact
    and deterministic."""
    sparsity = check_sparsity(sparsity)
    if not scores:
        raise ValueError("scores must be a non-empty dict name -> tensor")
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    flat = torch.cat([scores[n].detach().reshape(-1).double().abs() for n in names])
    if not torch.isfinite(flat).all():
        raise ValueError("scores contain NaN or inf; cannot rank coordinates")
    keep = round((1.0 - sparsity) * flat.numel())
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    order = torch.sort(flat, descending=True, stable=True).indices
    kept[order[:keep]] = True
    counts = [int(part.sum()) for part in torch.split(kept, sizes)]
    return {name: 1.0 - kept_count / n for name, kept_count, n in zip(names, counts, sizes)}


def uniform_ratios(model: nn.Module, sparsity: float) -> dict[str, float]:
    """The same pruned fraction in every Conv/Linear layer."""
    sparsity = check_sparsity(sparsity)
    return {name: sparsity for name, _ in prunable_parameters(model)}


def smart_ratios(model: nn.Module, sparsity: float, linear_keep: float = 0.3) -> dict[str, float]:
    """Smart Ratio (Su et al. 2020), data-free. Layers are counted from the output (k = 1 is the last layer);
    when the last layer is Linear it keeps `linear_keep`, and every other layer k keeps a fraction proportional
    to k² + k, scaled so the total kept equals (1 − s)·N. Fractions that would exceed 1 are clipped to 1 and the
    rest rescaled."""
    sparsity = check_sparsity(sparsity)
    if not 0.0 < linear_keep <= 1.0:
        raise ValueError(f"linear_keep must be in (0, 1], got {linear_keep}")
    layers = prunable_layers(model)
    named = [(name, module.weight) for name, module in layers]
    sizes = [p.numel() for _, p in named]
    budget = (1.0 - sparsity) * sum(sizes)
    last_is_linear = isinstance(layers[-1][1], nn.Linear)
    keep = [0.0] * len(named)
    free = list(range(len(named)))
    if last_is_linear and len(named) > 1:
        keep[-1] = linear_keep
        budget -= linear_keep * sizes[-1]
        free = free[:-1]
    if budget < 0:
        raise ValueError(f"sparsity {sparsity} keeps fewer weights than linear_keep={linear_keep} of the last "
                         f"layer alone; lower linear_keep or the sparsity")
    weights = {i: float((len(named) - i) ** 2 + (len(named) - i)) for i in free}
    while free:  # water-filling: clip layers that would keep more than all of their weights
        scale = budget / sum(weights[i] * sizes[i] for i in free)
        full = [i for i in free if weights[i] * scale >= 1.0]
        if not full:
            for i in free:
                keep[i] = weights[i] * scale
            break
        for i in full:
            keep[i] = 1.0
            budget -= sizes[i]
        free = [i for i in free if i not in full]
    return {name: 1.0 - k for (name, _), k in zip(named, keep)}


def kept_counts(model: nn.Module, ratios: dict[str, float]) -> dict[str, int]:
    """round((1 − ratio)·n) per layer: the exact number of coordinates sample_masks keeps."""
    params = dict(model.named_parameters())
    check_ratios(ratios, params)
    return {name: round((1.0 - ratio) * params[name].numel()) for name, ratio in ratios.items()}


def check_ratios(ratios: dict[str, float], params: dict[str, torch.Tensor]) -> None:
    if not isinstance(ratios, dict) or not ratios:
        raise TypeError(f"ratios must be a non-empty dict name -> pruned fraction, got {type(ratios).__name__}")
    for name, ratio in ratios.items():
        if name not in params:
            raise ValueError(f"ratios has key {name!r}, which is not a parameter of the model")
        if (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0
                or math.isnan(ratio)):
            raise ValueError(f"ratios[{name!r}] must be a float in [0, 1], got {ratio!r}")


def overall_sparsity(model: nn.Module, ratios: dict[str, float]) -> float:
    """Fraction of the ratios' layers' coordinates pruned, with the exact per-layer rounding."""
    params = dict(model.named_parameters())
    counts = kept_counts(model, ratios)
    total = sum(params[n].numel() for n in ratios)
    return 1.0 - sum(counts.values()) / total


def save_ratios(path: str | os.PathLike, ratios: dict[str, float], **metadata) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # ranks may write concurrently
    temporary.write_text(json.dumps({"ratios": ratios, "metadata": metadata}, indent=1, sort_keys=True))
    os.replace(temporary, path)


def load_ratios(path: str | os.PathLike) -> tuple[dict[str, float], dict]:
    data = json.loads(Path(path).read_text())
    if "ratios" not in data:
        raise ValueError(f"{path} is not a ratios file (no 'ratios' key)")
    return {k: float(v) for k, v in data["ratios"].items()}, data.get("metadata", {})
