"""Capture by recording: one eager forward of the model under a TorchFunctionMode writes down every torch call that
reads a parameter-dependent tensor, with its base output. That forward *is* the step's base evaluation.

Recording an eager run instead of tracing symbolically means any model that runs in PyTorch can be captured:
Python control flow, shape queries (`x.view(x.size(0), -1)`), defaulted keyword arguments, tuple / dict /
ModelOutput results, parameters read as attributes, Hugging Face models. The tape is exact for this batch only,
which is all a CGE step needs (the engine records a new tape every step, at no extra cost: the base forward is
needed anyway).

What the tape cannot prove exact, it lists in `blockers` (the engine then falls back to full evaluations, with a
warning that names the node):
- Python reading a parameter-dependent value (`.item()`, `bool(t)`, `.tolist()`, numpy): a branch could go the
  other way under a perturbation;
- a recorded value changed in place afterwards by something the tape did not see (an in-place op on a view).
In-place ops it sees (`nn.ReLU(inplace=True)`, `out += identity`, `x.relu_()`) are recorded as ordinary ops: the
value before the mutation is kept (cloned) for the nodes that read it earlier.
Dropout in training mode is recorded with its mask (dropout is linear given the mask), so every query replays the
base evaluation's randomness; any other op that draws random numbers keeps the RNG state it started from, and the
engine replays that state when it re-evaluates the op.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_flatten, tree_unflatten

# Calls that only read metadata: they never make a value depend on a parameter's value.
METADATA_READS = {
    torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.stride, torch.Tensor.is_contiguous,
    torch.Tensor.is_floating_point, torch.Tensor.element_size, torch.Tensor.__len__, torch.Tensor.data_ptr,
    torch.Tensor.get_device, torch.Tensor.nelement, torch.Tensor.ndimension, torch.Tensor.is_complex,
    torch.Tensor.storage_offset, torch._nested_tensor_from_mask_left_aligned,
}
METADATA_PROPERTIES = ("shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse",
                       "is_quantized", "is_meta", "grad_fn", "is_leaf", "is_nested")
for _name in METADATA_PROPERTIES:
    if hasattr(torch.Tensor, _name):
        METADATA_READS.add(getattr(torch.Tensor, _name).__get__)
# Calls that hand a tensor's values to Python.
VALUE_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.__array__,
               torch.Tensor.__format__, torch.Tensor.__repr__, torch.equal, torch.Tensor.__complex__}

# Calls whose result depends on a tensor's shape, dtype or device only (`torch.zeros_like(x)`, `x.new_empty(...)`):
# constants of the tape, like any tensor made without a parameter-dependent value.
SHAPE_ONLY = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
              torch.randn_like, torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
              torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.new_tensor}
# Casts that read their other tensor argument for its dtype and device only (`c.to(x)`, `c.type_as(x)`).
CASTS = {torch.Tensor.to, torch.Tensor.type_as}

# dropout(input, p, training, inplace) family: output = input * noise, noise drawn from shape alone.
DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_SIGNATURES: dict[Any, inspect.Signature | None] = {}


@dataclass(eq=False, repr=False)
class Node:
    """One recorded call (or a parameter, or one tensor of a call's tuple output)."""

    index: int
    kind: str                 # 'param' | 'call' | 'item'
    func: Any = None          # the torch callable (kind 'call')
    args: tuple = ()          # with Node objects where a parameter-dependent tensor was passed
    kwargs: dict = field(default_factory=dict)
    value: Any = None         # the base output (a tensor, or a tuple/list of them for multi-output calls)
    where: str = ""           # the module path that made the call, for messages
    name: str = ""            # parameter name (kind 'param'); resolved function name otherwise
    parent: "Node | None" = None   # kind 'item': the multi-output call
    item: int = 0                  # kind 'item': index among the flattened outputs of parent
    rng_state: Any = None     # the CPU/CUDA RNG state before the call, where the call drew random numbers
    noise: torch.Tensor | None = None  # dropout: the base evaluation's noise (mask / (1 − p))
    users: list = field(default_factory=list)
    version: int = 0
    converted: bool = False   # the cached value was re-laid out channels-last (the model saw it contiguous)

    _inputs: list | None = None

    @property
    def inputs(self) -> list["Node"]:
        """The recorded nodes among the call's arguments, in order, each once (computed once: read every pass)."""
        if self._inputs is None:
            if self.kind == "item":
                self._inputs = [self.parent]
            else:
                leaves, _ = tree_flatten((self.args, self.kwargs))
                self._inputs = list(dict.fromkeys(leaf for leaf in leaves if isinstance(leaf, Node)))
        return self._inputs

    def __repr__(self) -> str:
        return f"Node({self.describe()})"

    def describe(self) -> str:
        if self.kind == "param":
            return f"parameter {self.name}"
        if self.kind == "item":
            return f"output {self.item} of {self.parent.describe()}"
        where = f" in {self.where}" if self.where else ""
        return f"#{self.index} {self.name}{where}"


@dataclass
class Tape:
    nodes: list[Node]
    params: dict[str, Node]           # parameter name -> its node
    outputs: Any                      # the model's return value
    blockers: list[str]
    position: dict = field(default_factory=dict)
    loss: Any = None                  # the loss tensor when the loss was computed inside the recording
    _by_id: dict = field(default_factory=dict)

    def node_of(self, tensor: Any) -> Node | None:
        """The node whose base value is `tensor` (a model output or the loss), or None if it does not depend on
        the parameters."""
        entry = self._by_id.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[0] if entry is not None and entry[1] is tensor else None

    def clear(self) -> None:
        """Drops the cached activations (a tape lives for one step)."""
        self.nodes.clear()
        self.params.clear()
        self.position.clear()
        self.outputs = self.loss = None
        self._by_id = {}


def _signature(func) -> inspect.Signature | None:
    if func not in _SIGNATURES:
        try:
            _SIGNATURES[func] = inspect.signature(func)
        except (TypeError, ValueError):
            _SIGNATURES[func] = None
    return _SIGNATURES[func]


def bound_arguments(func, args: tuple, kwargs: dict) -> dict | None:
    """func's arguments by parameter name (defaults applied), or None where Python cannot tell."""
    signature = _signature(func)
    if signature is None:
        return None
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def value(x):
    """A call argument's base value: the recorded node's output, or the constant itself."""
    return x.value if isinstance(x, Node) else x


def arguments(node: Node, names: tuple[str, ...]) -> dict:
    """The call's arguments by name: from the signature where Python has one, else by position in `names`."""
    bound = bound_arguments(node.func, node.args, node.kwargs)
    if bound is not None:
        return bound
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def mutated_tensor(func, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor `func` writes in place, or None. Covers `x.add_()`, `x += y`, `inplace=True` and `out=`."""
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        return out
    name = getattr(func, "__name__", "")
    first = args[0] if args else None
    if isinstance(first, torch.Tensor):
        if (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name.endswith("__")
                                                                and name not in ("__index__", "__int__")):
            return first
    if "inplace" in kwargs or (len(args) > 1 and any(isinstance(a, bool) and a for a in args[1:])):
        bound = bound_arguments(func, args, kwargs)
        if bound is not None and bound.get("inplace") is True:
            return bound.get("input", first)
    return None


class _ModulePaths:
    """The qualified name of the module whose forward is running, for messages."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self._handles: list = []

    def __enter__(self):
        from torch.nn.modules import module as module_hooks
        self._handles = [
            module_hooks.register_module_forward_pre_hook(self._push),
            module_hooks.register_module_forward_hook(self._pop, always_call=True),
        ]
        return self

    def _push(self, module, args):
        name = self.names.get(id(module))
        self.stack.append(f"{name} ({type(module).__name__})" if name else
                          f"the model ({type(module).__name__})" if name is not None else "")

    def _pop(self, module, args, output):
        if self.stack:
            self.stack.pop()

    @property
    def current(self) -> str:
        return next((s for s in reversed(self.stack) if s), "")

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (nested, meta): never aliased here
        return -id(t)


def _rng_state(device_type: str):
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if device_type == "cuda" else None)


def set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class Recorder(TorchFunctionMode):
    """Records the calls that read parameter-dependent tensors; everything else runs untouched."""

    def __init__(self, params: dict[str, torch.Tensor], paths: _ModulePaths):
        super().__init__()
        self.nodes: list[Node] = []
        self.params: dict[str, Node] = {}
        # id(tensor) -> (node, tensor, its version when recorded): how a tensor the model passes back is recognized.
        # Kept apart from node.value, which may be a copy saved before an in-place write.
        self.by_id: dict[int, tuple[Node, torch.Tensor, int]] = {}
        self.by_storage: dict[int, list[Node]] = {}  # storage address -> nodes whose cached value lives there
        self.blockers: list[str] = []
        self.paths = paths
        for name, p in params.items():
            node = self._new("param", name=name, value=p)
            self.params[name] = node
            self._remember(p, node)

    def _new(self, kind: str, **fields) -> Node:
        node = Node(len(self.nodes), kind, **fields)
        if isinstance(node.value, torch.Tensor):
            node.version = node.value._version
        self.nodes.append(node)
        return node

    def _remember(self, tensor: torch.Tensor, node: Node) -> None:
        self.by_id[id(tensor)] = (node, tensor, tensor._version)
        self.by_storage.setdefault(_storage(tensor), []).append(node)

    def _lookup(self, tensor: torch.Tensor, reader: str) -> Node | None:
        entry = self.by_id.get(id(tensor))
        if entry is None or entry[1] is not tensor:
            return None
        node, _, version = entry
        if tensor._version != version:
            self.blockers.append(f"{node.describe()} was changed in place (through a view of the same memory, or "
                                 f"by an operation the engine does not see) before {reader} read it")
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA_READS or func in SHAPE_ONLY:
            return func(*args, **kwargs)
        if func in CASTS and args and isinstance(args[0], torch.Tensor) and self._lookup(args[0], "") is None:
            return func(*args, **kwargs)  # a constant cast like x: its values do not depend on x's
        leaves, spec = tree_flatten((args, kwargs))
        name = resolve_name(func) or getattr(func, "__name__", repr(func))
        sources = [self._lookup(t, name) if isinstance(t, torch.Tensor) else None for t in leaves]
        if not any(sources):
            return func(*args, **kwargs)
        if func in VALUE_READS:
            node = next(s for s in sources if s is not None)
            self.blockers.append(f"Python reads the values of {node.describe()} (through {name}): a branch could "
                                 "change under a perturbation")
            return func(*args, **kwargs)
        self._keep_value_before_write(func, args, kwargs)
        recorded = tree_unflatten([s if s is not None else t for s, t in zip(sources, leaves)], spec)
        node = self._new("call", func=func, args=recorded[0], kwargs=recorded[1], where=self.paths.current,
                         name=name)
        out = self._execute(node, func, args, kwargs)
        node.value = out
        self._map_outputs(node, out)
        for source in node.inputs:
            source.users.append(node)
        return out

    def _keep_value_before_write(self, func, args, kwargs) -> None:
        """An in-place op is about to overwrite memory that recorded values live in (the target and any view of
        it): keep copies for the nodes that read them before. A later read of another view of that memory is
        caught by its version (_lookup)."""
        target = mutated_tensor(func, args, kwargs)
        if target is None:
            return
        for node in self.by_storage.get(_storage(target), []):
            if not isinstance(node.value, torch.Tensor) or _storage(node.value) != _storage(target):
                continue
            if node.kind == "param":
                self.blockers.append(f"parameter {node.name} is written in place during the forward")
                continue
            node.value = node.value.clone()
            node.version = node.value._version

    def _execute(self, node: Node, func, args, kwargs):
        if func in DROPOUT_FUNCTIONS:
            bound = bound_arguments(func, args, kwargs)
            if bound is not None and bound.get("training") and 0 < float(bound.get("p", 0)) < 1:
                x = bound["input"]
                rest = {k: v for k, v in bound.items() if k not in ("input", "inplace")}
                noise = func(torch.ones_like(x), **rest)  # the same draws dropout(x) would make: same shape, dtype
                node.noise = noise
                return x.mul_(noise) if bound.get("inplace") else x * noise
        device = next((t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)),
                      "cpu")
        before = _rng_state(device)
        out = func(*args, **kwargs)
        after = _rng_state(device)
        if not torch.equal(before[0], after[0]) or (before[1] is not None and not torch.equal(before[1], after[1])):
            node.rng_state = before
        return out

    def _map_outputs(self, node: Node, out) -> None:
        if isinstance(out, torch.Tensor):
            node.version = out._version
            self._remember(out, node)
            return
        leaves, _ = tree_flatten(out)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                item = self._new("item", parent=node, item=i, value=leaf, where=node.where,
                                 name=f"{node.name}[{i}]")
                node.users.append(item)
                self._remember(leaf, item)
            elif isinstance(leaf, (int, float, bool)) and not isinstance(out, torch.Size):
                self.blockers.append(f"{node.describe()} returns a Python number computed from parameter-dependent "
                                     "values")

    def final_check(self) -> None:
        """Every cached value must still be what it was when recorded (a write the tape did not see would make
        the rules read the wrong base values)."""
        for node in self.nodes:
            value = node.value
            if node.kind != "param" and isinstance(value, torch.Tensor) and value._version != node.version:
                self.blockers.append(f"{node.describe()} was changed in place after it was recorded, by an operation "
                                     "the engine does not see")


def record(forward, model: torch.nn.Module, params: dict[str, torch.Tensor]) -> Tape:
    """Runs `forward()` once — a real forward of `model` (BN running statistics move as in training), possibly
    followed by the loss — and returns the tape of every call that depends on `params`. `forward` returns
    (model outputs, loss tensor or None)."""
    paths = _ModulePaths(model)
    recorder = Recorder(params, paths)
    with paths, recorder:
        outputs, loss = forward()
    recorder.final_check()
    tape = Tape(recorder.nodes, recorder.params, outputs, _unique(recorder.blockers))
    tape.loss = loss
    tape.position = {n: i for i, n in enumerate(tape.nodes)}
    tape._by_id = {key: (node, tensor) for key, (node, tensor, _) in recorder.by_id.items()}
    return tape


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
