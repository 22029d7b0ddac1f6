"""The fused rule sweep in zokernels.optim (kernels/rule_sweep.py): ZOSGD and ZOSignSGD (with or without a dense
momentum buffer), ZOAdam and weight decay on the gaussian basis update every tensor in one Philox sweep, ĝ never
materialized. The kernel itself is checked
against its numpy twin on every backend in tests/test_kernel_matrix.py (row rule_sweep_); here:
- the fused update equals the materialized one (rule.fuse = False: ĝ per tensor, the rule's torch `delta`) bit for
  bit, parameters and fp32 state, in fp32/fp16/bf16/fp64, q = 1 and q > 1, with groups, per-group lr and weight
  decay and LeZO sampling; the fused optimizer never calls the materialized code;
- a failing closure leaves parameters and Adam / momentum state bit-identical on the fused path;
- the fused path's extra memory is the restore copy + state + RNG states, exactly (no fp32 ĝ buffer);
- bad arguments are refused with the argument named, before anything is written.
"""
import pytest
import torch
import torch.nn.functional as F

import zokernels.optim as zo
from zokernels import backends
from zokernels.estimators.common import NonFiniteLossError
from zokernels.kernels.rule_sweep import RuleSpec
from zokernels.philox import rule_sweep_
from zokernels.optim.core import Directions
from helpers import FailingClosure
from test_optim import _profiled_peak, deep_equal, make_problem

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _grouped(params):
    """Two groups with their own lr and weight decay (the per-tensor rows of one sweep differ)."""
    return [{"params": params[:2], "weight_decay": 0.2}, {"params": params[2:], "lr": 0.08}]


CASES = {  # name -> factory(params, q, backend)
    "sign": lambda p, q, b: zo.ZOSignSGD(p, lr=0.05, mu=0.02, q=q, seed=31, backend=b),
    "sign_wd_forward": lambda p, q, b: zo.ZOSignSGD(p, lr=0.05, mu=0.02, q=q, weight_decay=0.1,
                                                    estimator="forward", seed=32, backend=b),
    "adam": lambda p, q, b: zo.ZOAdam(p, lr=0.05, mu=0.02, q=q, seed=33, backend=b),
    "adam_groups_lezo": lambda p, q, b: zo.ZOAdam(_grouped(p), lr=0.05, mu=0.02, q=q, weight_decay=0.01,
                                                  layers_per_step=1, seed=34, backend=b),
    "sgd_wd_groups": lambda p, q, b: zo.ZOSGD(_grouped(p), lr=0.05, mu=0.02, q=q, weight_decay=0.1, seed=35,
                                              backend=b),
    "conservative_sign_wd": lambda p, q, b: zo.ZOConservative(p, lr=0.3, mu=0.02, q=q, weight_decay=0.05, sign=True,
                                                              seed=36, backend=b),
    "sgd_momentum_groups_lezo": lambda p, q, b: zo.ZOSGD(_grouped(p), lr=0.05, mu=0.02, q=q, momentum=0.9,
                                                         layers_per_step=1, seed=37, backend=b),
    "sign_momentum_wd": lambda p, q, b: zo.ZOSignSGD(p, lr=0.05, mu=0.02, q=q, momentum=0.8, weight_decay=0.1,
                                                     seed=38, backend=b),
}


def _refuse_materializing(opt, monkeypatch):
    """Makes the materialized path fail loudly for `opt`: its rule's delta and the per-tensor combination."""
    def refuse(*args, **kwargs):
        raise AssertionError("the fused optimizer materialized ĝ")

    monkeypatch.setattr(opt.rule, "delta", refuse)
    monkeypatch.setattr(Directions, "combination", refuse)


