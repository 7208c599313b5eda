"""Capture: a PyTorch model -> the qlfx IR (a functional ATen graph), and the IR -> an ExportedProgram.

    capture(model, example_inputs, dynamic_batch=False) -> torch.fx.GraphModule
    to_exported_program(gm, example_inputs, dynamic_batch=False) -> torch.export.ExportedProgram

**Capture** is ``torch.export.export(deepcopy(model), example_inputs, strict=False)`` — non-strict, so
the model's Python runs as Python (numpy scalars, ``x.size()[1]``, wrapper modules, attribute writes) and
only tensor operations are recorded; static shapes are specialised, so shape arithmetic and guards such
as ``torch._assert(x.ndim == 4)`` are evaluated once and vanish. Then
``run_decompositions({})``: the empty table functionalises the graph (``x += y`` -> ``add``, no
``relu_``) and keeps every CompositeImplicitAutograd op whole — ``conv2d``, ``linear``, ``layer_norm``,
``hardswish``, ``silu``, ``gelu``, ``max_pool2d``, ``adaptive_avg_pool2d``... — because the passes, the
symmetry analysis and both converters (torch.onnx, TVM's frontend) know those ops directly; the core
ATen table would split ``hardswish`` into clamp/add/div/mul and ``linear`` into permute+addmm, and
every pass would have to reassemble them.

Then a few canonical forms (:func:`canonicalize`), so that one written idea reaches the passes as one
ATen pattern however it was written:

- channel slices: ``chunk``/``split``/``split_with_sizes``/``tensor_split``/``unsafe_split`` + ``getitem``
  become one ``aten.slice.Tensor`` per piece (``narrow`` and ``h[:, :c]`` already are), with bounds
  clamped to the axis (``9223372036854775807`` -> the size); ``unbind`` pieces become ``aten.select``;
  full slices, ``alias``/``detach`` and clones of contiguous tensors are dropped (a functional graph
  has no aliasing; a clone that makes a permuted tensor contiguous for a ``view`` stays);
- batchnorm (``_native_batch_norm_legit_no_training`` / ``_functional`` / ``.no_stats`` + ``getitem 0``)
  becomes the one-output ``aten.batch_norm.default`` (``training`` says which used batch statistics);
- ``conv2d.padding`` ('valid'/'same' with symmetric padding) and 2-D ``convolution`` become
  ``aten.conv2d.default`` with explicit padding;
- assertion ops (``_assert_tensor_metadata``, ``_assert_scalar``, ...) are dropped: they held at capture.

Parameters, buffers and lifted constants become ``get_attr`` nodes on the GraphModule under their
module paths (``layer1.0.conv1.weight``); every node keeps torch.export's ``val`` (a FakeTensor: shape and
dtype, symbolic batch size with ``dynamic_batch``), ``nn_module_stack`` and ``stack_trace``, and gets a
readable name from its module path.

**Emitting** re-exports the (rewritten) GraphModule: the same ``torch.export.export``, so the
converters receive a standard ExportedProgram.
"""
from __future__ import annotations

import contextlib
import copy
import io
import linecache
import operator
import os
import sys
import traceback
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from . import ir
from . import ops as _ops  # noqa: F401  (registers qlfx's custom ops before any capture)
from .errors import TraceError, UsageError

aten = torch.ops.aten

BATCH = "batch"
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.tensor_split.sections,
           aten.tensor_split.indices, aten.unsafe_split.Tensor, aten.unsafe_split_with_sizes.default,
           aten.chunk.default, aten.unsafe_chunk.default}
_NO_OPS = {aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.default,
            aten._assert_async.msg, aten.sym_constrain_range.default, aten.sym_constrain_range_for_size.default,
            aten._functional_assert_async.msg, aten._functional_sym_constrain_range.default,
            aten._functional_sym_constrain_range_for_size.default}
_EVAL_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                  aten.feature_alpha_dropout.default}
INT64_MAX = sys.maxsize
# export's batchnorm forms -> whether each computes with batch statistics (training)
_BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default: False,
                aten._native_batch_norm_legit_functional.default: True,
                aten._native_batch_norm_legit.no_stats: True}


# -------------------------------------------------------------------------------------------- capture
def check_example_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    if example_inputs is None:
        raise UsageError(
            "example_inputs is required: qlfx captures with concrete shapes. "
            "Pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs:
        raise UsageError("example_inputs is empty: give one tensor per input of the model's forward")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"example input {i} is a {type(t).__name__}; qlfx needs torch.Tensor inputs")
    return example_inputs


