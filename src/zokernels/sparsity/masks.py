"""Random coordinate sets for Sparse-CGE: per layer, exactly round((1 − ratio)·n) coordinates, uniformly at
random, drawn from a caller's torch.Generator so a run is reproducible from its seed.

Masks are dicts name -> bool tensor of the parameter's shape, the format `zokernels.cge_step(mask=...)` takes.
Parameters absent from a mask get no coordinates (zero gradient), which is why DeepZero's "always estimate BN
and biases" rule is a separate, explicit step: `with_dense_coordinates`.
"""
from __future__ import annotations

import torch
from torch import nn

from .ratios import check_ratios, kept_counts, uniform_ratios
from .zo_grasp import prunable_parameters


def sample_masks(model: nn.Module, ratios: dict[str, float], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One bool mask per parameter named in `ratios`, keeping exactly round((1 − ratio)·n) coordinates.

    Layers are drawn in the order of `ratios`' keys sorted by name, so the same generator state gives the same
    masks whatever order the dict was built in."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    params = dict(model.named_parameters())
    check_ratios(ratios, params)
    counts = kept_counts(model, ratios)
    masks = {}
    for name in sorted(ratios):
        n = params[name].numel()
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:counts[name]]] = True
        masks[name] = flat.view(params[name].shape).to(params[name].device)
    return masks


def with_dense_coordinates(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `masks` plus an all-True mask for every trainable parameter that is not a Conv/Linear weight
    (BatchNorm γ/β, biases): DeepZero estimates those coordinates at every step. Conv/Linear weights missing
    from `masks` stay absent (no coordinates)."""
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict name -> bool tensor, got {type(masks).__name__}")
    weights = {name for name, _ in prunable_parameters(model)}
    out = dict(masks)
    for name, p in model.named_parameters():
        if p.requires_grad and name not in weights and name not in out:
            out[name] = torch.ones_like(p, dtype=torch.bool)
    return out


def dense_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable coordinate selected (dense CGE expressed as a mask)."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.requires_grad}


def density_masks(model: nn.Module, density: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """DeepZero's sparse-CGE set for the black-box programs (PDE corrector, certified defense): `density` of every
    Conv/Linear weight at random (sample_masks at uniform ratios), every other parameter dense; density 1: all
    coordinates, drawing nothing from `generator`."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if density >= 1.0:
        return dense_masks(model)
    return with_dense_coordinates(model, sample_masks(model, uniform_ratios(model, 1.0 - density), generator))


def mask_coordinate_count(masks: dict[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))
