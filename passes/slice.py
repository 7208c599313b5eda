"""slice: rotate channel spaces to the principal axes of their activations, then delete the
least-used directions, within an output-error or accuracy budget on calibration data (lossy).

Let S be a channel space (DESIGN.md §3) of C channels and x in R^C its channel vector at a pixel. Over
the calibration inputs, every pixel of every value of S (the writers' outputs, the residual sums, the
activations' outputs, ...) gives a sample; their second-moment matrix is

    M = sum over the values v of S of E_pixels[x_v x_v^T]   (uncentred: a mean cannot be moved out of
                                                             a stream through a radial activation)

**method="pca"** on a space whose group contains O(C) (O or GL): take M = U diag(lambda) U^T with
lambda descending and apply the group element P = U^T (exact: writers W -> P W, readers W -> W P^T).
Channel i now carries the i-th principal component, whose energy is lambda_i, and deleting the last
C - k channels removes the k-dimensional projection error sum_{i>k} lambda_i -- the least any
deletion of C - k directions can. On spaces whose group has no rotations (monomial, permutation, ...)
nothing can be rotated: "pca" then ranks the channels by what their readers receive (below).

**method="magnitude"** (the baseline): no rotation; channels ranked by the L2 norm of the weights
that write them (the rows of every writer conv/linear) -- plain norm-based channel pruning.

Deleting channel c of S: remove row c (and bias c) of every ``aten.conv2d`` / ``aten.linear`` writing
S, column c of every one reading S, entry c of per-channel constants added to or multiplied into S.
Values of S then lose channel c everywhere; the ops inside S (add, activations, pools, spatial means)
are channel-count agnostic, except two that carry the count: an ``aten.view`` / ``reshape`` (a flatten
to [N, C*H*W]) gets its size rewritten, and a radial activation (``qlfx::hardball`` / ``softball``)
whose radius is None (sqrt(C)) gets the ORIGINAL sqrt(C) as its radius, so the function stays close.
The search simulates a deletion exactly by zeroing the writers' rows (a zero channel stays zero through
every op of S and adds nothing to the radial norm), which keeps the graph's shapes while it tries
candidates.

Compensation in the readers (both methods; readers that are a linear or a pointwise conv -- with a
spatial kernel zero padding makes the border differ). Each reader is fitted to reproduce its
REFERENCE output y = W x + b (x: its input in the rotated, unsliced graph) from what it receives in
the sliced graph, x' (the kept channels K, with every deletion so far upstream):

    [W'_K, b'] = argmin E||W'_K x'_K + b' - (W x + b)||^2 = [W, b] E[x~ x~'_K~^T] E[x~'_K~ x~'_K~^T]^-1

with x~ = [x; 1], K~ = K + the bias entry, expectations over calibration samples and the pixels the
reader reads (channel-pruning "reconstruction"; it contains the mean rule and lets kept channels
stand in for correlated deleted ones). ``compensate="refit"`` (the default) re-measures the moments
on the current sliced graph after every accepted deletion step, so later refits also correct the
drift of earlier deletions (a step is kept only if it still fits the budget after the refit; a chosen
step that breaks a budget as first measured is measured again with the readers refitted to it, and
taken if it fits then -- the refit, not the deletion, was the limit: stats ``rescued``; if not, the
same unit's move is tried with half as many channels, down to one, before the unit is retired or, for
the accuracy budget, the path ends there);
``"refit-once"`` uses the unsliced statistics (x' = x) throughout; ``"mean"`` only feeds the deleted
channels' reference means through the bias, b' = b + W[:, D] E[x_D]; ``false`` deletes only. The
statistics, rotations and refits live in :mod:`qlfx.symmetry.slicing`; calibration sets of any size
run in chunks of the example's batch on a graph that specialises it (see there).

Which channels are deleted together (a *unit*): an untied space is its own unit. Spaces whose
permutations are tied by per-channel ops and products form one unit -- in a PDEBlock the hidden halves
z1, z2 (two ``aten.slice`` of conv1's output), their product p and the depthwise output y: deleting
base index j removes conv1's rows j and W + j, p_j, the depthwise conv's outputs j*k..j*k+k-1 (its
groups shrink by one) and those columns of conv3; in the paper's Eq.(3) layout the stream, conv_a's
output and the product are tied through the shared 3x3 kernel. Tied units have no rotation (their group
is monomial at most), so "pca" ranks their base channels by what their readers receive,
E[x_c^2] * |W_reader[:, c]|^2. A unit is sliced only when every op in it is one of: conv/linear (rows,
columns, or both), per-channel conv with one group per channel, channel slice, product, add, an
elementwise activation, pool, spatial reduction, view/reshape, radial activation, a per-channel
constant; its values are read only by those and by convs/linears. The network's input and output are
never sliced, nor a fused ``qlfx::branch_product`` (run slice before fuse-product). Skipped units are
reported with the reason.

**Product units** (``products=true``, the default; :mod:`qlfx.symmetry.product_slicing`): a product
z = a * b whose unit deletes its channels only several at a time with a stream's (Eq.(3): z_j, for
j = 4s..4s+3, goes with stream channel s, which every later block reads) also gets a unit of its own:
z_j is zero as soon as one factor's channel j is, so deleting z_j alone removes row j of each factor's
writer (conv_a's row; the depthwise conv's output j, which then reads a gather of the stream), the
per-channel constants' entries j on the factors' way and column j of z's readers, and no stream channel.
Monomial-compatible, no rotation; ranked like tied units. Both units may delete channels of the same
values: the trial zeroes both, a reader of both is refitted to what both keep, and physically the
stream's unit goes first and the product unit's channels are mapped onto what it left.

How many to delete: greedy, under one or both budgets --
``budget`` (relative output error: max over input sets and outputs of max|new - ref| / max|ref| on
the calibration inputs + ``random_inputs`` seeded random inputs, the pass manager's check for lossy
passes) and ``accuracy_drop`` (percentage points of top-1 accuracy of the first output on the
labelled calibration samples: ``qlfx.compile(..., calibration=x, labels=y)``, negative labels mark
unlabelled samples; the pass manager checks it on the same data). With neither, budget=0.01. Each
round tries deleting the next ``step`` channels (``max(1, round(C * granularity))``) of each unit
and takes the move with the most MACs saved per unit of score increase among those that keep the
output budget (a unit whose next move breaks it is retired). MACs saved are predicted by
:class:`qlfx.symmetry.slice_cost.CostModel` (kept fractions of every conv's rows and columns), which
counts a conv + pointwise pair -- a split made by ``factor`` -- at what it costs after
``merge-pointwise``: deleting its inner channels saves nothing above the break-even width, so such a
unit's moves are credited with its average saving on the way down, and where the search stops with
one still above break-even (the deletions would be merged back), it gives that unit its channels back
-- they only cost error -- and goes on with the budget they held (stats ``undone``). The path is thus
chosen without labels; the accuracy budget stops the search at the first chosen move that breaks it
(continuing with other moves that happen to keep the accuracy fits the search to the labelled samples:
measured on the digits example, 0.4 points lost on them but 1.3 on unseen images). It stops when no
move fits. The searches live in :mod:`qlfx.symmetry.slice_search`. The
score (``score="mean"``, the default) is the mean over outputs of ||new - ref||^2 / ||ref||^2 on those
inputs: the max error is set by one worst pixel of one input, so ranking moves by it is noisy and the
search was not monotone in the budget; the mean squared error sees every sample, and unlike the
accuracy it is smooth. ``score="max"`` ranks by the output budget's error itself; ``score="kl"`` by the
mean KL divergence of the first output's softmax from the reference's (a classifier's logits: it weighs
changes near the decision boundary, where top-1 accuracy is lost; other outputs count as for "mean").
An accuracy budget is only as good as its labelled data: use samples the model was not trained on. ``target_macs=N`` also
stops the search once the graph needs at most N MACs (as :func:`qlfx.debug.count_macs` counts them: at
the example's batch size), e.g. with a budget that never binds (accuracy_drop=100): pruning to a given
cost. ``keep={unit id: count}`` (or ``"id:n/id:n"``) skips the search and keeps exactly that many
channels per unit (to compare methods at equal FLOPs; the refit then runs twice). Stats: per unit the
channels kept, MACs before/after (count_macs), ``macs_predicted`` (the cost model's, merged pairs at
their merged cost: what count_macs gives after merge-pointwise), error reached, accuracy before/after
on the labelled calibration data, and ``keep``.

**The search on large graphs** (``search="bisect"``; ``"auto"``, the default, takes it when the greedy
search's predicted work -- ~2 evaluations per move, each a run on every evaluation set -- exceeds 5e12
MACs, e.g. qlnet50 at 224 with 64 images; small graphs keep the greedy search). The greedy search
costs O(moves) runs of the whole calibration set; this one O(units) cheap probes plus O(log moves) full
evaluations. With D_u(k) the importance (what the readers receive, as above; for a rotated unit
lambda_j * |W_reader[:, j]|^2) of the channels deleted when unit u keeps k, the mean output error of u
alone is predicted as s_u * D_u(k), s_u measured by one probe (a quarter of u deleted, on the first
``probe_samples`` samples). Every unit's moves are merged into one path by MACs saved per predicted
error added (a unit's own moves in order); the longest prefix of the path that keeps every budget is
found by bisection, each probe of a prefix measured exactly on all evaluation sets; the unit of the
move right after that prefix is then retired (its later moves leave the path) and the rest bisected
again, up to four times in all (the prediction misjudges a unit; the greedy search retires such a unit
too); with
compensate="refit" the refit moments are then re-measured on that state and the rest of the path
bisected again (three rounds at most). Errors are not exactly monotone along the path, so bisection
finds a prefix that fits, not always the longest. ``progress`` (true / false / "auto": when stderr is a
terminal) prints one line per evaluation on stderr: moves tried and accepted, the error against the
budget, the MACs saved. Stats: ``search``, ``evaluations``, ``refits``, ``samples_run`` (samples run
through a graph, the machine-independent cost), and for bisect ``path_moves``, ``moves_accepted``.

The search and its statistics use ``ctx.search_calibration`` only: the pass manager holds the other
calibration sets out and reports the error on them (qlfx.pass_manager, "Held-out calibration").
"""
from __future__ import annotations

