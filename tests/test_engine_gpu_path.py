"""cge_step(..., backend="triton") runs the engine with the GPU kernels (fused layer → BN → ReLU delta, one-channel
mixing conv) where their pattern holds. Under TRITON_INTERPRET=1 (conftest) the Triton kernels run on CPU tensors:
the estimates must equal the naive float64 reference, stay within the naive float32 error in float32, actually
launch the kernels, and fall back to the engine's rules wherever the kernels do not apply. In a GPU run
(ZOKERNELS_TEST_GPU=1: the interpreter is off) the model, batch and mask of a triton step move to CUDA
(kernel_device("triton")) after the references were computed on the CPU, and the gradients come back with .cpu()
to be compared."""
import copy

import pytest
import torch
from torch import nn

import zokernels
from zokernels.backends import availability
from zokernels.engine import fusion
from zokernels.reference import cge_ref

from helpers import classification_batch, kernel_device

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not availability()["triton"].available,
                                reason=f"the triton backend cannot run here: {availability()['triton'].reason}")
DEVICE = kernel_device("triton")  # where the model, batch and mask of a backend="triton" step live


def to_device(model, batch, mask):
    """The model (moved in place: the same module and Parameter objects), batch and mask on DEVICE; on the CPU the
    very same objects."""
    return model.to(DEVICE), tuple(t.to(DEVICE) for t in batch), {n: m.to(DEVICE) for n, m in mask.items()}


def conv_bn_net(train=True, dtype=torch.float64):
    """Two conv → BN → ReLU blocks (the fused first-layer pattern; the second conv mixes one-channel deltas)."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).to(dtype).train(train)
    if not train:  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def uncovered_net():
    """No pattern the kernels take: conv → ReLU (no BN), a grouped conv, BN → LeakyReLU."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4),
        nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def linear_bn_net():
    """A Linear first layer → BatchNorm1d → ReLU: the linear form of the fused kernel."""
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()


