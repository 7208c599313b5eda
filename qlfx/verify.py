"""Equivalence checking between two graphs (Polygraphy-style compare).

The rule, per output: ``max|new - ref| <= tol * max|ref| + atol`` where ``tol`` defaults by dtype
(fp32: 1e-4, fp64: 1e-10, fp16/bf16: 1e-2) and ``atol`` defaults to 0. The smallest ``tol`` that would
have passed (``needed``) is ``max|new - ref| / max|ref|``. A NaN or Inf in a new output where the
reference value is finite always fails. A lossy pass may also be held to an accuracy budget on labelled
calibration data (:class:`AccuracyCheck`: top-1 of the first output, labels < 0 are unlabelled samples;
the drop in percentage points must not exceed the allowed one). When outputs fail, :func:`first_divergence` runs both graphs
node by node and names the first value (in the new graph's order) that is present in both graphs and
differs beyond the same rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .ir import ORIGIN, module_path, op_name, value_key

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass
class Tolerance:
    """``max|new-ref| <= rel * max|ref| + abs`` per output. ``rel=None`` takes the dtype default."""

    rel: float | None = None
    abs: float = 0.0

    def rel_for(self, dtype: torch.dtype) -> float:
        return self.rel if self.rel is not None else DEFAULT_TOL.get(dtype, 1e-4)

    @classmethod
    def exact(cls) -> "Tolerance":
        return cls(rel=0.0, abs=0.0)


@dataclass
class OutputComparison:
    index: int
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # elementwise |new-ref| / |ref| over elements with |ref| > 1e-6 * max|ref|
    ref_max: float
    needed: float  # the smallest rel tolerance that passes: max_abs / max|ref|
    allowed: float
    new_nonfinite: int
    passed: bool

    def __str__(self) -> str:
        extra = f", {self.new_nonfinite} new NaN/Inf" if self.new_nonfinite else ""
        return (f"output {self.index}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
                f"needs tol {self.needed:.3g} (allowed {self.allowed:.3g}){extra}")


@dataclass
class AccuracyCheck:
    """Top-1 accuracy (percent) of the reference and the candidate on labelled samples."""

    before: float
    after: float
    samples: int
    allowed_drop: float

    @property
    def drop(self) -> float:
        return self.before - self.after

    @property
    def passed(self) -> bool:
        return self.drop <= self.allowed_drop + 1e-9

    def __str__(self) -> str:
        return (f"top-1 {self.before:.2f}% -> {self.after:.2f}% on {self.samples} labelled samples: drop "
                f"{self.drop:.2f} points (allowed {self.allowed_drop:.2f})")


@dataclass
class EquivalenceCheck:
    outputs: list[OutputComparison] = field(default_factory=list)
    inputs_checked: int = 0
    accuracy: AccuracyCheck | None = None
    # A lossy pass's check on the held-out calibration sets its search did not see (qlfx.pass_manager):
    # reported, not part of ``passed``.
    holdout: "EquivalenceCheck | None" = None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and (self.accuracy is None or self.accuracy.passed)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def needed(self) -> float:
        return max((o.needed for o in self.outputs), default=0.0)

    @property
    def allowed(self) -> float:
        """The tolerance ``needed`` is held to (the tightest over the outputs)."""
        return min((o.allowed for o in self.outputs), default=0.0)

    def summary(self) -> str:
        bad = [o for o in self.outputs if not o.passed] or self.outputs
        text = "; ".join(str(o) for o in bad) + f" over {self.inputs_checked} input set(s)"
        return text + (f"; {self.accuracy}" if self.accuracy is not None else "")


# Report column names, one vocabulary for every report: the checked quantity is "err/max|ref|", held to
# "allowed"; the elementwise relative error is information (it can exceed the tolerance and still pass).
ERROR_COLUMNS = ("err/max|ref|", "allowed", "max abs err", "elementwise rel")


def error_cells(check: "EquivalenceCheck | None") -> tuple[str, str, str, str]:
    if check is None:
        return ("-",) * len(ERROR_COLUMNS)
    return f"{check.needed:.2e}", f"{check.allowed:.0e}", f"{check.max_abs:.2e}", f"{check.max_rel:.2e}"


@dataclass
class Divergence:
    node: str
    op: str
    target: str
    created_by: str
    max_abs: float
    needed: float
    module: str = ""

    def __str__(self) -> str:
        where = f" in {self.module}" if self.module else ""
        return (f"%{self.node} ({self.target}{where}, made by {self.created_by}): max abs "
                f"{self.max_abs:.3g}, needs tol {self.needed:.3g}")


def random_inputs(examples: Sequence[torch.Tensor], seed: int, count: int,
                  vary_batch: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """``count`` seeded random input sets shaped like ``examples`` (normal for floats, the example's own
    values for integer inputs). ``vary_batch`` (graphs with a symbolic batch): every other set has a
    batch two larger, so the check covers more than the example's batch size."""
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for i in range(count):
        one = []
        for t in examples:
            shape = tuple(t.shape)
            if vary_batch and i % 2 == 1 and len(shape) > 0:
                shape = (shape[0] + 2,) + shape[1:]
            if t.is_floating_point():
                one.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(t.dtype))
            elif shape == tuple(t.shape):
                one.append(t.clone())
            else:
                one.append(t[:1].expand(shape).clone())
        sets.append(tuple(one))
    return sets


