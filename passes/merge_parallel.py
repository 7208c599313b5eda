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

Then ``W = sum_b embed(W_b)``, ``c = sum_b c_b`` (float64, rounded once). Terms on other inputs stay
separate terms of the sum. Contract: equivalent (the sum is re-associated, so float rounding differs).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass


@dataclass
class Branch:
    """One term of the sum, as a conv on ``input``: weight/bias (float64) and its geometry."""

    term: fx.Node          # the node whose value is the term
    input: fx.Node
    weight: torch.Tensor   # [Cout, Cin/groups, kh, kw]
    bias: torch.Tensor     # [Cout]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int | None     # None: identity (adapts to the others' groups)
    consumed: tuple[fx.Node, ...]  # nodes that become dead when the term is merged


def _bn_scale_shift(gm, bn_node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    from qlfx.passes.fold_bn import BatchNormCall

    bn = BatchNormCall.of(bn_node)
    if bn is None or bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    if not all(a is None or a.op == "get_attr" for a in (bn.running_mean, bn.running_var, bn.weight, bn.bias)):
        return None
    return bn.scale_shift(gm)


def _private(gm, node: fx.Node, arg) -> bool:
    """``arg`` is None or a stored constant read by ``node`` only."""
    if arg is None:
        return True
    return arg.op == "get_attr" and all(u is node for u in ir.attr_users(gm, arg.target))


def _conv_branch(gm, term: fx.Node, conv_node: fx.Node, scale_shift, consumed) -> Branch | str:
    conv = ir.ConvCall.of(conv_node)
    if isinstance(conv.padding, str):
        return f"{conv_node.name} uses padding='{conv.padding}'"
    if conv.weight.op != "get_attr" or (conv.bias is not None and conv.bias.op != "get_attr"):
        return f"{conv_node.name}'s weights are computed in the graph"
    w = ir.get_tensor(gm, conv.weight).double()
    b = ir.get_tensor(gm, conv.bias).double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if scale_shift is not None:
        s, t = scale_shift
        w, b = w * s.view(-1, 1, 1, 1), b * s + t
    return Branch(term, conv.input, w, b, conv.stride, tuple(conv.padding), conv.dilation, conv.groups, consumed)


def _as_branch(gm, term: fx.Node, sum_nodes: set[fx.Node]) -> Branch | str | None:
    """The term as a conv branch; None when it is not a conv (maybe an identity, decided later); a
    string saying why a conv term cannot be used."""
    only_sum = lambda n: len(n.users) == 1 and next(iter(n.users)) in sum_nodes  # noqa: E731
    if ir.ConvCall.of(term) is not None:
        if not only_sum(term):
            return f"{term.name} is also used outside the sum"
        return _conv_branch(gm, term, term, None, (term,))
    if term.op == "call_function" and term.target is F.batch_norm and isinstance(term.args[0], fx.Node):
        inner = term.args[0]
        if ir.ConvCall.of(inner) is not None:
            if not only_sum(term) or len(inner.users) != 1:
                return f"{term.name} or its conv {inner.name} is also used outside the sum"
            ss = _bn_scale_shift(gm, term)
            if ss is None:
                return f"{term.name} is not an eval-mode batchnorm with stored statistics"
            return _conv_branch(gm, term, inner, ss, (term, inner))
    return None


def _identity_branch(gm, term: fx.Node, x: fx.Node, channels: int) -> Branch | None:
    """``x`` or ``BN(x)`` as a 1x1 conv (groups decided at merge time)."""
    if term is x:
        s, t = torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
        consumed = ()
    elif (term.op == "call_function" and term.target is F.batch_norm and term.args[0] is x
          and len(term.users) == 1):
        ss = _bn_scale_shift(gm, term)
        if ss is None:
            return None
        s, t = ss
        consumed = (term,)
    else:
        return None
    # Stored as the diagonal; expanded to a kernel once groups are known.
    return Branch(term, x, s, t, (1, 1), (0, 0), (1, 1), None, consumed)


def _flatten_sum(root: fx.Node) -> tuple[list[fx.Node], set[fx.Node]] | None:
    """Terms of the tree of binary tensor adds under ``root`` (inner adds used only inside the tree)."""
    terms, adds = [], set()

    def visit(n: fx.Node, is_root: bool) -> bool:
        if not (n.op == "call_function" and n.target in (operator.add, torch.add) and not n.kwargs
                and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args)):
            return False
        if not is_root and len(n.users) != 1:
            return False
        adds.add(n)
        for a in n.args:
            if not visit(a, False):
                terms.append(a)
        return True

    if not visit(root, True):
        return None
    return terms, adds


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


