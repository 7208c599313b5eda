"""Pass-by-pass debugging: bisection, stage diffs, artifact comparison, per-pass reports.

After LLVM ``opt`` (``-opt-bisect-limit``, ``-print-changed``) and Polygraphy (``debug reduce``,
``run --compare`` with the smallest passing tolerance):

- :func:`bisect` finds the first pass, and inside it the first rewrite site, that breaks the pass's
  own contract — judged exactly as the pass manager judges it (each pass against the graph before it,
  with :meth:`PassManager._tolerance_for`: ``exact`` at tolerance 0, ``equivalent`` at the dtype
  tolerance, ``lossy`` within its budgets), so ``--bisect`` and ``run`` always agree on the pass. The
  pass is found by the pass manager itself; then a binary search over ``r`` = how many rewrites the
  culprit may apply (``PassContext.rewrite_limit``; passes call ``ctx.allow_rewrite()`` before each
  site) finds the first bad site. Assumes, as LLVM does, that once broken a prefix of rewrites stays
  broken.
- :func:`diff_stages` compares two dumped stages (``--dump-dir`` files) node by node.
- :func:`compare_artifacts` runs the model and ``.onnx`` / TVM ``.so`` / ``.tar`` artifacts (and the qlfx
  graph of a pipeline) on the same inputs (seeded random, or files: :mod:`qlfx.inputs`): per artifact and
  output the errors, the smallest tolerance that would pass, the correlation and a verdict that tells a
  tolerance question from another model; the inputs are paired (names, count, shapes) first. With
  ``mark_all`` every intermediate value an ONNX artifact keeps is marked as an output, run in
  onnxruntime and compared with the model value it came from; the first diverging one is named.
- :class:`ReportCollector` (an instrument) + :func:`write_report`: HTML or Markdown, per pass the
  contract, changed nodes, errors, params, MACs, time, and the picture (inline SVG when Graphviz is there).
"""
from __future__ import annotations

import copy
import difflib
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx

