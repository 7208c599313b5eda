"""The qlfx IR: a torch.fx GraphModule in a canonical, functional form.

Canonical form, which every pass may rely on:
- parameters and buffers are read by ``get_attr`` nodes; standard layers are ``call_function`` nodes
  on ``torch.nn.functional`` / ``torch`` (``torch.conv2d``, ``F.linear``, ``F.batch_norm``, ``F.relu``,
  ...). Layers qlfx does not know stay ``call_module`` (opaque, still runnable);
- ``node.meta["tensor_meta"]`` holds shape and dtype of every tensor value (torch.fx ShapeProp);
- ``node.meta["qlfx_origin"]`` names what created the node: ``"trace"`` or the pass that made it;
- ``node.meta["qlfx_value_of"]`` (optional) names the node of an earlier graph whose value this node now
  carries (set by :func:`replace_value`); the equivalence checker pairs values across graphs with it.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError, UsageError

ORIGIN = "qlfx_origin"
VALUE_OF = "qlfx_value_of"
CONV2D = torch.conv2d  # F.conv2d is the same builtin


# ----------------------------------------------------------------------------------------- tracing
def _default_leaf_types() -> tuple[type, ...]:
    from .models.activations import Hardball, Softball

    return (Hardball, Softball)


class QlfxTracer(fx.Tracer):
    """torch.fx tracer that keeps torch.nn layers and the given types/qualified names as leaves, and
    remembers which module it was inside when tracing failed (for the error message)."""

    def __init__(self, leaf_types: Sequence[type] = (), leaf_names: Sequence[str] = ()):
        super().__init__()
        self.leaf_types = tuple(_default_leaf_types()) + tuple(leaf_types)
        self.leaf_names = set(leaf_names)
        self.qlfx_module_path: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.qlfx_module_path.append((qualname, type(m).__name__))
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            raise  # keep the stack as it was at the failure point
        self.qlfx_module_path.pop()
        return result


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    leaf_modules: Iterable[type | str] = (),
) -> fx.GraphModule:
    """Trace ``model`` into the canonical qlfx IR (see module docstring).

    The model is deep-copied first; the user's model is never touched. ``leaf_modules`` lists module
    types or qualified names to keep opaque (use it for code that cannot be traced).
    """
    example_inputs = check_example_inputs(example_inputs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"qlfx traces torch.nn.Module objects; got {type(model).__name__}")
    model = copy.deepcopy(model)
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_names = tuple(x for x in leaf_modules if isinstance(x, str))
    tracer = QlfxTracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # torch.fx raises many kinds; all mean "not traceable"
        raise _trace_error(model, tracer, err) from err
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    functionalize(gm)
    for node in gm.graph.nodes:
        node.meta.setdefault(ORIGIN, "trace")
    gm.meta["qlfx_example_inputs"] = tuple(t.detach().clone() for t in example_inputs)
    propagate_shapes(gm, example_inputs)
    return gm


def _trace_error(model: nn.Module, tracer: QlfxTracer, err: Exception) -> TraceError:
    if tracer.qlfx_module_path:
        qualname, type_name = tracer.qlfx_module_path[-1]
        where = f"module '{qualname or '<root>'}' ({type_name})"
        fix = (
            f"mark it a leaf so qlfx treats it as one opaque op: "
            f"qlfx.compile(..., leaf_modules=[{type_name}]) or --leaf {qualname}"
        )
    else:
        where = f"the forward of the top-level model ({type(model).__name__})"
        fix = "move the untraceable code into a submodule and mark that submodule a leaf (leaf_modules=[...])"
    construct = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return TraceError(
        f"cannot trace {where}: {construct}\n"
        f"  torch.fx traces with symbolic values, so Python control flow on tensor values, "
        f"data-dependent shapes and iteration over tensors fail.\n  What to do: {fix}."
    )


def check_example_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    if example_inputs is None:
        raise UsageError(
            "example_inputs is required: qlfx traces with concrete shapes. "
            "Pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"example input {i} is a {type(t).__name__}; qlfx needs torch.Tensor inputs")
    return example_inputs


# ---------------------------------------------------------------------------- functionalization
def _attr(gm: fx.GraphModule, qualname: str, name: str):
    """get_attr node for ``qualname.name`` or None when the module has no such tensor."""
    mod = gm.get_submodule(qualname)
    if getattr(mod, name, None) is None:
        return None
    return gm.graph.get_attr(f"{qualname}.{name}")


def _functional_form(gm: fx.GraphModule, node: fx.Node, m: nn.Module):
    """Emit the functional equivalent of call_module ``node`` before it; return the new node or None
    when the module type is not handled (it then stays an opaque call_module)."""
    g, q, x = gm.graph, node.target, node.args[0] if node.args else None
    if node.kwargs or len(node.args) != 1:
        return None
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return None
        return g.call_function(
            CONV2D, (x, _attr(gm, q, "weight"), _attr(gm, q, "bias"), m.stride, m.padding, m.dilation, m.groups)
        )
    if isinstance(m, nn.Linear):
        return g.call_function(F.linear, (x, _attr(gm, q, "weight"), _attr(gm, q, "bias")))
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
        training = m.training
        return g.call_function(
            F.batch_norm,
            (x, _attr(gm, q, "running_mean"), _attr(gm, q, "running_var"), _attr(gm, q, "weight"),
             _attr(gm, q, "bias"), training, 0.0 if m.momentum is None else m.momentum, m.eps),
        )
    if isinstance(m, nn.Identity) or (isinstance(m, nn.modules.dropout._DropoutNd) and not m.training):
        return x  # identity at inference
    simple = {
        nn.ReLU: lambda: g.call_function(F.relu, (x,)),
        nn.ReLU6: lambda: g.call_function(F.hardtanh, (x, 0.0, 6.0)),
        nn.Hardtanh: lambda: g.call_function(F.hardtanh, (x, m.min_val, m.max_val)),
        nn.Sigmoid: lambda: g.call_function(torch.sigmoid, (x,)),
        nn.Tanh: lambda: g.call_function(torch.tanh, (x,)),
        nn.Hardswish: lambda: g.call_function(F.hardswish, (x,)),
        nn.Hardsigmoid: lambda: g.call_function(F.hardsigmoid, (x,)),
        nn.SiLU: lambda: g.call_function(F.silu, (x,)),
        nn.GELU: lambda: g.call_function(F.gelu, (x,), {"approximate": m.approximate}),
        nn.LeakyReLU: lambda: g.call_function(F.leaky_relu, (x, m.negative_slope)),
        nn.Flatten: lambda: g.call_function(torch.flatten, (x, m.start_dim, m.end_dim)),
        nn.MaxPool2d: lambda: g.call_function(
            F.max_pool2d, (x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        ) if not m.return_indices else None,
        nn.AvgPool2d: lambda: g.call_function(
            F.avg_pool2d, (x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
        ),
        nn.AdaptiveAvgPool2d: lambda: g.call_function(F.adaptive_avg_pool2d, (x, m.output_size)),
        nn.GroupNorm: lambda: g.call_function(
            F.group_norm, (x, m.num_groups, _attr(gm, q, "weight"), _attr(gm, q, "bias"), m.eps)
        ),
        nn.LayerNorm: lambda: g.call_function(
            F.layer_norm, (x, m.normalized_shape, _attr(gm, q, "weight"), _attr(gm, q, "bias"), m.eps)
        ),
        nn.Conv1d: lambda: g.call_function(
            torch.conv1d, (x, _attr(gm, q, "weight"), _attr(gm, q, "bias"), m.stride, m.padding, m.dilation, m.groups)
        ) if m.padding_mode == "zeros" else None,
        nn.ConvTranspose2d: lambda: g.call_function(
            F.conv_transpose2d, (x, _attr(gm, q, "weight"), _attr(gm, q, "bias"), m.stride, m.padding,
                                 m.output_padding, m.groups, m.dilation)
        ),
        nn.AdaptiveMaxPool2d: lambda: g.call_function(F.adaptive_max_pool2d, (x, m.output_size))
        if not m.return_indices else None,
        nn.ELU: lambda: g.call_function(F.elu, (x, m.alpha)),
        nn.PReLU: lambda: g.call_function(F.prelu, (x, _attr(gm, q, "weight"))),
        nn.Softplus: lambda: g.call_function(F.softplus, (x, m.beta, m.threshold)),
        nn.Mish: lambda: g.call_function(F.mish, (x,)),
        nn.Softmax: lambda: g.call_function(F.softmax, (x, m.dim)),
        nn.Upsample: lambda: g.call_function(
            F.interpolate, (x, m.size, m.scale_factor, m.mode, m.align_corners)
        ),
        nn.ZeroPad2d: lambda: g.call_function(F.pad, (x, tuple(m.padding), "constant", 0.0)),
        nn.PixelShuffle: lambda: g.call_function(F.pixel_shuffle, (x, m.upscale_factor)),
    }
    make = simple.get(type(m))
    return make() if make is not None else None


def functionalize(gm: fx.GraphModule) -> None:
    """Rewrite call_module nodes of standard layers into the canonical functional form, in place."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            new = _functional_form(gm, node, m)
        if new is None:
            continue
        if new is not node.args[0]:
            new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
            new.meta["qlfx_module"] = node.target
            new.name = node.name  # keep readable names: layer1_0_conv1 stays layer1_0_conv1
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