@register_pass
class MergeParallel(Pass):
    name = "merge-parallel"
    description = "merge summed parallel conv branches on one input (RepVGG/MobileOne/DBB: 3x3 + 1x1 + identity) into one conv"
    contract = "equivalent"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
        inner_of_other_sum: set[fx.Node] = set()
        for root in reversed(adds):  # roots come after their inner adds; visit roots first
            if root in inner_of_other_sum or root.graph is not gm.graph:
                continue
            flat = _flatten_sum(root)
            if flat is None:
                continue
            terms, sum_nodes = flat
            inner_of_other_sum |= sum_nodes - {root}
            why = self._merge_sum(gm, root, terms, sum_nodes, ctx, result)
            if why:
                result.skipped.append(Skip(root.name, why))
        if result.changed:
            gm.graph.eliminate_dead_code()
        return result

    def _merge_sum(self, gm, root, terms, sum_nodes, ctx, result) -> str | None:
        out_shape = ir.shape(root)
        if out_shape is None or len(out_shape) != 4:
            return None  # not a feature-map sum: nothing to say
        if any(ir.shape(t) != out_shape for t in terms):
            return "terms broadcast (shapes differ)"
        convs, others, reasons = [], [], []
        for t in terms:
            br = _as_branch(gm, t, sum_nodes)
            if isinstance(br, Branch):
                convs.append(br)
            else:
                if isinstance(br, str):
                    reasons.append(br)
                others.append(t)
        if not convs:
            return None  # no conv term: not a parallel-branch sum
        # Group conv branches by input; identities join the group reading their tensor.
        groups: dict[fx.Node, list[Branch]] = {}
        for br in convs:
            groups.setdefault(br.input, []).append(br)
        leftover = []
        for t in others:
            placed = False
            for x, brs in groups.items():
                ident = _identity_branch(gm, t, x, out_shape[1])
                if ident is not None:
                    brs.append(ident)
                    placed = True
                    break
            if not placed:
                leftover.append(t)
        merged_any = False
        for x, brs in groups.items():
            if len(brs) < 2:
                # a lone conv on this input; put its term back
                leftover.extend(b.term for b in brs)
                continue
            merged = self._merge_group(gm, root, x, brs, out_shape, ctx)
            if isinstance(merged, str):
                reasons.append(merged)
                leftover.extend(b.term for b in brs)
                continue
            merged_any = True
            leftover.insert(0, merged)
            result.rewrites.append(f"{root.name}: {' + '.join(b.term.name for b in brs)} -> {merged.name}")
        if not merged_any:
            # No two branches on one input: not a parallel-branch sum (a plain residual add), nothing to say.
            return "; ".join(reasons) if reasons else None
        # Rebuild the sum from the merged conv(s) and the remaining terms.
        new_root = leftover[0]
        with gm.graph.inserting_before(root):
            for t in leftover[1:]:
                new_root = gm.graph.call_function(operator.add, (new_root, t))
        ir.replace_value(root, new_root)
        result.changed = True
        return None

    def _merge_group(self, gm, root, x: fx.Node, brs: list[Branch], out_shape, ctx):
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
        dtype = next(t.meta["tensor_meta"].dtype for t in [root] if "tensor_meta" in t.meta)
        with gm.graph.inserting_before(root):
            w_node = ir.constant_node(gm, weight.to(dtype), f"{root.name}_merged_weight")
            b_node = ir.constant_node(gm, bias.to(dtype), f"{root.name}_merged_bias")
            conv = gm.graph.create_node("call_function", ir.CONV2D,
                                        (x, w_node, b_node, stride, (PH, PW), (DH, DW), groups),
                                        name=f"{root.name}_merged")
        return conv
