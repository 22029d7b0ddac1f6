"""Prompt-based classification with a causal LM (issue 14; zokernels/apps/lm_prompt.py and the prompt path of
`zokernels train lm`) on a tiny random-init LlamaForCausalLM and a tiny byte-level BPE tokenizer trained here:
nothing is downloaded."""
import json

import pytest
import torch
import torch.nn.functional as F

from zokernels import mezo_step

from helpers import FLOAT32_UNIT_ROUNDOFF, assert_float32_error_within

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from zokernels.apps import lm_prompt  # noqa: E402

CORPUS = ["the flight was late again", "thanks for the great service", "worst airline ever, my bag is lost",
          "love the crew, best flight", "delayed for hours and nobody helps", "It was great", "It was terrible",
          "it was a great day", "terrible service at the gate", "great crew and great food"]


def tiny_tokenizer():
    """Byte-level BPE like SmolLM2's (leading spaces are part of a word's token), trained on a few sentences so that
    " great" and " terrible" are single tokens; eos as the only special token (no pad: pad = eos, as SmolLM2)."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=400, min_frequency=2, special_tokens=["<eos>"], show_progress=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")


def tiny_llama(vocab_size):
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True,
                                      initializer_range=0.2)  # larger than the default 0.02: logits that vary
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def texts_labels(n=6):
    texts = [CORPUS[i % 5] + (" and more words" * (i % 3)) for i in range(n)]
    return texts, torch.tensor([i % 2 for i in range(n)])


def test_prompt_batch_left_pads_truncates_left_and_finds_label_words(tok):
    words = lm_prompt.label_word_ids(tok)
    assert [tok.decode([int(i)]) for i in words] == [" terrible", " great"]
    texts, labels = texts_labels()
    batch = lm_prompt.encode_prompts(tok, texts, labels, max_length=20)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (6, 20) and torch.equal(batch["labels"], labels)
    tail = tok("\nIt was", add_special_tokens=False)["input_ids"]
    lengths = mask.sum(1)
    for row in range(6):
        assert ids[row, -len(tail):].tolist() == tail  # every prompt ends with the template's tail
        assert mask[row, -int(lengths[row]):].all() and not mask[row, :20 - int(lengths[row])].any()  # left padding
        assert (ids[row, :20 - int(lengths[row])] == tok.pad_token_id).all()
    full = tok([f"{t}\nIt was" for t in texts])["input_ids"]
    long = max(range(6), key=lambda r: len(full[r]))
    assert len(full[long]) > 20 and ids[long].tolist() == full[long][-20:]  # cut on the left
    assert lengths.min() < 20  # some prompt is padded
    trimmed = lm_prompt.trim_left_padding(batch)
    assert trimmed["input_ids"].shape[1] == int(lengths.max()) and torch.equal(trimmed["labels"], labels)
    with pytest.raises(ValueError, match="label_words"):
        lm_prompt.label_word_ids(tok, (" terrible", " nobody helps"))
    with pytest.raises(ValueError, match="template"):
        lm_prompt.encode_prompts(tok, texts, labels, 20, template="It was")


def reference_scores(model, tok, texts, template="{text}\nIt was"):
    """Each prompt alone, unpadded, full logits (no logits_to_keep): the last position's full vocabulary row."""
    rows = []
    for text in texts:
        ids = torch.tensor([tok(template.format(text=text))["input_ids"]])
        rows.append(model(input_ids=ids).logits[0, -1])
    return torch.stack(rows)


