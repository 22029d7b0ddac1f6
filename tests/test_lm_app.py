"""Transformers through mezo_step and ZOSVRG (a tiny random BERT, nothing downloaded), and the lm app's data
split."""
import pytest
import torch

from zokernels import ZOSVRG, mezo_step

from helpers import FLOAT32_UNIT_ROUNDOFF, assert_float32_error_within

transformers = pytest.importorskip("transformers")


def tiny_bert(dtype=torch.float32):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval().to(dtype)


def bert_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 50, (n, 12), generator=g), "attention_mask": torch.ones(n, 12).long(),
            "labels": torch.randint(0, 2, (n,), generator=g)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_tiny_bert_mezo_step_moves_only_selected_parameters(dtype, mode):
    model = tiny_bert(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = mezo_step(model, batch(), bert_loss, mu=1e-3, lr=1e-2, seed=1, q=2, mode=mode,
                       param_filter=lambda n, p: n.startswith("classifier") or n.endswith("bias"))
    assert result.num_queries == 4 and len(result.projected_grads) == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("classifier") or n.endswith("bias") for n in changed)


def test_tiny_bert_svrg_lowers_full_batch_loss():
    model = tiny_bert()
    full = [batch(16, s) for s in range(2)]
    start = sum(bert_loss(model, b).item() for b in full) / 2
    opt = ZOSVRG(model, full, bert_loss, q=3, lr_anchor=0.05, lr=0.01, mu=1e-3, seed=0)
    results = [opt.step(full[i % 2]) for i in range(12)]
    assert sum(r.anchor for r in results) == 4
    with torch.no_grad():
        end = sum(bert_loss(model, b).item() for b in full) / 2
    assert end < start


def test_state_dict_round_trip_resumes_identically():
    runs = []
    for resume in (False, True):
        model = tiny_bert()
        full = [batch(16, 0)]
        opt = ZOSVRG(model, full, bert_loss, q=2, lr_anchor=0.05, lr=0.01, seed=3)
        for _ in range(3):
            opt.step(batch(8, 5))
        if resume:
            state, weights = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
            model = tiny_bert()
            model.load_state_dict(weights)
            opt = ZOSVRG(model, full, bert_loss, q=2, lr_anchor=0.05, lr=0.01, seed=99)
            opt.load_state_dict(state)
        for _ in range(3):
            opt.step(batch(8, 6))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_tweet_splits_are_disjoint_balanced_sizes():
    from zokernels.apps import lm

    try:
        splits = lm.load_tweets(512, 256, 256, seed=0)
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    assert [len(splits[k][0]) for k in ("train", "val", "test")] == [512, 256, 256]
    texts = [t for k in ("train", "val", "test") for t in splits[k][0]]
    assert len(set(texts)) > 0.98 * len(texts)
    labels = torch.cat([splits[k][1] for k in ("train", "val", "test")])
    assert set(labels.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="n_train"):
        lm.load_tweets(10**6, 0, 0, seed=0)


# ---- the app: balanced splits, pooling, padding trim, forward accounting, final evaluation ----

def tweets_or_skip(*args, **kwargs):
    from zokernels.apps import lm

    try:
        return lm.load_tweets(*args, **kwargs)
    except ModuleNotFoundError as error:
        pytest.skip(str(error))


def test_balanced_splits_are_half_positive_disjoint_and_seeded():
    splits = tweets_or_skip(64, 32, 32, seed=3, balanced=True)
    for name, n in (("train", 64), ("val", 32), ("test", 32)):
        texts, labels = splits[name]
        assert len(texts) == n and int(labels.sum()) == n // 2
        assert 0 < int(labels[: n // 2].sum()) < n // 2  # shuffled, not sorted by class
    texts = [t for k in ("train", "val", "test") for t in splits[k][0]]
    assert len(set(texts)) > 0.95 * len(texts)
    again = tweets_or_skip(64, 32, 32, seed=3, balanced=True)
    assert again["test"][0] == splits["test"][0]
    assert tweets_or_skip(64, 32, 32, seed=4, balanced=True)["test"][0] != splits["test"][0]
    # unbalanced sampling keeps the corpus' skew (70 % negative): the majority class is what a stuck model predicts
    skewed = tweets_or_skip(512, 256, 256, seed=0)
    assert float(skewed["test"][1].float().mean()) < 0.4


@pytest.mark.parametrize("sizes, match", [((63, 32, 32), "even sizes"), ((0, 32, 32), "n_train"),
                                          ((10**5, 32, 32), "balanced")])
def test_balanced_split_bad_sizes_are_named(sizes, match):
    with pytest.raises(ValueError, match=match):
        tweets_or_skip(*sizes, seed=0, balanced=True)


def test_trim_padding_keeps_logits_and_drops_unused_columns():
    from zokernels.apps import lm

    model = tiny_bert()
    b = batch(6)
    b["attention_mask"][:, 9:] = 0
    b["attention_mask"][0, 9:11] = 1
    trimmed = lm.trim_padding(b)
    assert trimmed["input_ids"].shape == (6, 11) and torch.equal(trimmed["labels"], b["labels"])
    with torch.no_grad():
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        oracle = model.double()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        trimmed = lm.logits_of(model.float(), b)
    # masked columns get zero attention weight, so trimming changes only the float32 rounding (other sequence
    # lengths, other kernels): within 2x the full-length float32 error vs float64, measured here
    assert_float32_error_within(trimmed, full, oracle, factor=2,
                                floor=FLOAT32_UNIT_ROUNDOFF * oracle.abs().max().item(), what="trimmed logits")


def test_mean_pool_classifier_ignores_padding_and_drops_the_pooler():
    from zokernels.apps import lm

    torch.manual_seed(0)
    encoder = transformers.BertModel(tiny_bert().config)
    model = lm.MeanPoolClassifier(encoder, num_labels=2).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any("pooler" in n for n in names) and {"classifier.weight", "classifier.bias"} <= set(names)
    assert float(model.classifier.weight.detach().std()) < 0.05 and torch.all(model.classifier.bias == 0)
    ids = torch.randint(5, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(3, 7), torch.zeros(3, 5)], 1).long()
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=torch.ones(3, 7).long()).logits
        long = model(input_ids=padded, attention_mask=mask).logits
        oracle = model.double()(input_ids=ids, attention_mask=torch.ones(3, 7).long()).logits
    # padding is ignored exactly (zero attention weight, excluded from the mean), so the padded float32 logits
    # differ from the short ones by rounding only: within 2x the short float32 error vs float64, measured here
    assert_float32_error_within(long, short, oracle, factor=2,
                                floor=FLOAT32_UNIT_ROUNDOFF * oracle.abs().max().item(), what="padded logits")


