"""Bad input raises ValueError/TypeError naming the argument and what was expected."""
import re

import pytest
import torch

import zokernels

from helpers import assert_state_equal, classification_batch, snapshot, tiny_mlp

VERBS = {  # every public verb, as step(model, batch, **kwargs)
    "cge_step": zokernels.cge_step,
    "cge_step naive": lambda m, b, **kw: zokernels.cge_step(m, b, engine="naive", **kw),
    "rge_step": lambda m, b, **kw: zokernels.rge_step(m, b, q=2, seed=3, **kw),
    "mezo_step": lambda m, b, **kw: zokernels.mezo_step(m, b, q=2, seed=3, **kw),
    "mezo_step inplace": lambda m, b, **kw: zokernels.mezo_step(m, b, q=2, seed=3, mode="inplace", **kw),
    "ZOSVRG.step": lambda m, b, loss_fn=None: _svrg_minibatch_step(m, b, loss_fn),
}


def _svrg_minibatch_step(model, batch, loss_fn):
    """A ZOSVRG minibatch step on `batch`, after an anchor step on a good batch that leaves θ as it is (η1 = 0)."""
    opt = zokernels.ZOSVRG(model, [classification_batch(model[0].weight.dtype)], loss_fn, q=2, lr_anchor=0.0, seed=3)
    opt.step(None)
    return opt.step(batch)


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


def test_default_loss_needs_targets(model_and_batch):
    model, batch = model_and_batch
    for step in VERBS.values():
        with pytest.raises(TypeError, match=r"batch must hold targets .*a tuple \(x, y, \.\.\.\)"):
            step(model, batch[0])


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


# ---- the error contract (zokernels/estimators/common.py) -------------------------------------------------------
@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("batch, error", [((), ValueError), ([], ValueError), ({}, ValueError), (None, TypeError),
                                          ("empty", ValueError)])
def test_empty_or_missing_batch_is_named_before_anything_runs(model_and_batch, verb, batch, error):
    model, good = model_and_batch
    if isinstance(batch, str):
        batch = (good[0][:0], good[1][:0])  # zero samples: the mean loss would be NaN
    before = snapshot(model)
    with pytest.raises(error, match="batch"):
        VERBS[verb](model, batch)
    assert_state_equal(model, before)


@pytest.mark.parametrize("verb", VERBS)
def test_batch_with_extra_items_works_with_the_default_loss(model_and_batch, verb):
    model, (x, y) = model_and_batch
    result = VERBS[verb](model, (x, y, torch.ones(len(y))))  # (x, y, *rest): the model sees x, the loss y
    assert result.num_queries > 0


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("misfit", ["features", "dtype", "target dtype", "target range"])
def test_batch_that_does_not_fit_the_model_is_a_value_error_naming_batch(model_and_batch, verb, misfit):
    model, (x, y) = model_and_batch
    batch = {"features": (x[:, :3], y), "dtype": (x.float(), y), "target dtype": (x, y.double()),
             "target range": (x, y + 10)}[misfit]
    before = snapshot(model)
    with pytest.raises(ValueError, match="batch does not fit the model.*restored"):
        VERBS[verb](model, batch)
    assert_restored(model, before, inplace=verb == "mezo_step inplace")


def assert_restored(model, before, inplace=False, mu=1e-3):
    """Bit-identical; mezo_step(mode='inplace') promises parameters up to rounding: undoing θ + μz costs at most
    one rounding of θ⁺ and one of the result, each ≤ 2⁻²⁴(|θ| + μ|z|), |z| < 10 for these few elements."""
    if not inplace:
        return assert_state_equal(model, before)
    for name, value in model.state_dict().items():
        bound = 2.0 ** -23 * (before[name].abs() + 10 * mu) if value.is_floating_point() else 0
        assert torch.all((value - before[name]).abs() <= bound), name


def test_a_bare_cge_step_on_an_empty_tuple_is_a_value_error(model_and_batch):
    with pytest.raises(ValueError, match="batch is an empty tuple"):
        zokernels.cge_step(model_and_batch[0], ())


class FailAt:
    """A loss (loss_fn(model, batch), or output_loss(outputs, batch) with output=True) that is cross-entropy
    until call `at`, where it raises a ValueError or returns NaN / inf."""

    def __init__(self, at, how, output=False):
        self.calls, self.at, self.how, self.output = 0, at, how, output

    def __call__(self, first, batch):
        self.calls += 1
        if self.calls == self.at:
            if self.how == "raise":
                raise LookupError("the user's loss failed")  # any type: it must come back unchanged
            return torch.tensor(float(self.how))
        logits = first if self.output else first(batch[0])
        return torch.nn.functional.cross_entropy(logits, batch[1])