def test_left_padded_last_position_label_logits_match_each_prompt_alone(tok):
    model = tiny_llama(len(tok))
    words = lm_prompt.label_word_ids(tok)
    texts, labels = texts_labels()
    batch = lm_prompt.encode_prompts(tok, texts, labels, max_length=40)
    assert lm_prompt.supports_logits_to_keep(model)
    scorer = lm_prompt.PromptScorer(words, logits_to_keep=True)
    with torch.no_grad():
        got = scorer.logits(model, batch)
        alone32 = reference_scores(model, tok, texts)[:, words]
        oracle = reference_scores(model.double(), tok, texts)[:, words]
        model.float()
        full = lm_prompt.PromptScorer(words, logits_to_keep=False).logits(model, batch)
    assert got.shape == (6, 2) and got.dtype == torch.float32
    # padding has zero attention weight and positions count real tokens only, so the padded batch differs from
    # each prompt alone by float32 rounding: within 4x the unpadded float32 error vs float64, measured here
    floor = 8 * FLOAT32_UNIT_ROUNDOFF * oracle.abs().max().item()
    assert_float32_error_within(got, alone32, oracle, factor=4, floor=floor, what="padded label-word logits")
    assert_float32_error_within(full, alone32, oracle, factor=4, floor=floor, what="logits without logits_to_keep")
    assert got.std() > 0.1  # the scores vary between prompts: the comparison above is not between constants


def test_loss_is_cross_entropy_over_the_label_word_logits(tok):
    model = tiny_llama(len(tok))
    words = lm_prompt.label_word_ids(tok)
    texts, labels = texts_labels()
    batch = lm_prompt.encode_prompts(tok, texts, labels, max_length=40)
    scorer = lm_prompt.PromptScorer(words)
    with torch.no_grad():
        loss = scorer(model, batch)
        logits = reference_scores(model.double(), tok, texts)
    # by hand, in float64: -log softmax over the two label words' logits at the last position, averaged
    picked = logits[:, words]
    by_hand = torch.stack([torch.logsumexp(picked[i], 0) - picked[i, labels[i]] for i in range(6)]).mean()
    vocabulary_ce = F.cross_entropy(logits, words[labels])  # over the whole vocabulary: a different number
    assert abs(vocabulary_ce - by_hand) > 1.0
    # float32 logits of magnitude |z| carry errors of a few ulp(|z|); the loss inherits them
    bound = 64 * FLOAT32_UNIT_ROUNDOFF * max(1.0, picked.abs().max().item())
    assert abs(loss.item() - by_hand.item()) <= bound, (loss.item(), by_hand.item(), bound)


@pytest.mark.parametrize("lora", [False, True])
def test_one_mezo_step_on_the_prompt_loss(tok, lora):
    model = tiny_llama(len(tok))
    if lora:
        pytest.importorskip("peft")
        model = lm_prompt.add_lora(model, r=4, alpha=8).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts, labels = texts_labels()
    batch = lm_prompt.encode_prompts(tok, texts, labels, max_length=40)
    scorer = lm_prompt.PromptScorer(lm_prompt.label_word_ids(tok))
    with torch.no_grad():
        start = scorer(model, batch).item()
    result = mezo_step(model, batch, scorer, mu=1e-2, lr=1e-3, seed=3)
    assert result.num_queries == 2 and abs(result.loss - start) < 0.1  # (l+ + l-)/2 near l(theta)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if lora:  # the adapter moves (its B matrices start at zero, so A gets no signal yet), the base does not
        assert changed and all("lora_" in n for n in changed)
        assert any("lora_B" in n for n in changed)
    else:
        assert changed == set(before)


def save_tiny_causal_lm(path, tok):
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    tiny_llama(len(tok)).save_pretrained(path)
    return path


