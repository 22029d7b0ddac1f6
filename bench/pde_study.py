"""The PDE error-correction study (issue 17): SRC / NON / ZO-SOL / FO-SOL over seeds, per test trajectory.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pde_study.py --preset study --seeds 0 1 2 3 4 [--steps 500]
    OMP_NUM_THREADS=1 .venv/bin/python bench/pde_study.py --preset default --methods non,fo-sol --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 .venv/bin/python bench/pde_study.py --preset study --gradient-check --seeds 0
    .venv/bin/python bench/pde_study.py --report            # tables from the CSVs, redraws docs/pde_study.png

Each (preset, seed) is one `zokernels train pde --preset P --seed S` (the app's own `train_and_evaluate`, so the
same data, initialization, windows and masks); its MAE per held-out trajectory goes to bench/results/pde_study.csv
and its MAE per rollout step (mean over trajectories) to pde_study_frames.csv. A (preset, method, seed) already in
the CSV is skipped on a rerun. Paired comparisons are per trajectory: every method is rolled out from the same 16
held-out initial conditions, so "NON − ZO-SOL" on one trajectory removes how hard that initial condition is.

--gradient-check measures why ZO-SOL trails: on training windows of that seed, at the NON-trained and the
FO-SOL-trained corrector (checkpoints of the study run), the float64 autograd gradient of the unrolled loss
through the torch twin of the solver against (a) float32 autograd through the twin (FO-SOL's own gradient),
(b) dense CGE through the black-box PhiFlow solver, (c) the Sparse-CGE estimate the training used (same density),
(d) the exact gradient restricted to that same sparse set. Rows go to pde_study_gradients.csv."""
from __future__ import annotations

import argparse
import copy
import csv
import math
import time
from pathlib import Path

import torch

from benchlib import RESULTS_DIR, append_csv_rows, run_metadata
from zokernels import stacked_cge_step
from zokernels.apps import pde
from zokernels.apps.pde_model import Corrector, rollout_loss_batched
from zokernels.apps.pde_solver import BurgersConfig, PhiFlowBurgers, burgers_step_torch
from zokernels.apps.pde_train import sample_windows
from zokernels.sparsity import density_masks

CSV, FRAMES_CSV, GRAD_CSV = "pde_study.csv", "pde_study_frames.csv", "pde_study_gradients.csv"
PLOT = Path(__file__).resolve().parent.parent / "docs" / "pde_study.png"
ORDER = ("src", "non", "zo-sol", "fo-sparse", "fo-sol")
COLORS = {"src": "C0", "non": "C1", "zo-sol": "C2", "fo-sparse": "C4", "fo-sol": "C3"}  # one colour per method


def setting_name(preset: str, steps: int | None) -> str:
    """The CSVs' `setting`: the preset, or 'preset-<N>steps' when --steps overrides the preset's step count."""
    return preset if steps is None else f"{preset}-{steps}steps"


def app_args(preset: str, steps: int | None, seed: int, methods: str, out_root: Path) -> argparse.Namespace:
    """The app's options of `zokernels train pde --preset P [--steps N] --seed S`, output under out_root/setting/seedS."""
    parser = argparse.ArgumentParser()
    pde.add_arguments(parser)
    out = out_root / setting_name(preset, steps) / f"seed{seed}"
    argv = ["--preset", preset, "--seed", str(seed), "--methods", methods, "--out", str(out)]
    return pde.apply_preset(parser.parse_args(argv + ([] if steps is None else ["--steps", str(steps)])))


def _read(name: str) -> list[dict]:
    path = RESULTS_DIR / name
    return list(csv.DictReader(open(path, newline=""))) if path.exists() else []


def run_seed(preset: str, steps: int | None, seed: int, methods: list[str], out_root: Path) -> None:
    setting = setting_name(preset, steps)
    done = {(r["setting"], r["method"], int(r["seed"])) for r in _read(CSV)}
    todo = [m for m in methods if (setting, m, seed) not in done]
    if not todo:
        print(f"{setting} seed {seed}: all of {methods} already in {CSV}; skipped")
        return
    args = app_args(preset, steps, seed, ",".join(todo), out_root)
    started = time.perf_counter()
    test, results, rollouts, cpu = pde.train_and_evaluate(args, todo)
    meta = run_metadata()
    rows, frame_rows = [], []
    for method in todo:
        common = {"setting": setting, "method": method, "seed": seed, "steps": args.steps, "hidden": args.hidden,
                  "frames": args.frames, "unroll": args.unroll, "batch_size": args.batch_size,
                  "density": args.density, "train_cpu_s": round(cpu[method], 1), **meta}
        rows += [{**common, "trajectory": t, "mae": f"{v:.6f}"} for t, v in enumerate(results[method].tolist())]
        per_frame = (rollouts[method] - test[:, 1:]).abs().mean(dim=(0, 2, 3, 4))
        frame_rows += [{"setting": setting, "method": method, "seed": seed, "frame": f + 1, "mae": f"{v:.6f}"}
                       for f, v in enumerate(per_frame.tolist())]
    append_csv_rows(CSV, rows)
    append_csv_rows(FRAMES_CSV, frame_rows)
    summary = ", ".join(f"{pde.LABELS[m]} {results[m].mean():.4f} ({cpu[m]:.0f} s CPU)" for m in todo)
    print(f"{setting} seed {seed}: {summary}; {time.perf_counter() - started:.0f} s wall", flush=True)


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def _by_seed(rows: list[dict], preset: str) -> dict[int, dict[str, list[float]]]:
    """{seed: {method: [MAE of trajectory 0, 1, ...]}} of one preset."""
    table: dict[int, dict[str, list[float]]] = {}
    for r in sorted(rows, key=lambda r: int(r["trajectory"])):
        if r["setting"] == preset:
            table.setdefault(int(r["seed"]), {}).setdefault(r["method"], []).append(float(r["mae"]))
    return table


