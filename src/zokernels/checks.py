"""Argument checks shared by every public entry point: each returns the value normalized (a Python int or float)
or raises TypeError (wrong kind) / ValueError (out of range) with a message that names the argument.

One module so that the same argument gets the same words wherever it is passed (cge_step's q and an optimizer's q
alike); zokernels.kernels.checks checks kernel tensors, a different contract."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

UINT64_MAX = 2**64 - 1


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """An int (bool refused) in [low, high] (high=None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be >= {low}, got {value}" if high is None
                         else f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _check_real(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """A finite float > 0 (mu, eps)."""
    value = _check_real(name, value, "a positive float")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return value


def check_nonneg(name: str, value: Any) -> float:
    """A finite float >= 0 (learning rates, weight decay, clipping)."""
    value = _check_real(name, value, "a float >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return value


def check_unit(name: str, value: Any, closed_low: bool = True) -> float:
    """A float in [0, 1) (momentum, betas), or (0, 1) with closed_low=False."""
    value = check_nonneg(name, value)
    if not (value < 1 and (closed_low or value > 0)):
        raise ValueError(f"{name} must be in {'[0' if closed_low else '(0'}, 1), got {value}")
    return value


def check_mu(mu: Any) -> float:
    """The perturbation scale of every estimator."""
    return check_positive("mu", mu)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_seed(name: str, value: Any) -> int:
    """A Philox seed or stream index: an int in [0, 2**64)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= int(value) <= UINT64_MAX:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return int(value)