def dynamic_shapes_for(example_inputs: Sequence[torch.Tensor], dynamic_batch: bool):
    """torch.export's ``dynamic_shapes``: dim 0 of every input is the symbolic batch size, or None."""
    if not dynamic_batch:
        return None
    batch = torch.export.Dim(BATCH, min=1)
    return tuple({0: batch} if t.dim() > 0 else None for t in example_inputs)


def capture_inputs(example_inputs: Sequence[torch.Tensor], dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    """The inputs to export with. With a symbolic batch, a batch of 1 is repeated to 2: torch.export
    specialises a size-1 dimension (0/1 specialisation), and a ConvNet's graph is the same for any batch."""
    if dynamic_batch and any(t.dim() == 0 for t in example_inputs):
        raise UsageError("dynamic_batch needs every example input to have a batch dimension (dim 0)")
    if dynamic_batch and any(t.shape[0] == 1 for t in example_inputs):
        return tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in example_inputs)
    return tuple(example_inputs)


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor], dynamic_batch: bool = False) -> fx.GraphModule:
    """Capture ``model`` into the qlfx IR (see the module docstring). The model is deep-copied first,
    so the user's model is never touched, even by a forward that writes to its own attributes."""
    example_inputs = check_example_inputs(example_inputs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"qlfx captures torch.nn.Module objects; got {type(model).__name__}")
    model = copy.deepcopy(model)
    inputs = capture_inputs(example_inputs, dynamic_batch)
    printed = io.StringIO()
    try:
        # torch.export prints the partial graph of a failed capture to stderr; the TraceError below
        # says what matters, so that dump is dropped (anything else it printed is passed on).
        with contextlib.redirect_stderr(printed):
            ep = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes_for(inputs, dynamic_batch),
                                     strict=False)
            ep = ep.run_decompositions({})
    except Exception as err:  # torch.export raises many kinds; all mean "not capturable"
        partial = str(getattr(err, "partial_fx_graph", "") or "")
        sys.stderr.write(printed.getvalue().replace(partial, "") if partial else printed.getvalue())
        raise capture_error(model, err, dynamic_batch) from err
    sys.stderr.write(printed.getvalue())
    gm = unlift(ep)
    canonicalize(gm)
    name_nodes(gm)
    for node in gm.graph.nodes:
        node.meta.setdefault(ir.ORIGIN, "trace")
    gm.meta["qlfx_example_inputs"] = tuple(t.detach().clone() for t in example_inputs)
    gm.meta["qlfx_dynamic_batch"] = bool(dynamic_batch)
    return gm


def unlift(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """The ExportedProgram as a GraphModule: parameters, buffers and constants become ``get_attr`` nodes
    (stored as buffers under their module paths), user inputs stay placeholders, user outputs the output."""
    graph = copy.deepcopy(ep.graph)
    signature = ep.graph_signature
    tensors: dict[str, torch.Tensor] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for spec, node in zip(signature.input_specs, placeholders):
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise TraceError(f"the model takes a {spec.kind.name.lower()} input ({spec.target}); qlfx compiles "
                             f"functions of tensors with tensor weights only")
        value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        if not isinstance(value, torch.Tensor):
            raise TraceError(f"{spec.target} is a {type(value).__name__}, not a tensor; qlfx cannot store it")
        tensors[spec.target] = value.detach()
        with graph.inserting_before(node):
            read = graph.create_node("get_attr", spec.target)
        read.meta.update(node.meta)
        node.replace_all_uses_with(read)
        graph.erase_node(node)
    output = graph.output_node()
    results = list(output.args[0])
    user = [r for r, spec in zip(results, signature.output_specs)
            if spec.kind in (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT)]
    # Buffer writes (a forward that updates its own state) are dropped: the compiled graph is a pure
    # function of its inputs; the values the forward computes from the new state stay in the graph.
    output.args = (tuple(user),)
    # The generated forward takes the model's positional inputs and returns the model's output
    # structure (a tensor, a tuple, a dict), as the model itself does.
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, ep.call_spec.in_spec, ep.call_spec.out_spec))
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    for target, value in tensors.items():
        ir.set_tensor(gm, target, value)
    gm.graph = graph
    graph.eliminate_dead_code()
    gm.recompile()
    gm.eval()  # a compiled graph is for inference (and compiling it again must be accepted)
    return gm