# (verb, which call of the loss fails, the query the error must name); seed 3, q = 2, CGE's forward scheme; ZOSVRG's
# anchor step makes calls 1-2, its minibatch step 3-4 at θ and 5-6 at θ̄
QUERIES = [
    ("cge_step naive", 1, "the base (unperturbed) evaluation"),
    ("cge_step naive", 2, "the +mu query of 0.weight[0]"),
    ("cge_step naive", 7, "the +mu query of 0.weight[5]"),
    ("rge_step", 1, "the base (unperturbed) evaluation"),
    ("rge_step", 3, "the +mu query along direction 1 (seed 3)"),
    ("mezo_step", 1, "the +mu query along direction 0 (seed 3)"),
    ("mezo_step", 4, "the -mu query along direction 1 (seed 3)"),
    ("mezo_step inplace", 2, "the -mu query along direction 0 (seed 3)"),
    ("ZOSVRG.step", 3, "the +mu query along direction 1 (seed 3) at θ (minibatch step)"),
    ("ZOSVRG.step", 6, "the -mu query along direction 1 (seed 3) at the anchor θ̄ (minibatch step)"),
]


@pytest.mark.parametrize("how", ["raise", "nan", "inf"])
@pytest.mark.parametrize("verb, at, query", QUERIES)
def test_failing_loss_error_names_loss_query_and_restore(model_and_batch, verb, at, query, how):
    model, batch = model_and_batch
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = snapshot(model)
    error = LookupError if how == "raise" else zokernels.NonFiniteLossError
    with pytest.raises(error) as info:
        VERBS[verb](model, batch, loss_fn=FailAt(at, how))
    text = " ".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert f"loss_fn {'raised' if how == 'raise' else 'returned ' + how} " in text.replace("raised by loss_fn", "loss_fn raised")
    assert f"during {query};" in text and "restored" in text, text
    if how != "raise":
        assert (info.value.source, info.value.query) == ("loss_fn", query)
    assert_restored(model, before, inplace=verb == "mezo_step inplace")
    assert all(torch.all(p.grad == 7.0) for p in model.parameters()), "grads must not be half-written"



@pytest.mark.parametrize("engine", ["auto", "delta"])
@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("at, query", [(1, "the base (unperturbed) evaluation"), (2, "the +mu query of 0.weight[0]")])
def test_failing_output_loss_on_the_engine_path_follows_the_same_contract(model_and_batch, at, query, how,
                                                                          engine):
    model, batch = model_and_batch
    before = snapshot(model)
    error = LookupError if how == "raise" else zokernels.NonFiniteLossError
    with pytest.raises(error) as info:
        zokernels.cge_step(model, batch, output_loss=FailAt(at, how, output=True), engine=engine)
    assert_state_equal(model, before)
    text = " ".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert "output_loss" in text and f"during {query};" in text and "restored" in text, text


@pytest.mark.parametrize("engine", ["naive", "auto"])
@pytest.mark.parametrize("mu, what", [(1e-12, "does not move"), (1e39, "overflows")])
def test_cge_mu_that_moves_no_coordinate_or_overflows_is_named(model_and_batch, engine, mu, what):
    """CGE divides by the realized step fl(θ + μ) − θ: a μ below half an ulp of |θ| (h = 0) or beyond the dtype's
    range is refused, naming the coordinate, before it turns into a division by zero or NaN estimates."""
    model, batch = model_and_batch
    model.float()
    batch = (batch[0].float(), batch[1])
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"mu={mu!r} {what} 0.weight[0]")):
        zokernels.cge_step(model, batch, mu=mu, engine=engine)
    assert_state_equal(model, before)


def test_a_batch_that_does_not_fit_gets_its_error_and_no_fallback_warning():
    """The recorder sees the misfit first; cge_step must not announce a naive fallback for a step that then fails
    on the plain forward with the batch error."""
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batch = (torch.randn(6, 4), torch.randint(0, 3, (5,)))  # 6 inputs, 5 targets
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"(?s)batch_size.*the base \(unperturbed\) evaluation"):
            zokernels.cge_step(model, batch)
    assert not [w for w in caught if "full evaluations" in str(w.message)], [str(w.message) for w in caught]


def test_a_fallback_warning_points_at_the_callers_line():
    import warnings

    class Reads(torch.nn.Module):  # Python reads a parameter-dependent value: a blocker
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            out = self.lin(x)
            return out * 2 if float(out.sum()) > -1e9 else out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zokernels.cge_step(Reads(), (torch.randn(6, 4), torch.randint(0, 3, (6,))))
    fallback = [w for w in caught if "full evaluations" in str(w.message)]
    assert len(fallback) == 1 and fallback[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]
