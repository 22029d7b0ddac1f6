"""Property-based tests (hypothesis) of every public verb (cge_step, rge_step, mezo_step, ZOSVRG) over malformed
inputs: batches (empty, None, zero samples, wrong shapes or dtypes, NaN / inf inputs), masks (wrong keys, shapes,
dtypes, types), mu / lr / q / seed values (0, negative, NaN, inf, bool, str, None, tensors), and losses that return
NaN / inf / non-scalars / non-numbers or raise, at any call of a step.

The contract (zokernels/estimators/common.py) checked on every example: a call either succeeds and keeps its promise
(cge_step, rge_step and mezo_step(update=False): parameters bit-identical and a finite estimate in `.grad`; mezo_step
and ZOSVRG.step: finite parameters, buffers bit-identical), or it raises
- ValueError or TypeError (bad arguments, malformed batches, a batch that does not fit the model),
- zokernels.NonFiniteLossError, a FloatingPointError subclass, when the loss is NaN or inf,
- or the user's own exception, unchanged and carrying zokernels' note, when the user's loss raises,
and never anything else; after an error parameters, buffers and `.grad` are bit-identical to before the call
(mezo_step(mode='inplace') promises parameters up to rounding, checked against its bound).

Examples are derandomized (the same ones on every run and machine) and no example database is written.
"""
import math
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import zokernels
from zokernels import NonFiniteLossError
from zokernels.estimators.common import is_query_failure

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, configuration, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Hypothesis caches what it learns (e.g. the constants of the source, gathered while pytest collects, right after
# this module is imported) under ./.hypothesis: keep it in the temporary directory, out of the checkout.
configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "zokernels-tests-hypothesis")

SETTINGS = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONTRACT_ERRORS = (ValueError, TypeError, NonFiniteLossError)


# ---- models and batches -----------------------------------------------------------------------------------------
def make_model(kind):
    torch.manual_seed(0)
    if kind == "mlp32":
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    if kind == "mlp64":
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(8, 3))  # "cnn_bn": buffers (BN running statistics)
    return model.train()


def input_shape(kind):
    return (1, 5, 5) if kind == "cnn_bn" else (4,)


def dtype_of(model):
    return next(model.parameters()).dtype


# Batches every verb must refuse before evaluating anything (ValueError / TypeError naming the batch), or evaluate
# to a NaN / inf loss (NonFiniteLossError).
STRUCTURAL = ["good", "good_with_extra", "empty_tuple", "empty_list", "empty_dict", "none", "zero_samples",
              "nan_inputs", "inf_inputs", "inputs_only", "dict_without_labels"]
# Batches whose tensors do not fit the model: the model call or the loss fails inside the first evaluation.
MISFIT = ["wrong_features", "wrong_input_dtype", "integer_inputs", "float_targets", "targets_out_of_range",
          "targets_too_short", "targets_2d"]


def make_batch(kind, model_kind, dtype, n=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *input_shape(model_kind), generator=g).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return {
        "good": lambda: (x, y), "good_with_extra": lambda: (x, y, torch.ones(n)), "empty_tuple": lambda: (),
        "empty_list": lambda: [], "empty_dict": lambda: {}, "none": lambda: None,
        "zero_samples": lambda: (x[:0], y[:0]), "nan_inputs": lambda: (x * float("nan"), y),
        "inf_inputs": lambda: (x * float("inf"), y), "inputs_only": lambda: x,
        "dict_without_labels": lambda: {"input": x},
        "wrong_features": lambda: (x[..., :2], y), "wrong_input_dtype": lambda: (x.to(torch.float16), y),
        "integer_inputs": lambda: (x.long(), y), "float_targets": lambda: (x, y.float()),
        "targets_out_of_range": lambda: (x, y + 7), "targets_too_short": lambda: (x, y[:-1]),
        "targets_2d": lambda: (x, y[:, None]),
    }[kind]()


# ---- losses -----------------------------------------------------------------------------------------------------
class UserLossFailure(Exception):
    """What a user's loss raises: not a ValueError / TypeError, so it can only pass as the user's own exception."""


class UserLoss:
    """loss_fn(model, batch): cross-entropy until call `at`, where it misbehaves as `how` says."""

    def __init__(self, how, at):
        self.how, self.at, self.calls, self.raised = how, at, 0, False

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.at and self.how != "ok":
            if self.how == "raise":
                self.raised = True
                raise UserLossFailure("the user's loss failed")
            if self.how == "raise_value_error":
                self.raised = True
                raise ValueError("the user's loss rejected the batch")
            return {"nan": torch.tensor(float("nan")), "inf": torch.tensor(float("inf")),
                    "-inf": -math.inf, "vector": torch.ones(3), "string": "0.5", "none": None}[self.how]
        return nn.functional.cross_entropy(model(batch[0]), batch[1])


LOSS_HOWS = ["ok", "nan", "inf", "-inf", "vector", "string", "none", "raise", "raise_value_error"]


@st.composite
def losses(draw):
    """None (the default loss), or a UserLoss: well-behaved, or misbehaving at one of the first five calls."""
    how = draw(st.sampled_from(["default", "ok"] * 3 + LOSS_HOWS[1:]))
    return None if how == "default" else UserLoss(how, draw(st.integers(1, 5)))