# ------------------------------------------------------------------------------------ canonical forms
def canonicalize(gm: fx.GraphModule) -> None:
    """Rewrite the captured graph into qlfx's canonical ATen forms (module docstring), in place."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t in _SPLITS:
            _split_to_slices(gm, node)
        elif t is aten.unbind.int:
            _unbind_to_selects(gm, node)
        elif t in _BATCH_NORMS:
            _batch_norm_to_one_output(gm, node)
        elif (t in _NO_OPS or (t in _EVAL_DROPOUTS and not ir.op_args(node).get("train", False))
              or (t is aten.clone.default and _is_plain_copy(node))):
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
        elif t in _ASSERTS:
            g.erase_node(node)
        elif t is aten.slice.Tensor:
            _clamp_slice(node)
        elif t in (aten.conv2d.padding, aten.convolution.default):
            _explicit_conv2d(node)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()


def _is_plain_copy(clone: fx.Node) -> bool:
    """A clone that changes nothing but the buffer: its input is already contiguous. (A clone of a
    permuted tensor -- ``.contiguous()`` before a ``view`` -- changes the layout the view needs.)"""
    value = ir.val(clone.args[0])
    memory_format = ir.op_args(clone).get("memory_format")
    return (isinstance(value, torch.Tensor) and memory_format in (None, torch.contiguous_format)
            and value.is_contiguous())


def _split_to_slices(gm: fx.GraphModule, node: fx.Node) -> None:
    pieces = node.meta.get("val")
    args = ir.op_args(node)
    dim = args.get("dim", 0)
    x = node.args[0]
    rank = len(ir.shape(x))
    dim = dim % rank
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += piece.shape[dim]
    for user in list(node.users):
        if user.target is not operator.getitem:
            return  # the pieces are used as a list: keep the op (emitters handle it)
    for user in list(node.users):
        i = user.args[1]
        start, stop = starts[i], starts[i] + pieces[i].shape[dim]
        with gm.graph.inserting_before(user):
            piece = gm.graph.call_function(aten.slice.Tensor, (x, dim, start, stop))
        piece.meta.update(user.meta)
        user.replace_all_uses_with(piece)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _unbind_to_selects(gm: fx.GraphModule, node: fx.Node) -> None:
    if any(u.target is not operator.getitem for u in node.users):
        return
    dim = ir.op_args(node).get("dim", 0)
    for user in list(node.users):
        with gm.graph.inserting_before(user):
            piece = gm.graph.call_function(aten.select.int, (node.args[0], dim, user.args[1]))
        piece.meta.update(user.meta)
        user.replace_all_uses_with(piece)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _batch_norm_to_one_output(gm: fx.GraphModule, node: fx.Node) -> None:
    users = list(node.users)
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
        return  # the saved statistics are used: keep the op
    a = ir.op_args(node)
    training = _BATCH_NORMS[node.target]
    with gm.graph.inserting_before(node):
        bn = gm.graph.call_function(aten.batch_norm.default, (
            a["input"], a["weight"], a["bias"], a.get("running_mean"), a.get("running_var"), training,
            a["momentum"], a["eps"], False))
    bn.meta.update(node.meta)
    if users:
        bn.meta["val"] = users[0].meta.get("val")
    for u in users:
        u.replace_all_uses_with(bn)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)


def _clamp_slice(node: fx.Node) -> None:
    """slice bounds as plain indices within the axis: 0 <= start <= end <= size, where the size is known."""
    a = ir.op_args(node)
    shape = ir.shape(node.args[0])
    dim = a["dim"] % len(shape)
    size = shape[dim]
    start, end, step = a["start"], a["end"], a["step"]
    if start in (0, None) and (end is None or isinstance(end, int) and end >= INT64_MAX) and step == 1:
        node.replace_all_uses_with(node.args[0])  # the whole axis, even where its size is symbolic
        node.graph.erase_node(node)
        return
    if not all(isinstance(v, int) for v in (size, step)) or not isinstance(start, (int, type(None))) \
            or not isinstance(end, (int, type(None))):
        return
    start, end, _ = slice(start, end, step).indices(size)
    end = max(start, end)
    if start == 0 and end == size and step == 1:
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)
        return
    node.args, node.kwargs = (node.args[0], dim, start, end, step) if step != 1 else (node.args[0], dim, start, end), {}


def _explicit_conv2d(node: fx.Node) -> None:
    a = ir.op_args(node)
    w = ir.shape(a["weight"])
    if w is None or len(w) != 4:
        return
    if node.target is aten.convolution.default:
        if a["transposed"] or len(a["padding"]) != 2:
            return
        padding = list(a["padding"])
    else:
        if a["padding"] == "valid":
            padding = [0, 0]
        else:  # "same": symmetric only when dilation*(k-1) is even on both axes
            totals = [d * (k - 1) for d, k in zip(ir.pair(a["dilation"]), w[2:])]
            if any(t % 2 for t in totals) or any(s != 1 for s in ir.pair(a["stride"])):
                return
            padding = [t // 2 for t in totals]
    node.target = aten.conv2d.default
    node.args = (a["input"], a["weight"], a["bias"], list(ir.pair(a["stride"])), padding,
                 list(ir.pair(a["dilation"])), a["groups"])
    node.kwargs = {}


def name_nodes(gm: fx.GraphModule) -> None:
    """Readable names from module paths: the one op of ``layer1.0.conv1`` is ``layer1_0_conv1``; a module
    with several ops names each ``layer2_0_act3_<op>``. Ops outside any submodule keep export's names."""
    per_module: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            path = ir.module_path(node)
            if path:
                per_module.setdefault(path, []).append(node)
    for path, nodes in per_module.items():
        base = path.replace(".", "_")
        for node in nodes:
            op = ir.op_name(node)
            node.name = ""  # release the old name before taking the new one
            node.name = gm.graph._graph_namespace.create_name(base if len(nodes) == 1 else f"{base}_{op}", None)
    gm.recompile()