def test_pooling_auto_reads_sentence_transformers_config(tmp_path):
    from zokernels.apps import lm

    assert not lm.sentence_transformers_mean_pooling(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert lm.sentence_transformers_mean_pooling(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert not lm.sentence_transformers_mean_pooling(tmp_path)
    with pytest.raises(ValueError, match="pooling"):
        lm.load_model(str(tmp_path), pooling="max")


def tiny_model_dir(path, mean_pooling=False):
    """A tiny random BERT + word-piece tokenizer saved like a Hugging Face model directory (nothing downloaded)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ("the a to i you and for on my is it of in at not no "
                                                              "thanks great love good bad flight late delayed "
                                                              "cancelled hours service worst best help").split()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=40)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    if mean_pooling:
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return path


def app_args(model_dir, out, **overrides):
    import argparse

    from zokernels.apps import lm

    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    args = parser.parse_args(["--model-dir", str(model_dir), "--out", str(out), "--n-train", "64", "--n-val", "32",
                              "--n-test", "32", "--batch-size", "8", "--max-length", "24", "--balanced"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("method, params, lr", [("svrg", "bias_norm_head", 1e-3), ("fo", "head", 0.1),
                                                ("mezo", "all", 1e-4)])
def test_app_charges_forwards_exactly_and_writes_final_result(tmp_path, method, params, lr):
    import csv
    import json

    from zokernels.apps import lm_train

    tweets_or_skip(2, 2, 2, seed=0)
    model_dir = tiny_model_dir(tmp_path / "model", mean_pooling=True)
    # anchor 20 examples in chunks of 8 → 3 forwards per anchor query, 6 per anchor step; minibatch steps 4
    args = app_args(model_dir, tmp_path / "out", method=method, params=params, lr=lr, lr_anchor=1e-3, q=3,
                    anchor_size=20, budget_forwards=30, eval_every_forwards=10, plot=False)
    assert lm_train.run(args) == 0
    with open(tmp_path / "out" / f"{method}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    forwards = [int(r["forwards"]) for r in rows]
    per_step = {"svrg": [6, 4, 4], "fo": [3], "mezo": [2]}[method]
    expected = [sum(per_step[i % len(per_step)] for i in range(k + 1)) for k in range(len(rows))]
    assert forwards == expected and forwards[-1] >= 30 > forwards[-2]
    evaluated = [int(r["forwards"]) for r in rows if r["val_acc"] != ""]
    crossings = [f for k, f in enumerate(forwards) if f // 10 > (forwards[k - 1] if k else 0) // 10]
    assert evaluated == crossings and all(0 <= float(r["val_acc"]) <= 1 for r in rows if r["val_acc"] != "")
    result = json.loads((tmp_path / "out" / f"{method}_result.json").read_text())
    assert result["forwards"] == forwards[-1] and result["steps"] == len(rows)
    assert {"val_acc", "test_acc", "train_loss", "val_loss"} <= set(result) and 0 <= result["test_acc"] <= 1


def test_app_resume_continues_identically(tmp_path):
    from zokernels.apps import lm_train

    tweets_or_skip(2, 2, 2, seed=0)
    model_dir = tiny_model_dir(tmp_path / "model")  # no 1_Pooling: the [CLS] pooler classifier
    common = dict(method="svrg", params="all", lr=1e-3, lr_anchor=1e-3, q=2, anchor_size=16, eval_every_forwards=None,
                  eval_every=1000, checkpoint_every=1000, plot=False)
    lm_train.run(app_args(model_dir, tmp_path / "straight", budget_forwards=24, **common))
    lm_train.run(app_args(model_dir, tmp_path / "split", budget_forwards=12, **common))
    lm_train.run(app_args(model_dir, tmp_path / "split", budget_forwards=24, resume=True, **common))
    a = torch.load(tmp_path / "straight" / "svrg.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "svrg.pt", weights_only=False)
    assert a["forwards"] == b["forwards"] == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("overrides, match", [({"anchor_size": 65, "method": "svrg"}, "anchor-size"),
                                              ({"budget_forwards": 0}, "budget-forwards"),
                                              ({"eval_every_forwards": 0}, "eval-every-forwards")])
def test_app_bad_arguments_are_named(tmp_path, overrides, match):
    from zokernels.apps import lm_train

    args = app_args(tmp_path, tmp_path / "out", **overrides)
    with pytest.raises(ValueError, match=match):
        lm_train.run(args)
