"""The native boundary: the only module that calls zokernels._C for kernels.

A kernel declares its native signature once, next to its Python wrapper:

    FIRST_LAYER = native.op("cge_first_layer_delta", native.tensor("x", contiguous=False), ..., "replicas", ...,
                            native.ELEMENT_CODE)

and calls it with the backend `dispatch.choose_backend` picked: `FIRST_LAYER("cuda", x, ...)`. The call checks each
tensor argument against its declaration (device of the backend, dtype, contiguity: the error names the op and the
argument), turns tensors into addresses (None -> 0 for optional ones), replaces dtype arguments by their codes from
the one table below, appends the current CUDA stream for the cuda backend, and calls `_C.<op>_<backend>`.

`_C` stays a plain pybind11 module without torch headers (docs/kernels.md says why): tensors cross as addresses,
so these checks are the only thing between a wrong tensor and a wrong memory read."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends

# The one dtype-code table of the native kernels; csrc/cpu/philox_cpu.h `DType` has the same numbers (_C exports
# them as `dtype_codes`, compared in tests/test_native_boundary.py). A kernel reads the codes it supports.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
FLOATS = (torch.float32, torch.float64)
ELEMENT = "element"  # dtype of a tensor argument: the op's element type, shared by every ELEMENT argument


@dataclass(frozen=True)
class Arg:
    """One argument of a native op. kind: tensor (one address), tensors (a list of addresses), element_code (the
    code of the op's element type, computed, not passed), dtype_code (the caller passes a torch.dtype; the code
    is passed on), dtype_codes (computed: one code per tensor of the `of` list), value (passed as is)."""
    name: str
    kind: str = "value"
    dtypes: object = ELEMENT  # ELEMENT, a tuple of dtypes, or None (any dtype in DTYPE_CODES)
    contiguous: bool = True  # False: the kernel reads through strides it is given, or the caller checked the layout
    optional: bool = False  # None is allowed (address 0; an empty list for `tensors`)
    of: str | None = None  # dtype_codes: the tensors argument whose codes these are


def tensor(name: str, dtypes=ELEMENT, contiguous: bool = True, optional: bool = False) -> Arg:
    return Arg(name, "tensor", dtypes, contiguous, optional)


def tensors(name: str, dtypes=None, optional: bool = False) -> Arg:
    return Arg(name, "tensors", dtypes, True, optional)


def dtype_code(name: str = "dtype") -> Arg:
    return Arg(name, "dtype_code")


def dtype_codes(name: str, of: str) -> Arg:
    return Arg(name, "dtype_codes", of=of)


ELEMENT_CODE = Arg("dtype", "element_code")


def address(t: torch.Tensor | None) -> int:
    """A tensor's data address as the kernels take it; 0 for a missing optional tensor."""
    return 0 if t is None else t.data_ptr()


