"""zokernels.optim against its float64 reference twins (reference/optim_ref.py), and its contracts.

Twin comparison, per step (3 steps, the twin starting from the product's state before each step):
- the closure sees the twin's query points bit for bit (same count: the forwards), the same losses, the same
  coefficients c_j and the same LeZO layers;
- new parameters and fp32 state lie within the twin's derived bound (running error analysis of the documented fp32
  operations, see optim_ref's docstring); the bound is smaller than the update itself (median ratio < 1/2), and in
  float32 a twin whose lr is off by 1e-4 relative falls outside it, so the check can fail.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zokernels.optim as zo
from zokernels.estimators.common import NonFiniteLossError
from zokernels.reference.optim_ref import svrg_step_ref, zo_step_ref

from helpers import FailingClosure

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# name -> (factory(params, q), uses groups)
CASES = {
    "zosgd": lambda p, q: zo.ZOSGD(p, lr=0.05, mu=0.02, q=q, seed=11),
    "zosgd_forward_clip": lambda p, q: zo.ZOSGD(p, lr=0.05, mu=0.02, q=q, estimator="forward", clip=0.5, seed=12),
    "zosgd_momentum_wd": lambda p, q: zo.ZOSGD(p, lr=0.05, mu=0.02, q=q, momentum=0.9, weight_decay=0.1, seed=13),
    "zosgd_replay": lambda p, q: zo.ZOSGD(p, lr=0.05, mu=0.02, q=q, momentum=0.8, momentum_buffer="replay",
                                          replay_window=2, seed=14),
    "zoadam": lambda p, q: zo.ZOAdam(p, lr=0.05, mu=0.02, q=q, weight_decay=0.01, seed=15),
    "zosign_momentum": lambda p, q: zo.ZOSignSGD(p, lr=0.05, mu=0.02, q=q, momentum=0.5, seed=16),
    "zoconservative": lambda p, q: zo.ZOConservative(p, lr=0.3, mu=0.02, q=q, seed=17),
    "fzoo": lambda p, q: zo.FZOO(p, lr=0.05, mu=0.02, n=q + 1, seed=18),
    "hizoo": lambda p, q: zo.HiZOO(p, lr=0.05, mu=0.02, q=q, hessian_smoothing=0.2, seed=19),
    "lezo_groups": lambda p, q: zo.LeZO(p, lr=0.05, layers_per_step=1, mu=0.02, q=q, seed=20),
    "lezo_adam_tensors": lambda p, q: zo.ZOAdam(p, lr=0.05, mu=0.02, q=q, layers_per_step=2, seed=21),
}
GROUPED = {"lezo_groups"}


def make_problem(dtype, grouped=False):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model = model.to(dtype)
    x = torch.randn(12, 5, generator=g).to(dtype)
    y = torch.randint(0, 3, (12,), generator=g)
    params = list(model.parameters())
    groups = ([{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight, model[2].bias], "lr": 0.08}]
              if grouped else params)

    def closure():
        return F.cross_entropy(model(x).double(), y)

    return model, params, groups, closure


def cfg_of(opt):
    rule = {"SGDRule": "sgd", "SignRule": "sign", "AdamRule": "adam"}[type(opt.rule).__name__]
    return {"estimator": opt.estimator, "basis": opt.basis, "rule": rule, "mu": opt.mu, "q": opt.q, "clip": opt.clip,
            "group_sizes": [len(g["params"]) for g in opt.param_groups], "layers_per_step": opt.layers_per_step,
            "momentum_buffer": getattr(opt.rule, "momentum_buffer", "dense"),
            "replay_window": getattr(opt.rule, "replay_window", 0), "needs_base": opt.needs_base,
            "conservative": isinstance(opt, zo.ZOConservative),
            "hessian_smoothing": getattr(opt, "hessian_smoothing", None)}


def recording(closure, params):
    seen = []

    def wrapped():
        seen.append([p.detach().clone() for p in params])
        return closure()

    return wrapped, seen


def evaluated_at(params, closure):
    """closure(), evaluated with the parameters set to `points` and put back after."""
    def at(points):
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, v in zip(params, points):
                p.copy_(v)
            value = float(closure())
            for p, v in zip(params, saved):
                p.copy_(v)
        return value

    return at


def twin_step(opt, params, closure, before_params, before_state, lr_scale=1.0):
    loss_at = evaluated_at(params, closure)

    groups = [{**{k: v for k, v in g.items() if k != "params"}, "lr": g["lr"] * lr_scale}
              for g in opt.param_groups for _ in g["params"]]
    return zo_step_ref(cfg_of(opt), before_params, groups, before_state["state"], before_state["zo"].get("history", []),
                       loss_at, before_state["zo"]["seed"], before_state["zo"]["t"])


def within(values, ref, bound):
    return bool(np.all(np.abs(values - ref) <= bound))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_update_matches_float64_twin(case, q, dtype):
    model, params, groups, closure = make_problem(DTYPES[dtype], case in GROUPED)
    opt = CASES[case](groups, q)
    ratios, accepted_any = [], False
    for step in range(3):
        before = [p.detach().clone() for p in params]
        state = opt.state_dict()
        wrapped, seen = recording(closure, params)
        opt.step(wrapped)
        info = opt.last_step
        ref = twin_step(opt, params, closure, [b.clone() for b in before], state)

        assert len(seen) == len(ref.points) == info.forwards
        # ZOConservative's last call is at the candidate θ_new, which the twin knows only within its bound
        exact = len(seen) - 1 if isinstance(opt, zo.ZOConservative) else len(seen)
        for got, want in zip(seen[:exact], ref.points[:exact]):
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and torch.equal(a, b), "query point differs from the twin's"
        for a, (x, bound) in zip(seen[exact:][0] if exact < len(seen) else [], ref.candidate):
            assert within(a.double().reshape(-1).numpy(), x, bound)
        assert info.losses[:exact] == ref.losses[:exact]
        assert info.coefficients == ref.coefficients
        assert info.layers == ref.layers and info.accepted == ref.accepted
        for i, p in enumerate(params):
            got = p.detach().double().reshape(-1).numpy()
            assert within(got, ref.params[i], ref.bounds[i]), (
                f"step {step} tensor {i}: max excess {np.max(np.abs(got - ref.params[i]) - ref.bounds[i]):.3g}")
            if i in ref.active and ref.accepted:
                delta = np.abs(ref.params[i] - before[i].double().reshape(-1).numpy())
                ratios.append(np.median(ref.bounds[i]) / max(np.median(delta), 1e-300))
        for i, new_state in ref.state.items():
            st = opt.state[params[i]]
            for key, bounded in new_state.items():
                got = np.asarray(float(st[key]) if key == "step" else st[key].double().reshape(-1).numpy())
                assert within(got, bounded.value, bounded.err), f"state {key} of tensor {i} outside the bound"
        if ref.history:  # replayed momentum: the kept history ends with this step's coefficients
            assert list(opt.state_dict()["zo"]["history"][-1][2]) == list(ref.coefficients)
        accepted_any |= ref.accepted
        if dtype == "fp32" and ref.accepted and step == 0:
            # the bound can fail: a twin with lr off by 1e-4 (relative) lands outside it
            wrong = twin_step(opt, params, closure, before, state, lr_scale=1 + 1e-4)
            got = [p.detach().double().reshape(-1).numpy() for p in params]
            assert not all(within(g, r, bd) for g, r, bd in zip(got, wrong.params, wrong.bounds))
    assert accepted_any
    assert ratios and np.median(ratios) < 0.5, f"bound not small against the update: {np.median(ratios):.3g}"


def test_conservative_rejects_and_restores_bit_for_bit():
    model, params, _, closure = make_problem(torch.float32)
    opt = zo.ZOConservative(params, lr=50.0, mu=0.02, seed=3)  # a huge step: the loss increases
    before = [p.detach().clone() for p in params]
    state = opt.state_dict()
    opt.step(closure)
    assert not opt.last_step.accepted and opt.last_step.candidate_loss > opt.last_step.loss
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.t == 1 and opt.last_step.forwards == 4
    ref = twin_step(opt, params, closure, [b.clone() for b in before], state)
    assert not ref.accepted and ref.losses[:-1] == opt.last_step.losses[:-1]


FAILING = ["zosgd", "zosgd_momentum_wd", "zosgd_replay", "zoadam", "zosign_momentum", "zoconservative", "fzoo",
           "hizoo", "lezo_adam_tensors"]


def deep_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("case", FAILING)
def test_failing_closure_leaves_everything_bit_identical(case, how):
    model, params, groups, closure = make_problem(torch.float32)
    opt = CASES[case](groups, 2)
    for _ in range(2):  # state exists (moments, history, H) before the failing step
        opt.step(closure)
    forwards = opt.last_step.forwards
    twin_model, twin_params, twin_groups, twin_closure = make_problem(torch.float32)
    twin_opt = CASES[case](twin_groups, 2)
    twin_opt.load_state_dict(opt.state_dict())
    with torch.no_grad():
        for a, b in zip(twin_params, params):
            a.copy_(b)
    for fail_at in sorted({1, 2, forwards}):
        before_params = [p.detach().clone() for p in params]
        before_state, rng = opt.state_dict(), torch.get_rng_state()
        failing = FailingClosure(closure, fail_at, how)
        with pytest.raises(RuntimeError if how == "raise" else NonFiniteLossError) as error:
            opt.step(failing)
        assert failing.calls == fail_at
        assert "optimizer state" in (str(error.value) + " ".join(getattr(error.value, "__notes__", [])))
        assert all(torch.equal(p, b) for p, b in zip(params, before_params))
        assert deep_equal(opt.state_dict(), before_state)
        assert torch.equal(torch.get_rng_state(), rng)
    # the failures changed nothing: the next step equals the step of an optimizer that never failed
    opt.step(closure)
    twin_opt.step(twin_closure)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert deep_equal(opt.state_dict(), twin_opt.state_dict())


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_resumes_exactly(case):
    _, params, groups, closure = make_problem(torch.float32, case in GROUPED)
    opt = CASES[case](groups, 2)
    for _ in range(2):
        opt.step(closure)
    _, params2, groups2, closure2 = make_problem(torch.float32, case in GROUPED)
    resumed = CASES[case](groups2, 2)
    resumed.seed = 999  # overwritten by the load
    resumed.load_state_dict(opt.state_dict())
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    for _ in range(2):
        opt.step(closure)
        resumed.step(closure2)
        assert all(torch.equal(a, b) for a, b in zip(params, params2))


@pytest.mark.parametrize("make,forwards", [
    (lambda p: zo.ZOSGD(p, lr=0.01, q=3), 6), (lambda p: zo.ZOSGD(p, lr=0.01, q=3, estimator="forward"), 4),
    (lambda p: zo.FZOO(p, lr=0.01, n=5), 6), (lambda p: zo.HiZOO(p, lr=0.01, q=2), 5),
    (lambda p: zo.ZOConservative(p, lr=0.01, q=2), 6),
    (lambda p: zo.ZOConservative(p, lr=0.01, q=2, estimator="forward"), 4)])
def test_forwards_per_step(make, forwards):
    _, params, _, closure = make_problem(torch.float32)
    opt = make(params)
    calls = []
    opt.step(lambda: calls.append(1) or closure())
    assert len(calls) == forwards == opt.last_step.forwards


def test_common_random_numbers_and_rng_after_step():
    """Every closure call of a step sees the same RNG state (dropout draws the same masks); afterwards the RNG is
    where one closure call leaves it."""
    _, params, _, loss = make_problem(torch.float32)
    draws = []

    def closure():
        draws.append(torch.rand(3))  # what a dropout layer would draw
        return loss()

    opt = zo.ZOSGD(params, lr=0.01, q=2, seed=1)
    torch.manual_seed(5)
    start = torch.get_rng_state()
    opt.step(closure)
    after = torch.get_rng_state()
    assert len(draws) == 4 and all(torch.equal(d, draws[0]) for d in draws)
    torch.set_rng_state(start)
    torch.rand(3)
    assert torch.equal(after, torch.get_rng_state())


def test_persistent_state_matches_the_stated_bytes():
    for make in [lambda p: zo.ZOSGD(p, lr=0.01), lambda p: zo.ZOSGD(p, lr=0.01, momentum=0.9),
                 lambda p: zo.ZOSGD(p, lr=0.01, momentum=0.9, momentum_buffer="replay"),
                 lambda p: zo.ZOAdam(p), lambda p: zo.ZOSignSGD(p, lr=0.01, momentum=0.5),
                 lambda p: zo.ZOConservative(p, lr=0.01), lambda p: zo.FZOO(p, lr=0.01),
                 lambda p: zo.HiZOO(p, lr=0.01)]:
        _, params, _, closure = make_problem(torch.float32)
        opt = make(params)
        opt.step(closure)
        held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
        assert held == opt.memory_formula()["state"]
        assert opt.memory_formula()["restore_copy"] == sum(p.numel() * p.element_size() for p in params)


def test_torch_optim_conventions():
    _, params, _, closure = make_problem(torch.float32)
    opt = zo.ZOSGD(params, lr=0.1, seed=2)
    assert isinstance(opt, torch.optim.Optimizer)
    params[0].grad = torch.ones_like(params[0])
    opt.zero_grad()
    assert torch.equal(params[0].grad, torch.ones_like(params[0]))  # no-op
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(closure)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="optimizer-wide"):
        zo.ZOSGD([{"params": params, "mu": 0.1}], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        zo.ZOConservative(params, lr=0.1).add_param_group({"params": [torch.zeros(2, requires_grad=True)],
                                                            "momentum": 0.9})
    with pytest.raises(ValueError, match="n must be"):
        zo.FZOO(params, lr=0.1, n=1)
    hizoo = zo.HiZOO(params[:2], lr=0.01)
    hizoo.add_param_group({"params": params[2:]})
    hizoo.step(closure)
    assert all(torch.all(hizoo.state[p]["hessian"] > 0) for p in params)


def _profiled_peak(fn):
    """Peak allocated-minus-freed CPU bytes during fn(), from the profiler's raw [memory] events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("make,exact", [
    (lambda g: zo.ZOSGD(g, lr=1e-3), True), (lambda g: zo.ZOSGD(g, lr=1e-3, momentum=0.9, momentum_buffer="replay"),
                                             True),
    (lambda g: zo.LeZO(g, lr=1e-3, layers_per_step=1), True), (lambda g: zo.ZOAdam(g, lr=1e-3), False),
    (lambda g: zo.HiZOO(g, lr=1e-3), False), (lambda g: zo.FZOO(g, lr=1e-3), False)])
