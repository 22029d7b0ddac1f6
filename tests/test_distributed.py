import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
