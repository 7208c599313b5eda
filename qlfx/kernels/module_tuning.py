"""MetaSchedule tuning of a whole Relax module's TIR tasks, against layered tuning databases.

Databases (``layered_database``): the user's JSON database (written by tuning) over the records kept
with the package in ``qlfx/tuning_records/`` (read-only). Each layer holds only the records whose
target is the build's target, string for string (llvm: kind, mcpu, num-cores; the target key of
``target_key``): MetaSchedule's own ``query_tuning_record`` returns the best record of a workload
whatever target measured it, so a record from another CPU would otherwise be applied. The user's
layer comes first (``OrderedUnionDatabase``): what was tuned here wins over what was shipped.

Tuning (``tune_tasks``):

* Every task first gets a *baseline record*: qlfx's designed default schedule
  (:mod:`qlfx.kernels.cpu_schedules`), measured by the same runner. The database's best record is
  then never worse than what an untuned build runs, however small the budget.
* Task weights are FLOPs: ``calls * estimate_tir_flops(task)``. MetaSchedule's default weight is the
  call count, which gives the 1000-element bias add of the head as much search as the 7x7 stem.
* Budget: ``trials_per_task * tasks`` trials in all, dealt out by MetaSchedule's gradient task
  scheduler in proportion to the weights, each task capped at ``4 * trials_per_task``: the few tasks
  that hold most of the FLOPs (the 1x1 projections, the stem) get several times the average, the
  elementwise ones the minimum round. 64 trials per round (MetaSchedule's default) is too coarse
  for small budgets; a round is ``min(16, trials_per_task)``.
* Cost model: "xgb" (MetaSchedule's learned model) when xgboost imports, else "random" (no model:
  each round measures random samples of the space); which one is said in a log line.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tvm
from tvm.s_tir import meta_schedule as ms

logger = logging.getLogger("qlfx.kernels.module_tuning")

#: the database kept with the package: <target key>/branch-product and <target key>/other-ops, laid
#: out as a user's database folder (``tuning_db=``), so a tuning run pointed there fills it
PACKAGED_RECORDS = Path(__file__).resolve().parent.parent / "tuning_records"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
#: each task's trial cap, as a multiple of the per-task average
TASK_CAP_FACTOR = 4


def target_key(target: tvm.target.Target) -> str:
    """A folder name for the target: ``llvm-znver3-2c`` (kind, CPU, cores) or the kind and arch."""
    attrs = target.attrs or {}
    parts = [target.kind.name]
    for key in ("mcpu", "arch"):
        if key in attrs and str(attrs[key]):
            parts.append(str(attrs[key]))
    if "num-cores" in attrs:
        parts.append(f"{int(attrs['num-cores'])}c")
    return "-".join(parts).replace("/", "_")


def cost_model_name() -> str:
    """"xgb" when xgboost imports (the optional extra ``tune``), else "random"."""
    try:
        import xgboost  # noqa: F401

        return "xgb"
    except ImportError:
        return "random"


def json_database(folder: Path) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(folder / WORKLOAD_FILE),
                                    path_tuning_record=str(folder / RECORD_FILE), module_equality="structural")


def records_for_target(database: Any, target: tvm.target.Target) -> Any:
    """An in-memory database with the records of ``database`` measured on ``target`` only."""
    wanted = str(target)
    kept = ms.database.MemoryDatabase(module_equality="structural")
    for record in database.get_all_tuning_records():
        if record.target is None or str(record.target) != wanted:
            continue
        workload = kept.commit_workload(record.workload.mod)
        kept.commit_tuning_record(ms.database.TuningRecord(
            record.trace, workload, record.run_secs, record.target, record.args_info))
    return kept


def prune_to_best(folder: Path) -> tuple[int, int]:
    """Keep, per workload and target, only the fastest valid record of the JSON database in ``folder``
    (what a build looks up; TopHub shipped the same). For databases kept with qlfx: every trial of a
    tuning run is otherwise stored. Rewritten atomically; returns (records before, after)."""
    import json

    path = Path(folder) / RECORD_FILE
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    best: dict[tuple[int, str], tuple[float, int, str]] = {}
    for index, line in enumerate(lines):
        workload, (_, run_secs, target, _) = json.loads(line)
        secs = [float(s) for s in run_secs or []]
        mean = sum(secs) / len(secs) if secs else math.inf
        if mean >= 1e9:  # MetaSchedule stores 1e10 for a failed run
            continue
        key = (workload, json.dumps(target, sort_keys=True))
        if key not in best or mean < best[key][0]:
            best[key] = (mean, index, line)
    kept = [line for _, _, line in sorted(best.values(), key=lambda v: v[1])]  # file order
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines), len(kept)


def packaged_folder(target: tvm.target.Target, root: Path | None = None) -> Path:
    return (PACKAGED_RECORDS if root is None else Path(root)) / target_key(target)


def layered_database(user_folder: Path, target: tvm.target.Target, packaged_root: Path | None = None) -> Any:
    """The user's records (``user_folder``, e.g. <tuning_db>/other-ops) over the packaged ones (the
    folder of the same name under the target's key), each filtered to ``target`` (see the module doc)."""
    layers = []
    for folder in (Path(user_folder), packaged_folder(target, packaged_root) / Path(user_folder).name):
        if (folder / RECORD_FILE).exists():  # opened read-only: nothing here commits to them
            layers.append(records_for_target(ms.database.JSONDatabase(
                path_workload=str(folder / WORKLOAD_FILE), path_tuning_record=str(folder / RECORD_FILE),
                module_equality="structural", allow_missing=True), target))
    if not layers:
        return ms.database.MemoryDatabase(module_equality="structural")
    return ms.database.OrderedUnionDatabase(*layers)


