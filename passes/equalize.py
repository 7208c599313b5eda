"""equalize: positive channel scalings that equalise per-channel ranges before int8 quantisation.

Every channel space whose group contains positive diagonals (ReLU / max-pool streams: positive
monomial; the two factors of a product, whose output scales by D_a D_b -- the *branch rescalings*;
GL spaces between two linear ops; per-channel ops) may be rescaled by D = diag(d), d > 0, without
changing the function (:mod:`qlfx.symmetry`). A quantiser sees the rescaled tensors: an entry W[o, i]
of a weight becomes ``W[o, i] d_out(o) / d_in(i)`` and channel k of a value x becomes ``d_k x_k``.
Per-tensor (activations) and per-row (weights) int8 grids waste levels on every channel whose range is
far below the largest one; DFQ (Nagel et al. 2019, "Data-Free Quantization") equalises them.

**Range objective** (``objective=ranges``, the default without calibration data). With log-scales ``L = log d`` (a product space: L_a + L_b), and every quantised
tensor T normalised by its own initial max ``rho_T`` (so tensors of different scale count alike),

    F_q(L) = sum_T sum_(entries e of T) (|e| / rho_T)^q exp(q s_e . L),        s_e = +1 / -1 per side

where the entries are the weights' entries (the writers' rows multiplied by d, the readers' columns
divided) and, with calibration data, the values' per-channel ranges max|x_k| (multiplied). F_q is a sum
of exponentials of linear functions of L: convex. For one channel k of one space with everything else
fixed it reads ``A_k d^q + B_k d^-q`` (A_k: the multiplied entries' terms, B_k: the divided ones'),
minimised in closed form by

    d_k <- d_k (B_k / A_k)^(1 / 2q),   and  (A_k^(1/q), B_k^(1/q)) -> (max multiplied, max divided) as q -> inf,

so for two layers W1 -> ReLU -> W2 and large q this is DFQ's ``d_k = sqrt(r2_k / r1_k)`` (r1: row range
of W1, r2: column range of W2: both become sqrt(r1_k r2_k)), up to one factor for the whole space from
the normalisation (it changes no tensor's relative precision); with calibration data the value's range
joins the rows (SmoothQuant's alpha = 1/2 balance of activation and weight ranges); q = 2 without
activations would be ``rebalance``'s weight-norm objective. A_k and B_k are read off one autograd pass
(:class:`qlfx.symmetry.optimize.GroupView` with separate leaves for the output and input sides).
Spaces interact (products couple factors; a weight between two scaled spaces), so the pass sweeps
over the spaces (block coordinate descent; a step that would raise F_q -- possible only when one weight
has the same space on both sides -- is halved, then dropped).

**Output-noise objective** (``objective=noise``, the default when calibration data is given). The
range balance above treats every tensor alike and every weight as if it had one grid for the whole
tensor. The ``quantize`` pass does otherwise: a weight row has its own grid (so a row's scaling costs
nothing, only the columns' scalings count), the two factors of a product and the product itself each
have a per-tensor grid (the branch rescalings must balance three ranges with two scalings per channel),
and an error matters by how much of it reaches the output. So the pass minimises the first-order
prediction of the int8 output error (:func:`qlfx.symmetry.quant_objective.int8_noise`):

    E(L) = sum_(grids T) (range_T(D) / 255)^2 / 12 * sum_k G_(T,k) / d_k^2
         + sum_(weights W) sum_o (max_i |W_oi| / d_i / 127)^2 / 12 * (sum_i d_i^2 E[x_i^2]) * G_(y,o)

(range_T(D) = max_k d_k hi_k - min_k d_k lo_k over the calibration per-channel ranges, G the channels'
output sensitivities measured by Hutchinson probes on the calibration data (``probes`` per chunk),
scaled by the fraction of entries that are not exactly zero, E[x_i^2] the inputs' second moments;
every term a max of exponentials of linear functions of L = log d, so E is convex in L). Adam on L
(``steps``, ``lr``, maxima as p-norms ``p``) from the identity; the exact prediction (true maxima,
real rounding of the weights) decides whether the result is applied. sqrt(E) is reported as the
predicted relative output error of the whole graph, before and after.

Measured (examples/equalize_digits.py: trained digits nets, minmax grids, 8-bit weights, the int8 ONNX
in onnxruntime, relative logit error on 360 held-out images): PDEBlock net int8 0.0507, equalize 0.0377
with this objective (predicted on the calibration data: 0.0507 -> 0.0380); Eq.(3) net 0.0542 -> 0.0426.
With the range objective (and rotate's local one) equalize,rotate reached 0.0420 / 0.0469. What no
scaling can do: with every value of a scalable space on a grid of its own per channel (the best a
per-tensor grid of rescaled channels can reach) the error is still 0.0350 / 0.0426 -- heavy-tailed
channels (branch products) keep their peak-to-rms ratio under any scaling, and the Eq.(3) layout pins
its streams to signed permutations.

Signed permutations (hardtanh spaces) change no range of a symmetric grid and are not used. Bias
absorption (DFQ's shift of a ReLU's input by its lower bound) changes the function where the bound is
violated, so it is not an ``equivalent`` rewrite and is left to the ``quantize`` pass (bias correction).

Contract "equivalent"; biases follow (c' = D c). The result reports per space range spread, kurtosis
and measured int8 error before and after (:mod:`qlfx.symmetry.quant_objective`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from qlfx.errors import UsageError
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.quantization import has_vnni
from qlfx.requirements import BN_FOLDED
from qlfx.symmetry import Group, Monomial, analyze, apply_elements
from qlfx.symmetry.optimize import GroupView, Parameterisation, minimize, select_spaces, weight_terms
from qlfx.symmetry.quant_objective import (activation_nodes, collect_activations, format_summary, int8_noise,
                                           int8_stats, space_reports, touching, with_derived)

_SCALABLE = (Group.GL, Group.MONOMIAL, Group.POSITIVE_MONOMIAL)
_OBJECTIVES = ("auto", "noise", "ranges")


@register_pass
class Equalize(Pass):
    name = "equalize"
    description = ("positive channel scalings (ReLU, product branches, GL) that minimise the predicted int8 output "
                   "error (DFQ's range balance without calibration data)")
    contract = "equivalent"
    requires = (BN_FOLDED,)
    site_noun = "space"
    option_defaults = {"objective": "auto", "sweeps": 8, "q": 16, "activations": True, "keep": 1024,
                       "steps": 300, "lr": 0.05, "p": 16, "probes": 2, "weight_bits": "auto", "seed": 0}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        o = self.options
        q = float(o["q"])
        if not 1 <= q <= 32:  # larger q underflows float64 for channels ~1e-10 below their tensor's max
            raise UsageError(f"equalize: q must be in [1, 32] (the exponent of the range objective; 16 is "
                             f"close to DFQ's max-range balance), got {q}")
        if o["objective"] not in _OBJECTIVES:
            raise UsageError(f"equalize: objective must be one of {', '.join(_OBJECTIVES)} (noise: predicted int8 "
                             f"output error, needs calibration data; ranges: DFQ's range balance), "
                             f"got {o['objective']!r}")
        objective = o["objective"] if o["objective"] != "auto" else ("noise" if ctx.calibration else "ranges")
        if objective == "noise" and not ctx.calibration:
            raise UsageError("equalize<objective=noise> measures ranges and output sensitivities on calibration "
                             "data: give calibration=... (CLI --calibration x.npy), or use objective=ranges")
        if not float(o["p"]) >= 2:
            raise UsageError(f"equalize: p (the p-norm standing for max) must be >= 2, got {o['p']}")
        if not isinstance(o["probes"], int) or o["probes"] < 1:
            raise UsageError(f"equalize: probes must be a count >= 1, got {o['probes']!r}")
        bits = o["weight_bits"]
        if bits == "auto":  # as quantize<reduce_range=auto>: 7-bit weights where onnxruntime needs them
            bits = 8 if has_vnni() else 7
        if str(bits) not in ("7", "8"):
            raise UsageError(f"equalize: weight_bits must be 7, 8 or auto (as the quantize pass uses), got {bits!r}")
        # thousands of tiny tensor ops: intra-op threads only add synchronisation
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = PassResult(changed=False)
            report = analyze(gm)
            ids = []
            for sid in select_spaces(report, groups=_SCALABLE):
                if not ctx.allow_rewrite():
                    result.skipped.append(Skip(f"space {sid}", "rewrite limit reached (bisection)"))
                    continue
                ids.append(sid)
            if not ids:
                result.notes.append("no space allows positive rescalings")
                return result
            if objective == "noise":
                return self._run_noise(gm, ctx, report, ids, int(bits), result)
            return self._run_ranges(gm, ctx, q, report, ids, result)
        finally:
            torch.set_num_threads(threads)

    def _run_noise(self, gm: fx.GraphModule, ctx: PassContext, report, ids: list[int], bits: int,
                   result: PassResult) -> PassResult:
        o = self.options
        gl = [sid for sid in ids if report.spaces[sid].group is Group.GL]
        terms = weight_terms(gm, report, ids)
        all_terms = weight_terms(gm, report, range(len(report.spaces)))  # for the whole-graph prediction
        everything = with_derived(report, ids)
        stats, all_grids = int8_stats(gm, report, all_terms, ctx.calibration, ctx.example_inputs,
                                      ctx.dynamic_batch, keep=int(o["keep"]), probes=int(o["probes"]),
                                      seed=int(o["seed"]))
        grids = [g for g in all_grids if touching(report, g, everything)]  # the others do not move
        act_names = activation_nodes(report, terms, everything)
        acts = {n: stats[n] for n in act_names if n in stats}
        before = space_reports(gm, report, ids, acts, bits)
        p = float(o["p"])

        def predicted(elements: dict) -> float:  # whole graph, exact maxima, real weight rounding
            param = Parameterisation(report, ids, start=elements, diagonal=gl)
            with torch.no_grad():
                view = GroupView(report, all_terms, param.space_elements())
                return float(int8_noise(view, stats, all_grids, None, bits))

        chosen, history = minimize(gm, lambda view: int8_noise(view, stats, grids, p, bits), spaces=ids,
                                   steps=int(o["steps"]), lr=float(o["lr"]), report=report, diagonal=gl)
        e_before, e_after = predicted({}), predicted(chosen)
        result.stats = {"objective": "noise", "objective_before": e_before, "objective_after": e_after,
                        "spaces": len(ids), "grids": len(grids), "weight_bits": bits,
                        "predicted_error_before": e_before ** 0.5, "predicted_error_after": e_after ** 0.5,
                        "surrogate_history": history}
        if not e_after < e_before * (1 - 1e-9):
            result.notes.append(f"no rescaling lowers the predicted int8 output error {e_before ** 0.5:.4g} "
                                f"(no change)")
            return result
        return self._apply(gm, ctx, report, ids, chosen, act_names, before, bits, result,
                           f"predicted int8 output error {e_before ** 0.5:.4g} -> {e_after ** 0.5:.4g} "
                           f"(first order, output-referred, on the calibration data)")

    def _run_ranges(self, gm: fx.GraphModule, ctx: PassContext, q: float, report, ids: list[int],
                    result: PassResult) -> PassResult:
        gl = [sid for sid in ids if report.spaces[sid].group is Group.GL]
        terms = weight_terms(gm, report, ids)
        reach = {sid: with_derived(report, [sid]) for sid in ids}
        everything = with_derived(report, ids)
        use_acts = bool(self.options["activations"]) and bool(ctx.calibration)
        act_names = activation_nodes(report, terms, everything)
        acts = collect_activations(gm, act_names, ctx.calibration, ctx.example_inputs, ctx.dynamic_batch,
                                   keep=int(self.options["keep"])) if use_acts else {}
        before = space_reports(gm, report, ids, acts)

        # normalised magnitudes: each tensor's entries over its own max (constants)
        scaled_terms = [dataclasses.replace(t, weight=t.weight.abs() / t.weight.abs().max().clamp_min(1e-30))
                        for t in terms]
        ranges = {}
        for name, st in acts.items():
            r = st.abs_range
            ranges[name] = (r / r.max().clamp_min(1e-30))[None, :]

        def objective(view: GroupView, term_idx, names) -> torch.Tensor:
            total = torch.zeros((), dtype=torch.float64)
            for i in term_idx:
                total = total + (view.weight(scaled_terms[i]).abs() ** q).sum()
            for name in names:
                total = total + (view.channels(name, ranges[name]).abs() ** q).sum()
            return total

        local = {sid: ([i for i, t in enumerate(terms) if touching(report, t.x, reach[sid]) or
                        touching(report, t.y, reach[sid])],
                       [n for n in ranges if touching(report, n, reach[sid])]) for sid in ids}
        x = {sid: torch.zeros(report.spaces[sid].size, dtype=torch.float64) for sid in ids}

        def elements(requires_grad: bool) -> Parameterisation:
            param = Parameterisation(report, ids, diagonal=gl)
            with torch.no_grad():
                for sid in ids:
                    param.params[sid].copy_(x[sid])
            for p in param.params.values():
                p.requires_grad_(requires_grad)
            return param

        def value(term_idx, names) -> float:
            with torch.no_grad():
                return float(objective(GroupView(report, terms, elements(False).space_elements()), term_idx, names))

        all_terms, all_names = list(range(len(terms))), list(ranges)
        f_before = value(all_terms, all_names)
        for _ in range(int(self.options["sweeps"])):
            moved = False
            for sid in ids:
                idx, names = local[sid]
                if not idx and not names:
                    continue
                out_side, in_side = elements(True), elements(True)
                f = objective(GroupView(report, terms, out_side.space_elements(), in_side.space_elements()), idx, names)
                f.backward()
                grow = out_side.params[sid].grad  # q * A_k
                shrink = in_side.params[sid].grad  # -q * B_k
                a_k = grow / q if grow is not None else torch.zeros_like(x[sid])
                b_k = -shrink / q if shrink is not None else torch.zeros_like(x[sid])
                ok = (a_k > 0) & (b_k > 0)
                step = torch.zeros_like(x[sid])
                step[ok] = torch.log(b_k[ok] / a_k[ok]) / (2 * q)
                if not bool(step.abs().max() > 1e-9):
                    continue
                f0, old = float(f.detach()), x[sid].clone()
                for scale in (1.0, 0.5, 0.25):
                    x[sid] = old + scale * step
                    if value(idx, names) <= f0:
                        moved = True
                        break
                else:
                    x[sid] = old
            if not moved:
                break
        f_after = value(all_terms, all_names)
        result.stats = {"objective": "ranges", "objective_before": f_before, "objective_after": f_after,
                        "spaces": len(ids), "activations": len(acts), "q": q}
        if not f_after < f_before * (1 - 1e-9):
            result.notes.append(f"ranges already equal: objective F_q {f_before:.6g} (no change)")
            return result
        chosen = {sid: Monomial.diagonal(torch.exp(x[sid])) for sid in ids}
        return self._apply(gm, ctx, report, ids, chosen, act_names if use_acts else [], before, 8, result,
                           f"range objective F_{q:g} {f_before:.4g} -> {f_after:.4g} "
                           f"({'weights and calibration activations' if acts else 'weights only: no calibration data'})")

    def _apply(self, gm, ctx, report, ids, chosen, act_names, before, bits, result, summary) -> PassResult:
        """Apply the scalings, re-measure the spaces and report each one that moved."""
        touched = apply_elements(gm, chosen, report, check=True)
        result.changed = bool(touched)
        acts = collect_activations(gm, act_names, ctx.calibration, ctx.example_inputs, ctx.dynamic_batch,
                                   keep=int(self.options["keep"])) if act_names and ctx.calibration else {}
        after = space_reports(gm, report, ids, acts, bits)
        per_space = {}
        for sid in ids:
            d = chosen[sid].scale
            if not bool((d - 1).abs().max() > 1e-9):
                continue
            s = report.spaces[sid]
            label = f"{s.group}, {s.size} ch, scales [{float(d.min()):.3g}, {float(d.max()):.3g}], {s.sites[0]}"
            result.rewrites.append(format_summary(sid, label, before[sid], after[sid]))
            per_space[sid] = {"before": before[sid], "after": after[sid], "scale_min": float(d.min()),
                              "scale_max": float(d.max())}
        result.stats["per_space"] = per_space
        result.notes.append(f"{len(per_space)} space(s) rescaled; {summary}")
        return result
