"""Deleting the channels of a branch product on their own (the ``slice`` pass's *product units*).

In the paper's Eq.(3) block, z = a * b with a = conv1x1_a(u) and b = dw3x3(u) (output j of the
depthwise conv reads u_{j // k}): the symmetry analysis ties z, a and b to the stream u (DESIGN.md §3:
a permutation of u must permute b, hence a and z, alike), so the stream's unit deletes z's channels
only k at a time, together with a stream channel, which every later block also reads. Deleting is not
a group action, though, and asks less. Channel j of z is zero as soon as channel j of one factor is,
and nothing but z's readers sees it, so z_j can go alone:

    row j (and bias j) of each factor's writer -- a conv with one group or a linear: its output row j;
                                                  a per-channel conv (groups = C_in): its output j,
                                                  which reads input j // k (the input stays whole),
    entry j of the per-channel constants on a factor's way to the product (a * s + t),
    column j of every reader of z (convs and linears),

and no channel of u. This is monomial-compatible (no rotation: z's group is monomial), so its channels
are ranked by what the readers receive, E[z_j^2] |W_reader[:, j]|^2, and the readers are refitted like
any others. Base index j of a product unit names z_j and the factors' channels j.

Which products: z = mul(a, b) of two values (kind "product" in the analysis) whose readers are all
convs/linears with stored weights, and each factor reaches the product through a chain of single-use
values: per-channel constant ops (mul/add a stored vector), elementwise activations, down to its writer
(a one-group conv or linear, or a per-channel conv, with stored weight and bias). At least one factor's
chain has no activation, so zeroing its writer's row j and constants j makes z_j exactly zero (what
the trial deletion computes: :class:`~qlfx.symmetry.slicing.TrialDeletion` zeroes the rows). Products
a unit already deletes channel by channel (z is the base of its tied unit, e.g. the PDEBlock's hidden
product, whose halves are slices of one conv) get none.

**Physical form of a per-channel conv losing outputs.** With G = C_in groups and k outputs per group,
output o reads input o // k. Keeping the outputs K: when every group keeps the same number k' >= 1,
the conv keeps its G groups and weight rows K; otherwise it reads x[:, K // k] (``aten.index_select``)
with |K| groups, one output each -- the same sums, 9 |K| MACs per pixel for a 3x3 kernel instead of
9 k C_in. Another unit (the stream's) may already have deleted some of the same channels; deletions
are applied in unit order and each maps its own channels onto what is left (``survivors``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.symmetry.slicing import Unit, linear_view

__all__ = ["product_units", "current_positions", "shrink_per_channel_conv"]

aten = torch.ops.aten


def _stored(arg) -> bool:
    return arg is None or ir.is_constant(arg)


def _per_channel_args(gm: fx.GraphModule, node: fx.Node) -> list[int]:
    """Indices of ``node``'s arguments that are stored tensors with one entry per channel of ``node``."""
    found = []
    for i, arg in enumerate(node.args):
        if ir.is_constant(arg):
            t = ir.get_tensor(gm, arg)
            axis = t.dim() - (len(ir.shape(node)) - 1)
            if axis >= 0 and t.shape[axis] == ir.channels(node):
                found.append(i)
    return found


def _factor_chain(gm: fx.GraphModule, report, value: fx.Node, unit: Unit) -> tuple[bool, str | None]:
    """Walk from a factor of the product to its writer, filling ``unit``; (zero-preserving, reason)."""
    exact = True
    node = value
    while True:
        if len(node.users) != 1:
            return exact, f"{node.name} is also read outside the product"
        unit.base_of[node.name] = torch.arange(ir.channels(node))
        kind = report.node_kinds.get(node.name)
        if kind in ("mul-constant", "add-constant"):
            constants = _per_channel_args(gm, node)
            values = [a for a in node.args if isinstance(a, fx.Node) and not ir.is_constant(a)]
            if len(values) != 1 or not constants:
                return exact, f"{node.name}: a constant operand this pass cannot slice"
            unit.constants += [(node, i) for i in constants]
            node = values[0]
            continue
        if kind == "activation":  # elementwise, channel-count agnostic; f(0) may not be 0
            exact = False
            node = node.args[0]
            continue
        view = linear_view(node)
        if view is None or not (ir.is_constant(view.weight) and _stored(view.bias)):
            return exact, f"{ir.describe(node)} writes a factor and is not a conv/linear with a stored weight"
        conv = ir.ConvCall.of(node)
        if kind == "linear" and (conv is None or conv.groups == 1):
            unit.writers.append(node)
            return exact, None
        if kind in ("depthwise", "shared-depthwise") and conv.groups == ir.channels(conv.input):
            unit.regrouped.append(node)
            return exact, None
        return exact, f"{ir.describe(node)} writes a factor and is neither one-group nor per-channel"


