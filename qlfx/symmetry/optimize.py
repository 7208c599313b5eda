"""Optimise over the symmetry group: find elements that make the weights small in L1.

Every element g of the graph's symmetry group (see :mod:`.spaces`) leaves the function unchanged while
rewriting each weight as ``W' = M_y W M_x^-1`` (:mod:`.action`). Among these equivalent networks we
look for one whose weights have the smallest L1 norm

    minimise  L(g) = sum_{W touching an optimised space} || W'(g) ||_1

by plain first-order descent in torch (Adam) on an unconstrained parameterisation of each space's
group, starting at the identity:

- O(n):    the Cayley map M = (I - S)^-1 (I + S), S = A - A^T (default; one LU solve), or
           M = expm(S) (``orthogonal_map="expm"``, ~5x slower here); always orthogonal, M^-1 = M^T;
- GL(n):   M = expm(A)  (always invertible, det > 0; the inverse is taken exactly, M^-1 = expm(-A));
- (positive-)monomial spaces: the continuous part is the diagonal, M = diag(exp(s)) with
           log-scales s, M^-1 = diag(exp(-s)); permutations are discrete and stay the identity;
- a product's output space has derived scalings ``D_z = D_a D_b`` (kron'd with the copy
  multiplicities), computed from its factors, never optimised on its own;
- discrete groups (permutations, signed permutations) and the identity contribute nothing.

The objective counts the weights of dense convs / linears and per-channel (depthwise) convs that
read or write an optimised space. A depthwise conv's weight transforms per channel,
``W'[o] = d_y[o] W[o] / d_x[o // k]``; a depthwise conv whose kernel is shared across channels is
unchanged by its space's elements and contributes a constant. Biases and other per-channel vectors are
rewritten by :func:`~qlfx.symmetry.action.apply_elements` but not counted (they are O(C), the weights
O(C^2)).

L1 is not smooth: descent brings entries near zero but does not make them exactly zero; exact zeros
come from triangularisation (``passes/sparsify.py``), and diagonal scalings keep those zeros. The
returned elements are exact group members (orthogonal to float64 rounding), so applying them with
``apply_elements`` keeps the outputs unchanged whatever the optimiser reached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

from qlfx import ir

from .groups import Element, Group, Monomial
from .spaces import SymmetryReport, analyze

__all__ = ["minimize_l1", "l1_of_weights", "orthogonal_from_skew", "OPTIMIZABLE_GROUPS"]

OPTIMIZABLE_GROUPS = (Group.O, Group.GL, Group.MONOMIAL, Group.POSITIVE_MONOMIAL)


def orthogonal_from_skew(a: torch.Tensor, map: str = "expm") -> torch.Tensor:
    """An orthogonal matrix from an unconstrained square ``a``: expm(S) or the Cayley map
    (I - S)^-1 (I + S), with S = a - a^T skew-symmetric."""
    s = a - a.transpose(-1, -2)
    if map == "expm":
        return torch.linalg.matrix_exp(s)
    if map == "cayley":
        eye = torch.eye(s.shape[-1], dtype=s.dtype)
        return torch.linalg.solve(eye - s, eye + s)
    raise ValueError(f"unknown orthogonal map {map!r}; use 'expm' or 'cayley'")


@dataclass
class _SiteElement:
    """A channel axis's element in differentiable form: a diagonal (vector) or a dense matrix with
    its inverse. None entries mean the identity."""

    diag: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    dense_inv: torch.Tensor | None = None

    @property
    def is_identity(self) -> bool:
        return self.diag is None and self.dense is None


@dataclass
class _Term:
    node: str
    kind: str  # "linear" or "depthwise"
    weight: torch.Tensor  # float64 copy
    groups: int
    x: str | None  # node name of the input value
    y: str


class _Parameterisation:
    """Learnable parameters of the chosen spaces and the map to per-space elements."""

    def __init__(self, report: SymmetryReport, space_ids: list[int], orthogonal_map: str):
        self.report = report
        self.map = orthogonal_map
        self.params: dict[int, torch.Tensor] = {}
        for sid in space_ids:
            space = report.spaces[sid]
            if space.group in (Group.O, Group.GL):
                self.params[sid] = torch.zeros(space.size, space.size, dtype=torch.float64, requires_grad=True)
            else:
                self.params[sid] = torch.zeros(space.size, dtype=torch.float64, requires_grad=True)

    def space_elements(self) -> dict[int, _SiteElement]:
        """Per-space differentiable elements, derived product spaces included."""
        out: dict[int, _SiteElement] = {}
        for sid, p in self.params.items():
            group = self.report.spaces[sid].group
            if group is Group.O:
                m = orthogonal_from_skew(p, self.map)
                out[sid] = _SiteElement(dense=m, dense_inv=m.transpose(0, 1))
            elif group is Group.GL:
                out[sid] = _SiteElement(dense=torch.linalg.matrix_exp(p), dense_inv=torch.linalg.matrix_exp(-p))
            else:
                out[sid] = _SiteElement(diag=torch.exp(p))
        # derived product spaces: kron(d_z, I_mz) = kron(d_a, I_ma) * kron(d_b, I_mb)
        pending = [p for p in self.report.products if self.report.spaces[p.z[0]].derived]
        for _ in range(len(pending) + 1):
            left = []
            for p in pending:
                factors = []
                for sid, mult in (p.a, p.b):
                    if self.report.spaces[sid].derived and sid not in out:
                        factors = None
                        break
                    e = out.get(sid)
                    size = self.report.spaces[sid].size
                    d = e.diag if e is not None and e.diag is not None else torch.ones(size, dtype=torch.float64)
                    factors.append(d.repeat_interleave(mult))
                if factors is None:
                    left.append(p)
                    continue
                dz = (factors[0] * factors[1])[:: p.z[1]]
                if not bool((dz == 1).all()) or dz.requires_grad:
                    out[p.z[0]] = _SiteElement(diag=dz)
            if not left:
                break
            pending = left
        return out

    def group_elements(self) -> dict[int, Element]:
        """The elements as exact group members (Monomial diagonals or float64 matrices)."""
        result: dict[int, Element] = {}
        with torch.no_grad():
            for sid, p in self.params.items():
                group = self.report.spaces[sid].group
                if group is Group.O:
                    m = orthogonal_from_skew(p.detach(), self.map)
                    # re-orthogonalise: polar factor via SVD, so Q^T Q = I to float64 rounding
                    u, _, vh = torch.linalg.svd(m)
                    result[sid] = u @ vh
                elif group is Group.GL:
                    result[sid] = torch.linalg.matrix_exp(p.detach()).clone()
                else:
                    result[sid] = Monomial.diagonal(torch.exp(p.detach()))
        return result


def _site(report: SymmetryReport, space_el: dict[int, _SiteElement], node: str | None) -> _SiteElement:
    """The element on ``node``'s channel axis: block-diagonal of kron(M_space, I_mult) over segments."""
    segs = report.node_segments.get(node) if node is not None else None
    if not segs or not any(sid in space_el for _, _, sid, _ in segs):
        return _SiteElement()
    if all(space_el.get(sid) is None or space_el[sid].diag is not None for _, _, sid, _ in segs):
        parts = []
        for start, stop, sid, mult in segs:
            e = space_el.get(sid)
            parts.append(e.diag.repeat_interleave(mult) if e is not None else torch.ones(stop - start, dtype=torch.float64))
        return _SiteElement(diag=torch.cat(parts))
    mats, invs = [], []
    for start, stop, sid, mult in segs:
        e = space_el.get(sid)
        eye_m = torch.eye(mult, dtype=torch.float64)
        if e is None:
            m = mi = torch.eye(stop - start, dtype=torch.float64)
        elif e.diag is not None:
            m, mi = torch.diag(e.diag.repeat_interleave(mult)), torch.diag(1.0 / e.diag.repeat_interleave(mult))
        else:
            m, mi = torch.kron(e.dense, eye_m), torch.kron(e.dense_inv, eye_m)
        mats.append(m)
        invs.append(mi)
    return _SiteElement(dense=torch.block_diag(*mats), dense_inv=torch.block_diag(*invs))


