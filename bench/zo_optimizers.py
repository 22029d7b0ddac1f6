"""zokernels.optim on one task at equal forward budgets: a full-parameter MLP (64-32-10, tanh, 2410 parameters) on
scikit-learn's digits (embedded in scikit-learn, offline; fixed 1437/360 train/test split), minibatches of 256.

1. Tuning: for every method, each learning rate of its grid (HiZOO: × smoothing α) is run once (seed 100) on a
   train/validation split of the training set (1150/287) at the full budget; the grid point with the best mean
   validation accuracy over the last 3 evaluation points is kept.
2. Runs: every method with its tuned hyperparameters, seeds 0, 1, 2 (model init, batches, Philox seed), test accuracy
   every `--eval-every` forwards (closure calls; evaluations are not counted).
   CSV bench/results/zo_optimizers.csv: task,method,seed,forwards,test_acc (one row per evaluation point).
3. Summary: final test accuracy (mean ± std over seeds) and the forwards at which each method's seed-mean curve first
   reaches MeZO's final seed-mean accuracy (ratio = MeZO's budget / those forwards; ≥ 3 is the issue's goal).
4. Memory: one step of every method on a wider MLP (512-512-512-512-512-10, fp32, 1.05 M parameters): peak
   allocations during the step (torch.profiler CPU memory events, prefix sums of allocations and frees) plus the
   optimizer state already held, minus the peak of one closure call (inference); vs the stated formula
   (optimizer.memory_formula()). CSV bench/results/zo_optimizers_memory.csv.
Plot: docs/zo_optimizers.png.

    OMP_NUM_THREADS=1 .venv/bin/python bench/zo_optimizers.py [--budget 15000] [--eval-every 500] [--quick]
    .venv/bin/python bench/zo_optimizers.py --from-csv      # summary and plot from the CSV, no training
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import zokernels.optim as zo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MU = 1e-3

# method -> (factory(groups, lr, extra, seed), lr grid, extra grid). Forwards per step in the comment.
METHODS = {
    "mezo": (lambda g, lr, x, s: zo.ZOSGD(g, lr=lr, mu=MU, seed=s), [0.01, 0.02, 0.04], [None]),  # 2
    "zosgd_forward_q4": (lambda g, lr, x, s: zo.ZOSGD(g, lr=lr, mu=MU, q=4, estimator="forward", seed=s),
                         [0.03, 0.06, 0.12], [None]),  # 5
    "zosgd_momentum": (lambda g, lr, x, s: zo.ZOSGD(g, lr=lr, mu=MU, momentum=0.9, seed=s),
                       [0.001, 0.002, 0.004], [None]),  # 2
    "zosgd_momentum_replay": (lambda g, lr, x, s: zo.ZOSGD(g, lr=lr, mu=MU, momentum=0.9, momentum_buffer="replay",
                                                           replay_window=32, seed=s),
                              [0.001, 0.002, 0.004], [None]),  # 2
    "zoadam": (lambda g, lr, x, s: zo.ZOAdam(g, lr=lr, mu=MU, seed=s), [0.001, 0.003, 0.01], [None]),  # 2
    "zosign": (lambda g, lr, x, s: zo.ZOSignSGD(g, lr=lr, mu=MU, seed=s), [0.002, 0.004, 0.008], [None]),  # 2
    "zoconservative": (lambda g, lr, x, s: zo.ZOConservative(g, lr=lr, mu=MU, estimator="forward", seed=s),
                       [0.01, 0.02, 0.04], [None]),  # 3
    "fzoo": (lambda g, lr, x, s: zo.FZOO(g, lr=lr, mu=MU, n=8, seed=s), [0.01, 0.02, 0.04], [None]),  # 9
    "hizoo": (lambda g, lr, x, s: zo.HiZOO(g, lr=lr, mu=MU, hessian_smoothing=x, seed=s), [0.015, 0.03, 0.06],
              [1e-6, 1e-4]),  # 3
    "lezo": (lambda g, lr, x, s: zo.LeZO(g, lr=lr, layers_per_step=1, mu=MU, seed=s), [0.015, 0.03, 0.06],
             [None]),  # 2 (one of the two Linear layers per step)
}


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1437], perm[1437:]


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def train(method: str, lr: float, extra, seed: int, x, y, train_idx, eval_idx, budget: int, eval_every: int,
          batch: int = 256) -> list[tuple[int, float]]:
    """[(forwards, accuracy on eval_idx)] at 0 and whenever the forward count crosses a multiple of eval_every."""
    model = mlp(seed)
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    opt = METHODS[method][0](groups, lr, extra, seed)
    batches = torch.Generator().manual_seed(1000 + seed)

    def accuracy() -> float:
        with torch.no_grad():
            return (model(x[eval_idx]).argmax(1) == y[eval_idx]).float().mean().item()

    curve, used, next_eval = [(0, accuracy())], 0, eval_every
    while used < budget:
        idx = train_idx[torch.randint(0, len(train_idx), (batch,), generator=batches)]
        xb, yb = x[idx], y[idx]
        opt.step(lambda: F.cross_entropy(model(xb), yb))
        used += opt.last_step.forwards
        if used >= next_eval or used >= budget:
            curve.append((used, accuracy()))
            while next_eval <= used:
                next_eval += eval_every
    return curve


def tune(x, y, train_idx, budget, eval_every, methods) -> dict[str, tuple[float, object]]:
    g = torch.Generator().manual_seed(100)
    perm = train_idx[torch.randperm(len(train_idx), generator=g)]
    fit, val = perm[:1150], perm[1150:]
    chosen = {}
    for method in methods:
        _, lrs, extras = METHODS[method]
        scores = {}
        for extra in extras:
            for lr in lrs:
                start = time.time()
                curve = train(method, lr, extra, 100, x, y, fit, val, budget, eval_every)
                scores[(lr, extra)] = statistics.mean(a for _, a in curve[-3:])
                print(f"  tune {method:22s} lr={lr:<7g} extra={extra!s:6s} val_acc(last 3)={scores[(lr, extra)]:.4f}"
                      f"  {time.time() - start:5.1f}s", flush=True)
        chosen[method] = max(scores, key=scores.get)
        print(f"tuned {method}: lr={chosen[method][0]} extra={chosen[method][1]}", flush=True)
    return chosen


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    for forwards, acc in curve:
        if acc >= target - 1e-12:
            return forwards
    return None


def mean_curve(rows: list[dict], method: str, seeds: list[int]) -> list[tuple[int, float]]:
    """Seed-mean accuracy per evaluation index (the seeds' forwards at an index differ by < one step; the max)."""
    per_seed = [[(int(r["forwards"]), float(r["test_acc"])) for r in rows if r["method"] == method
                 and int(r["seed"]) == s] for s in seeds]
    n = min(len(c) for c in per_seed)
    return [(max(c[k][0] for c in per_seed), statistics.mean(c[k][1] for c in per_seed)) for k in range(n)]


# ---- memory ------------------------------------------------------------------------------------------------------
def profiled_peak(fn) -> int:
    """Peak of allocated minus freed CPU bytes during fn(): prefix sums over the profiler's raw '[memory]' events
    (one per allocation or free, with its time; the per-op totals of prof.events() date frees to their op's start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def memory_table() -> list[dict]:
    torch.manual_seed(0)
    widths = [512, 512, 512, 512, 512]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(512, 10))
    x, yb = torch.randn(64, 512), torch.randint(0, 10, (64,))
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)

    def closure():
        return F.cross_entropy(model(x), yb)

    with torch.no_grad():
        inference = max(profiled_peak(closure) for _ in range(2))
    rows = []
    for method in METHODS:
        make = METHODS[method][0]
        extra = 1e-6 if method == "hizoo" else None
        groups = [{"params": [model[k].weight, model[k].bias]} for k in range(0, len(model), 2)]  # fresh dicts
        opt = make(groups, 1e-4, extra, 0)
        opt.step(closure)  # warm-up: lazily created state (Adam moments, momentum buffers) exists
        held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
        step_peak = max(profiled_peak(lambda: opt.step(closure)) for _ in range(2))
        formula = opt.memory_formula()
        measured = held + step_peak - inference
        rows.append({"method": method, "params": numel, "dtype": "float32",
                     "bytes_per_param_measured": round(measured / numel, 3),
                     "bytes_per_param_formula": round((formula["restore_copy"] + formula["state"]) / numel, 3),
                     "measured_extra_bytes": measured, "restore_copy_bytes": formula["restore_copy"],
                     "state_bytes": formula["state"], "rng_state_bytes": formula["rng"],
                     "transient_bound_bytes": formula["transient_bound"],
                     "formula_total_bound_bytes": formula["total_bound"], "inference_peak_bytes": inference,
                     "within_bound": measured <= formula["total_bound"]})
        print(f"  memory {method:22s} measured {measured / numel:6.2f} B/param, formula (copy + state) "
              f"{(formula['restore_copy'] + formula['state']) / numel:5.2f} B/param, bound with transients "
              f"{formula['total_bound'] / numel:6.2f}", flush=True)
    return rows


def plot(rows: list[dict], methods: list[str], seeds: list[int], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for method in methods:
        curve = mean_curve(rows, method, seeds)
        per_seed = [[float(r["test_acc"]) for r in rows if r["method"] == method and int(r["seed"]) == s]
                    for s in seeds]
        n = len(curve)
        lo = [min(c[k] for c in per_seed) for k in range(n)]
        hi = [max(c[k] for c in per_seed) for k in range(n)]
        xs = [f for f, _ in curve]
        line, = ax.plot(xs, [a for _, a in curve], label=method, lw=2 if method == "mezo" else 1.2,
                        color="black" if method == "mezo" else None)
        ax.fill_between(xs, lo, hi, alpha=0.12, color=line.get_color())
    ax.axhline(target, ls="--", color="gray", lw=1, label=f"MeZO final ({target:.3f})")
    ax.set_xlabel("forward passes (closure calls)")
    ax.set_ylabel("test accuracy (mean of seeds; band: min–max)")
    ax.set_title("digits, full-parameter MLP 64-32-10: zokernels.optim at equal forward budgets")
    ax.set_ylim(0.5, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=15000, help="forward passes per run")
    parser.add_argument("--eval-every", type=int, default=500, help="test accuracy every this many forwards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--lrs", default=None, help="JSON {method: [lr, extra]}: skip tuning and use these")
    parser.add_argument("--quick", action="store_true", help="smoke run: budget 600, one seed, no memory table, "
                        "outputs under /tmp")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--from-csv", action="store_true", help="no training: summary and plot from the existing "
                        "bench/results/zo_optimizers.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out_csv, out_png, out_mem = RESULTS / "zo_optimizers.csv", ROOT / "docs" / "zo_optimizers.png", \
        RESULTS / "zo_optimizers_memory.csv"
    if args.quick:
        args.budget, args.eval_every, args.seeds = 600, 200, [0]
        out_csv, out_png, out_mem = (Path("/tmp") / p.name for p in (out_csv, out_png, out_mem))
    x, y, train_idx, test_idx = digits()
    start = time.time()
    if args.from_csv:
        rows = list(csv.DictReader(open(out_csv, newline="")))
        for r in rows:
            r["seed"] = int(r["seed"])
        args.methods = list(dict.fromkeys(r["method"] for r in rows))
        chosen = {m: ("?", None) for m in args.methods}
        args.no_memory = True
    elif args.lrs:
        chosen = {m: (v[0], v[1]) for m, v in json.loads(args.lrs).items()}
    else:
        chosen = tune(x, y, train_idx, args.budget, args.eval_every, args.methods)
    if not args.from_csv:
        print("chosen:", json.dumps({m: list(v) for m, v in chosen.items()}), flush=True)
        rows = []
        for method in args.methods:
            lr, extra = chosen[method]
            for seed in args.seeds:
                t0 = time.time()
                curve = train(method, lr, extra, seed, x, y, train_idx, test_idx, args.budget, args.eval_every)
                rows += [{"task": "digits_mlp", "method": method, "seed": seed, "forwards": f,
                          "test_acc": round(a, 4)} for f, a in curve]
                print(f"  run {method:22s} seed {seed}: final test acc {curve[-1][1]:.4f}  {time.time() - t0:5.1f}s",
                      flush=True)
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(out_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["task", "method", "seed", "forwards", "test_acc"])
            writer.writeheader()
            writer.writerows(rows)

    methods = args.methods
    finals = {m: [float([r for r in rows if r["method"] == m and r["seed"] == s][-1]["test_acc"]) for s in args.seeds]
              for m in methods}
    base = "mezo" if "mezo" in methods else methods[0]
    target = statistics.mean(finals[base])
    base_budget = mean_curve(rows, base, args.seeds)[-1][0]
    print(f"\nfinal test accuracy (mean ± std over seeds {args.seeds}); forwards at which the seed-mean curve first "
          f"reaches {base}'s final mean {target:.4f}")
    for m in methods:
        reach = first_reaching(mean_curve(rows, m, args.seeds), target)
        sd = statistics.pstdev(finals[m]) if len(finals[m]) > 1 else 0.0
        ratio = f"{base_budget / reach:5.2f}x fewer" if reach else "never"
        print(f"  {m:22s} lr={chosen[m][0]!s:<7} {statistics.mean(finals[m]):.4f} ± {sd:.4f}   reaches at "
              f"{reach if reach else '-':>6} forwards ({ratio})")
    thresholds = (0.80, 0.90, 0.93, 0.95)
    print("\nforwards at which the seed-mean curve first reaches a test accuracy (-: not within the budget)")
    print(f"  {'method':22s} " + " ".join(f"{t:>7.2f}" for t in thresholds))
    for m in methods:
        curve = mean_curve(rows, m, args.seeds)
        print(f"  {m:22s} " + " ".join(f"{first_reaching(curve, t) or '-':>7}" for t in thresholds))
    plot(rows, methods, args.seeds, target, out_png)
    print(f"wrote {out_csv} and {out_png} in {time.time() - start:.0f}s")
    if not (args.quick or args.no_memory):
        mem = memory_table()
        with open(out_mem, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(mem[0]))
            writer.writeheader()
            writer.writerows(mem)
        print(f"wrote {out_mem}")


if __name__ == "__main__":
    sys.exit(main())