import copy
import math
import sys

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.debug import count_macs
from qlfx.errors import UsageError
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.symmetry import analyze, apply_elements
from qlfx.symmetry.product_slicing import current_positions, product_units, shrink_per_channel_conv
from qlfx.symmetry.slice_search import bisect_search, greedy_search
from qlfx.symmetry.slicing import (OutputScore, Progress, Runner, TrialDeletion, Unit, channel_moments, linear_view,
                                   principal_axes, reader_moments, units_of)
from qlfx.verify import random_inputs as make_random_inputs

aten = torch.ops.aten
_METHODS = ("pca", "magnitude")
_COMPENSATE = ("refit", "refit-once", "mean", False)
_SEARCHES = ("auto", "greedy", "bisect")
# search="auto" takes the greedy search while its predicted work -- ~2 evaluations per move, each a run of
# the graph on every evaluation set -- stays under this many MACs (~5 minutes of one CPU core), else bisect
_GREEDY_WORK_LIMIT = 5e12
# ops that compute each channel from the same channel (or from pixels / samples of it) whatever C is
_CHANNEL_COUNT_AGNOSTIC = (
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.where, aten.mean, aten.sum, aten.amax, aten.amin,
    aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.max_pool1d, aten.max_pool2d, aten.max_pool3d,
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
    aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.clone, aten.contiguous, aten._to_copy, aten.alias,
    aten.flatten, aten.squeeze, aten.unsqueeze, aten.permute, aten.transpose, aten.select, aten.slice, aten.cat)