# ---- scalar arguments -------------------------------------------------------------------------------------------
BAD_SCALARS = [0, 0.0, -1e-3, -1, float("nan"), float("inf"), -float("inf"), True, False, "0.1", None, [1e-3],
               torch.tensor(1e-3), 1e30]
BAD_FLOATS = st.one_of(st.sampled_from(BAD_SCALARS), st.floats(allow_nan=True, allow_infinity=True))
BAD_COUNTS = st.one_of(st.integers(-3, 0), st.sampled_from([1.5, True, "2", None, float("nan"), 2.0]))  # q
BAD_SEEDS = st.sampled_from([-1, 2**64, 2**70, 1.5, "3", True])


@st.composite
def arguments(draw, good, bad):
    """Keyword arguments: all `good` but at most one (or none), drawn from `bad[name]`. One malformation at a time
    (or none, half of the time) so that every path runs: validation, queries and their failures, success."""
    kwargs = dict(good)
    name = draw(st.sampled_from([None] * len(bad) + sorted(bad)))
    if name is not None:
        kwargs[name] = draw(bad[name])
    return kwargs


@st.composite
def batches(draw, model_kind, dtype, kinds):
    """The good batch half of the time, else one of `kinds`."""
    kind = draw(st.sampled_from(["good"] * len(kinds) + kinds))
    return make_batch(kind, model_kind, dtype)


@st.composite
def masks(draw, model):
    named = dict(model.named_parameters())
    name = draw(st.sampled_from(sorted(named)))
    shape = named[name].shape
    kind = draw(st.sampled_from(["wrong_key", "wrong_shape", "float", "uint8", "list", "not_tensor", "empty_dict",
                                 "all_false", "partial", "good"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 3)))
    good = torch.rand(shape, generator=g) < 0.5
    return {"good": {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in named.items()},
            "partial": {name: good}, "wrong_key": {name + ".x": good}, "wrong_shape": {name: good.flatten()[:-1]},
            "float": {name: good.float()}, "uint8": {name: good.to(torch.uint8)}, "list": [good],
            "not_tensor": {name: good.tolist()}, "empty_dict": {},
            "all_false": {name: torch.zeros(shape, dtype=torch.bool)}}[kind]


# ---- the contract -----------------------------------------------------------------------------------------------
def state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})


def assert_unchanged(model, before, inplace_mu=None):
    values, grads = before
    for k, v in model.state_dict().items():
        if inplace_mu is not None and v.is_floating_point() and k in dict(model.named_parameters()):
            # mezo_step(mode='inplace'): θ ± μz undone by one sweep, ≤ 2 roundings of ≤ 2⁻²⁴(|θ| + μ|z|), |z| < 10
            # for these few elements (the module docstring's bound)
            bound = 2.0 ** -23 * (values[k].double().abs() + 10 * abs(inplace_mu))
            assert torch.all((v.double() - values[k].double()).abs() <= bound), k
        else:
            assert torch.equal(v, values[k]), f"{k} changed"
    for n, p in model.named_parameters():
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n]), f"{n}.grad changed"


def run_contract(call, model, loss, writes_grad, inplace_mu=None):
    """Runs `call` under the contract; returns the result, or None when it raised an allowed error."""
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = state(model)
    if isinstance(loss, UserLoss):
        loss.raised = False  # a ZOSVRG loss serves several steps
    try:
        result = call()
    except Exception as error:
        event(f"raised {type(error).__name__}")  # --hypothesis-show-statistics: what the examples exercised
        check_error(error, model, before, loss, inplace_mu)
        return None
    event("succeeded")
    assert not (isinstance(loss, UserLoss) and loss.raised), "the user's loss raised but the step succeeded"
    values, _ = before
    for n, p in model.named_parameters():
        if writes_grad:
            assert torch.equal(p.detach(), values[n]), f"{n} changed by a step that writes .grad"
        assert torch.isfinite(p).all() and (p.grad is None or torch.isfinite(p.grad).all()), n
    return result


def check_error(error, model, before, loss, inplace_mu):
    user_raised = isinstance(loss, UserLoss) and loss.raised
    if isinstance(error, CONTRACT_ERRORS):
        if user_raised and str(error) == "the user's loss rejected the batch":
            assert is_query_failure(error), "the user's exception must carry zokernels' note"
    elif isinstance(error, UserLossFailure):  # the user's own exception, unchanged
        assert user_raised and is_query_failure(error) and "restored" in " ".join(error.__notes__), error.__notes__
    else:  # only the user's loss itself failing (a misfit batch under loss_fn) may raise anything else
        assert isinstance(loss, UserLoss) and is_query_failure(error), (
            f"{type(error).__name__} outside the contract: {error}")
    assert_unchanged(model, before, inplace_mu)


# ---- one property per verb --------------------------------------------------------------------------------------
MODEL_KINDS = ["mlp32", "mlp64", "cnn_bn"]


