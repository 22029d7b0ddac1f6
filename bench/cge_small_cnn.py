"""cge_step vs the naive reference CGE on a small CNN: coordinates/second for both and the ratio.

    .venv/bin/python bench/cge_small_cnn.py [--batch 64] [--coords 400] [--repeats 3]

Both run in the same process on the same model, batch and coordinate mask; the result row is appended to
bench/results/cge_small_cnn.csv with the machine, date and torch version."""
from __future__ import annotations

import argparse
import csv
import datetime
import platform
import time
from pathlib import Path

import torch
from torch import nn

import zokernels
from zokernels.reference import cge_ref

RESULTS = Path(__file__).resolve().parent / "results" / "cge_small_cnn.csv"


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def random_mask(model: nn.Module, n_coords: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    chosen = set(torch.randperm(total, generator=generator)[:n_coords].tolist())
    mask, start = {}, 0
    for name, p in params.items():
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[[i - start for i in chosen if start <= i < start + p.numel()]] = True
        mask[name] = flat.view_as(p)
        start += p.numel()
    return mask


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--coords", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = small_cnn()
    batch = (torch.randn(args.batch, 1, 16, 16), torch.randint(0, 10, (args.batch,)))
    mask = random_mask(model, args.coords, torch.Generator().manual_seed(0))
    n = sum(int(m.sum()) for m in mask.values())
    engine_s = best_time(lambda: zokernels.cge_step(model, batch, mask=mask, update_running_stats=False),
                         args.repeats)
    reference_s = best_time(lambda: cge_ref(model, batch, mask=mask), args.repeats)
    row = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch, "coordinates": n,
        "engine_coords_per_s": round(n / engine_s, 1), "reference_coords_per_s": round(n / reference_s, 1),
        "ratio": round(reference_s / engine_s, 3),
    }
    print(f"small CNN, batch {args.batch}, {n} coordinates: cge_step {row['engine_coords_per_s']} coords/s, "
          f"naive reference {row['reference_coords_per_s']} coords/s, ratio {row['ratio']}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new_file = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new_file:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