from . import capture, ir
from .errors import EquivalenceError, PassError, UsageError
from .graphviz import dot_available, render_svg, to_dot
from .instruments import Instrument, graph_code, parse_graph_code, touched_nodes
from .io import atomic_write, ensure_writable_dir
from .verify import (ERROR_COLUMNS, Tolerance, _merge, error_cells, compare_tensor, first_divergence, random_inputs,
                     run_outputs)

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------- MACs
_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
_MATMULS = (aten.mm, aten.bmm, aten.matmul)


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of the conv / linear / matmul / branch-product nodes, from their vals.

    conv: ``numel(out) * Cin/groups * prod(kernel)`` (a transposed conv: ``numel(in) * ...``);
    linear: ``numel(out) * in_features``; (add)mm, bmm, matmul: ``numel(out) * k``; branch_product: its
    two convs. Everything else (elementwise, pooling, norms) is ignored: it is memory-bound and small
    next to these. A symbolic batch size counts as the example inputs' batch.
    """
    examples = gm.meta.get("qlfx_example_inputs") or ()
    batch = int(examples[0].shape[0]) if examples and examples[0].dim() > 0 else None

    def size(d) -> int:
        if isinstance(d, int):
            return d
        return batch if batch is not None else int(d.node.hint)

    def numel(node) -> int:
        s = ir.shape(node)
        return math.prod(size(d) for d in s) if s is not None else 0

    def dims(node) -> tuple[int, ...]:
        return tuple(size(d) for d in (ir.shape(node) or ()))

    macs = 0
    for n in gm.graph.nodes:
        a = ir.op_args(n)
        if ir.is_op(n, *_CONVS):
            w = dims(a["weight"])
            macs += (numel(a["input"]) if a.get("transposed") else numel(n)) * math.prod(w[1:])
        elif ir.is_op(n, aten.linear):
            macs += numel(n) * dims(a["weight"])[-1]
        elif ir.is_op(n, aten.addmm):
            macs += numel(n) * dims(a["mat1"])[-1]
        elif ir.is_op(n, *_MATMULS):
            macs += numel(n) * dims(a["self"])[-1]
        elif ir.is_op(n, torch.ops.qlfx.branch_product):
            wa, wb = dims(a["weight_a"]), dims(a["weight_b"])
            macs += numel(n) * (math.prod(wa[1:]) + math.prod(wb[1:]))
    return macs


# ------------------------------------------------------------------------------------ node diffs
@dataclass
class StageDiff:
    """Node-level difference between two stages (names are node names)."""

    a_name: str
    b_name: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unified: str = ""
    side_by_side: str = ""

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def summary(self) -> str:
        if self.identical:
            return f"{self.a_name} and {self.b_name}: same graph"
        parts = []
        for what, names in (("added", self.added), ("removed", self.removed), ("changed", self.changed)):
            if names:
                shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
                parts.append(f"{len(names)} {what}: {shown}")
        return "\n".join(parts)


def diff_code(a_code: str, b_code: str, a_name: str = "A", b_name: str = "B", width: int = 160) -> StageDiff:
    """Diff two listings (:func:`qlfx.instruments.graph_code`): nodes by name, and the code."""
    a_nodes, b_nodes = parse_graph_code(a_code), parse_graph_code(b_code)
    a_lines = [l.rstrip() for l in a_code.splitlines() if not l.startswith("#")]
    b_lines = [l.rstrip() for l in b_code.splitlines() if not l.startswith("#")]
    unified = "\n".join(difflib.unified_diff(a_lines, b_lines, a_name, b_name, lineterm=""))
    # Side by side, aligned on node names: a row holds the same node in both stages ('|' when its
    # line changed), '<' a node only in A, '>' a node only in B.
    key = lambda l: next(iter(parse_graph_code(l)), l)  # noqa: E731
    col = max(20, (width - 3) // 2)
    cut = lambda l: l if len(l) <= col else l[: col - 1] + "~"  # noqa: E731
    rows = []
    matcher = difflib.SequenceMatcher(None, [key(l) for l in a_lines], [key(l) for l in b_lines], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for l, r in zip(a_lines[i1:i2], b_lines[j1:j2]):
                rows.append(f"{cut(l):<{col}} {' ' if l == r else '|'} {cut(r)}")
            continue
        rows += [f"{cut(l):<{col}} <" for l in a_lines[i1:i2]]
        rows += [f"{'':<{col}} > {cut(r)}" for r in b_lines[j1:j2]]
    return StageDiff(
        a_name, b_name,
        added=[n for n in b_nodes if n not in a_nodes],
        removed=[n for n in a_nodes if n not in b_nodes],
        changed=[n for n in b_nodes if n in a_nodes and a_nodes[n] != b_nodes[n]],
        unified=unified, side_by_side="\n".join(rows),
    )


def diff_stages(a_path: str | Path, b_path: str | Path, width: int = 160) -> StageDiff:
    """Diff two stage files written by ``--dump-dir`` (``000_input.py``, ``001_fold-bn.py``, ...)."""
    texts = []
    for p in (Path(a_path), Path(b_path)):
        if not p.is_file():
            hint = ""
            if p.parent.is_dir():
                stages = sorted(x.name for x in p.parent.glob("[0-9][0-9][0-9]_*.py"))
                if stages:
                    hint = f" Stages in {p.parent}: {', '.join(stages)}"
            raise UsageError(f"stage file '{p}' does not exist.{hint} (write stages with `qlfx run ... --dump-dir DIR`)")
        texts.append(p.read_text())
    return diff_code(texts[0], texts[1], Path(a_path).name, Path(b_path).name, width)


def changed_nodes(before: fx.GraphModule, after: fx.GraphModule) -> StageDiff:
    return diff_code(graph_code(before), graph_code(after), "before", "after")


# --------------------------------------------------------------------------------------- bisect
@dataclass
class BisectResult:
    """The first pass (1-based ``pass_index`` in the pipeline) that breaks its contract, and, for passes
    that count their rewrites, the first bad rewrite (1-based ``rewrite_index``) and its ``site`` (for a
    pass that raised: the node it was working on). ``contract`` is the culprit's, the standard it was
    judged by. ``pass_name`` is None when nothing broke, and ``"(trace)"`` (index 0) when the traced
    graph itself differs from the model."""

    pass_name: str | None
    pass_index: int | None
    rewrite_index: int | None = None
    site: str | None = None
    rewrites_total: int | None = None
    error: str | None = None  # the check summary, or the exception the pass/graph raised
    divergence: Any = None    # qlfx.verify.Divergence at the first bad rewrite (or of the whole pass)
    runs: int = 0             # how many graphs were checked
    contract: str | None = None

    @property
    def found(self) -> bool:
        return self.pass_name is not None

    def __str__(self) -> str:
        if not self.found:
            return f"bisect: no pass broke its contract ({self.runs} check(s))"
        contract = f" ({self.contract} contract)" if self.contract else ""
        lines = [f"bisect: first bad pass: #{self.pass_index} '{self.pass_name}'{contract}"]
        if self.rewrite_index is not None:
            lines.append(f"  first bad rewrite: #{self.rewrite_index} of {self.rewrites_total}: {self.site}")
        elif self.rewrites_total == 0:
            lines.append("  (the pass does not count its rewrites with ctx.allow_rewrite(), so no site)")
        if self.error:
            lines.append(f"  {self.error}")
        if self.divergence is not None:
            lines.append(f"  first diverging node: {self.divergence}")
        lines.append(f"  ({self.runs} graphs checked; reproduce with passes up to #{self.pass_index}"
                     + (f" and rewrite_limit={self.rewrite_index}" if self.rewrite_index else "") + ")")
        return "\n".join(lines)


def _judge(manager, p, before: fx.GraphModule, candidate: fx.GraphModule, ctx, inputs, reference_outputs) -> str | None:
    """Why ``candidate`` (``p`` applied to ``before``) fails ``p``'s check, or None: the check
    PassManager.run makes after every pass."""
    try:
        check, _ = manager.check_pass(p, before, candidate, ctx, inputs, reference_outputs)
    except PassError as err:  # a graph that no longer runs is broken
        return f"the graph fails to run: {type(err.error).__name__}: {err.error}"
    return None if check.passed else check.summary()


def bisect(model, passes, example_inputs, *, tolerance: Tolerance | float | None = None, calibration=None,
           labels=None, config=None, dynamic_batch: bool = False, seed: int = 0,
           verify_inputs: int = 2) -> BisectResult:
    """Find the first pass, then the first rewrite of that pass, that breaks the pass's contract.

    The arguments mean what they mean for :func:`qlfx.compile`; every check is the pass manager's (the
    same input sets, tolerances and accuracy budgets), so a pipeline ``qlfx.compile`` rejects always
    has a culprit here, and the same one. A pass that raises is the culprit too, with the node it was
    working on as the site.
    """
    from .api import prepare
    from .pass_manager import PassManager

    session = prepare(model, passes, example_inputs, calibration, labels, config, dynamic_batch)
    model, pipeline, gm, ctx = session.model, session.pipeline, session.graph, session.context
    if isinstance(tolerance, (int, float)):
        tolerance = Tolerance(rel=float(tolerance))
    manager = PassManager(pipeline, tolerance=tolerance, verify_inputs=verify_inputs, seed=seed)

    # 1. The pass: the pass manager's own run, which checks every pass against the graph before it.
    try:
        manager.run(gm, ctx, session.check_trace(manager))
    except EquivalenceError as err:
        if err.pass_name == "trace":
            return BisectResult("(trace)", 0, error=f"the traced graph already differs from the model: "
                                                    f"{err.check.summary()}", runs=1)
        index = len(err.report.rows) - 1  # the rows: (trace), the passes that held, the culprit
        culprit, good = pipeline[index - 1], err.last_good
        result = BisectResult(culprit.name, index, error=err.check.summary(), divergence=err.divergence,
                              runs=index + 1, contract=culprit.contract)
    except PassError as err:
        index = len(err.report.rows)  # the rows: (trace) and the passes before the culprit
        return BisectResult(err.pass_name, index, site=err.node, error=str(err).splitlines()[0], runs=index,
                            contract=pipeline[index - 1].contract)
    else:
        return BisectResult(None, None, runs=len(pipeline) + 1)

    # 2. The rewrite: how many does the culprit make, and which is the first that breaks its check?
    inputs = manager.input_sets(ctx)
    reference = [run_outputs(good, i) for i in inputs]
    probes: dict[int | None, tuple[str | None, fx.GraphModule | None, Any]] = {}

    def apply(limit: int | None):
        ctx.rewrite_limit = limit
        try:
            candidate, res = manager.apply(culprit, good, ctx)
            return candidate, res, ctx.rewrites_done
        finally:
            ctx.rewrite_limit = None

    def probe(limit: int):
        if limit not in probes:
            try:
                candidate, res, _ = apply(limit)
            except PassError as err:
                probes[limit] = (str(err).splitlines()[0], None, None)
            else:
                result.runs += 1
                probes[limit] = (_judge(manager, culprit, good, candidate, ctx, inputs, reference), candidate, res)
        return probes[limit]

    _, _, total = apply(None)
    result.rewrites_total = total
    if total == 0:
        return result
    lo, hi = 0, total  # rewrites lo: good (nothing rewritten); hi: bad (the full run failed the check)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid)[0] is None:
            lo = mid
        else:
            hi = mid
    error, candidate, res = probe(hi)
    if error is None:
        return result  # not monotone in the rewrite count (or the check is noisy): report the pass only
    result.rewrite_index, result.error = hi, error
    if res is not None and res.rewrites:
        result.site = res.rewrites[min(hi, len(res.rewrites)) - 1]
    if candidate is not None:
        try:
            before = probes[lo][1] if lo in probes else apply(lo)[0]
            result.divergence = first_divergence(before, candidate, inputs[0], manager._tolerance_for(culprit))
        except Exception:  # noqa: BLE001 - the site is known; the node-level search is a bonus
            result.divergence = None
    return result


# -------------------------------------------------------------------------------------- compare
# "Probably different models": an error of the order of the outputs themselves, or outputs that do not
# move together. A wrong tolerance gives errors of 1e-3 with correlation ~1; another model's weights give
# err/max|ref| ~ 1 and correlation ~ 0.
DIFFERENT_NEEDED = 0.5
DIFFERENT_CORRELATION = 0.2


@dataclass
class TensorSpec:
    """An input or output as an artifact declares it: ``shape`` entries are None where dynamic."""

    name: str
    shape: tuple | None
    dtype: str | None

    def __str__(self) -> str:
        shape = "?" if self.shape is None else "[" + ", ".join("any" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name}: {self.dtype or '?'}{shape}"

    def accepts(self, t: torch.Tensor) -> bool:
        if self.shape is not None and (len(self.shape) != t.dim()
                                       or any(d is not None and d != s for d, s in zip(self.shape, t.shape))):
            return False
        return self.dtype is None or self.dtype == str(t.dtype).replace("torch.", "")


@dataclass
class Artifact:
    """Something compiled that runs on numpy arrays: ``run(list[np.ndarray]) -> list[np.ndarray]``."""

    path: str
    engine: str
    run: Any
    inputs: list[TensorSpec] | None = None   # None: the artifact does not say
    outputs: list[TensorSpec] | None = None
    onnx_path: Path | None = None             # for per-layer comparison


@dataclass
class LayerComparison:
    """Per-layer comparison of one artifact against the model's own values (first input set)."""

    paired: int
    kept: int              # intermediate values the artifact keeps (that could be paired)
    model_values: int      # values the model's graph computes
    divergence: Any = None  # the first paired value beyond the tolerance (a Divergence), or None
    note: str = ""

    def __str__(self) -> str:
        text = (f"per layer: {self.paired} of the artifact's {self.kept} values paired with the model's "
                f"{self.model_values} (the rest were rewritten away or made by passes)")
        text += f"; first diverging value: {self.divergence}" if self.divergence else "; every paired value within tolerance"
        return text + (f"\n    note: {self.note}" if self.note else "")


