"""Backend discovery and the one backend decision (`choose_backend`, which kernels/ reaches through
kernels.dispatch). The torch backend always works; the others are used when present, and one asked for explicitly
that cannot run raises an error that says why (see `availability()`)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def describe_missing_extension(error: BaseException, package_dir: Path = PACKAGE_DIR,
                               environ: Mapping[str, str] = os.environ) -> str:
    """Why zokernels._C is missing, from what can be seen: the import error itself, where zokernels was imported
    from, whether that is a source checkout (never built in place) or an install, and whether a compiled module
    is there at all. ZOKERNELS_SKIP_EXT is named only when it is set."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    built = sorted(p.name for p in package_dir.glob("_C*") if p.name.endswith(suffixes))
    checkout = next((d for d in (package_dir.parent, package_dir.parent.parent)
                     if (d / "pyproject.toml").is_file() and (d / "csrc").is_dir()), None)
    where = f"zokernels was imported from {package_dir}"
    if checkout is not None:
        where += f", a source checkout ({checkout})"
    if built:
        cause = (f"a compiled module is there ({', '.join(built)}) but did not load: it was built for another "
                 "Python, torch or machine, or a library it needs is missing; rebuild it in this environment "
                 "(pip install --force-reinstall --no-build-isolation .)")
    elif checkout is not None:
        cause = ("no compiled _C*.so is there: the checkout was never built in place; import the installed "
                 "package (run from outside the checkout, or `pip install .` first), or build in place with "
                 "`pip install -e . --no-build-isolation`")
    else:
        cause = ("no compiled _C*.so is there: this install has no extension (built with ZOKERNELS_SKIP_EXT=1, or "
                 "its build failed); reinstall from the source with a C++ compiler and cmake present")
    skip = environ.get("ZOKERNELS_SKIP_EXT", "")
    flag = f"; ZOKERNELS_SKIP_EXT={skip} is set in this environment" if skip not in ("", "0") else ""
    return f"zokernels._C could not be imported ({type(error).__name__}: {error}); {where}; {cause}{flag}"


try:
    from . import _C  # type: ignore[attr-defined]

    _C_IMPORT_ERROR: str | None = None
except ImportError as error:  # a source tree without a build, a pure-Python install, or a build that cannot load
    _C = None
    _C_IMPORT_ERROR = describe_missing_extension(error)

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


# The one backend decision, for kernel ops (through kernels.dispatch) and for the model-level default alike.
_GPU_ORDER = ("cuda", "triton", "torch")
_CPU_ORDER = ("cpu", "torch")
_COMPILED = ("cpu", "cuda")  # the backends whose kernels are _C functions


def refusal(name: str, device: torch.device, symbol: str | None = None) -> str | None:
    """Why backend `name` cannot run on tensors on `device` (None when it can); `symbol`: the _C function it calls."""
    state = status(name)
    if not state.available:
        return state.reason
    if symbol is not None and not hasattr(_C, symbol):
        return f"zokernels._C has no {symbol} (built from older sources: reinstall)"
    if name in ("cuda", "cpu") and device.type != name:
        return f"the {name} backend needs {name.upper()} tensors, got tensors on {device}"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if name == "triton" and device.type != "cuda" and not interpreted:
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for tests), got tensors on {device}"
    return None


def choose_backend(op: str | None, implemented: tuple[str, ...], requested: str | None, device: torch.device,
                   automatic: tuple[str, ...] | None = None) -> str:
    """The backend that runs `op` on `device`: on CUDA tensors cuda -> triton -> torch, on CPU tensors cpu -> torch,
    restricted to the backends `op` implements; its compiled ones are _C.<op>_cpu / _C.<op>_cuda (op None: the
    model-level choice, no _C function to look for). `automatic`: those chosen without a request (default: all
    implemented) — a twin slower than torch is left out there but stays available on request. A requested backend
    that cannot run raises an error saying why; the Triton interpreter is never picked automatically."""
    symbol = lambda name: f"{op}_{name}" if op is not None and name in _COMPILED else None  # noqa: E731
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
        if requested not in implemented:
            raise ValueError(f"{op} has no {requested!r} implementation; it has {implemented}")
        reason = refusal(requested, device, symbol(requested))
        if reason is not None:
            raise RuntimeError(f"backend {requested!r} is not available: {reason}" if op is None
                               else f"{op}: backend {requested!r} cannot run: {reason}")
        return requested
    order = _GPU_ORDER if device.type == "cuda" else _CPU_ORDER
    for name in order:
        if name in (automatic or implemented) and refusal(name, device, symbol(name)) is None:
            return name
    return "torch"


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The model-level default backend on `device` (api, estimators, optim): choose_backend over every backend.
    ZOKERNELS_BACKEND sets the default request."""
    return choose_backend(None, BACKENDS, requested or os.environ.get("ZOKERNELS_BACKEND") or None, device)