def run_outputs(gm: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*inputs)
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def compare_tensor(ref: torch.Tensor, new: torch.Tensor, tol: Tolerance, index: int = 0) -> OutputComparison:
    ref64, new64 = ref.detach().double(), new.detach().double()
    if ref64.shape != new64.shape:
        return OutputComparison(index, tuple(new64.shape), float("inf"), float("inf"), 0.0, float("inf"),
                                0.0, 0, False)
    ref_finite = torch.isfinite(ref64)
    new_nonfinite = int((~torch.isfinite(new64) & ref_finite).sum())
    both = ref_finite & torch.isfinite(new64)
    diff = (new64 - ref64).abs()[both]
    refs = ref64.abs()[both]
    max_abs = float(diff.max()) if diff.numel() else 0.0
    ref_max = float(refs.max()) if refs.numel() else 0.0
    significant = refs > 1e-6 * ref_max
    max_rel = float((diff[significant] / refs[significant]).max()) if bool(significant.any()) else 0.0
    needed = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    if new_nonfinite:
        needed = float("inf")
    rel = tol.rel_for(ref.dtype)
    allowed = (rel * ref_max if ref_max > 0 else 0.0) + tol.abs  # rel may be inf (no output budget)
    passed = new_nonfinite == 0 and max_abs <= allowed
    return OutputComparison(index, tuple(new64.shape), max_abs, max_rel, ref_max, needed,
                            tol.rel_for(ref.dtype), new_nonfinite, passed)


def _merge(a: OutputComparison | None, b: OutputComparison) -> OutputComparison:
    """Worst case over several input sets."""
    if a is None:
        return b
    return OutputComparison(
        a.index, a.shape, max(a.max_abs, b.max_abs), max(a.max_rel, b.max_rel), max(a.ref_max, b.ref_max),
        max(a.needed, b.needed), a.allowed, a.new_nonfinite + b.new_nonfinite, a.passed and b.passed,
    )


def compare_outputs(reference_outputs: Sequence[Sequence[torch.Tensor]],
                    candidate_outputs: Sequence[Sequence[torch.Tensor]], tol: Tolerance) -> EquivalenceCheck:
    """Compare every output of every input set under ``tol`` (worst case per output)."""
    worst: list[OutputComparison | None] = []
    for refs, news in zip(reference_outputs, candidate_outputs):
        if len(refs) != len(news):
            raise ValueError(f"the graphs return {len(refs)} and {len(news)} tensors")
        if not worst:
            worst = [None] * len(refs)
        for i, (r, n) in enumerate(zip(refs, news)):
            worst[i] = _merge(worst[i], compare_tensor(r, n, tol, i))
    return EquivalenceCheck([w for w in worst if w is not None], len(candidate_outputs))


