import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zokernels
from zokernels import cge_step
from zokernels.distributed import CoordinateSharder, partition_by_cost, selected_coordinates
from zokernels.models import small_cnn
from zokernels.sparsity import sample_masks, uniform_ratios, with_dense_coordinates


def _problem():
    torch.manual_seed(0)
    model = small_cnn(1, in_channels=1)
    batch = (torch.randn(16, 1, 6, 6), torch.randint(0, 10, (16,)))
    mask = with_dense_coordinates(model, sample_masks(model, uniform_ratios(model, 0.7), torch.Generator()))
    return model, batch, mask


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, batch, mask = _problem()
    sharder = CoordinateSharder(rank, world_size)  # measures the per-layer costs on rank 0, broadcasts them
    result = sharder.cge_step(model, batch, mask=mask)
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "loss": result.loss,
                "coordinates": result.num_coordinates, "shards": sharder._shards},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_gradient(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, batch, mask = _problem()
    single = cge_step(model, batch, mask=mask)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, p in model.named_parameters():
        for r in ranks:  # every rank holds the full estimate, identical to one process's
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=0, atol=0)
    assert ranks[0]["coordinates"] == single.num_coordinates
    assert all(r["loss"] == single.loss for r in ranks)
    sizes = [sum(len(idx) for _, idx in shard) for shard in ranks[0]["shards"]]
    assert sum(sizes) == single.num_coordinates and min(sizes) > 0


def test_partition_balances_measured_cost():
    coordinates = [("a", torch.arange(100)), ("b", torch.arange(50)), ("c", torch.arange(10))]
    costs = {"a": 1.0, "b": 4.0, "c": 10.0}  # total 100 + 200 + 100 = 400
    shards = partition_by_cost(coordinates, costs, 4)
    loads = [sum(costs[n] * len(idx) for n, idx in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(costs.values())  # at most one coordinate's cost of imbalance
    flat = [(n, i) for shard in shards for n, idx in shard for i in idx.tolist()]
    assert flat == [(n, i) for n, idx in coordinates for i in idx.tolist()]  # contiguous, complete, in order


def test_selected_coordinates_follow_mask():
    model, _, mask = _problem()
    selected = dict(selected_coordinates(model, mask))
    assert all(len(selected[n]) == int(m.sum()) for n, m in mask.items())


# ---- perturbation-parallel MeZO (PerturbationParallelZO): the 2q ± queries split across 2 gloo ranks -------------
# Every rank holds the full batch; the model is in train mode with dropout, so the ± queries on different ranks must
# share rank 0's forward seed to see the same masks (rank 1's global RNG is seeded differently to prove it).
PP_STEPS = [dict(q=4, seed=11), dict(q=4, seed=12), dict(q=4, seed=13),  # two directions per rank
            dict(q=1, seed=21), dict(q=1, seed=22),                      # ℓ⁺ on rank 0, ℓ⁻ on rank 1
            dict(q=3, seed=31),                                          # direction 1 split across the ranks
            dict(q=2, seed=41, update=False)]                            # ĝ into .grad, θ unchanged


def _pp_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)).train()
    batch = (torch.randn(12, 6), torch.randint(0, 3, (12,)))
    return model, batch


def _pp_run(model, batch, step, rng_base=100):
    record = []
    for t, kwargs in enumerate(PP_STEPS):
        torch.manual_seed(rng_base + t)  # the forward (dropout) seed of the step is drawn from this state
        result = step(model, batch, mu=1e-3, lr=1e-2, **kwargs)
        record.append((result.projected_grads, result.loss, result.num_queries))
    return record


def _error_record(run):
    try:
        run()
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        return type(error).__name__, str(error), list(getattr(error, "__notes__", []))
    return "nothing raised", "", []


def _pp_worker(rank, world_size, init_file, out_dir):
    from zokernels.distributed import PerturbationParallelZO
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    zo = PerturbationParallelZO(check_every=1)  # fingerprints compared before the first and after every step
    model, batch = _pp_problem()
    workspace = zokernels.MeZOWorkspace()  # the ranks keep their scratch copies; one process (compared) does not
    out = {"steps": _pp_run(model, batch, functools.partial(zo.mezo_step, workspace=workspace),
                            rng_base=100 if rank == 0 else 500)}
    zo.check_replicas(model, exact=True)
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}

    def failing(nan_on=(), raise_on=()):
        def loss(m, b):
            if zo.rank in raise_on:
                raise KeyError(f"broken on rank {zo.rank}")
            if zo.rank in nan_on:
                return torch.tensor(float("nan"))
            return torch.nn.functional.cross_entropy(m(b[0]), b[1])
        return loss
    out["nan_on_1"] = _error_record(lambda: zo.mezo_step(model, batch, failing(nan_on=[1]), q=4, seed=5))
    out["raise_on_1"] = _error_record(lambda: zo.mezo_step(model, batch, failing(raise_on=[1]), q=1, seed=6))
    out["both"] = _error_record(lambda: zo.mezo_step(model, batch, failing(raise_on=[0], nan_on=[1]), q=2, seed=7))
    out["inplace"] = _error_record(lambda: zo.mezo_step(model, batch, q=2, mode="inplace"))
    out["ranks_disagree"] = _error_record(lambda: zo.mezo_step(model, batch, q=2 + rank, seed=8))
    out["unchanged_after_failures"] = all(torch.equal(v, out["state"][k]) for k, v in model.state_dict().items())
    zo.mezo_step(model, batch, q=2, seed=9, lr=1e-2)  # the ranks are still in step after the failures
    zo.check_replicas(model, exact=True)
    out["moved_after_failures"] = any(not torch.equal(v, out["state"][k]) for k, v in model.state_dict().items())
    torch.save(out, os.path.join(out_dir, f"pp_rank{rank}.pt"))
    dist.destroy_process_group()


