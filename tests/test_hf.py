"""Hugging Face-native use (issue 14): the verbs on dict batches and ModelOutput, peft models, and ZOTrainer.

Models are tiny random-init instances of transformers' own classes (BertForSequenceClassification,
LlamaForCausalLM: hidden 32, 2 layers, vocabulary 100), so nothing is downloaded.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from zokernels import cge_step, mezo_step, rge_step  # noqa: E402
from zokernels.estimators.mezo import select_parameters  # noqa: E402
from zokernels.reference.oracle import cge_oracle  # noqa: E402

VOCAB = 100


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def bert_batch(n=4, t=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t - 3:] = 0  # right padding (BERT)
    return {"input_ids": torch.randint(0, VOCAB, (n, t), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 2, (n,), generator=g)}


def llama_batch(n=4, t=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, :3] = 0  # left padding (causal LM scoring)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


MODELS = {"bert": (tiny_bert, bert_batch), "llama": (tiny_llama, llama_batch)}


def model_loss(model, batch):
    """What a Hugging Face user writes by hand: the model's own loss."""
    return model(**batch).loss


def states_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- 1. the verbs on dict batches and ModelOutput ---------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_mezo_step_on_a_dict_batch_uses_the_models_own_loss(kind, mode):
    make, make_batch = MODELS[kind]
    model, batch = make().eval(), make_batch()
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    assert isinstance(model(**batch), transformers.utils.ModelOutput)
    result = mezo_step(model, batch, mu=1e-3, lr=1e-2, seed=7, q=2, mode=mode)
    by_hand = mezo_step(twin, batch, model_loss, mu=1e-3, lr=1e-2, seed=7, q=2, mode=mode)
    assert result.projected_grads == by_hand.projected_grads and result.loss == by_hand.loss
    assert states_equal(model, twin)
    assert not states_equal(model, initial)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_rge_step_on_a_dict_batch_uses_the_models_own_loss(kind):
    make, make_batch = MODELS[kind]
    model, batch = make().eval(), make_batch()
    twin = copy.deepcopy(model)
    result = rge_step(model, batch, mu=1e-3, q=3, seed=5)
    by_hand = rge_step(twin, batch, model_loss, mu=1e-3, q=3, seed=5)
    assert result.loss == by_hand.loss == model_loss(model, batch).item()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_dict_batch_without_labels_needs_a_loss():
    model, batch = tiny_llama().eval(), llama_batch()
    del batch["labels"]  # no outputs.loss, no targets for the default cross-entropy
    before = copy.deepcopy(model)
    with pytest.raises((TypeError, ValueError), match="labels"):
        mezo_step(model, batch, mu=1e-3, lr=1e-2, seed=1)
    assert states_equal(model, before)


