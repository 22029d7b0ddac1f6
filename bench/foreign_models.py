"""The foreign-model corpus (tests/foreign_models.py) through cge_step, issue 12: per model x {train, eval},
which engine served engine='auto', its max abs error against the float64 oracle next to the float32 naive
path's (same 16 or fewer random coordinates, μ = 2^-8), and the speed of both on first-layer coordinates, all
measured in this run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/foreign_models.py [--coords 128] [--repeats 3] [--only NAME ...]

Appends rows to bench/results/foreign_models.csv (with the date, the CPU's avx2/avx512f flags and the load
average at start and end) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # first: tests/foreign_models.py, not this script, is `foreign_models`

import zokernels  # noqa: E402
from benchlib import append_csv_rows, best_time, run_metadata  # noqa: E402
from foreign_cases import CASES, MU, build_case, first_layer_mask, run_case  # noqa: E402


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return " ".join(flag for flag in ("avx2", "avx512f") if flag in flags) or "none"


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def speed(entry, mode: str, n: int, repeats: int, clock) -> dict:
    """Coordinates per second of engine='auto' and engine='naive' on the same n first-layer coordinates
    (best of `repeats` after one warm-up call each)."""
    model, batch = build_case(entry, mode)
    mask = first_layer_mask(model, batch, entry.first, n)
    coords = int(sum(m.sum() for m in mask.values()))
    out = {"speed_coords": coords}
    for engine in ("auto", "naive"):
        def step():
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return zokernels.cge_step(model, batch, mu=MU, mask=mask, engine=engine)
        try:
            served = step().engine  # warm-up: capture, kernel setup
            seconds = best_time(step, repeats, clock)
        except Exception as error:
            out[f"{engine}_coords_per_s"] = ""
            out[f"{engine}_speed_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            continue
        out[f"{engine}_coords_per_s"] = round(coords / seconds, 1)
        if engine == "auto":
            out["speed_engine_served"] = served
    if out.get("auto_coords_per_s") and out.get("naive_coords_per_s"):
        out["speedup"] = round(out["auto_coords_per_s"] / out["naive_coords_per_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coords", type=int, default=128, help="first-layer coordinates timed per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args()

    meta = run_metadata()
    meta["cpu_flags"] = cpu_flags()
    # With one thread (OMP_NUM_THREADS=1) the calling thread's CPU time is what a step costs, whatever else the
    # shared machine runs; with more threads, wall time.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    meta["clock"] = "thread_time" if clock is time.thread_time else "wall"
    rows = []
    started = time.perf_counter()
    for entry, mode in CASES:
        if args.only and entry.name not in args.only:
            continue
        case = run_case(entry, mode)
        auto, naive = case.runs["auto"], case.runs["naive"]
        row = {**meta, "model": entry.name, "original": entry.original, "mode": mode, "mu": MU,
               "engine_served": auto.served or "raised", "auto_error": auto.error[:200],
               "fallback_warning": " | ".join(auto.warnings)[:300], "coords_checked": case.n_coordinates,
               "random_draws": case.random_draws,
               "engine_max_err_vs_f64": f"{auto.max_abs_error:.3g}",
               "naive_max_err_vs_f64": f"{naive.max_abs_error:.3g}",
               "side_effects_ok": not (auto.changed_parameters or auto.wrong_buffers or auto.nonzero_outside_mask)}
        row.update(speed(entry, mode, args.coords, args.repeats, clock))
        rows.append(row)
        print(f"{entry.name}-{mode}: {row['engine_served']} err {row['engine_max_err_vs_f64']} vs naive "
              f"{row['naive_max_err_vs_f64']}, {row.get('auto_coords_per_s')} vs {row.get('naive_coords_per_s')} "
              "coords/s", file=sys.stderr, flush=True)
    for row in rows:
        row["load_avg_1min_end"] = load_average()
    if not args.no_csv and rows:
        path = append_csv_rows("foreign_models.csv", rows)
        print(f"wrote {path.relative_to(ROOT)} ({len(rows)} rows, {time.perf_counter() - started:.0f} s)",
              file=sys.stderr)
    print(markdown(rows, meta))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['date']}, torch {meta['torch']}, {meta['threads']} thread(s) ({meta.get('clock', 'wall')} clock), "
             f"CPU flags: {meta['cpu_flags']}, "
             f"load average {meta['load_avg_1min']} at start, {rows[-1]['load_avg_1min_end'] if rows else '?'} at end",
             "",
             "| model | mode | served | coords | max err engine vs f64 | max err fp32 naive vs f64 | first-layer coords"
             " (served) | engine coords/s | naive coords/s | speedup |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['engine_served']} | {r['coords_checked']} | "
                     f"{r['engine_max_err_vs_f64']} | {r['naive_max_err_vs_f64']} | {r.get('speed_coords', '')} "
                     f"({r.get('speed_engine_served') or r.get('auto_speed_error', '')[:40]}) | "
                     f"{r.get('auto_coords_per_s', '')} | {r.get('naive_coords_per_s', '')} | "
                     f"{r.get('speedup', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