def check_against(reference: torch.nn.Module | None, candidate: torch.nn.Module,
                  input_sets: Sequence[Sequence[torch.Tensor]], tol: Tolerance,
                  reference_outputs: Sequence[Sequence[torch.Tensor]] | None = None
                  ) -> tuple[EquivalenceCheck, list[list[torch.Tensor]]]:
    """Run the candidate (and the reference, unless its outputs are given) on every input set; return
    the check and the candidate's outputs (the next pass's reference)."""
    if reference_outputs is None:
        reference_outputs = [run_outputs(reference, inputs) for inputs in input_sets]
    news = [run_outputs(candidate, inputs) for inputs in input_sets]
    return compare_outputs(reference_outputs, news, tol), news


def check_equivalence(reference: torch.nn.Module, candidate: torch.nn.Module,
                      input_sets: Sequence[Sequence[torch.Tensor]], tol: Tolerance) -> EquivalenceCheck:
    """Run both on every input set and compare every output under ``tol``."""
    return check_against(reference, candidate, input_sets, tol)[0]


def top1_correct(output: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, labelled) for class scores ``output`` [N, classes, ...] and ``labels`` [N, ...];
    negative labels mark unlabelled samples and are not counted."""
    if output.dim() < 2 or tuple(labels.shape) != (output.shape[0],) + tuple(output.shape[2:]):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match class scores of shape "
                         f"{tuple(output.shape)}: one label per sample (and per position beyond the class axis)")
    known = labels >= 0
    return int(((output.argmax(1) == labels) & known).sum()), int(known.sum())


def accuracy(gm: torch.nn.Module, input_sets: Sequence[Sequence[torch.Tensor]],
             labels: Sequence[torch.Tensor | None]) -> tuple[float, int]:
    """(top-1 percent, labelled samples) of the first output over the labelled input sets."""
    correct = total = 0
    for inputs, target in zip(input_sets, labels):
        if target is None:
            continue
        c, n = top1_correct(run_outputs(gm, inputs)[0], target)
        correct, total = correct + c, total + n
    return (100.0 * correct / total if total else float("nan")), total


def check_accuracy(reference: torch.nn.Module, candidate: torch.nn.Module,
                   input_sets: Sequence[Sequence[torch.Tensor]], labels: Sequence[torch.Tensor | None],
                   max_drop: float) -> AccuracyCheck:
    before, samples = accuracy(reference, input_sets, labels)
    if samples == 0:
        raise ValueError("an accuracy budget needs labelled calibration samples; none are labelled")
    after, _ = accuracy(candidate, input_sets, labels)
    return AccuracyCheck(before, after, samples, float(max_drop))


def record_values(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor value the graph computes, keyed by :func:`qlfx.ir.value_key`."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and n.op not in ("get_attr", "output"):
                values[value_key(n)] = out.detach()  # functional graph: no op writes to it later
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


def first_divergence(reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[torch.Tensor],
                     tol: Tolerance) -> Divergence | None:
    """The first node of ``candidate`` whose value also exists in ``reference`` and differs beyond
    ``tol`` (relative to that value's own max), or None."""
    ref_values = record_values(reference, inputs)
    new_values = record_values(candidate, inputs)
    for node in candidate.graph.nodes:
        key = value_key(node)
        if node.op in ("placeholder", "get_attr", "output") or key not in ref_values or key not in new_values:
            continue
        cmp = compare_tensor(ref_values[key], new_values[key], tol)
        if not cmp.passed:
            return Divergence(node.name, node.op, op_name(node), node.meta.get(ORIGIN, "?"), cmp.max_abs, cmp.needed,
                              module_path(node))
    return None
