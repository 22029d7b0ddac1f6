"""Where does MeZO-SVRG (zokernels.optim.ZOSVRG) beat MeZO (ZOSGD, central, q = 1) at equal forward passes?

Issue 14's regime study. Both methods run on the task builders of bench/zo_optimizers.py (imported, not copied):

- digits_mlp: the 64-32-10 tanh MLP on scikit-learn digits; `params` full (2 410) or head (the last Linear, 330);
  minibatch `batch` examples; the anchor ("full batch") is the first `anchor` training examples, in chunks of
  `batch` examples, one forward each (a forward = one closure call on `batch` examples, the same unit for both
  methods, so a 1 437-example anchor at batch 16 costs 90 forwards per query).
- tweets_minilm: all-MiniLM-L6-v2 (mean pooling, fresh head), biases + LayerNorms + head (31 490 parameters),
  batch 8 × 32 tokens, 512 training tweets, 256 held-out test tweets here (zo_optimizers uses 128).

A configuration fixes method, q (directions per step), P (anchor period, the paper's q), anchor size, batch,
η2 (`lr`) and η1 (`lr_anchor`), and the schedule:
- const: constant learning rates (MeZO's usual setting);
- plateau: the paper's annealing on loss plateaus, done here as a schedule outside the optimizer (its update rule
  is unchanged): the step losses (StepInfo.loss: the minibatch loss at θ, or the anchor loss on anchor steps) are
  averaged over windows of `budget / 30` forwards; when a window's mean is not 1 % below the best window so far
  for 2 windows in a row, every group's lr and lr_anchor are halved;
- plateau12: the same with windows of `budget / 12` and any improvement counting (noisy batch-8 tweets losses).
The evaluation (test accuracy, training loss) is not charged to the budget.

Protocol (digits): for every configuration, each grid point (η2 × η1) is run once with seed 100 on a train /
validation split of the training set (1 150 / 287) at the full budget; the point with the best mean validation
accuracy over the last 3 evaluations is kept; then seeds 0, 1, 2 on the test split. Tweets: no tuning (too
expensive here), the settings are given on the command line (--tweets-configs), seeds 0, 1, 2. --reuse-tuning
--tag T runs digits configurations with their tuned rates at another budget, stored as config@T.
CSV bench/results/svrg_regime.csv: task,method,config,seed,forwards,test_acc,train_loss (a run replaces the rows of
the (task, config, seed) triples it ran); bench/results/svrg_regime_tuning.csv: the grid. Plot docs/svrg_regime.png.

    OMP_NUM_THREADS=1 .venv/bin/python bench/svrg_regime.py --task digits_mlp [--configs NAME ...] [--budget N]
    OMP_NUM_THREADS=1 .venv/bin/python bench/svrg_regime.py --task tweets_minilm --budget 6000 --seeds 0
    .venv/bin/python bench/svrg_regime.py --from-csv          # tables and plot only
    OMP_NUM_THREADS=1 .venv/bin/python bench/svrg_regime.py --noise-share    # R = minibatch-noise share (digits)
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zo_optimizers as zob  # noqa: E402

import zokernels.optim as zo  # noqa: E402

RESULTS = zob.RESULTS
OUT_CSV, TUNE_CSV = RESULTS / "svrg_regime.csv", RESULTS / "svrg_regime_tuning.csv"
OUT_PNG = zob.ROOT / "docs" / "svrg_regime.png"
FIELDS = ["task", "method", "config", "seed", "forwards", "test_acc", "train_loss"]


def cfg(method, params="full", batch=256, q=1, period=1, anchor=0, lrs=(0.02,), lr_anchors=(None,),
        schedule="plateau"):
    return {"method": method, "params": params, "batch": batch, "q": q, "period": period, "anchor": anchor,
            "lrs": list(lrs), "lr_anchors": list(lr_anchors), "schedule": schedule}


# digits configurations: name -> settings and the (η2 × η1) grid tuned on the validation split
MEZO_LRS = (0.01, 0.02, 0.04)
# η2 from the paper's ratio (η2 ≪ η1: minibatch steps barely move, SVRG ≈ large-batch MeZO) up to MeZO's lr / 4
SVRG_LRS, SVRG_ANCHOR_LRS = (0.0002, 0.002, 0.005), (0.01, 0.02, 0.04)
DIGITS = {
    # large minibatch (256 of 1 437), full-parameter: the zo_optimizers setting; anchor = the whole training split
    "full_b256_mezo_const": cfg("mezo", lrs=MEZO_LRS, schedule="const"),
    "full_b256_mezo": cfg("mezo", lrs=MEZO_LRS),
    "full_b256_svrg_q1_P4_A1437": cfg("svrg", period=4, anchor=1437, lrs=SVRG_LRS, lr_anchors=SVRG_ANCHOR_LRS),
    # second round: the first grid put η2 at its upper edge (0.005), so larger η2 (up to MeZO's lr and above)
    "full_b256_svrg_q1_P4_A1437_hi": cfg("svrg", period=4, anchor=1437, lrs=(0.01, 0.02, 0.04),
                                         lr_anchors=(0.02, 0.04)),
    "full_b256_svrg_q4_P2_A1437": cfg("svrg", q=4, period=2, anchor=1437, lrs=SVRG_LRS,
                                      lr_anchors=SVRG_ANCHOR_LRS),
    # small minibatch (16): minibatch noise large, the case variance reduction is for
    "full_b16_mezo": cfg("mezo", batch=16, lrs=(0.0025, 0.005, 0.01)),  # 0.01 won a first grid 0.01-0.04
    "full_b16_svrg_q1_P10_A256": cfg("svrg", batch=16, period=10, anchor=256, lrs=SVRG_LRS,
                                     lr_anchors=SVRG_ANCHOR_LRS),
    "full_b16_svrg_q1_P50_A1437": cfg("svrg", batch=16, period=50, anchor=1437, lrs=SVRG_LRS,
                                      lr_anchors=SVRG_ANCHOR_LRS),
    # partial: the head only (330 parameters): small d, so the direction noise is small
    "head_b16_mezo": cfg("mezo", params="head", batch=16, lrs=(0.02, 0.05, 0.1)),
    "head_b16_svrg_q1_P10_A256": cfg("svrg", params="head", batch=16, period=10, anchor=256,
                                     lrs=(0.0005, 0.005, 0.02), lr_anchors=(0.02, 0.05, 0.1)),
    "head_b16_svrg_q1_P10_A256_hi": cfg("svrg", params="head", batch=16, period=10, anchor=256, lrs=(0.05, 0.1),
                                        lr_anchors=(0.05, 0.1)),  # second round: η2 = 0.02 was the grid edge
}


class Tweets(zob.TweetsTask):
    n_test = 256  # standard error of a test accuracy ≈ 0.031 (zo_optimizers: 128)


class Digits(zob.DigitsTask):
    pass


def configure(task, config: dict) -> None:
    """Per-configuration minibatch, anchor chunking (one forward per `batch` examples) and anchor size."""
    task.batch = task.chunk = config["batch"]
    task.anchor_size = config["anchor"] or task.batch


def groups(task, model, params: str) -> list[dict]:
    if params == "head":
        if not isinstance(task, zob.DigitsTask):
            raise ValueError("params='head' is defined for digits_mlp only")
        return [{"params": list(model[2].parameters())}]
    return task.groups(model)


def make_optimizer(task, model, config, lr, lr_anchor, seed, train_idx):
    g = groups(task, model, config["params"])
    if config["method"] == "mezo":
        return zo.ZOSGD(g, lr=lr, mu=zob.MU, q=config["q"], seed=seed)
    return zo.ZOSVRG(g, lr=lr, full_batch=zob.full_batch(task, model, train_idx), mu=zob.MU, q=config["q"],
                     anchor_every=config["period"], lr_anchor=lr_anchor, seed=seed)


# schedule -> (windows per budget, relative improvement that counts; None: constant lr). plateau12 is for noisy
# minibatch losses (tweets, batch 8): with 30 windows and 1 % the mean of ~200 batch-8 losses misses the best window
# by chance once the loss flattens, and MeZO's lr was halved 14 times in 12 000 forwards (a first tweets run).
SCHEDULES = {"const": (None, 0.0), "plateau": (30, 0.01), "plateau12": (12, 0.0)}


class Plateau:
    """Halve every group's lr and lr_anchor when the windowed mean step loss stops improving by 1 % (2 windows)."""

    def __init__(self, opt, window: int, patience: int = 2, threshold: float = 0.01, factor: float = 0.5):
        self.opt, self.window, self.patience, self.threshold, self.factor = opt, window, patience, threshold, factor
        self.losses, self.best, self.bad, self.next, self.cuts = [], float("inf"), 0, window, 0

    def after_step(self, loss: float, used: int) -> None:
        self.losses.append(loss)
        if used < self.next:
            return
        self.next += self.window
        mean, self.losses = statistics.mean(self.losses), []
        if mean < self.best * (1 - self.threshold):
            self.best, self.bad = mean, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.bad, self.cuts = 0, self.cuts + 1
            for group in self.opt.param_groups:
                group["lr"] *= self.factor
                if "lr_anchor" in group:
                    group["lr_anchor"] *= self.factor


