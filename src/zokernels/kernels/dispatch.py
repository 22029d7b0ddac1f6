"""Backend choice for one kernel: cuda -> triton -> torch on a GPU, cpu -> torch on CPU (docs/architecture.md),
restricted to the backends the op implements. A backend asked for explicitly that cannot run raises an error saying
why."""
from __future__ import annotations

import os

import torch

from .. import backends

_GPU_ORDER = ("cuda", "triton", "torch")
# The backends whose GPU kernels the CGE engine calls (fused first layer, one-channel mixing conv). On CPU the C++
# twins are slower than the engine's own rules, so cpu and torch keep those rules.
KERNEL_BACKENDS = ("triton", "cuda")
_CPU_ORDER = ("cpu", "torch")


def _refusal(name: str, device: torch.device, symbol: str | None = None) -> str | None:
    """Why backend `name` cannot run an op on `device` (None when it can); `symbol`: the _C function it calls."""
    status = backends.status(name)
    if not status.available:
        return status.reason
    if symbol is not None and not hasattr(backends._C, symbol):
        return f"zokernels._C has no {symbol} (built from older sources: reinstall)"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got tensors on {device}"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if name == "triton" and device.type != "cuda" and not interpreted:
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for tests), got tensors on {device}"
    return None


def choose_backend(op: str, implemented: tuple[str, ...], requested: str | None, device: torch.device,
                   automatic: tuple[str, ...] | None = None) -> str:
    """The backend that runs `op` on `device`. `implemented` lists the backends `op` has; the compiled ones call
    _C.<op>_cpu / _C.<op>_cuda. `automatic`: those chosen without a request (default: all implemented) — a twin
    slower than torch is left out there but stays available on request."""
    symbol = lambda name: f"{op}_{name}" if name in ("cpu", "cuda") else None  # noqa: E731
    if requested is not None:
        if requested not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS} or None, got {requested!r}")
        if requested not in implemented:
            raise ValueError(f"{op} has no {requested!r} implementation; it has {implemented}")
        reason = _refusal(requested, device, symbol(requested))
        if reason is not None:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run: {reason}")
        return requested
    order = _GPU_ORDER if device.type == "cuda" else _CPU_ORDER
    for name in order:
        if name in (automatic or implemented) and _refusal(name, device, symbol(name)) is None:
            return name
    return "torch"


def cuda_stream(device: torch.device) -> int:
    """The current CUDA stream of `device` as an integer handle (what the _C launchers take)."""
    return torch.cuda.current_stream(device).cuda_stream


DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
