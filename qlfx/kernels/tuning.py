"""MetaSchedule tuning of the branch-product kernel over its *designed* space, with a persistent database.

The search space is the hand schedule of :mod:`qlfx.kernels.branch_product` with its knobs sampled
(``sample_categorical`` over the valid register tiles and the loop order for llvm; over a launch-shape
grid for cuda), wrapped in a ``ScheduleFn`` space generator with no extra schedule rules. MetaSchedule's
default CPU space is not used: on this op it fails (reverse-compute-at errors on the product epilogue)
or, where it works, lands far below the GEMM rate (DESIGN.md §5).

Persistence: ``database_path`` is a directory holding MetaSchedule's JSON database
(``database_workload.json`` + ``database_tuning_record.json``, one JSON document per line). Workloads
are keyed by the structural hash of the *unscheduled* PrimFunc, so a spec is one workload; records are
additionally filtered by target string. A second call with the same spec and target finds a record and
runs zero trials (no builder/runner is even created).

TVM 0.27 API notes / pitfalls
-----------------------------
* MetaSchedule lives in ``tvm.s_tir.meta_schedule`` (``ms``). ``ms.tune_tir`` builds its own
  ``TuneContext`` and database from ``work_dir``; we call ``ms.tune.tune_tasks`` with our own
  ``TuneContext(space_generator=ScheduleFn(...))`` and ``JSONDatabase`` instead.
* ``ms.space_generator.ScheduleFn(fn, sch_rules=[], postprocs=[], mutator_probs={})``: "from-target"
  defaults would add the llvm postprocs (RewriteParallelVectorizeUnroll, RewriteLayout, ...) that the
  hand schedule does not need. Without sch_rules the function's own samples are the whole space.
* The default cost model is ``"xgb"``, which needs xgboost (not installed here): use ``"random"``.
* A custom measure callback must be *added to* ``MeasureCallback.create("default")`` (AddToDatabase,
  RemoveBuildArtifact, UpdateCostModel), or nothing is written to the database.
* Python subclasses of MetaSchedule interfaces need ``@tvm.ir.utils.derived_object``.
* ``JSONDatabase`` reads both files eagerly in its constructor; a malformed line raises a terse
  parser error, which :func:`open_database` turns into :class:`TuningDatabaseError` naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import types
import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import tvm
from tvm import tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from .branch_product import (
    BranchProductSpec,
    CudaKnobs,
    LlvmKnobs,
    WEIGHT_BLOCK,
    branch_product_primfunc,
    build_branch_product,
    CUDA_KNOB_CHOICES,
    default_llvm_knobs,
    host_llvm_target,
    llvm_knob_choices,
    schedule_cuda,
    schedule_llvm,
)

logger = logging.getLogger("qlfx.kernels.tuning")

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"

#: progress(trials_done, trials_total, best_gflops_so_far)
ProgressFn = Callable[[int, int, float], None]


class TuningDatabaseError(RuntimeError):
    """The tuning database on disk cannot be read."""


# ----------------------------------------------------------------------------------- database
def _check_json_lines(path: str) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                raise TuningDatabaseError(
                    f"tuning database file {path} is corrupted (line {line_number}: {error.msg}). "
                    f"Delete it (and its sibling {WORKLOAD_FILE if path.endswith(RECORD_FILE) else RECORD_FILE}) "
                    "to start over; the kernels will be re-tuned."
                ) from None


def open_database(database_path: str) -> ms.database.JSONDatabase:
    """Open (creating if needed) the JSON database in directory ``database_path``."""
    if os.path.exists(database_path) and not os.path.isdir(database_path):
        raise TuningDatabaseError(
            f"tuning database path {database_path} is a file; it must be a directory (it holds "
            f"{WORKLOAD_FILE} and {RECORD_FILE}). Delete the file or pass another path."
        )
    os.makedirs(database_path, exist_ok=True)
    workload_path = os.path.join(database_path, WORKLOAD_FILE)
    record_path = os.path.join(database_path, RECORD_FILE)
    for path in (workload_path, record_path):
        _check_json_lines(path)
    try:
        return ms.database.JSONDatabase(
            path_workload=workload_path, path_tuning_record=record_path, allow_missing=True
        )
    except Exception as error:  # valid JSON but not a MetaSchedule record
        raise TuningDatabaseError(
            f"tuning database in {database_path} ({workload_path}, {record_path}) cannot be loaded by "
            f"MetaSchedule: {str(error).splitlines()[-1] if str(error) else type(error).__name__}. "
            "Delete both files to start over; the kernels will be re-tuned."
        ) from None


def _workload_module(spec: BranchProductSpec) -> tvm.IRModule:
    return tvm.IRModule({"main": branch_product_primfunc(spec)})


def _valid_seconds(record: Any) -> float | None:
    if record.run_secs is None or len(record.run_secs) == 0:
        return None
    secs = [float(s) for s in record.run_secs]
    mean = sum(secs) / len(secs)
    return mean if mean < 1e9 else None  # MetaSchedule stores 1e10 for failed runs


def _best_record(db: Any, mod: tvm.IRModule, target: tvm.target.Target) -> tuple[Any, float] | None:
    if not db.has_workload(mod):
        return None
    workload = db.commit_workload(mod)  # already present: a lookup, writes nothing
    wanted = str(target)
    best = None
    for record in db.get_top_k(workload, 1 << 20):
        if record.target is None or str(record.target) != wanted:
            continue
        seconds = _valid_seconds(record)
        if seconds is not None and (best is None or seconds < best[1]):
            best = (record, seconds)
    return best


# --------------------------------------------------------------------------------- the space
def _space_function(spec: BranchProductSpec, target: tvm.target.Target) -> Callable[[Schedule], Any]:
    """The design space: llvm -> a trace per loop order (two; one for separable), each with sampled
    tile knobs; cuda -> one trace with sampled launch-shape knobs."""
    kind = target.kind.name

    def space(sch: Schedule) -> Any:
        if kind == "llvm":
            orders = llvm_knob_choices(spec)["pixel_outer"]
            traces = [sch] + [sch.copy() for _ in orders[1:]]
            for trace, order in zip(traces, orders):
                schedule_llvm(trace, spec, None, pixel_outer=order)
            return traces
        if kind == "cuda":
            schedule_cuda(sch, spec, None)
            return [sch]
        raise ValueError(f"no branch-product design space for target kind {kind!r}")

    return space


def space_size(spec: BranchProductSpec, target: Any) -> int:
    """Number of distinct points of the design space (MetaSchedule never measures one twice)."""
    target = _as_target(target)
    choices = llvm_knob_choices(spec) if target.kind.name == "llvm" else CUDA_KNOB_CHOICES
    return math.prod(len(v) for v in choices.values())


def _knobs_from_schedule(spec: BranchProductSpec, target: tvm.target.Target, sch: Schedule) -> Any:
    """Read the knobs back from a replayed tuning record: the SampleCategorical decisions, in the
    order the schedule samples them, plus the loop-order annotation."""
    trace = sch.trace
    values = []
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical":
            candidates = [int(c) for c in inst.attrs[0]]
            values.append(candidates[int(trace.decisions[inst])])
    if target.kind.name == "llvm":
        annotations = sch.get(sch.get_sblock("out")).annotations
        return LlvmKnobs(
            m_vecs=values[0] // WEIGHT_BLOCK, p_tile=values[1], pixel_outer=int(annotations["qlfx.pixel_outer"])
        )
    return CudaKnobs(**dict(zip(CUDA_KNOB_CHOICES, values)))


# ------------------------------------------------------------------------------------ result
@dataclass
class TunedKernel:
    """Result of :func:`tune_branch_product`.

    ``primfunc`` is the scheduled PrimFunc (global symbol "main"; rename with ``with_attr`` before
    adding it to a Relax module for ``call_tir``); its parameters are those of
    :func:`~qlfx.kernels.branch_product.branch_product_primfunc` (packed weights).
    """

    spec: BranchProductSpec
    target: tvm.target.Target
    primfunc: tirx.PrimFunc
    knobs: LlvmKnobs | CudaKnobs
    best_seconds: float
    trials_run: int
    database_path: str
    trace: Any = field(repr=False, default=None)

    @property
    def best_gflops(self) -> float:
        return self.spec.flops / self.best_seconds / 1e9

    def build(self, target: Any = None) -> Any:
        """Compile the tuned schedule (llvm: a runnable BranchProductKernel; cuda: an Executable)."""
        return build_branch_product(self.spec, self.target if target is None else target, primfunc=self.primfunc)


@contextlib.contextmanager
def _without_tensor_intrin_import():
    """Let ``TuneContext(...)`` skip its ``import tvm.s_tir.tensor_intrin``.

    That import parses ~250 TVMScript tensor intrinsics (none of which this space uses); each parse
    calls ``inspect.stack()``, which walks every loaded module. With torch loaded it took 4 minutes on
    this machine. A stub stands in for the module while the context is built and is removed
    afterwards, so a later real import (e.g. by Relax tuning) still works. No-op if already imported.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    stub = types.ModuleType(name)
    sys.modules[name] = stub
    try:
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]
        parent = sys.modules.get("tvm.s_tir")
        if parent is not None and getattr(parent, "tensor_intrin", None) is stub:
            delattr(parent, "tensor_intrin")


