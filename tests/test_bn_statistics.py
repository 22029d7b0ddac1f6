"""The engine's one accessor for batch-norm statistics (zokernels/engine/statistics.py `bn_statistics`): it gives
what torch's own BN normalizes with (BatchNorm1d/2d/3d, train and eval, fresh random inputs), it measures each
recorded batch_norm node once per recording whichever consumers read it (the BN rule, the BN weight seed, the GPU
first-layer plan), and the fusion plan's patterns are matched once at capture, not per pass."""
import pytest
import torch
from torch import nn

import zokernels
from zokernels.engine import cge_engine, fusion, statistics
from zokernels.engine.heads import Head
from zokernels.engine.ops import canonical
from zokernels.engine.statistics import bn_statistics
from zokernels.estimators.scope import QueryScope

from helpers import FLOAT32_UNIT_ROUNDOFF, assert_float32_error_within

# (module, input shape): every BN flavour and input rank torch accepts
BN_CASES = [(nn.BatchNorm1d, (16, 5)), (nn.BatchNorm1d, (8, 5, 7)), (nn.BatchNorm2d, (6, 4, 5, 3)),
            (nn.BatchNorm3d, (4, 3, 3, 4, 2))]


def _record(model, batch, kernel_backend=None):
    head, named = Head("cross_entropy", batch), dict(model.named_parameters())
    guard = QueryScope(model, list(named.values()))
    with guard, torch.no_grad():
        return cge_engine.record_base(model, batch, head, None, guard, named, kernel_backend=kernel_backend)[1]


def _bn_nodes(rec):
    return [n for n in rec.tape.nodes if n.kind == "call" and canonical(n.func) == "batch_norm"]


def _bn_model(module, channels, train, seed):
    """A linear layer (so the BN input depends on a parameter and is recorded) feeding the BN under test."""
    g = torch.Generator().manual_seed(seed)
    bn = module(channels)
    bn.weight.data.uniform_(0.5, 1.5, generator=g)
    bn.bias.data.normal_(generator=g)
    bn.running_mean.normal_(generator=g)
    bn.running_var.uniform_(0.5, 2.0, generator=g)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(channels, generator=g) + 0.5)
            self.bn = bn

        def forward(self, x):
            y = self.bn(x * self.scale.view(1, -1, *([1] * (x.dim() - 2))))
            return y.flatten(1)[:, :3]
    return Net().train(train)


@pytest.mark.parametrize("module,shape", BN_CASES)
@pytest.mark.parametrize("train", [True, False])
def test_statistics_are_what_torch_batch_norm_uses(module, shape, train):
    g = torch.Generator().manual_seed(2 * BN_CASES.index((module, shape)) + train)
    x = torch.randn(shape, generator=g) * 3 + 2
    model = _bn_model(module, shape[1], train, seed=1)
    rec = _record(model, (x, torch.randint(0, 3, (shape[0],), generator=g)))
    (node,) = _bn_nodes(rec)
    stats = bn_statistics(node, rec.ctx)
    bn_input = node.args[0].value
    dims = tuple(d for d in range(x.dim()) if d != 1)
    assert stats.training is train and stats.reduce_dims == dims and stats.eps == model.bn.eps
    assert stats.weight is model.bn.weight and stats.bias is model.bn.bias
    if train:
        oracle_var, oracle_mean = torch.var_mean(bn_input.double(), dim=dims, correction=0)
        torch_var, torch_mean = torch.var_mean(bn_input, dim=dims, correction=0)  # torch's own float32 statistics
        for ours, plain, oracle in ((stats.mean, torch_mean, oracle_mean), (stats.var, torch_var, oracle_var)):
            assert ours.dtype == torch.float32 and ours.shape == (shape[1],)
            assert_float32_error_within(ours, plain, oracle, factor=4,
                                        floor=FLOAT32_UNIT_ROUNDOFF * oracle.abs().max().item(), what="batch stats")
        oracle_normalized = ((bn_input.double() - oracle_mean.view(stats.per_channel(oracle_mean).shape))
                             / torch.sqrt(oracle_var + stats.eps).view(stats.per_channel(oracle_var).shape))
    else:  # eval: the module's running buffers themselves, never a copy
        assert stats.mean is model.bn.running_mean and stats.var is model.bn.running_var
        oracle_normalized = ((bn_input.double() - stats.per_channel(stats.mean).double())
                             / torch.sqrt(stats.per_channel(stats.var).double() + stats.eps))
    # the normalized input, with BN's affine, is the module's output (float32 forward vs a float64 oracle)
    plain_out = (nn.functional.batch_norm(bn_input, model.bn.running_mean, model.bn.running_var, model.bn.weight,
                                          model.bn.bias, training=False) if not train else
                 nn.functional.batch_norm(bn_input, None, None, model.bn.weight, model.bn.bias, training=True))
    affine = (1, -1) + (1,) * (x.dim() - 2)
    oracle_out = oracle_normalized * model.bn.weight.double().view(affine) + model.bn.bias.double().view(affine)
    ours_out = stats.normalized * model.bn.weight.view(affine) + model.bn.bias.view(affine)
    assert_float32_error_within(ours_out.detach(), plain_out.detach(), oracle_out.detach(), factor=4,
                                floor=FLOAT32_UNIT_ROUNDOFF * oracle_out.abs().max().item(), what="normalized")
    torch.testing.assert_close(stats.root, torch.sqrt(stats.var + stats.eps), rtol=0, atol=0)
    torch.testing.assert_close(stats.inv_std, torch.rsqrt(stats.var + stats.eps), rtol=0, atol=0)