def test_measured_extra_memory_matches_formula(make, exact):
    """Peak extra memory of a step over one closure call: equal to restore copy + RNG states on the sweep path;
    between copy + state + RNG and the stated bound (with transients) where the update is materialized."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 96), torch.nn.Tanh(),
                                torch.nn.Linear(96, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt = make([{"params": list(model[k].parameters())} for k in (0, 2, 4)])

    def closure():
        return F.cross_entropy(model(x), y)

    opt.step(closure)
    with torch.no_grad():
        inference = _profiled_peak(closure)
    held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
    # the last step's restore copies, kept for the next
    kept = sum(c.numel() * c.element_size() for c in opt._restore_copies.copies[0])
    layers_before = opt.last_step.layers
    measured = held + kept + _profiled_peak(lambda: opt.step(closure)) - inference
    formula = opt.memory_formula()
    fixed = kept + formula["state"] + formula["rng"]
    if opt.layers_per_step is None:
        assert kept == formula["restore_copy"]
    else:  # the formula's copy is the largest k layers; each step copies its own k
        copied = sum(p.numel() * p.element_size() for k in opt.last_step.layers
                     for p in opt.param_groups[k]["params"])
        assert kept <= formula["restore_copy"] and copied <= formula["restore_copy"]
        if opt.last_step.layers != layers_before:
            # new copies; the profiler cannot see the old ones freed (allocated before it started), so their bytes
            # stay in `kept` here: test_restore_copies_are_kept_between_steps_and_freed_before_new_ones checks
            fixed += copied
    if exact:
        assert measured == fixed
    else:
        assert fixed <= measured <= formula["total_bound"]


def test_restore_copies_are_kept_between_steps_and_freed_before_new_ones():
    """The restore copies are the same tensors from step to step while the active set stays; when layer sampling
    changes it, the old copies are gone before the step's first closure call (no peak of old + new)."""
    import weakref

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    groups = [{"params": list(model[k].parameters())} for k in (0, 2, 4)]
    dense, sampled = zo.ZOSGD(groups, lr=1e-3), zo.LeZO(groups, lr=1e-3, layers_per_step=1)
    dense.step(lambda: F.cross_entropy(model(x), y))
    first = [c.data_ptr() for c in dense._restore_copies.copies[0]]
    dense.step(lambda: F.cross_entropy(model(x), y))
    assert [c.data_ptr() for c in dense._restore_copies.copies[0]] == first and len(first) == 6
    changes = 0
    for _ in range(12):
        sampled.step(lambda: F.cross_entropy(model(x), y))
        before, old = sampled.last_step.layers, [weakref.ref(c) for c in sampled._restore_copies.copies[0]]
        alive_at_first_call = []

        def closure():
            if not alive_at_first_call:
                alive_at_first_call.append(any(r() is not None for r in old))
            return F.cross_entropy(model(x), y)

        sampled.step(closure)
        if sampled.last_step.layers != before:
            changes += 1
            assert alive_at_first_call == [False]
        else:
            assert alive_at_first_call == [True]
    assert changes > 0