# ---------------------------------------------------------------------------------- shapes & meta
def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None) -> None:
    """Fill ``tensor_meta`` (shape, dtype) on every node by running the graph on example inputs."""
    if example_inputs is None:
        example_inputs = gm.meta["qlfx_example_inputs"]
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


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
    old.replace_all_uses_with(new)


# ------------------------------------------------------------------------------ tensors in the graph
def get_tensor(gm: fx.GraphModule, target_or_node) -> torch.Tensor:
    target = target_or_node.target if isinstance(target_or_node, fx.Node) else target_or_node
    *path, name = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    return getattr(owner, name)


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, hint: str) -> str:
    """Register ``tensor`` on ``gm`` under a fresh attribute name derived from ``hint``; return it.

    New constants are buffers (not Parameters): a compiled graph is for inference.
    """
    base = "".join(c if c.isalnum() else "_" for c in hint).strip("_") or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor.detach().clone().contiguous())
    return name


def constant_node(gm: fx.GraphModule, tensor: torch.Tensor, hint: str) -> fx.Node:
    """A get_attr node reading a new constant; insert with ``gm.graph.inserting_before``."""
    return gm.graph.get_attr(add_constant(gm, tensor, hint))


def attr_users(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    """All nodes that read the tensor at ``target`` through any get_attr node."""
    users = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            users.extend(n.users)
    return users


def used_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter/buffer the graph reads (get_attr targets and opaque modules' tensors)."""
    found: dict[str, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users:  # a dangling read (dce not run yet) stores nothing
            t = get_tensor(gm, n)
            if isinstance(t, torch.Tensor):
                found[n.target] = t
        elif n.op == "call_module":
            for name, t in gm.get_submodule(n.target).state_dict(keep_vars=True).items():
                found[f"{n.target}.{name}"] = t
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


# ------------------------------------------------------------------------------------ conv views
@dataclass
class ConvCall:
    """A normalised view of a ``torch.conv2d`` node's arguments."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: tuple[int, int]
    padding: Any  # tuple[int, int] or "same"/"valid"
    dilation: tuple[int, int]
    groups: int

    _ORDER = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    _DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

    @classmethod
    def of(cls, node: fx.Node) -> "ConvCall | None":
        if node.op != "call_function" or node.target is not CONV2D:
            return None
        values = dict(cls._DEFAULTS)
        values.update(zip(cls._ORDER, node.args))
        values.update(node.kwargs)
        pair = lambda v: tuple(v) * (2 // len(v)) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        padding = values["padding"] if isinstance(values["padding"], str) else pair(values["padding"])
        return cls(node, values["input"], values["weight"], values["bias"], pair(values["stride"]),
                   padding, pair(values["dilation"]), int(values["groups"]))

    def set_args(self, **changes) -> None:
        """Rewrite the node's arguments (all positional, in conv2d order)."""
        for k, v in changes.items():
            setattr(self, k, v)
        self.node.args = tuple(getattr(self, k) for k in self._ORDER)
        self.node.kwargs = {}

    @property
    def is_pointwise(self) -> bool:
        """1x1 kernel, no padding, no grouping: a per-pixel matrix product."""
        w = self.weight.meta.get("tensor_meta")
        k = tuple(w.shape[2:]) if w is not None else None
        return k == (1, 1) and self.groups == 1 and self.padding in ((0, 0), "valid")


def is_call(node: fx.Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
        node.op == "call_method" and node.target == "mul"
    )


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd)) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy: weights, graph and node metadata. Passes run on copies so the input survives."""
    return copy.deepcopy(gm)
