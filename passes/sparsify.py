"""sparsify: choose symmetry-group elements that create exact zeros in the weights (lossless).

For a channel space S whose group contains the orthogonal group (O(C) or GL(C); DESIGN.md §3), any
orthogonal Q acting on S keeps the function: every weight writing S becomes ``Q W`` and every weight
reading S becomes ``W Q^T`` (:func:`qlfx.symmetry.apply_elements`). Pick ONE weight touching S and
triangularise it:

- a *writer* (conv/linear whose output is S), viewed as the matrix ``W_m`` (C x K, K = Cin*kh*kw):
  ``W_m = Q R`` (complete QR), element ``P = Q^T``: ``P W_m = R`` is upper-trapezoidal, so entry
  (i, j) is zero for j < i -- ``sum_{i<C} min(i, K)`` zeros (C(C-1)/2 when K >= C; when K < C, e.g. a
  1x1 skip conv that widens the stream, the rows below K vanish entirely: the rotation exposes the
  rank deficiency);
- a *reader* (conv/linear whose input is S), viewed as ``A`` (R x C, rows = (out channel, tap)):
  ``A^T = Q R`` (complete QR), element ``P = Q^T``: ``A P^-1 = A Q = R^T`` is lower-trapezoidal, with
  ``sum_{i<C} min(i, R)`` zeros.

Each space gets the candidate with the most zeros (ties: the weight applied at more pixels). Those
entries are zero in real arithmetic; in floating point the rotated weight has ~1e-8-relative residue
there, which is set to exact 0.0 (after checking it is indeed that small). The pass's equivalence check
(fp32 tolerance) confirms the function is unchanged.

Then (method ``qr+l1``, the default) the diagonal symmetries -- scalings of (positive-)monomial spaces
such as the product halves -- are optimised to minimise the L1 norm of the weights
(:func:`qlfx.symmetry.optimize.minimize_l1`); a scaling maps 0 to 0, so the new zeros survive. Method
``l1`` skips triangularisation and runs the L1 optimiser over every continuous space (rotations
included): it lowers L1 further but creates no exact zeros (a first-order method on a nonsmooth
objective only gets near zero). Method ``qr`` does the triangularisation alone.

Storage, honestly: the weights stay dense tensors in the graph and the emitters run dense kernels, so
FLOPs and latency do not change. The stats report, per weight, the exact zeros and the bytes a sparse
format would take (CSR: fp32 values + int32 column indices + int32 row pointers over the
``[Cout, rest]`` view; for a triangularised weight also the packed-triangular size, values only),
and in total the parameters that can be dropped.

Needs ``bn-folded``: an unfolded BN ties its input and output spaces to monomial ones, so a hardball
stream that is O(C) once folded offers no rotation; each such stream is skipped naming fold-bn.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.requirements import BN_FOLDED

# Residue allowed at a structural zero before it is set to 0.0, relative to max|W| of that weight.
RESIDUE_LIMIT = 1e-5
_METHODS = ("qr", "qr+l1", "l1")


def _linear_parts(node: fx.Node):
    """(input node, weight node, kind) of an aten.conv2d / aten.linear call, or None."""
    conv = ir.ConvCall.of(node)
    if conv is not None:
        return conv.input, conv.weight, "conv"
    linear = ir.LinearCall.of(node)
    if linear is not None:
        return linear.input, linear.weight, "linear"
    return None


def _structural_zeros(rows: int, cols: int) -> int:
    """Zeros of an upper-trapezoidal rows x cols matrix: sum_{i<rows} min(i, cols)."""
    return sum(min(i, cols) for i in range(rows))


def weight_storage(w: torch.Tensor) -> dict:
    """Exact zeros and storage sizes of one weight (fp32 values, int32 indices)."""
    rows = w.shape[0]
    numel = w.numel()
    nnz = int(torch.count_nonzero(w))
    value_bytes = w.element_size()
    return {"shape": list(w.shape), "numel": numel, "zeros": numel - nnz, "nonzero": nnz,
            "dense_bytes": numel * value_bytes, "csr_bytes": nnz * (value_bytes + 4) + (rows + 1) * 4}


def _weights_of_linear_ops(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """get_attr target -> tensor, for every conv/linear weight in the graph."""
    found = {}
    for node in gm.graph.nodes:
        parts = _linear_parts(node)
        if parts is not None and isinstance(parts[1], fx.Node) and parts[1].op == "get_attr":
            found[node.name] = ir.get_tensor(gm, parts[1])
    return found


def _candidates(gm: fx.GraphModule, report, space) -> list[dict]:
    """Writers and readers of ``space`` that could be triangularised, with their zero counts."""
    c = space.size
    whole = [(0, c, space.id, 1)]
    out = []
    for node in gm.graph.nodes:
        if report.node_kinds.get(node.name) != "linear":
            continue
        parts = _linear_parts(node)
        if parts is None:
            continue
        x, w_node, _ = parts
        if not isinstance(w_node, fx.Node) or w_node.op != "get_attr" or not isinstance(x, fx.Node):
            continue
        conv = ir.ConvCall.of(node)
        if conv is not None and conv.groups != 1:
            continue
        writes = report.node_segments.get(node.name) == whole
        reads = report.node_segments.get(x.name) == whole
        if writes == reads:  # neither, or S -> S (one rotation cannot triangularise both sides)
            continue
        w = ir.get_tensor(gm, w_node).detach()
        out_shape = ir.shape(node) or ()
        pixels = 1
        for s in out_shape[2:]:
            pixels *= s
        if writes:
            rows, cols = c, w[0].numel()
        else:
            rows, cols = c, w.numel() // c  # A^T is C x (Cout * taps)
        out.append({"node": node.name, "role": "writer" if writes else "reader", "weight": w,
                    "zeros": _structural_zeros(rows, cols), "macs": w.numel() * pixels})
    return out


def _triangularising_element(cand: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, mask): the orthogonal element for the candidate and the boolean mask (shaped like the
    weight) of its structurally-zero entries after the rewrite."""
    w = cand["weight"].double()
    c = w.shape[0] if cand["role"] == "writer" else w.shape[1]
    if cand["role"] == "writer":
        wm = w.reshape(c, -1)  # C x K
        q, _ = torch.linalg.qr(wm, mode="complete")
        i = torch.arange(c)[:, None]
        j = torch.arange(wm.shape[1])[None, :]
        mask = (j < i).reshape(w.shape)
    else:
        a = w.movedim(1, -1).reshape(-1, c)  # rows (out channel, taps), cols C
        q, _ = torch.linalg.qr(a.T, mode="complete")
        r = torch.arange(a.shape[0])[:, None]
        i = torch.arange(c)[None, :]
        mask_a = i > r  # R^T is lower-trapezoidal: zero above the diagonal
        mask = mask_a.reshape(*w.shape[:1], *w.shape[2:], c).movedim(-1, 1)
    return q.T.contiguous(), mask