def _plan_product(gm: fx.GraphModule, report, product: fx.Node, uid: int) -> tuple[Unit | None, str | None]:
    space = report.spaces[report.spaces_of(product.name)[0]]
    unit = Unit(uid, [(space, 1)], ir.channels(product))
    unit.product = product.name
    a, b = product.args[:2]
    if a is b:
        return None, "a square"
    unit.base_of[product.name] = torch.arange(unit.size)
    exact = []
    for factor in (a, b):
        zero, why = _factor_chain(gm, report, factor, unit)
        if why is not None:
            return None, why
        exact.append(zero)
    if not any(exact):
        return None, "both factors pass through an activation (deleting a row need not zero the product)"
    for user in product.users:
        view = linear_view(user)
        if user.op == "output":
            return None, "a network output"
        if report.node_kinds.get(user.name) != "linear" or view is None or view.input is not product:
            return None, f"{ir.describe(user)} reads the product and cannot lose input channels"
        if not (ir.is_constant(view.weight) and _stored(view.bias)):
            return None, f"{user.name}: its weight is computed in the graph"
        unit.readers.append(user)
    return unit, None


def product_units(gm: fx.GraphModule, report, covered: set[str],
                  first_id: int) -> tuple[list[Unit], list[tuple[str, str]]]:
    """(product units, [(site, why not)]) for the graph's products whose channels no unit in ``covered``
    (names of values some sliceable unit deletes one channel at a time) deletes one by one. Ids count
    up from ``first_id``."""
    found, skipped = [], []
    for node in gm.graph.nodes:
        if report.node_kinds.get(node.name) != "product" or node.name in covered:
            continue
        if len(report.spaces_of(node.name)) != 1:
            continue  # a product of pieces of wider values: the analysis gives it several spaces
        unit, why = _plan_product(gm, report, node, first_id + len(found))
        if unit is None:
            skipped.append((node.name, why))
        else:
            found.append(unit)
    return found, skipped


def current_positions(unit: Unit, name: str, survivors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in the value's CURRENT channel axis that ``unit`` keeps, the original channels they
    hold): ``survivors[name]`` lists the original channels earlier deletions left (all when absent).
    At least one position stays while any is left."""
    base = unit.base_of[name]
    current = survivors.get(name, torch.arange(len(base)))
    kept = ~torch.isin(base[current], unit.order[unit.keep:])
    if not bool(kept.any()) and len(current):
        # every channel this unit keeps went with another unit's deletion: keep one it dropped (its weights
        # are zeroed already, so it computes 0 as in the trial) rather than a conv with no channels
        kept[0] = True
    return torch.nonzero(kept).flatten(), current[kept]


def shrink_per_channel_conv(gm: fx.GraphModule, node: fx.Node, kept: torch.Tensor) -> None:
    """Keep outputs ``kept`` (current positions) of a per-channel conv whose input keeps all its
    channels: same groups when every group keeps the same number, else a gather of the inputs the kept
    outputs read and one group per output (module docstring)."""
    conv = ir.ConvCall.of(node)
    weight = ir.get_tensor(gm, conv.weight).detach()
    bias = None if conv.bias is None else ir.get_tensor(gm, conv.bias).detach()
    per_group = weight.shape[0] // conv.groups
    source = torch.div(kept, per_group, rounding_mode="floor")
    counts = torch.bincount(source, minlength=conv.groups)
    with gm.graph.inserting_before(node):
        w = ir.constant_node(gm, weight[kept].contiguous(), f"{node.name}_weight_sliced")
        b = None if bias is None else ir.constant_node(gm, bias[kept].contiguous(), f"{node.name}_bias_sliced")
        if bool((counts == counts[0]).all()) and int(counts[0]) > 0:
            conv.set_args(weight=w, bias=b)
            return
        index = ir.constant_node(gm, source.to(torch.long), f"{node.name}_sources")
        gathered = ir.call(gm, aten.index_select.default, (conv.input, 1, index), like=node)
    conv.set_args(input=gathered, weight=w, bias=b, groups=int(kept.numel()))
