"""Apply group elements of the channel spaces to the weights, so that every output is unchanged.

Each space gets an element M (a matrix, or a :class:`~qlfx.symmetry.groups.Monomial`); a channel axis
made of segments gets the block-diagonal of ``kron(M_space, I_mult)`` over its segments. With x' = M_x x
on every value, the rewrites are:

- linear op ``y = W x + c`` (``aten.conv2d`` groups=1, ``aten.linear``): ``W' = M_y W M_x^-1`` (on the two channel dims of
  the kernel, every spatial tap alike), ``c' = M_y c``.
- depthwise / grouped conv with monomial elements ``(M x)_i = d_i x[perm(i)]``:
  ``W'[o, l] = d_y[o] W[perm_y(o), l0] / d_x[i']`` where i' is the l-th input of o's group and
  l0 the local index of perm_x(i') -- refused when the permutations do not map groups onto groups.
  A depthwise conv whose kernel is shared by all channels, with ``M_y = kron(M_x, I_k)`` (the analysis
  links them so): the kernel is unchanged (it stays shared, a ``repeat`` stays a ``repeat``);
  only the bias becomes ``M_y c``.
- eval batchnorm ``y = s x + t`` with ``M_x = D_x P``, ``M_y = D_y P``:
  ``var' = P var``, ``mean' = D_x P mean``, ``gamma' = D_y D_x^-1 P gamma``, ``beta' = D_y P beta``
  (so ``s' = D_y D_x^-1 P s``, ``t' = D_y P t``).
- adding a per-channel constant: ``c' = M_y c`` (along the constant's channel axis);
  multiplying by one: ``s' = D_y D_x^-1 P s``.
- product ``z = a * b``: nothing to rewrite; the elements must satisfy ``P_a = P_b = P_z`` and
  ``D_z = D_a D_b`` (checked).
- everything else (activations, pools, slices, cat, scaling by an invariant such as a hand-written
  hardball's ``r / max(|x|, r)``): nothing to rewrite; they commute with the elements of their space's
  group.

All arithmetic is float64; results are cast back to each weight's dtype. Rewritten weights become new
constants (a constant read by several nodes is never changed under the others' feet); the rewritten
node's arguments are set by schema name (:func:`qlfx.ir.set_op_args`).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qlfx import ir

from .groups import Element, Monomial, as_element, block_diag, element_equal, inverse, kron_identity, to_dense
from .spaces import ChannelSpace, SymmetryReport, analyze

__all__ = ["apply_element", "apply_elements", "site_element", "SymmetryActionError"]


class SymmetryActionError(ValueError):
    """The elements cannot be applied to this graph as asked (says which node and why)."""


def site_element(report: SymmetryReport, elements: dict[int, Element], node: str) -> Element | None:
    """The element acting on the channel axis of ``node``'s value (None: the node has no channel axis)."""
    segs = report.node_segments.get(node)
    if not segs:
        return None
    return block_diag([kron_identity(as_element(elements[sid]), mult) for _, _, sid, mult in segs])


def _is_identity(e: Element | None) -> bool:
    if e is None:
        return True
    if isinstance(e, Monomial):
        return e.is_identity()
    return bool(torch.equal(e, torch.eye(e.shape[0], dtype=e.dtype)))


def _monomial(e: Element) -> Monomial | None:
    if isinstance(e, Monomial):
        return e
    m = as_element(e)
    return m if isinstance(m, Monomial) else None


def _apply_left(e: Element, t: torch.Tensor, axis: int) -> torch.Tensor:
    """M applied along ``axis`` of t (float64)."""
    t = t.movedim(axis, 0)
    if isinstance(e, Monomial):
        out = e.scale.view(-1, *([1] * (t.dim() - 1))) * t[e.perm]
    else:
        out = (e @ t.reshape(t.shape[0], -1)).reshape(t.shape)
    return out.movedim(0, axis)


