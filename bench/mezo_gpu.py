"""MeZO on a GPU (issue 14): step time ÷ (2 × forward time), peak extra memory over inference, and drift at lr = 0,
for random-init LLaMA-architecture causal LMs scoring prompts by two label words at the last position
(bench/mezo_throughput.py's prompt_loss), batch 16 × 64 tokens, left padding. Weights do not change the cost, so
random init stands in for the checkpoints (nothing can be downloaded on the GPU machine). Shapes:
- smollm2-135m: SmolLM2-135M-Instruct's config (576 wide, 30 layers, 9/3 heads, vocab 49,152; 134.5M parameters);
- llama-1b: a Llama-3.2-1B-sized config (2048 wide, 16 layers, 32/8 heads, vocab 128,256; 1.24B parameters).

Cases, in the same run on the same batch: the MeZO code's per-tensor loop (bench/mezo_step.py's
mezo_reference_step: torch.manual_seed, torch.normal per tensor on the device, four sweeps) and zokernels.mezo_step
in 'exact' and 'inplace' mode on every backend that can run (cuda = _C's CUDA Philox sweep, triton, torch =
torch-native Philox). Times: median of `--repeats` calls, wall clock with torch.cuda.synchronize around each.
Drift: `--drift-steps` steps at lr = 0 from the same parameters; the entries that differ from the start afterwards
(exact mode must give 0; the MeZO loop's +μz, −2μz, +μz rounds).

    python3 bench/mezo_gpu.py [--models smollm2-135m,llama-1b] [--dtypes float32,bfloat16] [--repeats 10]

CSV: bench/results/mezo_gpu.csv (device name, torch/CUDA versions, date).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zokernels import backends, mezo_step  # noqa: E402

from benchlib import append_csv_rows, run_metadata  # noqa: E402
from mezo_step import mezo_reference_step  # noqa: E402
from mezo_throughput import prompt_loss  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
}


def build(shape: str, dtype: torch.dtype, batch_size: int, length: int, device: torch.device):
    """A random-init LlamaForCausalLM of `shape` and a left-padded prompt batch with two label words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, rms_norm_eps=1e-5, pad_token_id=2)
    with torch.device(device):  # initialized where it runs: a 1.2B-parameter init on the host takes tens of seconds
        model = LlamaForCausalLM(config).to(dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for row, pad in enumerate(torch.randint(0, length // 2, (batch_size,), generator=g).tolist()):
        ids[row, :pad], mask[row, :pad] = 2, 0  # left padding
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch_size,), generator=g),
             "label_words": torch.tensor([4, 5])}
    return model, {k: v.to(device) for k, v in batch.items()}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_bytes(fn) -> int:
    """Peak CUDA memory allocated during fn() above what was allocated before it (the model and batch); 0 off CUDA."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def drifted_entries(model, step, steps: int) -> int:
    """Entries that differ from the start after `steps` calls of step() (each at lr = 0)."""
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        step()
    changed = sum(int((p.detach() != s).sum()) for p, s in zip(model.parameters(), start))
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    return changed


def cases(model, batch, lr: float, backend_names: tuple[str, ...]) -> dict:
    runnable = [name for name in backend_names if backends.status(name).available]
    out = {"mezo_reference_loop": lambda: mezo_reference_step(model, batch, 1e-3, lr, 1, loss_fn=prompt_loss)}
    for backend in runnable:
        for mode in ("exact", "inplace"):
            out[f"zokernels_{mode}_{backend}"] = (
                lambda mode=mode, backend=backend: mezo_step(model, batch, prompt_loss, mu=1e-3, lr=lr, seed=1,
                                                             mode=mode, backend=backend))
    return out


@torch.no_grad()
def measure(shape: str, dtype: torch.dtype, args, device: torch.device) -> list[dict]:
    model, batch = build(shape, dtype, args.batch, args.length, device)
    params = sum(p.numel() for p in model.parameters())
    forward = lambda: prompt_loss(model, batch).item()  # noqa: E731  (the .item() every ZO query pays too)
    forward()
    forward_s = median_time(forward, args.repeats)
    forward_peak = peak_extra_bytes(forward)
    rows = []
    for case, step in cases(model, batch, 1e-7, args.backends).items():
        step()  # warm-up: Triton compilation, cuBLAS handles, allocator
        step_s = median_time(step, args.repeats)
        peak = peak_extra_bytes(step)
        zero_lr = cases(model, batch, 0.0, args.backends)[case]
        drift = drifted_entries(model, zero_lr, args.drift_steps)
        rows.append({"model": shape, "dtype": str(dtype).removeprefix("torch."), "case": case, "params": params,
                     "batch": f"{args.batch}x{args.length}", "forward_s": forward_s, "step_s": step_s,
                     "ratio_step_over_2_forwards": step_s / (2 * forward_s), "forward_peak_extra_bytes": forward_peak,
                     "step_peak_extra_bytes": peak, "param_bytes": params * model.dtype.itemsize,
                     "drift_steps_lr0": args.drift_steps, "drifted_entries": drift})
        r = rows[-1]
        print(f"{shape:13s} {r['dtype']:8s} {case:26s} step {step_s * 1e3:8.2f} ms  forward {forward_s * 1e3:7.2f} ms  "
              f"ratio {r['ratio_step_over_2_forwards']:.3f}  peak extra {peak / 2**20:8.1f} MiB "
              f"(forward {forward_peak / 2**20:.1f}, params {r['param_bytes'] / 2**20:.1f})  "
              f"drifted {drift} after {args.drift_steps} steps at lr=0", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-1b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--drift-steps", type=int, default=20)
    parser.add_argument("--backends", default="cuda,triton",
                        help="zokernels backends to time (torch: the torch-native Philox; 4.9 s per step for the "
                             "135M shape on an H200 with its former 64K-block chunks)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of this script (bench/mezo_throughput.py measures CPUs)")
    args = parser.parse_args()
    args.backends = tuple(args.backends.split(","))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/mezo_gpu.py needs a CUDA GPU (none is visible); bench/mezo_throughput.py is the CPU one")
    device = torch.device(args.device)
    meta = {**run_metadata(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "cuda": torch.version.cuda,
            "backends": " ".join(f"{n}={'yes' if s.available else 'no'}" for n, s in backends.availability().items())}
    print(meta, flush=True)
    for shape in args.models.split(","):
        for dtype in args.dtypes.split(","):
            rows = measure(shape, getattr(torch, dtype), args, device)
            if device.type == "cuda":  # per model: a timeout keeps the rows measured before it
                append_csv_rows("mezo_gpu.csv", [{**meta, **r} for r in rows])


if __name__ == "__main__":
    main()
