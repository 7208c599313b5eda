"""Channel spaces of a qlfx graph and the group each one carries (DESIGN.md §3).

Give the channel axis (dim 1) of every tensor value a basis. A transformation assigns an invertible
matrix to every *channel space* -- a set of channel axes that must change basis together -- and
rewrites the weights so that every output is unchanged. What each op demands (x: input, y: output):

- linear op ``y = W x + c`` (conv with groups=1, any kernel; ``F.linear``): nothing. It *decouples*
  its input and output spaces (rewrite ``W' = P_y W P_x^-1``, ``c' = P_y c``).
- ops commuting with every linear map of the channels (add, adding a constant, multiplying by a scalar
  or a channel-uniform map, avg-pool, adaptive-avg-pool, interpolation, batch slicing, a depthwise conv
  whose kernel is shared by all input channels): input(s) and output are ONE space. A shared depthwise
  conv C -> kC maps the space to ``space (x) R^k`` (output channel c*k + r), acting as ``P (x) I_k``;
  ``flatten(x, 1)`` of an (N, C, H, W) tensor likewise gives ``space (x) R^(HW)``. Such a channel axis
  is a *copy* of the space with multiplicity k.
- ReLU, leaky ReLU, max-pool: same space, positive monomial. Symmetric hardtanh, tanh: signed
  permutation. Asymmetric clips (ReLU6) and other elementwise activations: permutation.
  Hardball/Softball (radial): O(C).
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
- channel slices (``x[:, a:b]``) and ``torch.cat`` along channels: the sliced / concatenated axis is
  split into segments at the slice boundaries and every segment is its own space: the group of the
  whole axis is block-diagonal, conformal with the pieces (exact, not a restriction). Cut points are
  propagated through every "same space" link until they agree.
- network inputs and outputs, and every op not listed (including 1 < groups < C convs and
  ``qlfx::branch_product``): identity on every space they touch (safe).

The analysis is a union-find over channel *segments* with "same space (x) R^k" links, a second
union-find over spaces for tied permutations, and a meet over the lattice of :mod:`.groups` of all
demands, iterated with the product rules to a fixed point.

Continuous dimension = the sum over spaces of the Lie algebra dimension of their group (GL: n^2,
O: n(n-1)/2, (positive) monomial: n scalings, discrete: 0), where a product's output space (whose
scalings are derived) counts 0.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from qlfx import ir

from .groups import (Element, Group, Monomial, as_element, identity_element, is_member,
                     kron_identity, lie_dimension, meet, random_element, random_permutation, random_scaling)

__all__ = ["Segment", "ChannelSpace", "ProductConstraint", "SymmetryReport", "analyze", "format_report"]


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
_RELU = {F.relu, torch.relu, F.relu_}
_POSITIVE = {F.leaky_relu, torch.nn.functional.elu}  # positively homogeneous (elu is not: perm below)
_ODD = {torch.tanh, F.tanh, F.hardtanh, F.softsign, F.tanhshrink}
_ELEMENTWISE = {torch.sigmoid, F.sigmoid, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.mish, F.softplus,
                F.elu, F.selu, F.celu, F.relu6, torch.exp, torch.abs}
_MAXPOOL = {F.max_pool2d, F.adaptive_max_pool2d, F.max_pool1d, torch.max_pool2d}
_LINEAR_COMMUTING = {F.avg_pool2d, F.adaptive_avg_pool2d, torch.avg_pool1d, F.avg_pool1d, F.interpolate,
                     F.upsample}
_ADD = {operator.add, torch.add, operator.iadd, operator.sub, torch.sub}
_MUL = {operator.mul, torch.mul}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def _channels(node) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    s = ir.shape(node)
    return int(s[1]) if s is not None and len(s) >= 2 else None


def _location(node: fx.Node) -> str:
    path = node.meta.get("qlfx_module")
    if path is None and node.op == "call_module":
        path = node.target
    if path is None:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.keys())[-1]
            value = list(stack.values())[-1]
            if isinstance(value, tuple) and value and isinstance(value[0], str):
                path = value[0]
    if node.op == "placeholder":
        return f"network input ({node.name})"
    return f"{path} output ({node.name})" if path else f"output of {node.name}"


class _Recorder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.size: dict[str, int] = {}
        self.cuts: dict[str, set[int]] = {}
        self.same: list[tuple[str, int, int, str, int, int, int]] = []  # x, xs, xe, y, ys, ye, mult (y ~ x (x) R^mult)
        self.ties: list[tuple[str, int, int, str, int, int, int]] = []
        self.products: list[tuple[str, str, str]] = []  # a, b, z (node names)
        self.demands: list[tuple[str, int, int, Group, str]] = []
        self.kinds: dict[str, str] = {}
        self.notes: list[str] = []
        self.order: dict[str, int] = {}

    # -- helpers
    def site(self, node) -> bool:
        c = _channels(node)
        if c is None:
            return False
        if node.name not in self.size:
            self.size[node.name] = c
            self.cuts[node.name] = {0, c}
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
        values = [a for a in node.all_input_nodes if a.op != "get_attr"] + [node]
        target = getattr(node.target, "__name__", str(node.target))
        self.unknown_sites(values, why or f"{node.op} {target} ({node.name}) is not understood by the analysis")

    def const(self, arg) -> torch.Tensor | None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            t = ir.get_tensor(self.gm, arg)
            return t if isinstance(t, torch.Tensor) else None
        return None

    # -- per op
    def visit(self, node: fx.Node) -> None:
        self.order[node.name] = len(self.order)
        if node.op == "get_attr":
            return
        if node.op == "placeholder":
            self.demand(node, Group.IDENTITY, f"network input {node.name}")
            return
        if node.op == "output":
            flat = [a for a in _flatten(node.args) if isinstance(a, fx.Node)]
            for a in flat:
                self.demand(a, Group.IDENTITY, "network output")
            return
        if node.op == "call_module":
            from qlfx.models.activations import Hardball, Softball

            mod = self.gm.get_submodule(node.target)
            if isinstance(mod, (Hardball, Softball)) and len(node.args) == 1 and not node.kwargs:
                self.link_same(node.args[0], node)
                self.demand(node, Group.O, f"{type(mod).__name__.lower()} {node.target}")
                self.kinds[node.name] = "radial"
                return
            self.unknown(node, f"opaque module {node.target} ({type(mod).__name__})")
            return
        if node.op == "call_method":
            if node.target in ("mean", "sum", "amax") and len(node.args) >= 2:
                dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else (node.args[1],)
                x = node.args[0]
                nd = len(ir.shape(x) or ())
                if all(isinstance(d, int) and (d % nd if nd else d) >= 2 for d in dims) and \
                        _channels(node) == _channels(x):
                    self.link_same(x, node)
                    if node.target == "amax":
                        self.demand(node, Group.POSITIVE_MONOMIAL, f"max over pixels {node.name}")
                    return
            self.unknown(node)
            return
        if node.op != "call_function":
            self.unknown(node)
            return
        t = node.target
        if _is_branch_product(t):
            self.branch_product(node)
        elif t is ir.CONV2D:
            self.conv(node)
        elif t is F.linear:
            self.linear(node)
        elif t is F.batch_norm:
            self.batch_norm(node)
        elif t in _RELU or t in _POSITIVE and t is not F.elu:
            self.activation(node, Group.POSITIVE_MONOMIAL)
        elif t is F.hardtanh:
            args = list(node.args) + [None, None]
            lo = node.kwargs.get("min_val", args[1] if args[1] is not None else -1.0)
            hi = node.kwargs.get("max_val", args[2] if args[2] is not None else 1.0)
            self.activation(node, Group.SIGNED_PERMUTATION if lo == -hi else Group.PERMUTATION)
        elif t in _ODD:
            self.activation(node, Group.SIGNED_PERMUTATION)
        elif t in _ELEMENTWISE:
            self.activation(node, Group.PERMUTATION)
        elif t in _MAXPOOL:
            self.activation(node, Group.POSITIVE_MONOMIAL)
        elif t in _LINEAR_COMMUTING:
            if _channels(node.args[0]) == _channels(node):
                self.link_same(node.args[0], node)
            else:
                self.unknown(node)
        elif t is torch.flatten:
            self.flatten(node)
        elif t in _ADD:
            self.add(node)
        elif t in _MUL:
            self.mul(node)
        elif t in (operator.truediv, torch.div) and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
            self.link_same(node.args[0], node)
        elif t is operator.getitem:
            self.getitem(node)
        elif t in _CAT:
            self.cat(node)
        else:
            self.unknown(node)

    def activation(self, node, group: Group) -> None:
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or _channels(x) != _channels(node):
            self.unknown(node)
            return
        self.link_same(x, node)
        target = getattr(node.target, "__name__", str(node.target))
        self.demand(node, group, f"{target} {node.name}")
        self.kinds[node.name] = "activation"

    def conv(self, node) -> None:
        conv = ir.ConvCall.of(node)
        x = conv.input
        cin, cout = _channels(x), _channels(node)
        if cin is None or cout is None:
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
        args = dict(zip(BRANCH_PRODUCT_ARGS, node.args))
        args.update(node.kwargs)
        x = args["x"]
        weights = [args[k] for k in ("weight_a", "bias_a", "weight_b", "bias_b") if args.get(k) is not None]
        cin, m = _channels(x), _channels(node)
        if cin is None or m is None or any(self.const(w) is None for w in weights):
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
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        s = ir.shape(x)
        if s is None or len(s) != 2 or self.const(w) is None or (b is not None and self.const(b) is None):
            self.unknown(node, f"linear {node.name}: needs a 2-D input and stored weight/bias")
            return
        self.kinds[node.name] = "linear"
        self.site(x), self.site(node)

    def batch_norm(self, node) -> None:
        from qlfx.passes.fold_bn import BatchNormCall

        bn = BatchNormCall.of(node)
        consts = [a for a in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if a is not None]
        if bn.training or bn.running_mean is None or any(self.const(a) is None for a in consts):
            self.unknown(node, f"batchnorm {node.name} in training mode or without stored statistics")
            return
        self.kinds[node.name] = "batch_norm"
        self.link_tie(bn.input, node, 1)

    def flatten(self, node) -> None:
        args = list(node.args) + [0, -1][len(node.args) - 1:]
        x = args[0]
        start = node.kwargs.get("start_dim", args[1])
        end = node.kwargs.get("end_dim", args[2])
        s = ir.shape(x)
        if s is None:
            self.unknown(node)
            return
        nd = len(s)
        start, end = start % nd, end % nd
        if start >= 2 and _channels(node) == _channels(x):
            self.link_same(x, node)
        elif start == 1 and end == nd - 1:
            self.link_same(x, node, math.prod(s[2:]))
        else:
            self.unknown(node)

    def _constant_channel_size(self, const: torch.Tensor, out: fx.Node) -> int | None:
        nd = len(ir.shape(out))
        axis = const.dim() - (nd - 1)
        if axis < 0:
            return 1
        return int(const.shape[axis])

    def add(self, node) -> None:
        if len(node.args) != 2 or any(k != "alpha" for k in node.kwargs):
            self.unknown(node)
            return
        a, b = node.args
        c = _channels(node)
        values = [v for v in (a, b) if isinstance(v, fx.Node) and self.const(v) is None]
        consts = [v for v in (a, b) if v not in values]
        if any(ir.shape(v) is None or len(ir.shape(v)) != len(ir.shape(node)) or _channels(v) != c for v in values):
            self.unknown(node, f"add {node.name} broadcasts over channels")
            return
        for k in consts:
            if isinstance(k, (int, float)) and k == 0:
                continue
            t = self.const(k)
            if t is None or self._constant_channel_size(t, node) != c:
                self.unknown(node, f"add {node.name} of a constant that is not per-channel (needs a fixed vector)")
                return
        if consts:
            self.kinds[node.name] = "add-constant"
        for v in values:
            self.link_same(v, node)

    def mul(self, node) -> None:
        if len(node.args) != 2 or node.kwargs:
            self.unknown(node)
            return
        a, b = node.args
        c = _channels(node)
        values = [v for v in (a, b) if isinstance(v, fx.Node) and self.const(v) is None]
        if len(values) == 2:
            if all(ir.shape(v) == ir.shape(node) for v in values):
                self.site(a), self.site(b), self.site(node)
                self.products.append((a.name, b.name, node.name))
                self.kinds[node.name] = "product"
            else:
                self.unknown(node, f"product {node.name} broadcasts")
            return
        if len(values) != 1:
            self.unknown(node)
            return
        x = values[0]
        other = b if x is a else a
        if _channels(x) != c:
            self.unknown(node)
            return
        if isinstance(other, (int, float)):
            self.link_same(x, node)
            return
        t = self.const(other)
        size = self._constant_channel_size(t, node) if t is not None else None
        if size == 1:
            self.link_same(x, node)  # channel-uniform map: commutes with every channel basis change
        elif size == c:
            self.kinds[node.name] = "mul-constant"
            self.link_tie(x, node, 1)
        else:
            self.unknown(node)

    def getitem(self, node) -> None:
        x, index = node.args
        if not isinstance(x, fx.Node) or _channels(x) is None:
            self.unknown(node)
            return
        idx = index if isinstance(index, tuple) else (index,)
        full = lambda s: isinstance(s, slice) and s == slice(None)  # noqa: E731
        if len(idx) >= 2 and full(idx[0]) and isinstance(idx[1], slice) and idx[1].step in (None, 1) and \
                all(full(s) or s is Ellipsis for s in idx[2:]):
            c = self.size.get(x.name) or _channels(x)
            self.site(x)
            start, stop, _ = idx[1].indices(c)
            if not self.site(node) or self.size[node.name] != stop - start:
                self.unknown(node)
                return
            self.cuts[x.name].update({start, stop})
            self.same.append((node.name, 0, stop - start, x.name, start, stop, 1))
            self.kinds[node.name] = "slice"
            return
        if isinstance(idx[0], slice) and all(full(s) or s is Ellipsis for s in idx[1:]) and \
                _channels(node) == _channels(x):
            self.link_same(x, node)  # batch slice
            return
        self.unknown(node)

    def cat(self, node) -> None:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        nd = len(ir.shape(node) or ())
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors) or nd < 2:
            self.unknown(node)
            return
        if dim % nd != 1:
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


BRANCH_PRODUCT_ARGS = ("x", "weight_a", "bias_a", "weight_b", "bias_b", "stride", "padding_b", "dilation_b",
                       "groups_b")


def _is_branch_product(target) -> bool:
    return "qlfx.branch_product" in str(target) or getattr(target, "__name__", "") == "qlfx::branch_product"


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
    P (x) I_k for any P): a ``repeat`` of a stored (k, 1, kh, kw) kernel, or a stored weight whose
    (cin, k, ...) view is constant along the input-channel axis."""
    if groups != cin or cin == 0 or cout % cin:
        return False
    k = cout // cin
    if isinstance(weight, fx.Node) and weight.op == "call_method" and weight.target == "repeat":
        base = weight.args[0]
        reps = tuple(weight.args[1:]) if not isinstance(weight.args[1], (tuple, list)) else tuple(weight.args[1])
        s = ir.shape(base)
        return (isinstance(base, fx.Node) and base.op == "get_attr" and s is not None and s[0] == k
                and reps[:1] == (cin,) and all(r == 1 for r in reps[1:]))
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        w = ir.get_tensor(gm, weight)
        if cin == 1:
            return False  # one input channel: nothing to share; treated as per-channel
        v = w.reshape(cin, k, -1)
        return bool((v == v[:1]).all())
    return False


