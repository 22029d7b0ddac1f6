"""`zokernels demo`: train a small MLP on scikit-learn's real 8x8 digits with coordinate-wise ZO (CGE),
randomized ZO (RGE) and first-order backprop (FO) on the same loop, and print their test accuracies.

It is the README's first command: real data bundled with scikit-learn, no network, seconds on 2 cores."""
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
    parser.add_argument("--epochs", type=int, default=3, help="passes over the 1,437 training images")
    parser.add_argument("--batch-size", type=int, default=64, help="training images per step")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units of the 64-h-10 MLP")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9) of CGE and FO")
    # RGE's Gaussian estimate is the gradient plus noise of about sqrt(d/q) = 4.3 times its norm (d = 1,210,
    # q = 64): at CGE's lr 0.1 its loss fell to 1.4 by step 11 and climbed back to 6-8 by step 66 (one seed,
    # 3 epochs); at 0.05 it plateaued near 1; at 0.02 it fell steadily to 0.4 over 4 seeds and to 0.1-0.2 in
    # 10 epochs without climbing back. Hence a separate, smaller default.
    parser.add_argument("--rge-lr", type=float, default=0.02,
                        help="SGD learning rate (momentum 0.9) of RGE; smaller than --lr because RGE's estimate "
                             "is much noisier than CGE's (at 0.1 its loss climbs back from 1.4 to 6-8)")
    parser.add_argument("--mu", type=float, default=5e-3, help="ZO smoothing parameter (perturbation size)")
    parser.add_argument("--rge-queries", type=int, default=64, help="directions per RGE step")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop each method after this many steps (default: all epochs)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the init, the batch order and RGE's directions")
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


def train_one(method: str, data, args) -> tuple[float, float, int, float]:
    """Returns (test accuracy, seconds, steps, mean minibatch loss of the last epoch) for one method; same init,
    same batches for every method."""
    torch.manual_seed(args.seed)
    model = make_mlp(args.hidden)
    lr = args.rge_lr if method == "rge" else args.lr
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    step, start = 0, time.perf_counter()
    steps_per_epoch = len(data.train_y) // args.batch_size
    total = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps,
                                                                              steps_per_epoch * args.epochs)
    epoch_losses: list[float] = []
    with tqdm(total=total, desc=f"{method:>3}", unit="step") as bar:
        for _ in range(args.epochs):
            if step >= total:
                break
            epoch_losses = []
            for batch in iterate_minibatches(data.train_x, data.train_y, args.batch_size, generator):
                if step >= total:
                    break
                loss = _estimate(method, model, batch, args, step)
                optimizer.step()
                step += 1
                epoch_losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
    last_loss = sum(epoch_losses) / max(1, len(epoch_losses))
    return accuracy(model, data.test_x, data.test_y), time.perf_counter() - start, step, last_loss


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
    # Accuracy is printed to 0.1 point (one test image is 0.28 points) and the loss to 3 decimals: the runs were
    # identical to these digits twice on one machine and with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2.
    print(f"\n{'method':<8}{'test acc':>10}{'last-epoch loss':>17}{'steps':>8}{'seconds':>10}{'queries/step':>14}")
    queries = {"cge": d + 1, "rge": args.rge_queries + 1, "fo": 1}
    for m, (acc, seconds, steps, last_loss) in results.items():
        print(f"{m:<8}{100 * acc:>9.1f}%{last_loss:>17.3f}{steps:>8}{seconds:>10.1f}{queries[m]:>14}")
    return 0