# ------------------------------------------------------------------------------- the mutator
@derived_object
class MutateCategoricalKnob(ms.mutator.PyMutator):
    """Re-draws one ``SampleCategorical`` decision of a trace (a knob of the hand schedule).

    MetaSchedule's stock mutators only touch tile sizes, unroll annotations, compute locations and
    parallel extents; without this one the evolutionary search cannot move through a space whose
    decisions are all categorical, and stops after its first few random samples.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.rng = random.Random(seed)

    def _initialize_with_tune_context(self, context: Any) -> None:
        pass

    def apply(self, trace: Any, _: Any) -> Any:
        knobs = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical" and len(inst.attrs[0]) > 1]
        if not knobs:
            return None
        inst = self.rng.choice(knobs)
        old = int(trace.decisions[inst])
        new = self.rng.choice([i for i in range(len(inst.attrs[0])) if i != old])
        return trace.with_decision(inst, new, remove_postproc=True)

    def clone(self) -> Any:
        return MutateCategoricalKnob(self.rng.randrange(1 << 30))


# ---------------------------------------------------------------------------- progress hook
@derived_object
class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
    """Counts measured trials and reports (done, total, best GFLOP/s) after every batch."""

    def __init__(self, flops: int, total: int, progress: ProgressFn | None) -> None:
        super().__init__()
        self.flops = flops
        self.total = total
        self.progress = progress
        self.done = 0
        self.best_seconds = math.inf

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        for builder_result, runner_result in zip(builder_results, runner_results):
            self.done += 1
            if builder_result.error_msg is None and runner_result.error_msg is None and runner_result.run_secs:
                secs = [float(s) for s in runner_result.run_secs]
                self.best_seconds = min(self.best_seconds, sum(secs) / len(secs))
        best = self.flops / self.best_seconds / 1e9 if self.best_seconds < math.inf else 0.0
        logger.info("branch-product tuning: %d/%d trials, best %.1f GFLOP/s", self.done, self.total, best)
        if self.progress is not None:
            self.progress(self.done, self.total, best)


# --------------------------------------------------------------------------------- entry point
def _as_target(target: Any) -> tvm.target.Target:
    if target is None:
        return host_llvm_target()
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


# In-process builder and runner. MetaSchedule's LocalBuilder starts fresh worker processes for
# every batch, and its default build function imports tvm.s_tir.tensor_intrin, which costs ~30 s of
# CPU per worker here (minutes per batch on a loaded 2-core machine) against 0.5 s for the build
# itself. Our candidates are all well-formed hand schedules, so building and timing them in this
# process is safe and makes small tuning budgets (and the tests) fast.
_BUILT_MODULES: dict[str, Any] = {}


@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates with ``tvm.tirx.build`` in this process; artifacts stay in memory."""

    def build(self, build_inputs: list[Any]) -> list[Any]:
        results = []
        for build_input in build_inputs:
            try:
                module = tvm.tirx.build(build_input.mod, target=build_input.target)
            except Exception as error:  # a candidate that fails to lower is reported, not fatal
                results.append(ms.builder.BuilderResult(None, f"InProcessBuilder: {error}"))
                continue
            # RemoveBuildArtifact deletes dirname(artifact_path): give it a real, empty directory.
            path = os.path.join(tempfile.mkdtemp(prefix="qlfx_ms_"), "in_memory.so")
            _BUILT_MODULES[path] = module
            results.append(ms.builder.BuilderResult(path, None))
        return results


