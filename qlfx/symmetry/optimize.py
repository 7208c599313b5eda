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

The machinery is not tied to L1: :func:`minimize` takes any differentiable ``objective(view)`` of a
:class:`GroupView` (the weights ``view.weight(term)`` and channel vectors ``view.channels(node, x)`` under
the current elements) and an optional ``start`` element per space, so the search runs over
``M = M(p) M_start`` (a Hadamard start for the ``rotate`` pass's int8 objective, for instance).
:func:`minimize_l1` is ``minimize`` with ``sum |W'|``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

from qlfx import ir

from .groups import Element, Group, Monomial, as_element, to_dense
from .spaces import SymmetryReport, analyze

__all__ = ["minimize", "minimize_l1", "l1_of_weights", "orthogonal_from_skew", "OPTIMIZABLE_GROUPS", "GroupView",
           "Parameterisation", "weight_terms", "select_spaces"]

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
    y: str  # name of the output value (``<node>.a`` / ``<node>.b`` for a branch of a fused product)


class Parameterisation:
    """Learnable parameters of the chosen spaces and the map to per-space elements: ``M = M(p) M_start``
    (``start``: optional {space id: element of its group}; identity where not given; a start of a
    monomial space must be a positive diagonal). ``orthogonal``: GL spaces searched over their
    subgroup O(n) instead (an isometry keeps weight and activation norms, e.g. for quantisation error);
    ``diagonal``: GL spaces searched over their positive diagonals only (log-scales, like monomial ones)."""

    def __init__(self, report: SymmetryReport, space_ids: list[int], orthogonal_map: str = "cayley",
                 start: dict[int, Element] | None = None, orthogonal: Iterable[int] = (),
                 diagonal: Iterable[int] = ()):
        self.report = report
        self.map = orthogonal_map
        self.orthogonal = set(orthogonal)
        self.diagonal = set(diagonal)
        self.params: dict[int, torch.Tensor] = {}
        self.start: dict[int, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = {}
        for sid, e in (start or {}).items():
            if sid not in space_ids:
                continue
            if self._group(sid) in (Group.O, Group.GL):
                m = to_dense(as_element(e)).to(torch.float64)
                self.start[sid] = (m, m.T if self._group(sid) is Group.O else torch.linalg.inv(m))
            else:
                e = as_element(e)
                if not isinstance(e, Monomial) or not bool((e.perm == torch.arange(e.size)).all()):
                    raise ValueError(f"space {sid}: the start of a scaling space must be a diagonal")
                self.start[sid] = e.scale.clone()
        for sid in space_ids:
            space = report.spaces[sid]
            if self._group(sid) in (Group.O, Group.GL):
                self.params[sid] = torch.zeros(space.size, space.size, dtype=torch.float64, requires_grad=True)
            else:
                self.params[sid] = torch.zeros(space.size, dtype=torch.float64, requires_grad=True)

    def _group(self, sid: int) -> Group:
        group = self.report.spaces[sid].group
        if group is Group.GL and sid in self.diagonal:
            return Group.POSITIVE_MONOMIAL
        return Group.O if group is Group.GL and sid in self.orthogonal else group

    def space_elements(self) -> dict[int, _SiteElement]:
        """Per-space differentiable elements, derived product spaces included."""
        out: dict[int, _SiteElement] = {}
        for sid, p in self.params.items():
            group = self._group(sid)
            start = self.start.get(sid)
            if group is Group.O:
                m = orthogonal_from_skew(p, self.map)
                if start is not None:
                    m = m @ start[0]
                out[sid] = _SiteElement(dense=m, dense_inv=m.transpose(0, 1))
            elif group is Group.GL:
                m, mi = torch.linalg.matrix_exp(p), torch.linalg.matrix_exp(-p)
                if start is not None:
                    m, mi = m @ start[0], start[1] @ mi
                out[sid] = _SiteElement(dense=m, dense_inv=mi)
            else:
                out[sid] = _SiteElement(diag=torch.exp(p) if start is None else torch.exp(p) * start)
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
                group = self._group(sid)
                start = self.start.get(sid)
                if group is Group.O:
                    m = orthogonal_from_skew(p.detach(), self.map)
                    if start is not None:
                        m = m @ start[0]
                    # re-orthogonalise: polar factor via SVD, so Q^T Q = I to float64 rounding
                    u, _, vh = torch.linalg.svd(m)
                    result[sid] = u @ vh
                elif group is Group.GL:
                    m = torch.linalg.matrix_exp(p.detach()).clone()
                    result[sid] = m if start is None else m @ start[0]
                else:
                    d = torch.exp(p.detach())
                    result[sid] = Monomial.diagonal(d if start is None else d * start)
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
        if kind == "branch_product":  # a fused product: each branch is a conv writing a virtual value
            terms.extend(_branch_terms(gm, report, node, touched))
            continue
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


def _branch_terms(gm: fx.GraphModule, report: SymmetryReport, node: fx.Node, touched: set[int]) -> list[_Term]:
    args = ir.op_args(node)
    x = args["x"]
    out = []
    for branch in ("a", "b"):
        y = f"{node.name}.{branch}"
        kind = report.node_kinds.get(y)
        w_node = args[f"weight_{branch}"]
        if kind not in ("linear", "depthwise") or not ir.is_constant(w_node):
            continue
        spaces = set(report.spaces_of(y)) | set(report.spaces_of(x.name) if isinstance(x, fx.Node) else ())
        if not spaces & touched:
            continue
        groups = 1 if branch == "a" else int(args["groups_b"])
        out.append(_Term(y, kind, ir.get_tensor(gm, w_node).detach().double().clone(), groups,
                         x.name if isinstance(x, fx.Node) else None, y))
    return out


def weight_terms(gm: fx.GraphModule, report: SymmetryReport, space_ids: Iterable[int]) -> list[_Term]:
    """The conv / linear / depthwise weights (fused product branches included) that the elements of
    ``space_ids`` (or the product spaces derived from them) rewrite, as float64 copies."""
    return _terms(gm, report, set(space_ids))


class GroupView:
    """The graph under differentiable elements: ``weight(term)`` is ``W' = M_y W M_x^-1``,
    ``channels(node, x)`` maps channel vectors x (rows, [..., C]) of ``node``'s value to ``M x``.
    ``inputs`` (optional) gives the elements used on the input side of the weights (M_x) separately
    from ``outputs`` (M_y and channel values) -- same values, other autograd leaves -- so a caller can
    read off which part of an objective's gradient comes from each side (the ``equalize`` pass)."""

    def __init__(self, report: SymmetryReport, terms: list[_Term], outputs: dict[int, _SiteElement],
                 inputs: dict[int, _SiteElement] | None = None):
        self.report, self.terms = report, terms
        self.outputs = outputs
        self.inputs = outputs if inputs is None else inputs

    def site(self, node: str | None, side: str = "out") -> _SiteElement:
        return _site(self.report, self.outputs if side == "out" else self.inputs, node)

    def weight(self, term: _Term) -> torch.Tensor:
        return _transform(term, self.site(term.x, "in"), self.site(term.y, "out"))

    def channels(self, node: str, x: torch.Tensor) -> torch.Tensor:
        e = self.site(node, "out")
        if e.diag is not None:
            return x * e.diag
        if e.dense is not None:
            return x @ e.dense.T
        return x


def select_spaces(report: SymmetryReport, spaces: Iterable[int] | None = None,
                  groups: Iterable[Group | str] | None = None) -> list[int]:
    """Sorted ids of the non-derived spaces with a continuous group among ``spaces`` (default: all),
    restricted to ``groups`` when given. A derived product space asked for by id is an error."""
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
    return sorted(ids)


def l1_of_weights(gm: fx.GraphModule, report: SymmetryReport | None = None,
                  spaces: Iterable[int] | None = None) -> float:
    """sum |W| over the conv/linear weights that touch ``spaces`` (all continuous spaces by default)."""
    report = report if report is not None else analyze(gm)
    ids = _default_spaces(report) if spaces is None else set(spaces)
    return float(sum(t.weight.abs().sum() for t in _terms(gm, report, ids)))


def _default_spaces(report: SymmetryReport) -> set[int]:
    return {s.id for s in report.spaces if s.group in OPTIMIZABLE_GROUPS and not s.derived and s.size > 0}


def minimize(gm: fx.GraphModule, objective, spaces: Iterable[int] | None = None, steps: int = 200,
             lr: float = 0.02, report: SymmetryReport | None = None, orthogonal_map: str = "cayley",
             groups: Iterable[Group | str] | None = None, start: dict[int, Element] | None = None,
             orthogonal: Iterable[int] = (),
             diagonal: Iterable[int] = ()) -> tuple[dict[int, Element], list[float]]:
    """Descend (Adam) on ``objective(view)`` over the group elements of the chosen spaces.

    ``objective`` maps a :class:`GroupView` (``view.terms``: the weights touching the chosen spaces)
    to a scalar tensor. ``spaces`` / ``groups``: as :func:`select_spaces`. ``start``: elements to start
    from ({space id: element}; the search is over ``M(p) M_start``); ``orthogonal``: GL spaces to
    search over O(n) only; ``diagonal``: GL spaces to search over their positive diagonals. Returns
    ``(elements, history)`` like :func:`minimize_l1` (``gm`` itself is not changed; the best iterate is returned)."""
    report = report if report is not None else analyze(gm)
    ids_sorted = select_spaces(report, spaces, groups)
    param = Parameterisation(report, ids_sorted, orthogonal_map, start, orthogonal, diagonal)
    terms = _terms(gm, report, set(ids_sorted))
    if not ids_sorted or not terms:
        with torch.no_grad():
            value = objective(GroupView(report, terms, param.space_elements()))
        return {}, [float(value)]

    def value() -> torch.Tensor:
        return objective(GroupView(report, terms, param.space_elements()))

    # The matrices here are small (C <= a few hundred): one thread is faster than OpenMP's fork/join,
    # by orders of magnitude on a busy machine (measured: 64x64 matmul 40 ms on 2 threads, 10 us on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _descend(param, value, steps, lr)
    finally:
        torch.set_num_threads(threads)


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
    def l1(view: GroupView) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for t in view.terms:
            total = total + view.weight(t).abs().sum()
        return total

    return minimize(gm, l1, spaces, steps, lr, report, orthogonal_map, groups)


def _descend(param: Parameterisation, objective, steps: int, lr: float) -> tuple[dict[int, Element], list[float]]:
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