# ---- MeZO-SVRG ----------------------------------------------------------------------------------------------------
def svrg_problem(dtype):
    """The make_problem MLP with minibatches (4 of the 12 examples, a different one each step) and a full batch of
    two chunks whose mean is the loss on all 12."""
    model, params, _, _ = make_problem(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g).to(dtype)
    y = torch.randint(0, 3, (12,), generator=g)

    def loss_on(idx):
        return lambda: F.cross_entropy(model(x[idx]).double(), y[idx])

    full = [loss_on(torch.arange(0, 6)), loss_on(torch.arange(6, 12))]
    minibatches = [loss_on(torch.randperm(12, generator=g)[:4]) for _ in range(6)]
    return params, full, minibatches


def svrg_twin(opt, params, before, anchor, anchor_terms, t, closure, full, lr_scale=1.0):
    group = opt.param_groups[0]
    return svrg_step_ref(before, anchor, anchor_terms, group["lr"] * lr_scale, group["lr_anchor"] * lr_scale, opt.mu,
                         opt.q, opt.anchor_every, opt.seed, t, evaluated_at(params, closure),
                         [evaluated_at(params, c) for c in full])


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
@pytest.mark.parametrize("q", [1, 3])
def test_svrg_matches_float64_twin(q, dtype):
    """Steps 0 and 3 are anchor steps (anchor_every = 3), 1, 2 and 4 minibatch steps against the stored anchor."""
    params, full, minibatches = svrg_problem(DTYPES[dtype])
    seen = []
    recorded = [lambda c=c: seen.append([p.detach().clone() for p in params]) or c() for c in full]
    opt = zo.ZOSVRG(params, lr=0.05, full_batch=recorded, mu=0.02, q=q, anchor_every=3, lr_anchor=0.1, seed=7)
    ratios = []
    for step in range(5):
        before = [p.detach().clone() for p in params]
        anchor = [opt.state[p]["anchor"].clone() for p in params]
        anchor_terms = list(opt.anchor_terms)
        seen.clear()
        wrapped, seen_mini = recording(minibatches[step], params)
        opt.step(wrapped)
        info = opt.last_step
        ref = svrg_twin(opt, params, before, anchor, anchor_terms, step, minibatches[step], full)
        calls = seen + seen_mini  # an anchor step calls only the full batch, a minibatch step only the closure
        # anchor step: 2 signs × 2 chunks per direction; minibatch step: 2 signs × (θ, θ̃)
        assert len(calls) == len(ref.points) == info.forwards == 4 * q
        for got, want in zip(calls, ref.points):
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want)), "query point differs"
        assert info.losses == ref.losses and info.coefficients == ref.coefficients
        assert opt.anchor_terms == ref.anchor_terms
        assert all(torch.equal(opt.state[p]["anchor"], a) for p, a in zip(params, ref.anchor))
        for i, p in enumerate(params):
            got = p.detach().double().reshape(-1).numpy()
            assert within(got, ref.params[i], ref.bounds[i]), f"step {step} tensor {i} outside the twin's bound"
            delta = np.abs(ref.params[i] - before[i].double().reshape(-1).numpy())
            ratios.append(np.median(ref.bounds[i]) / max(np.median(delta), 1e-300))
        if dtype == "fp32" and step in (0, 1):  # the bound can fail, on an anchor step and on a minibatch step
            wrong = svrg_twin(opt, params, before, anchor, anchor_terms, step, minibatches[step], full, 1 + 1e-4)
            got = [p.detach().double().reshape(-1).numpy() for p in params]
            assert not all(within(g, r, bd) for g, r, bd in zip(got, wrong.params, wrong.bounds))
    assert np.median(ratios) < 0.5, f"bound not small against the update: {np.median(ratios):.3g}"


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("anchor_step", [True, False])
def test_svrg_failing_closure_leaves_everything_bit_identical(anchor_step, how):
    params, full, minibatches = svrg_problem(torch.float32)
    fail = {"at": None, "calls": 0}

    def counted(closure):
        def wrapped():
            fail["calls"] += 1
            if fail["calls"] == fail["at"]:
                if how == "raise":
                    raise RuntimeError("closure failed")
                return torch.tensor(float("nan"))
            return closure()
        return wrapped

    opt = zo.ZOSVRG(params, lr=0.05, full_batch=[counted(c) for c in full], mu=0.02, q=2, anchor_every=2,
                    lr_anchor=0.1, seed=5)
    for k in range(2 if anchor_step else 3):  # anchor and ĝ_a exist; the next step is an anchor / minibatch step
        opt.step(counted(minibatches[k]))
    assert opt.is_anchor_step(opt.t) == anchor_step
    closure = counted(minibatches[4])
    forwards = 8
    for fail_at in (1, 2, forwards):
        before_params, before_state = [p.detach().clone() for p in params], opt.state_dict()
        rng = torch.get_rng_state()
        fail["calls"], fail["at"] = 0, fail_at
        with pytest.raises(RuntimeError if how == "raise" else NonFiniteLossError):
            opt.step(closure)
        assert fail["calls"] == fail_at
        assert all(torch.equal(p, b) for p, b in zip(params, before_params))
        assert deep_equal(opt.state_dict(), before_state)
        assert torch.equal(torch.get_rng_state(), rng)
    fail["at"] = None
    opt.step(closure)
    assert opt.last_step.forwards == forwards


