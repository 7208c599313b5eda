"""rotate: orthogonal changes of basis of O(C) / GL channel spaces that minimise int8 quantisation error.

A residual stream behind radial activations (hardball, softball) carries O(C), a space between two
linear ops GL(C) (DESIGN.md §3): any orthogonal Q acting on it keeps the function, with every weight
writing the space becoming ``Q W``, every weight reading it ``W Q^T`` and every value x of it ``Q x``
(:func:`qlfx.symmetry.apply_elements`). A few outlier channels make int8 coarse for everything else
(a per-tensor activation grid and every weight row reading the outlier are sized by it); a rotation
spreads them over all channels (QuaRot 2024: Hadamard; SpinQuant 2024: a learned rotation).

**Start.** The orthonormal Hadamard matrix H (entries +-1/sqrt(C); C a power of two, else a seeded
Haar-random orthogonal matrix): a one-channel outlier of size m becomes C entries of size m/sqrt(C).

**Search.** From the start, ``Q = cayley(A) Q_start`` (:func:`qlfx.symmetry.optimize.minimize`, Adam on
A, ``steps``/``lr``) minimises a smooth int8-error objective of :mod:`qlfx.symmetry.quant_objective`.
``objective=local`` (the default without calibration data) is the surrogate E(Q): the mean over the
weights touching the rotated spaces of the per-output-channel rounding noise relative to ||W||^2, plus (with calibration data) the mean over the
values of those spaces that a conv / linear reads or writes of the per-tensor uint8 rounding noise relative to E[x^2],
maxima replaced by p-norms (``p``). Q is orthogonal, so the norms in the denominators do not move and
an error in rotated coordinates is the same error in the original ones. GL spaces are searched over
O(C) for that reason (scalings are ``equalize``'s job). ``weight_bits`` (7, 8, ``auto`` = 7 on CPUs
without VNNI, as ``quantize<reduce_range=auto>``) sets the weight grid of the objective.

**Output-noise objective** (``objective=noise``, the default when calibration data is given): instead of
the mean of the tensors' relative errors, the first-order prediction of the int8 *output* error
(:func:`qlfx.symmetry.quant_objective.int8_noise`, as ``equalize`` uses it): every per-tensor grid the
``quantize`` pass will put on a value of the rotated spaces, and every weight row, weighted by the
output sensitivities of its channels measured on the calibration data. Under Q the activation noise
reaching the output is ``(range(Q x) / 255)^2 / 12 * sum_k G_k`` (a rotation moves only the range); a
weight row o' of ``Q W`` reaches it through ``sum_k G_k Q_(o',k)^2``. So a tensor that barely reaches
the output no longer pulls the rotation as much as one that dominates it. The selection below then
compares the exact prediction (true maxima over the sampled rows, real weight rounding) per space.
Measured (examples/equalize_digits.py, trained digits PDEBlock net, minmax grids, int8 ONNX in
onnxruntime, held-out images): after ``equalize`` 0.0377 relative output error, ``rotate`` on top 0.0346;
the local objective on the same equalised graph gives 0.0343 (torch simulation, against 0.0347 for
this one): on this net the two objectives agree to within the spread of the held-out error. No
rotation beats 0.0247 there (the O(C) values at the least range any rotation can give,
every scalable value per channel).

**Selection.** The measured error (real int8 rounding of the weights; the activation ranges of the
sampled calibration rows) decides per space between the identity, the start and the optimised
rotation, in space order, the other spaces held at their current choice: a space is rotated only
where that lowers its measured error.

Contract "equivalent". The result reports per space weight / activation kurtosis, peak-to-RMS, range
spread and measured int8 error before and after (activations re-measured on the rotated graph).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qlfx.errors import UsageError
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.quantization import has_vnni
from qlfx.requirements import BN_FOLDED
from qlfx.symmetry import Group, analyze, apply_elements
from qlfx.symmetry.optimize import GroupView, Parameterisation, minimize, select_spaces, weight_terms
from qlfx.symmetry.quant_objective import (activation_nodes, collect_activations, format_summary, int8_noise,
                                           int8_stats, measured, orthogonal_start, space_reports, surrogate, touching,
                                           with_derived)

_STARTS = ("hadamard", "random", "identity")
_OBJECTIVES = ("auto", "noise", "local")


@register_pass
class Rotate(Pass):
    name = "rotate"
    description = ("rotate O(C)/GL channel spaces (Hadamard start, then descent) to minimise the predicted int8 "
                   "output error")
    contract = "equivalent"
    requires = (BN_FOLDED,)
    site_noun = "space"
    option_defaults = {"objective": "auto", "start": "hadamard", "steps": 60, "lr": 0.01, "p": 16,
                       "activation_weight": 1.0, "seed": 0, "keep": 1024, "weight_bits": "auto", "probes": 2}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.options["objective"] not in _OBJECTIVES:
            raise UsageError(f"rotate: objective must be one of {', '.join(_OBJECTIVES)} (noise: predicted int8 "
                             f"output error, needs calibration data; local: the mean relative error of the "
                             f"space's tensors), got {self.options['objective']!r}")
        if self.options["objective"] == "noise" and not ctx.calibration:
            raise UsageError("rotate<objective=noise> measures output sensitivities on calibration data: give "
                             "calibration=... (CLI --calibration x.npy), or use objective=local")
        if not isinstance(self.options["probes"], int) or self.options["probes"] < 1:
            raise UsageError(f"rotate: probes must be a count >= 1, got {self.options['probes']!r}")
        if self.options["start"] not in _STARTS:
            raise UsageError(f"rotate: start must be one of {', '.join(_STARTS)}, got {self.options['start']!r}")
        if not float(self.options["p"]) >= 2:
            raise UsageError(f"rotate: p (the p-norm standing for max) must be >= 2, got {self.options['p']}")
        bits = self.options["weight_bits"]
        if bits == "auto":  # as quantize<reduce_range=auto>: 7-bit weights where onnxruntime needs them
            bits = 8 if has_vnni() else 7
        if str(bits) not in ("7", "8"):
            raise UsageError(f"rotate: weight_bits must be 7, 8 or auto (as the quantize pass uses), got {bits!r}")
        return self._run(gm, ctx, int(bits))

    def _run(self, gm: fx.GraphModule, ctx: PassContext, bits: int) -> PassResult:
        result = PassResult(changed=False)
        report = analyze(gm)
        ids = []
        for sid in select_spaces(report, groups=(Group.O, Group.GL)):
            if report.spaces[sid].size < 2:
                continue
            if not ctx.allow_rewrite():
                result.skipped.append(Skip(f"space {sid}", "rewrite limit reached (bisection)"))
                continue
            ids.append(sid)
        if not ids:
            result.notes.append("no O(C) or GL space of size >= 2 to rotate")
            return result
        gl = [sid for sid in ids if report.spaces[sid].group is Group.GL]
        terms = weight_terms(gm, report, ids)
        act_names = activation_nodes(report, terms, with_derived(report, ids))
        keep = int(self.options["keep"])
        noise = self.options["objective"] == "noise" or (self.options["objective"] == "auto" and bool(ctx.calibration))
        value_stats, grids = {}, []
        if noise:
            value_stats, grids = int8_stats(gm, report, terms, ctx.calibration, ctx.example_inputs, ctx.dynamic_batch,
                                      keep=keep, probes=int(self.options["probes"]), seed=int(self.options["seed"]))
            grids = [g for g in grids if touching(report, g, with_derived(report, ids))]
            acts = {n: value_stats[n] for n in act_names if n in value_stats}
        else:
            acts = collect_activations(gm, act_names, ctx.calibration, ctx.example_inputs, ctx.dynamic_batch,
                                       keep=keep) if ctx.calibration else {}
        weight_a = float(self.options["activation_weight"]) if acts else 0.0
        before = space_reports(gm, report, ids, acts, bits)

        generator = torch.Generator().manual_seed(int(self.options["seed"]))
        start, start_kind = {}, {}
        for sid in ids:
            n = report.spaces[sid].size
            if self.options["start"] == "identity":
                continue
            if self.options["start"] == "random":
                from qlfx.symmetry import random_orthogonal

                start[sid], start_kind[sid] = random_orthogonal(n, generator), "random orthogonal"
            else:
                start[sid], start_kind[sid] = orthogonal_start(n, generator)
        p = float(self.options["p"])

        def objective(view: GroupView) -> torch.Tensor:
            if noise:
                return int8_noise(view, value_stats, grids, p, bits)
            return surrogate(view, acts, p, weight_a, bits)

        steps = int(self.options["steps"])
        optimised, history = minimize(gm, objective, spaces=ids, steps=steps, lr=float(self.options["lr"]),
                                      report=report, start=start, orthogonal=gl) if steps > 0 else ({}, [])

        # per space: identity, start or optimised, by the measured error of the tensors it touches
        candidates = {"identity": {}, "start": start, "optimised": optimised}
        choice = {sid: ("optimised" if sid in optimised else "start" if sid in start else "identity") for sid in ids}
        local = {sid: ([t for t in terms if touching(report, t.x, {sid}) or touching(report, t.y, {sid})],
                       {n: a for n, a in acts.items() if touching(report, n, {sid})},
                       [g for g in grids if touching(report, g, {sid})]) for sid in ids}

        def current(override: dict[int, str]) -> dict:
            pick = {**choice, **override}
            return {sid: candidates[kind][sid] for sid, kind in pick.items() if sid in candidates[kind]}

        def error(elements: dict, sid: int) -> float:
            param = Parameterisation(report, ids, start=elements, orthogonal=ids)
            with torch.no_grad():
                view = GroupView(report, local[sid][0], param.space_elements())
                if noise:  # exact maxima over the sampled rows, real weight rounding
                    return float(int8_noise(view, value_stats, local[sid][2], None, bits))
            ew, ex = measured(view, local[sid][1], bits)
            return ew + weight_a * ex

        measured_errors = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small matrices: one thread is much faster on a shared machine
        try:
            for sid in ids:
                options = [k for k in ("identity", "start", "optimised") if k == "identity" or sid in candidates[k]]
                errs = {k: error(current({sid: k}), sid) for k in options}
                choice[sid] = min(options, key=lambda k: (errs[k], options.index(k)))
                measured_errors[sid] = errs
        finally:
            torch.set_num_threads(threads)
        chosen = current({})
        stats = {"objective": "noise" if noise else "local", "spaces": len(ids), "activations": len(acts),
                 "weight_bits": bits, "surrogate_history": history,
                 "choices": {sid: choice[sid] for sid in ids}, "measured": measured_errors}
        result.stats = stats
        if not chosen:
            result.notes.append("no rotation lowers the measured int8 error (no change)")
            return result
        touched = apply_elements(gm, chosen, report, check=True)
        result.changed = bool(touched)
        if acts:
            acts = collect_activations(gm, act_names, ctx.calibration, ctx.example_inputs, ctx.dynamic_batch, keep=keep)
        after = space_reports(gm, report, ids, acts, bits)
        per_space = {}
        for sid in ids:
            s = report.spaces[sid]
            how = choice[sid] if choice[sid] != "start" else start_kind[sid]
            if choice[sid] == "optimised":
                how = f"optimised from {start_kind.get(sid, 'identity')}"
            per_space[sid] = {"before": before[sid], "after": after[sid], "choice": how}
            if choice[sid] != "identity":
                result.rewrites.append(format_summary(sid, f"{s.group}, {s.size} ch, {how}, {s.sites[0]}",
                                                      before[sid], after[sid]))
        stats["per_space"] = per_space
        if history and noise:
            result.notes.append(f"predicted int8 output error of the rotated spaces' tensors {history[0] ** 0.5:.4g} "
                                f"-> {history[-1] ** 0.5:.4g} over {steps} steps (first order, output-referred, "
                                f"on the calibration data)")
        elif history:
            result.notes.append(f"int8-error surrogate {history[0]:.4g} -> {history[-1]:.4g} over {steps} steps "
                                f"({'weights and calibration activations' if acts else 'weights only: no calibration data'})")
        result.notes.append(f"{len(result.rewrites)} of {len(ids)} space(s) rotated "
                            f"({', '.join(f'{k}: {sum(v == k for v in choice.values())}' for k in ('start', 'optimised', 'identity'))})")
        return result
