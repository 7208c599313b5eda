"""``qlfx.compile``: model -> capture (torch.export) -> [pass -> verify]* -> Compiled."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from . import capture as capture_module
from .defaults import DEFAULT_PIPELINE
from .errors import QlfxError, UsageError
from .pass_manager import Pass, PassContext, PassManager, Report, parse_pipeline
from .verify import Tolerance

__all__ = ["compile", "tune", "Compiled", "DEFAULT_PIPELINE", "prepare", "Session"]


class Compiled:
    """The result of :func:`compile`: callable like the model, with the rewritten graph and the report."""

    def __init__(self, graph_module: fx.GraphModule, report: Report, passes: list[Pass], context: PassContext):
        self.graph_module = graph_module
        self.report = report
        self.passes = passes
        self.context = context

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.graph_module(*args, **kwargs)

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.context.example_inputs

    @property
    def dynamic_batch(self) -> bool:
        return self.context.dynamic_batch

    def to_exported_program(self) -> torch.export.ExportedProgram:
        """The rewritten graph as a torch.export ExportedProgram (what the emitters convert)."""
        return capture_module.to_exported_program(self.graph_module, self.example_inputs)

    def to_onnx(self, path, **kwargs):
        """Write the graph as an ONNX model (see :mod:`qlfx.emit.onnx`)."""
        from .emit.onnx import export_onnx

        return export_onnx(self.graph_module, self.example_inputs, path, **kwargs)

    def to_tvm(self, target="llvm", **kwargs):
        """Build the graph as a TVM module (see :mod:`qlfx.emit.tvm`)."""
        from .emit.tvm import build_tvm

        return build_tvm(self.graph_module, self.example_inputs, target=target, **kwargs)

    def tune(self, trials: int = 16, database=None, target="llvm", rpc_tracker: str | None = None,
             rpc_key: str | None = None, tune_other_ops: bool = False, progress: bool = True, **kwargs):
        """A tuned TVM module: MetaSchedule ``trials`` per fused kernel (and per other task with
        ``tune_other_ops``) against the persistent database folder ``database``. With ``rpc_tracker``
        ("HOST:PORT") and ``rpc_key`` every trial is measured on the servers of that TVM RPC tracker
        (see :mod:`qlfx.kernels.rpc`); the tracker is checked first (unreachable, or no server with
        the key: a UsageError saying what to start)."""
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise UsageError(f"trials must be an integer >= 1, got {trials!r}")
        if rpc_key is not None and rpc_tracker is None:
            raise UsageError("rpc_key names servers of an RPC tracker: give rpc_tracker='HOST:PORT' too")
        rpc = None
        if rpc_tracker is not None:
            from .kernels.rpc import RPCSettings

            rpc = RPCSettings.parse(rpc_tracker, rpc_key)
            rpc.check()
        return self.to_tvm(target, tune_trials=trials, tuning_db=database, tune_other_ops=tune_other_ops,
                           progress=progress, rpc=rpc, **kwargs)

    def __repr__(self) -> str:
        return f"Compiled(passes={self.passes!r})"


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise UsageError(f"qlfx.compile takes a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise UsageError(
            "the model is in training mode: batchnorm would use batch statistics and dropout would be random, "
            "so no rewrite could be checked. Call model.eval() before qlfx.compile (your model is unchanged)."
        )
    bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise UsageError(f"the model has NaN or Inf in {shown}; fix or re-load those weights before compiling")


def _check_runs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> None:
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as err:
        described = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in example_inputs)
        raise UsageError(
            f"the model fails on the example inputs ({described}): {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}\n"
            f"  Give example inputs of the shape and dtype the model expects (CLI: --input-shape N,C,H,W)."
        ) from err


def load_calibration(calibration, example_inputs: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Calibration data -> list of input tuples. Accepts a tensor/array batch (split along dim 0 into
    batches shaped like the example input), a list of tensors, or a list of input tuples."""
    if calibration is None:
        return []
    if isinstance(calibration, np.ndarray):
        calibration = torch.from_numpy(calibration)
    example = example_inputs[0]
    if isinstance(calibration, torch.Tensor):
        if calibration.shape[1:] != example.shape[1:]:
            raise UsageError(
                f"calibration data has shape {tuple(calibration.shape)}; each sample must be "
                f"{tuple(example.shape[1:])} like the example input"
            )
        calibration = calibration.to(example.dtype)
        step = max(1, example.shape[0])
        return [(calibration[i:i + step],) for i in range(0, calibration.shape[0], step)]
    sets = []
    for item in calibration:
        sets.append(tuple(item) if isinstance(item, (tuple, list)) else (item,))
    return sets