@derived_object
class InProcessRunner(ms.runner.PyRunner):
    """Times built candidates in this process with ``time_evaluator`` (random inputs)."""

    def __init__(self, number: int = 5, repeat: int = 3, min_repeat_ms: int = 20) -> None:
        super().__init__()
        self.number, self.repeat, self.min_repeat_ms = number, repeat, min_repeat_ms

    def run(self, runner_inputs: list[Any]) -> list[Any]:
        futures = []
        device = tvm.cpu()
        rng = np.random.default_rng(0)
        for runner_input in runner_inputs:
            module = _BUILT_MODULES.pop(runner_input.artifact_path, None)
            if module is None:
                futures.append(ms.runner.LocalRunnerFuture(None, "InProcessRunner: artifact not built here"))
                continue
            try:
                args = [
                    tvm.runtime.tensor(rng.standard_normal([int(d) for d in info.shape]).astype(info.dtype), device)
                    for info in runner_input.args_info
                ]
                evaluator = module.time_evaluator(
                    "main", device, number=self.number, repeat=self.repeat, min_repeat_ms=self.min_repeat_ms
                )
                futures.append(ms.runner.LocalRunnerFuture(list(evaluator(*args).results), None))
            except Exception as error:
                futures.append(ms.runner.LocalRunnerFuture(None, f"InProcessRunner: {error}"))
        return futures


