"""mezo_step and ZOSVRG: fused sweeps vs the per-tensor reference, SPSA/SVRG statistics on quadratics, side-effect
freedom on failure, bad input."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zokernels
from zokernels import NonFiniteLossError, ZOSVRG, mezo_step, philox
from zokernels.reference.mezo_ref import add_combination_ref, mezo_step_ref


def cpu_sampler(n, seed, stream, offset):
    return philox.philox_normal(n, seed, stream, offset)


def small_mlp(dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return torch.randn(24, 6, generator=g).to(dtype), torch.randint(0, 3, (24,), generator=g)


@pytest.mark.parametrize("mode", ["exact", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q", [1, 3])
def test_fused_step_equals_per_tensor_reference_bitwise(mode, dtype, q):
    model, (x, y) = small_mlp(dtype), data(dtype)
    twin = copy.deepcopy(model)
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]).float(), b[1])  # noqa: E731
    result = mezo_step(model, (x, y), loss_fn, mu=1e-2, lr=0.05, seed=123, q=q, mode=mode)
    params = list(twin.parameters())
    grads = mezo_step_ref(twin, params, lambda: loss_fn(twin, (x, y)).item(), 1e-2, 0.05, 123, q,
                          cpu_sampler, mode)
    assert result.projected_grads == grads
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), small_mlp(dtype).parameters()))


def quadratic_model(d=6):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    hessian = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    model = torch.nn.Module()
    model.theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    return model, hessian, b


def test_spsa_converges_in_expectation_to_gradient():
    model, hessian, b = quadratic_model()
    loss = lambda m, _: 0.5 * m.theta @ hessian @ m.theta - b @ m.theta  # noqa: E731
    theta0 = model.theta.detach().clone()
    gradient = hessian @ theta0 - b
    n = 1500
    samples = torch.empty(n, theta0.numel(), dtype=torch.float64)
    for i in range(n):
        mezo_step(model, None, loss, mu=1e-3, lr=1.0, seed=i)
        samples[i] = theta0 - model.theta.detach()  # lr = 1: the step is minus the estimate
        model.theta.data.copy_(theta0)
    mean, stderr = samples.mean(0), samples.std(0) / n ** 0.5
    assert torch.all((mean - gradient).abs() <= 5 * stderr)
    assert (mean - gradient).norm() / gradient.norm() < 0.25


def finite_sum_problem(d=6, n_data=16):
    """f(θ) = mean_i ½‖θ − c_i‖², with widely spread c_i: minibatch noise dominates MeZO's variance."""
    g = torch.Generator().manual_seed(4)
    centers = 5.0 * torch.randn(n_data, d, generator=g, dtype=torch.float64)
    model = torch.nn.Module()
    model.theta = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    loss = lambda m, idx: 0.5 * ((m.theta - centers[idx]) ** 2).sum(1).mean()  # noqa: E731
    return model, centers, loss


def test_svrg_estimate_unbiased_with_lower_variance_than_mezo():
    model, centers, loss = finite_sum_problem()
    d, n_data = centers.shape[1], centers.shape[0]
    anchor_point = torch.full((d,), 0.3, dtype=torch.float64)
    theta = anchor_point + 0.05 * torch.arange(d, dtype=torch.float64)
    gradient = theta - centers.mean(0)
    full = [torch.arange(n_data)]
    rng = np.random.default_rng(0)
    n = 600
    svrg, mezo = torch.empty(n, d, dtype=torch.float64), torch.empty(n, d, dtype=torch.float64)
    for i in range(n):
        minibatch = torch.from_numpy(rng.choice(n_data, 2, replace=False))
        model.theta.data.copy_(anchor_point)
        opt = ZOSVRG(model, full, loss, q=10**6, lr_anchor=0.0, lr=1.0, mu=1e-3, seed=i)
        opt.step(None)  # anchor at θ̄ = anchor_point, no move (η1 = 0)
        model.theta.data.copy_(theta)
        opt.step(minibatch)
        svrg[i] = theta - model.theta.detach()
        model.theta.data.copy_(theta)
        mezo_step(model, minibatch, loss, mu=1e-3, lr=1.0, seed=10**6 + i)
        mezo[i] = theta - model.theta.detach()
    for samples in (svrg, mezo):
        stderr = samples.std(0) / n ** 0.5
        assert torch.all((samples.mean(0) - gradient).abs() <= 5 * stderr)
    assert svrg.var(0).sum() < 0.5 * mezo.var(0).sum()