def _transform(term: _Term, mx: _SiteElement, my: _SiteElement) -> torch.Tensor:
    """W' = M_y W M_x^-1 in differentiable form (weights [Cout, Cin/groups, *k] or [Cout, Cin])."""
    w = term.weight
    extra = (None,) * (w.dim() - 2)
    if term.kind == "depthwise":
        k = w.shape[0] // term.groups  # outputs per group; groups = Cin, so output o reads input o // k
        if my.dense is not None or mx.dense is not None:
            raise ValueError(f"{term.node}: a depthwise conv needs diagonal elements")
        if my.diag is not None:
            w = my.diag[(slice(None),) + (None,) + extra] * w
        if mx.diag is not None:
            # output o reads input o // k (groups = Cin, one input per group)
            w = w / mx.diag.repeat_interleave(k)[(slice(None),) + (None,) + extra]
        return w
    if my.diag is not None:
        w = my.diag[(slice(None),) + (None,) + extra] * w
    elif my.dense is not None:
        w = torch.einsum("oa,a...->o...", my.dense, w)
    if mx.diag is not None:
        w = w / mx.diag[(None, slice(None)) + extra]
    elif mx.dense is not None:
        w = torch.einsum("oa...,ai->oi...", w, mx.dense_inv)
    return w


def _terms(gm: fx.GraphModule, report: SymmetryReport, space_ids: set[int]) -> list[_Term]:
    """The weights whose value depends on the elements of ``space_ids`` (or derived spaces)."""
    touched = set(space_ids)
    for p in report.products:
        if p.a[0] in touched or p.b[0] in touched:
            touched.add(p.z[0])
    terms = []
    for node in gm.graph.nodes:
        kind = report.node_kinds.get(node.name)
        if kind not in ("linear", "depthwise"):
            continue
        view = ir.ConvCall.of(node) or ir.LinearCall.of(node)
        x, w_node = view.input, view.weight
        groups = view.groups if isinstance(view, ir.ConvCall) else 1
        if not ir.is_constant(w_node):
            continue
        spaces = set(report.spaces_of(node.name)) | set(report.spaces_of(x.name) if isinstance(x, fx.Node) else ())
        if not spaces & touched:
            continue
        terms.append(_Term(node.name, kind, ir.get_tensor(gm, w_node).detach().double().clone(), groups,
                           x.name if isinstance(x, fx.Node) else None, node.name))
    return terms