@SETTINGS
@given(st.data())
def test_cge_step_keeps_the_contract(data):
    model_kind = data.draw(st.sampled_from(MODEL_KINDS))
    model = make_model(model_kind)
    batch = data.draw(batches(model_kind, dtype_of(model), STRUCTURAL[1:] + MISFIT))
    loss = data.draw(losses())
    kwargs = data.draw(arguments(
        dict(mu=5e-3, mask=None, scheme="forward", engine="auto"),
        dict(mu=BAD_FLOATS, mask=masks(model), scheme=st.sampled_from(["central", "backward", None, 1]),
             engine=st.sampled_from(["naive", "delta", "fast"]))))
    run_contract(lambda: zokernels.cge_step(model, batch, loss, update_running_stats=False, **kwargs), model, loss,
                 writes_grad=True)


@SETTINGS
@given(st.data())
def test_cge_step_reports_misfit_batches_as_value_errors(data):
    """The default loss (engine and naive path): a batch that does not fit the model is a ValueError naming it."""
    model_kind = data.draw(st.sampled_from(["mlp32", "cnn_bn"]))
    model = make_model(model_kind)
    batch = make_batch(data.draw(st.sampled_from(MISFIT)), model_kind, dtype_of(model))
    run_contract(lambda: zokernels.cge_step(model, batch, update_running_stats=False), model, None, writes_grad=True)


@SETTINGS
@given(st.data())
def test_rge_step_keeps_the_contract(data):
    model_kind = data.draw(st.sampled_from(MODEL_KINDS))
    model = make_model(model_kind)
    batch = data.draw(batches(model_kind, dtype_of(model), STRUCTURAL[1:] + MISFIT))
    loss = data.draw(losses())
    kwargs = data.draw(arguments(
        dict(mu=5e-3, q=2, seed=None, dist="gaussian"),
        dict(mu=BAD_FLOATS, q=BAD_COUNTS, seed=BAD_SEEDS,
             dist=st.sampled_from(["sphere", "per_tensor_unit", "uniform", None]))))
    run_contract(lambda: zokernels.rge_step(model, batch, loss, update_running_stats=False, **kwargs), model, loss,
                 writes_grad=True)


@SETTINGS
@given(st.data())
def test_mezo_step_keeps_the_contract(data):
    model_kind = data.draw(st.sampled_from(MODEL_KINDS))
    model = make_model(model_kind)
    batch = data.draw(batches(model_kind, dtype_of(model), STRUCTURAL[1:] + MISFIT))
    loss = data.draw(losses())
    kwargs = data.draw(arguments(
        dict(mu=1e-3, lr=1e-2, q=2, seed=None, param_filter=None, mode=data.draw(st.sampled_from(["exact", "inplace"])),
             update=True),
        dict(mu=BAD_FLOATS, lr=BAD_FLOATS, q=BAD_COUNTS, seed=BAD_SEEDS,
             param_filter=st.sampled_from(["bias", "norm", "heads", 3, lambda n, p: False]),
             mode=st.sampled_from(["fast", None]), update=st.sampled_from([False, 1, None]))))
    writes_grad = kwargs["update"] is False
    inplace = kwargs["mode"] == "inplace" and kwargs["mu"] == 1e-3
    run_contract(lambda: zokernels.mezo_step(model, batch, loss, **kwargs), model, loss, writes_grad=writes_grad,
                 inplace_mu=1e-3 if inplace else None)


@SETTINGS
@given(st.data())
def test_zosvrg_keeps_the_contract(data):
    model_kind = data.draw(st.sampled_from(MODEL_KINDS))
    model = make_model(model_kind)
    dtype = dtype_of(model)
    good = make_batch("good", model_kind, dtype)
    anchors = data.draw(st.sampled_from(["good", "two"] * 3 + ["not_list", "empty", "bad_batch"]))
    anchor_batches = {"good": [good], "two": [good, good], "not_list": good, "empty": [],
                      "bad_batch": [data.draw(batches(model_kind, dtype, STRUCTURAL[2:] + MISFIT))]}[anchors]
    loss = data.draw(losses())
    kwargs = data.draw(arguments(
        dict(q=2, lr_anchor=1e-2, lr=1e-2, mu=1e-3, seed=None),
        dict(q=BAD_COUNTS, lr_anchor=BAD_FLOATS, lr=BAD_FLOATS, mu=BAD_FLOATS, seed=BAD_SEEDS)))
    before = state(model)
    try:
        opt = zokernels.ZOSVRG(model, anchor_batches, loss, **kwargs)
    except (ValueError, TypeError) as error:
        event(f"constructor raised {type(error).__name__}")
        assert_unchanged(model, before)
        return
    for _ in range(3):  # an anchor step, then minibatch steps on drawn batches
        batch = data.draw(batches(model_kind, dtype, STRUCTURAL[1:] + MISFIT))
        t, anchor = opt.t, [a.clone() for a in opt.anchor]
        if run_contract(lambda: opt.step(batch), model, loss, writes_grad=False) is None:
            same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(anchor, opt.anchor))
            assert opt.t == t and same, "a failed step moved the step count or the anchor θ̄"
        else:
            assert opt.t == t + 1
