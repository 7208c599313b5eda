"""Channel spaces of a qlfx graph and the group each one carries (DESIGN.md §3).

Give the channel axis (dim 1) of every tensor value a basis. A transformation assigns an invertible
matrix to every *channel space* -- a set of channel axes that must change basis together -- and
rewrites the weights so that every output is unchanged. What each ATen op demands (x: input, y: output):

- linear op ``y = W x + c`` (``aten.conv2d`` with groups=1, any kernel; ``aten.linear`` on (N, C)):
  nothing. It *decouples* its input and output spaces (rewrite ``W' = P_y W P_x^-1``, ``c' = P_y c``).
- ops commuting with every linear map of the channels (add/sub of two values, multiplying or dividing
  by a scalar or by anything constant along the channels, ``neg``, avg-pool, adaptive-avg-pool,
  upsampling, sum/mean over spatial or batch dims, slices and selects along spatial/batch dims,
  reshapes that keep dims 0 and 1, ``where`` with a channel-uniform condition, a depthwise conv whose
  kernel is shared by all input channels): input(s) and output are ONE space. A shared depthwise conv
  C -> kC maps the space to ``space (x) R^k`` (output channel c*k + r), acting as ``P (x) I_k``, as does
  ``repeat_interleave(x, k, 1)``; flattening an (N, C, H, W) tensor to (N, C*H*W) gives
  ``space (x) R^(HW)``. Such a channel axis is a *copy* of the space with multiplicity k.
- ReLU, leaky ReLU, ``clamp(min=0)``, abs, max-pool, max over pixels: same space, positive monomial.
  Symmetric clips (hardtanh, ``clamp(-a, a)``) and odd functions (tanh, erf, sign, ...): signed
  permutation. Every other elementwise op (sigmoid, GELU, ReLU6, adding a scalar or a channel-uniform
  value, ...): permutation. ``qlfx::hardball`` / ``qlfx::softball``: O(C).
- per-channel ops with their own per-channel weights (depthwise conv with per-channel kernels, an
  unfolded eval-mode batchnorm, multiplying by a per-channel constant): input and output are
  *different* spaces whose permutations are tied (``perm_y = perm_x (x) I_k``) and whose diagonal
  scalings are independent (the per-channel weights absorb the ratio). Both become monomial. (So on an
  UNFOLDED graph a BN feeding a residual add pins that stream to signed permutations; analyse the
  BN-folded graph -- fold-bn,constant-fold,dce -- to see the O(C) streams.)
- elementwise product ``z = a * b`` of two computed values: a, b, z monomial with the SAME permutation,
  ``D_z = D_a D_b``. Modelled as: the three spaces' permutations are tied (as above) and z's scaling is
  *derived* from a's and b's, so z contributes no freedom of its own. When that cannot be set up
  simply (z's space is also a factor's space, or it is the output of two products, or z's axis holds
  several copies of its space) all three spaces are restricted to permutations (D = 1 everywhere is
  then consistent). When z's space allows fewer scalings than "any nonzero" (e.g. z feeds a ReLU), a's
  and b's scalings are restricted to the same kind, so the product stays in z's group.
- channel slices (``aten.slice`` on dim 1) and ``aten.cat`` along channels: the sliced / concatenated
  axis is split into segments at the slice boundaries and every segment is its own space: the group of
  the whole axis is block-diagonal, conformal with the pieces (exact, not a restriction). Cut points are
  propagated through every "same space" link until they agree.
- **invariants** (how radial activations are recognised, however they are written): a reduction over
  the channel axis gives a value that does not change under a group G of the reduced value's space,
  and demands G there: ``sum``/``mean`` of ``x*x`` / ``x**2`` / ``square(x)`` and the 2-norm
  (``linalg_vector_norm``, ``linalg_norm``; ``x.norm(dim=1)``), ``einsum("nchw,nchw->nhw", x, x)`` -> O;
  other p-norms -> signed permutation;
  sum, mean, max, min of x itself -> permutation. Anything computed only from invariants and constants
  (sqrt, +eps, clamp, division, comparisons, where, expand, ...) is invariant. A value times or divided
  by an invariant that is constant along the channels (``x * g(|x|)``, ``x / |x|``,
  ``F.normalize(x, dim=1)``), or ``where(invariant condition, a, b)``, stays in its space. So
  ``torch.where(|x| > r, r * x / |x|, x)`` and ``x / sqrt(1 + |x|^2 / r^2)`` put x's space in O(C),
  while ``x / |x[:, :k]|`` (a norm of part of the channels), a per-channel weighted sum of squares, a
  norm over pixels or a max over channels do not give O(C).
- network inputs and outputs, and every op not listed (including 1 < groups < C convs): identity on every
  space they touch (safe); so is a constant or an invariant used as a channel value (e.g. concatenated).

The analysis is a union-find over channel *segments* with "same space (x) R^k" links, a second
union-find over spaces for tied permutations, and a meet over the lattice of :mod:`.groups` of all
demands, iterated with the product rules to a fixed point.

Continuous dimension = the sum over spaces of the Lie algebra dimension of their group (GL: n^2,
O: n(n-1)/2, (positive) monomial: n scalings, discrete: 0), where a product's output space (whose
scalings are derived) counts 0.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from qlfx import ir
from qlfx import ops as _ops  # noqa: F401  (registers qlfx's custom ops, matched below)

from .groups import (Element, Group, Monomial, as_element, identity_element, is_member,
                     kron_identity, lie_dimension, meet, random_element, random_permutation, random_scaling)

__all__ = ["Segment", "ChannelSpace", "ProductConstraint", "SymmetryReport", "analyze", "format_report"]

aten = torch.ops.aten


# --------------------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Segment:
    """Channels ``[start, stop)`` of the value of node ``node`` hold ``mult`` copies of a space:
    channel ``start + c*mult + r`` is the space's channel c (so the space acts there as kron(P, I_mult))."""

    node: str
    start: int
    stop: int
    mult: int = 1


@dataclass
class ChannelSpace:
    id: int
    size: int
    group: Group
    sites: list[str]  # human-readable locations
    segments: list[Segment] = field(default_factory=list)
    demands: list[str] = field(default_factory=list)  # "positive-monomial: relu act1", ...
    derived: bool = False  # scalings fixed by a product D_z = D_a D_b
    tie: int | None = None  # id of the tied-permutation class (None: untied)
    tie_mult: int = 1  # this space's permutation = kron(class permutation, I_tie_mult)
    # When only unfolded batchnorms tie this space (nothing else per-channel, no product): the group its
    # other demands allow, i.e. what folding the BNs would give back (O for a hardball stream). Else None.
    untied_by_bn_folding: Group | None = None

    @property
    def lie_dimension(self) -> int:
        return 0 if self.derived else lie_dimension(self.group, self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "group": self.group.value, "sites": list(self.sites),
                "demands": list(self.demands), "derived": self.derived, "tie": self.tie,
                "lie_dimension": self.lie_dimension,
                "segments": [[s.node, s.start, s.stop, s.mult] for s in self.segments]}


@dataclass(frozen=True)
class ProductConstraint:
    """At node ``node`` (z = a * b), on channels [start, stop) of z: spaces (id, mult) of a, b, z."""

    node: str
    start: int
    stop: int
    a: tuple[int, int]
    b: tuple[int, int]
    z: tuple[int, int]


