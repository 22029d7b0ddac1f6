"""QueryScope: the one context every loss evaluation of a zeroth-order step (a "query") runs in.

cge_step, rge_step, mezo_step, the zokernels.optim optimizers (through their closures), ZO-GraSP, explain and the
perturbation-parallel ranks all evaluate through it, so a query has the same side effects (none) everywhere:

- **Parameters**: the tensors passed as `params` are snapshotted on entry and written back bit-exactly on exit, on
  success and on failure alike; after `commit_parameters()` (an optimizer has written its update) only a failure
  restores them. Pass no tensors where the caller never writes parameters in place (MeZO's exact mode swaps
  storage) or undoes its own writes (MeZO's in-place mode, whose undo sweep is its memory saving).
- **Buffers** (e.g. BN running statistics; none when `model` is None, as for an optimizer's closure): every query
  gets the committed buffers back afterwards; `loss(..., keep_buffers=True)` commits what a (training) base forward
  wrote. A failed step restores the buffers from before the step.
- **Randomness**: every evaluation starts from one RNG state (common random numbers: dropout draws the same masks
  in every query): the caller's state at entry, or `rng_state` where processes must agree (the ranks use rank 0's).
  Afterwards the RNG is where one plain forward would have left it; after a failure, where it was at entry.
- **TF32** is off inside: it would swamp loss differences of size μ.
- **Errors** follow the contract of estimators/common.py: each names the loss, the query and what was restored
  (`restored`), and the first evaluation of a step may turn a misfit batch into a ValueError naming `batch`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .common import RESTORED, LossFn, evaluate_loss

RngState = tuple[torch.Tensor, torch.Tensor | None]  # (CPU generator state, CUDA generator state of the device)


def rng_state(device: torch.device) -> RngState:
    """torch's global RNG state for `device` (the CPU generator, and the CUDA one of a CUDA device)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off inside, the user's setting restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _device_of(model: torch.nn.Module | None, params: Sequence[torch.Tensor]) -> torch.device:
    if params:
        return params[0].device
    first = next(iter(model.parameters()), None) if model is not None else None
    return first.device if first is not None else torch.device("cpu")


class KeptCopies:
    """`sets` lists of scratch tensors shaped like the given tensors, kept from one step to the next while the
    tensors stay the same ones (same objects, shapes, dtypes, devices); otherwise the old copies are freed first, then
    new ones allocated, so the two never coexist. Their contents are stale: every step overwrites them.

    Why: on a CPU a fresh copy of a large model is written into fresh pages (glibc maps every block over 32 MiB anew
    and unmaps it when freed), a page fault per 4 KiB. Measured on SmolLM2's 134.5M parameters, one thread: MeZO's
    two sweeps take 0.971 s into fresh copies and 0.392 s into kept ones (bench/mezo_throughput.py --sweeps-only).
    On a GPU torch's caching allocator already reuses the blocks; keeping them changes nothing there."""

    def __init__(self, sets: int) -> None:
        self.sets = sets
        self._key: list[tuple] | None = None
        self.copies: list[list[torch.Tensor]] = [[] for _ in range(sets)]

    def like(self, tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The `sets` lists of copies shaped like `tensors`."""
        key = [(id(t), t.shape, t.dtype, t.device) for t in tensors]
        if key != self._key:
            self.release()
            self.copies = [[torch.empty_like(t) for t in tensors] for _ in range(self.sets)]
            self._key = key
        return self.copies

    def release(self) -> None:
        """Frees the copies; the next `like` allocates them again."""
        self._key, self.copies = None, [[] for _ in range(self.sets)]


class QueryScope:
    """`with QueryScope(model, params) as scope: scope.loss(loss_fn, batch, query)` (see the module docstring).

    `losses` lists every evaluation's value in order (its length is the step's forward count)."""

    def __init__(self, model: torch.nn.Module | None, params: Sequence[torch.Tensor] = (), *,
                 rng_state: RngState | None = None, restored: str = RESTORED, device: torch.device | None = None,
                 snapshot_into: Sequence[torch.Tensor] | None = None):
        self.model, self.params, self.restored = model, list(params), restored
        self.device = device or _device_of(model, self.params)
        self._given_rng = rng_state
        self._snapshot_into = None if snapshot_into is None else list(snapshot_into)
        self.losses: list[float] = []

    def _take_snapshot(self) -> list[torch.Tensor]:
        """Copies of the parameters, into `snapshot_into` when given (tensors the caller keeps from step to step,
        see KeptCopies)."""
        if self._snapshot_into is None:
            return [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for copy, p in zip(self._snapshot_into, self.params, strict=True):
                copy.copy_(p)
        return self._snapshot_into

    def __enter__(self) -> "QueryScope":
        self.snapshot = self._take_snapshot()
        self._parameters_committed = False
        buffers = list(self.model.buffers()) if self.model is not None else []
        self._buffers_at_entry = [(b, b.detach().clone()) for b in buffers]
        self._committed_buffers = self._buffers_at_entry
        self._rng_at_entry = rng_state(self.device)
        self._rng_start = self._given_rng if self._given_rng is not None else self._rng_at_entry
        self._rng_after_first: RngState | None = None
        self._fp32 = strict_fp32()
        self._fp32.__enter__()
        return self

    # -- evaluations --
    @contextlib.contextmanager
    def same_randomness(self) -> Iterator[None]:
        """Runs the block from the step's RNG start state (for evaluations that are not `loss` calls, such as the
        delta engine's recorded base forward)."""
        set_rng_state(self._rng_start, self.device)
        yield
        if self._rng_after_first is None:
            self._rng_after_first = rng_state(self.device)

    def loss(self, loss_fn: LossFn, batch: Any, query: str, *, keep_buffers: bool = False) -> float:
        """loss_fn(model, batch) as a finite float, `query` naming it in errors. The buffers are put back to the
        committed ones afterwards, unless keep_buffers (then what this evaluation wrote is committed)."""
        try:
            with self.same_randomness():
                value = evaluate_loss(loss_fn, self.model, batch, query, first=not self.losses,
                                      restored=self.restored)
        except BaseException:
            self.restore_buffers()
            raise
        if keep_buffers:
            self.commit_buffers()
        else:
            self.restore_buffers()
        self.losses.append(value)
        return value

    def record_loss(self, value: float) -> None:
        """Counts an evaluation made outside `loss` (the engine's recorded base forward)."""
        self.losses.append(value)

    # -- state --
    def restore_parameters(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, self.snapshot):
                p.copy_(saved)

    def commit_parameters(self) -> None:
        """The parameters' current values stay on a normal exit (an update was written); a failure still restores
        the snapshot."""
        self._parameters_committed = True

    def commit_buffers(self) -> None:
        """The buffers' current values are the ones queries get back and a normal exit keeps."""
        self._committed_buffers = [(b, b.detach().clone()) for b, _ in self._buffers_at_entry]

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for b, saved in self._committed_buffers:
                b.copy_(saved)

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        failed = exc_type is not None
        try:
            if failed or not self._parameters_committed:
                self.restore_parameters()
            if failed:
                self._committed_buffers = self._buffers_at_entry
            self.restore_buffers()
            after = self._rng_after_first if not failed and self._rng_after_first is not None else self._rng_at_entry
            set_rng_state(after, self.device)
        finally:
            self._fp32.__exit__(None, None, None)
