"""What every bench script shares: best-of-n timing, run metadata, and CSV rows appended under bench/results/."""
from __future__ import annotations

import csv
import datetime
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def best_time(fn, repeats: int, clock=time.perf_counter) -> float:
    """Minimum time of `repeats` calls: the least disturbed by other work on a shared machine. Wall time by
    default; clock=time.thread_time gives the calling thread's CPU time (with one thread, robust to other
    processes)."""
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def run_metadata() -> dict:
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    return {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg_1min": load}


def append_csv_rows(name: str, rows: list[dict]) -> Path:
    """Appends rows to bench/results/<name>; earlier rows are kept (the file is rewritten with the union of the
    columns when new columns appear)."""
    path = RESULTS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    old = list(csv.DictReader(open(path, newline=""))) if path.exists() else []
    fields = list(dict.fromkeys([k for r in old + rows for k in r]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old + rows)
    return path
