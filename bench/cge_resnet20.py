"""One sparse-CGE step on ResNet-20 (90 % of conv/linear weights masked out uniformly at random, plus all BN and
bias coordinates), batch 256, 32x32: the delta engine vs the DeepZero reference's strategy (one forward per
coordinate from the cached input of the coordinate's residual block), both in the same run.

    .venv/bin/python bench/cge_resnet20.py [--batch 256] [--engine-sample 48] [--baseline-sample 4]

A full step is ~27k coordinates (hours for the baseline on 2 cores), so both are timed on a random sample of
coordinates of every parameter and the step time is extrapolated per parameter (n_param / sample · time).
Also printed: forward-equivalents per step (step time / one plain forward), the max error of both against a
float64 naive oracle on a sample of coordinates, and the engine's peak RSS against its memory budget.
A row is appended to bench/results/cge_resnet20.csv."""
from __future__ import annotations

import argparse
import os
import copy
import time

import torch
import torch.nn.functional as F

from zokernels.engine import cge_engine
from zokernels.engine.allocator import retained_heap
from zokernels.engine.heads import Head
from zokernels.estimators.scope import QueryScope
from zokernels.models import resnet20
from zokernels.reference import cge_ref
from zokernels.sparsity import sample_masks, uniform_ratios, with_dense_coordinates

from benchlib import append_csv_rows, run_metadata

def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size (Linux)
        f.write("5")


class BlockReuseBaseline:
    """The DeepZero reference's feature reuse: cache each residual block's input once, then for a coordinate in
    block b perturb it in place, run blocks b.. and the head, restore."""

    def __init__(self, model, x, y):
        self.model, self.y = model, y
        self.stages = [("stem", lambda t: model.relu(model.bn1(model.conv1(t))))]
        for stage in (model.layer1, model.layer2, model.layer3):
            self.stages += [(f"{name}.{i}", block) for name, _ in [(self._name(stage), None)]
                            for i, block in enumerate(stage)]
        self.stages.append(("head", lambda t: model.linear(model.flatten(model.pool(t)))))
        self.inputs = []
        with torch.no_grad():
            value = x
            for _, fn in self.stages:
                self.inputs.append(value)
                value = fn(value)
            self.base = F.cross_entropy(value, y).item()

    def _name(self, stage):
        return next(n for n, m in self.model.named_children() if m is stage)

    def stage_of(self, param_name: str) -> int:
        for i, (name, _) in enumerate(self.stages):
            if param_name.startswith(name + "."):
                return i
        return 0 if not param_name.startswith("linear") else len(self.stages) - 1

    @torch.no_grad()
    def estimate(self, param_name: str, param: torch.Tensor, indices: torch.Tensor, mu: float) -> torch.Tensor:
        start, flat, out = self.stage_of(param_name), param.data.view(-1), []
        for i in indices.tolist():
            original = flat[i].item()
            flat[i] = original + mu
            step = flat[i].item() - original
            value = self.inputs[start]
            for _, fn in self.stages[start:]:
                value = fn(value)
            out.append((F.cross_entropy(value, self.y).item() - self.base) / step)
            flat[i] = original
        return torch.tensor(out, dtype=torch.float64)


