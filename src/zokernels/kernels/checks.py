"""Argument checks shared by the kernel launchers: every fast path refuses what it cannot read correctly with a
ValueError/TypeError naming the argument, before any launch."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(name: str, t, dims: tuple[int, ...] | None = None, dtypes=FLOAT_DTYPES,
                 channels_last_ok: bool = False) -> None:
    """A tensor of one of `dtypes` with a dimension count in `dims`, dense in row-major order (or channels-last
    for 4-D when channels_last_ok: the kernels read through strides, but never through gaps or overlaps)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    dense = t.is_contiguous() or (channels_last_ok and t.dim() == 4
                                  and t.is_contiguous(memory_format=torch.channels_last))
    if not dense:
        layouts = "contiguous or channels-last" if channels_last_ok and t.dim() == 4 else "contiguous"
        raise ValueError(f"{name} must be {layouts}, got strides {t.stride()} for shape {tuple(t.shape)}; "
                         f"call .contiguous() first")


def check_same(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def pair(name: str, value) -> tuple[int, int]:
    """An int or a pair of ints, as conv2d takes stride/padding/dilation."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


def check_steps(steps, k: int, like: torch.Tensor) -> torch.Tensor:
    """Per-coordinate steps h_k ([K] tensor) or one μ for all: a contiguous [K] tensor of like's dtype/device."""
    if isinstance(steps, (int, float)) and not isinstance(steps, bool):
        return torch.full((k,), float(steps), dtype=like.dtype, device=like.device)
    if not isinstance(steps, torch.Tensor):
        raise TypeError(f"steps must be a float or a [K] tensor, got {type(steps).__name__}")
    if steps.shape != (k,):
        raise ValueError(f"steps must have shape ({k},) (one per coordinate), got {tuple(steps.shape)}")
    return steps.to(device=like.device, dtype=like.dtype).contiguous()


def capturing() -> bool:
    """True while a CUDA graph capture runs: data-dependent checks (which synchronize with the host) are skipped
    then; they ran on the warm-up calls with the same shapes (zokernels/experimental/cuda_graph.py)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
