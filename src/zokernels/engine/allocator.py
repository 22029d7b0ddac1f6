"""Keep freed memory in the heap during a CGE step (glibc only).

The engine's passes allocate and free many activation-sized tensors ([K·B, C, H, W], tens of MiB). glibc serves
blocks above its mmap threshold (at most 32 MiB) with fresh mmap calls and returns them on free, so every such
tensor is page-faulted in again: a 64 MiB clone measured 46 ms that way against 9 ms from a retained heap. Inside
`retained_heap()` mmap is not used and the heap is not trimmed; on exit glibc's defaults are restored, and the
next free trims the heap back. Set ZOKERNELS_RETAIN_HEAP=0 to turn this off."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from typing import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_RETAINED = {_M_TRIM_THRESHOLD: 1 << 40, _M_MMAP_MAX: 0}


def _mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


_MALLOPT = _mallopt()
_depth = 0


@contextmanager
def retained_heap() -> Iterator[None]:
    global _depth
    active = _MALLOPT is not None and os.environ.get("ZOKERNELS_RETAIN_HEAP", "1") != "0"
    if active and _depth == 0:
        for option, value in _RETAINED.items():
            _MALLOPT(option, value)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if active and _depth == 0:
            for option, value in _GLIBC_DEFAULTS.items():
                _MALLOPT(option, value)