def test_perturbation_parallel_mezo_equals_one_process_bit_for_bit(tmp_path):
    from zokernels import mezo_step
    mp.spawn(_pp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"pp_rank{r}.pt") for r in range(2)]
    model, batch = _pp_problem()
    single = _pp_run(model, batch, mezo_step)
    assert ranks[0]["steps"] == single and ranks[1]["steps"] == single  # g_j, loss, queries: same floats
    for name, value in model.state_dict().items():
        for r in ranks:
            assert torch.equal(_bits(r["state"][name]), _bits(value)), name
    for name, p in model.named_parameters():  # the update=False step's estimate
        for r in ranks:
            assert torch.equal(_bits(r["grads"][name]), _bits(p.grad)), name
    initial, _ = _pp_problem()
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in model.state_dict().items())

    # Failures: every rank raises the error of the earliest failing query, θ and buffers untouched.
    for key, kind, text in (("nan_on_1", "NonFiniteLossError", "+mu query along direction 2 (seed 5)"),
                            ("raise_on_1", "KeyError", "broken on rank 1"),
                            ("both", "KeyError", "broken on rank 0")):
        (kind0, message0, notes0), (kind1, message1, notes1) = ranks[0][key], ranks[1][key]
        assert kind0 == kind1 == kind and message0 == message1 and text in message0, (key, ranks[0][key], ranks[1][key])
        assert any("restored" in n for n in notes0 + notes1) or "restored" in message0, (key, notes0)
    assert any("rank 1's own later query also failed: NonFiniteLossError" in n for n in ranks[1]["both"][2])
    assert any("ran on rank 1" in n for n in ranks[0]["raise_on_1"][2])
    assert all(r["inplace"][0] == "ValueError" and "drift apart" in r["inplace"][1] for r in ranks)
    assert all(r["ranks_disagree"][0] == "ValueError" and "differ across ranks" in r["ranks_disagree"][1]
               for r in ranks)
    assert all(r["unchanged_after_failures"] and r["moved_after_failures"] for r in ranks)


def test_query_blocks_cover_the_queries_in_single_process_order():
    from zokernels.distributed import query_blocks
    from zokernels.estimators.mezo import all_queries
    for q in (1, 2, 3, 4, 7):
        for world in (1, 2, 3, 5):
            blocks = query_blocks(q, world)
            assert [x for block in blocks for x in block] == all_queries(q)
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert query_blocks(1, 2) == [[(0, "+")], [(0, "-")]]


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def _nccl_worker(rank, world_size, init_file, out_dir):
    """One NCCL rank per GPU: data-parallel and perturbation-parallel MeZO on a CUDA model with dropout."""
    from zokernels.distributed import DataParallelZO, PerturbationParallelZO
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = {}
    for name, zo in (("data", DataParallelZO()), ("perturbation", PerturbationParallelZO())):
        model, batch = _cuda_dropout_problem(rank)
        torch.manual_seed(5)  # rank 0's RNG state is the one every rank's queries replay
        step = zo.mezo_step(model, zo.shard(batch) if name == "data" else batch, mu=1e-3, lr=1e-2, seed=7, q=2)
        zo.check_replicas(model, exact=True)
        results[name] = {"grads": step.projected_grads, "state": {k: v.cpu() for k, v in model.state_dict().items()}}
    torch.save(results, os.path.join(out_dir, f"nccl_rank{rank}.pt"))
    dist.destroy_process_group()


def _cuda_dropout_problem(device_index):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(16, 3)).train().to(f"cuda:{device_index}")
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 8, generator=g).to(f"cuda:{device_index}"),
             torch.randint(0, 3, (8,), generator=g).to(f"cuda:{device_index}"))
    return model, batch


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="NCCL needs CUDA GPUs (the CPU ranks run on gloo above and in test_torchrun.py)")
def test_nccl_ranks_stay_bit_identical_and_perturbation_parallel_equals_one_process(tmp_path):
    """On the GPU machine (one rank per visible GPU, at least one): the NCCL path of both parallel modes, including
    the broadcast of rank 0's CUDA RNG state; perturbation-parallel MeZO equals one process's mezo_step."""
    from zokernels import mezo_step
    world_size = torch.cuda.device_count()
    mp.spawn(_nccl_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"nccl_rank{r}.pt") for r in range(world_size)]
    model, batch = _cuda_dropout_problem(0)
    torch.manual_seed(5)
    single = mezo_step(model, batch, mu=1e-3, lr=1e-2, seed=7, q=2)
    for r in ranks:
        assert r["perturbation"]["grads"] == single.projected_grads
        for k, v in model.state_dict().items():
            assert torch.equal(r["perturbation"]["state"][k], v.cpu()), k
            assert torch.equal(r["data"]["state"][k], ranks[0]["data"]["state"][k]), k