_SIZED_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)  # their size list holds C
_ELEMENTWISE_KINDS = ("activation", "elementwise", "product", "add-constant", "mul-constant", "where")


def _stored(arg) -> bool:
    return arg is None or ir.is_constant(arg)


def _per_channel(gm: fx.GraphModule, arg, node: fx.Node) -> bool:
    """``arg`` is a stored tensor with one entry per channel of ``node`` (broadcasting along dim 1)."""
    if not ir.is_constant(arg):
        return False
    t = ir.get_tensor(gm, arg)
    axis = t.dim() - (len(ir.shape(node)) - 1)
    return axis >= 0 and t.shape[axis] == ir.channels(node)


# ------------------------------------------------------------------------------------- the matching
def _plan(gm: fx.GraphModule, report, unit: Unit) -> str | None:
    """Fill ``unit`` with its ops; return None when its channels can be deleted, else the reason."""
    if any(sp.group.value == "identity" for sp, _ in unit.members):
        return "identity group (network input/output or an op the analysis does not understand)"
    if unit.size < 2:
        return "a single channel"
    if len(unit.members) == 1 and unit.space.derived:
        return "a product's output space whose factors are not tied to it"
    nodes = {n.name: n for n in gm.graph.nodes}
    for sp, tie_mult in unit.members:  # channel -> base index, for every value holding a member space
        for seg in sp.segments:
            node = nodes.get(seg.node)
            if node is None:
                return f"{seg.node} is a branch of a fused qlfx::branch_product (run slice before fuse-product)"
            base = unit.base_of.setdefault(seg.node, torch.full((ir.channels(node),), -1, dtype=torch.long))
            space_channel = torch.arange(seg.stop - seg.start) // seg.mult  # a segment holds `mult` copies
            base[seg.start:seg.stop] = space_channel // tie_mult
    for name, base in unit.base_of.items():
        if bool((base < 0).any()):
            return f"value {name} holds the space as part of a wider channel axis (a cat or flatten)"
    members = set(unit.base_of)

    def aligned(a: fx.Node, name: str) -> bool:  # a flatten's output holds H*W copies of each input channel
        if a.name not in members or len(unit.base_of[name]) % len(unit.base_of[a.name]):
            return False
        copies = len(unit.base_of[name]) // len(unit.base_of[a.name])
        return torch.equal(unit.base_of[a.name].repeat_interleave(copies), unit.base_of[name])

    for name in members:
        node = nodes[name]
        kind = report.node_kinds.get(name)
        view = linear_view(node)
        if kind == "linear" and view is not None:
            if not (ir.is_constant(view.weight) and _stored(view.bias)):
                return f"{name}: its weight is computed in the graph"
            unit.writers.append(node)
            if view.input.name in members:  # reads and writes the unit (conv_a of the paper's Eq.(3))
                unit.inner.append(node)
        elif kind in ("depthwise", "shared-depthwise") and node.args[0].name in members:
            conv = ir.ConvCall.of(node)
            k = ir.channels(node) // ir.channels(conv.input)
            if conv.groups != ir.channels(conv.input) or not (ir.is_constant(conv.weight) and _stored(conv.bias)):
                return f"{name}: a grouped conv that is not one-group-per-channel with a stored weight"
            if not torch.equal(unit.base_of[name], unit.base_of[conv.input.name].repeat_interleave(k)):
                return f"{name}: its output channels do not follow its input channels"
            unit.depthwise.append(node)
        elif kind == "slice":
            piece = ir.ChannelSlice.of(node)
            if piece.input.name not in members or not torch.equal(
                    unit.base_of[name], unit.base_of[piece.input.name][piece.start:piece.stop]):
                return f"{name}: a channel slice of a value outside the unit"
            unit.slices.append(node)
        elif kind == "radial" or kind in _ELEMENTWISE_KINDS or ir.is_op(node, *_CHANNEL_COUNT_AGNOSTIC, *_SIZED_RESHAPES):
            sliced = [i for i, a in enumerate(node.args)
                      if kind in ("add-constant", "mul-constant") and _per_channel(gm, a, node)]
            unit.constants += [(node, i) for i in sliced]
            for a in node.all_input_nodes:
                if not isinstance(ir.val(a), torch.Tensor):
                    continue  # a size (aten.sym_size under a symbolic batch)
                if ir.is_constant(a):
                    if all(node.args[i] is not a for i in sliced) and ir.get_tensor(gm, a).numel() > 1:
                        return f"{name}: a constant operand this pass cannot slice"
                elif not aligned(a, name):
                    return f"{name}: combines values whose channels do not line up"
            if kind == "radial":
                unit.radials.append(node)
            elif ir.is_op(node, *_SIZED_RESHAPES):
                unit.reshapes.append(node)
        else:
            return f"{ir.describe(node)} cannot lose channels"
        for user in node.users:
            if user.name in members or (ir.is_op(user, aten.sym_size.int) and user.args[1] != 1):
                continue
            reader = linear_view(user)
            if report.node_kinds.get(user.name) == "linear" and reader is not None and reader.input is node:
                if not (ir.is_constant(reader.weight) and _stored(reader.bias)):
                    return f"{user.name}: its weight is computed in the graph"
                unit.readers.append(user)
            elif user.op == "output":
                return "a network output"
            else:
                return f"{ir.describe(user)} reads the unit and cannot lose input channels"
    if not unit.writers:
        return "nothing writes it with a weight"
    return None