def load_labels(labels, sets: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor | None]:
    """Labels -> one integer tensor per calibration set (negative entries: unlabelled samples).
    Accepts a tensor/array with one label per calibration sample (split like the calibration batch),
    or a list with one entry (tensor or None) per calibration set."""
    if labels is None:
        return []
    if not sets:
        raise UsageError("labels were given without calibration data: pass calibration=inputs with labels=targets")
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if isinstance(labels, torch.Tensor):
        sizes = [s[0].shape[0] for s in sets]
        if labels.dim() == 0 or labels.shape[0] != sum(sizes):
            raise UsageError(f"labels have shape {tuple(labels.shape)} but the calibration data holds {sum(sizes)} "
                             f"samples: give one label per calibration sample (negative: unlabelled)")
        parts = list(labels.split(sizes))
    else:
        parts = [None if y is None else torch.as_tensor(y) for y in labels]
        if len(parts) != len(sets):
            raise UsageError(f"{len(parts)} label entries for {len(sets)} calibration sets: give one per set")
    for y in parts:
        if y is not None and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
            raise UsageError(f"labels must be integer class indices, got dtype {y.dtype}")
    return [None if y is None else y.long() for y in parts]


def fit_to_batch(sets: list[tuple[torch.Tensor, ...]], labels: list[torch.Tensor | None], batch: int
                 ) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor | None]]:
    """Calibration sets of exactly ``batch`` samples, for a graph specialised to that batch size (a
    flatten is ``view(x, [batch, -1])``): every set is cut into chunks of ``batch``; a short last chunk is
    padded with repeats of its own samples, labelled -1 (unlabelled), so every check and accuracy count
    sees each real sample once."""
    out_sets, out_labels = [], []
    for i, inputs in enumerate(sets):
        target = labels[i] if i < len(labels) else None
        n = inputs[0].shape[0]
        for start in range(0, n, batch):
            take = min(batch, n - start)
            index = torch.arange(start, start + take)
            if take < batch:  # repeat the chunk's own samples up to a full batch
                index = torch.cat([index, index[torch.arange(batch - take) % take]])
            out_sets.append(tuple(t[index] for t in inputs))
            if labels:
                if target is None:
                    out_labels.append(None)
                else:
                    chunk = target[index].clone()
                    chunk[take:] = -1
                    out_labels.append(chunk)
    return out_sets, out_labels


@dataclass
class Session:
    """What a compile starts from: the model's private copy, the pipeline, the captured graph, the context."""

    model: nn.Module
    pipeline: list[Pass]
    graph: fx.GraphModule
    context: PassContext
    capture_seconds: float

    def check_trace(self, manager: PassManager) -> Report:
        """The manager's check of the captured graph against the model. The model runs here for the
        first time on real tensors (capture ran it on fake ones, which let some mistakes through, such
        as float64 inputs to float32 weights): its own failure is a usage error about the inputs."""
        try:
            return manager.check_trace(self.model, self.graph, self.context, self.capture_seconds)
        except QlfxError:
            raise
        except Exception:
            _check_runs(self.model, self.context.example_inputs)
            raise


