"""rebalance: choose the positive diagonal rescalings the symmetry allows that minimise the weight norm.

Every channel space whose group contains positive diagonals (GL between two linear ops, monomial,
positive monomial: ReLU / max-pool spaces, the two factors of a product) may be rescaled by
D = diag(d), d > 0, without changing any output (:mod:`qlfx.symmetry`). A product's output space is
rescaled by D_a D_b (the *branch rescaling*: (D, D^-1) on the two factors leaves it alone). Under the
rescaling a weight entry W[o, i] of a linear or depthwise op becomes ``W[o, i] * d_out(o) / d_in(i)``,
so with x = log d the objective

    F(x) = sum over conv/linear weights of || W' ||_F^2 = sum_(o,i) W[o,i]^2 exp(2 (L_out(o) - L_in(i)))

(L_out(o): the sum of the log-scales acting on output channel o, several for a derived product space)
is a sum of exponentials of linear functions: convex. For one space S with everything else fixed,
channel k appears as ``a_k d_k^2 + b_k / d_k^2`` (a_k: squared norm of the entries d_k multiplies,
b_k: of those it divides), minimised in closed form by ``d_k = (b_k / a_k)^(1/4)`` -- i.e.
``d_k = sqrt(b_k' / a_k')`` for the row/column *norms* a_k' = sqrt(a_k), b_k' = sqrt(b_k) (ENorm).
Spaces interact (a product couples its factors' scalings), so the pass sweeps over all spaces a few
times (block coordinate descent: F never increases -- a step that would increase it, possible only when
one weight has S on both sides, is halved or dropped). The rescalings are applied only when F goes down.

Contract "equivalent"; biases follow (c' = D c) and are not part of F.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.symmetry import Group, Monomial, analyze, apply_elements
from qlfx.symmetry.spaces import SymmetryReport

_SCALABLE = (Group.GL, Group.MONOMIAL, Group.POSITIVE_MONOMIAL)


def _weight_terms(gm: fx.GraphModule, report: SymmetryReport):
    """[(out node, in node, squared weights, kind)] for the ops whose weights a rescaling changes:
    kind 'dense' (v[o, i], groups=1) or 'depthwise' (v[o], input channel o // k)."""
    terms = []
    for node in gm.graph.nodes:
        kind = report.node_kinds.get(node.name)
        if kind == "linear":
            view = ir.ConvCall.of(node) or ir.LinearCall.of(node)
            w, x = ir.get_tensor(gm, view.weight), view.input
            v = w.detach().double() ** 2
            v = v.reshape(v.shape[0], v.shape[1], -1).sum(-1)
            terms.append((node.name, x.name, v, "dense"))
        elif kind == "branch_product":
            args = ir.op_args(node)
            for branch in ("a", "b"):
                v = ir.get_tensor(gm, args[f"weight_{branch}"]).detach().double() ** 2
                sub = report.node_kinds.get(f"{node.name}.{branch}")
                if sub == "linear":
                    terms.append((f"{node.name}.{branch}", args["x"].name,
                                  v.reshape(v.shape[0], v.shape[1], -1).sum(-1), "dense"))
                elif sub == "depthwise":
                    terms.append((f"{node.name}.{branch}", args["x"].name, v.reshape(v.shape[0], -1).sum(-1),
                                  "depthwise"))
        elif kind == "depthwise":
            conv = ir.ConvCall.of(node)
            w = ir.get_tensor(gm, conv.weight).detach().double() ** 2
            terms.append((node.name, conv.input.name, w.reshape(w.shape[0], -1).sum(-1), "depthwise"))
    return terms


def weight_norm_squared(gm: fx.GraphModule, report: SymmetryReport | None = None) -> float:
    """Sum of squared Frobenius norms of the conv / linear weights the symmetry can rescale."""
    report = report if report is not None else analyze(gm)
    return float(sum(float(v.sum()) for _, _, v, _ in _weight_terms(gm, report)))


@register_pass
class Rebalance(Pass):
    name = "rebalance"
    description = "rescale channel spaces by positive diagonals (within their group) to minimise the weight norm"
    contract = "equivalent"
    option_defaults = {"sweeps": 10}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        # The sweeps are thousands of tiny matrix-vector products: intra-op threads only add
        # synchronisation (20x slower on a busy 2-core machine), so run them on one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._run(gm, ctx)
        finally:
            torch.set_num_threads(threads)

    def _run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        report = analyze(gm)
        scalable = []
        for s in report.spaces:
            if s.derived or s.group not in _SCALABLE or s.size == 0:
                continue
            if not ctx.allow_rewrite():
                result.skipped.append(Skip(f"space {s.id}", "rewrite limit reached (bisection)"))
                continue
            scalable.append(s.id)
        if not scalable:
            result.notes.append("no space allows positive rescalings")
            return result
        offset, total = {}, 0
        for sid in scalable:
            offset[sid] = total
            total += report.spaces[sid].size

        # log-scales acting on each channel of each space: [(local channel, variable index)]
        memo: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        derived_by = {p.z[0]: p for p in report.products if report.spaces[p.z[0]].derived}

        def space_terms(sid: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            if sid in memo:
                return memo[sid]
            n = report.spaces[sid].size
            out: list[tuple[torch.Tensor, torch.Tensor]] = []
            if sid in offset:
                out = [(torch.arange(n), offset[sid] + torch.arange(n))]
            elif sid in derived_by:
                p = derived_by[sid]
                for fid, m in (p.a, p.b):  # z channel c*m + r <- factor-space channel c
                    for loc, glob in space_terms(fid):
                        r = torch.arange(m)
                        out.append(((loc[:, None] * m + r[None, :]).reshape(-1), glob.repeat_interleave(m)))
            memo[sid] = out
            return out

        def site_terms(node: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for start, _, sid, mult in report.node_segments.get(node, []):
                for loc, glob in space_terms(sid):
                    r = torch.arange(mult)
                    out.append(((start + loc[:, None] * mult + r[None, :]).reshape(-1), glob.repeat_interleave(mult)))
            return out

        terms = _weight_terms(gm, report)
        sites = {}
        for out_node, in_node, _, _ in terms:
            for n in (out_node, in_node):
                if n not in sites:
                    sites[n] = site_terms(n)
        channels = {n: report.node_segments[n][-1][1] for n in sites}
        x = torch.zeros(total, dtype=torch.float64)

        def log_scale(node: str) -> torch.Tensor:
            L = torch.zeros(channels[node], dtype=torch.float64)
            for ch, glob in sites[node]:
                L.index_add_(0, ch, x[glob])
            return L

        def term_sums(t) -> tuple[torch.Tensor, torch.Tensor]:
            """(row sums, column sums) of the rescaled squared weights v[o, i] e_o e_i, where
            e_o = exp(2 L_out(o)), e_i = exp(-2 L_in(i)): matrix-vector products, no exp of a matrix."""
            out_node, in_node, v, kind = t
            eo, ei = torch.exp(2 * log_scale(out_node)), torch.exp(-2 * log_scale(in_node))
            if kind == "dense":
                return eo * (v @ ei), ei * (v.T @ eo)
            k = v.shape[0] // ei.shape[0]
            rows = v * eo * ei.repeat_interleave(k)
            return rows, rows.reshape(-1, k).sum(1)

        # which terms each variable block touches
        owner = torch.empty(total, dtype=torch.long)
        for sid in scalable:
            owner[offset[sid]:offset[sid] + report.spaces[sid].size] = sid
        touching: dict[int, list[int]] = {sid: [] for sid in scalable}
        for ti, (out_node, in_node, _, _) in enumerate(terms):
            hit = set()
            for n in (out_node, in_node):
                for _, glob in sites[n]:
                    hit.update(int(s) for s in torch.unique(owner[glob]))
            for sid in hit:
                touching[sid].append(ti)

        def partial_objective(indices) -> float:
            return float(sum(float(term_sums(terms[i])[0].sum()) for i in indices))

        before = float(sum(float(t[2].sum()) for t in terms))
        for _ in range(int(self.options["sweeps"])):
            for sid in scalable:
                idx = touching[sid]
                if not idx:
                    continue
                lo, n = offset[sid], report.spaces[sid].size
                a = torch.zeros(total, dtype=torch.float64)
                b = torch.zeros(total, dtype=torch.float64)
                for i in idx:
                    out_node, in_node, _, _ = terms[i]
                    rows, cols = term_sums(terms[i])
                    for ch, glob in sites[out_node]:
                        a.index_add_(0, glob, rows[ch])
                    for ch, glob in sites[in_node]:
                        b.index_add_(0, glob, cols[ch])
                a_s, b_s = a[lo:lo + n], b[lo:lo + n]
                ok = (a_s > 0) & (b_s > 0)
                step = torch.zeros(n, dtype=torch.float64)
                step[ok] = 0.25 * torch.log(b_s[ok] / a_s[ok])
                if not bool(step.abs().max() > 1e-12):
                    continue
                old = x[lo:lo + n].clone()
                f0 = partial_objective(idx)
                for scale in (1.0, 0.5, 0.25):
                    x[lo:lo + n] = old + scale * step
                    if partial_objective(idx) <= f0:
                        break
                else:
                    x[lo:lo + n] = old
        after = partial_objective(range(len(terms)))
        result.stats = {"norm_squared_before": before, "norm_squared_after": after, "spaces": len(scalable)}
        if not after < before * (1 - 1e-9):
            result.notes.append(f"weights already balanced: sum of squared weight norms {before:.6g} (no change)")
            return result
        elements = {sid: Monomial.diagonal(torch.exp(x[offset[sid]:offset[sid] + report.spaces[sid].size]))
                    for sid in scalable}
        touched = apply_elements(gm, elements, report, check=True)
        result.changed = bool(touched)
        for sid in scalable:
            d = elements[sid].scale
            if bool((d - 1).abs().max() > 1e-9):
                s = report.spaces[sid]
                result.rewrites.append(f"space {sid} ({s.group}, size {s.size}): scales in "
                                       f"[{float(d.min()):.3g}, {float(d.max()):.3g}] at {s.sites[0]}")
        result.notes.append(f"sum of squared weight norms {before:.6g} -> {after:.6g} "
                            f"(norm {math.sqrt(before):.6g} -> {math.sqrt(after):.6g}) over {len(scalable)} space(s)")
        return result
