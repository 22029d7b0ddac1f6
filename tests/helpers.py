"""Small models and data shared by the tests."""
import torch
from torch import nn


def kernel_device(backend: str | None) -> torch.device:
    """Where a test puts the inputs of a `backend` kernel: CUDA for the GPU backends (triton, cuda) in a GPU run
    (ZOKERNELS_TEST_GPU=1, which turns the Triton interpreter off, with a GPU visible), else the CPU (the Triton
    interpreter reads CPU tensors). The cpu and torch backends, and backend=None, always get the CPU. Random inputs
    are drawn on the CPU and moved here, so both runs test the same numbers."""
    import os

    gpu_run = os.environ.get("ZOKERNELS_TEST_GPU") == "1" and torch.cuda.is_available()
    if gpu_run and backend in ("triton", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())  # indexed: tensors report cuda:0, not cuda
    return torch.device("cpu")


def tiny_mlp(dtype=torch.float64, inputs=4, hidden=5, classes=3):
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def tiny_cnn_bn(dtype=torch.float64, channels=3):
    """Conv -> BatchNorm (train mode) -> ReLU -> pool -> Linear: every layer kind whose CGE must be exact."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * channels, 3)).to(dtype)


def classification_batch(dtype=torch.float64, n=16, shape=(4,), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def autograd_gradient(model, batch, loss_fn):
    model.zero_grad()
    loss_fn(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, saved):
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), f"{k} changed"


def compile_for_gpus_in_subprocess(script: str, cache_dir) -> list[str]:
    """Runs `script` (which compiles Triton kernels for GPU targets and prints one line per kernel) in a fresh
    interpreter with TRITON_INTERPRET=0 — the interpreter accepts code the GPU compiler rejects — and returns its
    output lines. No GPU is needed; skips if triton's ptxas is missing."""
    import os
    import subprocess
    import sys

    import pytest

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("triton's ptxas is missing")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


# ---- float32 tolerances measured on this machine ------------------------------------------------------------
# The CPUs that run this suite differ (AVX2 only; AVX-512; AVX-512 BF16; AMX): oneDNN, MKL and ATen pick other
# kernels on each and round float32 differently, so no float32 tolerance is a constant. A float32 result is held
# to the error of the plain float32 computation of the same quantity, measured in the same test against a float64
# oracle, times a factor stated where it is used.
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def max_error(values, oracle, mask=None) -> float:
    """Largest |value − oracle| over every selected coordinate of every parameter (dicts name -> tensor), or over
    all entries of two tensors. Pooled over parameters on purpose: a per-parameter maximum over one or two
    coordinates is a single sample of rounding noise, and two such samples differ by any factor."""
    if isinstance(values, torch.Tensor):
        return (values.double() - oracle.double()).abs().max().item()
    errors = [(values[n].double() - oracle[n].double()).abs()[mask[n] if mask is not None else ...]
              for n in oracle if mask is None or (n in mask and mask[n].any())]
    return max(e.max().item() for e in errors if e.numel())


def assert_float32_error_within(values, reference, oracle, mask=None, *, factor: float, floor: float = 0.0,
                                what: str = "") -> None:
    """max_error(values) ≤ factor · max(max_error(reference), floor): `reference` is the plain float32 way of
    computing the same thing (e.g. the naive float32 difference), `floor` a stated bound below which float32
    cannot resolve anything (e.g. one float32 rounding of the loss divided by the step)."""
    got, allowed = max_error(values, oracle, mask), max_error(reference, oracle, mask)
    assert got <= factor * max(allowed, floor), (
        f"{what}: float32 error {got:.3g} vs the float64 oracle exceeds {factor} x the plain float32 error "
        f"{allowed:.3g} (floor {floor:.3g}) measured on this machine")


class FailingClosure:
    """An optimizer closure that behaves like `closure` except at call number `fail_at`, where it raises
    RuntimeError("closure failed") (how="raise") or returns NaN (how="nan"); `calls` counts the calls."""

    def __init__(self, closure, fail_at: int, how: str):
        self.closure, self.fail_at, self.how, self.calls = closure, fail_at, how, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.fail_at:
            if self.how == "raise":
                raise RuntimeError("closure failed")
            return torch.tensor(float("nan"))
        return self.closure()