def report(rows: list[dict]) -> None:
    """Markdown tables: mean MAE per seed, then paired differences per seed and over all (seed, trajectory)."""
    for preset in dict.fromkeys(r["setting"] for r in rows):
        table = _by_seed(rows, preset)
        methods = [m for m in ORDER if any(m in t for t in table.values())]
        print(f"\n### setting {preset}: mean MAE over the test trajectories\n")
        print("| seed | " + " | ".join(pde.LABELS[m] for m in methods) + " |")
        print("|---" * (len(methods) + 1) + "|")
        for seed, per in sorted(table.items()):
            print(f"| {seed} | " + " | ".join(f"{_mean_se(per[m])[0]:.4f}" if m in per else "" for m in methods)
                  + " |")
        means = {m: _mean_se([_mean_se(per[m])[0] for per in table.values() if m in per]) for m in methods}
        print("| mean ± s.e. (seeds) | " + " | ".join(f"{means[m][0]:.4f} ± {means[m][1]:.4f}" for m in methods)
              + " |")
        pairs = [(a, b) for a, b in (("non", "src"), ("fo-sol", "non"), ("zo-sol", "non"), ("zo-sol", "src"),
                                     ("zo-sol", "fo-sol"), ("zo-sol", "fo-sparse"), ("fo-sparse", "fo-sol"))
                 if a in methods and b in methods]
        print(f"\n### setting {preset}: paired MAE differences (B − A > 0: A better), per trajectory\n")
        print("| A vs B | " + " | ".join(f"seed {s}" for s in sorted(table)) + " | all pairs | A better on |")
        print("|---" * (len(table) + 3) + "|")
        for a, b in pairs:
            cells, pooled = [], []
            for seed, per in sorted(table.items()):
                if a in per and b in per:
                    diff = [y - x for x, y in zip(per[a], per[b])]
                    pooled += diff
                    mean, se = _mean_se(diff)
                    cells.append(f"{mean:+.4f} ± {se:.4f}")
                else:
                    cells.append("")
            mean, se = _mean_se(pooled)
            wins = sum(d > 0 for d in pooled)
            seed_means = [_mean_se([y - x for x, y in zip(per[a], per[b])])[0]
                          for per in table.values() if a in per and b in per]
            seed_mean, seed_se = _mean_se(seed_means)
            print(f"| {pde.LABELS[a]} vs {pde.LABELS[b]} | " + " | ".join(cells)
                  + f" | {mean:+.4f} ± {se:.4f} (seeds: ± {seed_se:.4f}) | {wins}/{len(pooled)} |")
        cpu = {m: _mean_se([float(r["train_cpu_s"]) for r in rows if r["setting"] == preset and r["method"] == m
                            and r["trajectory"] == "0"])[0] for m in methods if m != "src"}
        print("\ntraining CPU s per seed: " + ", ".join(f"{pde.LABELS[m]} {v:.0f}" for m, v in cpu.items()))


def plot(rows: list[dict], frame_rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["setting"] for r in rows))
    figure, axes = plt.subplots(len(presets), 2, figsize=(11, 3.8 * len(presets)), squeeze=False)
    for row, preset in enumerate(presets):
        table = _by_seed(rows, preset)
        methods = [m for m in ORDER if any(m in t for t in table.values())]
        curve_axis, seed_axis = axes[row]
        for m in methods:
            per_frame: dict[int, list[float]] = {}
            for r in frame_rows:
                if r["setting"] == preset and r["method"] == m:
                    per_frame.setdefault(int(r["frame"]), []).append(float(r["mae"]))
            frames = sorted(per_frame)
            curve_axis.plot(frames, [sum(per_frame[f]) / len(per_frame[f]) for f in frames], label=pde.LABELS[m],
                            color=COLORS[m])
            seeds = sorted(s for s, per in table.items() if m in per)
            seed_axis.plot(seeds, [_mean_se(table[s][m])[0] for s in seeds], "o-", label=pde.LABELS[m],
                           color=COLORS[m])
        curve_axis.set(xlabel="rollout step", ylabel="MAE (mean over seeds, trajectories)",
                       title=f"{preset}: error along the test rollout")
        seed_axis.set(xlabel="seed", ylabel="MAE (mean over 16 trajectories)", title=f"{preset}: per seed")
        seed_axis.set_xticks(sorted(table))
        for axis in (curve_axis, seed_axis):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().double() for p in model.parameters()])


