"""Passes, their registry, pipelines, and the pass manager that verifies after every pass.

A pass is a class with a kebab-case ``name``, a one-line ``description``, a ``contract`` and a
``run(gm, ctx) -> PassResult`` that rewrites ``gm`` in place (the manager hands it a copy, so the graph
before the pass survives as the reference and as the last good graph):

- ``exact``: outputs are bit-identical (checked with tolerance 0);
- ``equivalent``: the same function up to float rounding (checked with the dtype tolerance);
- ``lossy``: changes the function within a budget the user sets (checked against that budget): an
  output-error bound ``budget`` (relative, like the tolerance above) and/or ``accuracy_drop``, the
  most top-1 accuracy (percentage points) it may lose on the labelled calibration data.

Pipelines are lists of names/Pass objects or strings ``"fold-bn,dce"``; options go in angle brackets,
LLVM style: ``"slice<budget=0.01>,dce"``.

A pass may declare what it needs from the graph in ``requires`` (:mod:`qlfx.requirements`: ``bn-folded``,
``constants-folded``, ...). The manager checks each before the pass runs; an unmet one is reported with
the pass that establishes it ("fuse-product needs fold-bn first (16 products are blocked by a BN)"), and
with ``auto_prereqs=True`` that pass is run first.

**Held-out calibration for lossy passes.** A budget searched on the calibration data holds on that data
by construction, not on the next input. The context therefore splits the calibration sets
deterministically (:attr:`PassContext.holdout_indices`: a fraction ``config["holdout"]``, default 0.25,
of the sets, evenly spaced, e.g. every 4th): a lossy pass searches its budget on
``ctx.search_calibration`` / ``ctx.search_labels`` only, and the manager checks its budgets on the
random input sets plus that search part (a failure is an EquivalenceError, as before) and, separately,
measures the same error and accuracy on ``ctx.holdout_calibration`` / ``ctx.holdout_labels``
(``check.holdout``; the report's notes and ``to_dict()["holdout"]``). A held-out error beyond the budget is
a warning (:class:`HeldOutBudgetWarning` and a report note), not a failure: it says the budget does not
generalise from that many samples. With a single calibration set (or ``config["holdout"] = 0``) nothing is
held out; the search and the check use every set, and the report says so once. Passes that are not
lossy see every set in ``ctx.calibration``.
"""
from __future__ import annotations

import difflib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from . import ir
from .errors import EquivalenceError, PassError, QlfxError, UnknownPassError, UsageError
from .requirements import Requirement, UnmetRequirement
from .verify import (ERROR_COLUMNS, EquivalenceCheck, Tolerance, check_accuracy, check_against, compare_outputs,
                     error_cells, first_divergence, random_inputs, run_outputs)

CONTRACTS = ("exact", "equivalent", "lossy")
DEFAULT_HOLDOUT = 0.25  # fraction of calibration sets a lossy pass's search does not see


class HeldOutBudgetWarning(UserWarning):
    """A lossy pass kept its budget on the calibration it searched on but not on the held-out sets."""


@dataclass
class Skip:
    """A place a pass looked at and left alone, and why. ``needs``: the requirement whose violation
    blocked it (e.g. ``requirements.BN_FOLDED`` for a product whose factor is a BN), so the report can
    say which pass would have enabled it."""

    site: str
    reason: str
    needs: Requirement | None = None

    def __str__(self) -> str:
        if self.needs is None:
            return f"{self.site}: {self.reason}"
        return f"{self.site}: {self.reason} [needs {self.needs.name}: {self.needs.what_enables}]"


@dataclass
class PassResult:
    changed: bool
    rewrites: list[str] = field(default_factory=list)  # sites rewritten, in order
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    # Filled in by the pass manager: the pass's requirements that did not hold when it ran.
    unmet: list[UnmetRequirement] = field(default_factory=list)