def _run(case, q, dtype, backend, fuse, steps=3, monkeypatch=None):
    _, params, _, closure = make_problem(dtype)
    opt = CASES[case](params, q, backend)
    opt.rule.fuse = fuse
    calls = {"delta": 0}
    if not fuse:
        delta = opt.rule.delta
        opt.rule.delta = lambda *a, **k: calls.__setitem__("delta", calls["delta"] + 1) or delta(*a, **k)
    for _ in range(steps):
        if fuse and monkeypatch is not None:
            with monkeypatch.context() as m:
                _refuse_materializing(opt, m)
                opt.step(closure)
        else:
            opt.step(closure)
    return params, opt, calls


def _assert_same(fused, materialized):
    (p_f, opt_f, _), (p_m, opt_m, _) = fused, materialized
    for i, (a, b) in enumerate(zip(p_f, p_m)):
        differ = (a != b).sum().item()
        assert a.dtype == b.dtype and torch.equal(a, b), f"parameter {i}: {differ} of {a.numel()} elements differ"
    assert deep_equal(opt_f.state_dict(), opt_m.state_dict()), "fp32 state differs"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_update_equals_materialized_bitwise(case, q, dtype, monkeypatch):
    fused = _run(case, q, DTYPES[dtype], None, True, monkeypatch=monkeypatch)
    materialized = _run(case, q, DTYPES[dtype], None, False)
    if not case.startswith("sgd_wd"):  # SGD's linear materialized path needs no rule delta
        assert materialized[2]["delta"] > 0, "the materialized twin did not materialize"
    assert fused[1].transient_buffers() == 0 < materialized[1].transient_buffers()
    _assert_same(fused, materialized)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["adam_groups_lezo", "sign_wd_forward", "sgd_momentum_groups_lezo"])
def test_fused_update_on_other_backends_equals_materialized(case, backend, monkeypatch):
    """The sweep backends of the optimizer (cpu above; torch, and Triton in the interpreter) agree bit for bit."""
    status = backends.availability()[backend]
    if not status.available:
        pytest.skip(f"backend {backend!r} cannot run here: {status.reason}")
    if backend == "triton" and backends.refusal("triton", torch.device("cpu")) is not None:
        pytest.skip("triton runs on CPU tensors only in the interpreter (TRITON_INTERPRET=1)")
    fused = _run(case, 2, torch.bfloat16, backend, True, steps=2, monkeypatch=monkeypatch)
    materialized = _run(case, 2, torch.bfloat16, "cpu" if backends.availability()["cpu"].available else "torch",
                        False, steps=2)
    _assert_same(fused, materialized)


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("case", ["adam_groups_lezo", "adam", "sign_wd_forward", "sgd_momentum_groups_lezo",
                                  "sign_momentum_wd"])
def test_failing_closure_leaves_parameters_and_adam_state_bit_identical(case, how, monkeypatch):
    _, params, _, closure = make_problem(torch.float32)
    opt = CASES[case](params, 2, None)
    _refuse_materializing(opt, monkeypatch)
    for _ in range(2):  # the moments exist before the failing step
        opt.step(closure)
    for fail_at in sorted({1, 2, opt.last_step.forwards}):
        before, state = [p.detach().clone() for p in params], opt.state_dict()
        failing = FailingClosure(closure, fail_at, how)
        with pytest.raises(RuntimeError if how == "raise" else NonFiniteLossError):
            opt.step(failing)
        assert failing.calls == fail_at
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert deep_equal(opt.state_dict(), state)


@pytest.mark.parametrize("make", [lambda g: zo.ZOAdam(g, lr=1e-3, weight_decay=0.01),
                                  lambda g: zo.ZOSignSGD(g, lr=1e-3, weight_decay=0.01),
                                  lambda g: zo.ZOSGD(g, lr=1e-3, momentum=0.9, weight_decay=0.01),
                                  lambda g: zo.ZOSignSGD(g, lr=1e-3, momentum=0.9)])
