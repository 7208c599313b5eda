"""The searches of the ``slice`` pass (passes/slice.py, "How many to delete" and "The search on large
graphs"): how far to cut each unit under an output-error and/or accuracy budget.

:func:`greedy_search` takes, move by move, the deletion step with the most MACs saved (predicted by
:class:`~qlfx.symmetry.slice_cost.CostModel`) per unit of score increase, refitting the readers after
every step; a chosen step over a budget is retried with the readers refitted to it, then with half as
many channels; a unit whose step breaks the output budget is retired, a step that breaks the accuracy
budget ends the path; mergeable pairs left above their break-even width are given their channels back
and the search goes on. :func:`bisect_search` orders every unit's moves into one path by predicted
error and bisects the longest prefix that keeps the budgets. Both leave the chosen state in
``unit.keep`` and applied on the trial graph, and their statistics in ``result.stats``.
"""
from __future__ import annotations

import heapq

import torch.fx as fx

from qlfx.pass_manager import Skip
from qlfx.symmetry.slice_cost import CostModel
from qlfx.symmetry.slicing import OutputScore, Progress, TrialDeletion, Unit

__all__ = ["greedy_search", "bisect_search"]

_RETIREMENTS = 4  # bisect: units retired per search when the move after the fitting prefix breaks the budget


def greedy_search(options: dict, gm: fx.GraphModule, units: list[Unit], trial: TrialDeletion, score: OutputScore,
                  budget, accuracy_drop, ctx, result, measure_moments, progress: Progress) -> None:
    """The greedy search (passes/slice.py): cuts ``unit.keep`` move by move under the budgets; the
    last state is left applied on the trial graph."""
    limit = budget * (1.0 - 1e-3) if budget is not None else float("inf")  # margin for the final rounding
    by_mean = options["score"] in ("mean", "kl") or budget is None

    def accurate() -> bool:  # of the state the score measured last
        return accuracy_drop is None or score.base_accuracy - score.accuracy <= accuracy_drop + 1e-9

    target = options["target_macs"]
    cost = CostModel(gm, units, int(ctx.example_inputs[0].shape[0]))
    progress.macs_before = cost.macs()  # a split factor made counts at its merged cost
    current = score.error(trial.apply())
    current_mean = score.mean_error
    granularity = float(options["granularity"])
    floor = int(options["min_channels"])
    # Lazy greedy: each unit's next move is scored (MACs saved per unit of error added) when it is
    # tried; after a move is taken the other scores are stale, and only the best-looking one is
    # re-measured before it is taken. Every accepted move is measured in the current state, so the
    # budget holds exactly; only the ordering is heuristic. ~2 evaluations per move instead of #units.
    cache: dict[int, tuple] = {}  # unit id -> (gain, error, fresh, mean, (fits budget, fits accuracy))
    done: set[int] = set()
    evaluations = refits = accepted = 0

    def rescued(unit) -> bool:
        """The chosen move breaks a budget as measured (readers refitted to the state before it): take
        it if it fits once the readers are refitted to it (compensate="refit"); else leave the state."""
        nonlocal evaluations, refits, current, current_mean
        if options["compensate"] != "refit":
            return False
        step = step_of(unit)
        saved = trial.moments, trial.drifted
        unit.keep -= step
        trial.moments, trial.drifted = measure_moments(), True
        err = score.error(trial.apply())
        evaluations += 1
        refits += 1
        if err <= limit and accurate():
            current, current_mean = err, score.mean_error
            result.stats["rescued"] = result.stats.get("rescued", 0) + 1
            return True
        unit.keep += step
        trial.moments, trial.drifted = saved
        return False

    def undo_wasted() -> bool:
        """Where the search stops with mergeable pairs cut to widths that save nothing, give them back
        their channels (retired) and go on if that state fits: the error they cost is budget again."""
        nonlocal evaluations, refits, current, current_mean
        wasted = [u for u in units if cost.wasted(u)]
        if not wasted or not ctx.allow_rewrite():
            return False
        kept = {u.id: u.keep for u in wasted}
        saved = trial.moments, trial.drifted
        for unit in wasted:
            unit.keep = unit.size
            done.add(unit.id)
        if options["compensate"] == "refit":
            trial.moments, trial.drifted = measure_moments(), True
            refits += 1
        err = score.error(trial.apply())
        evaluations += 1
        if err <= limit and accurate():
            current, current_mean = err, score.mean_error
            cache.clear()
            result.stats["undone"] = result.stats.get("undone", []) + sorted(kept)
            result.stats.pop("stopped_by", None)
            return True
        for unit in wasted:
            unit.keep = kept[unit.id]
        trial.moments, trial.drifted = saved
        return False

    steps: dict[int, int] = {}  # units whose move broke a budget: a smaller step (halved each time)
    halved = None  # the unit whose halved move is tried next
    ending = False  # a chosen move broke the accuracy budget: the path ends after its smaller versions

    def step_of(unit):
        return steps.get(unit.id, max(1, round(unit.size * granularity)))

    def measure(unit):
        nonlocal evaluations
        step = step_of(unit)
        saved = cost.rank_saving(unit, unit.keep, unit.keep - step, floor)
        unit.keep -= step
        err = score.error(trial.apply())
        ok = (err <= limit, accurate())
        unit.keep += step
        evaluations += 1
        progress.say(evaluations, accepted, current, cost.macs())
        if by_mean:
            gain = saved / max(score.mean_error - current_mean, 1e-12)
        else:
            gain = saved / max(err - current, 1e-9 * max(limit, 1e-12))
        return gain, err, True, score.mean_error, ok

    while True:
        if target is not None and cost.macs() <= float(target):
            break
        live = [u for u in units if u.id not in done and u.keep - step_of(u) >= floor
                and cost.rank_saving(u, u.keep, u.keep - step_of(u), floor) > 0]
        if not live:
            if undo_wasted():
                continue
            break
        for unit in live:
            if unit.id not in cache:
                cache[unit.id] = measure(unit)
        # The path is chosen without labels (gain from the mean output error; the output budget
        # retires a unit). The accuracy budget only stops it, at the first best move that breaks it:
        # searching on for other moves that happen to keep the labelled accuracy would fit the
        # search to those few labels (measured: 0.4 points drop there, 1.3 on unseen images).
        forced, halved = next((u for u in live if u.id == halved), None), None
        feasible = [u for u in live if cache[u.id][4][0] or not cache[u.id][2]]
        if forced is None and not feasible:
            if undo_wasted():
                continue
            break
        unit = forced or max(feasible, key=lambda u: cache[u.id][0])
        gain, err, fresh, mean, ok = cache[unit.id]
        if not fresh:
            cache[unit.id] = gain, err, fresh, mean, ok = measure(unit)
            others = [cache[u.id][0] for u in feasible if u is not unit]
            if ok[0] and others and gain < max(others):
                continue  # re-rank with the fresh score
        if not ctx.allow_rewrite():
            result.skipped.append(Skip("slice", "rewrite limit reached (bisection)"))
            break
        if all(ok):
            unit.keep -= step_of(unit)
            current, current_mean = err, mean
            if options["compensate"] == "refit":
                # refit after every step: the readers reproduce their reference outputs from what they
                # now receive (earlier deletions included); kept only if the result still fits the budget
                saved = trial.moments, trial.drifted
                trial.moments, trial.drifted = measure_moments(), True
                err = score.error(trial.apply())
                refits += 1
                if err <= limit and accurate():
                    current, current_mean = err, score.mean_error
                else:
                    trial.moments, trial.drifted = saved
        elif not rescued(unit):  # over a budget, even with the readers refitted to the move
            ending = ending or not ok[1]
            if step_of(unit) > 1:  # the same unit's next channels, fewer of them: the path stays
                steps[unit.id] = step_of(unit) // 2
                cache[unit.id], halved = measure(unit), unit.id
                continue
            if not ok[0] and not ending:
                done.add(unit.id)  # the output budget retires the unit
                continue
            unit = None  # nothing taken
        if unit is not None:
            accepted += 1
            del cache[unit.id]
            cache.update({k: (v[0], v[1], False, v[3], v[4]) for k, v in cache.items()})
        if ending:  # the accuracy budget ends the path (its last move as large as still fits)
            result.stats["stopped_by"] = "accuracy_drop"
            ending = False
            if undo_wasted():
                continue
            break
    result.stats.update({"evaluations": evaluations, "refits": refits, "macs_predicted": cost.macs()})
    trial.apply()