class Pass:
    """Base class. Subclasses set ``name``, ``description``, ``contract`` and implement ``run``.

    ``options`` are keyword arguments from the pipeline string or the constructor; a pass declares the
    ones it takes in ``option_defaults``. ``requires``: what it needs from the graph (see
    :mod:`qlfx.requirements`); ``site_noun``: what its sites are, for the report ("16 products are
    blocked by a BN").
    """

    name: str = ""
    description: str = ""
    contract: str = "equivalent"
    option_defaults: dict[str, Any] = {}
    requires: tuple[Requirement, ...] = ()
    site_noun: str = "site"

    def __init__(self, **options):
        unknown = set(options) - set(self.option_defaults)
        if unknown:
            raise UsageError(
                f"pass '{self.name}' has no option(s) {sorted(unknown)}; it takes {sorted(self.option_defaults) or 'none'}"
            )
        self.options = {**self.option_defaults, **options}

    def run(self, gm: fx.GraphModule, ctx: "PassContext") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def lossy_budgets(self) -> tuple[float | None, float | None]:
        """For a lossy pass: (relative output-error budget, accuracy drop in points), None where not set.
        The pass manager checks the pass against each one that is set."""
        budget, drop = self.options.get("budget"), self.options.get("accuracy_drop")
        return (None if budget is None else float(budget)), (None if drop is None else float(drop))

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items() if self.option_defaults.get(k) != v)
        return f"{self.name}<{opts}>" if opts else self.name


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry (names must be unique and kebab-case)."""
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name or "_" in cls.name:
        raise ValueError(f"pass name {cls.name!r} must be non-empty kebab-case")
    if cls.contract not in CONTRACTS:
        raise ValueError(f"pass {cls.name}: contract must be one of {CONTRACTS}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes named {cls.name!r}: {_REGISTRY[cls.name]} and {cls}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    import qlfx.passes  # noqa: F401  (importing registers them)


def list_passes() -> dict[str, type[Pass]]:
    """The registry: pass name -> pass class (each has .description and .contract)."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str, **options) -> Pass:
    _load_builtin_passes()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownPassError(
            f"unknown pass '{name}'.{hint} Known passes: {', '.join(sorted(_REGISTRY))} (see `qlfx passes`)"
        )
    return _REGISTRY[name](**options)


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _split_top(spec: str) -> list[str]:
    """Split on commas that are not inside <...>."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_pipeline(spec: str | Iterable[str | Pass] | None) -> list[Pass]:
    """Turn ``"fold-bn,slice<budget=0.01>"`` or a list of names / Pass objects into Pass objects."""
    if spec is None:
        return []
    items = _split_top(spec) if isinstance(spec, str) else list(spec)
    passes = []
    for item in items:
        if isinstance(item, Pass):
            passes.append(item)
            continue
        if isinstance(item, type) and issubclass(item, Pass):
            passes.append(item())
            continue
        if not isinstance(item, str):
            raise UsageError(f"a pipeline holds pass names or Pass objects, not {type(item).__name__}")
        name, options = item, {}
        if "<" in item:
            if not item.endswith(">"):
                raise UsageError(f"bad pass options in '{item}': write name<key=value,key=value>")
            name, body = item[:-1].split("<", 1)
            for kv in filter(None, (s.strip() for s in body.split(";" if ";" in body else ","))):
                if "=" not in kv:
                    raise UsageError(f"bad pass option '{kv}' in '{item}': write key=value")
                k, v = kv.split("=", 1)
                options[k.strip()] = _parse_value(v.strip())
        passes.append(get_pass(name.strip(), **options))
    return passes


# ------------------------------------------------------------------------------------- the manager
@dataclass
class PassContext:
    """What a pass may read besides the graph."""

    example_inputs: tuple[torch.Tensor, ...]
    calibration: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    # Per calibration set, its labels (negative: unlabelled sample) or None; empty when none were given.
    labels: list[torch.Tensor | None] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    # For bisection: the most rewrites a pass may apply (None: no limit). Passes that rewrite site by
    # site call ``ctx.allow_rewrite()`` before each one.
    rewrite_limit: int | None = None
    _rewrites_done: int = 0
    # The graph has a symbolic batch size (qlfx.compile(..., dynamic_batch=True)).
    dynamic_batch: bool = False

    @property
    def holdout_fraction(self) -> float:
        """The fraction of calibration sets held out from lossy passes' searches (``config["holdout"]``)."""
        value = self.config.get("holdout", DEFAULT_HOLDOUT)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise UsageError(f"config['holdout'] is the fraction of calibration sets held out from lossy passes' "
                             f"searches, a number in [0, 1) (0: none), got {value!r}")
        return float(value)

    @property
    def holdout_indices(self) -> list[int]:
        """Indices into ``calibration`` of the held-out sets: round(n * fraction) of them (at least one, at
        most n - 1), evenly spaced and ending at the last set; none with fewer than two sets."""
        n, fraction = len(self.calibration), self.holdout_fraction
        if n < 2 or fraction == 0.0:
            return []
        k = min(n - 1, max(1, round(n * fraction)))
        return sorted({(i + 1) * n // k - 1 for i in range(k)})

    def _split(self, items: list, held: bool) -> list:
        chosen = set(self.holdout_indices)
        return [x for i, x in enumerate(items) if (i in chosen) == held]

    @property
    def search_calibration(self) -> list[tuple[torch.Tensor, ...]]:
        """The calibration sets a lossy pass may fit to (all of them when nothing is held out)."""
        return self._split(list(self.calibration), False)

    @property
    def search_labels(self) -> list[torch.Tensor | None]:
        return self._split(self._padded_labels(), False) if self.labels else []

    @property
    def holdout_calibration(self) -> list[tuple[torch.Tensor, ...]]:
        """The sets the manager reports a lossy pass's error on and the pass never sees in its search."""
        return self._split(list(self.calibration), True)

    @property
    def holdout_labels(self) -> list[torch.Tensor | None]:
        return self._split(self._padded_labels(), True) if self.labels else []

    def _padded_labels(self) -> list[torch.Tensor | None]:
        return list(self.labels) + [None] * (len(self.calibration) - len(self.labels))

    @property
    def rewrites_done(self) -> int:
        """Rewrites the current pass has applied so far (counted by :meth:`allow_rewrite`)."""
        return self._rewrites_done

    def allow_rewrite(self) -> bool:
        if self.rewrite_limit is not None and self._rewrites_done >= self.rewrite_limit:
            return False
        self._rewrites_done += 1
        return True


def holdout_summary(check: EquivalenceCheck) -> str:
    """One line on a lossy pass's held-out check: its error beside the budget, and the verdict."""
    h = check.holdout
    accuracy = f"; {h.accuracy}" if h.accuracy is not None else ""
    verdict = "within the budget" if h.passed else "EXCEEDS the budget: it does not generalise from the search sets"
    return (f"held-out: err/max|ref| {h.needed:.3g} (budget {h.allowed:.3g}) on {h.inputs_checked} calibration "
            f"set(s) the search did not see (search: {check.needed:.3g}){accuracy}; {verdict}")


@dataclass
class ReportRow:
    pass_name: str
    contract: str
    changed: bool
    check: EquivalenceCheck | None
    seconds: float
    params: int
    nonzero: int
    result: PassResult | None = None


@dataclass
class Report:
    rows: list[ReportRow] = field(default_factory=list)

    def __str__(self) -> str:
        head = ("pass", "contract", "changed", *ERROR_COLUMNS, "seconds", "params", "nonzero")
        lines = []
        for r in self.rows:
            lines.append((r.pass_name, r.contract, "yes" if r.changed else "no", *error_cells(r.check),
                          f"{r.seconds:.3f}", f"{r.params:,}", f"{r.nonzero:,}"))
        widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
        out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*l) for l in lines]
        notes = []
        for r in self.rows:
            if r.check is not None and r.check.accuracy is not None:
                notes.append(f"  [{r.pass_name}] checked {r.check.accuracy}")
            if r.check is not None and r.check.holdout is not None:
                notes.append(f"  [{r.pass_name}] {holdout_summary(r.check)}")
            if r.result is None:
                continue
            for s in r.result.skipped:
                notes.append(f"  [{r.pass_name}] skipped {s}")
            for n in r.result.notes:
                notes.append(f"  [{r.pass_name}] {n}")
        if notes:
            out += ["", "notes:"] + notes
        return "\n".join(out)

    def to_dict(self) -> list[dict[str, Any]]:
        return [
            {"pass": r.pass_name, "contract": r.contract, "changed": r.changed, "seconds": r.seconds,
             "params": r.params, "nonzero": r.nonzero,
             "max_abs": r.check.max_abs if r.check else None, "max_rel": r.check.max_rel if r.check else None,
             "tol_needed": r.check.needed if r.check else None,
             "accuracy": (None if r.check is None or r.check.accuracy is None else
                          {"before": r.check.accuracy.before, "after": r.check.accuracy.after,
                           "samples": r.check.accuracy.samples, "allowed_drop": r.check.accuracy.allowed_drop}),
             "holdout": (None if r.check is None or r.check.holdout is None else
                         {"err": r.check.holdout.needed, "allowed": r.check.holdout.allowed,
                          "sets": r.check.holdout.inputs_checked, "passed": r.check.holdout.passed,
                          "accuracy_after": (None if r.check.holdout.accuracy is None
                                             else r.check.holdout.accuracy.after)}),
             "rewrites": r.result.rewrites if r.result else [],
             "skipped": [str(s) for s in r.result.skipped] if r.result else [],
             "unmet_requirements": ([{"requirement": u.requirement.name, "established_by": u.requirement.established_by,
                                      "blocked": u.blocked, "message": u.message} for u in r.result.unmet]
                                    if r.result else [])}
            for r in self.rows
        ]


