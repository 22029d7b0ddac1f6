"""GPU comparison for the CGE kernels (issue 4, items 1-3 and 5) on ResNet-20, batch 256, 90 % uniform sparsity:

  step   whole sparse-CGE step: the delta engine calling the GPU kernels (cuda, else triton) vs the DeepZero
         block-reuse baseline, sampled and extrapolated per parameter as bench/cge_resnet20.py does;
  ops    the kernels against the engine's torch rules on the same ResNet-20 shapes: fused first layer (conv1 +
         BN train + ReLU, K coordinates), one-channel mixing (layer1.0.conv1), masked SGD over all parameters,
         and one CUDA-graph replay of first layer + mixing vs the same launches eagerly.

    .venv/bin/python bench/cge_gpu.py [--batch 256] [--replicas 64] [--engine-sample 48] [--baseline-sample 4]

Rows go to bench/results/cge_gpu.csv with the device name. Without a GPU it prints "no GPU" and exits 0;
`--device cpu --batch 8` runs the ops part on the CPU backends as a smoke test of the script (nothing written)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import append_csv_rows, run_metadata  # noqa: E402

from zokernels.experimental.cuda_graph import query_runner  # noqa: E402
from zokernels.kernels.first_layer import BatchNormSpec, coords_from_flat, first_layer_delta  # noqa: E402
from zokernels.experimental.masked_sgd import MaskedSGD, gather_mask_indices  # noqa: E402
from zokernels.kernels.mixing import one_channel_conv2d  # noqa: E402
from zokernels.models import resnet20  # noqa: E402
from zokernels.sparsity import sample_masks, uniform_ratios, with_dense_coordinates  # noqa: E402


def timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Best of `repeats` (seconds), synchronizing the GPU around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def backends_for(device: torch.device) -> list[str]:
    return ["cuda", "triton", "torch"] if device.type == "cuda" else ["cpu", "torch"]


def ops_rows(model, x, mask, replicas: int, device: torch.device) -> list[dict]:
    """Per-op timings: each kernel backend vs the torch formulas on ResNet-20's first layers."""
    rows, generator = [], torch.Generator().manual_seed(1)
    y = model.conv1(x)
    flat = torch.nonzero(mask["conv1.weight"].reshape(-1)).flatten().to(device)
    chosen = flat[torch.randint(0, flat.numel(), (replicas,), generator=generator).to(device)]
    coords = coords_from_flat(chosen, model.conv1.weight.shape)
    steps = torch.full((replicas,), 5e-3, device=device)
    bn = BatchNormSpec.from_module(model.bn1)
    weight2 = model.layer1[0].conv1.weight.detach()
    first = first_layer_delta(x, y, coords, steps, 1, 1, bn=bn, backend="torch")
    rows += engine_rule_rows(model, x, y, chosen, steps, device)
    for backend in backends_for(device):
        t_first = timed(lambda: first_layer_delta(x, y, coords, steps, 1, 1, bn=bn, backend=backend), device)
        t_mix = timed(lambda: one_channel_conv2d(first, coords[:, 0], weight2, 1, 1, backend=backend), device)
        rows += [{"op": "first_layer_delta conv1+bn+relu", "backend": backend, "K": replicas, "ms": t_first * 1e3},
                 {"op": "one_channel_conv2d layer1.0.conv1", "backend": backend, "K": replicas, "ms": t_mix * 1e3}]
    params = [p for _, p in model.named_parameters()]
    index = gather_mask_indices(params, [mask[n] for n, _ in model.named_parameters()])
    values = torch.randn(len(index), device=device)
    for backend in backends_for(device):
        copies = [p.detach().clone() for p in params]
        sgd = MaskedSGD(copies, lr=0.1, momentum=0.9, weight_decay=5e-4, restrict_to_mask=False, backend=backend)
        rows.append({"op": f"masked_sgd dense ({len(index)} coords)", "backend": backend, "K": len(index),
                     "ms": timed(lambda: sgd.step(index, values), device) * 1e3})
    if device.type == "cuda":
        rows += graph_rows(x, y, coords, steps, bn, weight2, device)
    return rows