def _tuned_from_record(
    spec: BranchProductSpec, target: tvm.target.Target, record: Any, seconds: float, trials: int, path: str
) -> TunedKernel:
    sch = Schedule(branch_product_primfunc(spec))
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return TunedKernel(
        spec=spec,
        target=target,
        primfunc=sch.mod["main"],
        knobs=_knobs_from_schedule(spec, target, sch),
        best_seconds=seconds,
        trials_run=trials,
        database_path=path,
        trace=record.trace,
    )


def _commit_default_record(spec: BranchProductSpec, target: tvm.target.Target, mod: tvm.IRModule, db: Any,
                           builder: Any, runner: Any) -> None:
    """Measure the untuned schedule (default knobs) with the tuning's builder and runner and store it:
    the search samples a few points of the space and may miss it, and a record slower than what an
    untuned build runs would then replace it."""
    if target.kind.name != "llvm":
        return
    sch = Schedule(branch_product_primfunc(spec))
    schedule_llvm(sch, spec, default_llvm_knobs(spec, target=target))
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg is not None:
        logger.warning("the default schedule of %s does not build: %s", spec.name(), built.error_msg[:200])
        return
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, target.kind.name, args_info)])
    result = future.result()
    if result.error_msg is not None or not result.run_secs:
        logger.warning("the default schedule of %s did not run: %s", spec.name(), (result.error_msg or "")[:200])
        return
    workload = db.commit_workload(mod)
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [float(t) for t in result.run_secs],
                                                     target, args_info))


def _tune_context(spec: BranchProductSpec, target: tvm.target.Target, mod: tvm.IRModule, total: int, seed: int) -> Any:
    return ms.TuneContext(
        mod=mod,
        target=target,
        space_generator=ms.space_generator.ScheduleFn(
            _space_function(spec, target), sch_rules=[], postprocs=[], mutator_probs={MutateCategoricalKnob(seed): 1.0}
        ),
        search_strategy=ms.search_strategy.EvolutionarySearch(
            population_size=max(8, 2 * total), init_min_unmeasured=max(8, 2 * total)
        ),
        task_name=spec.name(),
        rand_state=seed,
        num_threads="physical",
    ).clone()