@dataclass
class ArtifactComparison:
    artifact: str
    engine: str
    outputs: list  # qlfx.verify.OutputComparison per output (worst over the input sets)
    inputs_checked: int
    correlations: list = field(default_factory=list)  # per output, min over the input sets (nan: constant)
    problems: list = field(default_factory=list)      # pairing problems: output count / shape mismatches
    layers: LayerComparison | None = None
    input_source: str = "random"

    @property
    def passed(self) -> bool:
        return not self.problems and all(o.passed for o in self.outputs)

    @property
    def needed(self) -> float:
        return max((o.needed for o in self.outputs), default=0.0)

    def probably_different(self, index: int | None = None) -> bool:
        """Errors of the order of the outputs themselves (err/max|ref| >= 0.5) or outputs that do not
        correlate (< 0.2): not a tolerance question, another model (or weights, or input layout)."""
        if self.problems:
            return index is None
        picked = self.outputs if index is None else [self.outputs[index]]
        corrs = self.correlations if index is None else self.correlations[index:index + 1]
        return any(o.needed >= DIFFERENT_NEEDED for o in picked) or \
            any(c == c and c < DIFFERENT_CORRELATION for c in corrs)

    def verdict(self, index: int) -> str:
        o = self.outputs[index]
        if o.passed:
            return "PASS"
        return "FAIL: probably a different model" if self.probably_different(index) else "FAIL"

    def rows(self) -> list[list[str]]:
        rows = []
        for i, o in enumerate(self.outputs):
            corr = self.correlations[i] if i < len(self.correlations) else float("nan")
            rows.append([self.artifact, self.engine, str(o.index), "x".join(map(str, o.shape)) or "scalar",
                         f"{o.needed:.2e}", f"{o.allowed:.0e}", f"{o.max_abs:.2e}", f"{o.max_rel:.2e}",
                         "-" if corr != corr else f"{corr:.4f}", self.verdict(i)])
        for p in self.problems:
            rows.append([self.artifact, self.engine, "-", "-", "-", "-", "-", "-", "-", f"FAIL: {p}"])
        return rows

    def __str__(self) -> str:
        return format_comparisons([self])