@dataclass
class SymmetryReport:
    spaces: list[ChannelSpace]
    products: list[ProductConstraint]
    ties: dict[int, list[tuple[int, int]]]  # class id -> [(space id, mult)]
    node_segments: dict[str, list[tuple[int, int, int, int]]]  # node -> [(start, stop, space id, mult)]
    node_kinds: dict[str, str]  # node -> how the analysis treated it ("linear", "shared-depthwise", ...)
    notes: list[str] = field(default_factory=list)

    @property
    def continuous_dimension(self) -> int:
        return sum(s.lie_dimension for s in self.spaces)

    def space(self, key) -> ChannelSpace:
        """A space by id, by ChannelSpace, or by node name (the space of that value's channel axis,
        when it is a single segment)."""
        if isinstance(key, ChannelSpace):
            return self.spaces[key.id]
        if isinstance(key, int):
            return self.spaces[key]
        if isinstance(key, str):
            segs = self.node_segments.get(key)
            if segs and len(segs) == 1:
                return self.spaces[segs[0][2]]
            raise KeyError(f"node {key!r} has {'no channel axis' if not segs else f'{len(segs)} segments'}; "
                           f"give a space id")
        raise TypeError(f"a space is an int id, a ChannelSpace or a node name, not {type(key).__name__}")

    def spaces_of(self, node: str) -> list[int]:
        return [seg[2] for seg in self.node_segments.get(node, [])]

    def pinned_by_batchnorm(self) -> list[tuple[list[int], Group]]:
        """Spaces an unfolded batchnorm restricts: [(space ids that folding merges into one, the group
        they would have then)], for groups folding would enlarge. A BN ties its input and output into
        monomial spaces; folding it into the conv before it makes the two one space whose group is the
        meet of what their other ops demand (O on a hardball stream)."""
        found = []
        for members in self.ties.values():
            ids = [sid for sid, _ in members]
            would_be = [self.spaces[sid].untied_by_bn_folding for sid in ids]
            if any(g is None for g in would_be):
                continue  # another per-channel op or a product ties them too: folding would not help
            group = meet(*would_be)
            if group is not meet(*(self.spaces[sid].group for sid in ids)):
                found.append((ids, group))
        return found

    def group_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for s in self.spaces:
            counts[s.group.value] += 1
        return dict(counts)

    def __str__(self) -> str:
        return format_report(self)

    def to_dict(self) -> dict[str, Any]:
        return {"continuous_dimension": self.continuous_dimension, "group_counts": self.group_counts(),
                "spaces": [s.to_dict() for s in self.spaces],
                "products": [{"node": p.node, "range": [p.start, p.stop], "a": list(p.a), "b": list(p.b),
                              "z": list(p.z)} for p in self.products],
                "ties": {str(k): [list(m) for m in v] for k, v in self.ties.items()},
                "notes": list(self.notes)}

    # ---- joint elements ------------------------------------------------------------------------
    def tie_closure(self, ids: Iterable[int]) -> set[int]:
        """``ids`` plus every space tied to one of them (tied spaces must change together)."""
        out = set()
        for i in ids:
            out.add(i)
            t = self.spaces[i].tie
            if t is not None:
                out.update(sid for sid, _ in self.ties[t])
        return out

    def random_elements(self, generator: torch.Generator | None = None, spaces: Iterable[int] | None = None,
                        sigma: float = 0.3) -> dict[int, Element]:
        """A random element of the whole symmetry group, on ``spaces`` (all by default; extended to
        whole tie classes) and the identity elsewhere: tied classes share one random permutation,
        each space gets a random diagonal of the kind its group allows, derived spaces get D_a D_b."""
        chosen = self.tie_closure(range(len(self.spaces)) if spaces is None else spaces)
        elements: dict[int, Element] = {}
        for t, members in sorted(self.ties.items()):
            if not any(sid in chosen for sid, _ in members):
                continue
            base = min(self.spaces[sid].size // m for sid, m in members)
            allowed = all(self.spaces[sid].group is not Group.IDENTITY for sid, _ in members)
            perm = random_permutation(base, generator) if allowed else torch.arange(base)
            for sid, m in members:
                space = self.spaces[sid]
                if space.derived:
                    continue
                p = kron_identity(Monomial(perm, torch.ones(base, dtype=torch.float64)), m).perm
                elements[sid] = Monomial(p, random_scaling(space.size, space.group.scalings, generator, sigma))
        for space in self.spaces:
            if space.id in chosen and space.tie is None:
                elements[space.id] = random_element(space, generator, sigma=sigma)
        return self.complete_elements(elements, check=True)

    def complete_elements(self, elements: dict, check: bool = True) -> dict[int, Element]:
        """Every space's element: the given ones (keys: id / ChannelSpace / node name; values: a
        Monomial, a diagonal or a matrix), D_a D_b for derived product spaces not given, the identity
        elsewhere. With ``check``: every element must lie in its space's group and the ties/products
        must hold (raises ValueError saying which)."""
        full: dict[int, Element] = {}
        for key, value in elements.items():
            space = self.space(key)
            full[space.id] = as_element(value, space.size)
        if check:
            for sid, e in full.items():
                space = self.spaces[sid]
                if not is_member(e, space.group):
                    raise ValueError(
                        f"the element given for space {sid} ({space.sites[0]}, size {space.size}) is not in its "
                        f"group {space.group}: it would change the outputs. Use qlfx.symmetry.random_element(space) "
                        f"or an element of that group (or check=False to apply it anyway)")
        pending = [p for p in self.products if self.spaces[p.z[0]].derived and p.z[0] not in full]
        for _ in range(len(pending) + 1):
            if not pending:
                break
            left = []
            for p in pending:
                ea = full.get(p.a[0], identity_element(self.spaces[p.a[0]].size))
                eb = full.get(p.b[0], identity_element(self.spaces[p.b[0]].size))
                ready = all(self.spaces[s].derived is False or s in full for s in (p.a[0], p.b[0]))
                if not ready:
                    left.append(p)
                    continue
                ea, eb = kron_identity(as_element(ea), p.a[1]), kron_identity(as_element(eb), p.b[1])
                if not (isinstance(ea, Monomial) and isinstance(eb, Monomial)):
                    raise ValueError(f"product {p.node}: the factors' elements must be monomial (permutation x diagonal)")
                if not bool((ea.perm == eb.perm).all()):
                    raise ValueError(f"product {p.node}: the two factors must be permuted alike "
                                     f"(spaces {p.a[0]} and {p.b[0]} are tied)")
                full[p.z[0]] = Monomial(ea.perm.clone(), ea.scale * eb.scale)
            pending = left
        if pending:
            raise ValueError(f"could not derive the product spaces {[p.z[0] for p in pending]} (a cycle of products)")
        for space in self.spaces:
            full.setdefault(space.id, identity_element(space.size))
        if check:
            self._check_ties(full)
        return full

    def _check_ties(self, full: dict[int, Element]) -> None:
        for t, members in self.ties.items():
            perms = []
            for sid, m in members:
                e = full[sid]
                if not isinstance(e, Monomial):
                    e = as_element(e)
                if not isinstance(e, Monomial):
                    raise ValueError(f"space {sid} is tied to others by a per-channel op or a product and needs a "
                                     f"monomial element (permutation x diagonal), got a dense matrix")
                perms.append((sid, m, e.perm))
            base = min(self.spaces[sid].size // m for sid, m, _ in perms)
            ref = None
            for sid, m, p in perms:
                # the class permutation this member implies: p = kron(pi, I_m) -> pi = p[::m] // m
                pi = p[::m] // m
                ok = bool((kron_identity(Monomial(pi, torch.ones(base, dtype=torch.float64)), m).perm == p).all())
                if not ok or (ref is not None and not bool((pi == ref).all())):
                    raise ValueError(
                        f"tied spaces {[s for s, _, _ in perms]} must share one permutation (spaces joined by a "
                        f"per-channel op or a product); space {sid} breaks it")
                ref = pi
        for p in self.products:
            ea = kron_identity(as_element(full[p.a[0]]), p.a[1])
            eb = kron_identity(as_element(full[p.b[0]]), p.b[1])
            ez = kron_identity(as_element(full[p.z[0]]), p.z[1])
            if not all(isinstance(e, Monomial) for e in (ea, eb, ez)) or \
                    not torch.allclose(ez.scale, ea.scale * eb.scale, rtol=1e-9, atol=0):
                raise ValueError(f"product {p.node}: the elements violate D_z = D_a D_b (spaces a={p.a[0]}, "
                                 f"b={p.b[0]}, z={p.z[0]}); give only a and b and let z be derived")


# ----------------------------------------------------------------------------------- union-finds
class _WeightedUnionFind:
    """x ~ parent (x) R^w: each element is a copy-multiple of its root (see Segment.mult)."""

    def __init__(self):
        self.parent: dict[Any, Any] = {}
        self.weight: dict[Any, int] = {}

    def add(self, x) -> None:
        if x not in self.parent:
            self.parent[x], self.weight[x] = x, 1

    def find(self, x) -> tuple[Any, int]:
        path = []
        while self.parent[x] != x:
            path.append(x)
            x = self.parent[x]
        root = x
        # compress from the top: each node's weight becomes its product of weights to the root
        for node in reversed(path):
            p = self.parent[node]
            if p != root:
                self.weight[node] *= self.weight[p]
                self.parent[node] = root
        return root, (self.weight[path[0]] if path else 1)

    def union(self, x, px: int, y, py: int) -> bool:
        """Record x (x) R^px ~ y (x) R^py. False (nothing merged) when inconsistent."""
        rx, mx = self.find(x)
        ry, my = self.find(y)
        a, b = mx * px, my * py
        if rx == ry:
            return a == b
        if a % b == 0:
            self.parent[ry], self.weight[ry] = rx, a // b
        elif b % a == 0:
            self.parent[rx], self.weight[rx] = ry, b // a
        else:
            return False
        return True


# -------------------------------------------------------------------------------------- recording
RADIAL_OPS = (torch.ops.qlfx.hardball.default, torch.ops.qlfx.softball.default)
_POSITIVE = (aten.relu, aten.leaky_relu, aten.abs, aten.max_pool1d, aten.max_pool2d, aten.max_pool3d)
_ODD = (aten.tanh, aten.sin, aten.sinh, aten.atan, aten.asinh, aten.erf, aten.sign, aten.hardshrink,
        aten.softshrink)
_CLIPS = (aten.hardtanh, aten.clamp, aten.clamp_min, aten.clamp_max)
_UNTAGGED_ELEMENTWISE = (aten.hardswish,)  # elementwise ops without ATen's pointwise tag
_MAX_POOLS_WITH_INDICES = (aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.adaptive_max_pool3d,
                           aten.max_pool2d_with_indices, aten.max_pool3d_with_indices)
_CHANNELWISE_LINEAR = (aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
                       aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
                       aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
                       aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_bicubic2d,
                       aten.upsample_trilinear3d, aten.neg)
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.flatten)
_SUMS = (aten.sum, aten.mean)
_EXTREMES = (aten.amax, aten.amin)
_NORMS = (aten.linalg_vector_norm, aten.linalg_norm, aten.norm)
_CONSTANT_FACTORIES = (aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like)
_COPIES = (aten.clone, aten.alias, aten.detach, aten.contiguous)  # the same values (maybe a new layout)


def _channels(node) -> int | None:
    return ir.channels(node) if isinstance(node, fx.Node) else None


def _is_size(node: fx.Node) -> bool:
    """A node carrying a (symbolic) number, e.g. ``aten.sym_size``: a shape, not data."""
    return isinstance(ir.val(node), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _same_dim(a, b) -> bool:
    return a is b or str(a) == str(b)  # sizes may be SymInts: compare without adding guards


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = ir.shape(a), ir.shape(b)
    return len(sa) == len(sb) and all(_same_dim(x, y) for x, y in zip(sa, sb))


def _is_pointwise(node: fx.Node) -> bool:
    return torch.Tag.pointwise in getattr(node.target, "tags", ()) or ir.is_op(node, *_UNTAGGED_ELEMENTWISE)


def _reduced_dims(node: fx.Node, x: fx.Node) -> set[int]:
    """The dims a reduction node reduces (an empty or missing dim list reduces all of them)."""
    rank = len(ir.shape(x))
    dim = ir.op_args(node).get("dim")
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return set(range(rank))
    return {int(d) % rank for d in (dim if isinstance(dim, (list, tuple)) else [dim])}


def _norm_group(node: fx.Node) -> Group | None:
    """The group a norm over the channel axis is invariant under: O for the 2-norm (Euclidean or
    Frobenius), signed permutations for any other p-norm; None for matrix norms of other kinds."""
    a = ir.op_args(node)
    if ir.is_op(node, aten.linalg_norm):
        return Group.O if a.get("ord") in (None, "fro") else None
    p = a.get("ord", a.get("p"))
    p = 2 if p is None else p
    if not isinstance(p, numbers.Number):
        return None
    return Group.O if p == 2 else Group.SIGNED_PERMUTATION


def _clip_group(node: fx.Node) -> Group | None:
    """hardtanh / clamp: clipping at 0 on one side only (ReLU, min(x, 0)) is positive-homogeneous,
    a symmetric clip is odd, any other clip commutes with permutations; None for tensor bounds."""
    a = ir.op_args(node)
    if ir.is_op(node, aten.hardtanh):
        lo, hi = a["min_val"], a["max_val"]
    else:
        lo, hi = a.get("min"), a.get("max")
    if not all(v is None or isinstance(v, numbers.Number) for v in (lo, hi)):
        return None
    if (lo == 0 and hi is None) or (lo is None and hi == 0):
        return Group.POSITIVE_MONOMIAL
    if lo is not None and hi is not None and lo == -hi:
        return Group.SIGNED_PERMUTATION
    return Group.PERMUTATION


def _location(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"network input ({node.name})"
    path = ir.module_path(node)
    return f"{path} output ({node.name})" if path else f"output of {node.name}"


def _flatten(args):
    if isinstance(args, (list, tuple)):
        for a in args:
            yield from _flatten(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _flatten(a)
    else:
        yield args


def _shared_kernel(gm, weight, cin: int, cout: int, groups: int) -> bool:
    """Whether a depthwise conv's kernel is the same for every input channel (it then acts as
    P (x) I_k for any P): ``aten.repeat`` of a stored (k, 1, kh, kw) kernel over the input channels, or a
    stored weight whose (cin, k, ...) view is constant along the input-channel axis."""
    if groups != cin or cin == 0 or cout % cin:
        return False
    k = cout // cin
    if ir.is_op(weight, aten.repeat):
        a = ir.op_args(weight)
        base, reps = a["self"], tuple(a["repeats"])
        s = ir.shape(base)
        return (ir.is_constant(base) and s is not None and s[0] == k and reps[:1] == (cin,)
                and all(r == 1 for r in reps[1:]))
    if ir.is_constant(weight) and cin > 1:  # one input channel: nothing to share; treated as per-channel
        v = ir.get_tensor(gm, weight).reshape(cin, k, -1)
        return bool((v == v[:1]).all())
    return False


class _Recorder:
    """Walks the graph once, recording per node: sites (channel axes), "same space" links, tied
    permutations, products, group demands; and which values are constants (weights), invariants
    (unchanged by every allowed basis change, see the module docstring) or squares ``x*x``."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.size: dict[str, int] = {}
        self.cuts: dict[str, set[int]] = {}
        self.same: list[tuple[str, int, int, str, int, int, int]] = []  # x, xs, xe, y, ys, ye, mult (y ~ x (x) R^mult)
        self.ties: list[tuple[str, int, int, str, int, int, int]] = []
        self.batchnorm_ties: set[int] = set()  # indices into ties made by an unfolded batchnorm
        self.products: list[tuple[str, str, str]] = []  # a, b, z (node names)
        self.demands: list[tuple[str, int, int, Group, str]] = []
        self.kinds: dict[str, str] = {}
        self.notes: list[str] = []
        self.order: dict[str, int] = {}
        self.constant: set[str] = set()  # computed from stored tensors (and sizes) only
        self.invariant: set[str] = set()
        self.squares: dict[str, fx.Node] = {}  # q -> x for q = x*x, x**2, square(x)
        self.square_only: set[str] = set()  # squares read by channel sums only: no channel value of their own

    # -- what a value is
    def is_tensor(self, a) -> bool:
        return isinstance(a, fx.Node) and isinstance(ir.val(a), torch.Tensor)

    def is_value(self, a) -> bool:
        """A computed tensor whose channel axis changes basis (not a constant, invariant or bare square)."""
        return self.is_tensor(a) and not self.is_fixed(a) and a.name not in self.square_only

    def is_fixed(self, a: fx.Node) -> bool:
        """A constant or an invariant: unchanged by every basis change the analysis allows."""
        return a.name in self.constant or a.name in self.invariant

    def deps(self, node: fx.Node) -> list[fx.Node]:
        """The node's inputs that carry data (not sizes), each once."""
        return [a for a in node.all_input_nodes if not _is_size(a)]

    def uniform(self, a, out: fx.Node) -> bool:
        """``a`` (a number, constant or invariant) is constant along ``out``'s channel axis, so that
        ``x * a``, ``x / a``, ``where(a, ...)`` treat every channel alike."""
        return self._uniform(a, len(ir.shape(out)) - 2)

    def _uniform(self, a, k: int) -> bool:  # k: the channel axis counted from the right (broadcasting)
        if not self.is_tensor(a):
            return True
        if not self.is_fixed(a):
            return False
        s = ir.shape(a)
        if len(s) <= k or s[len(s) - 1 - k] == 1:
            return True
        if ir.is_op(a, aten.expand):
            return self._uniform(a.args[0], k)
        return _is_pointwise(a) and all(self._uniform(i, k) for i in self.deps(a))

    # -- recording helpers
    def site(self, node) -> bool:
        c = _channels(node)
        if c is None:
            return False
        if node.name not in self.size:
            self.size[node.name] = c
            self.cuts[node.name] = {0, c}
            if not self.is_value(node):  # a constant or an invariant read as channels cannot change basis
                what = "constant" if node.name in self.constant else "invariant"
                self.demands.append((node.name, 0, c, Group.IDENTITY, f"{what} {node.name} used as channels"))
        return True

    def demand(self, node, group: Group, reason: str, start=None, stop=None) -> None:
        if self.site(node):
            self.demands.append((node.name, 0 if start is None else start,
                                 self.size[node.name] if stop is None else stop, group, reason))

    def link_same(self, x, y, mult: int = 1) -> None:
        if self.site(x) and self.site(y):
            if self.size[y.name] != self.size[x.name] * mult:
                self.unknown_sites([x, y], f"channel count mismatch {x.name}->{y.name}")
                return
            self.same.append((x.name, 0, self.size[x.name], y.name, 0, self.size[y.name], mult))

    def link_tie(self, x, y, mult: int = 1) -> None:
        if self.site(x) and self.site(y):
            if self.size[y.name] != self.size[x.name] * mult:
                self.unknown_sites([x, y], f"channel count mismatch {x.name}->{y.name}")
                return
            self.ties.append((x.name, 0, self.size[x.name], y.name, 0, self.size[y.name], mult))

    def unknown_sites(self, nodes, why: str) -> None:
        touched = [n for n in nodes if self.site(n)]
        for n in touched:
            self.demand(n, Group.IDENTITY, why)
        if touched:
            self.notes.append(f"identity on {', '.join(n.name for n in touched)}: {why}")

    def unknown(self, node: fx.Node, why: str | None = None) -> None:
        # constants and invariants among the inputs are unchanged by any basis change already
        values = [a for a in self.deps(node) if self.is_value(a)] + [node]
        self.unknown_sites(values, why or f"{ir.op_name(node)} ({node.name}) is not understood by the analysis")

    def const(self, arg) -> torch.Tensor | None:
        """The stored tensor a get_attr argument reads (what a rewrite can replace), else None."""
        if ir.is_constant(arg):
            t = ir.get_tensor(self.gm, arg)
            return t if isinstance(t, torch.Tensor) else None
        return None

    def same_layout(self, v, node) -> bool:
        """v has node's rank and channel count (it may broadcast over other dims)."""
        return len(ir.shape(v)) == len(ir.shape(node)) and _channels(v) == _channels(node)

    # -- per node
    def visit(self, node: fx.Node) -> None:
        self.order[node.name] = len(self.order)
        if node.op == "get_attr":
            self.constant.add(node.name)
            return
        if node.op == "placeholder":
            self.demand(node, Group.IDENTITY, f"network input {node.name}")
            return
        if node.op == "output":
            for a in _flatten(node.args):
                if isinstance(a, fx.Node):
                    self.demand(a, Group.IDENTITY, "network output")
            return
        if node.op != "call_function":
            self.unknown(node)
            return
        deps = self.deps(node)
        if not deps or ir.is_op(node, *_CONSTANT_FACTORIES) or all(a.name in self.constant for a in deps):
            self.constant.add(node.name)  # e.g. a repeated shared kernel: a weight, not an activation
            return
        if all(self.is_fixed(a) for a in deps):
            self.invariant.add(node.name)  # any function of invariants and constants
            return
        if _is_size(node) or self.square(node):
            return  # a size read from a shape; a square read by channel sums only
        if not self.is_tensor(node):  # a multi-output op: its pieces are read by getitem
            if not (ir.is_op(node, *_MAX_POOLS_WITH_INDICES) and all(u.args[1] == 0 for u in node.users)):
                self.unknown(node)
            return
        self.dispatch(node)

    def dispatch(self, node: fx.Node) -> None:
        if ir.is_op(node, *RADIAL_OPS):
            self.activation(node, Group.O, kind="radial")
        elif ir.is_op(node, torch.ops.qlfx.branch_product):
            self.branch_product(node)
        elif ir.ConvCall.of(node) is not None:
            self.conv(node)
        elif ir.LinearCall.of(node) is not None:
            self.linear(node)
        elif ir.BatchNormCall.of(node) is not None:
            self.batch_norm(node)
        elif ir.is_op(node, *_POSITIVE):
            self.activation(node, Group.POSITIVE_MONOMIAL)
        elif ir.is_op(node, *_ODD):
            self.activation(node, Group.SIGNED_PERMUTATION)
        elif ir.is_op(node, *_CLIPS) and _clip_group(node) is not None:
            self.activation(node, _clip_group(node))
        elif ir.is_op(node, *_CHANNELWISE_LINEAR):
            self.channelwise_linear(node)
        elif ir.is_op(node, *_SUMS, *_EXTREMES, *_NORMS):
            self.reduction(node)
        elif ir.is_op(node, aten.einsum):
            self.einsum(node)
        elif ir.is_op(node, aten.mul):
            self.mul(node)
        elif ir.is_op(node, aten.div.Tensor, aten.div.Scalar):
            self.div(node)
        elif ir.is_op(node, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub):
            self.add(node)
        elif ir.is_op(node, aten.where):
            self.where(node)
        elif ir.is_op(node, aten.slice.Tensor):
            self.slice(node)
        elif ir.is_op(node, aten.cat):
            self.cat(node)
        elif ir.is_op(node, *_RESHAPES):
            self.reshape(node)
        elif ir.is_op(node, aten.permute, aten.transpose, aten.select.int, aten.repeat_interleave.self_int,
                      aten._to_copy, *_COPIES):
            self.keeps_channels(node)
        elif node.target is operator.getitem:
            self.getitem(node)
        elif _is_pointwise(node):
            self.activation(node, Group.PERMUTATION)
        else:
            self.unknown(node)

    def square(self, node: fx.Node) -> bool:
        """Remember q = x*x (``x**2``, ``square(x)``) of a value x, so that a channel sum of q is known
        to be |x|^2. True when q is read by such sums only: it then has no channel value of its own (as a
        value, x*x would tie x to a product and pin it to monomials)."""
        a = node.args
        is_square = ((ir.is_op(node, aten.mul.Tensor) and len(a) == 2 and a[0] is a[1])
                     or (ir.is_op(node, aten.pow.Tensor_Scalar) and a[1] == 2) or ir.is_op(node, aten.square))
        if not is_square or not self.is_value(a[0]):
            return False
        self.squares[node.name] = a[0]
        if all(ir.is_op(u, *_SUMS) and u.args[0] is node and 1 in _reduced_dims(u, node) for u in node.users):
            self.square_only.add(node.name)
            self.kinds[node.name] = "square"
            return True
        return False

    def activation(self, node, group: Group, kind: str = "activation") -> None:
        """An elementwise function of one value that commutes with ``group``: same space, demand group."""
        x = node.args[0]
        if not self.is_value(x) or self.deps(node) != [x] or _channels(x) != _channels(node):
            self.elementwise(node)
            return
        self.link_same(x, node)
        self.demand(node, group, f"{ir.op_name(node)} {node.name}")
        self.kinds[node.name] = kind

    def elementwise(self, node) -> None:
        """Any elementwise op of values (and of numbers, constants or invariants that are the same for
        every channel) commutes with permuting the channels of all its values alike."""
        values = []
        for a in self.deps(node):
            if self.is_value(a):
                if not self.same_layout(a, node):
                    self.unknown(node, f"{ir.op_name(node)} {node.name} broadcasts over channels")
                    return
                values.append(a)
            elif not self.uniform(a, node):
                self.unknown(node, f"{ir.op_name(node)} {node.name}: {a.name} differs between channels")
                return
        for v in values:
            self.link_same(v, node)
        self.demand(node, Group.PERMUTATION, f"elementwise {ir.op_name(node)} {node.name}")
        self.kinds.setdefault(node.name, "elementwise")

    def channelwise_linear(self, node) -> None:
        x = node.args[0]
        if self.deps(node) == [x] and _channels(x) == _channels(node):
            self.link_same(x, node)
        else:
            self.unknown(node)

    def keeps_channels(self, node) -> None:
        """copies / permute / transpose / select / repeat_interleave / dtype casts: dims 0 and 1 kept
        (same space), or ``repeat_interleave(x, k, 1)`` (k copies of each channel: space (x) R^k)."""
        a, x = ir.op_args(node), node.args[0]
        rank = len(ir.shape(x))
        if ir.is_op(node, *_COPIES):
            kept = True
        elif ir.is_op(node, aten.permute):
            kept = [int(d) % rank for d in a["dims"]][:2] == [0, 1]
        elif ir.is_op(node, aten.transpose):
            kept = min(int(a["dim0"]) % rank, int(a["dim1"]) % rank) >= 2
        elif ir.is_op(node, aten.select.int):
            kept = int(a["dim"]) % rank >= 2
        elif ir.is_op(node, aten._to_copy):
            kept = ir.dtype(x).is_floating_point and ir.dtype(node).is_floating_point
        else:  # repeat_interleave
            dim = a["dim"]
            if dim is not None and int(dim) % rank == 1 and isinstance(a["repeats"], int):
                self.link_same(x, node, a["repeats"])
                return
            kept = dim is not None and int(dim) % rank != 1 and _channels(x) == _channels(node)
        if kept and self.deps(node) == [x]:
            self.link_same(x, node)
        else:
            self.unknown(node)

    def conv(self, node) -> None:
        conv = ir.ConvCall.of(node)
        x = conv.input
        cin, cout = _channels(x), _channels(node)
        if not self.is_value(x) or cin is None or cout is None:
            self.unknown(node)
            return
        shared = _shared_kernel(self.gm, conv.weight, cin, cout, conv.groups)
        weight_const = self.const(conv.weight) is not None
        bias_ok = conv.bias is None or self.const(conv.bias) is not None
        if conv.groups == 1:
            if not (weight_const and bias_ok):
                self.unknown(node, f"conv {node.name}: weight or bias is computed in the graph; cannot rewrite it")
                return
            self.kinds[node.name] = "linear"  # decouples: no link
            self.site(x), self.site(node)
            return
        if conv.groups == cin and cout % cin == 0 and bias_ok:
            k = cout // cin
            if shared:
                self.kinds[node.name] = "shared-depthwise"
                self.link_same(x, node, k)
                return
            if weight_const:
                self.kinds[node.name] = "depthwise"
                self.link_tie(x, node, k)
                return
        self.unknown(node, f"conv {node.name} with groups={conv.groups} (in {cin}, out {cout}): only groups=1 and "
                           f"depthwise (groups = input channels) convs are analysed")

    def branch_product(self, node) -> None:
        """qlfx::branch_product = conv_a(x) * conv_b(x): modelled with two virtual values
        ``<node>.a`` and ``<node>.b`` (the branches), so it is analysed like the unfused graph."""
        args = ir.op_args(node)
        x = args["x"]
        weights = [args[k] for k in ("weight_a", "bias_a", "weight_b", "bias_b") if args.get(k) is not None]
        cin, m = _channels(x), _channels(node)
        if not self.is_value(x) or cin is None or m is None or any(self.const(w) is None for w in weights):
            self.unknown(node, f"branch_product {node.name}: weights computed in the graph")
            return
        groups = int(args["groups_b"])
        va, vb = f"{node.name}.a", f"{node.name}.b"
        for v in (va, vb):
            self.size[v], self.cuts[v], self.order[v] = m, {0, m}, self.order[node.name]
        self.site(x), self.site(node)
        if groups == 1:
            b_kind = "linear"
        elif groups == cin and m % cin == 0:
            shared = _shared_kernel(self.gm, args["weight_b"], cin, m, groups)
            b_kind = "shared-depthwise" if shared else "depthwise"
            (self.same if shared else self.ties).append((x.name, 0, cin, vb, 0, m, m // cin))
        else:
            self.unknown(node, f"branch_product {node.name}: b-branch with groups={groups} is not analysed")
            return
        self.kinds[node.name] = "branch_product"
        self.kinds[va], self.kinds[vb] = "linear", b_kind
        self.products.append((va, vb, node.name))

    def linear(self, node) -> None:
        lin = ir.LinearCall.of(node)
        s = ir.shape(lin.input)
        if (not self.is_value(lin.input) or len(s) != 2 or self.const(lin.weight) is None
                or (lin.bias is not None and self.const(lin.bias) is None)):
            self.unknown(node, f"linear {node.name}: needs a 2-D input and stored weight/bias")
            return
        self.kinds[node.name] = "linear"
        self.site(lin.input), self.site(node)

    def batch_norm(self, node) -> None:
        bn = ir.BatchNormCall.of(node)
        if bn.training or not bn.foldable or not self.is_value(bn.input):
            self.unknown(node, f"batchnorm {node.name} in training mode or without stored statistics")
            return
        self.kinds[node.name] = "batch_norm"
        before = len(self.ties)
        self.link_tie(bn.input, node, 1)
        if len(self.ties) > before:
            self.batchnorm_ties.add(before)

    def reduction(self, node) -> None:
        """sum / mean / amax / amin / norms. Over the channel axis: an invariant (module docstring);
        over other dims: sums and means are linear (same space), max/min commute with positive
        monomials; norms over pixels and reductions that move the channel axis are not analysed."""
        x = node.args[0]
        dims = _reduced_dims(node, x)
        if 1 in dims:
            self.channel_invariant(node, x)
            return
        if 0 in dims and not ir.op_args(node).get("keepdim", False):
            self.unknown(node, f"{ir.op_name(node)} {node.name} over the batch moves the channel axis")
        elif ir.is_op(node, *_SUMS) and self.deps(node) == [x]:
            self.link_same(x, node)
        elif ir.is_op(node, *_EXTREMES) and self.deps(node) == [x]:
            self.link_same(x, node)
            self.demand(node, Group.POSITIVE_MONOMIAL, f"{ir.op_name(node)} over pixels {node.name}")
        else:
            self.unknown(node)

    def channel_invariant(self, node, x) -> None:
        if ir.is_op(node, *_SUMS) and x.name in self.squares:
            source, group, what = self.squares[x.name], Group.O, "sum of squares over channels"
        elif ir.is_op(node, *_SUMS, *_EXTREMES):
            source, group, what = x, Group.PERMUTATION, f"{ir.op_name(node)} over channels"
        else:
            source, group, what = x, _norm_group(node), "norm over channels"
        if group is None or not self.is_value(source):
            self.unknown(node)
            return
        self.demand(source, group, f"{what} {node.name}")
        self.invariant.add(node.name)
        self.kinds[node.name] = "invariant"

    def einsum(self, node) -> None:
        """``einsum("nchw,nchw->nhw", x, x)``: the same value twice with the same subscripts, the channel
        letter summed out: a sum of squares over channels (O-invariant); any other einsum: not analysed."""
        a = ir.op_args(node)
        inputs, _, output = a["equation"].replace(" ", "").partition("->")
        subscripts = inputs.split(",")
        operands = a["tensors"]
        x = operands[0]
        if (len(operands) == 2 and operands[1] is x and self.is_value(x) and len(subscripts) == 2
                and subscripts[0] == subscripts[1] and subscripts[0].isalpha()
                and len(set(subscripts[0])) == len(subscripts[0]) == len(ir.shape(x))
                and set(output) <= set(subscripts[0]) and subscripts[0][1] not in output):
            self.demand(x, Group.O, f"sum of squares over channels {node.name}")
            self.invariant.add(node.name)
            self.kinds[node.name] = "invariant"
        else:
            self.unknown(node)

    def scale(self, node, x, factor) -> None:
        """x * factor or x / factor with factor a number, a constant or an invariant."""
        if not _same_shape(x, node):
            self.unknown(node, f"{ir.op_name(node)} {node.name} broadcasts {x.name}")
        elif self.uniform(factor, node):
            self.link_same(x, node)  # the same factor for every channel commutes with every basis change
            if self.is_tensor(factor) and factor.name in self.invariant:
                self.kinds[node.name] = "scale-by-invariant"
        elif ir.is_op(node, aten.mul) and self.per_channel_constant(factor, node):
            self.kinds[node.name] = "mul-constant"
            self.link_tie(x, node, 1)
        else:
            self.unknown(node, f"{ir.op_name(node)} {node.name} by {getattr(factor, 'name', factor)}, which "
                               f"differs between channels")

    def mul(self, node) -> None:
        a, b = node.args[:2]
        if self.is_value(a) and self.is_value(b):
            if _same_shape(a, node) and _same_shape(b, node):
                self.site(a), self.site(b), self.site(node)
                self.products.append((a.name, b.name, node.name))
                self.kinds[node.name] = "product"
            else:
                self.unknown(node, f"product {node.name} broadcasts")
            return
        x, factor = (a, b) if self.is_value(a) else (b, a)
        self.scale(node, x, factor)

    def div(self, node) -> None:
        x, divisor = node.args[:2]
        if self.is_value(x) and not self.is_value(divisor):
            self.scale(node, x, divisor)
        else:
            self.elementwise(node)  # 1 / x, x / y: elementwise (no monomial scaling rule for a quotient)

    def per_channel_constant(self, arg, out: fx.Node) -> bool:
        """``arg`` is a stored tensor with one entry per channel of ``out`` (broadcasting along dim 1)."""
        t = self.const(arg)
        axis = None if t is None else t.dim() - (len(ir.shape(out)) - 1)
        return axis is not None and axis >= 0 and t.shape[axis] == _channels(out)

    def add(self, node) -> None:
        """x + y / x - y (any alpha) of values: one space. With a per-channel stored constant c: the same
        space, c rewritten as M c. With a number or a channel-uniform constant/invariant: every channel
        gets the same shift, which only permutations keep."""
        values = [v for v in node.args[:2] if self.is_value(v)]
        others = [v for v in node.args[:2] if not self.is_value(v)]
        if any(not self.same_layout(v, node) for v in values):
            self.unknown(node, f"{ir.op_name(node)} {node.name} broadcasts over channels")
            return
        uniform_shift = False
        for k in others:
            if isinstance(k, numbers.Number) and k == 0:
                continue
            if self.per_channel_constant(k, node):
                self.kinds[node.name] = "add-constant"
            elif self.uniform(k, node):
                uniform_shift = True
            else:
                self.unknown(node, f"{ir.op_name(node)} {node.name} of a value that is neither per-channel "
                                   f"stored nor the same for every channel")
                return
        for v in values:
            self.link_same(v, node)
        if uniform_shift:
            self.demand(node, Group.PERMUTATION, f"{ir.op_name(node)} of the same shift to every channel {node.name}")

    def where(self, node) -> None:
        """where(cond, a, b) with cond the same for every channel (e.g. |x| > r): picks a or b per pixel,
        so it commutes with every basis change of a's and b's (one) space; a number or uniform branch
        (other than 0) keeps permutations only. A per-channel condition: elementwise."""
        a = ir.op_args(node)
        cond = a["condition"]
        if self.is_value(cond) or not self.uniform(cond, node):
            self.elementwise(node)
            return
        values, shift = [], False
        for branch in (a["self"], a["other"]):
            if self.is_value(branch):
                if not self.same_layout(branch, node):
                    self.unknown(node, f"where {node.name} broadcasts {branch.name} over channels")
                    return
                values.append(branch)
            elif self.uniform(branch, node):
                shift |= not (isinstance(branch, numbers.Number) and branch == 0)
            else:
                self.unknown(node, f"where {node.name}: a branch differs between channels")
                return
        for v in values:
            self.link_same(v, node)
        if shift:
            self.demand(node, Group.PERMUTATION, f"where {node.name} with a constant branch")
        self.kinds[node.name] = "where"

    def slice(self, node) -> None:
        piece = ir.ChannelSlice.of(node)
        x = node.args[0]
        if not self.is_value(x):
            self.unknown(node)
        elif piece is None:  # along another dim (ChannelSlice takes every slice of dim 1)
            if ir.op_args(node)["dim"] % len(ir.shape(x)) != 1 and _channels(x) == _channels(node):
                self.link_same(x, node)
            else:
                self.unknown(node)
        elif piece.step != 1:
            self.unknown(node, f"strided channel slice {node.name}")
        else:
            self.site(x), self.site(node)
            self.cuts[x.name].update({piece.start, piece.stop})
            self.same.append((node.name, 0, piece.stop - piece.start, x.name, piece.start, piece.stop, 1))
            self.kinds[node.name] = "slice"

    def cat(self, node) -> None:
        a = ir.op_args(node)
        tensors, nd = a["tensors"], len(ir.shape(node))
        if not all(self.is_tensor(t) for t in tensors) or nd < 2:
            self.unknown(node)
            return
        if a["dim"] % nd != 1:
            for t in tensors:
                self.link_same(t, node)
            return
        self.site(node)
        offset = 0
        for t in tensors:
            if not self.site(t):
                self.unknown(node)
                return
            c = self.size[t.name]
            self.cuts[node.name].update({offset, offset + c})
            self.same.append((t.name, 0, c, node.name, offset, offset + c, 1))
            offset += c
        self.kinds[node.name] = "cat"

    def reshape(self, node) -> None:
        """view / reshape / (un)squeeze / flatten: dims 0 and 1 kept -> the same space; (N, C, ...) to
        (N, C*HW) -> HW copies of the space (channel c*HW + p)."""
        x = node.args[0]
        s_in, s_out = ir.shape(x), ir.shape(node)
        if self.deps(node) != [x] or len(s_in) < 2 or len(s_out) < 2 or not _same_dim(s_in[0], s_out[0]):
            self.unknown(node)
        elif s_in[1] == s_out[1]:
            self.link_same(x, node)
        elif len(s_out) == 2 and all(isinstance(d, int) for d in s_in[1:]) and s_out[1] == math.prod(s_in[1:]):
            self.link_same(x, node, math.prod(s_in[2:]))
        else:
            self.unknown(node)

    def getitem(self, node) -> None:
        source, index = node.args
        if ir.is_op(source, *_MAX_POOLS_WITH_INDICES) and index == 0 and self.is_value(source.args[0]) and \
                _channels(source.args[0]) == _channels(node):
            self.link_same(source.args[0], node)
            self.demand(node, Group.POSITIVE_MONOMIAL, f"{ir.op_name(source)} {node.name}")
        else:
            self.unknown(node)


# ----------------------------------------------------------------------------------------- analysis
def analyze(gm: fx.GraphModule) -> SymmetryReport:
    """Channel spaces of ``gm`` (canonical qlfx IR with shapes) and their groups. See the module
    docstring for the rules. Best run on a BN-folded graph (fold-bn,constant-fold,dce)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"analyze takes a qlfx GraphModule (qlfx.trace / qlfx.compile(...).graph_module), "
                        f"not {type(gm).__name__}")
    missing = [n.name for n in gm.graph.nodes if n.op in ("placeholder", "call_function") and "val" not in n.meta]
    if missing:
        raise ValueError(f"nodes without values ({', '.join(missing[:5])}...): analyze takes a graph captured by "
                         f"qlfx.trace / qlfx.compile (every node has meta['val']); after editing a graph, "
                         f"call qlfx.ir.refresh_vals(gm)")
    rec = _Recorder(gm)
    for node in gm.graph.nodes:
        rec.visit(node)

    # ---- phase 1: cut points agree across every link -------------------------------------------
    bad_links = set()
    links = [("same", i, l) for i, l in enumerate(rec.same)] + [("tie", i, l) for i, l in enumerate(rec.ties)]
    changed = True
    while changed:
        changed = False
        for kind, i, (x, xs, xe, y, ys, ye, m) in links:
            if (kind, i) in bad_links:
                continue
            for p in list(rec.cuts[x]):
                if xs < p < xe:
                    q = ys + (p - xs) * m
                    if q not in rec.cuts[y]:
                        rec.cuts[y].add(q)
                        changed = True
            for q in list(rec.cuts[y]):
                if ys < q < ye:
                    off = q - ys
                    if off % m:
                        bad_links.add((kind, i))
                        break
                    p = xs + off // m
                    if p not in rec.cuts[x]:
                        rec.cuts[x].add(p)
                        changed = True
        for a, b, z in rec.products:
            union = rec.cuts[a] | rec.cuts[b] | rec.cuts[z]
            for n in (a, b, z):
                if rec.cuts[n] != union:
                    rec.cuts[n] |= union
                    changed = True

    segments: dict[str, list[tuple[int, int]]] = {}
    for name, cuts in rec.cuts.items():
        pts = sorted(cuts)
        segments[name] = list(zip(pts[:-1], pts[1:]))

    def seg_at(name, start):
        for j, (s, e) in enumerate(segments[name]):
            if s == start:
                return (name, j)
        raise AssertionError(f"no segment of {name} starts at {start}")

    uf = _WeightedUnionFind()
    for name, segs in segments.items():
        for j in range(len(segs)):
            uf.add((name, j))

    conflicts: list[tuple[str, str]] = []

    def link_segments(x, xs, xe, y, ys, m, merge):
        for j, (s, e) in enumerate(segments[x]):
            if s >= xs and e <= xe:
                ykey = seg_at(y, ys + (s - xs) * m)
                merge((x, j), ykey, m)

    for i, (x, xs, xe, y, ys, ye, m) in enumerate(rec.same):
        if ("same", i) in bad_links:
            conflicts.append((x, y))
            continue

        def merge_same(xk, yk, m):
            if not uf.union(yk, 1, xk, m):
                conflicts.append((xk[0], yk[0]))

        link_segments(x, xs, xe, y, ys, m, merge_same)

    # ---- spaces = roots ------------------------------------------------------------------------
    def space_of(key):
        return uf.find(key)

    tie_uf = _WeightedUnionFind()
    roots = {space_of(k)[0] for k in uf.parent}
    for r in roots:
        tie_uf.add(r)
    tie_conflicts: list[Any] = []
    tied: set = set()
    tied_by_other: set = set()  # tied by something other than an unfolded batchnorm

    for i, (x, xs, xe, y, ys, ye, m) in enumerate(rec.ties):
        if ("tie", i) in bad_links:
            conflicts.append((x, y))
            continue

        def merge_tie(xk, yk, m, by_batchnorm=i in rec.batchnorm_ties):
            rx, mx = space_of(xk)
            ry, my = space_of(yk)
            tied.update({rx, ry})
            if not by_batchnorm:
                tied_by_other.update({rx, ry})
            if not tie_uf.union(ry, my, rx, mx * m):
                tie_conflicts.extend([rx, ry])

        link_segments(x, xs, xe, y, ys, m, merge_tie)

    product_segs = []  # (node, start, stop, (ra, ma), (rb, mb), (rz, mz))
    for a, b, z in rec.products:
        for j, (s, e) in enumerate(segments[z]):
            ka, kb, kz = seg_at(a, s), seg_at(b, s), (z, j)
            (ra, ma), (rb, mb), (rz, mz) = space_of(ka), space_of(kb), space_of(kz)
            tied.update({ra, rb, rz})
            tied_by_other.update({ra, rb, rz})
            for (r1, m1) in ((ra, ma), (rb, mb)):
                if not tie_uf.union(r1, m1, rz, mz):
                    tie_conflicts.extend([r1, rz])
            product_segs.append((z, s, e, (ra, ma), (rb, mb), (rz, mz)))

    # ---- groups: demands, then the tie / product rules to a fixed point ------------------------
    groups: dict[Any, Group] = {r: Group.GL for r in roots}
    reasons: dict[Any, list[str]] = defaultdict(list)

    def restrict(root, group: Group, why: str) -> bool:
        new = meet(groups[root], group)
        if why and group is not Group.GL and why not in reasons[root]:
            reasons[root].append(f"{group}: {why}")
        if new is not groups[root]:
            groups[root] = new
            return True
        return False

    for name, start, stop, group, why in rec.demands:
        for j, (s, e) in enumerate(segments[name]):
            if s >= start and e <= stop:
                restrict(space_of((name, j))[0], group, why)
    for x, y in conflicts:
        for n in (x, y):
            for j in range(len(segments[n])):
                restrict(space_of((n, j))[0], Group.IDENTITY, f"inconsistent channel structure between {x} and {y}")
    for r in tie_conflicts:
        restrict(r, Group.IDENTITY, "inconsistent tied permutations")
    untied = {r: groups[r] for r in tied - tied_by_other}  # before the batchnorm ties restrict them
    for r in tied:
        restrict(r, Group.MONOMIAL, "tied to other spaces by a per-channel op or a product")

    z_count: dict[Any, int] = defaultdict(int)
    for p in product_segs:
        z_count[p[5][0]] += 1
    derived: set = set()
    scaling_group = {"any": Group.MONOMIAL, "positive": Group.POSITIVE_MONOMIAL, "sign": Group.SIGNED_PERMUTATION,
                     "one": Group.PERMUTATION}
    while True:
        changed = False
        classes: dict[Any, list] = defaultdict(list)
        for r in tied:
            classes[tie_uf.find(r)[0]].append(r)
        for members in classes.values():
            if any(groups[r] is Group.IDENTITY for r in members):
                for r in members:
                    changed |= restrict(r, Group.IDENTITY, "tied to a space that must stay fixed")
        derived = set()
        for node, s, e, (ra, ma), (rb, mb), (rz, mz) in product_segs:
            simple = z_count[rz] == 1 and mz == 1 and rz not in (ra, rb)
            if simple:
                derived.add(rz)
                limit = scaling_group[groups[rz].scalings] if groups[rz] is not Group.IDENTITY else Group.IDENTITY
                changed |= restrict(ra, limit, f"scalings of product {node} must stay in its output's group")
                changed |= restrict(rb, limit, f"scalings of product {node} must stay in its output's group")
            else:
                for r in (ra, rb, rz):
                    changed |= restrict(r, Group.PERMUTATION, f"product {node} (no simple scaling rule)")
        if not changed:
            break

    # ---- assemble the report -------------------------------------------------------------------
    members: dict[Any, list[Segment]] = defaultdict(list)
    for name in sorted(segments, key=lambda n: rec.order.get(n, 0)):
        for j, (s, e) in enumerate(segments[name]):
            r, m = space_of((name, j))
            members[r].append(Segment(name, s, e, m))
    ordered_roots = sorted(members, key=lambda r: (rec.order.get(members[r][0].node, 0), members[r][0].start))
    ids = {r: i for i, r in enumerate(ordered_roots)}
    nodes = {n.name: n for n in gm.graph.nodes}
    spaces = []
    for r in ordered_roots:
        segs = members[r]
        size = (segs[0].stop - segs[0].start) // segs[0].mult
        sites = []
        for seg in segs:
            if seg.node in nodes:
                label = _location(nodes[seg.node])
            else:  # a virtual branch value of a fused product
                base, branch = seg.node.rsplit(".", 1)
                label = f"{_location(nodes[base])} branch {branch}"

            if seg.stop - seg.start != rec.size[seg.node]:
                label += f" [{seg.start}:{seg.stop}]"
            if seg.mult > 1:
                label += f" ({seg.mult} copies)"
            sites.append(label)
        spaces.append(ChannelSpace(ids[r], size, groups[r], sites, segs, reasons[r], r in derived,
                                   untied_by_bn_folding=untied.get(r)))
    ties: dict[int, list[tuple[int, int]]] = {}
    class_ids: dict[Any, int] = {}
    for r in sorted(tied, key=lambda r: ids[r]):
        c, m = tie_uf.find(r)
        cid = class_ids.setdefault(c, len(class_ids))
        ties.setdefault(cid, []).append((ids[r], m))
    # normalise each class so the smallest member has multiplicity 1
    for cid, mem in ties.items():
        base = min(m for _, m in mem)
        assert all(m % base == 0 for _, m in mem)
        ties[cid] = [(sid, m // base) for sid, m in mem]
        for sid, m in ties[cid]:
            spaces[sid].tie, spaces[sid].tie_mult = cid, m // 1
    products = [ProductConstraint(node, s, e, (ids[ra], ma), (ids[rb], mb), (ids[rz], mz))
                for node, s, e, (ra, ma), (rb, mb), (rz, mz) in product_segs]
    node_segments = {}
    for name, segs in segments.items():
        node_segments[name] = []
        for j, (s, e) in enumerate(segs):
            r, m = space_of((name, j))
            node_segments[name].append((s, e, ids[r], m))
    return SymmetryReport(spaces, products, ties, node_segments, rec.kinds, rec.notes)


def format_report(report: SymmetryReport, max_sites: int = 3) -> str:
    """The printable table behind ``qlfx symmetry MODEL``."""
    head = ("space", "size", "group", "lie dim", "tie", "sites")
    rows = []
    for s in report.spaces:
        sites = "; ".join(s.sites[:max_sites]) + (f"; +{len(s.sites) - max_sites} more" if len(s.sites) > max_sites else "")
        group = s.group.value + (" (derived D=DaDb)" if s.derived else "")
        rows.append((str(s.id), str(s.size), group, str(s.lie_dimension), "" if s.tie is None else str(s.tie), sites))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i in (2, 5) else f"{{:>{w}}}" for i, w in enumerate(widths[:-1])) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(report.group_counts().items()))
    out += ["", f"{len(report.spaces)} channel spaces ({counts}); {len(report.products)} product constraint(s); "
                f"continuous symmetry dimension {report.continuous_dimension:,}"]
    if report.notes:
        out += ["", "notes:"] + [f"  {n}" for n in report.notes]
    return "\n".join(out)
