"""CUDA-graph capture of the fixed-shape query loop of a CGE step (backend cuda only).

A CGE step runs the same chain of small launches (seed + BN + ReLU, mixing conv, dense tail, loss) for every chunk
of K coordinates; only the coordinates and steps change. Captured once per input signature, a chunk costs one
graph replay instead of dozens of launches. Inputs are copied into static buffers; outputs are the graph's static
tensors (overwritten by the next replay: clone what must be kept).

What may be captured: device tensors only, no host synchronization (.item(), .cpu(), .tolist(), printing), no
tensor created from host data. The zokernels launchers skip their data-dependent range checks while a capture is
running (`torch.cuda.is_current_stream_capturing()`). Importing this module needs no CUDA."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import backends


def _signature(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device, t.stride()) for t in inputs)


def _check_inputs(inputs) -> list[torch.Tensor]:
    inputs = list(inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"inputs[{i}] must be a CUDA tensor (graphs capture device work), got {t.device}")
    return inputs


class GraphedQuery:
    """fn(*inputs) captured as one CUDA graph for inputs shaped like `example_inputs`."""

    def __init__(self, fn: Callable, example_inputs: Sequence[torch.Tensor], warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedQuery needs a CUDA GPU (torch.cuda.is_available() is False); use "
                               "query_runner(), which falls back to plain calls off the cuda backend")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (lazy initialization must not happen during capture), got {warmup}")
        self.fn = fn
        self.static_inputs = [t.detach().clone() for t in _check_inputs(example_inputs)]
        self.signature = _signature(self.static_inputs)
        side = torch.cuda.Stream(device=self.static_inputs[0].device if self.static_inputs else None)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs recommends
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        inputs = _check_inputs(inputs)
        if len(inputs) != len(self.static_inputs) or any(
                a.shape != b.shape or a.dtype != b.dtype for a, b in zip(inputs, self.static_inputs)):
            raise ValueError(f"inputs must match the captured signature {self.signature}, got {_signature(inputs)}")
        for static, value in zip(self.static_inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.static_outputs


class QueryRunner:
    """Calls fn(*inputs): through one captured graph per input signature when graphs are on, plainly otherwise
    (other backends, CPU tensors). The last, smaller chunk of a step gets its own graph."""

    def __init__(self, fn: Callable, use_graphs: bool, warmup: int = 3):
        self.fn, self.use_graphs, self.warmup = fn, use_graphs, warmup
        # one private memory pool per graph: a shared pool is only safe when graphs replay in capture order, and
        # chunks of different shapes replay in any order
        self.graphs: dict[tuple, GraphedQuery] = {}

    def __call__(self, *inputs: torch.Tensor):
        if not self.use_graphs:
            return self.fn(*inputs)
        key = _signature(_check_inputs(inputs))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = GraphedQuery(self.fn, inputs, self.warmup)
        return graph(*inputs)


def query_runner(fn: Callable, device: torch.device, backend: str | None = None, warmup: int = 3) -> QueryRunner:
    """A QueryRunner that captures CUDA graphs exactly when the dispatch chooses the cuda backend on `device`
    (backends.resolve_backend); everywhere else it calls fn directly."""
    device = torch.device(device)
    chosen = backends.resolve_backend(backend, device)
    return QueryRunner(fn, use_graphs=chosen == "cuda" and device.type == "cuda", warmup=warmup)