def prepare(model, passes, example_inputs, calibration=None, labels=None, config=None,
            dynamic_batch: bool = False) -> Session:
    """Check every input (bad ones fail before any work), copy the model, capture it: what
    :func:`compile` and :func:`qlfx.debug.bisect` both start from."""
    example_inputs = capture_module.check_example_inputs(example_inputs)
    _check_model(model)
    pipeline = parse_pipeline(passes)
    sets = load_calibration(calibration, example_inputs)
    label_sets = load_labels(labels, sets)
    if not dynamic_batch:  # the graph will be specialised to the example's batch size
        sets, label_sets = fit_to_batch(sets, label_sets, example_inputs[0].shape[0])
    model = copy.deepcopy(model)  # the checks run the forward, which may write to its own module
    start = time.perf_counter()
    try:
        gm = capture_module.capture(model, example_inputs, dynamic_batch=dynamic_batch)
    except UsageError:
        _check_runs(model, example_inputs)  # wrong inputs are the likelier cause: say so first
        raise
    seconds = time.perf_counter() - start
    ctx = PassContext(example_inputs=tuple(example_inputs), calibration=sets, labels=label_sets,
                      config=dict(config or {}), dynamic_batch=bool(dynamic_batch))
    return Session(model, pipeline, gm, ctx, seconds)


def compile(
    model: nn.Module,
    passes: str | Iterable[str | Pass] | None = DEFAULT_PIPELINE,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    calibration: Any = None,
    labels: Any = None,
    verify: bool = True,
    tolerance: Tolerance | float | None = None,
    instruments: Sequence[Any] = (),
    config: dict[str, Any] | None = None,
    dynamic_batch: bool = False,
    verify_inputs: int = 2,
    seed: int = 0,
    auto_prereqs: bool = False,
) -> Compiled:
    """Capture ``model`` with torch.export and run ``passes`` on it, checking equivalence after every pass.

    ``tolerance``: a float (relative to max|reference|, see :mod:`qlfx.verify`) or a Tolerance.
    ``calibration``: inputs the passes measure statistics on and every check runs on; ``labels``: their
    class indices (one per sample, negative for unlabelled ones), for accuracy budgets of lossy passes
    such as ``slice<accuracy_drop=0.5>``.
    ``dynamic_batch``: capture with a symbolic batch size (dim 0 of every input), so the graph and the
    emitted ONNX / TVM modules run at any batch size; the checks then also run at another batch size.
    ``auto_prereqs``: before a pass whose requirement does not hold (``fuse-product`` needs ``bn-folded``,
    see :mod:`qlfx.requirements`), run the pass that establishes it (``fold-bn``), once; without it the
    report says which pass each skipped site needed. ``Compiled.passes`` lists what ran.
    The user's model is never modified: capture works on a deep copy.
    """
    session = prepare(model, passes, example_inputs, calibration, labels, config, dynamic_batch)
    if isinstance(tolerance, (int, float)):
        tolerance = Tolerance(rel=float(tolerance))
    manager = PassManager(session.pipeline, instruments=instruments, verify=verify, tolerance=tolerance,
                          verify_inputs=verify_inputs, seed=seed, auto_prereqs=auto_prereqs)
    report = session.check_trace(manager)
    gm, report = manager.run(session.graph, session.context, report)
    return Compiled(gm, report, manager.executed, session.context)


def tune(model: nn.Module, example_inputs=None, passes=DEFAULT_PIPELINE, trials: int = 16, database=None,
         target="llvm", rpc_tracker: str | None = None, rpc_key: str | None = None, tune_other_ops: bool = False,
         progress: bool = True, **compile_options):
    """:func:`compile` then :meth:`Compiled.tune`: the model's tuned TVM module (see there for the
    tuning and RPC arguments; ``compile_options`` go to :func:`compile`)."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:  # before any work
        raise UsageError(f"trials must be an integer >= 1, got {trials!r}")
    if rpc_key is not None and rpc_tracker is None:
        raise UsageError("rpc_key names servers of an RPC tracker: give rpc_tracker='HOST:PORT' too")
    if rpc_tracker is not None:  # an unreachable tracker fails before the compile, not after it
        from .kernels.rpc import RPCSettings

        RPCSettings.parse(rpc_tracker, rpc_key).check()
    compiled = compile(model, passes=passes, example_inputs=example_inputs, **compile_options)
    return compiled.tune(trials=trials, database=database, target=target, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                         tune_other_ops=tune_other_ops, progress=progress)
