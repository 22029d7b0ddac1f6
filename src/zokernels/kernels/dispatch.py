"""Backend choice for one kernel op: `choose_backend(op, implemented, requested, device, automatic)`, the one
decision (zokernels.backends.choose_backend, shared with the model-level default `resolve_backend`): cuda -> triton
-> torch on a GPU, cpu -> torch on CPU, restricted to the backends the op implements; a backend asked for
explicitly that cannot run raises an error saying why (docs/kernels.md)."""
from __future__ import annotations

from ..backends import choose_backend

__all__ = ["KERNEL_BACKENDS", "choose_backend"]

# The backends whose GPU kernels the CGE engine calls (fused first layer, one-channel mixing conv). On CPU the C++
# twins are slower than the engine's own rules, so cpu and torch keep those rules.
KERNEL_BACKENDS = ("triton", "cuda")