def bisect_search(options: dict, gm: fx.GraphModule, units: list[Unit], trial: TrialDeletion, score: OutputScore,
                  probe: OutputScore, budget, accuracy_drop, ctx, result, measure_moments, progress: Progress) -> None:
    """The search for large graphs: few evaluations of the whole calibration set.

    1. Per unit, predict the mean output error of keeping k channels as s_u * D_u(k), with D_u(k)
       the importance (what the readers receive) of the deleted channels and s_u measured by one
       probe -- deleting a quarter of the unit alone -- on ``probe_samples`` samples.
    2. Order every unit's moves by MACs saved per unit of predicted error into one path (a unit's
       moves stay in its own order).
    3. Bisect the longest prefix of the path that keeps the budgets (each probe of a prefix is one
       exact evaluation on every evaluation set); with compensate="refit" then re-measure the refit
       moments on that state and bisect the rest of the path again (up to three rounds): the refit
       usually frees budget for more moves.
    """
    limit = budget * (1.0 - 1e-3) if budget is not None else float("inf")
    granularity, floor = float(options["granularity"]), int(options["min_channels"])
    cost = CostModel(gm, units, int(ctx.example_inputs[0].shape[0]))
    total_macs = progress.macs_before = cost.macs()  # a split factor made counts at its merged cost
    evaluations = refits = 0

    def step_of(unit):
        return max(1, round(unit.size * granularity))

    # 1. predicted error curves
    scale: dict[int, float] = {}
    for unit in units:
        step = step_of(unit)
        moves = (unit.size - floor) // step
        if moves < 1:
            continue
        unit.keep = unit.size - step * max(1, min(moves, round(0.25 * unit.size / step)))
        probe_error, probe_keep = probe.error(trial.apply()), unit.keep
        deleted = float(unit.importance[unit.order[unit.keep:]].sum())
        scale[unit.id] = probe.mean_error / deleted if deleted > 0 else probe.mean_error
        unit.keep = unit.size
        evaluations += 1
        progress.say(evaluations, 0, probe_error, total_macs,
                     f"probe: unit {unit.id} alone at {probe_keep}/{unit.size} channels")

    def predicted(unit, keep) -> float:
        deleted = float(unit.importance[unit.order[keep:]].sum())
        return scale[unit.id] * (deleted if float(unit.importance.sum()) > 0 else unit.size - keep)

    # 2. the path: a heap of each unit's next move, by MACs saved per predicted error added
    path: list[tuple[Unit, int]] = []
    keeps = {u.id: u.size for u in units}
    heap = []

    def push(unit):
        keep = keeps[unit.id] - step_of(unit)
        saved = cost.rank_saving(unit, keeps[unit.id], keep, floor, keeps) if keep >= floor else 0.0
        if unit.id in scale and saved > 0:
            added = predicted(unit, keep) - predicted(unit, keeps[unit.id])
            heapq.heappush(heap, (-saved / max(added, 1e-30), unit.id, keep, unit))

    for unit in units:
        push(unit)
    target = options["target_macs"]
    while heap:
        _, _, keep, unit = heapq.heappop(heap)
        keeps[unit.id] = keep
        path.append((unit, keep))
        push(unit)

    def set_state(m: int) -> None:
        for unit in units:
            unit.keep = unit.size
        for unit, keep in path[:m]:
            unit.keep = keep

    if target is not None:  # the shortest prefix that reaches the cost, if any
        for m in range(len(path) + 1):
            set_state(m)
            if cost.macs() <= float(target):
                path = path[:m]
                break

    def fits(m: int) -> bool:
        nonlocal evaluations
        set_state(m)
        err = score.error(trial.apply())
        evaluations += 1
        ok = err <= limit and (accuracy_drop is None or
                               score.base_accuracy - score.accuracy <= accuracy_drop + 1e-9)
        if ok:
            fitting[m] = err
        progress.say(evaluations, shown[0], err, cost.macs(),
                     f"{m} of {len(path)} moves on the path: {'fits' if ok else 'over the budget'}")
        return ok

    # 3. bisection of the prefix length, then refit and bisect the rest
    accepted = 0
    fitting = {0: 0.0}  # prefix length -> its error, under the current refit moments
    shown = [0]  # moves accepted, for the progress lines
    retirements = 0
    for _ in range(3 if options["compensate"] == "refit" else 1):
        start = accepted
        while True:
            lo, hi = accepted, len(path)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                shown[0] = lo  # the longest prefix known to fit so far
                if fits(mid):
                    lo = mid
                else:
                    hi = mid - 1
            accepted = shown[0] = lo
            if accepted == len(path) or retirements >= _RETIREMENTS:
                break
            # path[accepted] is the move that broke the budget (errors taken as monotone along the path):
            # its unit is retired, as the greedy search retires a unit whose next move breaks it
            culprit = path[accepted][0]
            path = path[:accepted] + [(u, k) for u, k in path[accepted:] if u is not culprit]
            fitting = {m: e for m, e in fitting.items() if m <= accepted}
            retirements += 1
        grew = accepted > start
        if options["compensate"] != "refit" or accepted == 0:
            break
        set_state(accepted)
        saved = trial.moments, trial.drifted, dict(fitting)
        trial.moments, trial.drifted = measure_moments(), True
        fitting = {}
        refits += 1
        if not fits(accepted):
            trial.moments, trial.drifted, fitting = saved
            break
        if not grew or accepted == len(path) or fitting[accepted] >= saved[2][accepted]:
            break  # nothing new to refit, or the refit freed no budget for more moves
    for i in range(accepted):  # bisection of the pipeline (qlfx.debug.bisect): one rewrite per move
        if not ctx.allow_rewrite():
            result.skipped.append(Skip("slice", "rewrite limit reached (bisection)"))
            accepted = i
            break
    set_state(accepted)
    wasted = [u for u in units if cost.wasted(u)]  # mergeable pairs left above their break-even width
    if wasted:  # give them their channels back where that state fits: they only cost error
        for unit in wasted:
            unit.keep = unit.size
        err = score.error(trial.apply())
        evaluations += 1
        if err <= limit and (accuracy_drop is None or score.base_accuracy - score.accuracy <= accuracy_drop + 1e-9):
            result.stats["undone"] = sorted(u.id for u in wasted)
            fitting[accepted] = err
        else:
            set_state(accepted)
    progress.say(evaluations, accepted, fitting.get(accepted, float("nan")),
                 cost.macs(), "done")
    result.stats.update({"evaluations": evaluations, "refits": refits, "path_moves": len(path),
                         "retired_units": retirements, "moves_accepted": accepted,
                         "macs_predicted": cost.macs()})
    trial.apply()
