"""Pass-by-pass debugging: bisection, stage diffs, artifact comparison, per-pass reports.

After LLVM ``opt`` (``-opt-bisect-limit``, ``-print-changed``) and Polygraphy (``debug reduce``,
``run --compare`` with the smallest passing tolerance):

- :func:`bisect` finds the first pass, and inside it the first rewrite site, after which the graph no
  longer computes the model's function. Two binary searches: over ``k`` = how many passes run (the graph
  after passes ``1..k`` is checked end to end against the traced input), then over ``r`` = how many
  rewrites the culprit may apply (``PassContext.rewrite_limit``; passes call ``ctx.allow_rewrite()``
  before each site). Assumes, as LLVM does, that once broken a prefix stays broken.
- :func:`diff_stages` compares two dumped stages (``--dump-dir`` files) node by node.
- :func:`compare_artifact` runs the model and an ``.onnx`` / TVM ``.so`` artifact on the same inputs and
  gives per-output errors and the smallest tolerance that would pass.
- :class:`ReportCollector` (an instrument) + :func:`write_report`: HTML or Markdown, per pass the
  contract, changed nodes, errors, params, MACs, time, and the picture (inline SVG when Graphviz is there).
"""
from __future__ import annotations

import difflib
import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import ir
from .errors import UsageError
from .instruments import Instrument, graph_code
from .verify import Tolerance, check_equivalence, first_divergence, random_inputs