def sampled(indices: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return indices[torch.randperm(indices.numel(), generator=generator)[:count]]


def warm_up(rec, named, mask, last_use, budget, generator):
    """One pass per parameter before timing, as every step after a run's first one finds them: oneDNN creates
    a convolution primitive per new batch shape (tens of ms), which extrapolating a 24-coordinate sample to
    thousands of coordinates would otherwise count a hundred times over."""
    for name, param in named:
        indices = torch.nonzero(mask[name].reshape(-1)).flatten()
        users = rec.tape.params[name].users
        if not users:
            continue
        k = cge_engine.replicas_per_pass(rec.tape, min(rec.tape.position[u] for u in users), budget)
        cge_engine.estimate_parameter(rec, name, param, sampled(indices, k, generator), 5e-3, False, budget,
                                      last_use)


@torch.no_grad()
def time_engine(model, batch, mask, sample, budget, generator, dense_mode="delta", kernel_backend=None):
    """Extrapolated engine step time and the estimates on the sampled coordinates. kernel_backend 'triton'/'cuda'
    makes the engine call the GPU kernels."""
    head, named = Head(None, batch), list(model.named_parameters())
    guard = QueryScope(model, [p for _, p in named])
    with guard, retained_heap():
        start = time.perf_counter()
        _, rec = cge_engine.record_base(model, batch, head, None, guard, dict(named), dense_mode, kernel_backend)
        total = time.perf_counter() - start
        last_use = cge_engine.last_uses(rec.tape, rec.final_nodes())
        warm_up(rec, named, mask, last_use, budget, generator)
        samples, estimates = {}, {}
        for name, param in named:
            indices = torch.nonzero(mask[name].reshape(-1)).flatten()
            chosen = sampled(indices, sample, generator)
            start = time.perf_counter()
            grad = cge_engine.estimate_parameter(rec, name, param, chosen, 5e-3, False, budget, last_use)
            total += (time.perf_counter() - start) * indices.numel() / max(1, chosen.numel())
            samples[name], estimates[name] = chosen, grad.reshape(-1)[chosen.to(grad.device)].double()  # grad: on CPU
        rec.close()
    return total, samples, estimates


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--engine-sample", type=int, default=48, help="coordinates timed per parameter (engine)")
    parser.add_argument("--baseline-sample", type=int, default=4, help="coordinates timed per parameter (baseline)")
    parser.add_argument("--oracle-coordinates", type=int, default=24)
    parser.add_argument("--max-memory-bytes", type=int, default=cge_engine.DEFAULT_MAX_MEMORY_BYTES)
    parser.add_argument("--dense-mode", choices=cge_engine.DENSE_MODES, default="delta")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = resnet20().train()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    mask = with_dense_coordinates(model, sample_masks(model, uniform_ratios(model, 0.9), generator))
    n_coords = sum(int(m.sum()) for m in mask.values())
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(3):
            F.cross_entropy(model(x), y).item()
        forward_s = (time.perf_counter() - start) / 3

    reset_peak_rss()
    rss_before = peak_rss_bytes()
    engine_s, samples, engine_est = time_engine(model, (x, y), mask, args.engine_sample, args.max_memory_bytes,
                                                generator, args.dense_mode)
    engine_peak = peak_rss_bytes() - rss_before
    baseline = BlockReuseBaseline(model, x, y)
    baseline_s = 0.0
    with retained_heap():  # the same allocator setting as the engine's, so the ratio is not about malloc
        for name, param in model.named_parameters():
            indices = torch.nonzero(mask[name].reshape(-1)).flatten()
            chosen = samples[name][:args.baseline_sample]
            start = time.perf_counter()
            baseline.estimate(name, param, chosen, 5e-3)
            baseline_s += (time.perf_counter() - start) * indices.numel() / max(1, chosen.numel())

    # float64 oracle on a few coordinates (the naive difference in float64), vs engine and baseline in float32
    names = [n for n, _ in model.named_parameters()]
    picks = [(names[int(i)], None) for i in torch.randint(0, len(names), (args.oracle_coordinates,),
                                                           generator=generator)]
    model64, errors_engine, errors_base = copy.deepcopy(model).double(), [], []
    for name, _ in picks:
        idx = samples[name][:1]
        one = {n: torch.zeros_like(m) for n, m in mask.items()}
        one[name].view(-1)[idx] = True
        oracle = cge_ref(model64, (x.double(), y), mu=5e-3, mask=one)[name].reshape(-1)[idx].item()
        errors_engine.append(abs(engine_est[name][0].item() - oracle))
        errors_base.append(abs(baseline.estimate(name, dict(model.named_parameters())[name], idx, 5e-3).item()
                               - oracle))

    row = {
        **run_metadata(), "batch": args.batch, "coordinates": n_coords, "engine_sample": args.engine_sample,
        "forward_s": round(forward_s, 4), "engine_step_s": round(engine_s, 1), "baseline_step_s": round(baseline_s, 1),
        "engine_coords_per_s": round(n_coords / engine_s, 1), "baseline_coords_per_s": round(n_coords / baseline_s, 1),
        "engine_forward_equivalents": round(engine_s / forward_s, 1),
        "baseline_forward_equivalents": round(baseline_s / forward_s, 1), "ratio": round(baseline_s / engine_s, 2),
        "engine_max_err_vs_f64": f"{max(errors_engine):.3g}", "baseline_max_err_vs_f64": f"{max(errors_base):.3g}",
        "engine_peak_rss_mb": round(engine_peak / 2**20), "budget_mb": round(args.max_memory_bytes / 2**20),
        "dense_mode": args.dense_mode, "load_avg_1min_end": f"{os.getloadavg()[0]:.2f}",
    }
    for key, value in row.items():
        print(f"{key:>30}: {value}")
    append_csv_rows("cge_resnet20.csv", [row])


if __name__ == "__main__":
    main()