def _random_mask(model, names_like, per_parameter=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = {}
    for name, p in model.named_parameters():
        if p.requires_grad and any(key in name for key in names_like):
            flat = torch.zeros(p.numel(), dtype=torch.bool)
            flat[torch.randperm(p.numel(), generator=g)[:per_parameter]] = True
            mask[name] = flat.view(p.shape)
    assert mask
    return mask


def _cge_against_oracle(model, batch, mask):
    """Max |error| vs the float64 oracle of cge_step (engine 'auto' and 'naive') on the masked coordinates."""
    mu = 2.0 ** -8  # a float32 number: the oracle's points are the float32 run's (reference/oracle.py)
    oracle = cge_oracle(model, batch, mask, mu)
    before = copy.deepcopy(model)
    errors = {}
    for engine in ("auto", "naive"):
        result = cge_step(model, batch, mu=mu, mask=mask, engine=engine)
        assert states_equal(model, before), f"{engine}: the step changed the model"
        errors[engine] = max((p.grad.double() - oracle.estimates[n])[mask[n]].abs().max().item()
                             for n, p in model.named_parameters() if n in mask)
        for name, p in model.named_parameters():
            if p.requires_grad:
                outside = p.grad[~mask[name]] if name in mask else p.grad
                assert not outside.any(), f"{engine}: estimates outside the mask in {name}"
        model.zero_grad(set_to_none=True)
    return errors, result


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cge_step_on_a_dict_batch_matches_the_float64_oracle(kind):
    make, make_batch = MODELS[kind]
    model, batch = make().eval(), make_batch()
    mask = _random_mask(model, ["embed", "layers.0.", "layer.0.", "norm", "classifier", "lm_head"])
    errors, _ = _cge_against_oracle(model, batch, mask)
    # The naive path (one float32 forward per coordinate) is the yardstick, measured here, as in
    # tests/test_foreign_models.py: the engine's error vs the oracle must not exceed it.
    assert 0 < errors["naive"] and errors["auto"] <= errors["naive"], errors


# ---- peft: what is trained is what requires grad ----------------------------------------------------------------

peft = pytest.importorskip("peft")


def peft_llama(kind):
    configs = {
        # init_lora_weights=False: B is random too, so the adapter's output depends on A (the default B = 0 would
        # make ∂ℓ/∂A = 0 at the start).
        "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                        lora_dropout=0.0, init_lora_weights=False),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
    }
    model = peft.get_peft_model(tiny_llama(), configs[kind]())
    torch.manual_seed(4)
    with torch.no_grad():  # (IA)³ starts at exactly 1 and prefix embeddings at N(0, 1): move them off the init
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _adapter_and_base(model):
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    base = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert adapter and base
    return adapter, base


@pytest.mark.parametrize("kind", ["lora", "prefix", "ia3"])
@pytest.mark.parametrize("verb", ["mezo_exact", "mezo_inplace", "rge_sgd"])
def test_peft_model_trains_its_adapter_only(kind, verb):
    model, batch = peft_llama(kind), llama_batch()
    adapter, base = _adapter_and_base(model)
    assert {n for n, _ in select_parameters(model, None)} == adapter  # selection = requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(2):
        if verb == "rge_sgd":
            rge_step(model, batch, mu=1e-3, q=2, seed=step)
            optimizer.step()
        else:
            mezo_step(model, batch, mu=1e-3, lr=1e-2, seed=step, mode=verb.split("_")[1])
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in base), "a frozen base weight changed"
    assert all(after[n].grad is None for n in base)
    changed = {n for n in adapter if not torch.equal(after[n], before[n])}
    assert changed == adapter, f"adapter tensors left unchanged: {sorted(adapter - changed)}"


def test_cge_step_on_a_lora_model_estimates_adapter_coordinates_only():
    model, batch = peft_llama("lora"), llama_batch()
    adapter, base = _adapter_and_base(model)
    mask = _random_mask(model, ["lora_A", "lora_B"])
    errors, result = _cge_against_oracle(model, batch, mask)
    assert 0 < errors["naive"] and errors["auto"] <= errors["naive"], errors
    assert result.num_coordinates == sum(int(m.sum()) for m in mask.values())
    frozen = next(iter(sorted(base)))
    with pytest.raises(ValueError, match="not a trainable parameter"):
        cge_step(model, batch, mask={frozen: torch.ones_like(dict(model.named_parameters())[frozen],
                                                             dtype=torch.bool)})


def test_requires_grad_false_is_never_touched_on_a_plain_model():
    model, batch = tiny_bert().eval(), bert_batch()
    model.bert.embeddings.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    mezo_step(model, batch, mu=1e-3, lr=1e-1, seed=1)
    mezo_step(model, batch, mu=1e-3, lr=1e-1, seed=2, mode="inplace")
    rge_step(model, batch, mu=1e-3, seed=3)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p.grad is None, name


# ---- 2. ZOTrainer --------------------------------------------------------------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, t=8, seed=5, causal=False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, t), generator=g)
        self.labels = self.ids.clone() if causal else torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def training_args(out, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                  learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                  dataloader_num_workers=0, seed=42)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def zo_trainer(model, args, **kwargs):
    from zokernels.hf import ZOTrainer
    causal = not isinstance(model, transformers.BertForSequenceClassification)
    return ZOTrainer(model=model, args=args, train_dataset=TokenDataset(causal=causal),
                     eval_dataset=TokenDataset(8, seed=6, causal=causal), **kwargs)


