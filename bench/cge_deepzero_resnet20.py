"""One sparse-CGE step on DeepZero's ResNet-20 as its own repository defines it (models/resnet_s.py: the children
flattened into a plain list at init, `forward(x, starting_id=0, return_interval=False)`, option-A LambdaLayer
shortcuts; our transcription is `DZResNet` in tests/foreign_models.py): the delta engine against DeepZero's own
feature reuse, on the same model object, in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cge_deepzero_resnet20.py [--batch 64] [--size 32]
        [--engine-sample 16] [--baseline-sample 4] [--oracle-coordinates 6] [--threads 1] [--clock cpu]

ZO-GraSP-free sparse CGE as bench/cge_resnet20.py: 90 % of every conv/linear weight masked out uniformly at random,
plus every BN and bias coordinate. The baseline is DeepZero's block reuse: `features = model(x,
return_interval=True)` once (every split module's output, after the stem ReLU / the head pooling the forward
applies by list position); then for a coordinate in split module j: perturb it in place, `model(features[j-1],
starting_id=j)` (`model(x)` for j = 0), cross-entropy, restore. A full step is ~28k coordinates, so both sides are
timed on a random sample of every parameter's coordinates and extrapolated per parameter (n_param / sample · time),
with bench/cge_resnet20.py's helpers (the engine is warmed up once per parameter before timing), on the thread's
CPU time by default (--clock wall for elapsed time). Printed: both step times and their ratio, the max error of
both against a float64 naive oracle on a few coordinates, the load average. A row is appended to
bench/results/cge_deepzero_resnet20.csv."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from zokernels.engine import cge_engine
from zokernels.engine.allocator import retained_heap
from zokernels.reference import cge_ref
from zokernels.sparsity import sample_masks, uniform_ratios, with_dense_coordinates

import cge_resnet20
from benchlib import append_csv_rows, run_metadata
from cge_resnet20 import time_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from foreign_models import DZBasicBlock, DZResNet  # noqa: E402  (DeepZero's ResNet, transcribed)


class DeepZeroBlockReuse:
    """DeepZero's CGE feature reuse on its own model: the split modules' outputs cached once; a coordinate in
    split module j re-runs the forward from module j on the cached output of module j − 1."""

    def __init__(self, model: DZResNet, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        self.owner = {id(p): j for j, m in enumerate(model.splited_modules) for p in m.parameters()}
        with torch.no_grad():
            self.features = model(x, return_interval=True)
            self.base = F.cross_entropy(self.features[-1], y).item()

    def loss_from(self, j: int) -> float:
        start = self.x if j == 0 else self.features[j - 1]
        return F.cross_entropy(self.model(start, starting_id=j), self.y).item()

    @torch.no_grad()
    def estimate(self, param: torch.Tensor, indices: torch.Tensor, mu: float) -> torch.Tensor:
        j, flat, out = self.owner[id(param)], param.data.view(-1), []
        for i in indices.tolist():
            original = flat[i].item()
            flat[i] = original + mu
            step = flat[i].item() - original  # the realized step
            out.append((self.loss_from(j) - self.base) / step)
            flat[i] = original
        return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--engine-sample", type=int, default=16, help="coordinates timed per parameter (engine)")
    parser.add_argument("--baseline-sample", type=int, default=4, help="coordinates timed per parameter (baseline)")
    parser.add_argument("--oracle-coordinates", type=int, default=6)
    parser.add_argument("--max-memory-bytes", type=int, default=cge_engine.DEFAULT_MAX_MEMORY_BYTES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the thread's CPU time (with one thread, robust to other processes on a shared "
                             "machine); wall: elapsed time")
    parser.add_argument("--csv", default="cge_deepzero_resnet20.csv", help="under bench/results/ (or a path)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    cge_resnet20.time = SimpleNamespace(perf_counter=clock)  # time_engine's clock
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = DZResNet(DZBasicBlock, [3, 3, 3], num_classes=10).train()
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
    mask = with_dense_coordinates(model, sample_masks(model, uniform_ratios(model, 0.9), generator))
    n_coords = sum(int(m.sum()) for m in mask.values())
    named = list(model.named_parameters())
    F.cross_entropy(model(x), y).item()
    start = clock()
    for _ in range(3):
        F.cross_entropy(model(x), y).item()
    forward_s = (clock() - start) / 3

    load_start = os.getloadavg()[0]
    engine_s, samples, engine_est = time_engine(model, (x, y), mask, args.engine_sample, args.max_memory_bytes,
                                                generator)
    baseline = DeepZeroBlockReuse(model, x, y)
    baseline_s = 0.0
    with retained_heap():  # the engine's allocator setting, so that the ratio is not about malloc
        baseline.estimate(named[0][1], samples[named[0][0]][:1], 5e-3)  # warm-up (oneDNN primitives)
        for name, param in named:
            indices = torch.nonzero(mask[name].reshape(-1)).flatten()
            chosen = samples[name][:args.baseline_sample]
            start = clock()
            baseline.estimate(param, chosen, 5e-3)
            baseline_s += (clock() - start) * indices.numel() / max(1, chosen.numel())

    # the float64 naive oracle on a few coordinates, vs engine and baseline in float32 (the same coordinates)
    model64 = copy.deepcopy(model).double()
    errors_engine, errors_base = [], []
    picks = torch.randint(0, len(named), (args.oracle_coordinates,), generator=generator).tolist()
    for p in picks:
        name, param = named[p]
        idx = samples[name][:1]
        one = {n: torch.zeros_like(m) for n, m in mask.items()}
        one[name].view(-1)[idx] = True
        oracle = cge_ref(model64, (x.double(), y), mu=5e-3, mask=one)[name].reshape(-1)[idx].item()
        errors_engine.append(abs(engine_est[name][0].item() - oracle))
        errors_base.append(abs(baseline.estimate(param, idx, 5e-3).item() - oracle))

    row = {
        **run_metadata(), "model": "DeepZero resnet_s.resnet20 (DZResNet)", "batch": args.batch,
        "size": args.size, "coordinates": n_coords, "engine_sample": args.engine_sample,
        "baseline_sample": args.baseline_sample, "forward_s": round(forward_s, 4),
        "engine_step_s": round(engine_s, 1), "baseline_step_s": round(baseline_s, 1),
        "ratio": round(baseline_s / engine_s, 2), "engine_forward_equivalents": round(engine_s / forward_s, 1),
        "baseline_forward_equivalents": round(baseline_s / forward_s, 1),
        "engine_max_err_vs_f64": f"{max(errors_engine):.3g}", "baseline_max_err_vs_f64": f"{max(errors_base):.3g}",
        "oracle_coordinates": args.oracle_coordinates, "clock": args.clock,
        "load_avg_1min_start": f"{load_start:.2f}",
        "load_avg_1min_end": f"{os.getloadavg()[0]:.2f}",
    }
    for key, value in row.items():
        print(f"{key:>30}: {value}")
    append_csv_rows(args.csv, [row])


if __name__ == "__main__":
    main()
