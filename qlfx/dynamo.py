"""``torch.compile(model, backend="qlfx")``: a TorchDynamo backend running qlfx on every captured graph.

Dynamo hands the backend an ``fx.GraphModule`` of torch-level ops and the real tensors of one call.
With dynamo's inlining of nn.Modules (the default) the weights, batchnorm statistics and other module
state are graph *inputs* too, marked ``_dynamo_static_input_type``; qlfx's passes need them as stored
tensors (fold-bn folds stored statistics), so they are frozen into a wrapper module as its parameters
and buffers, and only the other inputs stay inputs. That wrapper goes through :func:`qlfx.compile`
with the default pipeline and verification on, and the backend returns a callable that runs the best
artifact built from it:

* ``engine="onnx"`` (default): onnxruntime on qlfx's ONNX (CPU);
* ``engine="tvm"``: the TVM module (``trials`` > 0 tunes it first against ``tuning_db``).

Anything qlfx cannot take runs eagerly (dynamo's own graph), with one warning per reason: a graph with
symbolic sizes (dynamic shapes: dynamo marks sizes dynamic when it recompiles after a shape change;
``torch.compile(..., dynamic=False)`` keeps each shape its own static graph), a graph in training
mode or taking inputs that require grad (qlfx compiles inference graphs), a capture or verification
failure, an op no emitter has. Weights are frozen at compile time: after changing them, call
``torch._dynamo.reset()`` (or compile again).

Options, ``torch.compile(m, backend="qlfx", options={...})``: ``passes`` (a pipeline string),
``engine`` ("onnx" | "tvm"), ``target`` (TVM target, default "llvm"), ``trials`` (TVM tuning trials
per kernel, default 0), ``tuning_db`` (folder), ``tolerance`` (relative, for the checks).
"""
from __future__ import annotations

import inspect
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .defaults import DEFAULT_PIPELINE
from .errors import UsageError

BACKEND_NAME = "qlfx"
OPTIONS = {"passes": DEFAULT_PIPELINE, "engine": "onnx", "target": "llvm", "trials": 0, "tuning_db": None,
           "tolerance": None}
ENGINES = ("onnx", "tvm")
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"qlfx backend: running a graph eagerly: {reason}", stacklevel=3)


