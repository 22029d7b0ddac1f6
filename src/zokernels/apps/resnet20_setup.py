"""Setup pieces of `zokernels train resnet20`: data, model, layer-wise pruning ratios (cached), masks, schedule."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from .. import sparsity
from ..data import TensorSplit, load_cifar10_tensors, load_digits_tensors
from ..models import build_model

RATIO_SOURCES = ("zo_grasp", "fo_grasp", "smart", "uniform", "dense")


def load_data(args: argparse.Namespace) -> tuple[TensorSplit, str]:
    """CIFAR-10 from --data, else the embedded digits (3 channels; upscaled to 32x32 for ResNets)."""
    if args.data:
        return load_cifar10_tensors(args.data, args.train_limit, args.test_limit), "cifar10"
    size = args.image_size or (8 if args.model == "small_cnn" else 32)
    split = load_digits_tensors(size=size, channels=3, seed=args.seed)
    if args.train_limit:
        split.train_x, split.train_y = split.train_x[:args.train_limit], split.train_y[:args.train_limit]
    if args.test_limit:
        split.test_x, split.test_y = split.test_x[:args.test_limit], split.test_y[:args.test_limit]
    return split, f"digits{size}"


def make_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    # The init draws from a dedicated seed so that the model does not depend on what ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args.model, num_classes=num_classes, in_channels=3, depth=args.depth)
    return model


def _ratios_cache_path(args: argparse.Namespace, data_name: str) -> Path:
    if args.ratios_file:
        return Path(args.ratios_file)
    depth = f"d{args.depth}" if args.model == "small_cnn" else ""
    return Path(args.out) / f"lpr_{args.model}{depth}_{data_name}_{args.ratios}_s{args.sparsity}_seed{args.seed}.json"


def _compute_ratios(args: argparse.Namespace, model: nn.Module, data: TensorSplit) -> dict[str, float]:
    if args.ratios == "smart":
        return sparsity.smart_ratios(model, args.sparsity)
    if args.ratios == "uniform":
        return sparsity.uniform_ratios(model, args.sparsity)
    probe_gen = torch.Generator().manual_seed(args.seed)
    probe = sparsity.class_balanced_probe(data.train_x, data.train_y, args.grasp_per_class, probe_gen)
    model.train()
    if args.ratios == "fo_grasp":
        scores = sparsity.fo_grasp_scores(model, probe)
    else:
        scores = sparsity.zo_grasp_scores(model, probe, q=args.grasp_q, mu=args.mu, dist=args.grasp_dist,
                                          seed=args.seed)
    return sparsity.ratios_from_scores(scores, args.sparsity)


def layer_ratios(args: argparse.Namespace, model: nn.Module, data: TensorSplit, data_name: str,
                 log=print) -> dict[str, float] | None:
    """The LPR for --ratios at --sparsity, read from the cache file when present (ZO-GraSP costs 2(q+1)
    forwards of the probe batch), else computed from the model at init and saved. None means dense."""
    if args.ratios == "dense":
        return None
    path = _ratios_cache_path(args, data_name)
    if path.is_file():
        ratios, meta = sparsity.load_ratios(path)
        log(f"layer-wise pruning ratios read from {path} ({meta.get('source', '?')})")
        return ratios
    ratios = _compute_ratios(args, model, data)
    sparsity.save_ratios(path, ratios, source=args.ratios, sparsity=args.sparsity, model=args.model,
                         seed=args.seed, grasp_q=args.grasp_q, grasp_dist=args.grasp_dist)
    log(f"layer-wise pruning ratios ({args.ratios}) saved to {path}; overall sparsity "
        f"{sparsity.overall_sparsity(model, ratios):.4f}")
    return ratios


def draw_masks(model: nn.Module, ratios: dict[str, float] | None,
               generator: torch.Generator) -> dict[str, torch.Tensor] | None:
    """Random per-layer coordinate sets with the LPR sizes, plus every BN/bias coordinate; None = dense."""
    if ratios is None:
        return None
    return sparsity.with_dense_coordinates(model, sparsity.sample_masks(model, ratios, generator))


def warmup_cosine(total_steps: int, warmup_steps: int):
    """lr factor per optimizer step: linear warm-up to 1, then cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def add_weight_decay(model: nn.Module, weight_decay: float, masks: dict[str, torch.Tensor] | None,
                     decay_unmasked: bool) -> None:
    """grad += wd·θ, on every coordinate or (decay_unmasked=False) only on the coordinates the mask estimates,
    so that a sparse step leaves unselected weights untouched."""
    if weight_decay == 0.0:
        return
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if decay_unmasked or masks is None:
            p.grad.add_(p.detach(), alpha=weight_decay)
        elif name in masks:
            p.grad.add_(p.detach() * masks[name], alpha=weight_decay)