def train_loss(task, model, idx) -> float:
    with torch.no_grad():
        return sum(task.loss(model, c, "sum").item() for c in torch.split(idx, 64)) / len(idx)


def train(task, config, lr, lr_anchor, seed, train_idx, eval_idx, budget, eval_every, loss_idx, verbose=False):
    """([(forwards, accuracy on eval_idx, mean loss on loss_idx)] at 0 and at each multiple of eval_every, number
    of plateau cuts)."""
    configure(task, config)
    model = task.model(seed)
    opt = make_optimizer(task, model, config, lr, lr_anchor, seed, train_idx)
    windows, threshold = SCHEDULES[config["schedule"]]
    sched = Plateau(opt, max(1, budget // windows), threshold=threshold) if windows else None
    batches = torch.Generator().manual_seed(1000 + seed)

    def point(used):
        return used, task.accuracy(model, eval_idx), train_loss(task, model, loss_idx)

    curve, used, next_eval = [point(0)], 0, eval_every
    while used < budget:
        idx = train_idx[torch.randint(0, len(train_idx), (task.batch,), generator=batches)]
        loss = opt.step(lambda: task.loss(model, idx))
        used += opt.last_step.forwards
        if not torch.isfinite(torch.tensor(loss)):
            curve.append((used, float("nan"), float("nan")))
            break
        if sched:
            sched.after_step(loss, used)
        if used >= next_eval or used >= budget:
            curve.append(point(used))
            if verbose:
                print(f"    {used} fwd: test acc {curve[-1][1]:.4f}, train loss {curve[-1][2]:.4f}, "
                      f"lr {opt.param_groups[0]['lr']:.3g}", flush=True)
            while next_eval <= used:
                next_eval += eval_every
    return curve, sched.cuts if sched else 0


def tune(task, name, config, budget, eval_every):
    g = torch.Generator().manual_seed(100)
    perm = task.train_idx[torch.randperm(len(task.train_idx), generator=g)]
    fit, val = perm[:1150], perm[1150:]
    scores, rows = {}, []
    for la in config["lr_anchors"]:
        for lr in config["lrs"]:
            t0 = time.time()
            curve, _ = train(task, config, lr, la, 100, fit, val, budget, eval_every, fit)
            accs = [a for _, a, _ in curve[-3:]]
            score = statistics.mean(accs) if all(a == a for a in accs) else 0.0
            scores[(lr, la)] = score
            rows.append({"task": task.name, "config": name, "lr": lr, "lr_anchor": la, "val_acc_last3": round(score, 4),
                         "seconds": round(time.time() - t0, 1)})
            print(f"  tune {name:30s} lr={lr:<6g} lr_anchor={la!s:6s} val(last 3)={score:.4f} "
                  f"{time.time() - t0:5.1f}s", flush=True)
    best = max(scores, key=scores.get)
    print(f"tuned {name}: lr={best[0]} lr_anchor={best[1]}", flush=True)
    return best, rows


def tuned(name: str) -> tuple[float, float | None]:
    """The best grid point of `name` in the tuning CSV."""
    rows = [r for r in csv.DictReader(open(TUNE_CSV, newline="")) if r["config"] == name]
    if not rows:
        raise ValueError(f"--reuse-tuning: no tuning rows for {name} in {TUNE_CSV}")
    best = max(rows, key=lambda r: float(r["val_acc_last3"]))
    return float(best["lr"]), float(best["lr_anchor"]) if best["lr_anchor"] else None


def merge_write(path: Path, new: list[dict], key: tuple[str, ...], fields: list[str]) -> list[dict]:
    old = list(csv.DictReader(open(path, newline=""))) if path.exists() else []
    rerun = {tuple(str(r[k]) for k in key) for r in new}
    rows = [r for r in old if tuple(r[k] for k in key) not in rerun] + new
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def curves(rows, task, config):
    """{seed: [(forwards, acc, loss)]} for one (task, config)."""
    out: dict[int, list] = {}
    for r in rows:
        if r["task"] == task and r["config"] == config:
            out.setdefault(int(r["seed"]), []).append((int(r["forwards"]), float(r["test_acc"]),
                                                      float(r["train_loss"])))
    return out


def at_budget(curve, budget):
    """The evaluation at `budget` forwards: the first one at or past it, if within 200 forwards (evaluations happen
    at the first step that crosses a multiple of eval_every, so SVRG's can land up to one anchor step late)."""
    pts = [p for p in curve if budget <= p[0] < budget + 200]
    return pts[0] if pts else None


def report(rows, task, budgets):
    """Per SVRG configuration vs the MeZO configuration of the same params/batch: test accuracy at each budget,
    mean ± std over seeds, and the paired difference (same seed) with its std."""
    configs = list(dict.fromkeys(r["config"] for r in rows if r["task"] == task))
    print(f"\n[{task}] test accuracy at equal forwards: mean ± std over seeds; Δ = SVRG − MeZO paired by seed")
    for name in configs:
        cs = curves(rows, task, name)
        line = []
        for b in budgets:
            vals = [at_budget(c, b)[1] for c in cs.values() if at_budget(c, b)]
            if vals:
                line.append(f"{b}: {statistics.mean(vals):.3f}±{statistics.pstdev(vals):.3f}")
        print(f"  {name:34s} seeds {sorted(cs)}  " + "  ".join(line))
    for col, metric in ((1, "test accuracy"), (2, "training loss (lower is better; ahead = lower)")):
        print(f"\n[{task}] Δ {metric}: SVRG − MeZO of the same parameters, batch and tag, paired by seed: "
              "mean ± std, seeds with SVRG ahead; verdict per budget: wins / loses when every seed agrees, else ties")
        print("| SVRG configuration | " + " | ".join(f"{b:,} forwards" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for name in configs:
            head, svrg, rest = name.partition("svrg")
            base = head + "mezo" + (rest[rest.index("@"):] if "@" in rest else "")
            if not svrg or base not in configs:
                continue
            s, m = curves(rows, task, name), curves(rows, task, base)
            sign = 1 if col == 1 else -1
            cells = []
            for b in budgets:
                d = [at_budget(s[k], b)[col] - at_budget(m[k], b)[col] for k in sorted(set(s) & set(m))
                     if at_budget(s[k], b) and at_budget(m[k], b)]
                ahead, behind = sum(sign * x > 0 for x in d), sum(sign * x < 0 for x in d)
                verdict = "wins" if ahead == len(d) else "loses" if behind == len(d) else "ties"
                cells.append(f"{statistics.mean(d):+.3f} ± {statistics.pstdev(d):.3f} ({ahead}/{len(d)}, {verdict})"
                             if d else "–")
            print(f"| {name} | " + " | ".join(cells) + " |")


def panel_of(config: str) -> str:
    """Digits plot panel: parameters_batch, plus the tag of tagged runs (full_b256, full_b256@120k)."""
    parts = config.split("_")
    return parts[0] + "_" + parts[1] + (config[config.index("@"):] if "@" in config else "")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["task"], panel_of(r["config"])) if r["task"] == "digits_mlp"
                                else (r["task"], "bias_norm_head") for r in rows))
    panels.sort(key=lambda p: (p[0] != "digits_mlp", "@" in p[1]))  # digits, digits long runs, then tweets
    cols = min(len(panels), 2 if len(panels) == 4 else 3)
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (task, prefix) in zip(axes.flat, panels):
        names = [c for c in dict.fromkeys(r["config"] for r in rows if r["task"] == task)
                 if task != "digits_mlp" or panel_of(c) == prefix]
        for name in names:
            cs = list(curves(rows, task, name).values())
            n = min(len(c) for c in cs)
            xs = [max(c[k][0] for c in cs) for k in range(n)]
            mean = [statistics.mean(c[k][1] for c in cs) for k in range(n)]
            sd = [statistics.pstdev([c[k][1] for c in cs]) for k in range(n)]
            mezo = "mezo" in name
            line, = ax.plot(xs, mean, label=name.replace(prefix.split("@")[0] + "_", ""), lw=2 if mezo else 1.3,
                            ls="--" if name.endswith("const") or (task != "digits_mlp" and "@" in name) else "-",
                            color="black" if mezo else None)
            ax.fill_between(xs, [a - s for a, s in zip(mean, sd)], [a + s for a, s in zip(mean, sd)], alpha=0.15,
                            color=line.get_color())
        ax.set_title(f"{task}: {prefix}")
        ax.set_xlabel("forward passes")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_ylim(*((0.1, 1.0) if task == "digits_mlp" else (0.45, 0.85)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("MeZO vs MeZO-SVRG at equal forward passes")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)


def noise_share(n_batches: int = 200) -> None:
    """How much of a minibatch gradient is minibatch noise on digits (exact gradients by backprop): R =
    E_B‖∇f_B − ∇f‖² / ‖∇f‖² over `n_batches` minibatches, full-parameter and head, batch 16 and 256, at the seed-0
    init and after 300 full-batch gradient steps (lr 0.5). SVRG's control variate can remove at most this part."""
    task = Digits()
    idx = task.train_idx

    def grad(model, params, batch):
        model.zero_grad()
        task.loss(model, batch).backward()
        return torch.cat([p.grad.flatten() for p in params]).clone()

    for stage in ("init", "after 300 gradient steps"):
        model = task.model(0)
        if stage != "init":
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            for _ in range(300):
                opt.zero_grad()
                task.loss(model, idx).backward()
                opt.step()
        for name, params in (("full", list(model.parameters())), ("head", list(model[2].parameters()))):
            full = grad(model, params, idx)
            for b in (16, 256):
                gen = torch.Generator().manual_seed(0)
                dev = [(grad(model, params, idx[torch.randint(0, len(idx), (b,), generator=gen)]) - full).square()
                       .sum().item() for _ in range(n_batches)]
                print(f"  {stage:25s} {name} d={full.numel():5d} batch {b:3d}: "
                      f"R = {sum(dev) / len(dev) / full.square().sum().item():8.3f}", flush=True)


def parse_tweets_config(text: str) -> tuple[str, dict, float, float | None]:
    """'name:method:q:period:anchor:lr:lr_anchor:schedule' (lr_anchor '-' for MeZO)."""
    name, method, q, period, anchor, lr, la, schedule = text.split(":")
    config = cfg(method, batch=8, q=int(q), period=int(period), anchor=int(anchor), schedule=schedule)
    return name, config, float(lr), None if la == "-" else float(la)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["digits_mlp", "tweets_minilm"], default="digits_mlp")
    parser.add_argument("--configs", nargs="+", default=list(DIGITS), help="digits configurations to run")
    parser.add_argument("--tweets-configs", nargs="+", default=[
        "mezo:mezo:1:1:0:1e-3:-:plateau12", "svrg_q1_P4_A64:svrg:1:4:64:2.5e-4:1e-3:plateau12"],
        help="name:method:q:period:anchor:lr:lr_anchor:schedule")
    parser.add_argument("--budget", type=int, default=None, help="forwards per run (digits 24000, tweets 6000)")
    parser.add_argument("--eval-every", type=int, default=None, help="digits 1000, tweets 1000")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reuse-tuning", action="store_true", help="digits: take each configuration's learning "
                        "rates from bench/results/svrg_regime_tuning.csv instead of tuning")
    parser.add_argument("--tag", default="", help="stored as config@tag (e.g. a longer budget with reused rates)")
    parser.add_argument("--noise-share", action="store_true",
                        help="only print the minibatch-noise share R on digits")
    parser.add_argument("--from-csv", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    if args.noise_share:
        return noise_share()
    if not args.from_csv:
        if args.task == "digits_mlp":
            budget, every = args.budget or 24000, args.eval_every or 1000
            task = Digits()
            todo = []
            for name in args.configs:
                if args.reuse_tuning:
                    lr, la = tuned(name)
                else:
                    (lr, la), tune_rows = tune(task, name, DIGITS[name], budget, every)
                    merge_write(TUNE_CSV, tune_rows, ("task", "config"), list(tune_rows[0]))
                todo.append((name + (f"@{args.tag}" if args.tag else ""), DIGITS[name], lr, la))
        else:
            budget, every = args.budget or 6000, args.eval_every or 1000
            task = Tweets()
            todo = [parse_tweets_config(t) for t in args.tweets_configs]
        loss_idx = task.train_idx if args.task == "digits_mlp" else task.train_idx[:128]
        for name, config, lr, la in todo:
            new = []
            for seed in args.seeds:
                t0, c0 = time.time(), time.process_time()
                curve, cuts = train(task, config, lr, la, seed, task.train_idx, task.test_idx, budget, every,
                                    loss_idx, verbose=args.task == "tweets_minilm")
                new += [{"task": args.task, "method": config["method"], "config": name, "seed": seed, "forwards": f,
                         "test_acc": round(a, 4), "train_loss": round(lo, 4)} for f, a, lo in curve]
                print(f"  run {name:30s} lr={lr} lr_anchor={la} seed {seed}: test {curve[-1][1]:.4f} at "
                      f"{curve[-1][0]} fwd, {cuts} lr halvings  wall {time.time() - t0:.0f}s "
                      f"cpu {time.process_time() - c0:.0f}s", flush=True)
            merge_write(OUT_CSV, new, ("task", "config", "seed"), FIELDS)
    rows = list(csv.DictReader(open(OUT_CSV, newline="")))
    for task in dict.fromkeys(r["task"] for r in rows):
        report(rows, task, [1000, 3000, 6000, 12000, 24000, 48000, 96000] if task == "digits_mlp" else
               [1000, 2000, 3000, 4000, 6000, 12000])
    plot(rows, OUT_PNG)
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