def _received(gm: fx.GraphModule, unit: Unit, energy_of) -> torch.Tensor:
    """Per base channel j: sum over the unit's readers of E[x_c^2] |W_reader[:, c]|^2 over its channels c
    (``energy_of(value name)``: E[x_c^2] per channel of that value) -- what deleting j takes from them."""
    received = torch.zeros(unit.size, dtype=torch.float64)
    for reader in unit.readers + unit.inner:
        view = linear_view(reader)
        w = ir.get_tensor(gm, view.weight).detach().double()
        column = w.movedim(1, 0).reshape(w.shape[1], -1).pow(2).sum(1)
        received.index_add_(0, unit.base_of[view.input.name], energy_of(view.input.name).double() * column)
    return received


def _first_samples(sets: list, samples: int) -> list:
    """The first input sets holding at least ``samples`` samples (the probes' cheap evaluation sets)."""
    out, count = [], 0
    for inputs in sets:
        if count >= samples:
            break
        out.append(inputs)
        count += int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    return out


def _parse_keep(keep) -> dict[int, int] | None:
    if keep is None or keep == "" or keep == "none":
        return None
    if isinstance(keep, dict):
        return {int(k): int(v) for k, v in keep.items()}
    if isinstance(keep, str):  # "3:16/5:32" (pipeline strings cannot hold dicts)
        try:
            return {int(k): int(v) for k, v in (item.split(":") for item in keep.replace(";", "/").split("/"))}
        except ValueError:
            pass
    raise UsageError(f"slice: keep must be a dict {{unit id: channels}} or 'id:n/id:n', got {keep!r}")


