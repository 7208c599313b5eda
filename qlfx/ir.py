"""The qlfx IR: a functional ATen graph in a torch.fx GraphModule (made by :mod:`qlfx.capture`).

What every pass may rely on:
- ``call_function`` nodes call ATen ``OpOverload``s (``torch.ops.aten.conv2d.default``, ...) or qlfx's
  own custom ops (``torch.ops.qlfx.branch_product.default``, ``.hardball``, ``.softball``); passes match
  them by target and read their arguments by schema name (:func:`op_args`). One op vocabulary, with the
  canonical forms of :func:`qlfx.capture.canonicalize` (channel slices are ``aten.slice.Tensor``, eval
  batchnorm is ``aten.batch_norm.default``, 2-D convs are ``aten.conv2d.default``);
- parameters, buffers and constants are read by ``get_attr`` nodes; new constants are buffers
  (:func:`constant_node`);
- ``node.meta["val"]`` is a FakeTensor (shape, dtype; a symbolic batch size under ``dynamic_batch``) on
  every tensor value — :func:`call` and :func:`constant_node` set it on the nodes they make, and the
  pass manager re-derives it after every pass (:func:`refresh_vals`) without running real kernels;
- ``node.meta["nn_module_stack"]`` / :func:`module_path` names the module a node came from;
  ``node.meta["qlfx_origin"]`` names what created it (``"trace"`` or a pass);
  ``node.meta["qlfx_value_of"]`` (optional) names the node of an earlier graph whose value this node now
  carries (set by :func:`replace_value`); the equivalence checker pairs values across graphs with it.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

aten = torch.ops.aten
ORIGIN = "qlfx_origin"
VALUE_OF = "qlfx_value_of"
CONV2D = aten.conv2d.default
LINEAR = aten.linear.default
BATCH_NORM = aten.batch_norm.default
SLICE = aten.slice.Tensor
MUL = aten.mul.Tensor
ADD = aten.add.Tensor
CAT = aten.cat.default


# ------------------------------------------------------------------------------------ ops by schema
@functools.lru_cache(maxsize=None)
def _schema_arguments(target) -> tuple[tuple[str, Any, bool], ...]:
    """(name, default, has_default) of every argument of an OpOverload's schema."""
    out = []
    for a in target._schema.arguments:
        out.append((a.name, a.default_value if a.has_default_value() else None, a.has_default_value()))
    return tuple(out)


def op_args(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (``{}`` for non-ATen targets)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return {}
    values = {}
    for i, (name, default, has_default) in enumerate(_schema_arguments(node.target)):
        if i < len(node.args):
            values[name] = node.args[i]
        elif name in node.kwargs:
            values[name] = node.kwargs[name]
        elif has_default:
            values[name] = default
    return values


def set_op_args(node: fx.Node, **changes) -> None:
    """Replace some arguments of an ATen / custom op call by schema name (keyword-only ones included)."""
    args = op_args(node)
    args.update(changes)
    schema = [a for a in node.target._schema.arguments if a.name in args]
    node.args = tuple(args[a.name] for a in schema if not a.kwarg_only)
    node.kwargs = {a.name: args[a.name] for a in schema if a.kwarg_only}


def is_op(node: Any, *targets) -> bool:
    """``node`` calls one of ``targets`` (OpOverloads, or OpOverloadPackets matching any overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    return any(t is x or (packet is not None and packet is x) for x in targets)


def op_name(node: fx.Node) -> str:
    """A short readable name of what the node does: ``conv2d``, ``branch_product``, ``getitem``."""
    if node.op == "call_function":
        packet = getattr(node.target, "overloadpacket", None)
        if packet is not None:
            return packet.__name__
        return getattr(node.target, "__name__", str(node.target))
    return node.op if node.op != "get_attr" else str(node.target)


def describe(node: Any) -> str:
    """``layer1_0_conv1 (aten.conv2d in layer1.0.conv1)`` — for messages."""
    if not isinstance(node, fx.Node):
        return repr(node)
    path = module_path(node)
    what = f"{node.op} {node.target}" if node.op != "call_function" else op_name(node)
    return f"{node.name} ({what}{' in ' + path if path else ''})"


def pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) in (1, 2) else tuple(int(i) for i in v)
    return (int(v), int(v))


def module_path(node: fx.Node) -> str:
    """The qualified name of the innermost module the node was captured in ('' at the top level)."""
    path = node.meta.get("qlfx_module")
    if path is not None:
        return path
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    value = list(stack.values())[-1]
    return value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else ""


def source_line(node: fx.Node) -> str:
    """'file.py:12' of the user's code that made the node (from the captured stack trace), or ''."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File ")]
    if not lines:
        return ""
    last = lines[-1]  # File "/path/model.py", line 12, in forward
    try:
        path = last.split('"')[1]
        lineno = last.split("line ")[1].split(",")[0]
    except IndexError:
        return ""
    return f"{path.rsplit('/', 1)[-1]}:{lineno}"


# ------------------------------------------------------------------------------------ values & meta
def val(node: Any):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: Any) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def channels(node: Any) -> int | None:
    """Size of dim 1 when it is a concrete number, else None."""
    s = shape(node)
    return int(s[1]) if s is not None and len(s) >= 2 and isinstance(s[1], int) else None