def recording_trainer(seen: list):
    """A ZOTrainer class that appends (inputs, lr, global step) to `seen` before each training step."""
    from zokernels.hf import ZOTrainer

    class Recording(ZOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(({k: v.clone() for k, v in inputs.items()}, self._get_learning_rate(),
                         self.state.global_step))
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def test_zotrainer_step_is_exactly_a_mezo_step(tmp_path):
    """Train mode (BERT's dropout on): each ZOTrainer step equals mezo_step on the same micro-batch, with the
    scheduled lr, the Philox seed step_seed(seed, k) and the forwards' RNG seeded by step_seed(seed, k, 'forward')."""
    from zokernels.hf import step_seed
    seen = []
    Recording = recording_trainer(seen)
    model = tiny_bert()
    initial = copy.deepcopy(model)
    trainer = Recording(model=model, args=training_args(tmp_path, lr_scheduler_type="linear"),
                        train_dataset=TokenDataset(), mu=1e-2, q=2)
    trainer.train()
    assert [s for _, _, s in seen] == [0, 1, 2] and len({lr for _, lr, _ in seen}) == 3  # lr decays linearly

    twin = initial.train()
    loss = lambda m, batches: sum(m(**b).loss.item() for b in batches) / len(batches)  # noqa: E731
    for inputs, lr, step in seen:
        with torch.random.fork_rng():
            torch.manual_seed(step_seed(42, step, "forward"))
            mezo_step(twin, [inputs], loss, mu=1e-2, lr=lr, seed=step_seed(42, step), q=2)
    assert states_equal(model, twin)
    assert not states_equal(model, tiny_bert())
    from zokernels.hf import ScheduleOnlyOptimizer
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), ScheduleOnlyOptimizer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    assert all("projected_grad" in e and "grad_norm" not in e for e in trainer.state.log_history if "loss" in e)


def test_zotrainer_at_lr_zero_leaves_the_model_bit_identical(tmp_path):
    """Nothing but the ZO step writes the parameters: with lr = 0 (exact mode) they do not move."""
    model = tiny_bert()
    before = copy.deepcopy(model)
    zo_trainer(model, training_args(tmp_path), lr=0.0, mu=1e-2).train()
    assert states_equal(model, before)


def test_zotrainer_checkpoint_resumes_identically(tmp_path):
    """max_steps=3 with a checkpoint at step 2 (and evaluation); a fresh trainer with a differently initialized
    model resumed from checkpoint-2 ends bit-identical to the uninterrupted run, with the same step-3 loss."""
    args = lambda out: training_args(out, save_steps=2, eval_strategy="steps", eval_steps=2)  # noqa: E731
    model = tiny_bert()
    first = zo_trainer(model, args(tmp_path / "a"), mu=1e-2)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "optimizer.pt").exists()
    assert any("eval_loss" in e for e in first.state.log_history)

    resumed_model = tiny_bert(seed=123)  # only the checkpoint can make it equal
    assert not states_equal(resumed_model, model)
    second = zo_trainer(resumed_model, args(tmp_path / "b"), mu=1e-2)
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 3
    assert states_equal(resumed_model, model)
    step3 = [[e["loss"] for e in t.state.log_history if e.get("step") == 3 and "loss" in e] for t in (first, second)]
    assert step3[0] == step3[1] and len(step3[0]) == 1


def test_zotrainer_trains_a_lora_adapter_only(tmp_path):
    model = peft_llama("lora").train()
    adapter, base = _adapter_and_base(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = zo_trainer(model, training_args(tmp_path, max_steps=2), lr=1e-2, mu=1e-2)
    trainer.train()
    assert ({id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            == {id(p) for n, p in model.named_parameters() if n in adapter})
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in base)
    assert all(not torch.equal(after[n], before[n]) for n in adapter)


def test_zotrainer_gradient_accumulation_is_one_zo_step_over_the_micro_batches(tmp_path):
    from zokernels.hf import ZOTrainer
    calls = []

    class Counting(ZOTrainer):
        def zo_loss(self, model, batches):
            calls.append((self.state.global_step, len(batches)))
            return super().zo_loss(model, batches)

    model = tiny_bert()
    trainer = Counting(model=model, args=training_args(tmp_path, max_steps=2, gradient_accumulation_steps=2,
                                                       per_device_train_batch_size=2),
                       train_dataset=TokenDataset(), mu=1e-2, q=1)
    trainer.train()
    assert sorted(set(calls)) == [(0, 2), (1, 2)]  # every query of a step sees both micro-batches
    assert len(calls) == 2 * 2  # two queries (±) per step, two steps


def test_zotrainer_refuses_an_optimizer(tmp_path):
    from zokernels.hf import ZOTrainer
    model = tiny_bert()
    with pytest.raises(ValueError, match="no optimizer"):
        ZOTrainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(),
                  optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="mode"):
        ZOTrainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(), mode="bogus")
