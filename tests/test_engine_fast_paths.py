"""The engine's fast paths and caches: where the fused per-replica BN(+ReLU) kernel applies (its values against the
float64 twins are in tests/test_kernel_matrix.py), the capture cache across steps, pass sizes, and the allocator
setting around a step."""
import pytest
import torch
from torch import nn

import zokernels
from zokernels import backends
from zokernels.engine import allocator, fused
from zokernels.models import resnet20
from zokernels.reference import cge_ref

from helpers import FLOAT32_UNIT_ROUNDOFF, assert_float32_error_within, classification_batch

needs_cpu_ext = pytest.mark.skipif(not backends.availability()["cpu"].available,
                                   reason="zokernels._C (cpu backend) is not built")


def replicas_channels_last(k, b, c, h, w, seed=0):
    """[K, B, C, H, W] float32 whose replicas are contiguous channels-last rows, as the engine keeps them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k * b, c, h, w, generator=g) * 2.0 + 3.0
    return x.contiguous(memory_format=torch.channels_last).view(k, b, c, h, w)


@needs_cpu_ext
def test_batchnorm_replicas_independent_of_thread_count():
    x = replicas_channels_last(2, 8, 16, 32, 32)  # above the kernel's OpenMP threshold
    bn = nn.BatchNorm2d(16)
    center = torch.zeros(16)
    results = []
    for threads in (1, 2):
        backends._C.set_openmp_threads(threads)
        results.append(fused.batchnorm_replicas(x, bn, center, True))
    backends._C.set_openmp_threads(1)
    assert torch.equal(results[0], results[1])


def test_batchnorm_replicas_declines_other_layouts_and_dtypes():
    bn = nn.BatchNorm2d(4)
    contiguous = torch.randn(2, 3, 4, 5, 5)  # NCHW replicas: not the kernel's [K, N, C] rows
    assert fused.batchnorm_replicas(contiguous, bn, torch.zeros(4), True) is None
    as_double = replicas_channels_last(2, 3, 4, 5, 5).double()
    assert fused.batchnorm_replicas(as_double, bn.double(), torch.zeros(4), True) is None


@needs_cpu_ext
def test_perturbed_mode_runs_fused_bn_relu_within_design_tolerance(monkeypatch):
    calls = []

    def counting(x, module, center, relu):
        calls.append(relu)
        return fused_kernel(x, module, center, relu)

    fused_kernel = fused.batchnorm_replicas
    monkeypatch.setattr(fused, "batchnorm_replicas", counting)
    model = resnet20().train()
    batch = classification_batch(torch.float32, n=8, shape=(3, 32, 32), classes=10)
    g = torch.Generator().manual_seed(3)
    mask = {n: torch.rand(p.shape, generator=g) < 4e-4 for n, p in model.named_parameters()}
    mask["layer1.0.conv1.weight"].view(-1)[:2] = True  # dense stage through almost the whole network
    model64 = _double_copy(model)
    oracle = cge_ref(model64, (batch[0].double(), batch[1]), mu=5e-3, mask=mask)
    naive = cge_ref(model, batch, mu=5e-3, mask=mask)
    zokernels.cge_step(model, batch, mu=5e-3, mask=mask, update_running_stats=False, dense_mode="perturbed")
    assert calls and any(calls), "the perturbed dense stage should use the fused BN + ReLU kernel"
    # The perturbed form stores x + δ in float32, as the naive difference does: docs/engine.md's rule for such
    # fast paths is at most 2x the plain float32 path's error (the delta form is held to 1x), both measured here
    # against the float64 oracle and pooled over all coordinates (per parameter there are one or two, and the
    # ratio of two single noise samples is unbounded: 3.2 on an AVX2 CPU with the old per-parameter check).
    # Floor: one float32 rounding of the loss over the step, the resolution of any float32 difference quotient.
    with torch.no_grad():
        loss64 = nn.functional.cross_entropy(model64(batch[0].double()), batch[1]).item()
    engine = {name: p.grad for name, p in model.named_parameters()}
    assert_float32_error_within(engine, naive, oracle, mask, factor=2,
                                floor=FLOAT32_UNIT_ROUNDOFF * abs(loss64) / 5e-3, what="perturbed engine")


def _double_copy(model):
    import copy
    return copy.deepcopy(model).double()


def test_each_step_records_the_model_as_it_is_now():
    """The tape is recorded afresh every step: switching train/eval or replacing a module between steps is seen
    (a cached capture would go stale), and the step keeps no activations alive afterwards."""
    import gc
    import weakref
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    batch = classification_batch(torch.float32, n=6)
    for change in (lambda: None, model.eval, lambda: model.__setitem__(2, nn.Tanh())):
        change()
        expected = cge_ref(_double_copy(model), (batch[0].double(), batch[1]), mu=5e-3)
        zokernels.cge_step(model, batch, update_running_stats=False)
        engine = {n: p.grad.clone() for n, p in model.named_parameters()}
        zokernels.cge_step(model, batch, engine="naive", update_running_stats=False)
        engine_error = max((engine[n].double() - expected[n]).abs().max() for n, _ in model.named_parameters())
        naive_error = max((p.grad.double() - expected[n]).abs().max() for n, p in model.named_parameters())
        assert engine_error <= naive_error
    from zokernels.engine import tape as tape_module
    recorded = []
    original = tape_module.Recorder._new
    monkey = lambda self, kind, **fields: (recorded.append(weakref.ref(original(self, kind, **fields)))  # noqa: E731
                                           or recorded[-1]())
    tape_module.Recorder._new = monkey
    try:
        zokernels.cge_step(model, batch)
    finally:
        tape_module.Recorder._new = original
    gc.collect()
    assert recorded and all(ref() is None for ref in recorded), "a step must not keep its tape alive"


def test_retained_heap_sets_and_restores_glibc_options_once(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_MALLOPT", lambda option, value: calls.append((option, value)))
    with allocator.retained_heap():
        with allocator.retained_heap():  # nested: no second switch
            pass
        assert calls == list(allocator._RETAINED.items())
    assert calls[2:] == list(allocator._GLIBC_DEFAULTS.items())
    calls.clear()
    monkeypatch.setenv("ZOKERNELS_RETAIN_HEAP", "0")
    with allocator.retained_heap():
        pass
    assert calls == []


def test_float32_estimates_do_not_depend_on_which_coordinates_share_a_pass():
    """Sharded runs (zokernels.distributed) split a parameter's coordinates across ranks, so a coordinate's
    estimate must not depend on the other coordinates in its pass: bitwise, in float32."""
    from zokernels.models import small_cnn

    def fresh():
        torch.manual_seed(0)
        return small_cnn(1, in_channels=1), (torch.randn(16, 1, 6, 6), torch.randint(0, 10, (16,)))

    model, batch = fresh()
    zokernels.cge_step(model, batch)
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        half = torch.zeros(param.shape, dtype=torch.bool)
        half.view(-1)[::2] = True
        other, batch2 = fresh()
        zokernels.cge_step(other, batch2, mask={name: half})
        got = dict(other.named_parameters())[name].grad
        assert torch.equal(got[half], full[name][half]), name


@pytest.mark.parametrize("name", ["conv1.weight", "layer1.0.conv1.weight"])
def test_resnet_estimates_do_not_depend_on_pass_neighbours_in_the_dense_stage(name):
    """Dense-stage convolutions round differently at different batch sizes, so every pass runs exactly K
    replicas (the last one padded): a coordinate's float32 estimate is then bitwise the same whichever other
    coordinates of its parameter are selected (as when ranks split a parameter). Without the padding this
    configuration differed by ~5e-8 (checked)."""
    def fresh():
        torch.manual_seed(0)
        return resnet20().train(), (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))

    budget = 60 << 20
    model, batch = fresh()
    wide = torch.zeros(model.get_parameter(name).shape, dtype=torch.bool)
    wide.view(-1)[:40] = True
    zokernels.cge_step(model, batch, mask={name: wide}, update_running_stats=False, max_memory_bytes=budget)
    full = model.get_parameter(name).grad.clone()
    narrow = torch.zeros_like(wide)
    narrow.view(-1)[1:40:3] = True
    other, batch2 = fresh()
    zokernels.cge_step(other, batch2, mask={name: narrow}, update_running_stats=False, max_memory_bytes=budget)
    assert torch.equal(other.get_parameter(name).grad[narrow], full[narrow])


def test_estimate_of_a_coordinate_does_not_depend_on_the_selection():
    """Passes have K replicas whatever the selection (padded): a coordinate selected alone, with a few others or
    with all of its parameter gets the same bits — what makes any sharding of a step equal one process's."""
    from zokernels.models import small_cnn
    model = small_cnn(2)
    # big enough that oneDNN rounds a 1-replica pass differently from a K-replica one (measured: an unpadded pass
    # of 1 changed the last bit here)
    batch = (torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)))
    chosen = torch.tensor([3, 40, 41, 100, 200, 201, 300])
    results = []
    for selection in (chosen[:1], chosen[:2], chosen, torch.arange(model[0].weight.numel())):
        mask = {"0.weight": torch.zeros_like(model[0].weight, dtype=torch.bool)}
        mask["0.weight"].view(-1)[selection] = True
        zokernels.cge_step(model, batch, mask=mask, update_running_stats=False)
        results.append(model[0].weight.grad.reshape(-1)[chosen[:1]].clone())
    assert all(torch.equal(r.view(torch.int32), results[0].view(torch.int32)) for r in results), results