def test_svrg_resumes_exactly_and_states_its_memory():
    params, full, minibatches = svrg_problem(torch.float32)
    opt = zo.ZOSVRG(params, lr=0.05, full_batch=full, mu=0.02, q=2, anchor_every=3, lr_anchor=0.1, seed=5)
    for k in range(2):
        opt.step(minibatches[k])
    params2, full2, minibatches2 = svrg_problem(torch.float32)
    resumed = zo.ZOSVRG(params2, lr=0.05, full_batch=full2, seed=999)
    resumed.load_state_dict(opt.state_dict())
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    for k in range(2, 5):
        opt.step(minibatches[k])
        resumed.step(minibatches2[k])
        assert all(torch.equal(a, b) for a, b in zip(params, params2))
    held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
    copy = sum(p.numel() * p.element_size() for p in params)
    assert held == copy == opt.memory_formula()["state"] == opt.memory_formula()["restore_copy"]
    assert len(opt.anchor_terms) == opt.q  # ĝ_a: q scalars and their streams, not a dense vector


def test_svrg_bad_arguments_are_named():
    params, full, _ = svrg_problem(torch.float32)
    for kwargs, error, match in [({"full_batch": None}, TypeError, "full_batch"),
                                 ({"full_batch": []}, TypeError, "full_batch"),
                                 ({"full_batch": [full[0], 3]}, TypeError, r"full_batch\[1\]"),
                                 ({"anchor_every": 0}, ValueError, "anchor_every"),
                                 ({"lr_anchor": -1.0}, ValueError, "lr_anchor"),
                                 ({"lr": float("nan")}, ValueError, "lr")]:
        with pytest.raises(error, match=match):
            zo.ZOSVRG(params, **{"lr": 0.1, "full_batch": full, **kwargs})
    with pytest.raises(ValueError, match="momentum"):
        zo.ZOSVRG([{"params": params, "momentum": 0.9}], lr=0.1, full_batch=full)