def fake_mode(gm: fx.GraphModule):
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and "val" in n.meta]
    mode = detect_fake_mode(vals) if vals else None
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = gm.meta.get("qlfx_fallback_fake_mode")
        if mode is None:
            mode = gm.meta["qlfx_fallback_fake_mode"] = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def infer_val(gm: fx.GraphModule, node: fx.Node, mode=None) -> Any:
    """Compute ``node.meta['val']`` from its inputs' vals, with fake tensors only; return it."""
    mode = mode or fake_mode(gm)
    if node.op == "get_attr":
        t = get_tensor(gm, node)
        value = mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t
    elif node.op == "call_function":
        args = fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val"))
        with mode:
            value = node.target(*args, **kwargs)
    else:
        return node.meta.get("val")
    node.meta["val"] = value
    return value


def _signature(value) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return value if isinstance(value, (int, float, bool, type(None))) else id(value)


def args_snapshot(gm: fx.GraphModule) -> dict[fx.Node, tuple]:
    """What each node computes from (for :func:`refresh_vals` after a rewrite)."""
    return {n: (n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes}


def _same_call(a: tuple, b: tuple) -> bool:
    try:
        return a[0] == b[0] and a[1] is b[1] and a[2] == b[2] and a[3] == b[3]
    except Exception:  # noqa: BLE001 - an argument that cannot be compared counts as changed
        return False


def refresh_vals(gm: fx.GraphModule, before: dict[fx.Node, tuple] | None = None) -> int:
    """Re-derive ``meta['val']`` where a rewrite may have changed it: nodes without one, nodes whose
    call changed since ``before`` (:func:`args_snapshot`), stored tensors whose shape changed, and
    everything downstream of a value whose shape or dtype changed. ``before=None``: every node.
    Returns the number of nodes recomputed."""
    mode = fake_mode(gm)
    moved: set[fx.Node] = set()
    count = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        old = node.meta.get("val")
        if node.op == "get_attr":
            t = get_tensor(gm, node)
            stale = old is None or (isinstance(t, torch.Tensor) and _signature(old) != _signature(t))
        else:
            stale = (before is None or old is None or node not in before
                     or not _same_call(before[node], (node.op, node.target, node.args, node.kwargs))
                     or any(i in moved for i in node.all_input_nodes))
        if not stale:
            continue
        new = infer_val(gm, node, mode)
        count += 1
        if old is None or _signature(old) != _signature(new):
            moved.add(node)
    return count


def stamp_origin(gm: fx.GraphModule, origin: str) -> list[fx.Node]:
    """Mark every node without an origin as created by ``origin``; return those nodes."""
    created = []
    for node in gm.graph.nodes:
        if ORIGIN not in node.meta:
            node.meta[ORIGIN] = origin
            created.append(node)
    return created


def value_key(node: fx.Node) -> str:
    """The name of the value this node carries, stable across passes (see module docstring)."""
    return node.meta.get(VALUE_OF, node.name)


def replace_value(old: fx.Node, new: fx.Node) -> None:
    """Make every user of ``old`` use ``new`` instead, recording that ``new`` now carries old's value."""
    new.meta[VALUE_OF] = value_key(old)
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


# --------------------------------------------------------------------------------- building nodes
def call(gm: fx.GraphModule, target, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
    """A new ``call_function`` node at the graph's insertion point, its ``val`` computed, its module path
    taken from ``like`` (the node it stands in for, for readable names and provenance)."""
    node = gm.graph.call_function(target, tuple(args), dict(kwargs or {}))
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "qlfx_module"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        node.name = ""  # release the default name, then take one after the node it stands in for
        node.name = gm.graph._graph_namespace.create_name(f"{like.name}_{op_name(node)}", None)
    infer_val(gm, node)
    return node


def get_tensor(gm: fx.GraphModule, target_or_node) -> torch.Tensor:
    target = target_or_node.target if isinstance(target_or_node, fx.Node) else target_or_node
    *path, name = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    return getattr(owner, name)


def set_tensor(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    """Store ``tensor`` as a buffer at the dotted ``target``, creating the submodules on the way."""
    *path, name = target.split(".")
    owner: nn.Module = gm
    for part in path:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if name in owner._parameters:
        del owner._parameters[name]
    owner.register_buffer(name, tensor)


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, hint: str) -> str:
    """Register ``tensor`` on ``gm`` under a fresh attribute name derived from ``hint``; return it.

    New constants are buffers (not Parameters): a compiled graph is for inference.
    """
    base = "".join(c if c.isalnum() else "_" for c in hint).strip("_") or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    # standard strides: a [4, 3, 1, 1] weight with strides (3, 1, 3, 3) counts as channels-last, and a
    # conv reading it would return a channels-last output that a later aten.view rejects
    gm.register_buffer(name, tensor.detach().clone(memory_format=torch.contiguous_format))
    return name


def constant_node(gm: fx.GraphModule, tensor: torch.Tensor, hint: str) -> fx.Node:
    """A get_attr node reading a new constant (val set); insert with ``gm.graph.inserting_before``."""
    node = gm.graph.get_attr(add_constant(gm, tensor, hint))
    infer_val(gm, node)
    return node


def is_constant(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def attr_users(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    """All nodes that read the tensor at ``target`` through any get_attr node."""
    users = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            users.extend(n.users)
    return users


def used_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every stored tensor the graph reads."""
    found: dict[str, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users:  # a dangling read (dce not run yet) stores nothing
            t = get_tensor(gm, n)
            if isinstance(t, torch.Tensor):
                found[n.target] = t
    return found


def count_params(gm: fx.GraphModule) -> tuple[int, int]:
    """(number of stored values, number of nonzero values) over the float tensors the graph reads,
    counting a storage shared by several names once."""
    seen, total, nonzero = set(), 0, 0
    for t in used_tensors(gm).values():
        if not t.is_floating_point():
            continue
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel()
        nonzero += int(torch.count_nonzero(t.detach()))
    return total, nonzero


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy: weights, graph and node metadata (FakeTensor vals are shared: they are immutable)."""
    return copy.deepcopy(gm)


def same_program(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    """True when ``a`` and ``b`` compute the same function for certain: the same generated code and
    bit-equal weights under the same names (the pass manager then reuses ``a``'s outputs for ``b``)."""
    if a.code != b.code:
        return False
    tensors_a = dict(a.named_buffers()) | dict(a.named_parameters())
    tensors_b = dict(b.named_buffers()) | dict(b.named_parameters())
    return tensors_a.keys() == tensors_b.keys() and all(
        tensors_a[k].dtype == tensors_b[k].dtype and tensors_a[k].shape == tensors_b[k].shape
        and torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


# ------------------------------------------------------------------------------- views of ATen ops
@dataclass
class ConvCall:
    """A view of an ``aten.conv2d`` node's arguments (``padding`` may be 'same' for ``conv2d.padding``)."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: tuple[int, int]
    padding: Any  # tuple[int, int] or "same"/"valid"
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, node: Any) -> "ConvCall | None":
        if not is_op(node, aten.conv2d.default, aten.conv2d.padding):
            return None
        a = op_args(node)
        padding = a["padding"] if isinstance(a["padding"], str) else pair(a["padding"])
        return cls(node, a["input"], a["weight"], a["bias"], pair(a["stride"]), padding, pair(a["dilation"]),
                   int(a["groups"]))

    def set_args(self, **changes) -> None:
        """Rewrite the node's arguments (``aten.conv2d.default``, all positional)."""
        for k, v in changes.items():
            setattr(self, k, v)
        if isinstance(self.padding, str):
            self.node.target = aten.conv2d.padding
        else:
            self.node.target = aten.conv2d.default
        self.node.args = (self.input, self.weight, self.bias, list(self.stride),
                          self.padding if isinstance(self.padding, str) else list(self.padding),
                          list(self.dilation), self.groups)
        self.node.kwargs = {}

    @property
    def kernel(self) -> tuple[int, int] | None:
        s = shape(self.weight)
        return tuple(s[2:]) if s is not None and len(s) == 4 else None

    @property
    def is_pointwise(self) -> bool:
        """1x1 kernel, no padding, no grouping: a per-pixel matrix product."""
        return self.kernel == (1, 1) and self.groups == 1 and self.padding in ((0, 0), "valid")


@dataclass
class LinearCall:
    """A view of an ``aten.linear`` node: y = x W^T + b."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None

    @classmethod
    def of(cls, node: Any) -> "LinearCall | None":
        if not is_op(node, LINEAR):
            return None
        a = op_args(node)
        return cls(node, a["input"], a["weight"], a["bias"])

    def set_args(self, **changes) -> None:
        for k, v in changes.items():
            setattr(self, k, v)
        self.node.args, self.node.kwargs = (self.input, self.weight, self.bias), {}


@dataclass
class BatchNormCall:
    """A view of an ``aten.batch_norm`` node (the canonical eval batchnorm)."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    running_mean: fx.Node | None
    running_var: fx.Node | None
    training: bool
    eps: float

    @classmethod
    def of(cls, node: Any) -> "BatchNormCall | None":
        if not is_op(node, BATCH_NORM):
            return None
        a = op_args(node)
        return cls(node, a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                   bool(a["training"]), float(a["eps"]))

    def scale_shift(self, gm: fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) with BN(x) = s x + t per channel, in float64 so folded weights round once, at the end."""
        mean = get_tensor(gm, self.running_mean).double()
        var = get_tensor(gm, self.running_var).double()
        gamma = get_tensor(gm, self.weight).double() if self.weight is not None else torch.ones_like(var)
        beta = get_tensor(gm, self.bias).double() if self.bias is not None else torch.zeros_like(var)
        s = gamma / torch.sqrt(var + self.eps)
        return s, beta - mean * s

    @property
    def foldable(self) -> bool:
        """Eval mode with stored statistics and stored affine parameters."""
        return (not self.training and is_constant(self.running_mean) and is_constant(self.running_var)
                and all(a is None or is_constant(a) for a in (self.weight, self.bias)))


@dataclass
class ChannelSlice:
    """``x[:, start:stop:step]`` — an ``aten.slice`` along dim 1 (bounds are plain indices after capture)."""

    node: fx.Node
    input: fx.Node
    start: int
    stop: int
    step: int

    @classmethod
    def of(cls, node: Any) -> "ChannelSlice | None":
        if not is_op(node, SLICE):
            return None
        a = op_args(node)
        s = shape(a["self"])
        if s is None or len(s) < 2 or a["dim"] % len(s) != 1 or not isinstance(s[1], int):
            return None
        start, stop, step = a["start"], a["end"], a["step"]
        if not all(isinstance(v, (int, type(None))) for v in (start, stop, step)) or (step or 1) <= 0:
            return None
        start, stop, step = slice(start, stop, step).indices(s[1])
        return cls(node, a["self"], start, max(start, stop), step)

    @property
    def rows(self) -> list[int]:
        return list(range(self.start, self.stop, self.step))


def is_mul(node: Any) -> bool:
    return is_op(node, aten.mul.Tensor, aten.mul.Scalar)


def is_add(node: Any) -> bool:
    """x + y (alpha 1)."""
    return is_op(node, aten.add.Tensor, aten.add.Scalar) and op_args(node).get("alpha", 1) == 1


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's inputs that are computed values (not stored constants)."""
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def output_values(gm: fx.GraphModule) -> list[fx.Node]:
    out = gm.graph.output_node()
    flat = []

    def visit(a):
        if isinstance(a, fx.Node):
            flat.append(a)
        elif isinstance(a, (tuple, list)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(out.args)
    return flat


def uses(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return {u for n in nodes for u in n.users}

