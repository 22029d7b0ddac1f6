"""cge_step / rge_step against float64 finite-difference math, autograd, and the reference twins."""
import math

import pytest
import torch

import zokernels
from zokernels.estimators.common import default_loss
from zokernels.reference import cge_ref, rge_ref

from helpers import autograd_gradient, classification_batch, tiny_cnn_bn, tiny_mlp


class Quadratic(torch.nn.Module):
    """f(θ) = ½ θᵀAθ + bᵀθ with gradient Aθ + b and third derivative 0 (central differences are exact up to
    rounding; forward differences err by exactly μ/2 · A_ii)."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T + d * torch.eye(d, dtype=torch.float64))
        self.register_buffer("b", torch.randn(d, generator=g, dtype=torch.float64))
        self.theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def gradient(self):
        return (self.A @ self.theta + self.b).detach()


def quadratic_loss(model, batch):
    return model()


@pytest.mark.parametrize("mu", [1e-2, 1e-3])
def test_cge_quadratic_forward_is_first_order_and_central_exact(mu):
    model = Quadratic()
    exact = model.gradient()
    zokernels.cge_step(model, None, loss_fn=quadratic_loss, mu=mu, scheme="forward")
    forward_error = model.theta.grad - exact
    # Forward difference of a quadratic: error = μ/2 · A_ii exactly (plus rounding ~1e-16/μ).
    torch.testing.assert_close(forward_error, 0.5 * mu * torch.diagonal(model.A), atol=1e-9 / mu, rtol=1e-6)
    zokernels.cge_step(model, None, loss_fn=quadratic_loss, mu=mu, scheme="central")
    torch.testing.assert_close(model.theta.grad, exact, atol=1e-9 / mu, rtol=0)


@pytest.mark.parametrize("make_model,shape", [(tiny_mlp, (4,)), (tiny_cnn_bn, (1, 5, 5))])
def test_cge_matches_autograd_in_float64(make_model, shape):
    model = make_model()
    model.train()
    batch = classification_batch(shape=shape)
    expected = autograd_gradient(model, batch, default_loss)
    mu = 1e-5
    zokernels.cge_step(model, batch, mu=mu, scheme="central", update_running_stats=False)
    for name, p in model.named_parameters():
        # central difference: truncation O(μ²·|f'''|) + rounding O(ε·|f|/μ)
        torch.testing.assert_close(p.grad, expected[name], atol=1e-8, rtol=1e-6, msg=name)
    zokernels.cge_step(model, batch, mu=mu, scheme="forward", update_running_stats=False)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=5 * mu, rtol=0, msg=name)  # O(μ·|f''|)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_naive_cge_step_equals_reference_with_mask(scheme):
    # engine="naive": the same arithmetic as the reference, so bit-equal (the delta engine is in test_engine.py)
    model = tiny_cnn_bn(torch.float32)
    batch = classification_batch(torch.float32, shape=(1, 5, 5))
    g = torch.Generator().manual_seed(1)
    mask = {name: torch.rand(p.shape, generator=g) < 0.4 for name, p in model.named_parameters()
            if name != "1.bias"}
    expected = cge_ref(model, batch, mu=1e-2, mask=mask, scheme=scheme)
    result = zokernels.cge_step(model, batch, mu=1e-2, mask=mask, scheme=scheme, update_running_stats=False,
                                engine="naive")
    n_coords = sum(int(m.sum()) for m in mask.values())
    assert result.num_coordinates == n_coords
    assert result.num_queries == 1 + n_coords * (2 if scheme == "central" else 1)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
        if name in mask:
            assert torch.all(p.grad[~mask[name]] == 0)
    assert torch.all(model.get_parameter("1.bias").grad == 0)


@pytest.mark.parametrize("dist", ["gaussian", "sphere", "per_tensor_unit"])
@pytest.mark.parametrize("backend", ["torch", None])
def test_rge_step_equals_reference(dist, backend):
    model = tiny_mlp(torch.float64)
    batch = classification_batch()
    expected = rge_ref(model, batch, mu=1e-4, q=3, dist=dist, seed=123)
    result = zokernels.rge_step(model, batch, mu=1e-4, q=3, dist=dist, seed=123, backend=backend)
    assert result.seed == 123 and result.num_queries == 4
    for name, p in model.named_parameters():
        # z is bit-identical on both paths; the reference forms u and the update in float64, the kernel in fp32.
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6 * expected[name].abs().max())


@pytest.mark.parametrize("dist", ["gaussian", "sphere"])
def test_averaged_rge_is_unbiased_for_autograd(dist):
    model = tiny_mlp(torch.float64, inputs=3, hidden=4, classes=2)  # d = 26
    batch = classification_batch(shape=(3,), classes=2)
    expected = torch.cat([g.flatten() for g in autograd_gradient(model, batch, default_loss).values()])
    q, mu = 8000, 1e-6
    zokernels.rge_step(model, batch, mu=mu, q=q, dist=dist, seed=7)
    estimate = torch.cat([p.grad.flatten() for p in model.parameters()])
    d = estimate.numel()
    # Var of the averaged estimator ≈ (d + 1)/q · ||∇||² (Gaussian); allow 5 standard deviations.
    tolerance = 5 * math.sqrt((d + 1) / q) * expected.norm()
    assert (estimate - expected).norm() < tolerance
    assert torch.nn.functional.cosine_similarity(estimate, expected, dim=0) > 0.95


def test_rge_same_seed_same_estimate_and_seed_none_draws_one():
    model, batch = tiny_mlp(), classification_batch()
    zokernels.rge_step(model, batch, q=2, seed=5)
    first = [p.grad.clone() for p in model.parameters()]
    zokernels.rge_step(model, batch, q=2, seed=5)
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters()))
    result = zokernels.rge_step(model, batch)
    assert isinstance(result.seed, int)


def test_accumulate_adds_to_existing_grad():
    model, batch = tiny_mlp(), classification_batch()
    zokernels.cge_step(model, batch)
    once = [p.grad.clone() for p in model.parameters()]
    zokernels.cge_step(model, batch, accumulate=True)
    for a, p in zip(once, model.parameters()):
        torch.testing.assert_close(p.grad, 2 * a)


def test_optimizer_steps_on_estimates():
    model, batch = tiny_mlp(torch.float32), classification_batch(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        losses.append(zokernels.cge_step(model, batch, mu=1e-3).loss)
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0]
