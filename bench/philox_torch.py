"""The torch backend's Philox generator: torch-native z v2 (zokernels/kernels/philox_torch.py) vs the numpy twin it
replaced (reference/philox_ref.py, which the torch backend used before) and the cpu backend (`_C`), on one thread.
Thread CPU time is the column robust to other processes' load; wall time is the best of the repeats. With a GPU,
the torch-native generator on CUDA tensors is timed against the old path (numpy on the host, then a copy).
Rows: bench/results/philox_torch.csv.

    .venv/bin/python bench/philox_torch.py [--n 4194304] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from zokernels import backends, philox
from zokernels.kernels.philox_torch import philox_normal_torch
from zokernels.reference.philox_ref import philox_normal_ref

from benchlib import append_csv_rows, best_time, run_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 22)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, seed, stream, offset = args.n, 2**63 + 12345, 7, 3
    cases = {
        "numpy twin (old torch backend)": lambda: philox_normal_ref(n, seed, stream, offset),
        "torch-native, cpu": lambda: philox_normal_torch(n, seed, stream, offset),
    }
    if backends.availability()["cpu"].available:
        backends._C.set_openmp_threads(1)
        cases["cpu backend (_C), 1 thread"] = lambda: philox.philox_normal(n, seed, stream, offset, backend="cpu")
    if torch.cuda.is_available():
        def old_cuda():
            torch.from_numpy(philox_normal_ref(n, seed, stream, offset)).to("cuda")
            torch.cuda.synchronize()

        def new_cuda():
            philox_normal_torch(n, seed, stream, offset, device="cuda")
            torch.cuda.synchronize()
        new_cuda()
        cases["numpy twin + copy to cuda (old)"] = old_cuda
        cases["torch-native, cuda"] = new_cuda
    else:
        print("no CUDA device: the GPU rows are skipped")
    rows, meta = [], run_metadata()
    for name, fn in cases.items():
        wall = best_time(fn, args.repeats)
        cpu = best_time(fn, args.repeats, clock=time.thread_time)
        rows.append({"case": name, "n": n, "wall_ns_per_element": round(wall / n * 1e9, 2),
                     "thread_cpu_ns_per_element": round(cpu / n * 1e9, 2), **meta})
        print(f"{name:36s} wall {wall / n * 1e9:8.2f} ns/element   thread CPU {cpu / n * 1e9:8.2f} ns/element")
    base = rows[0]
    for row in rows[1:]:
        print(f"{row['case']}: {base['thread_cpu_ns_per_element'] / row['thread_cpu_ns_per_element']:.1f}x the numpy "
              "twin (thread CPU time)")
    assert np.array_equal(philox_normal_torch(4099, seed, stream, offset).numpy().view(np.uint32),
                          philox_normal_ref(4099, seed, stream, offset).view(np.uint32))
    print("wrote", append_csv_rows("philox_torch.csv", rows))


if __name__ == "__main__":
    main()
