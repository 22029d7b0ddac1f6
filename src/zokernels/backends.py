"""Backend discovery and dispatch. The torch backend always works; the others are used when present, and one
asked for explicitly that cannot run raises an error that says why (see `availability()`)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

try:
    from . import _C  # type: ignore[attr-defined]

    _C_IMPORT_ERROR: str | None = None
except ImportError as error:  # pure-Python install (ZOKERNELS_SKIP_EXT=1) or a failed build
    _C = None
    _C_IMPORT_ERROR = f"zokernels._C could not be imported ({error}); reinstall without ZOKERNELS_SKIP_EXT"

BACKENDS = ("torch", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # what it runs on when available, why not otherwise


def _cpu_status() -> BackendStatus:
    if _C is None:
        return BackendStatus("cpu", False, _C_IMPORT_ERROR or "zokernels._C missing")
    if os.environ.get("ZOKERNELS_DISABLE_CPU_EXT", "0") == "1":
        return BackendStatus("cpu", False, "disabled by ZOKERNELS_DISABLE_CPU_EXT=1")
    threads = _C.openmp_max_threads() if _C.has_openmp else 1
    return BackendStatus("cpu", True, f"_C with {'OpenMP, ' if _C.has_openmp else 'no OpenMP, '}{threads} threads")


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("triton", False, "the triton package is not installed")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return BackendStatus("triton", True, "TRITON_INTERPRET=1: interpreter on CPU tensors (tests only, slow)")
    if not torch.cuda.is_available():
        return BackendStatus("triton", False, "no CUDA GPU visible (set TRITON_INTERPRET=1 to test on CPU)")
    return BackendStatus("triton", True, f"GPU {torch.cuda.get_device_name()}")


def _cuda_status() -> BackendStatus:
    if torch.version.cuda is None:
        return BackendStatus("cuda", False, f"torch {torch.__version__} is a CPU-only build")
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "no CUDA GPU visible")
    if _C is None or not getattr(_C, "has_cuda", False):
        return BackendStatus("cuda", False, "zokernels._C was built without csrc/cuda (no nvcc at install time)")
    return BackendStatus("cuda", True, f"GPU {torch.cuda.get_device_name()}")


def _torch_status() -> BackendStatus:
    return BackendStatus("torch", True, f"torch {torch.__version__}")


_STATUS = {"torch": _torch_status, "cpu": _cpu_status, "triton": _triton_status, "cuda": _cuda_status}


def status(name: str) -> BackendStatus:
    """One backend's status, without probing the others (cheap enough for hot paths: the cpu check is ~2 µs,
    all four ~50 µs)."""
    return _STATUS[name]()


def availability() -> dict[str, BackendStatus]:
    return {name: status(name) for name in BACKENDS}


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend to run on `device`: the requested one (error if it cannot run), else the fastest present.
    ZOKERNELS_BACKEND sets the default request."""
    requested = requested or os.environ.get("ZOKERNELS_BACKEND") or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
    status = availability()
    if requested is not None:
        if not status[requested].available:
            raise RuntimeError(f"backend {requested!r} is not available: {status[requested].reason}")
        if requested == "cpu" and device.type != "cpu":
            raise RuntimeError(f"backend 'cpu' runs on CPU tensors, but the model is on {device}")
        return requested
    if device.type == "cpu":
        return "cpu" if status["cpu"].available else "torch"
    for name in ("cuda", "triton"):
        if status[name].available:
            return name
    return "torch"