def few_coordinates(model, per_parameter=3, seed=0):
    """A handful of masked coordinates in every parameter."""
    g = torch.Generator().manual_seed(seed)
    mask = {}
    for name, p in model.named_parameters():
        chosen = torch.randperm(p.numel(), generator=g)[:per_parameter]
        mask[name] = torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, chosen, True).view_as(p)
    return mask


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the Triton first-layer and mixing kernels (the launchers import them at call time)."""
    from zokernels.kernels.triton import cge_first_layer, cge_mixing
    counts = {"first_layer": 0, "mixing": 0}

    def counting(key, launcher):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return launcher(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(cge_first_layer, "first_layer_delta_triton",
                        counting("first_layer", cge_first_layer.first_layer_delta_triton))
    monkeypatch.setattr(cge_mixing, "one_channel_conv2d_triton",
                        counting("mixing", cge_mixing.one_channel_conv2d_triton))
    return counts


def assert_equals_reference(model, batch, mask, scheme="forward", **options):
    expected = cge_ref(model, batch, mu=1e-4, mask=mask, scheme=scheme)
    model, batch, mask = to_device(model, batch, mask)
    result = zokernels.cge_step(model, batch, mu=1e-4, mask=mask, scheme=scheme, update_running_stats=False,
                                backend="triton", **options)
    assert result.engine == "delta" and result.backend == "triton"
    for name, p in model.named_parameters():
        # float64, μ = 1e-4, |L| ≲ 1: a few 2⁻⁵³|L|/μ ≈ 1e-12 of rounding on any CPU; atol allows 100 roundings
        torch.testing.assert_close(p.grad.cpu(), expected[name], atol=1e-10, rtol=1e-7, msg=name)


@pytest.mark.parametrize("train,scheme,dense_mode", [
    (True, "forward", "delta"), (False, "forward", "delta"), (True, "central", "delta"),
    (True, "forward", "perturbed")])
def test_triton_path_equals_naive_float64(launches, train, scheme, dense_mode):
    model = conv_bn_net(train)
    batch = classification_batch(torch.float64, n=4, shape=(2, 6, 6))
    assert_equals_reference(model, batch, few_coordinates(model), scheme, dense_mode=dense_mode)
    # 0.weight and 3.weight take the fused kernel (one launch per pass); 0.weight's and the BN 1.*'s one-channel
    # deltas meet conv 3 in the mixing kernel
    assert launches["first_layer"] >= 2 and launches["mixing"] >= 3, launches


def _max_error(estimates, oracle, mask):
    return max((estimates[n] - oracle[n])[mask[n]].abs().max().item() for n in mask if mask[n].any())


@pytest.mark.parametrize("train", [True, False])
def test_triton_path_float32_within_naive_float32_error(launches, train):
    model = conv_bn_net(train, torch.float32)
    batch = classification_batch(torch.float32, n=4, shape=(2, 6, 6))
    mask = few_coordinates(model, seed=1)
    model64 = copy.deepcopy(model).double()
    oracle = {n: g.float() for n, g in cge_ref(model64, (batch[0].double(), batch[1]), mu=5e-3, mask=mask).items()}
    naive32 = cge_ref(model, batch, mu=5e-3, mask=mask)
    model, batch_d, mask_d = to_device(model, batch, mask)
    zokernels.cge_step(model, batch_d, mu=5e-3, mask=mask_d, update_running_stats=False, backend="triton")
    kernel32 = {n: p.grad.cpu() for n, p in model.named_parameters()}
    assert launches["first_layer"] >= 2 and launches["mixing"] >= 3, launches
    # measured on this machine against the float64 oracle, pooled over all coordinates: the kernels form exact
    # deltas, so they are held to the naive float32 difference's error (used 0.011–0.017 of it on AVX2/AVX-512)
    assert _max_error(kernel32, oracle, mask) <= _max_error(naive32, oracle, mask)


def test_linear_first_layer_uses_the_fused_kernel(launches):
    model = linear_bn_net()
    batch = classification_batch(torch.float64, n=4, shape=(5,))
    assert_equals_reference(model, batch, few_coordinates(model))
    assert launches["first_layer"] >= 1 and launches["mixing"] == 0, launches


def test_uncovered_model_falls_back_to_the_engine_rules(launches):
    model = uncovered_net()
    batch = classification_batch(torch.float64, n=4, shape=(2, 6, 6))
    assert_equals_reference(model, batch, few_coordinates(model))
    assert launches == {"first_layer": 0, "mixing": 0}


@pytest.mark.parametrize("backend", [None, "torch"])
def test_cpu_backends_keep_the_engine_rules(monkeypatch, backend):
    def refuse(*args, **kwargs):
        raise AssertionError("a GPU kernel path was taken on a CPU backend")

    monkeypatch.setattr(fusion, "fused_first_layer", refuse)
    monkeypatch.setattr(fusion, "one_channel_conv2d_delta", refuse)
    model = conv_bn_net()
    batch = classification_batch(torch.float64, n=4, shape=(2, 6, 6))
    result = zokernels.cge_step(model, batch, mu=1e-4, mask=few_coordinates(model), update_running_stats=False,
                                backend=backend)
    assert result.engine == "delta" and result.backend in ("cpu", "torch")


def test_mixing_adapter_declines_what_the_kernel_cannot_read():
    from zokernels.engine.delta import Delta
    from zokernels.engine.fusion import one_channel_conv2d_delta
    values, channels = torch.randn(2, 3, 5, 5), torch.tensor([0, 2])
    conv = nn.Conv2d(3, 4, 3, padding=1)
    geometry = {"stride": 1, "padding": 1, "dilation": 1, "groups": 1}
    # the adapter's inputs on the triton kernel's device; the expected conv on the CPU originals
    values_d, channels_d, weight_d = values.to(DEVICE), channels.to(DEVICE), conv.weight.to(DEVICE)
    mixed = one_channel_conv2d_delta(Delta(values_d, channels_d), weight_d, geometry, "triton")
    expected = Delta(values, channels).dense(torch.zeros(3, 3, 5, 5)).flatten(0, 1)
    torch.testing.assert_close(mixed.values.cpu().flatten(0, 1),
                               nn.functional.conv2d(expected, conv.weight, padding=1))
    assert one_channel_conv2d_delta(Delta(values_d.bfloat16(), channels_d), weight_d.bfloat16(), geometry,
                                    "triton") is None  # the kernels take float32/float64 only
    assert one_channel_conv2d_delta(Delta(values_d.double(), channels_d), weight_d, geometry,
                                    "triton") is None  # mixed dtypes
    assert one_channel_conv2d_delta(Delta(values_d, channels_d), nn.Conv2d(3, 3, 3, groups=3).weight.to(DEVICE),
                                    {**geometry, "groups": 3}, "triton") is None


def test_masked_sgd_takes_the_engines_estimates():
    """docs/gpu_kernels.md's recipe: the engine's estimates at the mask, in index order, into MaskedSGD."""
    from zokernels.experimental.masked_sgd import MaskedSGD, gather_mask_indices
    model = conv_bn_net()
    twin = copy.deepcopy(model)
    batch = classification_batch(torch.float64, n=4, shape=(2, 6, 6))
    mask = few_coordinates(model)
    zokernels.cge_step(model, batch, mu=1e-4, mask=mask, update_running_stats=False)
    params = list(model.parameters())
    index = gather_mask_indices(params, [mask[n] for n, _ in model.named_parameters()])
    values = torch.cat([p.grad[mask[n]] for n, p in model.named_parameters()])
    for p, q in zip(params, twin.parameters()):
        q.grad = p.grad.clone()
    MaskedSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, restrict_to_mask=False).step(index, values)
    torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3).step()
    for p, q in zip(params, twin.parameters()):
        # float64, the same three-term update per element in another order: a few 2⁻⁵³ relative at most
        torch.testing.assert_close(p, q, rtol=1e-13, atol=0)