def test_svrg_anchor_is_a_stored_copy_and_updates_follow_algorithm_1():
    model, centers, loss = finite_sum_problem()
    opt = ZOSVRG(model, [torch.arange(16)], loss, q=3, lr_anchor=0.1, lr=0.01, mu=1e-3, seed=7)
    start = model.theta.detach().clone()
    results = [opt.step(torch.tensor([i, i + 1])) for i in range(7)]
    assert [r.anchor for r in results] == [True, False, False, True, False, False, True]
    # anchor stored at step 6 = θ_6, and differs from the current θ_7 after the anchor update
    assert not torch.equal(opt.anchor[0], model.theta.detach())
    assert not torch.equal(start, model.theta.detach())
    assert loss(model, torch.arange(16)) < 0.5 * ((start - centers) ** 2).sum(1).mean()


class Exploding(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2).to(dtype)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("failure", ["nan", "raise"])
@pytest.mark.parametrize("call", [1, 2, 3])
def test_failing_loss_leaves_parameters_bit_identical_in_exact_mode(failure, call):
    model = Exploding(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]

    def loss(m, x):
        out = m(x).float().sum()
        if m.calls == call:
            if failure == "raise":
                raise RuntimeError("solver crashed")
            return out * float("nan")
        return out

    with pytest.raises(NonFiniteLossError if failure == "nan" else RuntimeError):
        mezo_step(model, torch.randn(3, 4, dtype=torch.bfloat16), loss, q=2, lr=0.1, mode="exact")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.data_ptr() != 0 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_workspace_reuses_its_copies_and_changes_no_bit_of_the_steps(dtype):
    """A MeZOWorkspace only keeps the exact mode's scratch copies alive between steps: the same parameters and
    projected gradients as steps that allocate their own, and the copies are the same tensors from step to step
    (reallocated only when the selected parameters change)."""
    model, (x, y) = small_mlp(dtype), data(dtype)
    twin = copy.deepcopy(model)
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]).float(), b[1])  # noqa: E731
    workspace = zokernels.MeZOWorkspace()
    addresses = set()
    for step in range(4):
        seed = int(torch.randint(0, 2**40, (1,)).item())
        ours = mezo_step(model, (x, y), loss_fn, mu=1e-2, lr=0.05, seed=seed, q=2, workspace=workspace)
        plain = mezo_step(twin, (x, y), loss_fn, mu=1e-2, lr=0.05, seed=seed, q=2)
        assert ours.projected_grads == plain.projected_grads
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
        addresses.add(tuple(t.data_ptr() for t in workspace.plus + workspace.minus))
    assert len(addresses) == 1 and len(workspace.plus) == len(list(model.parameters()))
    mezo_step(model, (x, y), loss_fn, lr=0.05, param_filter="bias", workspace=workspace)
    assert [t.shape for t in workspace.plus] == [p.shape for n, p in model.named_parameters() if "bias" in n]
    workspace.release()
    assert workspace.plus == [] and workspace.minus == []