@register_pass
class Sparsify(Pass):
    name = "sparsify"
    description = "rotate O/GL channel spaces so one weight per space becomes triangular (exact zeros); L1-balance scalings"
    contract = "equivalent"
    option_defaults = {"method": "qr+l1", "l1_steps": 100, "l1_lr": 0.02}
    requires = (BN_FOLDED,)
    site_noun = "space"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from qlfx.symmetry import analyze, apply_elements
        from qlfx.symmetry.optimize import l1_of_weights, minimize_l1

        method = self.options["method"]
        if method not in _METHODS:
            from qlfx.errors import UsageError

            raise UsageError(f"sparsify: method must be one of {', '.join(_METHODS)}, got {method!r}")
        result = PassResult(changed=False)
        before = {k: weight_storage(w) for k, w in _weights_of_linear_ops(gm).items()}
        report = analyze(gm)
        l1_before = l1_of_weights(gm, report)
        triangular: dict[str, dict] = {}

        if method in ("qr", "qr+l1"):
            for ids, group in report.pinned_by_batchnorm():
                if group.value in ("O", "GL") and report.spaces[ids[0]].size >= 2:
                    first = report.spaces[ids[0]]
                    result.skipped.append(Skip(
                        f"space{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} ({first.size} ch; "
                        f"{first.sites[0]})", f"unfolded batchnorms pin it to {first.group}; folded it is "
                        f"{group}", needs=BN_FOLDED))
            elements, masks = {}, {}
            for space in report.spaces:
                if space.group.value not in ("O", "GL") or space.derived or space.size < 2:
                    continue
                cands = _candidates(gm, report, space)
                site = f"space {space.id} ({space.group}, {space.size} ch; {space.sites[0]})"
                if not cands:
                    result.skipped.append(Skip(site, "no conv/linear reads or writes the whole space"))
                    continue
                best = max(cands, key=lambda c: (c["zeros"], c["macs"]))
                if best["zeros"] == 0:
                    result.skipped.append(Skip(site, "no weight has room for zeros (one row or column)"))
                    continue
                if not ctx.allow_rewrite():
                    result.skipped.append(Skip(site, "rewrite limit reached (bisection)"))
                    continue
                p, mask = _triangularising_element(best)
                elements[space.id] = p
                masks[best["node"]] = (mask, space, best)
            if elements:
                apply_elements(gm, elements, report)
                nodes = {n.name: n for n in gm.graph.nodes}
                for node_name, (mask, space, cand) in masks.items():
                    w_node = _linear_parts(nodes[node_name])[1]
                    w = ir.get_tensor(gm, w_node)
                    residue = float(w.detach()[mask].abs().max()) if bool(mask.any()) else 0.0
                    scale = float(w.detach().abs().max()) or 1.0
                    if residue > RESIDUE_LIMIT * scale:
                        result.skipped.append(Skip(node_name, f"rotated weight has residue {residue:.2e} "
                                                              f"(max|W| {scale:.2e}) at its structural zeros; left dense"))
                        continue
                    with torch.no_grad():
                        w[mask] = 0.0
                    triangular[node_name] = {"space": space.id, "role": cand["role"], "structural_zeros": int(mask.sum()),
                                             "packed_bytes": (w.numel() - int(mask.sum())) * w.element_size()}
                    result.rewrites.append(f"{node_name}: {cand['role']} of space {space.id} ({space.group}, "
                                           f"{space.size} ch) triangularised, {int(mask.sum())} exact zeros")
                result.changed = True

        l1_history = None
        if method in ("qr+l1", "l1") and self.options["l1_steps"] > 0:
            report = analyze(gm)
            groups = ("monomial", "positive-monomial") if method == "qr+l1" else None
            l1_elements, l1_history = minimize_l1(gm, steps=int(self.options["l1_steps"]), lr=float(self.options["l1_lr"]),
                                                  report=report, groups=groups)
            if l1_elements and l1_history[-1] < l1_history[0] and ctx.allow_rewrite():
                apply_elements(gm, l1_elements, report)
                result.changed = True
                result.rewrites.append(f"L1 over {len(l1_elements)} space(s) "
                                       f"({'scalings' if groups else 'all continuous groups'}): "
                                       f"{l1_history[0]:.4g} -> {l1_history[-1]:.4g}")

        after = {k: weight_storage(w) for k, w in _weights_of_linear_ops(gm).items()}
        per_weight = {}
        for name, st in after.items():
            st = dict(st)
            st["zeros_before"] = before.get(name, {}).get("zeros", 0)
            if name in triangular:
                st.update(triangular[name])
            st["compressed_bytes"] = min(st["dense_bytes"], st["csr_bytes"], st.get("packed_bytes", st["dense_bytes"]))
            per_weight[name] = st
        zeros_before = sum(s["zeros"] for s in before.values())
        zeros_after = sum(s["zeros"] for s in after.values())
        l1_after = l1_of_weights(gm, analyze(gm)) if result.changed else l1_before
        dense = sum(s["dense_bytes"] for s in per_weight.values())
        compressed = sum(s["compressed_bytes"] for s in per_weight.values())
        result.stats.update({
            "method": method, "zeros_before": zeros_before, "zeros_after": zeros_after,
            "zeros_created": zeros_after - zeros_before, "params_droppable": zeros_after,
            "l1_before": l1_before, "l1_after": l1_after, "dense_bytes": dense, "compressed_bytes": compressed,
            "triangularised": triangular, "weights": per_weight,
            "l1_history": l1_history,
        })
        result.notes.append(
            f"{zeros_after - zeros_before} exact zeros created ({zeros_after} in all) in "
            f"{len(triangular)} triangularised weight(s); L1 of the weights touching continuous spaces "
            f"{l1_before:.4g} -> {l1_after:.4g}; weight bytes dense {dense:,} -> {compressed:,} "
            f"stored sparse/packed where smaller")
        result.notes.append("the graph keeps dense tensors (the emitters run dense kernels): the zeros save storage "
                            "in a sparse/packed format, not FLOPs or latency")
        return result
