"""Bad input raises ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

import zokernels

from helpers import classification_batch, tiny_mlp


@pytest.fixture
def model_and_batch():
    return tiny_mlp(), classification_batch()


@pytest.mark.parametrize("mu,error", [(0.0, ValueError), (-1e-3, ValueError), (float("nan"), ValueError),
                                      ("0.1", TypeError), (True, TypeError)])
def test_mu(model_and_batch, mu, error):
    for step in (zokernels.cge_step, zokernels.rge_step):
        with pytest.raises(error, match="mu"):
            step(*model_and_batch, mu=mu)


@pytest.mark.parametrize("q,error", [(0, ValueError), (-2, ValueError), (1.5, TypeError)])
def test_q(model_and_batch, q, error):
    with pytest.raises(error, match="q must be"):
        zokernels.rge_step(*model_and_batch, q=q)


def test_unknown_scheme_and_dist(model_and_batch):
    with pytest.raises(ValueError, match="scheme must be one of"):
        zokernels.cge_step(*model_and_batch, scheme="backward")
    with pytest.raises(ValueError, match="dist must be one of"):
        zokernels.rge_step(*model_and_batch, dist="uniform")


def test_mask_errors(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match=r"mask\['0.weight'\] must have the parameter's shape"):
        zokernels.cge_step(model, batch, mask={"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"mask\['0.weight'\] must be a torch.bool tensor, got torch.float32"):
        zokernels.cge_step(model, batch, mask={"0.weight": torch.ones(5, 4)})
    with pytest.raises(ValueError, match="not a trainable parameter"):
        zokernels.cge_step(model, batch, mask={"weight": torch.ones(5, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match="mask must be a dict"):
        zokernels.cge_step(model, batch, mask=[torch.ones(5, 4, dtype=torch.bool)])


def test_model_without_trainable_parameters(model_and_batch):
    model, batch = model_and_batch
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable floating-point parameters"):
        zokernels.cge_step(model, batch)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        zokernels.rge_step(lambda x: x, batch)


def test_default_loss_needs_pair(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(TypeError, match=r"batch must be a tuple \(x, y\)"):
        zokernels.cge_step(model, batch[0])


def test_non_scalar_loss(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match="must return a scalar"):
        zokernels.cge_step(model, batch, loss_fn=lambda m, b: m(b[0]))


def test_unavailable_backend_says_why(model_and_batch):
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*"):
        zokernels.rge_step(*model_and_batch, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        zokernels.rge_step(*model_and_batch, backend="tpu")


def test_seed_range(model_and_batch):
    with pytest.raises(ValueError, match="seed"):
        zokernels.rge_step(*model_and_batch, seed=-1)
