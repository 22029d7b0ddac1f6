"""`zokernels train pde`: solver-in-the-loop error correction of a coarse black-box PDE solver (DeepZero §PDE).

A coarse PhiFlow Burgers solver (numpy backend, no gradients) is corrected after every step by a small CNN. The
corrector is trained SRC (not at all), NON (offline pairs), ZO-SOL (Sparse-CGE through the black box, unrolled)
and FO-SOL (backprop through the torch twin of the same solver), then every corrected solver is rolled out from
held-out initial conditions and compared with the downsampled fine-grid reference: MAE mean ± std over the test
trajectories, a field-comparison PNG and per-method loss curves in --out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .common import CsvLog, TimedProgress, fill_preset, plot_curves, save_checkpoint_atomic
from .pde_model import Corrector, rollout_batched, stacked_parameters
from .pde_solver import BurgersConfig, PhiFlowBurgers, burgers_step_torch, random_initial_states, reference_trajectories
from .pde_train import METHODS, TrainSettings, train_corrector

LABELS = {"src": "SRC", "non": "NON", "zo-sol": "ZO-SOL", "fo-sol": "FO-SOL", "fo-sparse": "FO-SPARSE"}


# Options a preset sets (any of them given explicitly wins). "default" is the fast 8x8 run the README and the
# smoke tests use; "study" is the setting of bench/pde_study.py (docs/apps.md): a 2,914-parameter corrector, 64-step
# test rollouts, 16-step unrolls, where FO-SOL beats NON on the seeds measured (the default: by ~0.002 MAE).
PRESETS = {
    "default": {"frames": 24, "hidden": 4, "steps": 300, "batch_size": 8, "unroll": 8, "density": 0.25, "lr": 3e-3},
    "study": {"frames": 64, "hidden": 16, "steps": 1000, "batch_size": 4, "unroll": 16, "density": 0.03,
              "lr": 1e-3},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument

    def preset_help(key: str, text: str) -> str:
        values = ", ".join(f"{name} {values[key]}" for name, values in PRESETS.items())
        return f"{text} (preset: {values})"

    add("--methods", default="src,non,zo-sol,fo-sol",
        help="comma list among src,non,zo-sol,fo-sol,fo-sparse (FO-SOL's gradient on ZO-SOL's sparse coordinates)")
    add("--preset", choices=tuple(PRESETS), default="default",
        help="defaults of the options marked (preset: ...); an option given explicitly overrides its preset value")
    add("--coarse", type=int, default=8, help="coarse grid cells per side")
    add("--refine", type=int, default=4, help="reference grid = coarse * refine, with refine time substeps")
    add("--dt", type=float, default=0.1, help="solver time step")
    add("--viscosity", type=float, default=0.02, help="Burgers viscosity")
    add("--amplitude", type=float, default=2.0, help="peak initial speed component")
    add("--train-trajectories", type=int, default=32, help="reference trajectories to train on")
    add("--test-trajectories", type=int, default=16, help="held-out reference trajectories for the MAE")
    add("--frames", type=int, help=preset_help("frames", "coarse steps per reference trajectory and test rollout"))
    add("--hidden", type=int, help=preset_help("hidden", "corrector width"))
    add("--steps", type=int, help=preset_help("steps", "optimizer steps per method"))
    add("--batch-size", type=int, help=preset_help("batch_size", "training windows per step"))
    add("--unroll", type=int,
        help=preset_help("unroll", "solver steps unrolled per window (NON: pairs per step = B*unroll)"))
    add("--lr", type=float, help=preset_help("lr", "Adam learning rate of the corrector (every method)"))
    add("--mu", type=float, default=2e-5,
        help="CGE perturbation; the corrections are ~1e-2, so a larger mu is dominated by curvature bias")
    add("--density", type=float,
        help=preset_help("density", "Sparse-CGE: fraction of each weight tensor (biases: all)"))
    add("--max-queries", type=int, default=256, help="parameter sets per batched rollout")
    add("--engine", choices=("batched", "api"), default="batched",
        help="batched: queries through the solver as one batch; api: zokernels.cge_step, one query at a time")
    add("--seed", type=int, default=0, help="seeds the initial states, the corrector init and the windows")
    add("--out", default="runs/pde", help="folder for the PNGs, CSV logs and corrector checkpoints")


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the preset-controlled options left unset (None) with the chosen preset's values, in place."""
    return fill_preset(args, PRESETS)