def address_table(tensors_: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """An int64 tensor of addresses on `device`: the tables through which one launch reaches many tensors."""
    return torch.tensor([address(t) for t in tensors_], dtype=torch.int64, device=device)


def philox_key_words(seed: int, streams: list[int]) -> list[int]:
    """[seed lo, seed hi, (stream lo, stream hi) per stream]: the 32-bit words from which the GPU sweeps (Philox and
    rule sweeps, cuda and triton) read their Philox key and counters."""
    return [seed & 0xFFFFFFFF, seed >> 32] + [w for stream in streams for w in (stream & 0xFFFFFFFF, stream >> 32)]


def dtype_groups(tensors_: list[torch.Tensor]) -> list[tuple[torch.dtype, list[int]]]:
    """(dtype, indices of that dtype's non-empty tensors) in first-seen order: the GPU sweeps launch once per group."""
    groups = [(dtype, [i for i, t in enumerate(tensors_) if t.dtype == dtype and t.numel() > 0])
              for dtype in dict.fromkeys(t.dtype for t in tensors_)]
    return [(dtype, keep) for dtype, keep in groups if keep]


def cuda_stream(device: torch.device) -> int:
    """The current CUDA stream of `device` as an integer handle (what the _C launchers take)."""
    return torch.cuda.current_stream(device).cuda_stream


@dataclass(frozen=True)
class NativeOp:
    """A kernel's native signature: `_C.<name>_<backend>` for each of `backends`, with `args` in _C's order (the
    cuda variant takes the stream after them). element_types: the dtypes the op's ELEMENT arguments may have."""
    name: str
    args: tuple[Arg, ...]
    backends: tuple[str, ...]
    element_types: tuple[torch.dtype, ...]

    @property
    def passed(self) -> tuple[Arg, ...]:
        """The arguments a caller passes (computed codes excluded), in order."""
        return tuple(a for a in self.args if a.kind not in ("element_code", "dtype_codes"))

    def symbol(self, backend: str) -> str:
        return f"{self.name}_{backend}"

    def __call__(self, backend: str, *values, **named):
        if backend not in self.backends:
            raise ValueError(f"{self.name} has native backends {self.backends}, not {backend!r}")
        bound = self._bind(values, named)
        device, element = self._check(backend, bound)
        native_args = [self._convert(a, bound, element) for a in self.args]
        if backend == "cuda":
            native_args.append(cuda_stream(device))
        return getattr(backends._C, self.symbol(backend))(*native_args)

    def _bind(self, values, named) -> dict:
        passed = self.passed
        if len(values) > len(passed):
            raise TypeError(f"{self.name} takes {len(passed)} arguments, got {len(values)}")
        bound = dict(zip((a.name for a in passed), values))
        for key, value in named.items():
            if key in bound or key not in {a.name for a in passed}:
                raise TypeError(f"{self.name}: unexpected or repeated argument {key!r}")
            bound[key] = value
        for a in passed:
            if a.optional and a.name not in bound:
                bound[a.name] = None
        missing = [a.name for a in passed if a.name not in bound]
        if missing:
            raise TypeError(f"{self.name}: missing arguments {missing}")
        return bound

    def _check(self, backend: str, bound: dict) -> tuple[torch.device | None, torch.dtype | None]:
        """Every tensor on the backend's device type (and on one device), of its declared dtype, contiguous where
        declared so; returns (that device, the op's element type)."""
        device, element = None, None
        for arg in self.args:
            if arg.kind not in ("tensor", "tensors"):
                continue
            value = bound[arg.name]
            if value is None and arg.optional:
                continue
            items = [(arg.name, value)] if arg.kind == "tensor" else self._listed(arg, value)
            for label, t in items:
                device = self._check_device(backend, label, t, device)
                element = self._check_dtype(arg, label, t, element)
                if arg.contiguous and not t.is_contiguous():
                    raise ValueError(f"{self.name}: {label} must be contiguous, got strides {t.stride()} for shape "
                                     f"{tuple(t.shape)}")
        return device, element

    def _listed(self, arg: Arg, value) -> list[tuple[str, torch.Tensor]]:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{self.name}: {arg.name} must be a list of tensors, got {type(value).__name__}")
        return [(f"{arg.name}[{i}]", t) for i, t in enumerate(value)]

    def _check_device(self, backend: str, label: str, t, device):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != backend:
            raise ValueError(f"{self.name}: {label} must be a {backend.upper()} tensor for the {backend} backend, "
                             f"got one on {t.device}")
        if device is not None and t.device != device:
            raise ValueError(f"{self.name}: {label} must be on {device} like the arguments before it, got {t.device}")
        return t.device

    def _check_dtype(self, arg: Arg, label: str, t: torch.Tensor, element):
        if arg.dtypes == ELEMENT:
            if element is not None and t.dtype != element:
                raise TypeError(f"{self.name}: {label} must have the dtype of the other data tensors ({element}), "
                                f"got {t.dtype}")
            if t.dtype not in self.element_types:
                raise TypeError(f"{self.name}: {label} must have dtype in {[str(d) for d in self.element_types]}, "
                                f"got {t.dtype}")
            return t.dtype
        allowed = tuple(DTYPE_CODES) if arg.dtypes is None else arg.dtypes
        if t.dtype not in allowed:
            raise TypeError(f"{self.name}: {label} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")
        return element

    def _convert(self, arg: Arg, bound: dict, element):
        if arg.kind == "tensor":
            return address(bound[arg.name])
        if arg.kind == "tensors":
            return [address(t) for t in (bound[arg.name] or [])]
        if arg.kind == "element_code":
            if element is None:
                raise TypeError(f"{self.name}: no ELEMENT tensor argument gives the element type")
            return DTYPE_CODES[element]
        if arg.kind == "dtype_code":
            dtype = bound[arg.name]
            if dtype not in DTYPE_CODES:
                raise TypeError(f"{self.name}: {arg.name} must be one of {[str(d) for d in DTYPE_CODES]}, got "
                                f"{dtype!r}")
            return DTYPE_CODES[dtype]
        if arg.kind == "dtype_codes":
            return [DTYPE_CODES[t.dtype] for t in bound[arg.of]]
        return bound[arg.name]


def op(name: str, *args: Arg | str, backends: tuple[str, ...] = ("cpu", "cuda"),
       element_types: tuple[torch.dtype, ...] = FLOATS) -> NativeOp:
    """Declares `_C.<name>_<backend>` for each backend: args in _C's order, a plain string for a value argument."""
    declared = tuple(Arg(a) if isinstance(a, str) else a for a in args)
    names = [a.name for a in declared]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: argument names must be distinct, got {names}")
    return NativeOp(name, declared, tuple(backends), tuple(element_types))
