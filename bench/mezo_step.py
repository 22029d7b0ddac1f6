"""One MeZO step on the all-MiniLM-L6-v2 classifier (batch 16, length 64): zokernels' fused Philox sweeps vs a
re-implementation of the MeZO code's per-tensor loop (torch.manual_seed(s); torch.normal per tensor; add_), in the
same run. Prints the step time, the share outside the two forward passes and the ratios; then peak memory (max RSS
of a fresh process) of one step of MeZO, MeZO-SVRG and first-order SGD. CSV: bench/results/mezo_step.csv.

    .venv/bin/python bench/mezo_step.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from zokernels import ZOSVRG, mezo_step  # noqa: E402
from zokernels.apps import lm  # noqa: E402
from zokernels.apps.common import first_order_step  # noqa: E402

from benchlib import append_csv_rows, best_time, run_metadata  # noqa: E402


def setup(batch_size: int = 16, length: int = 64):
    torch.manual_seed(0)
    model, tokenizer = lm.load_model(None)
    model.eval()
    texts, labels = lm.load_tweets(batch_size, 0, 0, seed=0)["train"]
    return model, lm.encode(tokenizer, texts, labels, length)


def mezo_reference_step(model, batch, mu: float, lr: float, seed: int, loss_fn=lm.classification_loss) -> None:
    """The MeZO code's step: four per-tensor sweeps, z regenerated with torch.normal on the parameter's device after
    manual_seed."""
    params = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale * mu)

    perturb(1.0)
    plus = loss_fn(model, batch).item()
    perturb(-2.0)
    minus = loss_fn(model, batch).item()
    perturb(1.0)
    g = (plus - minus) / (2 * mu)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.shape, device=p.device, dtype=p.dtype)
        p.data.add_(z, alpha=-lr * g)


@torch.no_grad()
def timing(repeats: int) -> list[dict]:
    model, batch = setup()
    n = sum(p.numel() for p in model.parameters())
    def one_forward():
        return lm.classification_loss(model, batch)

    best_time(one_forward, 2)  # warm-up: the first forwards pay allocator and oneDNN set-up
    forward = best_time(one_forward, repeats)
    rows = []
    cases = {
        "mezo_reference_loop": lambda: mezo_reference_step(model, batch, 1e-3, 1e-7, 1),
        "zokernels_exact": lambda: mezo_step(model, batch, lm.classification_loss, mu=1e-3, lr=1e-7, seed=1),
        "zokernels_inplace": lambda: mezo_step(model, batch, lm.classification_loss, mu=1e-3, lr=1e-7, seed=1,
                                               mode="inplace"),
    }
    cases["zokernels_exact"]()  # warm-up outside the timing (allocator, OpenMP team)
    steps = {name: best_time(fn, repeats) for name, fn in cases.items()}
    forward = min(forward, best_time(one_forward, repeats))  # re-measured after the cases: same warm state
    for name, step in steps.items():
        rows.append({"case": name, "params": n, "step_s": step, "two_forwards_s": 2 * forward,
                     "outside_forward_s": max(step - 2 * forward, 0.0)})
    ref = rows[0]
    for row in rows:
        row["outside_share"] = row["outside_forward_s"] / row["step_s"]
        row["step_speedup_vs_reference"] = ref["step_s"] / row["step_s"]
        row["outside_speedup_vs_reference"] = ref["outside_forward_s"] / max(row["outside_forward_s"], 1e-9)
    return rows


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def current_rss_kib() -> int:
    return _proc_status_kib("VmRSS")


def peak_rss_kib() -> int:
    return _proc_status_kib("VmHWM")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size (Linux)
        f.write("5")


def memory_child(method: str) -> None:
    model, batch = setup()
    lm.classification_loss(model, batch)  # one forward first: its buffers are part of every method's cost
    reset_peak_rss()  # the model-loading peak would otherwise hide every method's own extra memory
    base = current_rss_kib()
    if method == "mezo_exact":
        mezo_step(model, batch, lm.classification_loss, lr=1e-7)
    elif method == "mezo_inplace":
        mezo_step(model, batch, lm.classification_loss, lr=1e-7, mode="inplace")
    elif method == "svrg":
        opt = ZOSVRG(model, [batch], lm.classification_loss, q=2)
        opt.step(batch)
        opt.step(batch)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        first_order_step(model, batch, lm.classification_loss, opt)
    peak = peak_rss_kib()
    print(json.dumps({"method": method, "peak_rss_mib": peak / 1024, "step_extra_mib": (peak - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-child", default=None)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    load_before = os.getloadavg()
    rows = timing(args.repeats)
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    for r in rows:
        r["load_avg_before"], r["load_avg_after"] = load_before[0], load_after[0]
    for r in rows:
        print(f"{r['case']:20s} step {r['step_s'] * 1e3:7.1f} ms  2 forwards {r['two_forwards_s'] * 1e3:6.1f} ms  "
              f"outside {r['outside_forward_s'] * 1e3:7.1f} ms ({100 * r['outside_share']:.0f}%)  "
              f"speedup step {r['step_speedup_vs_reference']:.2f}x outside {r['outside_speedup_vs_reference']:.2f}x")
    memory = []
    for method in ("mezo_inplace", "mezo_exact", "svrg", "fo"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", method], capture_output=True, text=True,
                             check=True)
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"peak RSS {method:13s} {memory[-1]['peak_rss_mib']:7.0f} MiB "
              f"(+{memory[-1]['step_extra_mib']:.0f} MiB during the step)")
    metadata = run_metadata()
    append_csv_rows("mezo_step.csv", [{**metadata, **r} for r in rows])
    append_csv_rows("mezo_memory.csv", [{**metadata, **m} for m in memory])


if __name__ == "__main__":
    main()
