"""zokernels.stacked_cge_step (the black-box CGE that sends the base point and K perturbed coordinates as one call of
Q = 1 + K parameter sets) against the slow twin reference.estimators_ref.cge_ref evaluated one query at a time, on
fresh random models; chunking; the error contract."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from zokernels import NonFiniteLossError, stacked_cge_step
from zokernels.reference.estimators_ref import cge_ref
from zokernels.sparsity import density_masks


def random_mlp(dtype, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def stacked_black_box(model, x, y):
    """The model as a black box over Q parameter sets at once: stacked[i] is [Q, *param_i.shape]."""
    names = [n for n, _ in model.named_parameters()]

    def stacked_loss(stacked):
        def one(*params):
            out = functional_call(model, dict(zip(names, params)), (x,))
            return nn.functional.cross_entropy(out, y)
        return torch.vmap(one)(*stacked)
    return stacked_loss


def one_query_loss(stacked_loss):
    """The same black box called with one parameter set (what cge_ref's one-at-a-time queries use)."""
    return lambda m, batch: stacked_loss([p.detach().unsqueeze(0) for p in m.parameters()])[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("max_queries", [2, 5, 256])
def test_equals_the_one_query_twin(dtype, max_queries):
    seed = torch.seed() % 2**31
    model = random_mlp(dtype, seed)
    x, y = torch.randn(8, 4, dtype=dtype), torch.randint(0, 3, (8,))
    mask = density_masks(model, 0.5, torch.Generator().manual_seed(seed))
    loss = stacked_black_box(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    result = stacked_cge_step(model, loss, mu=1e-3, mask=mask, max_queries=max_queries)
    twin = cge_ref(model, (x, y), one_query_loss(loss), mu=1e-3, mask=mask)
    coords = sum(int(m.sum()) for m in mask.values())
    assert result.num_coordinates == coords
    assert result.num_queries == coords + math.ceil(coords / (max_queries - 1))
    for (name, p), b in zip(model.named_parameters(), before):
        assert torch.equal(p, b), name  # the queries are copies
        # Same losses, same realized steps; the batched call may round the loss differently from the one-set call
        # (vmap batches the matmuls): bound by the twin's own rounding of a loss difference over the step.
        ulp = torch.finfo(dtype).eps * abs(result.loss) / 1e-3
        torch.testing.assert_close(p.grad, twin[name], rtol=0, atol=4 * ulp, msg=f"seed {seed}, {name}")


def test_float64_estimate_is_the_finite_difference_of_the_gradient():
    model = random_mlp(torch.float64, 0)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    stacked_cge_step(model, stacked_black_box(model, x, y), mu=1e-6)
    estimate = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for e, p in zip(estimate, model.parameters()):
        # forward difference: error ~ mu * curvature / 2 (curvature of a cross-entropy of this size is O(1))
        torch.testing.assert_close(e, p.grad, rtol=0, atol=1e-5)


def test_nonfinite_and_bad_output_leave_everything_untouched():
    model = random_mlp(torch.float32, 1)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="stacked_loss returned .*not modified"):
        stacked_cge_step(model, lambda s: torch.full((s[0].shape[0],), math.nan))
    with pytest.raises(ValueError, match=r"stacked_loss must return a tensor of shape \(52,\)"):  # 51 coordinates + base
        stacked_cge_step(model, lambda s: torch.zeros(3))
    with pytest.raises(RuntimeError, match="boom") as info:
        stacked_cge_step(model, lambda s: (_ for _ in ()).throw(RuntimeError("boom")))
    assert any("stacked_loss" in note for note in info.value.__notes__)
    for p, (value, grad) in zip(model.parameters(), before):
        assert torch.equal(p, value) and torch.equal(p.grad, grad)


def test_bad_arguments_name_themselves():
    model = random_mlp(torch.float32, 2)
    loss = lambda s: torch.zeros(s[0].shape[0])  # noqa: E731
    with pytest.raises(ValueError, match="max_queries must be >= 2"):
        stacked_cge_step(model, loss, max_queries=1)
    with pytest.raises(ValueError, match="mu must be"):
        stacked_cge_step(model, loss, mu=-1.0)
    with pytest.raises(ValueError, match="mask selects no coordinates"):
        stacked_cge_step(model, loss, mask={})
    with pytest.raises(ValueError, match="density must be a number in"):
        density_masks(model, 0.0, torch.Generator())