COMPARE_COLUMNS = ("artifact", "engine", "output", "shape") + ERROR_COLUMNS + ("correlation", "verdict")


def format_comparisons(results: Sequence[ArtifactComparison]) -> str:
    """One table, a row per artifact x output, then per-layer findings and the verdict lines."""
    rows = [r for res in results for r in res.rows()]
    widths = [max(len(str(r[i])) for r in rows + [list(COMPARE_COLUMNS)]) for i in range(len(COMPARE_COLUMNS))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    sets = {(res.inputs_checked, res.input_source) for res in results}
    where = "; ".join(f"{n} input set(s) ({source})" for n, source in sorted(sets))
    out = [f"compare against the model on {where}:", line(COMPARE_COLUMNS), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    for res in results:
        if res.layers is not None:
            out.append(f"{res.artifact}: {res.layers}")
    needed = max((r.needed for r in results if not r.problems), default=0.0)
    out.append(f"smallest relative tolerance that passes every output: {needed:.3g}")
    return "\n".join(out)


def _ort_specs(args) -> list[TensorSpec]:
    types = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
    return [TensorSpec(a.name, tuple(d if isinstance(d, int) else None for d in a.shape) if a.shape is not None
                       else None, types.get(a.type)) for a in args]


def _ort_session(source, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see qlfx.bench: no spinning pools
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def open_artifact(path: str | Path) -> Artifact:
    """Load an ``.onnx`` (onnxruntime) or TVM ``.so`` / ``.tar`` export (qlfx's runtime) to run it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"artifact '{path}' does not exist (write one with `qlfx run MODEL --emit onnx -o {path}`)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise UsageError("comparing an .onnx file needs onnxruntime (pip install onnxruntime)") from err
        try:
            session = _ort_session(str(path))
        except Exception as err:
            raise UsageError(f"onnxruntime cannot load '{path}': {str(err).strip()[:300]}") from err
        names = [i.name for i in session.get_inputs()]
        return Artifact(str(path), "onnxruntime", lambda arrays: session.run(None, dict(zip(names, arrays))),
                        _ort_specs(session.get_inputs()), _ort_specs(session.get_outputs()), onnx_path=path)
    if suffix in (".so", ".tar", ".json"):
        try:
            from .emit.tvm_runtime import load
        except ImportError as err:
            raise UsageError(f"comparing a TVM module needs qlfx.emit.tvm_runtime: {err}") from err
        try:
            module = load(path)
        except Exception as err:
            raise UsageError(f"cannot load TVM module '{path}': {type(err).__name__}: {str(err).strip()[:300]}") from err
        inputs = [TensorSpec(i["name"], tuple(i["shape"]), i.get("dtype")) for i in module.inputs]
        return Artifact(str(path), "tvm", lambda arrays: module.run(*arrays), inputs,
                        [TensorSpec(f"output {k}", None, None) for k in range(module.num_outputs)])
    raise UsageError(f"unknown artifact type '{path.suffix}' for '{path}': give an .onnx file or a TVM .so / .tar export")


def graph_artifact(gm: fx.GraphModule, name: str) -> Artifact:
    """The compiled ATen graph as an artifact (run in torch)."""
    import numpy as np

    def run(arrays):
        return [t.numpy() for t in run_outputs(gm, [torch.from_numpy(np.asarray(a)) for a in arrays])]

    return Artifact(name, "torch (qlfx graph)", run)


def input_names(model, count: int) -> list[str]:
    """The model's input names: its forward's positional parameters (what the ONNX / TVM inputs are
    named after), else input_0, input_1, ..."""
    import inspect

    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def check_inputs_pairing(artifact: Artifact, examples: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise UsageError, listing every mismatch, when the artifact's inputs do not take the model's."""
    if artifact.inputs is None:
        return
    model_side = ", ".join(f"{n}: {str(t.dtype).replace('torch.', '')}{list(t.shape)}" for n, t in zip(names, examples))
    problems = []
    if len(artifact.inputs) != len(examples):
        problems.append(f"it takes {len(artifact.inputs)} input(s), the model {len(examples)}")
    for spec, t in zip(artifact.inputs, examples):
        if not spec.accepts(t):
            problems.append(f"input {spec} does not take the model's {str(t.dtype).replace('torch.', '')}{list(t.shape)}")
    if problems:
        raise UsageError(f"'{artifact.path}' does not pair with the model: {'; '.join(problems)}.\n"
                         f"  artifact inputs: {', '.join(map(str, artifact.inputs))}\n  model inputs:    {model_side}\n"
                         f"  Give the input shape the artifact was built for (--input-shape), or the model it was built from.")


def _correlation(ref: torch.Tensor, new: torch.Tensor) -> float:
    a, b = ref.detach().double().flatten(), new.detach().double().flatten()
    if a.shape != b.shape or a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def compare_artifacts(model, artifacts: Sequence[str | Path | Artifact], example_inputs: Sequence[torch.Tensor], *,
                      tolerance: Tolerance | float | None = None, count: int = 3, seed: int = 0,
                      input_sets: Sequence[Sequence[torch.Tensor]] | None = None, input_source: str | None = None,
                      passes=None, mark_all: bool = False) -> list[ArtifactComparison]:
    """Run ``model`` (torch) and every artifact on the same inputs; per artifact and output: max abs /
    rel error, the smallest tolerance that passes, the correlation of the outputs, and the verdict
    (PASS, FAIL, or FAIL "probably a different model", see :meth:`ArtifactComparison.probably_different`).

    ``input_sets`` (e.g. from :func:`qlfx.inputs.load_input_sets`) replaces the ``count`` seeded random
    sets shaped like ``example_inputs``. ``passes`` (a pipeline): the model compiled with it is compared
    too, as an artifact named ``qlfx graph``. ``mark_all``: every intermediate value an ONNX artifact or the
    qlfx graph keeps is compared with the model's value it came from (first input set); the first one
    beyond the tolerance is named (:class:`LayerComparison`). Every artifact is loaded and its inputs
    checked against the model's before anything runs (a mismatch is a UsageError naming both sides)."""
    import numpy as np

    if isinstance(tolerance, (int, float)):
        tolerance = Tolerance(rel=float(tolerance))
    tol = tolerance or Tolerance(rel=1e-4)
    examples = capture.check_example_inputs(example_inputs)
    names = input_names(model, len(examples))
    model = copy.deepcopy(model)  # a forward may write to its module; the user's stays as it was
    opened = [a if isinstance(a, Artifact) else open_artifact(a) for a in artifacts]
    for artifact in opened:
        check_inputs_pairing(artifact, examples, names)
    sets = list(input_sets) if input_sets is not None else random_inputs(examples, seed, count)
    source = input_source or ("file" if input_sets is not None else f"seeded random, seed {seed}")
    compiled = traced = None
    dynamic = any(a.inputs and a.inputs[0].shape and a.inputs[0].shape[0] is None for a in opened)
    needs_graph = passes is not None or (mark_all and any(a.onnx_path is not None for a in opened))
    if needs_graph:
        from .api import compile as qlfx_compile
        from .defaults import DEFAULT_PIPELINE

        pipeline = passes if passes is not None else DEFAULT_PIPELINE
        compiled = qlfx_compile(model, passes=pipeline, example_inputs=examples, verify=False, dynamic_batch=dynamic)
        if passes is not None:
            opened.append(graph_artifact(compiled.graph_module, "qlfx graph"))
    refs_per_set = [run_outputs(model, inputs) for inputs in sets]
    results = []
    for artifact in opened:
        worst: list = []
        corrs: list = []
        problems: list = []
        for inputs, refs in zip(sets, refs_per_set):
            arrays = [t.detach().cpu().numpy() for t in inputs]
            try:
                got = artifact.run(arrays)
            except Exception as err:
                shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                raise UsageError(f"{artifact.engine} failed to run '{artifact.path}' on inputs of shape {shapes}: "
                                 f"{str(err).strip()[:300]}\n  Give the input shape the artifact was built for "
                                 f"(--input-shape).") from err
            if len(got) != len(refs):
                problems = [f"the model returns {len(refs)} output(s), '{artifact.path}' returns {len(got)}"]
                break
            if not worst:
                worst, corrs = [None] * len(refs), [float("inf")] * len(refs)
            for i, (r, g) in enumerate(zip(refs, got)):
                g = torch.from_numpy(np.asarray(g))
                if tuple(g.shape) != tuple(r.shape):
                    problem = f"output {i} has shape {list(g.shape)}, the model's {list(r.shape)}"
                    if problem not in problems:
                        problems.append(problem)
                worst[i] = _merge(worst[i], compare_tensor(r, g, tol, i))
                c = _correlation(r, g)
                corrs[i] = c if c != c or corrs[i] != corrs[i] else min(corrs[i], c)
        result = ArtifactComparison(artifact.path, artifact.engine, [w for w in worst if w is not None],
                                    len(sets), [c if c != float("inf") else float("nan") for c in corrs], problems,
                                    input_source=source)
        if mark_all and not problems:
            if traced is None:
                traced = capture.capture(model, examples, dynamic_batch=dynamic)
            if artifact.onnx_path is not None:
                result.layers = compare_onnx_layers(artifact.onnx_path, traced, compiled.graph_module, examples,
                                                    sets[0], tol)
            elif artifact.engine.startswith("torch"):
                result.layers = compare_graph_layers(traced, compiled.graph_module, sets[0], tol)
        results.append(result)
    return results


def compare_artifact(model, artifact: str | Path, example_inputs: Sequence[torch.Tensor], *,
                     tolerance: Tolerance | float | None = None, count: int = 3, seed: int = 0,
                     input_sets=None, mark_all: bool = False, passes=None) -> ArtifactComparison:
    """:func:`compare_artifacts` for one artifact."""
    return compare_artifacts(model, [artifact], example_inputs, tolerance=tolerance, count=count, seed=seed,
                             input_sets=input_sets, mark_all=mark_all, passes=passes)[0]


# ----------------------------------------------------------------------------- per-layer pairing
def _model_values(traced: fx.GraphModule, inputs) -> tuple[dict[str, torch.Tensor], dict[str, fx.Node]]:
    from .verify import record_values

    values = record_values(traced, inputs)
    nodes = {n.name: n for n in traced.graph.nodes if n.op == "call_function"}
    # float values only: a comparison's boolean flips where rounding crosses its threshold, legitimately
    return {k: v for k, v in values.items() if k in nodes and v.is_floating_point()}, nodes


def _user_line(node: fx.Node) -> str:
    """'file.py:12' of the innermost frame of the node's captured stack trace outside torch (the model's
    own code: a BN module's value is made in torch's batchnorm.py, called from the model's line)."""
    import os
    import re

    torch_dir = os.path.dirname(torch.__file__)
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    own = [(f, line) for f, line in frames if not f.startswith(torch_dir)] or frames
    return f"{os.path.basename(own[-1][0])}:{own[-1][1]}" if own else ""


def _divergence(node: fx.Node | None, key: str, label: str, made_by: str, cmp) -> Divergence:
    from .verify import Divergence

    where = _user_line(node) if node is not None else ""
    return Divergence(label, "call_function", ir.op_name(node) if node is not None else "?",
                      made_by + (f", model node %{key}" if key != label else "") + (f", {where}" if where else ""),
                      cmp.max_abs, cmp.needed, ir.module_path(node) if node is not None else "")


def compare_graph_layers(traced: fx.GraphModule, compiled: fx.GraphModule, inputs, tol: Tolerance) -> LayerComparison:
    """Every value of the compiled graph that carries a model value (:func:`qlfx.ir.value_key`) against it."""
    from .verify import record_values

    ref, nodes = _model_values(traced, inputs)
    new = record_values(compiled, inputs)
    paired = 0
    first = None
    kept = [n for n in compiled.graph.nodes if n.op == "call_function"]
    for node in kept:
        key = ir.value_key(node)
        if key not in ref or node.name not in new or tuple(new[node.name].shape) != tuple(ref[key].shape):
            continue
        paired += 1
        cmp = compare_tensor(ref[key], new[node.name], tol)
        if first is None and not cmp.passed:
            first = _divergence(nodes[key], key, node.name, node.meta.get(ir.ORIGIN, "?"), cmp)
    return LayerComparison(paired, len(kept), len(ref), first)


def _fx_node_of(onnx_node) -> str | None:
    """The ``pkg.torch.onnx.fx_node`` metadata torch.onnx writes on every node: the fx node it converted,
    as ``Node.format_node()`` prints it (its name, target and arguments)."""
    for prop in onnx_node.metadata_props:
        if prop.key == "pkg.torch.onnx.fx_node":
            return prop.value
    return None


def onnx_value_keys(compiled: fx.GraphModule, example_inputs) -> dict[str, tuple[str, str, str]]:
    """ONNX value name -> (model value key, qlfx node name, the fx node as torch.onnx records it) for the ONNX model qlfx emits from
    ``compiled``: torch.onnx names every value after the fx node of the program it converts (the
    re-exported graph after its own decompositions), and the re-export keeps each qlfx node's ``custom``
    metadata, where the qlfx node and the model value it carries are recorded here first."""
    from torch.onnx._internal.exporter import _core

    from .emit.onnx import _registry

    gm = copy.deepcopy(compiled)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.meta["custom"] = {**node.meta.get("custom", {}), "qlfx_value": ir.value_key(node), "qlfx_node": node.name}
    program = _core._prepare_exported_program_for_export(capture.to_exported_program(gm, example_inputs),
                                                         registry=_registry())
    keys: dict[str, tuple[str, str, str]] = {}
    by_value: dict[str, str] = {}
    for node in program.graph.nodes:
        custom = node.meta.get("custom") or {}
        if node.op == "call_function" and "qlfx_value" in custom:
            # a decomposed op: several nodes share its tag; the last one produces the value
            previous = by_value.get(custom["qlfx_value"])
            if previous is not None:
                keys.pop(previous, None)
            by_value[custom["qlfx_value"]] = node.name
            keys[node.name] = (custom["qlfx_value"], custom["qlfx_node"], str(node.format_node()))
    return keys


def compare_onnx_layers(path: Path, traced: fx.GraphModule, compiled: fx.GraphModule, example_inputs, inputs,
                        tol: Tolerance) -> LayerComparison:
    """Mark every intermediate value of the ONNX model at ``path`` as an output (a copy in memory), run it
    in onnxruntime on ``inputs``, and compare each value that pairs with a model value (through the qlfx
    graph ``compiled`` the artifact was emitted from) with it, in the ONNX graph's order."""
    import numpy as np
    import onnx

    model = onnx.load(str(path))
    keys = onnx_value_keys(compiled, example_inputs)
    types = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.output)}
    if any(v not in types for n in model.graph.node for v in n.output):
        inferred = onnx.shape_inference.infer_shapes(model)
        types.update({v.name: v.type for v in inferred.graph.value_info})
    ref, nodes = _model_values(traced, inputs)
    outputs = {o.name for o in model.graph.output}
    marked, mismatched, kept = [], 0, 0
    for node in model.graph.node:
        origin = _fx_node_of(node)
        for value in node.output:
            if not value or value in outputs or value not in types:
                continue
            kept += 1
            if value not in keys:
                continue
            key, qlfx_node, fx_node = keys[value]
            if origin is not None and origin != fx_node:  # same name, other op or operands: another graph
                mismatched += 1
                continue
            if key in ref:
                marked.append((value, key, qlfx_node, node.op_type))
    proto_outputs = {o.name for o in model.graph.output}
    for value, *_ in marked:
        if value not in proto_outputs:
            out = model.graph.output.add()
            out.name = value
            out.type.CopyFrom(types[value])
    session = _ort_session(model.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    wanted = [m[0] for m in marked]
    got = dict(zip(wanted, session.run(wanted, dict(zip(names, [t.numpy() for t in inputs]))))) if wanted else {}
    paired, first = 0, None
    for value, key, qlfx_node, op_type in marked:
        new = torch.from_numpy(np.asarray(got[value]))
        if tuple(new.shape) != tuple(ref[key].shape):
            continue
        paired += 1
        cmp = compare_tensor(ref[key], new, tol)
        if first is None and not cmp.passed:
            first = _divergence(nodes[key], key, value, f"qlfx node %{qlfx_node} as ONNX {op_type}", cmp)
    note = ""
    if mismatched or (kept and not paired):
        note = (f"{mismatched} ONNX value(s) are named like nodes of the model compiled with this pipeline but "
                f"come from other ops: was '{path}' built with another --passes?" if mismatched else
                f"no value of '{path}' pairs with the model compiled with this pipeline: give the --passes it "
                f"was built with")
    return LayerComparison(paired, kept, len(ref), first, note)


# --------------------------------------------------------------------------------------- reports
@dataclass
class StageRecord:
    index: int
    name: str
    contract: str
    changed: bool
    seconds: float
    params: int
    macs: int
    check: Any = None
    result: Any = None
    diff: StageDiff | None = None
    svg: str | None = None
    dot: str | None = None
    code: str = ""
    failed: bool = False


class ReportCollector(Instrument):
    """Records every stage for :func:`write_report`: node diff, params, MACs, time, picture."""

    def __init__(self, pictures: bool = True):
        self.pictures = pictures
        self.svg_problem = None if dot_available() else (
            "Graphviz `dot` is not installed: the report has no pictures (apt-get install graphviz)")
        self.stages: list[StageRecord] = []
        self._before = None
        self._t0 = 0.0

    def _picture(self, gm, names, title):
        if not self.pictures:
            return None, None
        dot = to_dot(gm, highlight=names, title=title)
        if self.svg_problem:
            return None, dot
        try:
            svg = render_svg(dot).decode()
            return svg[svg.find("<svg"):] if "<svg" in svg else svg, dot
        except Exception as err:  # noqa: BLE001 - a report without pictures beats no report
            self.svg_problem = f"SVG drawing failed: {err}"
            return None, dot

    def on_start(self, gm):
        svg, dot = self._picture(gm, (), "input graph")
        self.stages.append(StageRecord(0, "(input)", "-", False, 0.0, ir.count_params(gm)[0], count_macs(gm),
                                       svg=svg, dot=dot, code=graph_code(gm)))
        self._before = graph_code(gm)

    def before_pass(self, index, pass_, gm):
        self._before = graph_code(gm)
        self._t0 = time.perf_counter()

    def after_pass(self, index, pass_, gm, result, check):
        seconds = time.perf_counter() - self._t0
        code = graph_code(gm)
        diff = diff_code(self._before or "", code, "before", "after")
        svg, dot = self._picture(gm, diff.added + diff.changed, f"after {pass_.name}")
        failed = check is not None and not check.passed
        self.stages.append(StageRecord(index, pass_.name, pass_.contract, result.changed, seconds,
                                       ir.count_params(gm)[0], count_macs(gm), check, result, diff, svg, dot,
                                       code, failed))


def adopt_report_times(collector: ReportCollector, report) -> None:
    """Replace the collector's wall times (which include other instruments' work) by the pass manager's
    own per-pass seconds (pass run + val refresh)."""
    rows = [r for r in getattr(report, "rows", [])][1:]
    for stage, row in zip(collector.stages[1:], rows):
        if row.pass_name == stage.name:
            stage.seconds = row.seconds


def render_markdown(stages: Sequence[StageRecord], title: str = "qlfx report", error: str | None = None,
                    svg_dir: str | None = None) -> str:
    out = [f"# {title}", ""]
    if error:
        out += ["**FAILED**", "", "```", error, "```", ""]
    out += ["| # | pass | contract | changed | " + " | ".join(c.replace("|", "\\|") for c in ERROR_COLUMNS)
            + " | params | MACs | seconds |", "|---" * (7 + len(ERROR_COLUMNS)) + "|"]
    for s in stages:
        flag = " **(broke equivalence)**" if s.failed else ""
        out.append(f"| {s.index} | {s.name}{flag} | {s.contract} | {'yes' if s.changed else 'no'} | "
                   + " | ".join(error_cells(s.check)) + f" | {s.params:,} | {s.macs:,} | {s.seconds:.3f} |")
    for s in stages[1:]:
        out += ["", f"## {s.index:03d} {s.name} ({s.contract})", ""]
        if s.check is not None:
            out.append(f"- check: {s.check.summary()}")
        if s.diff is not None:
            out.append(f"- nodes: {len(s.diff.added)} added, {len(s.diff.removed)} removed, {len(s.diff.changed)} changed")
            for what, names in (("added", s.diff.added), ("removed", s.diff.removed), ("changed", s.diff.changed)):
                if names:
                    out.append(f"  - {what}: " + ", ".join(f"`{n}`" for n in names[:40])
                               + (f" ... ({len(names) - 40} more)" if len(names) > 40 else ""))
        if s.result is not None:
            for site in s.result.rewrites[:40]:
                out.append(f"- rewrote: {site}")
            for sk in s.result.skipped[:40]:
                out.append(f"- skipped: {sk}")
            for note in s.result.notes:
                out.append(f"- note: {note}")
        if svg_dir and s.svg:
            out.append(f"\n![{s.name}]({svg_dir}/{s.index:03d}_{s.name}.svg)")
    return "\n".join(out) + "\n"


def render_html(stages: Sequence[StageRecord], title: str = "qlfx report", error: str | None = None,
                note: str | None = None) -> str:
    e = html.escape
    rows = []
    for s in stages:
        cls = ' class="bad"' if s.failed else ""
        rows.append(f"<tr{cls}><td>{s.index}</td><td><a href='#stage{s.index}'>{e(s.name)}</a></td><td>{s.contract}</td>"
                    f"<td>{'yes' if s.changed else 'no'}</td>" + "".join(f"<td>{c}</td>" for c in error_cells(s.check))
                    + f"<td>{s.params:,}</td><td>{s.macs:,}</td><td>{s.seconds:.3f}</td></tr>")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:nth-child(2){text-align:left}"
        "tr.bad{background:#fdd} pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:30em}"
        ".pic{overflow:auto;max-height:60em;border:1px solid #ddd} .add{color:#070} .del{color:#a00}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if error:
        parts.append(f"<h2 style='color:#a00'>FAILED</h2><pre>{e(error)}</pre>")
    if note:
        parts.append(f"<p><i>{e(note)}</i></p>")
    parts.append("<table><tr><th>#</th><th>pass</th><th>contract</th><th>changed</th>"
                 + "".join(f"<th>{e(c)}</th>" for c in ERROR_COLUMNS)
                 + "<th>params</th><th>MACs</th><th>seconds</th></tr>")
    parts += rows + ["</table>"]
    for s in stages:
        parts.append(f"<h2 id='stage{s.index}'>{s.index:03d} {e(s.name)} <small>({s.contract})</small></h2><ul>")
        if s.check is not None:
            parts.append(f"<li>check: {e(s.check.summary())}</li>")
        if s.diff is not None:
            for what, names in (("added", s.diff.added), ("removed", s.diff.removed), ("changed", s.diff.changed)):
                if names:
                    parts.append(f"<li>{len(names)} node(s) {what}: " + ", ".join(f"<code>{e(n)}</code>" for n in names[:60])
                                 + (f" ... ({len(names) - 60} more)" if len(names) > 60 else "") + "</li>")
        if s.result is not None:
            for site in s.result.rewrites[:60]:
                parts.append(f"<li>rewrote: {e(site)}</li>")
            for sk in s.result.skipped[:60]:
                parts.append(f"<li>skipped: {e(str(sk))}</li>")
            for n in s.result.notes:
                parts.append(f"<li>note: {e(n)}</li>")
        parts.append("</ul>")
        if s.diff is not None and s.diff.unified:
            lines = []
            for l in s.diff.unified.splitlines():
                c = "add" if l.startswith("+") else "del" if l.startswith("-") else ""
                lines.append(f"<span class='{c}'>{e(l)}</span>" if c else e(l))
            parts.append("<details><summary>code diff</summary><pre>" + "\n".join(lines) + "</pre></details>")
        if s.svg:
            parts.append(f"<details open><summary>graph (nodes made by this pass in orange)</summary><div class='pic'>{s.svg}</div></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, collector: ReportCollector, title: str = "qlfx report", error: str | None = None) -> Path:
    """Write ``.html`` (inline SVG pictures) or ``.md`` (pictures as separate SVG files beside it)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        return atomic_write(path, render_html(collector.stages, title, error, collector.svg_problem))
    if suffix == ".md":
        svg_dir = None
        if any(s.svg for s in collector.stages):
            svg_dir = f"{path.stem}_svg"
            for s in collector.stages:
                if s.svg:
                    atomic_write(path.parent / svg_dir / f"{s.index:03d}_{s.name}.svg", s.svg)
        text = render_markdown(collector.stages, title, error, svg_dir)
        if collector.svg_problem:
            text += f"\n_{collector.svg_problem}_\n"
        return atomic_write(path, text)
    raise UsageError(f"report path '{path}' must end in .html or .md")


class SvgDir(Instrument):
    """Writes an SVG of every stage (``000_input.svg``, ``001_fold-bn.svg``, ...) with the nodes the pass
    added or changed highlighted. Without Graphviz it writes the .dot files and says so in ``problem``."""

    def __init__(self, directory):
        self.directory = ensure_writable_dir(directory)
        self.problem = None if dot_available() else (
            "Graphviz `dot` is not installed, so only .dot files were written to "
            f"{self.directory} (install it: apt-get install graphviz; or open the .dot files in a viewer)")
        self.written: list[Path] = []
        self._before: dict[str, str] = {}

    def _write(self, stem, gm, names, title):
        dot = to_dot(gm, highlight=names, title=title)
        if self.problem:
            self.written.append(atomic_write(self.directory / f"{stem}.dot", dot))
        else:
            self.written.append(atomic_write(self.directory / f"{stem}.svg", render_svg(dot)))

    def on_start(self, gm):
        self._write("000_input", gm, (), "input graph")

    def before_pass(self, index, pass_, gm):
        self._before = parse_graph_code(graph_code(gm))

    def after_pass(self, index, pass_, gm, result, check):
        self._write(f"{index:03d}_{pass_.name}", gm, touched_nodes(self._before, gm), f"after {pass_.name}")
