"""The engine's fusion plan (zokernels/engine/fusion.py): starting the engine's propagation after the fused
conv/linear → BN → ReLU kernel gives the same loss changes as the engine's own seed + BN + ReLU rules (float64, to
rounding), on every backend present, and the plan declines where the pattern does not hold."""
import pytest
import torch
from torch import nn

from zokernels.backends import _C, availability
from zokernels.engine import cge_engine
from zokernels.engine.fusion import fused_pattern
from zokernels.engine.heads import Head
from zokernels.estimators.scope import QueryScope
from helpers import kernel_device

pytest.importorskip("triton")
HAS_CPU_TWIN = _C is not None and hasattr(_C, "cge_first_layer_delta_cpu") and availability()["cpu"].available
_TRITON = availability()["triton"]
BACKENDS = (pytest.param("triton", marks=pytest.mark.skipif(not _TRITON.available, reason=_TRITON.reason)),
            "torch") + (("cpu",) if HAS_CPU_TWIN else ())


def small_model(train: bool):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model = model.double().train(train)
    if not train:  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model


def loss_changes(model, batch, names, backend):
    """Per parameter: (fused start, engine's own rules) loss changes, on CPU; the model and batch run on the
    backend's device (CUDA for triton in a GPU run)."""
    device = kernel_device(backend)
    model, batch = model.to(device), tuple(t.to(device) for t in batch)
    head, named = Head("cross_entropy", batch), dict(model.named_parameters())
    guard = QueryScope(model, list(named.values()))
    results = {}
    with guard, torch.no_grad():
        _, plain = cge_engine.record_base(model, batch, head, None, guard, named)
        _, fused = cge_engine.record_base(model, batch, head, None, guard, named, kernel_backend=backend)
        for name in names:
            indices = torch.randperm(named[name].numel())[:5].to(device)
            steps = (torch.randn(5, dtype=torch.float64) * 0.05).to(device)
            expected, got = (cge_engine.loss_changes(rec, rec.tape.params[name], indices, steps,
                                                     cge_engine.last_uses(rec.tape, rec.final_nodes()),
                                                     lambda j: name).cpu()
                             for rec in (plain, fused))
            assert fused_pattern(fused.tape.params[name]) is not None or name == "8.weight", name
            results[name] = (got, expected)
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_fused_start_gives_the_engines_loss_changes(train, backend):
    model = small_model(train)
    batch = (torch.randn(6, 2, 7, 9, dtype=torch.float64), torch.randint(0, 3, (6,)))
    for name, (got, expected) in loss_changes(model, batch, ["0.weight", "3.weight", "8.weight"], backend).items():
        assert expected.abs().max() > 0, name  # the coordinates do move the loss
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-14, msg=name)


def _recorded(model, batch):
    head, named = Head("cross_entropy", batch), dict(model.named_parameters())
    guard = QueryScope(model, list(named.values()))
    with guard, torch.no_grad():
        return cge_engine.record_base(model, batch, head, None, guard, named)[1].tape


def test_fusion_plan_declines_outside_the_pattern():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3, groups=3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()
    tape = _recorded(model, (torch.randn(2, 2, 7, 7, dtype=torch.float64), torch.tensor([0, 1])))
    for name in ("0.weight", "2.weight", "6.weight", "0.bias"):  # no BN; grouped conv; last layer; a bias
        assert fused_pattern(tape.params[name]) is None, name
    tape = _recorded(small_model(True), (torch.randn(4, 2, 7, 9, dtype=torch.float64), torch.tensor([0, 1, 2, 0])))
    assert fused_pattern(tape.params["0.weight"]) is not None