def _options(options: dict | None) -> dict:
    given = dict(options or {})
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise UsageError(f"unknown qlfx backend option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    merged = {**OPTIONS, **given}
    if merged["engine"] not in ENGINES:
        raise UsageError(f"qlfx backend engine must be one of {', '.join(ENGINES)}, not {merged['engine']!r}")
    if isinstance(merged["trials"], bool) or not isinstance(merged["trials"], int) or merged["trials"] < 0:
        raise UsageError(f"qlfx backend option trials must be an integer >= 0, not {merged['trials']!r}")
    return merged


def _is_static(t: Any) -> bool:
    """Module state dynamo lifted to a graph input (parameter, buffer)."""
    return isinstance(t, nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None


class FrozenGraph(nn.Module):
    """Dynamo's graph with its module-state inputs stored as this module's parameters / buffers: called
    with the remaining inputs only (what qlfx captures)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], static: list[int]):
        super().__init__()
        self.graph_module = gm
        self.arity = len(example_inputs)
        self.static = list(static)
        for k, i in enumerate(self.static):
            t = example_inputs[i].detach()
            if isinstance(example_inputs[i], nn.Parameter):
                self.register_parameter(f"state_{k}", nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(f"state_{k}", t)

    def forward(self, *inputs):
        args, rest = [], iter(inputs)
        stored = {i: getattr(self, f"state_{k}") for k, i in enumerate(self.static)}
        for i in range(self.arity):
            args.append(stored[i] if i in stored else next(rest))
        return self.graph_module(*args)


def _why_not(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    """Why qlfx cannot take this graph, or None."""
    if any(not isinstance(t, torch.Tensor) for t in example_inputs):
        # Not even tried: capturing dynamo's dynamic graph with torch.export from inside the backend
        # failed in torch 2.14 (a NameError in export, then dynamo rejected the guards of its own frame).
        return ("the graph has symbolic sizes (dynamic shapes; dynamo marks sizes dynamic when it recompiles "
                "after a shape change). Use torch.compile(..., dynamic=False) to compile each shape")
    if any(isinstance(t, torch._subclasses.FakeTensor) for t in example_inputs):
        return "the backend was given fake tensors (no real inputs to check the rewrites on)"
    if any(not _is_static(t) and t.requires_grad for t in example_inputs):
        return "an input requires grad (qlfx compiles inference graphs; call the model under torch.no_grad())"
    if any(t.device.type != "cpu" for t in example_inputs):
        return "inputs are not on the CPU (this backend runs onnxruntime / TVM on the CPU)"
    for node in gm.graph.nodes:
        if node.op == "call_function" and _training_argument(node):
            return f"the graph runs in training mode ({node.format_node()}); call model.eval()"
    if not any(not _is_static(t) for t in example_inputs):
        return "the graph takes no inputs besides module state"
    return None


def _training_argument(node: fx.Node) -> bool:
    """Whether a call passes ``training=True`` (batch_norm, dropout, ...), positionally, by keyword or by
    default."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or not bindable: not such a call
        return False
    bound.apply_defaults()
    return bound.arguments.get("training") is True


def _output_structure(value: Any) -> tuple[str, int] | None:
    """("tensor", 1) / ("tuple" | "list", n) when every output is a tensor; None otherwise."""
    if isinstance(value, torch.Tensor):
        return "tensor", 1
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value).__name__, len(value)
    return None


def _onnx_runner(compiled) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qlfx_dynamo_") as folder:
        path = compiled.to_onnx(Path(folder) / "graph.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # read into memory here
    names = [i.name for i in session.get_inputs()]

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, inputs)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    return run


def _tvm_runner(compiled, settings: dict) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    if settings["trials"] > 0:
        module = compiled.tune(trials=settings["trials"], database=settings["tuning_db"], target=settings["target"],
                               progress=False)
    else:
        module = compiled.to_tvm(settings["target"], tuning_db=settings["tuning_db"], progress=False)
    return lambda inputs: [torch.from_numpy(np.asarray(o)) for o in module.run(*[t.detach().cpu().numpy()
                                                                                  for t in inputs])]


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], settings: dict) -> Callable:
    """qlfx.compile of dynamo's graph and the artifact's runner, as a callable taking dynamo's inputs.
    Raises whatever qlfx raises (the backend turns it into an eager fallback)."""
    from .api import compile as qlfx_compile

    static = [i for i, t in enumerate(example_inputs) if _is_static(t)]
    user = [i for i in range(len(example_inputs)) if i not in static]
    with torch.no_grad():
        reference = gm(*example_inputs)
    structure = _output_structure(reference)
    if structure is None:
        raise UsageError("the graph returns something other than tensors")
    frozen = FrozenGraph(gm, example_inputs, static).eval()
    compiled = qlfx_compile(frozen, passes=settings["passes"], example_inputs=[example_inputs[i].detach() for i in user],
                            tolerance=settings["tolerance"], verify=True)
    engine = _onnx_runner(compiled) if settings["engine"] == "onnx" else _tvm_runner(compiled, settings)
    kind, count = structure
    shapes = [tuple(example_inputs[i].shape) for i in user]
    dtypes = [example_inputs[i].dtype for i in user]

    def run(*args):
        inputs = [args[i] for i in user]
        if [tuple(t.shape) for t in inputs] != shapes or [t.dtype for t in inputs] != dtypes:
            return gm(*args)  # dynamo guards shapes; this is only a safety net
        outs = engine(inputs)
        if len(outs) != count:
            raise RuntimeError(f"qlfx backend: the artifact returned {len(outs)} outputs, the graph {count}")
        if kind == "tensor":
            return outs[0]
        return tuple(outs) if kind == "tuple" else list(outs)

    run.qlfx_compiled = compiled  # for inspection: the report, the rewritten graph
    run.qlfx_engine = settings["engine"]
    return run


def qlfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **_: Any) -> Callable:
    """The dynamo backend (``torch.compile(m, backend="qlfx", options={...})``); see the module doc."""
    settings = _options(options)  # a wrong option is the caller's mistake: raised, not a fallback
    reason = _why_not(gm, example_inputs)
    if reason is None:
        try:
            return compile_graph(gm, example_inputs, settings)
        except Exception as error:  # noqa: BLE001 -- whatever qlfx cannot take runs eagerly, and says why
            text = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {text[0] if text else ''}"
    _warn_once(reason)
    return gm.forward


def register() -> None:
    """Register ``backend="qlfx"`` with dynamo (idempotent; the ``torch_dynamo_backends`` entry point in
    pyproject.toml does the same for an installed qlfx without an import)."""
    from torch._dynamo import register_backend
    from torch._dynamo.backends import registry

    if registry._BACKENDS.get(BACKEND_NAME) is not None:
        # dynamo found the entry point: its lookup registers what the entry point loads (this module,
        # possibly being imported by that very lookup); registering here too would be a duplicate
        return
    try:
        register_backend(compiler_fn=qlfx_backend, name=BACKEND_NAME)
    except AssertionError:  # "duplicate name": registered already by an earlier import
        pass


register()