def task_flops(task: Any) -> float:
    """FLOPs of one call of an extracted task (at least 1: pure data movement still costs)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return max(1.0, float(estimate_tir_flops(task.dispatched[0])))
    except Exception:  # noqa: BLE001 -- an op the estimator does not model: weigh it as data movement
        return 1.0


def flops_weights(tasks: list) -> list[float]:
    return [float(task.weight) * task_flops(task) for task in tasks]


@dataclass
class TaskRow:
    """One task of a tuning run: what it costs and what was found."""

    name: str
    calls: int
    flops: float
    baseline_us: float | None = None
    best_us: float | None = None
    from_database: bool = False


@dataclass
class ModuleTuning:
    tasks_total: int = 0
    tasks_from_database: int = 0
    tasks_tuned: int = 0
    trials_run: int = 0
    seconds: float = 0.0
    cost_model: str = ""
    rows: list[TaskRow] = field(default_factory=list)


def _baseline_record(task: Any, target: tvm.target.Target, builder: Any, runner: Any) -> tuple[Any, float] | None:
    """The default schedule of ``task`` as a measured TuningRecord (None when no rule applies or it
    fails to build/run)."""
    from .cpu_schedules import default_rules

    func = task.dispatched[0]["main"]
    schedule = None
    for rule in default_rules():
        schedule = rule.apply(func, target, False)
        if schedule is not None:
            break
    if schedule is None:
        return None
    args_info = ms.arg_info.ArgInfo.from_prim_func(func)
    (built,) = builder.build([ms.builder.BuilderInput(schedule.mod, target)])
    if built.error_msg is not None:
        logger.warning("default schedule of %s does not build: %s", task.task_name, built.error_msg[:200])
        return None
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, target.kind.name, args_info)])
    result = future.result()
    if result.error_msg is not None or not result.run_secs:
        return None
    secs = [float(s) for s in result.run_secs]
    return (schedule.trace, args_info, secs), sum(secs) / len(secs)


def _best_us(database: Any, task: Any, target: tvm.target.Target) -> float | None:
    record = database.query_tuning_record(task.dispatched[0], target, "main")
    if record is None or not record.run_secs:
        return None
    secs = [float(s) for s in record.run_secs]
    return 1e6 * sum(secs) / len(secs)


def tune_tasks(mod: tvm.IRModule, target: tvm.target.Target, trials_per_task: int, database_folder: Path,
               builder: Any, runner: Any, is_scheduled: Callable[[Any], bool],
               packaged_root: Path | None = None, say: Callable[[str], None] | None = None) -> ModuleTuning:
    """Tune every task of ``mod`` that neither database layer has a record for (see the module doc).
    ``is_scheduled(task)``: tasks to leave alone (kernels scheduled by hand)."""
    summary = ModuleTuning(cost_model=cost_model_name())
    start = time.perf_counter()
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not is_scheduled(t)]
    summary.tasks_total = len(tasks)
    known = layered_database(database_folder, target, packaged_root)
    todo = []
    for task in tasks:
        row = TaskRow(task.task_name, int(task.weight), task_flops(task))
        summary.rows.append(row)
        if known.query_tuning_record(task.dispatched[0], target, "main") is not None:
            summary.tasks_from_database += 1
            row.from_database = True
            row.best_us = _best_us(known, task, target)
        else:
            todo.append((task, row))
    if say:
        plan = (f"{len(todo)} to tune, ~{trials_per_task} trials each on average (weighted by FLOPs), cost model "
                f"{summary.cost_model}" + ("" if summary.cost_model == "xgb"
                                          else " (xgboost is not installed: pip install qlfx[tune])")
                if todo and trials_per_task > 0 else "nothing to tune" if not todo
                else f"{len(todo)} without a record keep qlfx's default schedule (0 trials)")
        say(f"[qlfx.tvm] other ops: {len(tasks)} tasks, {summary.tasks_from_database} from the database, {plan}")
    if not todo or trials_per_task <= 0:
        summary.seconds = time.perf_counter() - start
        return summary

    database = json_database(Path(database_folder))
    for task, row in todo:  # the designed schedule is the record to beat
        found = _baseline_record(task, target, builder, runner)
        if found is None:
            continue
        (trace, args_info, secs), seconds = found
        workload = database.commit_workload(task.dispatched[0])
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload, secs, target, args_info))
        row.baseline_us = seconds * 1e6

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:  # its task tables go to <database>/logs, not the console
        ms_logger.setLevel(logging.WARNING)
    work_dir = str(Path(database_folder) / "logs")
    contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts([t for t, _ in todo], work_dir, seed=0)
    weights = flops_weights([t for t, _ in todo])
    total = trials_per_task * len(contexts)
    ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=total,
                  max_trials_per_task=TASK_CAP_FACTOR * trials_per_task,
                  num_trials_per_iter=max(1, min(16, trials_per_task)), database=database,
                  cost_model=summary.cost_model, builder=builder, runner=runner)
    summary.tasks_tuned = len(contexts)
    summary.trials_run = total
    tuned = records_for_target(database, target)
    for task, row in todo:
        row.best_us = _best_us(tuned, task, target)
    summary.seconds = time.perf_counter() - start
    return summary


def format_rows(rows: list[TaskRow]) -> str:
    """The per-task table: calls, MFLOP per call, baseline and best time, share of the total."""
    total = sum((r.best_us or r.baseline_us or 0.0) * r.calls for r in rows) or math.inf
    lines = [f"{'task':48s} {'calls':>5s} {'MFLOP':>8s} {'default us':>10s} {'best us':>9s} {'share':>6s}"]
    for r in sorted(rows, key=lambda r: -(r.best_us or r.baseline_us or 0.0) * r.calls):
        best = r.best_us or r.baseline_us
        share = 100 * (best or 0.0) * r.calls / total
        lines.append(f"{r.name[:48]:48s} {r.calls:5d} {r.flops / 1e6:8.2f} "
                     f"{'' if r.baseline_us is None else f'{r.baseline_us:10.1f}':>10s} "
                     f"{'' if best is None else f'{best:9.1f}':>9s} {share:5.1f}%"
                     + (" (db)" if r.from_database else ""))
    return "\n".join(lines)


def environment_note() -> str:
    return f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}"
