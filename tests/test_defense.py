"""Certified black-box defense: Clopper–Pearson bound, certify() against a linear classifier's exact radius,
the black-box wrapper, the denoiser, ZO estimates, and a smoke run of the program."""
import math

import pytest
import torch

from zokernels.apps.defense import ABSTAIN, certified_accuracy, certify, clopper_pearson_lower
from zokernels.apps.defense_train import BlackBoxClassifier, Denoiser, DenoiserSettings, _zo_denoiser_step

from helpers import FLOAT32_UNIT_ROUNDOFF, assert_float32_error_within

scipy_stats = pytest.importorskip("scipy.stats")


def test_clopper_pearson_lower_is_the_exact_binomial_tail_bound():
    for k, n, alpha in ((5, 10, 0.05), (990, 1000, 0.001), (1, 3, 0.1)):
        p = clopper_pearson_lower(k, n, alpha)
        # By definition P(X >= k | p_lower) = alpha for X ~ Binomial(n, p_lower).
        assert scipy_stats.binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-6)
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_lower(11, 10, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower(1, 10, 1.5)


def _linear_classifier(w, b):
    # Two classes: scores [0, w.x + b]; class 1 iff w.x + b > 0. Its smoothed version's certified radius is
    # exactly the distance to the hyperplane |w.x + b| / ||w|| (Cohen et al. 2019, Prop. 4 / linear example).
    return lambda batch: torch.stack([torch.zeros(len(batch), dtype=batch.dtype), batch @ w + b], dim=1)


def test_certify_recovers_the_linear_classifier_radius():
    w, b, sigma, n, alpha = torch.tensor([3.0, -4.0, 0.0]), 0.5, 0.5, 100_000, 0.001
    x = torch.tensor([0.1, -0.05, 2.0])
    distance = (abs(float(w @ x) + b) / float(w.norm()))
    label, radius = certify(_linear_classifier(w, b), x, sigma, n0=100, n=n, alpha=alpha, num_classes=2,
                            batch_size=20_000, generator=torch.Generator().manual_seed(0))
    assert label == 1
    p_true = scipy_stats.norm.cdf(distance / sigma)
    # The bound is conservative by about the Clopper-Pearson margin: radius in [R(p - 5 sd), R(p)].
    slack = 5 * math.sqrt(p_true * (1 - p_true) / n)
    assert sigma * scipy_stats.norm.ppf(p_true - slack) <= radius <= distance + 1e-9


def test_certify_abstains_on_the_decision_boundary_and_checks_arguments():
    w, b = torch.tensor([1.0, 1.0]), 0.0
    x = torch.tensor([0.5, -0.5])  # on the hyperplane: p_A = 1/2, so no class can be certified
    label, radius = certify(_linear_classifier(w, b), x, 0.25, n0=100, n=2000, num_classes=2)
    assert (label, radius) == (ABSTAIN, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        certify(_linear_classifier(w, b), x, 0.0)
    with pytest.raises(ValueError, match="n0"):
        certify(_linear_classifier(w, b), x, 0.25, n0=0)
    with pytest.raises(TypeError, match="x"):
        certify(_linear_classifier(w, b), [0.5, 0.5], 0.25)


def test_certified_accuracy_counts_correct_predictions_at_each_radius():
    acc = certified_accuracy([1, 0, ABSTAIN, 2], [0.6, 0.3, 0.0, 0.9], torch.tensor([1, 1, 0, 2]),
                             thresholds=(0.0, 0.5, 1.0))
    assert acc == [0.5, 0.5, 0.0]


def test_black_box_classifier_exposes_no_gradient():
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    black_box = BlackBoxClassifier(network)
    images = torch.randn(5, 1, 2, 2, requires_grad=True)
    logits = black_box(images)
    assert torch.allclose(logits, network(images).detach())
    assert not logits.requires_grad and black_box.images_queried == 5
    with pytest.raises(RuntimeError):
        logits.sum().backward()


def test_untrained_denoiser_is_the_identity():
    images = torch.rand(4, 1, 8, 8)
    assert torch.equal(Denoiser()(images), images)


def _denoiser_estimates(engine, dtype):
    """One ZO denoiser step's estimates (the same network, denoiser, images and coordinates for every engine and
    dtype)."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).to(dtype)
    black_box = BlackBoxClassifier(network)
    noisy, labels = torch.rand(6, 1, 8, 8).to(dtype), torch.randint(10, (6,))
    torch.manual_seed(1)
    denoiser = Denoiser(hidden=2)
    for p in denoiser.parameters():
        torch.nn.init.normal_(p, std=0.2)
    denoiser.to(dtype)
    settings = DenoiserSettings(density=0.3, engine=engine, max_queries=8)
    loss = _zo_denoiser_step(denoiser, black_box, noisy, labels, settings, torch.Generator().manual_seed(4))
    return [p.grad.clone() for p in denoiser.parameters()], loss, settings.mu


def test_batched_zo_denoiser_estimate_equals_cge_step():
    oracle, loss, mu = _denoiser_estimates("api", torch.float64)  # cge_step in float64
    assert sum(g.count_nonzero() for g in oracle) > 0
    # float32 (what the app runs): both paths are float32 difference quotients of a float32 forward, so each is
    # off the float64 oracle by float32 rounding noise of the loss over μ: two independent samples of the same
    # noise (each path's base-loss rounding is shared by all its coordinates, so their maxima can differ by ~2x;
    # 1.0x and 1.16x seen on AVX-512 and AVX2). The batched path (grouped convolutions, other kernels) is held to
    # 3x the error of cge_step's plain float32 difference, measured here on this machine (the old constant
    # rtol 1e-3 / atol 1e-4 was used to 0.48 on an AVX-512 CPU and to 0.87 on AVX2).
    api32, _, _ = _denoiser_estimates("api", torch.float32)
    batched32, _, _ = _denoiser_estimates("batched", torch.float32)
    names = range(len(oracle))
    assert_float32_error_within(dict(zip(names, batched32)), dict(zip(names, api32)), dict(zip(names, oracle)),
                                factor=3, floor=FLOAT32_UNIT_ROUNDOFF * abs(loss) / mu, what="batched estimate")
    for a, b in zip(batched32, api32):
        assert torch.equal(a != 0, b != 0)  # the same coordinates


def test_cli_smoke(tmp_path, capsys):
    from zokernels.cli import main

    code = main(["train", "defense", "--classifier-epochs", "1", "--steps", "2", "--certify-every", "90",
                 "--n0", "10", "--n", "200", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0
    for label in ("| no denoiser |", "| ZO denoiser", "| FO denoiser"):
        assert label in printed
    assert (tmp_path / "denoiser_zo.pt").exists()
