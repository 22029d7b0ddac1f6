"""Philox z v2 sweeps: z generation (ns/element) vs torch.randn, sweep bandwidth vs a plain copy, and a MeZO-style
perturbation (θ += μ·z over every parameter) of all-MiniLM-L6-v2's parameter shapes (random values, no download)
vs the MeZO code's per-tensor loop (torch.manual_seed; torch.normal per tensor; add_).

CPU: the cpu backend (1 thread and all threads). GPU (when one is visible): the cuda and triton backends; on a
machine without a GPU those rows are skipped and the script says so. CSV: bench/results/philox_sweep.csv.

    .venv/bin/python bench/philox_sweep.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from zokernels import backends, philox

from benchlib import append_csv_rows, best_time, run_metadata


def minilm_shapes() -> list[tuple[int, ...]]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, intermediate 1536) + a 2-class head: 22.7M parameters."""
    h, inter = 384, 1536
    shapes = [(30522, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(6):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,), (inter, h), (inter,), (h, inter), (h,), (h,), (h,)]
    return shapes + [(h, h), (h,), (2, h), (2,)]


def make_params(device: str, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [(torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype) for s in minilm_shapes()]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    def run():
        fn()
        sync(device)
    run()
    return best_time(run, repeats)


def reference_perturb(params: list[torch.Tensor], mu: float, seed: int) -> None:
    torch.manual_seed(seed)
    for p in params:
        p.add_(torch.normal(mean=0.0, std=1.0, size=p.shape, dtype=p.dtype, device=p.device), alpha=mu)


def sweep_rows(backend: str, device: str, repeats: int, label: str) -> list[dict]:
    params = make_params(device)
    n = sum(p.numel() for p in params)
    offsets = philox.stream_offsets(params)
    ours = timed(lambda: philox.add_normal_combination_(params, offsets, 1, [(0, 1e-3)], backend=backend), device,
                 repeats)
    ref = timed(lambda: reference_perturb(params, 1e-3, 1), device, repeats)
    flat = torch.empty(n, device=device)
    other = torch.empty(n, device=device)
    copy = timed(lambda: other.copy_(flat), device, repeats)
    sweep_gbs, copy_gbs = 8 * n / ours / 1e9, 8 * n / copy / 1e9  # read + write 4 bytes each
    if device == "cpu" and torch.get_num_threads() == 1:
        cpu_ns = best_time(lambda: philox.add_normal_combination_(params, offsets, 1, [(0, 1e-3)], backend=backend),
                           repeats, clock=time.thread_time) / n * 1e9
        ref_ns = best_time(lambda: reference_perturb(params, 1e-3, 1), repeats, clock=time.thread_time) / n * 1e9
        extra = {"cpu_time_ns_per_element": cpu_ns, "reference_cpu_time_ns_per_element": ref_ns}
    else:
        extra = {}
    return [{**extra, "case": "mezo_perturb_minilm", "backend": label, "device": device, "elements": n,
             "ours_s": ours, "reference_loop_s": ref, "speedup_vs_reference": ref / ours,
             "ns_per_element": ours / n * 1e9, "sweep_GBps": sweep_gbs, "copy_GBps": copy_gbs,
             "fraction_of_copy_bw": sweep_gbs / copy_gbs}]


def generation_rows(threads: int, repeats: int, n: int = 1 << 23) -> list[dict]:
    out = torch.empty(n)
    ours_fn, randn_fn = lambda: backends._C.philox_normal_cpu(out.data_ptr(), n, 1, 0, 0), lambda: torch.randn(n)
    ours, randn = best_time(ours_fn, repeats), best_time(randn_fn, repeats)
    row = {"case": "z_generation", "backend": f"cpu x{threads}", "device": "cpu", "elements": n, "ours_s": ours,
           "reference_loop_s": randn, "speedup_vs_reference": randn / ours, "ns_per_element": ours / n * 1e9}
    if threads == 1:
        row["cpu_time_ns_per_element"] = best_time(ours_fn, repeats, clock=time.thread_time) / n * 1e9
        row["reference_cpu_time_ns_per_element"] = best_time(randn_fn, repeats, clock=time.thread_time) / n * 1e9
    return [row]


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    backends._C.set_openmp_threads(n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    if backends.availability()["cpu"].available:
        all_threads = torch.get_num_threads()
        for threads in sorted({1, all_threads}):
            set_threads(threads)
            rows += generation_rows(threads, args.repeats)
            rows += sweep_rows("cpu", "cpu", args.repeats, f"cpu x{threads}")
        set_threads(all_threads)
    else:
        print("cpu rows skipped:", backends.availability()["cpu"].reason)
    if torch.cuda.is_available():
        for backend in ("cuda", "triton"):
            status = backends.availability()[backend]
            if status.available:
                rows += sweep_rows(backend, "cuda", args.repeats, backend)
            else:
                print(f"{backend} rows skipped: {status.reason}")
    else:
        print("GPU rows (cuda, triton) skipped: no CUDA GPU visible on this machine")
    for r in rows:
        extra = (f"  sweep {r['sweep_GBps']:6.1f} GB/s = {100 * r['fraction_of_copy_bw']:4.0f}% of copy"
                 if "sweep_GBps" in r else "")
        if "cpu_time_ns_per_element" in r:
            extra += (f"  [thread CPU time {r['cpu_time_ns_per_element']:.2f} vs "
                      f"{r['reference_cpu_time_ns_per_element']:.2f} ns/element]")
        print(f"{r['case']:20s} {r['backend']:8s} {r['ns_per_element']:6.2f} ns/element  "
              f"{r['speedup_vs_reference']:5.2f}x vs {'torch.randn' if r['case'] == 'z_generation' else 'loop'}"
              + extra)
    metadata = run_metadata()
    print("load average (1 min):", metadata["load_avg_1min"])
    append_csv_rows("philox_sweep.csv", [{**metadata, **r} for r in rows])


if __name__ == "__main__":
    main()
