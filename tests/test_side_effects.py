"""Queries leave nothing behind: parameters bit-identical, BN statistics untouched, even on raise or NaN."""
import pytest
import torch

import zokernels
from zokernels.estimators.common import default_loss

from helpers import assert_state_equal, classification_batch, snapshot, tiny_cnn_bn, tiny_mlp

STEPS = {
    "cge_forward": lambda m, b, **kw: zokernels.cge_step(m, b, scheme="forward", **kw),
    "cge_central": lambda m, b, **kw: zokernels.cge_step(m, b, scheme="central", **kw),
    "rge_gaussian": lambda m, b, **kw: zokernels.rge_step(m, b, q=3, seed=1, **kw),
    "rge_sphere": lambda m, b, **kw: zokernels.rge_step(m, b, q=3, seed=1, dist="sphere", **kw),
}


def bn_model_and_batch():
    model = tiny_cnn_bn(torch.float32)
    model.train()
    return model, classification_batch(torch.float32, shape=(1, 5, 5))


@pytest.mark.parametrize("step", STEPS)
def test_parameters_bit_identical_and_running_stats_untouched(step):
    model, batch = bn_model_and_batch()
    before = snapshot(model)
    STEPS[step](model, batch, update_running_stats=False)
    assert_state_equal(model, before)


@pytest.mark.parametrize("step", STEPS)
def test_running_stats_move_exactly_once_by_default(step):
    model, batch = bn_model_and_batch()
    twin, _ = bn_model_and_batch()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        default_loss(twin, batch)  # one plain training forward
    STEPS[step](model, batch)
    assert_state_equal(model, snapshot(twin))


class FailingLoss:
    """Behaves like the default loss until call number `fail_at`, then raises or returns NaN."""

    def __init__(self, fail_at, mode):
        self.calls, self.fail_at, self.mode = 0, fail_at, mode

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            if self.mode == "raise":
                raise RuntimeError("solver crashed")
            return torch.tensor(float("nan"))
        return default_loss(model, batch)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("mode", ["raise", "nan"])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_failure_mid_step_restores_everything(step, mode, fail_at):
    model, batch = bn_model_and_batch()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = snapshot(model)
    expected_error = RuntimeError if mode == "raise" else zokernels.NonFiniteLossError
    with pytest.raises(expected_error) as info:
        STEPS[step](model, batch, loss_fn=FailingLoss(fail_at, mode))
    message = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    assert "restored" in message and ("query" in message or "evaluation" in message)
    assert_state_equal(model, before)
    assert all(torch.all(p.grad == 7.0) for p in model.parameters()), "grads must not be half-written"


def test_dropout_draws_same_mask_in_every_query():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).double()
    model.train()
    batch = classification_batch()
    zokernels.cge_step(model, batch, mu=1e-6, scheme="central")
    estimate = model[0].bias.grad.clone()
    # With common random numbers the estimate is a derivative of one fixed subnetwork: finite and moderate (|∂L|
    # of a 4-8-3 network on unit inputs is O(1)); with fresh dropout masks per query it would be |ΔL|/μ ~ 1e5.
    assert torch.isfinite(estimate).all() and estimate.abs().max() < 10
    state = torch.get_rng_state()
    with torch.no_grad():
        model(batch[0])
    after_one_forward = torch.get_rng_state()
    torch.set_rng_state(state)
    zokernels.cge_step(model, batch, mu=1e-6)
    assert torch.equal(after_one_forward, torch.get_rng_state()), "a step consumes one forward's randomness"


def test_tf32_setting_restored():
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        zokernels.cge_step(tiny_mlp(), classification_batch())
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