def test_fused_extra_memory_is_copy_state_and_rng_exactly(make):
    """No fp32 ĝ (or Δ) buffer: the step's peak extra memory is the restore copy + state + RNG states, as the
    formula now states (transient bound 0); the materialized path of the same optimizer allocates more."""
    if not backends.availability()["cpu"].available:
        pytest.skip("the allocation-free fused sweep is the cpu backend's (_C not built)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt = make(list(model.parameters()))

    def closure():
        return F.cross_entropy(model(x), y)

    def extra():
        held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
        # the restore copies kept between steps
        kept = sum(c.numel() * c.element_size() for c in opt._restore_copies.copies[0])
        return held + kept + _profiled_peak(lambda: opt.step(closure)) - inference

    opt.step(closure)
    with torch.no_grad():
        inference = _profiled_peak(closure)
    formula = opt.memory_formula()
    assert formula["transient_bound"] == 0
    assert extra() == formula["restore_copy"] + formula["state"] + formula["rng"] == formula["total_bound"]
    opt.rule.fuse = False
    assert extra() > formula["total_bound"]


@pytest.mark.parametrize("make", [
    lambda p: zo.ZOSGD([{"params": p[:2], "momentum": 0.0}, {"params": p[2:]}], lr=0.05, momentum=0.9),
    lambda p: zo.ZOSignSGD([{"params": p[:2], "momentum": 0.5}, {"params": p[2:]}], lr=0.05)])
def test_groups_mixing_momentum_and_none_take_the_materialized_path(make):
    """One sweep runs one rule: groups with and without a dense momentum buffer are not swept (and still step)."""
    _, params, _, closure = make_problem(torch.float32)
    opt = make(params)
    before = [p.detach().clone() for p in params]
    assert not opt.rule.sweepable(opt) and opt.transient_buffers() > 0
    opt.step(closure)
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def _sweep_args(rule="adam", n=(5, 7)):
    out = [torch.zeros(k) for k in n]
    sources = [torch.randn(k) for k in n]
    state = [(torch.zeros(k), torch.zeros(k)) for k in n] if rule == "adam" else [(), ()]
    hyper = {"adam": (0.9, 0.1, 0.999, 0.001, 0.03, 1e-8, -0.5), "sign": (-0.1,), "linear": ()}[rule]
    return out, sources, [0, n[0]], 3, [(1, 0.5)], [RuleSpec(rule, hyper, -0.01, st) for st in state]


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.__setitem__(5, [a[5][0], RuleSpec("sign", (-0.1,))]), ValueError, "one rule"),
    (lambda a: a.__setitem__(5, [RuleSpec("adam", (0.9,), None, a[5][0].state), a[5][1]]), ValueError,
     r"specs\[0\].hyper"),
    (lambda a: a.__setitem__(5, [RuleSpec("adam", a[5][0].hyper, None, (torch.zeros(5, dtype=torch.float64),
                                                                        torch.zeros(5))), a[5][1]]), TypeError,
     r"specs\[0\].state exp_avg must be a float32"),
    (lambda a: a.__setitem__(5, [RuleSpec("nesterov"), a[5][1]]), ValueError, r"specs\[0\].rule"),
    (lambda a: a.__setitem__(5, a[5][:1]), ValueError, "specs must have one entry"),
    (lambda a: a.__setitem__(1, [a[1][0], torch.randn(7, dtype=torch.float64)]), ValueError,
     r"out\[1\] and sources\[1\]"),
    (lambda a: a.__setitem__(0, [a[0][0], torch.zeros(14)[::2]]), ValueError, r"out\[1\] must be contiguous"),
    (lambda a: a.__setitem__(3, -1), ValueError, "seed"),
])
def test_rule_sweep_bad_arguments_are_named_and_nothing_is_written(change, error, match):
    args = list(_sweep_args())
    change(args)
    out_before = [t.clone() for t in args[0]]
    state_before = [t.clone() for spec in args[5] for t in spec.state]
    with pytest.raises(error, match=match):
        rule_sweep_(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[0], out_before))
    assert all(torch.equal(a, b) for a, b in zip([t for spec in args[5] for t in spec.state], state_before))