def test_failing_step_with_a_workspace_restores_parameters_and_the_next_step_matches():
    model = Exploding(torch.float32)
    twin = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(3, 4)
    workspace = zokernels.MeZOWorkspace()

    def loss(m, batch):
        out = m(batch).sum()
        if m.calls == 2:
            raise RuntimeError("solver crashed")
        return out

    with pytest.raises(RuntimeError, match="solver crashed"):
        mezo_step(model, x, loss, lr=0.1, seed=5, workspace=workspace)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    ours = mezo_step(model, x, loss, lr=0.1, seed=6, workspace=workspace)
    plain = mezo_step(twin, x, lambda m, b: m(b).sum(), lr=0.1, seed=6)
    assert ours.projected_grads == plain.projected_grads
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_svrg_failure_restores_theta_and_anchor():
    model, centers, loss = finite_sum_problem()
    poisoned = {"on": False}

    def maybe_nan(m, idx):
        value = loss(m, idx)
        return value * float("nan") if poisoned["on"] and idx is not None and len(idx) == 2 else value

    opt = ZOSVRG(model, [torch.arange(16)], maybe_nan, q=5, lr_anchor=0.1, lr=0.01, seed=1)
    opt.step(None)
    theta, anchor = model.theta.detach().clone(), opt.anchor[0].clone()
    poisoned["on"] = True
    with pytest.raises(NonFiniteLossError):
        opt.step(torch.tensor([0, 1]))
    assert torch.equal(theta, model.theta.detach()) and torch.equal(anchor, opt.anchor[0])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"mu": 0.0}, ValueError, "mu"), ({"lr": -1.0}, ValueError, "lr"), ({"q": 0}, ValueError, "q"),
    ({"q": 1.5}, TypeError, "q"), ({"mode": "fast"}, ValueError, "mode"), ({"seed": -3}, ValueError, "seed"),
    ({"param_filter": "heads"}, ValueError, "param_filter"), ({"param_filter": 3}, TypeError, "param_filter"),
    ({"param_filter": lambda n, p: False}, ValueError, "param_filter"),
    ({"workspace": [torch.zeros(3)]}, TypeError, "workspace"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        mezo_step(small_mlp(), data(), **kwargs)


def test_bad_svrg_arguments_are_named():
    with pytest.raises(TypeError, match="anchor_batches"):
        ZOSVRG(small_mlp(), data())
    with pytest.raises(ValueError, match="anchor_batches"):
        ZOSVRG(small_mlp(), [])
    with pytest.raises(ValueError, match="lr_anchor"):
        ZOSVRG(small_mlp(), [data()], lr_anchor=float("nan"))
    with pytest.raises(TypeError, match="model"):
        mezo_step("not a model", data())


def test_param_filter_presets_select_only_those_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mezo_step(model, (x, y), lr=0.5, mu=1e-2, param_filter="bias_norm", seed=3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"0.bias", "1.weight", "1.bias", "2.bias"}
    assert zokernels.mezo_step is mezo_step


# ---- the in-place mode's rounding bound (docs/lm.md, mezo.py docstring), on fresh random parameters ----

MANTISSA_BITS = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}  # incl. the implicit bit
MIN_EXPONENT = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (the gap above |x|'s binade start; subnormal spacing near 0), float64."""
    x = x.double().abs()
    _, exponent = torch.frexp(x)  # x = m·2^e, m in [0.5, 1); frexp(0) gives e = 0
    exponent = torch.where(x == 0, MIN_EXPONENT[dtype], torch.clamp(exponent - 1, min=MIN_EXPONENT[dtype]))
    return torch.pow(2.0, (exponent - MANTISSA_BITS[dtype] + 1).double())


def random_params(dtype, seed):
    """Fresh parameters whose magnitudes span 10^-3 … 10^1 (so roundings of every size occur)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 4))
    with torch.no_grad():
        for p in model.parameters():
            scale = 10.0 ** (torch.rand(p.shape, generator=g) * 4 - 3)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ulp_helper_matches_nextafter(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(20000, generator=g) * 10.0 ** (torch.rand(20000, generator=g) * 12 - 9)).to(dtype)
    x[:5] = 0
    gap = torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=dtype)).double() - x.abs().double()
    assert torch.equal(gap, ulp(x, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inplace_step_within_stated_ulp_bound_of_ideal_update(dtype, seed):
    """q = 1: θ⁺ = fl(θ + d₁), θ⁻ = fl(θ⁺ − 2d₁), θ_new = fl(θ⁻ + d₃), d₁ = fl32(fl32(μ)z), d₃ = fl32(fl32(μ + c)z),
    c = −lr·g (fl32(−2μ)z = −2d₁ exactly). Against the ideal θ + c·z (real arithmetic, same g):
    |θ_new − θ − cz| ≤ ½[ulp(θ⁺) + ulp(θ⁻) + ulp(θ_new)] + 2⁻²³(|μz| + |(μ + c)z|) + h, and against the exact
    mode's update θ_ref = fl(θ + fl32(fl32(c)z)) the doc's bound adds ½ulp(θ_ref) + 2⁻²³|cz| + h;
    h = 2⁻²⁴(|θ⁺| + |θ⁻| + |θ_new| [+ |θ_ref|]) for fp16/bf16 (each sweep adds in fp32, then rounds: double
    rounding), 0 for fp32."""
    model = random_params(dtype, seed)
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(10 + seed)).to(dtype)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(20 + seed))
    theta = [p.detach().clone() for p in model.parameters()]
    seen = []

    def loss(m, batch):
        seen.append([p.detach().clone() for p in m.parameters()])
        return F.cross_entropy(m(batch[0]).float(), batch[1])

    mu, lr, step_seed = 1e-2, 0.5, 1000 + seed  # large μ·z and lr·g·z so every term of the bound is exercised
    result = mezo_step(model, (x, y), loss, mu=mu, lr=lr, seed=step_seed, q=1, mode="inplace")
    (g,) = result.projected_grads
    plus, minus = seen
    c = -lr * g
    offsets = philox.stream_offsets(theta)
    worst_ideal, worst_ref, any_error = 0.0, 0.0, False
    for i, (t0, tp, tm, tn) in enumerate(zip(theta, plus, minus, model.parameters())):
        tn = tn.detach()
        z = philox.philox_normal(t0.numel(), step_seed, 0, offsets[i]).view_as(t0).double()
        ideal = t0.double() + c * z
        t_ref = add_combination_ref(t0, offsets[i], step_seed, [(0, c)], cpu_sampler)
        double_rounding = 2.0 ** -24 if dtype != torch.float32 else 0.0
        bound_ideal = (0.5 * (ulp(tp, dtype) + ulp(tm, dtype) + ulp(tn, dtype))
                       + 2.0 ** -23 * (abs(mu) * z.abs() + abs(mu + c) * z.abs())
                       + double_rounding * (tp.double().abs() + tm.double().abs() + tn.double().abs()))
        bound_ref = (bound_ideal + 0.5 * ulp(t_ref, dtype) + 2.0 ** -23 * abs(c) * z.abs()
                     + double_rounding * t_ref.double().abs())
        err_ideal = (tn.double() - ideal).abs()
        err_ref = (tn.double() - t_ref.double()).abs()
        assert torch.all(err_ideal <= bound_ideal * (1 + 1e-12)), (dtype, i, (err_ideal / bound_ideal).max())
        assert torch.all(err_ref <= bound_ref * (1 + 1e-12)), (dtype, i, (err_ref / bound_ref).max())
        worst_ideal = max(worst_ideal, float((err_ideal / bound_ideal).max()))
        worst_ref = max(worst_ref, float((err_ref / bound_ref).max()))
        any_error = any_error or bool((tn != t_ref).any())
    # the bound is not vacuous: the in-place step does differ from the exact update, and uses a fair share of it
    assert any_error
    assert worst_ideal > 0.5 and worst_ref > 0.5, (worst_ideal, worst_ref)  # tight: 0.6–0.996 seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("failing_query", [1, 2])
def test_inplace_failure_restores_within_ulp_bound(dtype, failing_query):
    """A loss that raises at ℓ⁺ (query 1) or ℓ⁻ (query 2): the pending perturbation is undone by one sweep. The
    z-terms cancel exactly (d₁ − 2d₁ + d₁), so only the sweeps' roundings remain:
    |θ_restored − θ| ≤ ½[ulp(θ⁺) (+ ulp(θ⁻) when ℓ⁻ failed) + ulp(θ_restored)] (+ h as above)."""
    model = random_params(dtype, 5)
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    theta = [p.detach().clone() for p in model.parameters()]
    seen = []

    def loss(m, batch):
        seen.append([p.detach().clone() for p in m.parameters()])
        if len(seen) == failing_query:
            raise RuntimeError("solver crashed")
        return m(batch).float().square().mean()

    with pytest.raises(RuntimeError, match="solver crashed"):
        mezo_step(model, x, loss, mu=1e-2, lr=0.5, seed=77, q=1, mode="inplace")
    moved = False
    for i, (t0, tr) in enumerate(zip(theta, model.parameters())):
        tr = tr.detach()
        visited = [s[i] for s in seen]  # θ⁺ (and θ⁻)
        double_rounding = 2.0 ** -24 if dtype != torch.float32 else 0.0
        bound = (0.5 * (sum(ulp(v, dtype) for v in visited) + ulp(tr, dtype))
                 + double_rounding * (sum(v.double().abs() for v in visited) + tr.double().abs()))
        err = (tr.double() - t0.double()).abs()
        assert torch.all(err <= bound * (1 + 1e-12)), (dtype, i, (err / bound).max())
        moved = moved or bool((tr != t0).any())
    assert moved  # in-place restore is not exact (the point of mode="exact"): the bound is what is promised


# ---- update=False: the estimate into .grad, like cge_step and rge_step ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_update_false_writes_the_spsa_estimate_and_leaves_parameters_bit_identical(dtype):
    model, (x, y) = small_mlp(dtype), data(dtype)
    model[0].bias.requires_grad_(False)  # not trainable: never selected, .grad never written
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]).float(), b[1])  # noqa: E731
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mezo_step(model, (x, y), loss_fn, mu=1e-2, lr=0.05, seed=123, q=3, update=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    params = [p for p in model.parameters() if p.requires_grad]
    offsets = philox.stream_offsets(params)
    for p, offset in zip(params, offsets):
        # ĝ = (1/q) Σ_j g_j z_j, the combination formed in float32 as the reference twin writes it out
        terms = [(j, g / 3) for j, g in enumerate(result.projected_grads)]
        zero = torch.zeros(p.shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(p.grad, add_combination_ref(zero, offset, 123, terms, cpu_sampler).to(dtype))
    assert model[0].bias.grad is None
    # accumulate adds the same estimate again
    first = [p.grad.clone() for p in params]
    mezo_step(model, (x, y), loss_fn, mu=1e-2, seed=123, q=3, update=False, accumulate=True)
    for p, g in zip(params, first):
        assert torch.equal(p.grad, g + g)


def test_update_false_then_sgd_is_the_mezo_step_up_to_rounding():
    model, batch = small_mlp(), data()
    twin = copy.deepcopy(model)
    lr, q = 0.05, 3
    result = mezo_step(model, batch, mu=1e-2, lr=lr, seed=9, q=q, update=False)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    mezo_step(twin, batch, mu=1e-2, lr=lr, seed=9, q=q)
    offsets = philox.stream_offsets(list(twin.parameters()))
    for a, b, offset in zip(model.parameters(), twin.parameters(), offsets):
        z = [philox.philox_normal(b.numel(), 9, j, offset).view_as(b).double() for j in range(q)]
        scale = b.detach().double().abs() + lr * sum(abs(g) * zj.abs() for g, zj in zip(result.projected_grads, z)) / q
        # each path forms the combination with ≤ q + 1 float32 roundings and adds it to θ with ≤ 2 more
        bound = 2 * (q + 3) * 2.0 ** -24 * scale
        assert torch.all((a.detach().double() - b.detach().double()).abs() <= bound)


def test_update_argument_errors():
    with pytest.raises(ValueError, match="mode='exact'"):
        mezo_step(small_mlp(), data(), update=False, mode="inplace")
    with pytest.raises(ValueError, match="accumulate"):
        mezo_step(small_mlp(), data(), accumulate=True)
    with pytest.raises(TypeError, match="update must be a bool"):
        mezo_step(small_mlp(), data(), update=0)
