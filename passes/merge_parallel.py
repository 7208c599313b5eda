"""merge-parallel: sum of parallel linear branches on one input -> one conv (RepVGG / MobileOne / DBB / ACNet).

A sum ``y = sum_b T_b(x)`` whose terms are all linear in the *same* tensor ``x`` is one linear map. Each
term ``T_b`` is one of

- ``conv_b(x)`` (any kernel ``kh x kw``, padding ``p_b``, dilation ``d_b``; all with the same stride and
  the same ``groups``),
- ``BN(conv_b(x))`` — an un-folded eval batchnorm is the per-channel affine map ``s * z + t``, folded
  locally: ``W_b <- s W_b``, ``c_b <- s c_b + t``,
- ``x`` itself (identity) or ``BN(x)``: a conv whose kernel is ``s_i`` at the tap that reads pixel
  (i, j) of channel ``i``: for ``groups = g`` with ``m = C / g`` inputs per group, output channel ``i``
  reads group-local input ``i mod m``. Needs ``C_out = C_in`` and stride 1.

**The expression.** The sum is read as an affine expression tree: its inner nodes are ``aten.add`` /
``aten.sub`` / ``aten.rsub`` (any ``alpha``), ``aten.neg``, ``aten.mul`` / ``aten.div`` by a stored per-channel constant
or a number (FastViT's layer scale ``gamma``), an eval ``aten.batch_norm`` with stored statistics, and
the addition of a number or a stored per-channel constant (``scale_out + 0`` when a MobileOne branch is
absent); each inner node has the root's shape and dtype and no user outside the tree. Expanding it gives
``y = sum_l diag(k_l) v_l + c`` over its leaves ``v_l``, with a per-channel coefficient ``k_l`` (the
product of the scales on the path from the root) and a per-channel constant ``c``; so branches written
in any order, nested, subtracted or scaled (FastViT's token mixer ``x + gamma * (mixer(x) - norm(x))``)
reach the merge alike. Leaves that are convs of one input ``x`` with stored weights, and ``x`` itself,
form that input's branches: ``W_b <- diag(k_b) W_b``, ``c_b <- k_b c_b``. Leaves of other inputs, and
convs that cannot merge, stay terms of the sum (``v_l`` times ``k_l`` where ``k_l != 1``); ``c`` goes
into the bias of the merged conv.

**Taps.** Along one axis, output pixel ``i`` of branch ``b`` reads input positions
``i*stride + start_b + a*d_b`` for ``a = 0..k_b-1`` with ``start_b = -p_b``. The merged conv (dilation
``D``: the common dilation of the branches with ``k > 1``, 1 if none) spans ``S = min_b start_b`` to
``E = max_b (start_b + (k_b-1) d_b)``: kernel size ``K = (E-S)/D + 1``, padding ``P = -S``, and branch
``b``'s tap ``a`` lands at index ``(start_b + a*d_b - S)/D`` (which must be an integer). Zero padding is
the same zero in every branch, so the merged conv computes exactly the same sum of products at every
pixel, borders included, **provided it has the same output size**: ``2P - D(K-1) = 2 p_b - d_b(k_b-1)``,
i.e. every branch is centred the same way. A 1x1 with padding 0 beside a 3x3 with padding 1 is centred
(lands at the centre tap); a 1x1 with padding 1 beside a 3x3 with padding 1 is not (its output is larger,
and the add would not even type-check without broadcasting), and is skipped.

Then ``W = sum_b embed(W_b)``, ``c = sum_b c_b`` (float64, rounded once). Contract: equivalent (the sum
is re-associated, so float rounding differs).
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Number

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass

aten = torch.ops.aten
ADDS = (aten.add.Tensor, aten.add.Scalar)
SUBS = (aten.sub.Tensor, aten.sub.Scalar)
MULS = (aten.mul.Tensor, aten.mul.Scalar)
DIVS = (aten.div.Tensor, aten.div.Scalar)
RSUBS = (aten.rsub.Tensor, aten.rsub.Scalar)  # rsub(x, y, alpha) = y - alpha * x: how ``1 - x`` arrives


@dataclass
class Branch:
    """One term of the sum, as a conv on ``input``: weight/bias (float64) and its geometry."""

    term: fx.Node          # the leaf of the sum the branch stands for
    input: fx.Node
    weight: torch.Tensor   # [Cout, Cin/groups, kh, kw]; for an identity, the diagonal [C]
    bias: torch.Tensor     # [Cout]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int | None     # None: identity (adapts to the others' groups)


# ------------------------------------------------------------------------------ the affine expression
def _same_value_type(a: fx.Node, b: fx.Node) -> bool:
    """Same dtype and shape (dims compared as text, so a symbolic batch matches itself)."""
    sa, sb = ir.shape(a), ir.shape(b)
    return (sa is not None and sb is not None and len(sa) == len(sb) and ir.dtype(a) == ir.dtype(b)
            and all(str(x) == str(y) for x, y in zip(sa, sb)))


def _per_channel(gm: fx.GraphModule, arg, like: fx.Node) -> torch.Tensor | None:
    """``arg`` as a float64 per-channel vector ([1] or [C]) when it is a number or a stored constant that
    broadcasts along dim 1 of ``like`` only (so it does not change like's shape); else None."""
    if isinstance(arg, Number) and not isinstance(arg, bool):
        return torch.tensor([float(arg)], dtype=torch.float64)
    if not ir.is_constant(arg):
        return None
    t = ir.get_tensor(gm, arg)
    shape = ir.shape(like)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or shape is None or t.dim() > len(shape):
        return None
    dims = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
    if any(d != 1 for i, d in enumerate(dims) if i != 1) or (len(dims) > 1 and dims[1] not in (1, shape[1])):
        return None
    return t.detach().double().reshape(-1)


def _affine_step(gm: fx.GraphModule, node: fx.Node):
    """If ``node`` is an affine op of its tensor operands, ``([(operand, coefficient)], shift)`` with
    per-channel float64 coefficients and shift (node = sum coefficient * operand + shift); else None."""
    one = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    a = ir.op_args(node)
    if ir.is_op(node, *ADDS, *SUBS, *RSUBS):
        alpha = a.get("alpha", 1)
        if not isinstance(alpha, Number):
            return None
        scaled = one * float(alpha) * (-1.0 if ir.is_op(node, *SUBS, *RSUBS) else 1.0)
        pairs = ((a["other"], one), (a["self"], scaled)) if ir.is_op(node, *RSUBS) else \
            ((a["self"], one), (a["other"], scaled))
        terms, shift = [], zero
        for operand, k in pairs:
            constant = _per_channel(gm, operand, node)
            if constant is not None:
                shift = shift + k * constant
            elif isinstance(operand, fx.Node):
                terms.append((operand, k))
            else:
                return None
        return (terms, shift) if terms else None
    if ir.is_op(node, *MULS, *DIVS):
        x, factor = a["self"], _per_channel(gm, a["other"], node)
        if factor is None and ir.is_op(node, *MULS):
            x, factor = a["other"], _per_channel(gm, a["self"], node)
        if factor is None or not isinstance(x, fx.Node) or ir.is_constant(x):
            return None
        if ir.is_op(node, *DIVS):
            factor = 1.0 / factor
        if not bool(torch.isfinite(factor).all()):
            return None  # a division by zero stays as written
        return [(x, factor)], zero
    if ir.is_op(node, aten.neg.default):
        return [(a["self"], -one)], zero
    bn = ir.BatchNormCall.of(node)
    if bn is not None and not bn.training and bn.foldable:
        s, t = bn.scale_shift(gm)
        return [(bn.input, s)], t
    return None


@dataclass
class Expansion:
    """``root = sum_l diag(coefficient_l) leaf_l + shift`` (leaves in order of appearance, repeated leaves
    combined) and the tree's inner nodes."""

    leaves: dict[fx.Node, torch.Tensor]
    shift: torch.Tensor
    inner: set[fx.Node]


def _inner(gm: fx.GraphModule, node: fx.Node, root: fx.Node) -> bool:
    """``node`` is expanded as part of root's tree: affine, the root's shape and dtype, used only once."""
    return len(node.users) == 1 and _same_value_type(node, root) and _affine_step(gm, node) is not None


def expand(gm: fx.GraphModule, root: fx.Node) -> Expansion | None:
    channels = ir.channels(root)
    if channels is None or _affine_step(gm, root) is None:
        return None
    leaves: dict[fx.Node, torch.Tensor] = {}
    shift = torch.zeros(channels, dtype=torch.float64)
    inner: set[fx.Node] = set()

    def visit(node: fx.Node, k: torch.Tensor) -> None:
        nonlocal shift
        if node is not root and not _inner(gm, node, root):
            leaves[node] = leaves.get(node, 0) + k
            return
        inner.add(node)
        terms, t = _affine_step(gm, node)
        shift = shift + k * t
        for operand, c in terms:
            visit(operand, k * c)

    visit(root, torch.ones(channels, dtype=torch.float64))
    return Expansion(leaves, shift, inner)


# ------------------------------------------------------------------------------------------ branches
def _conv_branch(gm, leaf: fx.Node, k: torch.Tensor, root: fx.Node, inner: set[fx.Node]) -> Branch | str | None:
    """The leaf as a conv branch scaled by ``k``; None when it is not a conv; a string saying why a conv
    leaf cannot be used."""
    conv = ir.ConvCall.of(leaf)
    if conv is None:
        return None
    if not set(leaf.users) <= inner:
        return f"{leaf.name} is also used outside the sum"
    if not _same_value_type(leaf, root):
        return "terms broadcast (shapes differ)"
    if isinstance(conv.padding, str):
        return f"{leaf.name} uses padding='{conv.padding}'"
    if not ir.is_constant(conv.weight) or (conv.bias is not None and not ir.is_constant(conv.bias)):
        return f"{leaf.name}'s weights are computed in the graph"
    w = ir.get_tensor(gm, conv.weight).double()
    b = ir.get_tensor(gm, conv.bias).double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return Branch(leaf, conv.input, w * k.view(-1, 1, 1, 1), b * k, conv.stride, tuple(conv.padding), conv.dilation,
                  conv.groups)


def _identity_branch(leaf: fx.Node, k: torch.Tensor, root: fx.Node) -> Branch:
    """``diag(k) x`` as a 1x1 conv (stored as the diagonal; groups decided at merge time)."""
    return Branch(leaf, leaf, k.expand(ir.channels(root)).clone(), torch.zeros(ir.channels(root), dtype=torch.float64),
                  (1, 1), (0, 0), (1, 1), None)


def _axis_layout(branches: list[Branch], axis: int):
    """(K, P, D, taps per branch) along ``axis`` or a reason string (see module docstring)."""
    big = [b for b in branches if b.weight.dim() == 4 and b.weight.shape[2 + axis] > 1]
    dils = {b.dilation[axis] for b in big}
    if len(dils) > 1:
        return f"branches have different dilations {sorted(dils)}"
    D = dils.pop() if dils else 1
    spans = []
    for b in branches:
        k = b.weight.shape[2 + axis] if b.weight.dim() == 4 else 1
        d = b.dilation[axis] if k > 1 else D
        spans.append((-b.padding[axis], k, d))
    S = min(st for st, _, _ in spans)
    E = max(st + (k - 1) * d for st, k, d in spans)
    if (E - S) % D:
        return "branch taps do not fall on a common dilation grid"
    offsets = []
    for st, k, d in spans:
        if (st - S) % D:
            return "branch taps do not fall on a common dilation grid"
        offsets.append((st - S) // D)
    return (E - S) // D + 1, -S, D, offsets


def count_convs(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if ir.ConvCall.of(n) is not None)


@register_pass
class MergeParallel(Pass):
    name = "merge-parallel"
    description = "merge summed parallel conv branches on one input (RepVGG/MobileOne/DBB: 3x3 + 1x1 + identity) into one conv"
    contract = "equivalent"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        before = count_convs(gm)
        # A root is an affine node that is not expanded as part of its user's tree. Trees are disjoint, and
        # a rewritten root's users are rewired to its replacement, so the order does not matter.
        roots = [n for n in gm.graph.nodes if _affine_step(gm, n) is not None
                 and not (len(n.users) == 1 and _inner(gm, n, next(iter(n.users)))
                          and _affine_step(gm, next(iter(n.users))) is not None)]
        sites = branches = 0
        for root in roots:
            merged = self._merge_sum(gm, root, ctx, result)
            if isinstance(merged, str):
                result.skipped.append(Skip(root.name, merged))
            elif merged:
                sites += len(merged)
                branches += sum(merged)
        if result.changed:
            gm.graph.eliminate_dead_code()
        after = count_convs(gm)
        result.stats = {"sites": sites, "branches": branches, "convs_before": before, "convs": after}
        result.notes.append(f"merged {sites} site(s) of {branches} parallel branches; "
                            f"{after} conv(s) remain (from {before})")
        return result

    def _merge_sum(self, gm, root, ctx, result) -> list[int] | str | None:
        """Merge root's tree; return the number of branches of each merged conv, a reason, or None."""
        shape = ir.shape(root)
        if shape is None or len(shape) != 4:
            return None  # not a feature-map sum: nothing to say
        tree = expand(gm, root)
        if tree is None:
            return None
        groups: dict[fx.Node, list[Branch]] = {}
        blocked: dict[fx.Node, list[str]] = {}  # conv leaves that cannot merge, by their input
        others = []
        for leaf, k in tree.leaves.items():
            br = _conv_branch(gm, leaf, k, root, tree.inner)
            if isinstance(br, Branch):
                groups.setdefault(br.input, []).append(br)
                continue
            if isinstance(br, str):
                blocked.setdefault(ir.ConvCall.of(leaf).input, []).append(br)
            others.append(leaf)
        # Identities join the branches reading their tensor.
        leftover, identities = [], set()
        for leaf in others:
            if leaf in groups and _same_value_type(leaf, root):
                groups[leaf].append(_identity_branch(leaf, tree.leaves[leaf], root))
                identities.add(leaf)
            else:
                leftover.append(leaf)
        reasons = [why for x, whys in blocked.items()
                   if len(whys) + len(groups.get(x, ())) + (x in tree.leaves and x not in identities) >= 2
                   for why in whys]
        merged = []
        for x, brs in groups.items():
            if len(brs) < 2:
                leftover.extend(b.term for b in brs)  # a lone conv on this input: it stays a term
                continue
            plan = self._merge_group(x, brs, shape, ctx)
            if isinstance(plan, str):
                reasons.append(plan)
                leftover.extend(b.term for b in brs)
                continue
            merged.append((x, brs, plan))
        if not merged:
            # No two branches on one input: not a parallel-branch sum (a plain residual add), nothing to say.
            return "; ".join(dict.fromkeys(reasons)) if reasons else None
        convs = []
        dtype = ir.dtype(root)
        with gm.graph.inserting_before(root):
            for i, (x, brs, (weight, bias, stride, padding, dilation, groups_)) in enumerate(merged):
                if i == 0:
                    bias = bias + tree.shift  # the sum's constant part
                w_node = ir.constant_node(gm, weight.to(dtype), f"{root.name}_merged_weight")
                b_node = ir.constant_node(gm, bias.to(dtype), f"{root.name}_merged_bias")
                conv = ir.call(gm, ir.CONV2D, (x, w_node, b_node, stride, padding, dilation, groups_), like=root)
                convs.append(conv)
                result.rewrites.append(f"{root.name}: {' + '.join(b.term.name for b in brs)} -> {conv.name}")
            total = convs[0]
            for term in convs[1:] + leftover:
                k = tree.leaves[term].expand(shape[1]) if term in tree.leaves else None
                if k is not None and not bool((k == 1).all()):
                    factor = (float(k[0]) if bool((k == k[0]).all()) else
                              ir.constant_node(gm, k.to(dtype).view(1, -1, 1, 1), f"{root.name}_scale"))
                    term = ir.call(gm, aten.mul.Tensor, (term, factor), like=root)
                total = ir.call(gm, aten.add.Tensor, (total, term), like=root)
        ir.replace_value(root, total)
        result.changed = True
        return [len(brs) for _, brs, _ in merged]

    def _merge_group(self, x: fx.Node, brs: list[Branch], out_shape, ctx):
        """(weight, bias, stride, padding, dilation, groups) of the one conv equal to the branches' sum,
        or why there is none."""
        convs = [b for b in brs if b.groups is not None]
        strides = {b.stride for b in convs}
        if len(strides) > 1:
            return f"branches on {x.name} have different strides {sorted(strides)}"
        stride = strides.pop()
        gset = {b.groups for b in convs}
        if len(gset) > 1:
            return f"branches on {x.name} have different groups {sorted(gset)}"
        groups = gset.pop()
        in_shape = ir.shape(x)
        if in_shape is None or len(in_shape) != 4:
            return f"{x.name} is not a feature map"
        cin = in_shape[1]
        idents = [b for b in brs if b.groups is None]
        if idents and (stride != (1, 1) or cin != out_shape[1]):
            return f"identity branch {idents[0].term.name} needs stride 1 and equal channels"
        # Identities become [C, C/g, 1, 1] kernels now that groups are known.
        m = cin // groups
        for b in idents:
            diag = b.weight
            k = torch.zeros(out_shape[1], m, 1, 1, dtype=torch.float64)
            k[torch.arange(out_shape[1]), torch.arange(out_shape[1]) % m, 0, 0] = diag
            b.weight, b.groups, b.stride = k, groups, stride
        layouts = [_axis_layout(brs, 0), _axis_layout(brs, 1)]
        for lay in layouts:
            if isinstance(lay, str):
                return f"branches on {x.name}: {lay}"
        (KH, PH, DH, offs_h), (KW, PW, DW, offs_w) = layouts
        cout = out_shape[1]
        H, W = in_shape[2:]
        size = lambda n, k, p, d, s: (n + 2 * p - d * (k - 1) - 1) // s + 1  # noqa: E731
        if (size(H, KH, PH, DH, stride[0]), size(W, KW, PW, DW, stride[1])) != tuple(out_shape[2:]):
            return (f"branches on {x.name} are not centred alike (padding inconsistent with kernel size): "
                    f"one {KH}x{KW} conv with padding {(PH, PW)} would give a different output size")
        weight = torch.zeros(cout, m, KH, KW, dtype=torch.float64)
        bias = torch.zeros(cout, dtype=torch.float64)
        for b, oh, ow in zip(brs, offs_h, offs_w):
            kh, kw = b.weight.shape[2:]
            dh, dw = (b.dilation[0] if kh > 1 else DH) // DH, (b.dilation[1] if kw > 1 else DW) // DW
            weight[:, :, oh: oh + (kh - 1) * dh + 1: dh, ow: ow + (kw - 1) * dw + 1: dw] += b.weight
            bias += b.bias
        if not ctx.allow_rewrite():
            return "rewrite limit reached (bisection)"
        return weight, bias, list(stride), [PH, PW], [DH, DW], groups