def _transform_linear_weight(w: torch.Tensor, mx: Element, my: Element, groups: int, node: str) -> torch.Tensor:
    """W' = M_y W M_x^-1 for a (grouped) conv / linear weight [Cout, Cin/groups, *k] in float64."""
    w = w.double()
    cout, cin_g = w.shape[0], w.shape[1]
    mxm, mym = _monomial(mx), _monomial(my)
    if mxm is not None and mym is not None:
        cout_g = cout // groups
        o = torch.arange(cout)
        o0 = mym.perm
        group_new, group_old = o // cout_g, o0 // cout_g
        i_new = group_new[:, None] * cin_g + torch.arange(cin_g)[None, :]
        i0 = mxm.perm[i_new]
        if groups > 1 and not bool((i0 // cin_g == group_old[:, None]).all()):
            raise SymmetryActionError(
                f"{node}: the permutations do not map the conv's channel groups onto groups "
                f"(groups={groups}); this element is not a symmetry of a grouped conv")
        extra = (None,) * (w.dim() - 2)
        return mym.scale[(slice(None), None) + extra] * w[o0[:, None], i0 % cin_g] / mxm.scale[i_new][(...,) + extra]
    if groups != 1:
        raise SymmetryActionError(f"{node}: a grouped conv (groups={groups}) needs monomial elements "
                                  f"(permutation x diagonal) on its input and output; got a dense matrix")
    my_d, mx_inv = to_dense(my), to_dense(inverse(mx))
    return torch.einsum("oa,ab...,bi->oi...", my_d, w, mx_inv) if w.dim() > 2 else my_d @ w @ mx_inv


def _new_const(gm, before: fx.Node, value: torch.Tensor, like: torch.Tensor, hint: str) -> fx.Node:
    with gm.graph.inserting_before(before):
        return ir.constant_node(gm, value.to(like.dtype), hint)


def apply_elements(gm: fx.GraphModule, elements: dict, report: SymmetryReport | None = None,
                   check: bool = True) -> list[str]:
    """Rewrite ``gm``'s weights in place by the given group elements (keys: space id, ChannelSpace or
    node name; values: Monomial, diagonal (1-D) or matrix). Unspecified spaces get the identity, derived
    product spaces get D_a D_b. With ``check`` (default) every element must be in its space's group and
    ties/products must hold, so outputs are unchanged; ``check=False`` applies them anyway (for
    experiments: outputs then change). Returns the names of the rewritten nodes."""
    report = report if report is not None else analyze(gm)
    full = report.complete_elements(elements, check=check)
    cache: dict[str, Element | None] = {}

    def el(node) -> Element | None:
        name = node if isinstance(node, str) else node.name if isinstance(node, fx.Node) else None
        if name is None:
            return None
        if name not in cache:
            cache[name] = site_element(report, full, name)
        return cache[name]

    rewritten = []
    for node in list(gm.graph.nodes):
        kind = report.node_kinds.get(node.name)
        if kind is None:
            continue
        if kind == "linear":
            changed = _rewrite_linear(gm, node, el)
        elif kind in ("depthwise", "shared-depthwise"):
            changed = _rewrite_depthwise(gm, node, el, shared=kind == "shared-depthwise", check=check)
        elif kind == "batch_norm":
            changed = _rewrite_batch_norm(gm, node, el)
        elif kind == "add-constant":
            changed = _rewrite_add_constant(gm, node, el)
        elif kind == "mul-constant":
            changed = _rewrite_mul_constant(gm, node, el)
        elif kind == "branch_product":
            changed = _rewrite_branch_product(gm, node, el, report, check)
        else:
            changed = False
        if changed:
            rewritten.append(node.name)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return rewritten


def apply_element(gm: fx.GraphModule, space, element, report: SymmetryReport | None = None,
                  check: bool = True) -> list[str]:
    """:func:`apply_elements` with one space (id / ChannelSpace / node name) and its element."""
    report = report if report is not None else analyze(gm)
    key = space.id if isinstance(space, ChannelSpace) else space
    return apply_elements(gm, {key: element}, report, check)


# --------------------------------------------------------------------------------------- per op
def _rewrite_linear(gm, node, el) -> bool:
    view = ir.ConvCall.of(node) or ir.LinearCall.of(node)
    groups = view.groups if isinstance(view, ir.ConvCall) else 1
    mx, my = el(view.input), el(node)
    if _is_identity(mx) and _is_identity(my):
        return False
    mx = mx if mx is not None else Monomial.identity(ir.shape(view.input)[1])
    my = my if my is not None else Monomial.identity(ir.shape(node)[1])
    w = ir.get_tensor(gm, view.weight)
    new_w = _new_const(gm, node, _transform_linear_weight(w, mx, my, groups, node.name), w, f"{node.name}_weight_sym")
    new_b = None
    if view.bias is not None:
        b = ir.get_tensor(gm, view.bias)
        new_b = _new_const(gm, node, _apply_left(my, b.double(), 0), b, f"{node.name}_bias_sym")
    view.set_args(weight=new_w, bias=new_b)
    return True


def _rewrite_depthwise(gm, node, el, shared: bool, check: bool) -> bool:
    conv = ir.ConvCall.of(node)
    mx, my = el(conv.input), el(node)
    if _is_identity(mx) and _is_identity(my):
        return False
    cin, cout = ir.shape(conv.input)[1], ir.shape(node)[1]
    k = cout // cin
    if shared and element_equal(my, kron_identity(mx, k)):
        # P (x) I_k commutes with the shared kernel: only the bias moves
        if conv.bias is not None:
            b = ir.get_tensor(gm, conv.bias)
            conv.set_args(bias=_new_const(gm, node, _apply_left(my, b.double(), 0), b, f"{node.name}_bias_sym"))
            return True
        return False
    if conv.weight.op != "get_attr":
        raise SymmetryActionError(f"{node.name}: the shared depthwise kernel is computed in the graph "
                                  f"({conv.weight.name}); only elements acting as P (x) I_k can be applied")
    w = ir.get_tensor(gm, conv.weight)
    new_w = _transform_linear_weight(w, mx, my, conv.groups, node.name)
    changes = {"weight": _new_const(gm, node, new_w, w, f"{node.name}_weight_sym")}
    if conv.bias is not None:
        b = ir.get_tensor(gm, conv.bias)
        changes["bias"] = _new_const(gm, node, _apply_left(my, b.double(), 0), b, f"{node.name}_bias_sym")
    conv.set_args(**changes)
    return True


def _rewrite_batch_norm(gm, node, el) -> bool:
    bn = ir.BatchNormCall.of(node)
    mx, my = el(bn.input), el(node)
    if _is_identity(mx) and _is_identity(my):
        return False
    mx, my = _monomial(mx), _monomial(my)
    if mx is None or my is None or not bool((mx.perm == my.perm).all()):
        raise SymmetryActionError(f"{node.name}: a batchnorm needs monomial elements with the same permutation "
                                  f"on its input and output")
    perm, dx, dy = mx.perm, mx.scale, my.scale
    gm_t = lambda a: ir.get_tensor(gm, a)  # noqa: E731
    mean, var = gm_t(bn.running_mean), gm_t(bn.running_var)
    ratio = dy / dx
    if bn.weight is None and not bool((ratio == 1).all()):
        raise SymmetryActionError(f"{node.name}: an affine-less batchnorm cannot absorb a scaling; fold it first")
    new = {
        "running_mean": _new_const(gm, node, dx * mean.double()[perm], mean, f"{node.name}_mean_sym"),
        "running_var": _new_const(gm, node, var.double()[perm], var, f"{node.name}_var_sym"),
    }
    if bn.weight is not None:
        g = gm_t(bn.weight)
        new["weight"] = _new_const(gm, node, ratio * g.double()[perm], g, f"{node.name}_gamma_sym")
    if bn.bias is not None:
        b = gm_t(bn.bias)
        new["bias"] = _new_const(gm, node, dy * b.double()[perm], b, f"{node.name}_beta_sym")
    ir.set_op_args(node, **new)
    return True


def _const_axis(t: torch.Tensor, node: fx.Node) -> int:
    return t.dim() - (len(ir.shape(node)) - 1)


def _rewrite_add_constant(gm, node, el) -> bool:
    my = el(node)
    if _is_identity(my):
        return False
    args = list(node.args)
    changed = False
    for i, a in enumerate(args[:2]):
        if ir.is_constant(a):
            t = ir.get_tensor(gm, a)
            axis = _const_axis(t, node)
            args[i] = _new_const(gm, node, _apply_left(my, t.double(), axis), t, f"{node.name}_const_sym")
            changed = True
    node.args = tuple(args)
    return changed


def _rewrite_mul_constant(gm, node, el) -> bool:
    a, b = node.args[:2]
    x, c = (a, b) if not ir.is_constant(a) else (b, a)
    mx, my = el(x), el(node)
    if _is_identity(mx) and _is_identity(my):
        return False
    mx, my = _monomial(mx), _monomial(my)
    if mx is None or my is None or not bool((mx.perm == my.perm).all()):
        raise SymmetryActionError(f"{node.name}: a per-channel multiply needs monomial elements with the same "
                                  f"permutation on its input and output")
    t = ir.get_tensor(gm, c)
    axis = _const_axis(t, node)
    new = _apply_left(Monomial(mx.perm, my.scale / mx.scale), t.double(), axis)
    const = _new_const(gm, node, new, t, f"{node.name}_const_sym")
    ir.set_op_args(node, **({"other": const} if x is a else {"self": const}))
    return True


def _rewrite_branch_product(gm, node, el, report, check: bool) -> bool:
    """qlfx::branch_product(x, w_a, c_a, w_b, c_b, ...) = conv_a(x) * conv_b(x): each branch is rewritten
    like the conv it stands for, with its virtual value ``<node>.a`` / ``<node>.b`` as output."""
    args = ir.op_args(node)
    x = args["x"]
    mx, ma, mb = el(x), el(f"{node.name}.a"), el(f"{node.name}.b")
    if all(_is_identity(e) for e in (mx, ma, mb)):
        return False
    cin = ir.shape(x)[1]
    mx = mx if mx is not None else Monomial.identity(cin)
    changes = {}
    for branch, m_out in (("a", ma), ("b", mb)):
        w_node, b_node = args[f"weight_{branch}"], args[f"bias_{branch}"]
        groups = 1 if branch == "a" else int(args["groups_b"])
        kind = report.node_kinds.get(f"{node.name}.{branch}", "linear")
        w = ir.get_tensor(gm, w_node)
        keep_kernel = kind == "shared-depthwise" and element_equal(m_out, kron_identity(mx, w.shape[0] // cin))
        if not keep_kernel:
            new_w = _transform_linear_weight(w, mx, m_out, groups, f"{node.name} branch {branch}")
            changes[f"weight_{branch}"] = _new_const(gm, node, new_w, w, f"{node.name}_weight_{branch}_sym")
        if b_node is not None:
            b = ir.get_tensor(gm, b_node)
            changes[f"bias_{branch}"] = _new_const(gm, node, _apply_left(m_out, b.double(), 0), b,
                                                   f"{node.name}_bias_{branch}_sym")
    ir.set_op_args(node, **changes)
    return True
