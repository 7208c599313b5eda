"""equalize: positive channel scalings that equalise per-channel ranges before int8 quantisation.

Every channel space whose group contains positive diagonals (ReLU / max-pool streams: positive
monomial; the two factors of a product, whose output scales by D_a D_b -- the *branch rescalings*;
GL spaces between two linear ops; per-channel ops) may be rescaled by D = diag(d), d > 0, without
changing the function (:mod:`qlfx.symmetry`). A quantiser sees the rescaled tensors: an entry W[o, i]
of a weight becomes ``W[o, i] d_out(o) / d_in(i)`` and channel k of a value x becomes ``d_k x_k``.
Per-tensor (activations) and per-row (weights) int8 grids waste levels on every channel whose range is
far below the largest one; DFQ (Nagel et al. 2019, "Data-Free Quantization") equalises them.

**Objective.** With log-scales ``L = log d`` (a product space: L_a + L_b), and every quantised
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
from qlfx.requirements import BN_FOLDED
from qlfx.symmetry import Group, Monomial, analyze, apply_elements
from qlfx.symmetry.optimize import GroupView, Parameterisation, select_spaces, weight_terms
from qlfx.symmetry.quant_objective import (activation_nodes, collect_activations, format_summary, space_reports,
                                           touching, with_derived)

_SCALABLE = (Group.GL, Group.MONOMIAL, Group.POSITIVE_MONOMIAL)


@register_pass
class Equalize(Pass):
    name = "equalize"
    description = "positive channel scalings (ReLU, product branches, GL) that equalise per-channel ranges for int8"
    contract = "equivalent"
    requires = (BN_FOLDED,)
    site_noun = "space"
    option_defaults = {"sweeps": 8, "q": 16, "activations": True, "keep": 1024}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        q = float(self.options["q"])
        if not 1 <= q <= 32:  # larger q underflows float64 for channels ~1e-10 below their tensor's max
            raise UsageError(f"equalize: q must be in [1, 32] (the exponent of the range objective; 16 is "
                             f"close to DFQ's max-range balance), got {q}")
        # thousands of tiny tensor ops: intra-op threads only add synchronisation
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._run(gm, ctx, q)
        finally:
            torch.set_num_threads(threads)

    def _run(self, gm: fx.GraphModule, ctx: PassContext, q: float) -> PassResult:
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
        result.stats = {"objective_before": f_before, "objective_after": f_after, "spaces": len(ids),
                        "activations": len(acts), "q": q}
        if not f_after < f_before * (1 - 1e-9):
            result.notes.append(f"ranges already equal: objective F_q {f_before:.6g} (no change)")
            return result
        chosen = {sid: Monomial.diagonal(torch.exp(x[sid])) for sid in ids}
        touched = apply_elements(gm, chosen, report, check=True)
        result.changed = bool(touched)
        if use_acts:
            acts = collect_activations(gm, act_names, ctx.calibration, ctx.example_inputs, ctx.dynamic_batch,
                                       keep=int(self.options["keep"]))
        after = space_reports(gm, report, ids, acts)
        per_space = {}
        for sid in ids:
            d = torch.exp(x[sid])
            if not bool((d - 1).abs().max() > 1e-9):
                continue
            s = report.spaces[sid]
            label = f"{s.group}, {s.size} ch, scales [{float(d.min()):.3g}, {float(d.max()):.3g}], {s.sites[0]}"
            result.rewrites.append(format_summary(sid, label, before[sid], after[sid]))
            per_space[sid] = {"before": before[sid], "after": after[sid], "scale_min": float(d.min()),
                              "scale_max": float(d.max())}
        result.stats["per_space"] = per_space
        result.notes.append(f"{len(per_space)} space(s) rescaled; range objective F_{q:g} {f_before:.4g} -> "
                            f"{f_after:.4g} ({'weights and calibration activations' if acts else 'weights only: no calibration data'})")
        return result
