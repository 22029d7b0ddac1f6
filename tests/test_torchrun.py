"""Data-parallel ZO on torch.distributed, launched by torchrun with 2 gloo processes (issue 14).

Each rank evaluates its own shard of the batch; only loss scalars are exchanged (zokernels.distributed.ShardedLoss).
Checked here:
- after every step the two ranks' parameters are bit-identical (DataParallelZO.check_replicas after each step, and
  an exact comparison of the saved states), and a one-ulp difference on one rank is caught;
- where the math says the result must equal one process's, it does, bit for bit: a single process evaluating the
  two shards one after another with the same combination (SequentialShardLoss) gets the same projected gradients,
  losses and parameters as the 2-rank run, for mezo_step (exact and in-place modes) and rge_step + SGD;
- perturbation-parallel MeZO (PerturbationParallelZO) on the same ranks, tiny LLaMA, full batch on both, q = 4 then
  q = 1 (ℓ⁺ on rank 0, ℓ⁻ on rank 1): ranks bit-identical and equal to one process's mezo_step bit for bit;
- zokernels.hf.ZOTrainer under the same torchrun (the Trainer's distributed sampler shards the data): the ranks end
  bit-identical, and a single process replaying the steps on the two ranks' micro-batches gets the same model.
This file is also the worker: torchrun runs it as a script (`--worker DIR`), and the perturbation-parallel timing of
docs/lm.md (`--bench-perturbation`).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

STEPS = 3
SEEDS = [11, 12, 13]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def global_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one sequence
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def run_steps(model, batch, step_fn):
    """The training loop both sides run: mezo (exact), mezo (in-place), then one rge_step + SGD."""
    record = {"grads": [], "losses": []}
    for t in range(STEPS):
        mode = "exact" if t < 2 else "inplace"
        result = step_fn("mezo", model, batch, mu=1e-3, lr=1e-2, seed=SEEDS[t], q=2, mode=mode)
        record["grads"].append(result.projected_grads)
        record["losses"].append(result.loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    result = step_fn("rge", model, batch, mu=1e-3, q=2, seed=99)
    optimizer.step()
    record["losses"].append(result.loss)
    return record


def _worker(out_dir: str) -> None:
    import torch.distributed as dist
    from zokernels.distributed import DataParallelZO, ReplicaMismatchError
    torch.set_num_threads(1)
    zo = DataParallelZO.from_environment(check_every=1)  # gloo: no CUDA here
    assert dist.get_backend() == "gloo" and zo.world_size == 2
    model = tiny_llama()
    shard = zo.shard(global_batch())

    def step_fn(kind, model, batch, **kw):
        if kind == "mezo":
            return zo.mezo_step(model, batch, **kw)  # checks the replicas' fingerprints after the step
        return zo.rge_step(model, batch, **kw)

    record = run_steps(model, shard, step_fn)
    zo.check_replicas(model)               # after the last optimizer step (fingerprints)
    zo.check_replicas(model, exact=True)   # and every bit against rank 0
    record["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    record["shard_rows"] = shard["input_ids"].shape[0]
    # A replica that drifts by one ulp in one entry is caught on every rank.
    w = model.model.layers[0].mlp.up_proj.weight
    if zo.rank == 1:
        with torch.no_grad():
            w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(1.0))
    try:
        zo.check_replicas(model)
        record["caught"] = ""
    except ReplicaMismatchError as error:
        record["caught"] = str(error)
    # A loss that raises on one rank does not leave the other waiting: both raise, neither changes θ.
    with torch.no_grad():
        w.view(-1)[5] = record["state"]["model.layers.0.mlp.up_proj.weight"].view(-1)[5]

    def fails_on_rank_1(m, b):
        if zo.rank == 1:
            raise KeyError("broken shard")
        return m(**b).loss
    try:
        zo.mezo_step(model, shard, fails_on_rank_1, mu=1e-3, lr=1e-2, seed=5)
        record["failure"] = "nothing raised"
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        record["failure"] = f"{type(error).__name__}: {error}"
    record["unchanged_after_failure"] = all(torch.equal(v, record["state"][k]) for k, v in model.state_dict().items())
    record["perturbation_parallel"] = _perturbation_parallel_phase()
    record["trainer"] = _trainer_phase(out_dir)
    torch.save(record, os.path.join(out_dir, f"rank{zo.rank}.pt"))
    dist.destroy_process_group()


PP_STEPS = [dict(q=4, seed=31), dict(q=1, seed=32)]


def _perturbation_parallel_steps(model, step_fn):
    """The loop both sides run: every step on the whole global batch, its forward seed drawn from seed 7 + t."""
    grads = []
    for t, kwargs in enumerate(PP_STEPS):
        torch.manual_seed(7 + t)
        grads.append(step_fn(model, global_batch(), mu=1e-3, lr=1e-2, **kwargs).projected_grads)
    return grads


def _perturbation_parallel_phase() -> dict:
    from zokernels.distributed import PerturbationParallelZO
    zo = PerturbationParallelZO(check_every=1)
    model = tiny_llama()
    grads = _perturbation_parallel_steps(model, zo.mezo_step)
    zo.check_replicas(model, exact=True)
    return {"grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()}}


TRAINER_STEPS = 3


def _trainer_phase(out_dir: str) -> dict:
    """ZOTrainer on a tiny BERT (train mode: dropout on), per-device batch 2, on the process group above."""
    from test_hf import TokenDataset, recording_trainer, tiny_bert, training_args
    seen = []
    Recording = recording_trainer(seen)
    model = tiny_bert()
    trainer = Recording(model=model, args=training_args(os.path.join(out_dir, "trainer"), max_steps=TRAINER_STEPS,
                                                        per_device_train_batch_size=2, save_strategy="no"),
                        train_dataset=TokenDataset(), mu=1e-2)
    trainer.train()
    assert trainer._zo_parallel and trainer._zo_parallel.steps == TRAINER_STEPS  # checked after every step
    return {"seen": seen, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}


def _torchrun_unavailable() -> str:
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this torch build"
    if importlib.util.find_spec("torch.distributed.run") is None:
        return "torchrun (torch.distributed.run) is not available"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install '.[lm]')"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_torchrun_unavailable()), reason=_torchrun_unavailable() or "available")
def test_two_gloo_ranks_stay_identical_and_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--worker", str(tmp_path)]
    done = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # The ranks agree bit for bit, and each saw its own half of the batch.
    assert [r["shard_rows"] for r in ranks] == [3, 3]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value.view(-1).view(torch.uint8), ranks[1]["state"][key].view(-1).view(torch.uint8)), key
    assert ranks[0]["grads"] == ranks[1]["grads"] and ranks[0]["losses"] == ranks[1]["losses"]
    assert all("differ in 1 tensors" in r["caught"] and "up_proj" in r["caught"] for r in ranks), (
        [r["caught"] for r in ranks])
    assert ranks[1]["failure"].startswith("KeyError") and "broken shard" in ranks[1]["failure"]
    assert ranks[0]["failure"].startswith("RuntimeError") and "rank(s) [1]" in ranks[0]["failure"]
    assert all(r["unchanged_after_failure"] for r in ranks)

    # One process, the two shards evaluated in sequence: the same run, bit for bit.
    from zokernels import mezo_step, rge_step
    from zokernels.distributed import SequentialShardLoss, shard_batch
    model, batch = tiny_llama(), global_batch()
    shards = [shard_batch(batch, r, 2) for r in range(2)]
    loss = SequentialShardLoss()

    def step_fn(kind, model, _, **kw):
        return (mezo_step if kind == "mezo" else rge_step)(model, shards, loss, **kw)

    single = run_steps(model, shards, step_fn)
    assert single["grads"] == ranks[0]["grads"]
    assert single["losses"] == ranks[0]["losses"]
    initial = tiny_llama().state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ranks[0]["state"][key]), key
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())  # the steps moved θ

    # Perturbation-parallel: the queries split over the ranks, the same run as one process's mezo_step, bit for bit.
    parallel = [r["perturbation_parallel"] for r in ranks]
    model = tiny_llama()
    assert _perturbation_parallel_steps(model, mezo_step) == parallel[0]["grads"] == parallel[1]["grads"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, parallel[0]["state"][key]) and torch.equal(value, parallel[1]["state"][key]), key
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())

    # ZOTrainer: ranks identical; each step a MeZO step on the global loss over both ranks' micro-batches.
    from test_hf import model_loss, states_equal, tiny_bert
    from zokernels.hf import step_seed
    trained = [r["trainer"] for r in ranks]
    assert trained[0]["losses"] == trained[1]["losses"] and len(trained[0]["losses"]) == TRAINER_STEPS
    for key, value in trained[0]["state"].items():
        assert torch.equal(value, trained[1]["state"][key]), key
    model = tiny_bert().train()
    for (inputs0, lr, step), (inputs1, lr1, step1) in zip(trained[0]["seen"], trained[1]["seen"]):
        assert (lr, step) == (lr1, step1) and not torch.equal(inputs0["input_ids"], inputs1["input_ids"])
        with torch.random.fork_rng():
            torch.manual_seed(step_seed(42, step, "forward"))
            mezo_step(model, [inputs0, inputs1], SequentialShardLoss(model_loss), mu=1e-2, lr=lr,
                      seed=step_seed(42, step))
    reference = model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in trained[0]["state"].items())
    assert not states_equal(model, tiny_bert())


def bench_llama():
    """A random-init LLaMA big enough that a forward, not the exchange, is the cost (3.4 M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _bench_perturbation_parallel(steps: int = 8, q: int = 4) -> None:
    """Seconds per MeZO step (q directions, exact mode) on bench_llama: PerturbationParallelZO over the torchrun
    ranks; in a 1-process run, plain zokernels.mezo_step as well. Rank 0 prints min and median over `steps` after
    one warm-up step. The replica check is off while timing (check_every=0) and checked exactly at the end."""
    import statistics
    import time

    import torch.distributed as dist
    from zokernels import mezo_step
    from zokernels.distributed import PerturbationParallelZO
    torch.set_num_threads(1)
    zo = PerturbationParallelZO.from_environment(check_every=0)
    model, batch = bench_llama()
    params = sum(p.numel() for p in model.parameters())

    def timed(step) -> list[float]:
        times = []
        for t in range(steps + 1):
            dist.barrier()
            start = time.perf_counter()
            step(model, batch, mu=1e-3, lr=1e-6, seed=100 + t, q=q)
            times.append(time.perf_counter() - start)
        return times[1:]
    rows = [(f"PerturbationParallelZO, {zo.world_size} rank(s)", timed(zo.mezo_step))]
    if zo.world_size == 1:
        rows.append(("zokernels.mezo_step, 1 process", timed(mezo_step)))
    zo.check_replicas(model, exact=True)
    if zo.rank == 0:
        for label, times in rows:
            print(f"{label}: q={q}, {params / 1e6:.1f} M parameters, batch 8x64 tokens, {steps} steps: "
                  f"min {min(times):.3f} s, median {statistics.median(times):.3f} s per step", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1])
if __name__ == "__main__" and "--bench-perturbation" in sys.argv:
    _bench_perturbation_parallel()


def test_fingerprint_sees_a_one_ulp_change_and_shards_cover_the_batch():
    from zokernels.distributed import combine_losses, fingerprint, shard_batch
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(1000, dtype=torch.float64).to(dtype)
        y = x.clone()
        y[637] = torch.nextafter(y[637], torch.tensor(10.0, dtype=dtype))
        assert fingerprint(x) == fingerprint(x.clone()) and fingerprint(x) != fingerprint(y), dtype
        swapped = x.clone()
        swapped[[3, 4]] = x[[4, 3]]  # same values, other places
        assert fingerprint(swapped) != fingerprint(x) or torch.equal(x[3], x[4])
    batch = {"input_ids": torch.arange(14).view(7, 2), "labels": torch.arange(7), "scale": 2.0}
    shards = [shard_batch(batch, r, 3) for r in range(3)]
    assert [len(s["labels"]) for s in shards] == [3, 2, 2] and all(s["scale"] == 2.0 for s in shards)
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
    assert combine_losses([3, 2, 2], [1.0, 2.0, 4.0]) == (3.0 + 4.0 + 8.0) / 7