def conv_bn_relu(train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.train(train)


@pytest.fixture
def measured(monkeypatch):
    """node -> how many times statistics.measure ran for it."""
    counts = {}
    original = statistics.measure

    def counting(node):
        counts[node] = counts.get(node, 0) + 1
        return original(node)
    monkeypatch.setattr(statistics, "measure", counting)
    return counts


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dense_mode", ["delta", "perturbed"])
def test_each_bn_node_is_measured_once_per_step(measured, train, dense_mode):
    model = conv_bn_relu(train)
    batch = (torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,)))
    # every parameter, several passes each (162 first-conv coordinates > the 32 replicas a pass holds), both sides
    result = zokernels.cge_step(model, batch, mu=1e-3, engine="delta", dense_mode=dense_mode, scheme="central",
                                update_running_stats=False)
    assert result.engine == "delta"
    assert len(measured) == 2 and set(measured.values()) == {1}, measured  # both BNs, read many times, measured once


@pytest.mark.parametrize("train", [True, False])
def test_rule_seed_and_fusion_plan_share_one_measurement(measured, monkeypatch, train):
    matched = []
    original_pattern = fusion.fused_pattern
    monkeypatch.setattr(fusion, "fused_pattern", lambda node: matched.append(node) or original_pattern(node))
    model = conv_bn_relu(train).double()
    batch = (torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (4,)))
    rec = _record(model, batch, kernel_backend="torch")
    params = rec.tape.params
    assert len(matched) == len(params)  # each parameter matched once, at capture
    assert set(rec.ctx.first_layers) == {params["0.weight"], params["3.weight"]}
    last = cge_engine.last_uses(rec.tape, rec.final_nodes())
    with torch.no_grad():
        # the fused start (reads BN 1 for its kernel spec), the BN 1 weight seed, and the BN 2 rule, twice each
        for name in ("0.weight", "1.weight", "3.weight", "1.weight", "0.weight", "3.weight"):
            size = params[name].value.numel()
            indices = torch.arange(0, size, max(1, size // 5))  # across output channels: some pass the ReLU
            steps = torch.full((len(indices),), 1e-3, dtype=torch.float64)
            change = cge_engine.loss_changes(rec, params[name], indices, steps, last, lambda j: name)
            assert change.abs().max() > 0, name
    assert len(matched) == len(params), "the fusion plan re-matched its patterns during the passes"
    assert len(measured) == 2 and set(measured.values()) == {1}, measured