def gradient_check(preset: str, steps: int | None, seed: int, out_root: Path, batches: int) -> None:
    args = app_args(preset, steps, seed, "non,fo-sol", out_root)
    config = BurgersConfig(coarse=args.coarse, refine=args.refine, substeps=args.refine, dt=args.dt,
                           viscosity=args.viscosity)
    train, _ = pde._make_data(args, config)
    solver = PhiFlowBurgers(config.coarse, config.dt, config.viscosity)
    generator = torch.Generator().manual_seed(1234 + seed)
    rows = []
    for point in ("non", "fo-sol"):
        checkpoint = Path(args.out) / f"corrector_{point}.pt"
        model = Corrector(hidden=args.hidden)
        model.load_state_dict(torch.load(checkpoint)["model"])
        for batch in range(batches):
            start, targets = sample_windows(train, args.batch_size, args.unroll, generator)
            mask = density_masks(model, args.density, generator)
            selected = torch.cat([mask[n].flatten() for n, _ in model.named_parameters()]).bool()

            def twin_grad(dtype: torch.dtype) -> torch.Tensor:
                m = copy.deepcopy(model).to(dtype)
                twin = lambda s: burgers_step_torch(s, config.dt, config.viscosity)  # noqa: E731
                stacked = [p.unsqueeze(0) for p in m.parameters()]
                loss = rollout_loss_batched(twin, stacked, start.to(dtype), targets.to(dtype))[0]
                return torch.cat([g.flatten().double() for g in torch.autograd.grad(loss, list(m.parameters()))])

            exact, fo32 = twin_grad(torch.float64), twin_grad(torch.float32)

            def cge(estimate_mask: dict | None) -> tuple[torch.Tensor, float]:
                m = copy.deepcopy(model)
                started = time.process_time()
                stacked_cge_step(m, lambda s: rollout_loss_batched(solver, s, start, targets), args.mu,
                                 estimate_mask, args.max_queries)
                return _flat_grad(m), time.process_time() - started

            dense, dense_s = cge(None)
            sparse, sparse_s = cge(mask)
            masked_exact = torch.where(selected, exact, torch.zeros_like(exact))
            norm = exact.norm().item()
            for name, estimate, seconds in (("fo32_twin", fo32, 0.0), ("dense_cge_phiflow", dense, dense_s),
                                            ("sparse_cge_phiflow", sparse, sparse_s),
                                            ("exact_on_sparse_set", masked_exact, 0.0)):
                on_set = (estimate[selected] - exact[selected]).norm().item() / exact[selected].norm().item()
                rows.append({"setting": setting_name(preset, steps), "seed": seed, "point": point, "batch": batch, "estimator": name,
                             "cosine_vs_fp64": f"{_cosine(estimate, exact):.6f}",
                             "rel_error_vs_fp64": f"{(estimate - exact).norm().item() / norm:.6f}",
                             "rel_error_on_sparse_set": f"{on_set:.6f}",
                             "coordinates": int(selected.sum()) if "sparse" in name else exact.numel(),
                             "cpu_s": round(seconds, 1)})
                print(f"{point} batch {batch} {name:20s} cosine {rows[-1]['cosine_vs_fp64']} "
                      f"rel.err {rows[-1]['rel_error_vs_fp64']} (on the sparse set {on_set:.4f})", flush=True)
    append_csv_rows(GRAD_CSV, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(pde.PRESETS), default="study")
    parser.add_argument("--methods", default="src,non,zo-sol,fo-sol")
    parser.add_argument("--steps", type=int, help="overrides the preset's optimizer steps (setting 'P-<N>steps')")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/pde_study", help="checkpoints and training logs per preset/seed")
    parser.add_argument("--gradient-check", action="store_true", help="gradient-estimate errors (see above)")
    parser.add_argument("--batches", type=int, default=2, help="training windows drawn per gradient check point")
    parser.add_argument("--report", action="store_true", help="only print the tables and redraw the plot")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.gradient_check:
        for seed in args.seeds:
            gradient_check(args.preset, args.steps, seed, Path(args.out), args.batches)
        return
    if not args.report:
        for seed in args.seeds:
            run_seed(args.preset, args.steps, seed, pde._parse_methods(args.methods), Path(args.out))
    rows = _read(CSV)
    report(rows)
    print(f"\nplot: {plot(rows, _read(FRAMES_CSV), PLOT)}")


if __name__ == "__main__":
    main()