class PassManager:
    """Runs passes in order; after each one checks the new graph against the graph before it.

    ``tolerance`` overrides the dtype default for ``equivalent`` passes; a ``lossy`` pass is checked
    against its own budgets (:meth:`Pass.lossy_budgets`): ``budget``, a relative output tolerance, and
    ``accuracy_drop``, top-1 points on the labelled calibration sets.
    """

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Any] = (), verify: bool = True,
                 tolerance: Tolerance | None = None, verify_inputs: int = 2, seed: int = 0,
                 auto_prereqs: bool = False):
        self.passes = list(passes)
        # Run the pass that establishes an unmet requirement before the pass that needs it (once each).
        self.auto_prereqs = auto_prereqs
        self.executed: list[Pass] = []  # what the last run() ran, inserted prerequisites included
        self.instruments = list(instruments)
        self.verify = verify
        self.tolerance = tolerance or Tolerance()
        self.verify_inputs = verify_inputs
        self.seed = seed
        self._said_no_holdout = False

    def _tolerance_for(self, p: Pass) -> Tolerance:
        if p.contract == "exact":
            return Tolerance.exact()
        if p.contract == "lossy":
            budget, drop = p.lossy_budgets()
            if budget is None and drop is None:
                raise UsageError(f"lossy pass '{p.name}' needs a budget: {p.name}<budget=0.01> (relative output "
                                 f"error) or {p.name}<accuracy_drop=0.5> (points, on labelled calibration data)")
            # only an accuracy budget: outputs may move freely, but a new NaN/Inf still fails
            return Tolerance(rel=float("inf") if budget is None else budget, abs=self.tolerance.abs)
        return self.tolerance

    def _check_labels_for(self, p: Pass, ctx: "PassContext") -> None:
        if p.contract == "lossy" and p.lossy_budgets()[1] is not None:
            if not any(y is not None and bool((y >= 0).any()) for y in ctx.labels):
                raise UsageError(f"'{p.name}' has an accuracy budget but no calibration sample is labelled: pass "
                                 f"labels with the calibration data (qlfx.compile(..., calibration=x, labels=y); "
                                 f"CLI: --calibration x.npy --labels y.npy)")

    def input_sets(self, ctx: PassContext) -> list[tuple[torch.Tensor, ...]]:
        return random_inputs(ctx.example_inputs, self.seed, self.verify_inputs,
                             vary_batch=ctx.dynamic_batch) + list(ctx.calibration)

    def check_trace(self, model: torch.nn.Module, gm: fx.GraphModule, ctx: PassContext, seconds: float = 0.0) -> Report:
        """Check the captured graph against the model itself; start the report with that row. The
        graph's outputs are kept as the reference of the first pass."""
        report = Report()
        check = None
        self._reference_outputs = None
        if self.verify:
            inputs = self.input_sets(ctx)
            check, self._reference_outputs = check_against(model, gm, inputs, self.tolerance)
            if not check.passed:
                raise EquivalenceError("trace", check, None, None, report)
        params, nonzero = ir.count_params(gm)
        report.rows.append(ReportRow("(trace)", "equivalent", False, check, seconds, params, nonzero))
        return report

    def apply(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, report: Report | None = None) -> tuple[fx.GraphModule, PassResult]:
        """Run ``p`` on a copy of ``gm``; return the rewritten copy (vals refreshed, nodes stamped) and
        the result. Whatever goes wrong inside the pass is a :class:`PassError` naming the pass and the
        node it was working on; ``gm`` itself is never touched."""
        candidate = ir.copy_graph_module(gm)
        before = ir.args_snapshot(candidate)
        ctx._rewrites_done = 0
        try:
            result = p.run(candidate, ctx)
        except QlfxError:
            raise  # a UsageError (bad option value) or a nested check says what it means already
        except Exception as err:  # noqa: BLE001 - every bug in a pass is reported as that pass's failure
            raise PassError(p.name, err, _node_in_traceback(err, candidate), gm, report) from err
        if not isinstance(result, PassResult):
            raise PassError(p.name, TypeError(f"run() returned {type(result).__name__}, not PassResult"),
                            None, gm, report, stage="broke its contract")
        try:
            candidate.graph.lint()
            candidate.recompile()
            ir.stamp_origin(candidate, p.name)
            ir.refresh_vals(candidate, before)
        except Exception as err:  # noqa: BLE001
            raise PassError(p.name, err, _node_in_traceback(err, candidate), gm, report,
                            stage="left a malformed graph") from err
        return candidate, result

    def check_pass(self, p: Pass, before: fx.GraphModule, candidate: fx.GraphModule, ctx: PassContext,
                   inputs: Sequence[Sequence[torch.Tensor]], reference_outputs=None, report: Report | None = None
                   ) -> tuple[EquivalenceCheck, list[list[torch.Tensor]]]:
        """Judge ``candidate`` (``before`` after ``p``) by p's contract: its tolerance on every input set
        and, for a lossy pass with ``accuracy_drop``, the accuracy check. Returns the check and the
        candidate's outputs."""
        tolerance = self._tolerance_for(p)  # a lossy pass without a budget is the user's error, said first
        try:
            if reference_outputs is not None and ir.same_program(before, candidate):
                # the same code on the same weights: its outputs are the reference's, bit for bit
                reference_outputs, outputs = reference_outputs, reference_outputs
            else:
                if reference_outputs is None:
                    reference_outputs = [run_outputs(before, s) for s in inputs]
                outputs = check_against(before, candidate, inputs, tolerance, reference_outputs)[1]
        except Exception as err:  # noqa: BLE001 - the rewritten graph does not even run
            raise PassError(p.name, err, None, before, report, stage="made a graph that fails to run") from err
        # A lossy pass is held to its budgets on what its search saw (the random sets and the search part of
        # the calibration); the held-out part is measured alike and reported (module docstring).
        offset = len(inputs) - len(ctx.calibration)  # input_sets(): the random sets, then the calibration
        held = {offset + i for i in ctx.holdout_indices} if p.contract == "lossy" else set()
        searched = [i for i in range(len(inputs)) if i not in held]
        check = compare_outputs([reference_outputs[i] for i in searched], [outputs[i] for i in searched], tolerance)
        if held:
            check.holdout = compare_outputs([reference_outputs[i] for i in sorted(held)],
                                            [outputs[i] for i in sorted(held)], tolerance)
        drop = p.lossy_budgets()[1] if p.contract == "lossy" else None
        if drop is not None:
            check.accuracy = check_accuracy(before, candidate, ctx.search_calibration, ctx.search_labels, drop)
            if held and any(y is not None and bool((y >= 0).any()) for y in ctx.holdout_labels):
                check.holdout.accuracy = check_accuracy(before, candidate, ctx.holdout_calibration,
                                                        ctx.holdout_labels, drop)
        return check, outputs

    def run(self, gm: fx.GraphModule, ctx: PassContext, report: Report | None = None) -> tuple[fx.GraphModule, Report]:
        if report is None:
            report = Report()
            params, nonzero = ir.count_params(gm)
            report.rows.append(ReportRow("(input)", "-", False, None, 0.0, params, nonzero))
            self._reference_outputs = None
        for inst in self.instruments:
            inst.on_start(gm)
        self._reference = getattr(self, "_reference_outputs", None)
        self._said_no_holdout = False
        self.executed = []
        for p in self.passes:
            gm = self._run_pass(p, gm, ctx, report)
        for inst in self.instruments:
            inst.on_end(gm)
        return gm, report

    def _prerequisite(self, p: Pass, gm: fx.GraphModule) -> tuple[Pass, Requirement] | None:
        """With ``auto_prereqs``: the pass to run before ``p`` for its first unmet requirement whose
        establishing pass has not run yet (each runs once: what it cannot establish, it says why)."""
        if not self.auto_prereqs:
            return None
        ran = {q.name for q in self.executed}
        for r in p.requires:
            if r.established_by and r.established_by not in ran and r.established_by != p.name and not r.met(gm):
                return get_pass(r.established_by), r
        return None

    def _run_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, report: Report,
                  inserted_for: tuple[Pass, Requirement] | None = None) -> fx.GraphModule:
        """Run ``p`` (after its prerequisites, with ``auto_prereqs``), check it, record its row; the new graph."""
        while (prereq := self._prerequisite(p, gm)) is not None:
            gm = self._run_pass(prereq[0], gm, ctx, report, inserted_for=(p, prereq[1]))
        ran_before = {q.name for q in self.executed}
        unmet_before = [(r, len(r.violations(gm))) for r in p.requires]
        self.executed.append(p)
        index = len(self.executed)
        for inst in self.instruments:
            inst.before_pass(index, p, gm)
        if self.verify:
            self._check_labels_for(p, ctx)
            self._tolerance_for(p)  # a lossy pass without a budget fails before it runs
        start = time.perf_counter()
        candidate, result = self.apply(p, gm, ctx, report)
        seconds = time.perf_counter() - start
        self._record_requirements(p, result, unmet_before, ran_before, inserted_for)
        check = None
        if self.verify:
            inputs = self.input_sets(ctx)
            check, outputs = self.check_pass(p, gm, candidate, ctx, inputs, self._reference, report)
            if not check.passed:
                divergence = first_divergence(gm, candidate, inputs[0], self._tolerance_for(p))
                params, nonzero = ir.count_params(candidate)
                report.rows.append(ReportRow(p.name, p.contract, result.changed, check, seconds, params,
                                             nonzero, result))
                for inst in self.instruments:
                    inst.after_pass(index, p, candidate, result, check)
                raise EquivalenceError(p.name, check, divergence, gm, report)
            self._reference = outputs
            self._report_holdout(p, ctx, check, result)
        params, nonzero = ir.count_params(candidate)
        report.rows.append(ReportRow(p.name, p.contract, result.changed, check, seconds, params, nonzero, result))
        for inst in self.instruments:
            inst.after_pass(index, p, candidate, result, check)
        return candidate

    def _report_holdout(self, p: Pass, ctx: PassContext, check: EquivalenceCheck, result: PassResult) -> None:
        """Warn when a lossy pass's held-out error breaks its budget; say once per run that nothing
        could be held out (a single calibration set)."""
        if p.contract != "lossy" or not ctx.calibration:
            return
        if check.holdout is None:
            if not ctx.holdout_indices and not self._said_no_holdout:
                self._said_no_holdout = True
                why = ("config['holdout'] is 0" if len(ctx.calibration) > 1 else
                       "there is a single calibration set (give more samples, or a batch smaller than them)")
                result.notes.append(f"no held-out calibration: {why}; the budget is checked on the data the "
                                    f"search fitted, which may not hold on new inputs")
            return
        if not check.holdout.passed:
            warnings.warn(f"{p.name}: {holdout_summary(check)}", HeldOutBudgetWarning, stacklevel=2)

    @staticmethod
    def _record_requirements(p: Pass, result: PassResult, before: list[tuple[Requirement, int]], ran: set[str],
                             inserted_for: tuple[Pass, Requirement] | None) -> None:
        """Put on ``result`` (and first in its notes) each requirement of ``p`` that did not hold, with
        how many of its skipped sites it blocked; say why an inserted prerequisite ran."""
        notes = []
        if inserted_for is not None:
            needer, r = inserted_for
            notes.append(f"inserted before {needer.name}, which needs {r.name} (auto_prereqs)")
        for r, violations in before:
            blocked = sum(1 for s in result.skipped if s.needs is r)
            if not violations and not blocked:
                continue
            unmet = UnmetRequirement(p.name, r, violations, blocked, p.site_noun, r.established_by in ran)
            if not blocked and unmet.establisher_ran:
                continue  # its establishing pass ran and what it left blocks nothing here: no news
            result.unmet.append(unmet)
            notes.append(unmet.message)
        result.notes[:0] = notes


def _node_in_traceback(err: BaseException, gm: fx.GraphModule) -> str | None:
    """The node a failing pass was working on: the innermost frame of the traceback with a local that
    is a node of ``gm`` (a local named ``node`` first). Works for any pass, without its cooperation."""
    nodes = set(gm.graph.nodes)
    tb, frames = err.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        found = [v for k, v in sorted(frame.f_locals.items(), key=lambda kv: kv[0] != "node")
                 if isinstance(v, fx.Node) and v in nodes]
        if found:
            return ir.describe(found[0])
    return None


PassFactory = Callable[[], Pass]
