"""Canonical op names: the many spellings of one op (`F.relu`, `torch.relu`, `x.relu()`, `x.relu_()`,
`nn.ReLU(inplace=True)`) map to one name, the key of the rule registry (engine/rules.py)."""
from __future__ import annotations

from torch.overrides import resolve_name

_PREFIXES = ("torch.nn.functional.", "torch.Tensor.", "torch._C._nn.", "torch._C._VariableFunctions.",
             "torch.special.", "torch.")
_DUNDER = {"__add__": "add", "__radd__": "add", "__iadd__": "add", "__sub__": "sub", "__isub__": "sub",
           "__rsub__": "rsub", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "__truediv__": "div",
           "__itruediv__": "div", "__div__": "div", "__rtruediv__": "rdiv", "__matmul__": "matmul",
           "__rmatmul__": "rmatmul", "__getitem__": "getitem", "__setitem__": "setitem", "__neg__": "neg",
           "__pow__": "pow", "__ipow__": "pow"}
_ALIASES = {"multiply": "mul", "divide": "div", "true_divide": "div", "subtract": "sub", "negative": "neg",
            "mm": "matmul", "bmm": "matmul", "spmm": "matmul", "relu6": "relu6", "swapaxes": "transpose", "swapdims": "transpose",
            "concat": "cat", "concatenate": "cat", "clip": "clamp", "absolute": "abs", "dropout1d": "dropout",
            "dropout2d": "dropout", "dropout3d": "dropout", "feature_dropout": "dropout"}
_CACHE: dict = {}


def canonical(func) -> str:
    """The registry key of a recorded torch callable."""
    try:
        return _CACHE[func]
    except (KeyError, TypeError):
        pass
    name = resolve_name(func) or getattr(func, "__name__", "")
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name in _DUNDER:
        name = _DUNDER[name]
    elif name.endswith("_") and not name.endswith("__"):
        name = name[:-1]  # in-place spelling: the tape kept the value before the write
    name = _ALIASES.get(name, name)
    try:
        _CACHE[func] = name
    except TypeError:
        pass
    return name