def prompt_args(model_dir, out, **overrides):
    import argparse

    from zokernels.apps import lm

    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    args = parser.parse_args(["--model-dir", str(model_dir), "--out", str(out), "--n-train", "16", "--n-val", "8",
                              "--n-test", "16", "--batch-size", "4", "--max-length", "32", "--balanced",
                              "--eval-every-forwards", "1000", "--checkpoint-every", "1000"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def tweets_or_skip():
    from zokernels.apps import lm

    try:
        lm.load_tweets(2, 2, 2, seed=0)
    except ModuleNotFoundError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("method, params, lr", [("mezo", "lora", 1e-3), ("fo", "all", 1e-2)])
def test_app_reports_zero_shot_then_trains(tmp_path, tok, method, params, lr):
    from zokernels.apps import lm, lm_train

    tweets_or_skip()
    if params == "lora":
        pytest.importorskip("peft")
    model_dir = save_tiny_causal_lm(tmp_path / "model", tok)
    args = prompt_args(model_dir, tmp_path / "out", method=method, params=params, lr=lr, mu=1e-2,
                       budget_forwards=6)
    assert lm_train.run(args) == 0
    result = json.loads((tmp_path / "out" / f"{method}_result.json").read_text())
    assert result["forwards"] == 6 and result["steps"] == {"mezo": 3, "fo": 2}[method]
    assert result["train_acc"] is None and 0 <= result["test_acc"] <= 1 and result["peak_rss_mib"] > 0
    # LoRA r = 8 (the default): per layer q_proj 8 x (32 in + 32 out) and v_proj 8 x (32 in + 16 out, 2 kv heads)
    assert result["tuned_params"] == (sum(p.numel() for p in tiny_llama(len(tok)).parameters()) if params == "all"
                                      else 2 * (8 * (32 + 32) + 8 * (32 + 16)))
    # the zero-shot starting point is the untouched model's accuracy on the same test split
    splits = lm.load_tweets(16, 8, 16, seed=0, balanced=True)
    test = lm_prompt.encode_prompts(tok, *splits["test"], max_length=32)
    expected = lm_prompt.evaluate_prompts(tiny_llama(len(tok)), test,
                                          lm_prompt.PromptScorer(lm_prompt.label_word_ids(tok)))
    assert result["zero_shot"]["test_acc"] == expected[0]
    assert result["zero_shot"]["test_loss"] == pytest.approx(expected[1], rel=1e-5)
    if method == "fo":  # full parameters trained: the test loss moved off the starting point
        assert result["test_loss"] != result["zero_shot"]["test_loss"]


def test_app_zero_shot_only_and_named_argument_errors(tmp_path, tok):
    from zokernels.apps import lm_train

    tweets_or_skip()
    model_dir = save_tiny_causal_lm(tmp_path / "model", tok)
    assert lm_train.run(prompt_args(model_dir, tmp_path / "zs", zero_shot_only=True)) == 0
    written = json.loads((tmp_path / "zs" / "zero_shot_result.json").read_text())
    assert 0 <= written["zero_shot"]["test_acc"] <= 1 and not (tmp_path / "zs" / "mezo.csv").exists()
    assert lm_train.run(prompt_args(model_dir, tmp_path / "skip", no_zero_shot=True, budget_forwards=2,
                                    params="bias_norm", lr=1e-3)) == 0
    skipped = json.loads((tmp_path / "skip" / "mezo_result.json").read_text())
    # bias_norm on LLaMA = the RMSNorm weights (no biases): 2 per layer + the final norm, 32 each
    assert skipped["zero_shot"] is None and skipped["forwards"] == 2 and skipped["tuned_params"] == (2 * 2 + 1) * 32
    for overrides, match in [({"params": "head"}, "--params head"), ({"params": "bias_norm_head"}, "--params"),
                             ({"label_words": " great"}, "--label-words"),
                             ({"label_words": " terrible, nobody helps"}, "label_words"),
                             ({"lora_r": 0, "params": "lora"}, "--lora-r")]:
        with pytest.raises(ValueError, match=match):
            lm_train.run(prompt_args(model_dir, tmp_path / "bad", **overrides))
    encoder_dir = tmp_path / "encoder"  # a BERT encoder: no LoRA on the head path, no zero-shot
    encoder_dir.mkdir()
    (encoder_dir / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert not lm_prompt.is_causal_lm_dir(encoder_dir) and lm_prompt.is_causal_lm_dir(model_dir)
    for overrides, match in [({"params": "lora"}, "--params lora"), ({"zero_shot_only": True}, "--zero-shot-only")]:
        with pytest.raises(ValueError, match=match):
            lm_train.run(prompt_args(encoder_dir, tmp_path / "bad", **overrides))
