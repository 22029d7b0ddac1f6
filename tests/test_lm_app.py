"""Transformers through mezo_step and ZOSVRG (a tiny random BERT, nothing downloaded), and the lm app's data
split."""
import pytest
import torch

from zokernels import ZOSVRG, mezo_step

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
