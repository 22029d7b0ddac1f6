"""The fused rule sweep (philox.rule_sweep_) against the materialized update it replaces, on the CPU, same run.

For ZOAdam, ZOSignSGD (each with weight decay), ZOSGD with weight decay, and the dense-momentum rules (ZOSGD with
momentum 0.9 and weight decay, ZOSignSGD with momentum 0.9), one optimizer update (the call
`ZOOptimizer._write_update` after the queries: q directions, every tensor active) is timed with the rule's fused
sweep and with `rule.fuse = False` (ĝ materialized per tensor in fp32, then the rule in torch ops), alternating, best
of --repeats, in CPU time of this thread (OMP_NUM_THREADS=1: one core, robust to other processes). Also the peak of
allocated-minus-freed bytes during the update (torch.profiler memory events): the fp32 buffers the fused path no
longer needs. Parameters: MiniLM-L6-shaped fp32 / bf16 tensors (22.6 M elements; --small: every dimension / 16).

    OMP_NUM_THREADS=1 .venv/bin/python bench/rule_sweep.py [--small] [--repeats 5] [--methods NAME ...]

Rows are appended to bench/results/rule_sweep.csv."""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import zokernels.optim as zo  # noqa: E402
from zokernels import philox  # noqa: E402
from zokernels.optim.core import Estimate  # noqa: E402

from benchlib import append_csv_rows, best_time, run_metadata  # noqa: E402
from zo_optimizers import profiled_peak  # noqa: E402

# MiniLM-L6 (all-MiniLM-L6-v2) parameter shapes: embeddings, then 6 layers of attention + FFN (+ LayerNorms).
MINILM = ([(30522, 384), (512, 384), (2, 384), (384,), (384,)]
          + 6 * [(384, 384), (384,)] * 4 + 6 * [(384,), (384,), (1536, 384), (1536,), (384, 1536), (384,), (384,),
                                                 (384,)])
METHODS = {
    "zoadam_wd": lambda p: zo.ZOAdam(p, lr=1e-3, weight_decay=0.01, seed=1, backend="cpu"),
    "zosign_wd": lambda p: zo.ZOSignSGD(p, lr=1e-3, weight_decay=0.01, seed=1, backend="cpu"),
    "zosgd_wd": lambda p: zo.ZOSGD(p, lr=1e-3, weight_decay=0.01, seed=1, backend="cpu"),
    "zosgd_momentum_wd": lambda p: zo.ZOSGD(p, lr=1e-3, momentum=0.9, weight_decay=0.01, seed=1, backend="cpu"),
    "zosign_momentum": lambda p: zo.ZOSignSGD(p, lr=1e-3, momentum=0.9, seed=1, backend="cpu"),
}


def parameters(dtype: torch.dtype, small: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [tuple(max(1, d // 16) if small else d for d in s) for s in MINILM]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def update_fn(opt: zo.ZOOptimizer, params: list[torch.Tensor], q: int):
    """One update as the step makes it: θ_new from the restore copy, from q coefficients of step t = 0."""
    dirs = opt._directions(params, philox.stream_offsets(params), 0)
    est = Estimate(dirs, list(range(len(params))), [0.01 * (j + 1) for j in range(q)])
    backup = [p.detach().clone() for p in params]
    return lambda: opt._write_update(est, backup, {})


def measure(method: str, dtype: torch.dtype, q: int, small: bool, repeats: int) -> dict:
    params = parameters(dtype, small)
    opt = METHODS[method](params)
    update = update_fn(opt, params, q)
    update()  # creates the state (Adam's moments), so neither path pays for it below
    times = {True: [], False: []}
    for _ in range(repeats):  # alternating, so both paths see the same machine load
        for fuse in (True, False):
            opt.rule.fuse = fuse
            times[fuse].append(best_time(update, 1, clock=time.thread_time))
    peaks = {}
    for fuse in (True, False):
        opt.rule.fuse = fuse
        peaks[fuse] = profiled_peak(update)
    numel = sum(p.numel() for p in params)
    return {"method": method, "dtype": str(dtype).removeprefix("torch."), "q": q, "numel": numel,
            "fused_cpu_s": round(min(times[True]), 4), "materialized_cpu_s": round(min(times[False]), 4),
            "speedup": round(min(times[False]) / min(times[True]), 2), "fused_peak_bytes": peaks[True],
            "materialized_peak_bytes": peaks[False], "largest_tensor_bytes_fp32": 4 * max(p.numel() for p in params),
            **run_metadata()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="every dimension / 16 (a quick check)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    rows = []
    for method in args.methods:
        for dtype in (torch.float32, torch.bfloat16):
            for q in (1, 4):
                row = measure(method, dtype, q, args.small, args.repeats)
                rows.append(row)
                print(f"{method:17s} {row['dtype']:8s} q={q}: fused {row['fused_cpu_s']:.4f} s, materialized "
                      f"{row['materialized_cpu_s']:.4f} s ({row['speedup']:.2f}x); peak extra bytes "
                      f"{row['fused_peak_bytes']} vs {row['materialized_peak_bytes']}", flush=True)
    if not args.small:
        print("wrote", append_csv_rows("rule_sweep.csv", rows))


if __name__ == "__main__":
    main()