# ------------------------------------------------------------------------------------------ the pass
@register_pass
class Slice(Pass):
    name = "slice"
    description = ("rotate channel spaces to the principal axes of calibration activations and delete low-variance "
                   "directions within an output-error budget or an accuracy drop on labelled data")
    contract = "lossy"
    option_defaults = {"budget": None, "accuracy_drop": None, "method": "pca", "keep": None, "random_inputs": 2,
                       "seed": 0, "granularity": 0.0625, "min_channels": 1, "spaces": "all", "compensate": "refit",
                       "score": "mean", "target_macs": None, "search": "auto", "probe_samples": 8,
                       "progress": "auto", "products": True}
    default_budget = 0.01  # the output-error budget when neither budget nor accuracy_drop is given

    def lossy_budgets(self):
        budget, drop = super().lossy_budgets()
        return (self.default_budget if budget is None and drop is None else budget), drop

    def _check_options(self, calibration, labels, keep_given) -> None:
        o = self.options
        if o["method"] not in _METHODS:
            raise UsageError(f"slice: method must be one of {', '.join(_METHODS)}, got {o['method']!r}")
        if o["compensate"] not in _COMPENSATE:
            raise UsageError(f"slice: compensate must be one of {', '.join(map(str, _COMPENSATE))}, "
                             f"got {o['compensate']!r}")
        if o["score"] not in ("mean", "max", "kl"):
            raise UsageError(f"slice: score must be 'mean', 'max' or 'kl', got {o['score']!r}")
        if o["search"] not in _SEARCHES:
            raise UsageError(f"slice: search must be one of {', '.join(_SEARCHES)}, got {o['search']!r}")
        if o["progress"] not in (True, False, "auto"):
            raise UsageError(f"slice: progress must be true, false or auto, got {o['progress']!r}")
        if not isinstance(o["probe_samples"], int) or isinstance(o["probe_samples"], bool) or o["probe_samples"] < 1:
            raise UsageError(f"slice: probe_samples is a number of calibration samples >= 1, got {o['probe_samples']!r}")
        if o["products"] not in (True, False):
            raise UsageError(f"slice: products must be true or false, got {o['products']!r}")
        if o["spaces"] not in ("all", "rotatable"):
            raise UsageError(f"slice: spaces must be 'all' or 'rotatable', got {o['spaces']!r}")
        if o["accuracy_drop"] is not None and keep_given is None and not any(
                y is not None and bool((y >= 0).any()) for y in labels):
            raise UsageError("slice<accuracy_drop=...> needs labelled calibration data: "
                             "qlfx.compile(model, 'slice<accuracy_drop=0.5>', calibration=x, labels=y)")
        if not calibration and (o["method"] == "pca" or keep_given is None):
            raise UsageError("slice needs calibration data (the activations it rotates to, and the inputs its budget "
                             "is measured on): qlfx.compile(model, 'slice<budget=0.01>', calibration=images)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        method, compensate = self.options["method"], self.options["compensate"]
        keep_given = _parse_keep(self.options["keep"])
        budget, accuracy_drop = self.lossy_budgets()
        calibration, labels = ctx.search_calibration, ctx.search_labels  # the held-out sets stay unseen
        self._check_options(calibration, labels, keep_given)
        runner = Runner(ctx.example_inputs, ctx.dynamic_batch)
        result = PassResult(changed=False)
        report = analyze(gm)
        units: list[Unit] = []
        for unit in units_of(report):
            if self.options["spaces"] == "rotatable" and not unit.rotatable:
                continue
            why = _plan(gm, report, unit)
            if why is None:
                units.append(unit)
            elif not any(sp.group.value == "identity" for sp, _ in unit.members):
                result.skipped.append(Skip(f"{unit.describe()}; {unit.space.sites[0] if unit.space.sites else ''}", why))
        if self.options["products"] and self.options["spaces"] == "all":
            # a product's channels on their own where its unit deletes them only with a stream's
            covered = {name for u in units for name, base in u.base_of.items() if len(base) == u.size}
            found, why_not = product_units(gm, report, covered, len(report.spaces))
            units += found
            result.skipped += [Skip(f"product {site}", why) for site, why in why_not]
        if not units:
            result.notes.append("no channel space can be sliced")
            return result

        self._rank(gm, report, units, runner, calibration)
        trial = TrialDeletion(gm, units, compensate)
        reference = copy.deepcopy(gm)  # the rotated, unsliced graph: what refits reproduce
        readers = [r for u in units for r in u.readers]
        if compensate and calibration:
            trial.moments = reader_moments(runner, gm, None, readers, calibration)
        eval_sets = calibration + make_random_inputs(ctx.example_inputs, int(self.options["seed"]),
                                                     int(self.options["random_inputs"]))
        score = (OutputScore(runner, gm, eval_sets, labels, "kl" if self.options["score"] == "kl" else "mse")
                 if eval_sets else None)  # references: after the rotation
        if keep_given is not None:
            by_id = {u.id: u for u in units}
            unknown = set(keep_given) - set(by_id)
            if unknown:
                raise UsageError(f"slice: keep names unit(s) {sorted(unknown)} that cannot be sliced here; "
                                 f"sliceable: {sorted(by_id)}")
            for uid, k in keep_given.items():
                by_id[uid].keep = max(int(self.options["min_channels"]), min(by_id[uid].size, int(k)))
            if compensate == "refit" and calibration:
                for _ in range(2):  # the deletion is one step; refit twice so upstream refits settle
                    trial.moments = reader_moments(runner, reference, trial.apply(), readers, calibration)
                    trial.drifted = True
        else:
            if score is None or (budget is None and accuracy_drop is None):
                raise UsageError("slice: give a budget or an accuracy_drop (and calibration data), "
                                 "or keep={unit id: channels}")
            measure = lambda: reader_moments(runner, reference, trial.apply(), readers, calibration)  # noqa: E731
            search = self._search_kind(gm, units, eval_sets)
            progress = Progress(self.options["progress"] is True or (self.options["progress"] == "auto"
                                                                     and sys.stderr.isatty()), budget, count_macs(gm))
            result.stats["search"] = search
            if search == "greedy":
                greedy_search(self.options, gm, units, trial, score, budget, accuracy_drop, ctx, result, measure,
                              progress)
            else:
                probe = OutputScore(runner, gm, _first_samples(eval_sets, int(self.options["probe_samples"])),
                                    [])
                bisect_search(self.options, gm, units, trial, score, probe, budget, accuracy_drop, ctx, result, measure,
                              progress)
        masked = trial.apply()  # the tensors the deletion slices: refitted, deleted channels zeroed
        error = score.error(masked) if score is not None else float("nan")
        if score is not None and score.labelled:
            result.stats.update({"accuracy_before": score.base_accuracy, "accuracy_after": score.accuracy})

        macs_before = count_macs(gm)
        survivors: dict[str, torch.Tensor] = {}  # value -> its original channels still there
        for unit in units:
            if unit.keep < unit.size:
                if keep_given is not None and not ctx.allow_rewrite():
                    unit.keep = unit.size
                    continue
                self._delete(gm, unit, survivors)
                result.rewrites.append(f"{unit.describe()}: kept {unit.keep}"
                                       f"{' principal directions' if unit.rotation is not None else ' channels'}")
                result.changed = True
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
        ir.refresh_vals(gm)  # count_macs reads the new shapes
        macs_after = count_macs(gm)
        result.stats.update({
            "samples_run": runner.samples, "method": method, "budget": budget, "accuracy_drop": accuracy_drop, "error": error,
            "macs_before": macs_before, "macs_after": macs_after, "keep": {u.id: u.keep for u in units},
            "dropped": {u.id: sorted(int(j) for j in u.order[u.keep:]) for u in units if u.keep < u.size},
            "spaces": {u.id: {"groups": sorted({sp.group.value for sp, _ in u.members}), "size": u.size,
                              "kept": u.keep, "rotated": u.rotation is not None,
                              "members": [sp.id for sp, _ in u.members], "product": u.product,
                              "site": u.space.sites[0] if u.space.sites else ""} for u in units},
        })
        accuracy = (f"; top-1 {score.base_accuracy:.2f}% -> {score.accuracy:.2f}% on labelled calibration "
                    f"(allowed drop {accuracy_drop})" if score is not None and score.labelled else "")
        result.notes.append(f"method={method}: MACs {macs_before:,} -> {macs_after:,} "
                            f"({macs_before / max(macs_after, 1):.2f}x fewer); output error {error:.3g} "
                            f"(budget {budget}) on {len(eval_sets)} input set(s){accuracy}")
        return result

    # --------------------------------------------------------------------------------- the ranking
    def _rank(self, gm, report, units, runner, calibration) -> None:
        """``unit.order``: base channels, most important first; for method="pca" rotatable units are
        first rotated to their principal axes (then the order is the identity)."""
        if self.options["method"] == "magnitude":
            for unit in units:
                norms = torch.zeros(unit.size, dtype=torch.float64)
                for node in unit.writers:
                    w = ir.get_tensor(gm, linear_view(node).weight).detach().double()
                    norms.index_add_(0, unit.base_of[node.name], w.reshape(w.shape[0], -1).pow(2).sum(1))
                unit.order = torch.argsort(norms, descending=True)
                unit.importance = norms
            return
        rotate = {u.id for u in units if u.rotatable}
        full = {name: (u.id, len(base) // u.size) for u in units if u.id in rotate for name, base in u.base_of.items()}
        read = {linear_view(r).input.name for u in units for r in u.readers + u.inner}
        moments, energies = channel_moments(runner, gm, calibration, full, read)
        elements = {}
        for unit in units:
            if unit.id in rotate:
                unit.rotation = principal_axes(moments[unit.id])
                elements[unit.space.id] = unit.rotation
                unit.order = torch.arange(unit.size)
                unit.energy = torch.linalg.eigvalsh(moments[unit.id]).flip(0).clamp_min(0.0)  # of axis j
                continue
            # no rotation in this group: rank base channels by what the readers receive from them,
            # E[x_c^2] * |W_reader[:, c]|^2, summed over the readers and the unit's copies
            received = _received(gm, unit, lambda name: energies[name])
            unit.order = torch.argsort(received, descending=True)
            unit.importance = received
        if elements:
            apply_elements(gm, elements, report)
        for unit in units:  # a rotated axis: its energy times what the (rotated) readers make of it
            if unit.rotation is not None:
                unit.importance = _received(gm, unit, lambda name: unit.energy[unit.base_of[name]])

    # ---------------------------------------------------------------------------------- the search
    def _search_kind(self, gm, units, eval_sets) -> str:
        """search="auto": the greedy search while its predicted work is small, else bisect (docstring)."""
        if self.options["search"] != "auto":
            return self.options["search"]
        granularity, floor = float(self.options["granularity"]), int(self.options["min_channels"])
        moves = sum((u.size - floor) // max(1, round(u.size * granularity)) for u in units)
        samples = sum(int(s[0].shape[0]) for s in eval_sets)
        batch = max(1, int(eval_sets[0][0].shape[0]))
        work = 2 * moves * samples * count_macs(gm) / batch
        return "greedy" if work <= _GREEDY_WORK_LIMIT else "bisect"

    # --------------------------------------------------------------------------------- the rewrite
    def _delete(self, gm: fx.GraphModule, unit: Unit, survivors: dict[str, torch.Tensor]) -> None:
        """Physically remove the unit's deleted channels from the trial graph (whose tensors already hold
        the refitted, zeroed values). Shapes are read from the vals, still those of the unsliced graph;
        ``survivors`` (value -> its original channels still there) maps the unit's channels onto what
        earlier units' deletions left (a product unit after its stream's unit), and is updated."""
        kept_at, left = {}, {}
        for name in unit.base_of:
            kept_at[name], left[name] = current_positions(unit, name, survivors)

        def replace(node, weight, bias, keep_bias_node=False):
            view = linear_view(node)
            with gm.graph.inserting_before(node):
                w = ir.constant_node(gm, weight.contiguous(), f"{node.name}_weight_sliced")
                b = view.bias if keep_bias_node else (
                    None if bias is None else ir.constant_node(gm, bias.contiguous(), f"{node.name}_bias_sliced"))
            view.set_args(weight=w, bias=b)

        def tensor(arg):
            return None if arg is None else ir.get_tensor(gm, arg).detach()

        for node in unit.writers + unit.depthwise:
            kept = kept_at[node.name]
            view = linear_view(node)
            bias = tensor(view.bias)
            replace(node, tensor(view.weight)[kept], None if bias is None else bias[kept])
        for node in unit.depthwise:
            ir.ConvCall.of(node).set_args(groups=int(kept_at[node.args[0].name].numel()))
        for node in unit.regrouped:  # per-channel convs whose input stays whole (product units)
            shrink_per_channel_conv(gm, node, kept_at[node.name])
        for node in unit.slices:
            piece = ir.ChannelSlice.of(node)
            name = piece.input.name
            current = survivors.get(name, torch.arange(len(unit.base_of[name])))
            gone = torch.isin(unit.base_of[name][current], unit.order[unit.keep:])
            start, stop = piece.start - int(gone[:piece.start].sum()), piece.stop - int(gone[:piece.stop].sum())
            node.args, node.kwargs = (piece.input, 1, start, stop), {}
        for node in unit.reshapes:
            args = ir.op_args(node)
            size = list(args["shape"] if "shape" in args else args["size"])  # aten.reshape names it shape
            if size[1] != -1:
                size[1] = int(kept_at[node.name].numel())
            node.args, node.kwargs = (args["self"], size), {}
        for node in unit.readers + unit.inner:
            view = linear_view(node)
            replace(node, tensor(view.weight)[:, kept_at[view.input.name]], None, keep_bias_node=True)
        for node, i in unit.constants:
            t = tensor(node.args[i])
            with gm.graph.inserting_before(node):
                c = ir.constant_node(gm, t.index_select(t.dim() - (len(ir.shape(node)) - 1), kept_at[node.name]),
                                     f"{node.name}_const_sliced")
            args = list(node.args)
            args[i] = c
            node.args = tuple(args)
        for node in unit.radials:
            args = ir.op_args(node)
            if args["radius"] is None:  # keep r = sqrt(C_original): the default would shrink with C
                node.args, node.kwargs = (args["x"], math.sqrt(ir.channels(node))), {}
        survivors.update(left)
