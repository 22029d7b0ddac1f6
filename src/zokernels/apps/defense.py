"""`zokernels train defense`: certified black-box defense by denoised smoothing (DeepZero §4, Cohen et al. 2019).

A frozen digits classifier is visible only through its outputs; a denoiser in front of it is trained with ZO
(Sparse-CGE through the black box) or FO (white-box upper bound), and the smoothed classifier
g(x) = argmax_c P(f(D(x + σε)) = c) is certified with `certify` (Cohen et al.'s CERTIFY: n0 samples select the
class, n fresh samples estimate it, a one-sided Clopper–Pearson bound p_A; radius σ Φ⁻¹(p_A), abstain if p_A < ½).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .common import CsvLog, TimedProgress, accuracy, plot_curves, save_checkpoint_atomic

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper–Pearson lower confidence bound of a binomial proportion: the alpha quantile
    of Beta(k, n - k + 1), and 0 when k = 0."""
    from scipy.stats import beta

    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}, {trials}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))


@torch.no_grad()
def _sample_counts(classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: float, count: int,
                   num_classes: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        noise = torch.randn(size, *x.shape, generator=generator, dtype=x.dtype)
        labels = classify(x.unsqueeze(0) + sigma * noise).argmax(dim=1)
        counts += torch.bincount(labels, minlength=num_classes)
    return counts


def certify(classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: float, n0: int = 100,
            n: int = 10_000, alpha: float = 0.001, num_classes: int = 10, batch_size: int = 1000,
            generator: torch.Generator | None = None) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY for one input x (no batch axis). `classify` maps a batch to scores [N, classes].

    Returns (class, ℓ2 radius) with probability >= 1 - alpha of being correct, or (ABSTAIN, 0.0)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (one input, no batch axis), got {type(x).__name__}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    for name, value in (("n0", n0), ("n", n), ("num_classes", num_classes), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    from scipy.stats import norm

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    selection = _sample_counts(classify, x, sigma, n0, num_classes, batch_size, generator)
    top = int(selection.argmax())
    estimation = _sample_counts(classify, x, sigma, n, num_classes, batch_size, generator)
    p_lower = clopper_pearson_lower(int(estimation[top]), n, alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return top, float(sigma * norm.ppf(p_lower))


def certified_accuracy(predictions: list[int], radii: list[float], labels: torch.Tensor,
                       thresholds: tuple[float, ...] = RADII) -> list[float]:
    """Fraction of inputs certified correct with radius >= r, for each r."""
    labels = labels.tolist()
    return [sum(p == y and rad >= r for p, rad, y in zip(predictions, radii, labels)) / max(1, len(labels))
            for r in thresholds]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--sigma", type=float, default=0.25, help="smoothing / training noise, in [0, 1] pixel units")
    add("--classifier-epochs", type=int, default=30, help="epochs of the base (black-box) classifier's training")
    add("--steps", type=int, default=300, help="denoiser optimizer steps (ZO and FO alike)")
    add("--batch-size", type=int, default=64, help="noisy training images per denoiser step")
    add("--lr", type=float, default=1e-3, help="Adam learning rate of the denoiser (cosine-decayed)")
    add("--mu", type=float, default=5e-3, help="CGE perturbation size")
    add("--density", type=float, default=0.1, help="Sparse-CGE: fraction of each weight tensor (biases: all)")
    add("--engine", choices=("batched", "api"), default="batched",
        help="batched: perturbed denoisers through the black box as one call; api: zokernels.cge_step")
    add("--certify-every", type=int, default=3, help="certify every k-th test image (the test set has 360)")
    add("--n0", type=int, default=100, help="CERTIFY: noise samples that select the class")
    add("--n", type=int, default=10_000, help="CERTIFY: noise samples that estimate its probability")
    add("--alpha", type=float, default=0.001, help="CERTIFY: failure probability of the certificate")
    add("--seed", type=int, default=0, help="seeds the split, both trainings and the smoothing noise")
    add("--out", default="runs/defense", help="folder for the denoisers, CSV logs and the loss plot")


def _step_cost(method: str, args: argparse.Namespace) -> str:
    """What one denoiser step costs, in black-box queries."""
    if method == "fo":
        return f"one white-box forward + backward of {args.batch_size} noisy images"
    from .defense_train import Denoiser

    coordinates = sum(p.numel() if p.dim() == 1 else max(1, round(args.density * p.numel()))
                      for p in Denoiser().parameters())
    return (f"{coordinates} CGE coordinates (density {args.density}) = {coordinates + 1} perturbed denoisers, each "
            f"through the black box on {args.batch_size} noisy images")


def _train_both(args: argparse.Namespace, black_box, white_box, train_x, train_y, out: Path) -> dict:
    from .defense_train import DenoiserSettings, train_denoiser

    settings = DenoiserSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, sigma=args.sigma,
                                mu=args.mu, density=args.density, engine=args.engine)
    denoisers = {}
    for method in ("zo", "fo"):
        log, started = CsvLog(out / f"train_{method}.csv", ["step", "loss"]), time.perf_counter()
        print(f"{method.upper()} denoiser: {args.steps} steps; {_step_cost(method, args)}", flush=True)
        with TimedProgress(args.steps, f"{method.upper()} denoiser") as bar:
            def on_step(step: int, loss: float) -> None:
                log.append(step=step, loss=loss)
                bar.update(1, loss=f"{loss:.3f}")

            denoisers[method] = train_denoiser(method, black_box, white_box, train_x, train_y, settings, args.seed,
                                               on_step)
        save_checkpoint_atomic(out / f"denoiser_{method}.pt", {"model": denoisers[method].state_dict()})
        print(f"  {method.upper()} denoiser: {args.steps} steps in {time.perf_counter() - started:.1f} s, "
              f"last loss {float(log.read()[-1]['loss']):.3f}", flush=True)
    plot_curves({m.upper(): out / f"train_{m}.csv" for m in denoisers}, "step", ["loss"],
                out / "defense_training.png", title="denoiser training loss (noisy inputs)")
    return denoisers


def run(args: argparse.Namespace) -> int:
    from .defense_train import BlackBoxClassifier, digits_pixel_space, train_classifier

    out, started = Path(args.out), time.perf_counter()
    train_x, train_y, test_x, test_y = digits_pixel_space(args.seed)
    print(f"base classifier: {args.classifier_epochs} epochs of first-order training on {len(train_y)} clean "
          f"digits ...", flush=True)
    white_box = train_classifier(train_x, train_y, args.classifier_epochs, args.seed).requires_grad_(False)
    black_box = BlackBoxClassifier(white_box)
    print(f"base classifier: clean test accuracy {accuracy(white_box, test_x, test_y):.3f}; noisy (sigma "
          f"{args.sigma}) {accuracy(white_box, test_x + args.sigma * torch.randn_like(test_x), test_y):.3f}")
    denoisers = _train_both(args, black_box, white_box, train_x, train_y, out)
    subset = slice(None, None, args.certify_every)
    xs, ys = test_x[subset], test_y[subset]
    rows = {"no denoiser": black_box,
            "ZO denoiser (Sparse-CGE through the black box)": lambda b: black_box(denoisers["zo"](b)),
            "FO denoiser (white-box backprop)": lambda b: black_box(denoisers["fo"](b))}
    print(f"\ncertifying {len(rows)} classifiers x {len(ys)} test images x {args.n0 + args.n:,} noise samples = "
          f"{len(rows) * len(ys) * (args.n0 + args.n):,} black-box evaluations", flush=True)
    table = []
    for label, classify in rows.items():
        generator = torch.Generator().manual_seed(args.seed + 7)
        results = []
        with TimedProgress(len(ys), f"certify {label.split(' (')[0]}", unit="image") as bar:
            for x in xs:
                results.append(certify(classify, x, args.sigma, args.n0, args.n, args.alpha, generator=generator))
                bar.update(1)
        acc = certified_accuracy([p for p, _ in results], [r for _, r in results], ys)
        table.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in acc) + " |")
    print(f"\ncertified accuracy of the smoothed classifier (sigma={args.sigma}, n0={args.n0}, n={args.n}, "
          f"alpha={args.alpha}) on {len(ys)} test images")
    print("| method | " + " | ".join(f"r={r}" for r in RADII) + " |\n" + "|---" * (len(RADII) + 1) + "|")
    print("\n".join(table), flush=True)
    print(f"\nblack-box images queried: {black_box.images_queried}; total {time.perf_counter() - started:.1f} s")
    return 0
