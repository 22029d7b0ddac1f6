"""`zokernels demo`: train a small MLP on scikit-learn's real 8x8 digits with coordinate-wise ZO (CGE),
randomized ZO (RGE) and first-order backprop (FO) on the same loop, and print their test accuracies.

It is the README's first command: real data bundled with scikit-learn, no network, about a minute on 2 cores."""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

from .. import api
from ..data import iterate_minibatches, load_digits_tensors
from ..estimators.common import default_loss
from .common import accuracy

METHODS = ("cge", "rge", "fo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default="cge,rge,fo", help="comma-separated subset of cge,rge,fo")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=16, help="hidden units of the 64-h-10 MLP")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--mu", type=float, default=5e-3)
    parser.add_argument("--rge-queries", type=int, default=64, help="directions per RGE step")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each method after this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 is fastest for this tiny model (no thread wake-ups)")


def make_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _estimate(method: str, model: nn.Module, batch, args, step: int) -> float:
    if method == "cge":
        return api.cge_step(model, batch, mu=args.mu).loss
    if method == "rge":
        return api.rge_step(model, batch, mu=args.mu, q=args.rge_queries, seed=args.seed * 100_003 + step).loss
    model.zero_grad()
    loss = default_loss(model, batch)
    loss.backward()
    return loss.item()


def train_one(method: str, data, args) -> tuple[float, float, int]:
    """Returns (test accuracy, seconds, steps) for one method; same init, same batches for every method."""
    torch.manual_seed(args.seed)
    model = make_mlp(args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    step, start = 0, time.perf_counter()
    steps_per_epoch = len(data.train_y) // args.batch_size
    total = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps,
                                                                              steps_per_epoch * args.epochs)
    with tqdm(total=total, desc=f"{method:>3}", unit="step") as bar:
        for _ in range(args.epochs):
            for batch in iterate_minibatches(data.train_x, data.train_y, args.batch_size, generator):
                if step >= total:
                    break
                loss = _estimate(method, model, batch, args, step)
                optimizer.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
    return accuracy(model, data.test_x, data.test_y), time.perf_counter() - start, step


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {METHODS}")
    torch.set_num_threads(args.threads)
    data = load_digits_tensors(seed=args.seed)
    d = sum(p.numel() for p in make_mlp(args.hidden).parameters())
    print(f"digits: {len(data.train_y)} train / {len(data.test_y)} test images, MLP 64-{args.hidden}-10 "
          f"with d = {d} parameters")
    results = {m: train_one(m, data, args) for m in methods}
    print(f"\n{'method':<8}{'test acc':>10}{'steps':>8}{'seconds':>10}{'queries/step':>14}")
    queries = {"cge": d + 1, "rge": args.rge_queries + 1, "fo": 1}
    for m, (acc, seconds, steps) in results.items():
        print(f"{m:<8}{100 * acc:>9.1f}%{steps:>8}{seconds:>10.1f}{queries[m]:>14}")
    return 0