def _make_data(args: argparse.Namespace, config: BurgersConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    count = args.train_trajectories + args.test_trajectories
    initial = random_initial_states(count, config.fine, generator, amplitude=args.amplitude)
    references = reference_trajectories(config, initial, args.frames)
    return references[:args.train_trajectories], references[args.train_trajectories:]


@torch.no_grad()
def evaluate(model: Corrector | None, solver, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollouts from each test trajectory's first frame; returns (MAE per trajectory [N], rollout frames)."""
    stacked = None if model is None else stacked_parameters(model)
    frames = rollout_batched(solver, stacked, test[:, 0], test.shape[1] - 1)[0].transpose(0, 1)
    return (frames - test[:, 1:]).abs().mean(dim=(1, 2, 3, 4)), frames


def _parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LABELS]
    if unknown or not methods:
        raise ValueError(f"--methods must be a comma list among {list(LABELS)}, got {text!r}")
    return methods


def plot_fields(test: torch.Tensor, rollouts: dict[str, torch.Tensor], out_path: Path, index: int = 0) -> Path:
    """Speed |v| of one test trajectory at three times: the reference, then each method; errors in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_frames = test.shape[1] - 1
    times = sorted({max(1, n_frames // 3), max(1, 2 * n_frames // 3), n_frames})
    rows = [("reference", test[index, 1:])] + [(LABELS[m], r[index]) for m, r in rollouts.items()]
    figure, axes = plt.subplots(len(rows), len(times), figsize=(2.6 * len(times), 2.4 * len(rows)), squeeze=False)
    vmax = test[index].norm(dim=1).max().item()
    for r, (label, frames) in enumerate(rows):
        for c, t in enumerate(times):
            axis = axes[r][c]
            axis.imshow(frames[t - 1].norm(dim=0).numpy(), origin="lower", vmin=0, vmax=vmax, cmap="viridis")
            error = (frames[t - 1] - test[index, t]).abs().mean().item()
            axis.set_title(f"{label} t={t}" + ("" if label == "reference" else f" MAE {error:.3f}"), fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path


def _print_paired(results: dict[str, torch.Tensor]) -> None:
    """The methods share the test trajectories, so paired differences are the sharper comparison: the spread
    between trajectories (the ± above) is mostly how hard each initial condition is."""
    if "zo-sol" not in results:
        return
    zo = results["zo-sol"]
    for method in (m for m in results if m != "zo-sol"):
        diff = results[method] - zo
        stderr = diff.std().item() / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
        print(f"ZO-SOL vs {LABELS[method]}: lower MAE on {(diff > 0).sum().item()}/{len(diff)} test trajectories, "
              f"paired MAE difference {diff.mean().item():+.4f} ± {stderr:.4f} (s.e.)")


def _step_cost(method: str, args: argparse.Namespace, model: Corrector) -> str:
    """What one training step of `method` costs, in solver calls."""
    windows = f"{args.batch_size} windows x {args.unroll} unrolled solver steps"
    if method == "non":
        return f"offline pairs, {args.batch_size * args.unroll} per step (the solver is not in the loop)"
    if method == "fo-sol":
        return f"one rollout of {windows} through the differentiable twin, plus its backward"
    if method == "fo-sparse":
        return f"as FO-SOL, the gradient then kept on ZO-SOL's coordinates of the step (density {args.density})"
    coordinates = sum(p.numel() if p.dim() == 1 or args.density >= 1.0 else max(1, round(args.density * p.numel()))
                      for p in model.parameters())
    chunks = -(-coordinates // max(1, args.max_queries - 1))
    sets = coordinates + chunks
    how = "batched rollouts" if args.engine == "batched" else "separate loss evaluations (--engine api)"
    return (f"{coordinates} CGE coordinates (density {args.density}) = {sets} parameter sets in {how} of {windows} "
            f"through the black-box solver")


def _train_method(method: str, args: argparse.Namespace, config: BurgersConfig, train: torch.Tensor, solver,
                  out: Path) -> Corrector:
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, unroll=args.unroll, lr=args.lr,
                             mu=args.mu, density=args.density, max_queries=args.max_queries, engine=args.engine)
    torch.manual_seed(args.seed)
    model = Corrector(hidden=args.hidden)
    log = CsvLog(out / f"train_{method}.csv", ["step", "loss", "seconds"])
    print(f"{LABELS[method]}: {args.steps} steps; {_step_cost(method, args, model)}", flush=True)
    started = time.perf_counter()
    bar = TimedProgress(args.steps, LABELS[method])

    def on_step(step: int, loss: float) -> None:
        log.append(step=step, loss=loss, seconds=round(time.perf_counter() - started, 3))
        bar.update(1, loss=f"{loss:.4g}")

    def twin(state: torch.Tensor) -> torch.Tensor:
        return burgers_step_torch(state, config.dt, config.viscosity)

    # Same data order for every method: the generator is reseeded per method.
    with bar:
        train_corrector(method, model, train, solver, twin, settings, torch.Generator().manual_seed(args.seed + 1),
                        on_step)
    save_checkpoint_atomic(out / f"corrector_{method}.pt", {"model": model.state_dict(), "args": vars(args)})
    print(f"  trained {LABELS[method]:7s} in {time.perf_counter() - started:6.1f} s "
          f"(last loss {log.read()[-1]['loss']})", flush=True)
    return model


def train_and_evaluate(args: argparse.Namespace, methods: list[str]
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Data, then each method trained and rolled out on the held-out trajectories. Returns (test references,
    MAE per test trajectory per method, rollout frames per method, training CPU seconds per method)."""
    apply_preset(args)
    config = BurgersConfig(coarse=args.coarse, refine=args.refine, substeps=args.refine, dt=args.dt,
                           viscosity=args.viscosity)
    out = Path(args.out)
    started = time.perf_counter()
    print(f"reference data: {args.train_trajectories + args.test_trajectories} trajectories x {args.frames} steps on "
          f"the {config.fine}^2 grid ...", flush=True)
    train, test = _make_data(args, config)
    print(f"reference data: {len(train)} train / {len(test)} test trajectories x {args.frames} steps "
          f"({config.fine}^2 -> {config.coarse}^2) in {time.perf_counter() - started:.1f} s", flush=True)
    solver = PhiFlowBurgers(config.coarse, config.dt, config.viscosity)
    results, rollouts, cpu_seconds = {}, {}, {}
    for method in methods:
        cpu_started = time.process_time()
        model = None if method == "src" else _train_method(method, args, config, train, solver, out)
        cpu_seconds[method] = time.process_time() - cpu_started
        results[method], rollouts[method] = evaluate(model, solver, test)
    return test, results, rollouts, cpu_seconds


def run(args: argparse.Namespace) -> int:
    methods = _parse_methods(args.methods)
    out = Path(args.out)
    started = time.perf_counter()
    test, results, rollouts, _ = train_and_evaluate(args, methods)
    print(f"\nMAE vs downsampled fine reference, {len(test)} held-out initial conditions x {args.frames} steps")
    print("| method | MAE (mean ± std) |\n|---|---|")
    for method in methods:
        mae = results[method]
        print(f"| {LABELS[method]} | {mae.mean().item():.4f} ± {mae.std().item():.4f} |")
    _print_paired(results)
    png = plot_fields(test, rollouts, out / "pde_fields.png")
    curves = {LABELS[m]: out / f"train_{m}.csv" for m in methods if m in METHODS}
    if curves:
        plot_curves(curves, "step", ["loss"], out / "pde_training.png", title="training loss")
    print(f"\nfields: {png}; total {time.perf_counter() - started:.1f} s")
    return 0