# ------------------------------------------------------------------------------------------ messages
_ADVICE = [
    ("data-dependent", "the forward takes a Python decision on a tensor's VALUES (an `if` on a tensor, "
                       "`.item()`, a shape that depends on data). Write it with tensor ops (torch.where, "
                       "clamp) or torch.cond, or move it out of forward"),
    ("GuardOnDataDependent", "the forward takes a Python decision on a tensor's VALUES; write it with "
                             "torch.where / torch.cond, or move it out of forward"),
    ("Constraints violated", "the model specialises the batch size (e.g. reshapes with a fixed batch); "
                             "capture without dynamic_batch, or write the batch as x.shape[0]"),
    ("specialized", "the model specialises the batch size; capture without dynamic_batch, or write the "
                    "batch as x.shape[0]"),
]


def capture_error(model: nn.Module, err: Exception, dynamic_batch: bool) -> TraceError:
    """A TraceError that says what torch.export said, where in the model (module path and source line),
    and what to do."""
    said = " ".join(str(err).strip().split("\n")[0].split()) or type(err).__name__
    if len(said) > 300:
        said = said[:297] + "..."
    where = _failure_site(model, err)
    advice = next((a for key, a in _ADVICE if key in str(err) or key in type(err).__name__), None)
    if advice is None:
        advice = ("make that line traceable by torch.export (tensor ops only, no data-dependent Python "
                  "control flow), or register the code as one op with torch.library.custom_op and a fake "
                  "kernel, which qlfx then keeps as one node")
    return TraceError(f"torch.export could not capture the model: {type(err).__name__}: {said}\n"
                      f"  where: {where}\n  What to do: {advice}.")


def _failure_site(model: nn.Module, err: Exception) -> str:
    """'module layer2.0.act3 (hardball), model.py:357: `return x * ...`' from the traceback: the innermost
    frame outside torch whose ``self`` is a module of the model, or the innermost user frame."""
    names = {id(m): name for name, m in model.named_modules()}
    torch_dir = os.path.dirname(torch.__file__)
    frames = traceback.extract_tb(err.__traceback__)
    tb = err.__traceback__
    frame_objects = []
    while tb is not None:
        frame_objects.append(tb.tb_frame)
        tb = tb.tb_next
    site, module = None, None
    for summary, frame in zip(reversed(frames), reversed(frame_objects)):
        if summary.filename.startswith(torch_dir) or "/site-packages/torch" in summary.filename:
            continue
        if site is None:
            site = summary
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            module = f"module '{names[id(owner)] or '<root>'}' ({type(owner).__name__})"
            if site is None:
                site = summary
            break
    if site is None:
        return f"inside torch, in the forward of {type(model).__name__} (no frame of the model's code)"
    line = (site.line or linecache.getline(site.filename, site.lineno) or "").strip()
    place = f"{os.path.basename(site.filename)}:{site.lineno}" + (f": `{line}`" if line else "")
    return f"{module}, {place}" if module else place


# ----------------------------------------------------------------------------------- back to export
def to_exported_program(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                        dynamic_batch: bool | None = None) -> torch.export.ExportedProgram:
    """Re-export the IR (after passes) as an ExportedProgram for the converters. ``dynamic_batch``
    defaults to how the graph was captured."""
    if dynamic_batch is None:
        dynamic_batch = bool(gm.meta.get("qlfx_dynamic_batch", False))
    inputs = capture_inputs(check_example_inputs(example_inputs), dynamic_batch)
    # No decomposition here: each converter runs its own table on what it receives.
    return torch.export.export(gm, inputs, dynamic_shapes=dynamic_shapes_for(inputs, dynamic_batch), strict=False)

