"""cge_step vs the naive reference CGE on a small CNN: coordinates/second for both and the ratio.

    .venv/bin/python bench/cge_small_cnn.py [--batch 64] [--coords 400] [--repeats 3]

Both run in the same process on the same model, batch and coordinate mask; the result row is appended to
bench/results/cge_small_cnn.csv with the machine, date and torch version."""
from __future__ import annotations

import argparse
import torch
from torch import nn

import zokernels
from zokernels.reference import cge_ref

from benchlib import append_csv_rows, best_time, run_metadata

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
    result = zokernels.cge_step(model, batch, mask=mask, update_running_stats=False)
    engine_s = best_time(lambda: zokernels.cge_step(model, batch, mask=mask, update_running_stats=False),
                         args.repeats)
    reference_s = best_time(lambda: cge_ref(model, batch, mask=mask), args.repeats)
    row = {
        **run_metadata(), "batch": args.batch, "coordinates": n, "engine": result.engine,
        "engine_coords_per_s": round(n / engine_s, 1), "reference_coords_per_s": round(n / reference_s, 1),
        "ratio": round(reference_s / engine_s, 3),
    }
    print(f"small CNN, batch {args.batch}, {n} coordinates: cge_step ({result.engine} engine) {row['engine_coords_per_s']} coords/s, "
          f"naive reference {row['reference_coords_per_s']} coords/s, ratio {row['ratio']}x")
    append_csv_rows("cge_small_cnn.csv", [row])


if __name__ == "__main__":
    main()