def lookup_branch_product(spec: BranchProductSpec, target: Any, database_paths: list[str]) -> TunedKernel | None:
    """The best record for ``spec`` on exactly ``target`` in the first of ``database_paths`` that has
    one (nothing is created or written), or None."""
    target = _as_target(target)
    if spec.batch is None:  # records are of static shapes
        return None
    mod = _workload_module(spec)
    for path in database_paths:
        if not os.path.exists(os.path.join(path, RECORD_FILE)):
            continue
        found = _best_record(open_database(path), mod, target)
        if found is not None:
            return _tuned_from_record(spec, target, found[0], found[1], 0, path)
    return None


def tune_branch_product(
    spec: BranchProductSpec,
    target: Any = None,
    trials: int = 16,
    database_path: str = "qlfx_tuning_db",
    progress: ProgressFn | None = None,
    *,
    trials_per_iter: int | None = None,
    number: int = 5,
    repeat: int = 3,
    min_repeat_ms: int = 20,
    seed: int = 0,
    builder: Any = None,
    runner: Any = None,
) -> TunedKernel:
    """Tune ``spec`` for ``target`` (default: this CPU), re-using ``database_path`` when it has a record.

    trials: measurement budget (capped at the size of the design space). progress(done, total,
    best_gflops) is called after each measured batch. number/repeat/min_repeat_ms: timing of each
    candidate (time_evaluator semantics). builder/runner default to in-process ones (llvm only);
    tuning for cuda needs MetaSchedule builder/runner that reach a GPU (e.g. ms.builder.LocalBuilder()
    and ms.runner.RPCRunner(...)); without them it raises.
    """
    target = _as_target(target)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if spec.batch is None:
        raise ValueError("tune a static batch size, e.g. spec.with_batch(1): candidates are timed on real "
                         "inputs; the tuned knobs then schedule the any-batch kernel as well")
    mod = _workload_module(spec)
    db = open_database(database_path)
    found = _best_record(db, mod, target)
    if found is not None:
        record, seconds = found
        tuned = _tuned_from_record(spec, target, record, seconds, 0, database_path)
        logger.info(
            "branch-product %s: database hit in %s (%.1f GFLOP/s, knobs %s); 0 trials",
            spec.name(), database_path, tuned.best_gflops, tuned.knobs,
        )
        if progress is not None:
            progress(0, 0, tuned.best_gflops)
        return tuned
    if target.kind.name != "llvm" and runner is None:
        raise RuntimeError(
            f"tuning for {target.kind.name} needs a runner on a machine with that device (pass runner=...); "
            "on this CPU-only machine build the hand schedule with build_branch_product(spec, target) instead"
        )

    builder = InProcessBuilder() if builder is None else builder
    runner = InProcessRunner(number, repeat, min_repeat_ms) if runner is None else runner
    _commit_default_record(spec, target, mod, db, builder, runner)
    total = min(trials, space_size(spec, target))
    per_iter = trials_per_iter or total
    callback = _ProgressCallback(spec.flops, total, progress)
    with _without_tensor_intrin_import():
        context = _tune_context(spec, target, mod, total, seed)
    work_dir = os.path.join(database_path, "logs")
    os.makedirs(work_dir, exist_ok=True)
    started = time.perf_counter()
    ms.tune.tune_tasks(
        tasks=[context],
        task_weights=[1.0],
        work_dir=work_dir,
        max_trials_global=total,
        num_trials_per_iter=per_iter,
        builder=builder,
        runner=runner,
        database=db,
        cost_model="random",
        measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [callback],
        task_scheduler="round-robin",
    )
    found = _best_record(db, mod, target)
    if found is None:
        raise RuntimeError(
            f"tuning {spec.name()} for {target} measured {callback.done} candidates and none ran; see the "
            f"MetaSchedule logs in {work_dir}"
        )
    record, seconds = found
    tuned = _tuned_from_record(spec, target, record, seconds, callback.done, database_path)
    logger.info(
        "branch-product %s: tuned %d trials in %.1f s, best %.1f GFLOP/s, knobs %s",
        spec.name(), callback.done, time.perf_counter() - started, tuned.best_gflops, tuned.knobs,
    )
    return tuned