# ----------------------------------------------------------------------------------------- analysis
def analyze(gm: fx.GraphModule) -> SymmetryReport:
    """Channel spaces of ``gm`` (canonical qlfx IR with shapes) and their groups. See the module
    docstring for the rules. Best run on a BN-folded graph (fold-bn,constant-fold,dce)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"analyze takes a qlfx GraphModule (qlfx.trace / qlfx.compile(...).graph_module), "
                        f"not {type(gm).__name__}")
    missing = [n.name for n in gm.graph.nodes if n.op not in ("output", "get_attr") and "tensor_meta" not in n.meta]
    if missing:
        raise ValueError(f"nodes without shapes ({', '.join(missing[:5])}...): run qlfx.ir.propagate_shapes(gm, inputs) first")
    rec = _Recorder(gm)
    # values computed from stored tensors only (e.g. a repeated shared kernel) are weights, not activations
    weight_like: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op in ("call_function", "call_method") and node.all_input_nodes and
                                     all(a.name in weight_like for a in node.all_input_nodes)):
            weight_like.add(node.name)
            rec.order[node.name] = len(rec.order)
            continue
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

    for i, (x, xs, xe, y, ys, ye, m) in enumerate(rec.ties):
        if ("tie", i) in bad_links:
            conflicts.append((x, y))
            continue

        def merge_tie(xk, yk, m):
            rx, mx = space_of(xk)
            ry, my = space_of(yk)
            tied.update({rx, ry})
            if not tie_uf.union(ry, my, rx, mx * m):
                tie_conflicts.extend([rx, ry])

        link_segments(x, xs, xe, y, ys, m, merge_tie)

    product_segs = []  # (node, start, stop, (ra, ma), (rb, mb), (rz, mz))
    for a, b, z in rec.products:
        for j, (s, e) in enumerate(segments[z]):
            ka, kb, kz = seg_at(a, s), seg_at(b, s), (z, j)
            (ra, ma), (rb, mb), (rz, mz) = space_of(ka), space_of(kb), space_of(kz)
            tied.update({ra, rb, rz})
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
        spaces.append(ChannelSpace(ids[r], size, groups[r], sites, segs, reasons[r], r in derived))
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