def engine_rule_rows(model, x, y, indices, steps, device) -> list[dict]:
    """The engine's own path for the same coordinates: seed (unfold cache reused) + BN-train rule + ReLU rule,
    and its grouped conv at the next layer."""
    from zokernels.engine import delta as rules
    from zokernels.engine.cge_engine import record_base
    from zokernels.engine.heads import Head
    from zokernels.engine.seeds import seed_delta
    from zokernels.estimators.scope import QueryScope
    named = dict(model.named_parameters())
    batch = (x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
    with QueryScope(model, list(named.values())) as guard:
        _, rec = record_base(model, batch, Head(None, batch), None, guard, named)
    param = rec.tape.params["conv1.weight"]
    conv_node = param.users[0]
    y = conv_node.value
    bn_out, statistics = model.bn1(y), rules.batch_statistics(y, model.bn1.eps)

    def chain():
        seed = seed_delta(conv_node, param, indices, steps.double(), rec.ctx)
        return rules.relu_delta(bn_out, rules.batchnorm_train_delta(y, seed, model.bn1.weight, statistics))
    first = chain()
    conv = model.layer1[0].conv1
    geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}
    return [{"op": "first_layer_delta conv1+bn+relu", "backend": "engine rules", "K": indices.numel(),
             "ms": timed(chain, device) * 1e3},
            {"op": "one_channel_conv2d layer1.0.conv1", "backend": "engine rules", "K": indices.numel(),
             "ms": timed(lambda: rules.conv_delta(first, bn_out, F.conv2d, conv.weight, geometry), device) * 1e3}]


def graph_rows(x, y, coords, steps, bn, weight2, device) -> list[dict]:
    def query(c, h):
        d = first_layer_delta(x, y, c, h, 1, 1, bn=bn, backend="cuda")
        return one_channel_conv2d(d, c[:, 0], weight2, 1, 1, backend="cuda")
    runner = query_runner(query, device, backend="cuda")
    return [{"op": "first layer + mixing, eager", "backend": "cuda", "K": coords.shape[0],
             "ms": timed(lambda: query(coords, steps), device) * 1e3},
            {"op": "first layer + mixing, CUDA graph", "backend": "cuda", "K": coords.shape[0],
             "ms": timed(lambda: runner(coords, steps), device) * 1e3}]


def step_row(model, x, y, mask, args) -> dict:
    """Whole-step engine vs block-reuse baseline on the GPU (the functions of bench/cge_resnet20.py)."""
    from cge_resnet20 import BlockReuseBaseline, time_engine
    generator = torch.Generator().manual_seed(0)
    from zokernels.backends import availability
    kernels = "cuda" if availability()["cuda"].available else "triton"
    engine_s, samples, _ = time_engine(model, (x, y), mask, args.engine_sample, 16 << 30, generator,
                                       kernel_backend=kernels)
    baseline, baseline_s = BlockReuseBaseline(model, x, y), 0.0
    for name, param in model.named_parameters():
        indices = torch.nonzero(mask[name].reshape(-1)).flatten()
        chosen = samples[name][:args.baseline_sample]
        start = time.perf_counter()
        baseline.estimate(name, param, chosen, 5e-3)
        torch.cuda.synchronize()
        baseline_s += (time.perf_counter() - start) * indices.numel() / max(1, chosen.numel())
    return {"op": "sparse-CGE step (engine, torch ops) vs block reuse", "backend": "engine", "K": "",
            "ms": engine_s * 1e3, "baseline_ms": baseline_s * 1e3, "ratio": baseline_s / engine_s}


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=64, help="K coordinates per kernel launch")
    parser.add_argument("--engine-sample", type=int, default=48)
    parser.add_argument("--baseline-sample", type=int, default=4)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--skip-step", action="store_true", help="only the per-op timings")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing measured (use --device cpu for a smoke test)")
        return 0
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # strict fp32: TF32 would swamp loss differences of size ~mu
    model = resnet20().train().to(device)
    x, y = torch.randn(args.batch, 3, 32, 32, device=device), torch.randint(0, 10, (args.batch,), device=device)
    mask = with_dense_coordinates(model, sample_masks(model, uniform_ratios(model, 0.9),
                                                      torch.Generator().manual_seed(0)))
    rows = ops_rows(model, x, mask, args.replicas, device)
    if device.type == "cuda" and not args.skip_step:
        rows.append(step_row(model, x, y, mask, args))
    meta = {**run_metadata(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "batch": args.batch}
    for row in rows:
        print(" | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if device.type == "cuda":
        print("wrote", append_csv_rows("cge_gpu.csv", [{**meta, **row} for row in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