def l1_of_weights(gm: fx.GraphModule, report: SymmetryReport | None = None,
                  spaces: Iterable[int] | None = None) -> float:
    """sum |W| over the conv/linear weights that touch ``spaces`` (all continuous spaces by default)."""
    report = report if report is not None else analyze(gm)
    ids = _default_spaces(report) if spaces is None else set(spaces)
    return float(sum(t.weight.abs().sum() for t in _terms(gm, report, ids)))


def _default_spaces(report: SymmetryReport) -> set[int]:
    return {s.id for s in report.spaces if s.group in OPTIMIZABLE_GROUPS and not s.derived and s.size > 0}


def minimize_l1(gm: fx.GraphModule, spaces: Iterable[int] | None = None, steps: int = 200, lr: float = 0.02,
                report: SymmetryReport | None = None, orthogonal_map: str = "cayley",
                groups: Iterable[Group | str] | None = None) -> tuple[dict[int, Element], list[float]]:
    """Descend on L(g) = sum |W'(g)|_1 over the weights touching the chosen spaces.

    ``spaces``: space ids (default: every non-derived space whose group has a continuous part,
    optionally filtered by ``groups``, e.g. ``groups=("monomial", "positive-monomial")`` for scalings
    only). Returns ``(elements, history)``: elements ``{space id: element}`` for
    :func:`~qlfx.symmetry.action.apply_elements` (``gm`` itself is not changed), and the objective at
    every step (``history[0]`` at the identity, ``history[-1]`` at the returned elements). The best
    iterate is returned, so ``history[-1] <= history[0]``.
    """
    report = report if report is not None else analyze(gm)
    if spaces is None:
        ids = _default_spaces(report)
    else:
        ids = set()
        for key in spaces:
            space = report.space(key)
            if space.derived:
                raise ValueError(f"space {space.id} is a product's output: its scalings are derived from the "
                                 f"factors'; optimise the factor spaces instead")
            if space.group not in OPTIMIZABLE_GROUPS:
                continue  # discrete group: nothing continuous to optimise
            ids.add(space.id)
    if groups is not None:
        wanted = {Group.parse(g) for g in groups}
        ids = {i for i in ids if report.spaces[i].group in wanted}
    ids_sorted = sorted(ids)
    param = _Parameterisation(report, ids_sorted, orthogonal_map)
    terms = _terms(gm, report, set(ids_sorted))
    if not ids_sorted or not terms:
        return {}, [float(sum(t.weight.abs().sum() for t in terms))]

    def objective() -> torch.Tensor:
        space_el = param.space_elements()
        total = torch.zeros((), dtype=torch.float64)
        for t in terms:
            total = total + _transform(t, _site(report, space_el, t.x), _site(report, space_el, t.y)).abs().sum()
        return total

    # The matrices here are small (C <= a few hundred): one thread is faster than OpenMP's fork/join,
    # by orders of magnitude on a busy machine (measured: 64x64 matmul 40 ms on 2 threads, 10 us on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _descend(param, objective, steps, lr)
    finally:
        torch.set_num_threads(threads)


def _descend(param: _Parameterisation, objective, steps: int, lr: float) -> tuple[dict[int, Element], list[float]]:
    optimizer = torch.optim.Adam(list(param.params.values()), lr=lr)
    history: list[float] = []
    best_value, best_state = float("inf"), None
    for step in range(steps + 1):
        value = objective()
        current = float(value.detach())
        history.append(current)
        if current < best_value:
            best_value = current
            best_state = {k: v.detach().clone() for k, v in param.params.items()}
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    with torch.no_grad():
        for k, v in param.params.items():
            v.copy_(best_state[k])
    history.append(best_value)
    return param.group_elements(), history