# ------------------------------------------------------------------------------------------- FLOPs


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of the conv / linear / fused-product nodes, from shapes (tensor_meta).

    conv: ``numel(out) * Cin/groups * kh * kw``; linear: ``numel(out) * in_features``; branch_product:
    its two convs. Everything else (elementwise, pooling, norms) is ignored: it is memory-bound and
    small next to these.
    """
    macs = 0
    for n in gm.graph.nodes:
        out = ir.shape(n)
        if out is None:
            continue
        numel = 1
        for d in out:
            numel *= d
        conv = ir.ConvCall.of(n)
        if conv is not None:
            w = ir.shape(conv.weight)
            if w is not None:
                macs += numel * w[1] * w[2] * w[3]
        elif n.op == "call_function" and n.target is F.linear:
            w = ir.shape(n.args[1]) if len(n.args) > 1 and isinstance(n.args[1], fx.Node) else None
            if w is not None:
                macs += numel * w[1]
        elif n.op == "call_function" and "branch_product" in str(n.target):
            wa, wb = (ir.shape(a) if isinstance(a, fx.Node) else None for a in (n.args[1], n.args[3]))
            if wa is not None:
                macs += numel * wa[1]
            if wb is not None:
                macs += numel * wb[1] * wb[2] * wb[3]
    return macs


# ------------------------------------------------------------------------------------ node diffs
_ASSIGN = re.compile(r"^\s{4,}([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.+?)\s*(?:;\s*.*)?$")


def parse_graph_code(code: str) -> dict[str, str]:
    """``name -> right-hand side`` for every assignment in a stage's code (fx writes one node a line;
    ``; name = None`` frees are dropped)."""
    nodes: dict[str, str] = {}
    for line in code.splitlines():
        m = _ASSIGN.match(line)
        if m and m.group(2) != "None":
            nodes[m.group(1)] = m.group(2)
    return nodes


@dataclass
class StageDiff:
    """Node-level difference between two stages (names are fx node names)."""

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


_FREES = re.compile(r";\s+(?:[A-Za-z_][A-Za-z0-9_]*\s*=\s*)+None\s*$")


def _normalise(code: str) -> list[str]:
    """Code lines without comments and without fx's ``;  a = b = None`` frees (codegen noise that
    changes whenever a later use moves)."""
    return [_FREES.sub("", l).rstrip() for l in code.splitlines() if not l.startswith("#")]


def diff_code(a_code: str, b_code: str, a_name: str = "A", b_name: str = "B", width: int = 160) -> StageDiff:
    a_nodes, b_nodes = parse_graph_code(a_code), parse_graph_code(b_code)
    a_lines, b_lines = _normalise(a_code), _normalise(b_code)
    unified = "\n".join(difflib.unified_diff(a_lines, b_lines, a_name, b_name, lineterm=""))
    # Side by side, aligned on node names: a row holds the same node in both stages ('|' when its
    # line changed), '<' a node only in A, '>' a node only in B.
    key = lambda l: (m.group(1) if (m := _ASSIGN.match(l)) else l)  # noqa: E731
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
    """The first pass (1-based ``pass_index`` in the pipeline) after which the graph is no longer
    equivalent to the model, and, for passes that count their rewrites, the first bad rewrite
    (1-based ``rewrite_index``) and its ``site``. ``pass_name`` is None when nothing broke, and
    ``"(trace)"`` (index 0) when the traced graph itself differs from the model."""

    pass_name: str | None
    pass_index: int | None
    rewrite_index: int | None = None
    site: str | None = None
    rewrites_total: int | None = None
    error: str | None = None  # the check summary, or the exception the pass/graph raised
    divergence: Any = None    # qlfx.verify.Divergence at the first bad rewrite, when found
    runs: int = 0             # how many graphs were checked

    @property
    def found(self) -> bool:
        return self.pass_name is not None

    def __str__(self) -> str:
        if not self.found:
            return f"bisect: no pass broke equivalence ({self.runs} check(s))"
        lines = [f"bisect: first bad pass: #{self.pass_index} '{self.pass_name}'"]
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


def _apply_pass(p, gm: fx.GraphModule, ctx, limit: int | None):
    """Run one pass on a copy of ``gm`` the way PassManager does (lint, recompile, provenance, shapes)."""
    candidate = ir.copy_graph_module(gm)
    ctx.rewrite_limit = limit
    ctx._rewrites_done = 0
    try:
        result = p.run(candidate, ctx)
        candidate.graph.lint()
        candidate.recompile()
        ir.stamp_origin(candidate, p.name)
        ir.propagate_shapes(candidate, ctx.example_inputs)
    finally:
        done = ctx._rewrites_done
        ctx.rewrite_limit = None
    return candidate, result, done


def bisect(model, passes, example_inputs, *, tolerance: Tolerance | float | None = None, calibration=None,
           config=None, leaf_modules=(), seed: int = 0, verify_inputs: int = 2) -> BisectResult:
    """Find the first pass, then the first rewrite of that pass, that breaks equivalence with the model.

    The check at each probe: the graph after the probe against the model itself, on
    ``verify_inputs`` seeded random inputs plus the calibration sets, with ``tolerance`` (default: the
    dtype's; lossy passes add their budgets). A pass or graph that raises counts as broken.
    """
    from .api import _check_model, _check_runs, load_calibration
    from .pass_manager import PassContext, parse_pipeline

    example_inputs = ir.check_example_inputs(example_inputs)
    _check_model(model)
    pipeline = parse_pipeline(passes)
    _check_runs(model, example_inputs)
    reference = ir.trace(model, example_inputs, leaf_modules=leaf_modules)
    ctx = PassContext(example_inputs=tuple(example_inputs),
                      calibration=load_calibration(calibration, example_inputs), config=dict(config or {}))
    if isinstance(tolerance, (int, float)):
        tolerance = Tolerance(rel=float(tolerance))
    base = tolerance or Tolerance()
    inputs = random_inputs(example_inputs, seed, verify_inputs) + list(ctx.calibration)
    state = {"runs": 0}

    def tolerance_upto(k: int) -> Tolerance:
        rel = base.rel_for(example_inputs[0].dtype)
        for p in pipeline[:k]:
            if p.contract == "lossy":
                budget, _ = p.lossy_budgets()
                # a pass with only an accuracy budget may move the outputs freely (NaN/Inf still fail)
                rel = float("inf") if budget is None else rel + budget
        return Tolerance(rel=rel, abs=base.abs)

    def broken(gm, k) -> str | None:
        state["runs"] += 1
        try:
            # Against the user's model itself, so a wrong trace shows up as stage 0.
            check = check_equivalence(model, gm, inputs, tolerance_upto(k))
        except Exception as err:  # a graph that no longer runs is broken
            return f"the graph fails to run: {type(err).__name__}: {err}"
        return None if check.passed else check.summary()

    # Stages after 0..k passes, computed lazily (each needs the previous one).
    stages: list[fx.GraphModule] = [reference]
    stage_errors: dict[int, str] = {}

    def stage(k: int) -> fx.GraphModule | None:
        while len(stages) <= k and len(stages) not in stage_errors:
            i = len(stages)
            try:
                gm, _, _ = _apply_pass(pipeline[i - 1], stages[-1], ctx, None)
            except Exception as err:
                stage_errors[i] = f"pass '{pipeline[i - 1].name}' raised {type(err).__name__}: {err}"
                return None
            stages.append(gm)
        return stages[k] if k < len(stages) else None

    def bad_after(k: int) -> str | None:
        gm = stage(k)
        if gm is None:
            return next(iter(stage_errors.values()))
        return broken(gm, k)

    n = len(pipeline)
    last_error = bad_after(n)
    if last_error is None:
        return BisectResult(None, None, runs=state["runs"])
    trace_error = bad_after(0)
    if trace_error is not None:
        return BisectResult("(trace)", 0, error=f"the traced graph already differs from the model: {trace_error}",
                            runs=state["runs"])
    lo, hi = 0, n  # invariant: prefix lo is good, prefix hi is bad
    errors = {n: last_error}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        err = bad_after(mid)
        if err is None:
            lo = mid
        else:
            hi = mid
            errors[mid] = err
    culprit, good = pipeline[hi - 1], stages[hi - 1]
    result = BisectResult(culprit.name, hi, error=errors[hi], runs=state["runs"])

    # Inside the culprit: how many rewrites does it make, and which is the first bad one?
    try:
        _, _, total = _apply_pass(culprit, good, ctx, None)
    except Exception:
        total = 0
    result.rewrites_total = total
    if total == 0:
        return result

    def bad_with(limit: int):
        try:
            gm, res, _ = _apply_pass(culprit, good, ctx, limit)
        except Exception as err:
            return f"pass '{culprit.name}' raised {type(err).__name__}: {err}", None, None
        return broken(gm, hi), gm, res

    rlo, rhi = 0, total  # rewrites rlo: good; rhi: bad (the full run is bad)
    while rhi - rlo > 1:
        mid = (rlo + rhi) // 2
        err, _, _ = bad_with(mid)
        if err is None:
            rlo = mid
        else:
            rhi = mid
    err, gm, res = bad_with(rhi)
    if err is None:
        # Not monotone in the rewrite count (or the check is noisy): report the pass only.
        return result
    result.rewrite_index, result.error, result.runs = rhi, err, state["runs"]
    if res is not None and res.rewrites:
        result.site = res.rewrites[-1] if len(res.rewrites) <= rhi else res.rewrites[rhi - 1]
    if gm is not None:
        before, _, _ = _apply_pass(culprit, good, ctx, rhi - 1)
        try:
            result.divergence = first_divergence(before, gm, inputs[0], tolerance_upto(hi))
        except Exception:
            result.divergence = None
    return result


# -------------------------------------------------------------------------------------- compare
@dataclass
class ArtifactComparison:
    artifact: str
    engine: str
    outputs: list  # qlfx.verify.OutputComparison per output (worst over the input sets)
    inputs_checked: int

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def needed(self) -> float:
        return max((o.needed for o in self.outputs), default=0.0)

    def __str__(self) -> str:
        lines = [f"compare {self.artifact} ({self.engine}) against the model on {self.inputs_checked} input set(s):"]
        for o in self.outputs:
            lines.append(f"  {'PASS' if o.passed else 'FAIL'} {o}")
        lines.append(f"smallest relative tolerance that passes every output: {self.needed:.3g}")
        return "\n".join(lines)


def _artifact_runner(path: Path):
    """(engine name, fn(list[np.ndarray]) -> list[np.ndarray])."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise UsageError("comparing an .onnx file needs onnxruntime (pip install onnxruntime)") from err
        try:
            opts = ort.SessionOptions()
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise UsageError(f"onnxruntime cannot load '{path}': {str(err).strip()[:300]}") from err
        names = [i.name for i in session.get_inputs()]
        return "onnxruntime", lambda arrays: session.run(None, dict(zip(names, arrays)))
    if suffix in (".so", ".json"):
        try:
            from .emit.tvm_runtime import load
        except ImportError as err:
            raise UsageError(f"comparing a TVM module needs qlfx.emit.tvm_runtime: {err}") from err
        try:
            module = load(path)
        except Exception as err:
            raise UsageError(f"cannot load TVM module '{path}': {type(err).__name__}: {str(err).strip()[:300]}") from err
        return "tvm", lambda arrays: module(*arrays)
    raise UsageError(f"unknown artifact type '{path.suffix}' for '{path}': give an .onnx file or a TVM .so export")


def compare_artifact(model, artifact: str | Path, example_inputs: Sequence[torch.Tensor], *,
                     tolerance: Tolerance | float | None = None, count: int = 3, seed: int = 0) -> ArtifactComparison:
    """Run ``model`` (torch) and ``artifact`` on ``count`` seeded random inputs shaped like
    ``example_inputs``; per output: max abs / rel error and the smallest tolerance that passes
    (:func:`qlfx.verify.compare_tensor`)."""
    import numpy as np

    from .verify import _merge, compare_tensor, run_outputs

    path = Path(artifact)
    if not path.is_file():
        raise UsageError(f"artifact '{path}' does not exist (write one with `qlfx run MODEL --emit onnx -o {path}`)")
    if isinstance(tolerance, (int, float)):
        tolerance = Tolerance(rel=float(tolerance))
    tol = tolerance or Tolerance(rel=1e-4)
    engine, run = _artifact_runner(path)
    worst: list = []
    sets = random_inputs(ir.check_example_inputs(example_inputs), seed, count)
    for inputs in sets:
        refs = run_outputs(model, inputs)
        try:
            got = run([t.detach().cpu().numpy() for t in inputs])
        except Exception as err:
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
            raise UsageError(f"{engine} failed on inputs of shape {shapes}: {str(err).strip()[:300]}\n"
                             f"  Give the input shape the artifact was built for (--input-shape).") from err
        if len(got) != len(refs):
            raise UsageError(f"the model returns {len(refs)} output(s) but '{path}' returns {len(got)}")
        if not worst:
            worst = [None] * len(refs)
        for i, (r, g) in enumerate(zip(refs, got)):
            worst[i] = _merge(worst[i], compare_tensor(r, torch.from_numpy(np.asarray(g)), tol, i))
    return ArtifactComparison(str(path), engine, worst, len(sets))


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


def highlighted_dot(gm: fx.GraphModule, names, title: str = "") -> str:
    """:func:`qlfx.graphviz.to_dot` with the nodes in ``names`` filled orange (the nodes a pass added or
    whose arguments it changed; provenance alone misses rewired nodes, e.g. a conv given folded weights)."""
    from .graphviz import to_dot

    names = set(names)
    lines = []
    for line in to_dot(gm, title=title).splitlines():
        m = re.match(r'^  "([^"]+)" \[label=', line)
        if m and m.group(1) in names and "fillcolor" not in line and line.endswith("];"):
            line = line[:-2] + ', style=filled, fillcolor="#ffb347"];'
        lines.append(line)
    return "\n".join(lines) + "\n"


class ReportCollector(Instrument):
    """Records every stage for :func:`write_report`: node diff, params, MACs, time, picture."""

    def __init__(self, pictures: bool = True):
        from .graphviz import dot_available

        self.pictures = pictures
        self.svg_problem = None if dot_available() else (
            "Graphviz `dot` is not installed: the report has no pictures (apt-get install graphviz)")
        self.stages: list[StageRecord] = []
        self._before = None
        self._t0 = 0.0

    def _picture(self, gm, names, title):
        from .graphviz import render_svg

        if not self.pictures:
            return None, None
        dot = highlighted_dot(gm, names, title=title)
        if self.svg_problem:
            return None, dot
        try:
            svg = render_svg(dot).decode()
            return svg[svg.find("<svg"):] if "<svg" in svg else svg, dot
        except Exception as err:
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
    own per-pass seconds (pass run + shape propagation)."""
    rows = [r for r in getattr(report, "rows", [])][1:]
    for stage, row in zip(collector.stages[1:], rows):
        if row.pass_name == stage.name:
            stage.seconds = row.seconds


def _fmt_err(check) -> tuple[str, str, str]:
    if check is None:
        return "-", "-", "-"
    return f"{check.max_abs:.2e}", f"{check.max_rel:.2e}", f"{check.needed:.2e}"


def render_markdown(stages: Sequence[StageRecord], title: str = "qlfx report", error: str | None = None,
                    svg_dir: str | None = None) -> str:
    out = [f"# {title}", ""]
    if error:
        out += ["**FAILED**", "", "```", error, "```", ""]
    out += ["| # | pass | contract | changed | max abs err | max rel err | tol needed | params | MACs | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for s in stages:
        a, r, nd = _fmt_err(s.check)
        flag = " **(broke equivalence)**" if s.failed else ""
        out.append(f"| {s.index} | {s.name}{flag} | {s.contract} | {'yes' if s.changed else 'no'} | {a} | {r} | {nd} | "
                   f"{s.params:,} | {s.macs:,} | {s.seconds:.3f} |")
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
        a, r, nd = _fmt_err(s.check)
        cls = ' class="bad"' if s.failed else ""
        rows.append(f"<tr{cls}><td>{s.index}</td><td><a href='#stage{s.index}'>{e(s.name)}</a></td><td>{s.contract}</td>"
                    f"<td>{'yes' if s.changed else 'no'}</td><td>{a}</td><td>{r}</td><td>{nd}</td>"
                    f"<td>{s.params:,}</td><td>{s.macs:,}</td><td>{s.seconds:.3f}</td></tr>")
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
    parts.append("<table><tr><th>#</th><th>pass</th><th>contract</th><th>changed</th><th>max abs err</th>"
                 "<th>max rel err</th><th>tol needed</th><th>params</th><th>MACs</th><th>seconds</th></tr>")
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
    from .io import atomic_write

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
    made highlighted. Without Graphviz it writes the .dot files and says so in ``problem``."""

    def __init__(self, directory):
        from .graphviz import dot_available
        from .io import ensure_writable_dir

        self.directory = ensure_writable_dir(directory)
        self.problem = None if dot_available() else (
            "Graphviz `dot` is not installed, so only .dot files were written to "
            f"{self.directory} (install it: apt-get install graphviz; or open the .dot files in a viewer)")
        self.written: list[Path] = []
        self._before = ""

    def _write(self, stem, gm, names, title):
        from .graphviz import render_svg
        from .io import atomic_write

        dot = highlighted_dot(gm, names, title=title)
        if self.problem:
            self.written.append(atomic_write(self.directory / f"{stem}.dot", dot))
        else:
            self.written.append(atomic_write(self.directory / f"{stem}.svg", render_svg(dot)))

    def on_start(self, gm):
        self._write("000_input", gm, (), "input graph")

    def before_pass(self, index, pass_, gm):
        self._before = graph_code(gm)

    def after_pass(self, index, pass_, gm, result, check):
        d = diff_code(self._before, graph_code(gm))
        self._write(f"{index:03d}_{pass_.name}", gm, d.added + d.changed, f"after {pass_.name}")
