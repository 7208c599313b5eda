"""slice: rotate channel spaces to the principal axes of their activations, then delete the
least-used directions, within an output-error or accuracy budget on calibration data (lossy).

Let S be a channel space (DESIGN.md §3) of C channels and x in R^C its channel vector at a pixel. Over
the calibration inputs, every pixel of every value of S (the writers' outputs, the residual sums,
the activations' outputs, ...) gives a sample; their second-moment matrix is

    M = (1/#sites) sum_sites E_pixels[x x^T]          (uncentred: a mean cannot be moved out of a
                                                       stream that passes through a radial activation)

**method="pca"** on a space whose group contains O(C) (O or GL): take M = U diag(lambda) U^T with
lambda descending and apply the group element P = U^T (exact: writers W -> P W, readers W -> W P^T).
Channel i now carries the i-th principal component, whose energy is lambda_i, and deleting the last
C - k channels removes the k-dimensional projection error sum_{i>k} lambda_i -- the least any
deletion of C - k directions can. On spaces whose group has no rotations (monomial, permutation, ...)
nothing can be rotated: "pca" then ranks the channels by their energy diag(M).

**method="magnitude"** (the baseline): no rotation; channels ranked by the L2 norm of the weights
that write them (the rows of every writer conv/linear; the columns of the readers if nothing writes
the space) -- plain norm-based channel pruning.

Deleting channel c of S: remove row c (and bias c) of every conv/linear writing S, column c of every
one reading S, entry c of constants added inside S. Values of S then lose channel c everywhere; ops
inside S (add, ReLU, pools, flatten, hardball/softball) are channel-count agnostic -- except that a
radial activation's default radius is sqrt(C): its radius is fixed to the ORIGINAL value, so the
function stays close. The search simulates a deletion exactly by zeroing the writers' rows (a zero
channel stays zero through every op of S and adds nothing to the radial norm), which keeps the graph's
shapes while it tries candidates.

Compensation in the readers (both methods; readers that are a linear or a pointwise conv -- with a
spatial kernel zero padding makes the border differ). Each reader is fitted to reproduce its
REFERENCE output y = W x + b (x: its input in the rotated, unsliced graph) from what it receives in
the sliced graph, x' (the kept channels K, with every deletion so far upstream):

    [W'_K, b'] = argmin E||W'_K x'_K + b' - (W x + b)||^2 = [W, b] E[x~ x~'_K~^T] E[x~'_K~ x~'_K~^T]^-1

with x~ = [x; 1], K~ = K + the bias entry, expectations over calibration samples and the pixels the
reader reads (channel-pruning "reconstruction"; it contains the mean rule and lets kept channels
stand in for correlated deleted ones). ``compensate="refit"`` (the default) re-measures the moments
on the current sliced graph after every accepted deletion step, so later refits also correct the
drift of earlier deletions (a step is kept only if it still fits the budget after the refit);
``"refit-once"`` uses the unsliced statistics (x' = x) throughout; ``"mean"`` only feeds the deleted
channels' reference means through the bias, b' = b + W[:, D] E[x_D]; ``false`` deletes only.

Which channels are deleted together (a *unit*): an untied space is its own unit. Spaces whose
permutations are tied by per-channel ops and products form one unit -- in a PDEBlock the hidden halves
z1, z2 (two slices of conv1's output), their product p and the depthwise output y: deleting base index
j removes conv1's rows j and W + j, p_j, the depthwise conv's outputs j*k..j*k+k-1 (its groups shrink
by one) and those columns of conv3; in the paper's Eq.(3) layout the stream, conv_a's output and the
product are tied through the shared 3x3 kernel. Tied units have no rotation (their group is monomial at
most), so "pca" ranks their base channels by what their readers receive, E[x_c^2] * |W_reader[:, c]|^2.
A unit is sliced only when every op in it is one of: conv/linear (rows, columns, or both), per-channel
conv with one group per channel, channel slice, product, add, activation, pool, flatten,
hardball/softball, adding a per-channel constant. The network's input and output are never sliced.
Skipped units are reported with the reason.

How many to delete: greedy, under one or both budgets --
``budget`` (relative output error: max over input sets and outputs of max|new - ref| / max|ref| on
the calibration inputs + ``random_inputs`` seeded random inputs, the pass manager's check for lossy
passes) and ``accuracy_drop`` (percentage points of top-1 accuracy of the first output on the
labelled calibration samples: ``qlfx.compile(..., calibration=x, labels=y)``, negative labels mark
unlabelled samples; the pass manager checks it on the same data). With neither, budget=0.01. Each
round tries deleting the next ``step`` channels (``max(1, round(C * granularity))``) of each space
and takes the move with the most MACs saved per unit of score increase among those that keep the
output budget (a space whose next move breaks it is retired). The path is thus chosen without labels;
the accuracy budget stops the search at the first chosen move that breaks it (continuing with other
moves that happen to keep the accuracy fits the search to the labelled samples: measured on the
digits example, 0.4 points lost on them but 1.3 on unseen images). It stops when no move fits. The score (``score="mean"``, the default) is the mean over
outputs of ||new - ref||^2 / ||ref||^2 on those inputs: the max error is set by one worst pixel of
one input, so ranking moves by it is noisy (a move that hurts one sample a little looks as bad as
one that hurts all of them) and the search was not monotone in the budget; the mean squared error
sees every sample, and unlike the accuracy it is smooth. ``score="max"`` ranks by the output budget's
error itself. An accuracy budget is only as good as its labelled data: use samples the model was
not trained on, or the drop there says little about unseen data. ``target_macs=N`` also stops the
search once the graph needs at most N MACs per sample (with a budget that never binds, e.g.
accuracy_drop=100: pruning to a given cost). ``keep={space id: count}`` skips the
search and keeps exactly that many channels per space (used to compare methods at equal FLOPs; the
refit then runs twice). Stats: per space the channels kept, MACs before/after, error reached,
accuracy before/after on the labelled calibration data, and ``keep``.
"""
from __future__ import annotations

import copy
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from qlfx import ir
from qlfx.errors import UsageError
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.verify import random_inputs as make_random_inputs
from qlfx.verify import top1_correct

_PASS_THROUGH_TARGETS = {operator.add, torch.add, operator.iadd, operator.sub, torch.sub, F.adaptive_avg_pool2d,
                         F.avg_pool2d, F.max_pool2d, torch.max_pool2d, torch.flatten, operator.truediv, torch.div,
                         F.relu, torch.relu, F.leaky_relu, F.hardtanh, torch.tanh, F.dropout}
_METHODS = ("pca", "magnitude")
_COMPENSATE = ("refit", "refit-once", "mean", False)


# ----------------------------------------------------------------------------------------- helpers
def _linear_parts(node: fx.Node):
    """(input node, weight node, bias node, groups) of a conv / linear call, or None."""
    conv = ir.ConvCall.of(node)
    if conv is not None:
        return conv.input, conv.weight, conv.bias, conv.groups
    if node.op == "call_function" and node.target is F.linear:
        args = list(node.args) + [None] * 3
        return args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2]), 1
    return None


def _set_linear_parts(node: fx.Node, weight: fx.Node, bias: fx.Node | None) -> None:
    conv = ir.ConvCall.of(node)
    if conv is not None:
        conv.set_args(weight=weight, bias=bias)
    else:
        node.args, node.kwargs = (node.args[0], weight, bias), {}


def macs_by_node(gm: fx.GraphModule) -> dict[str, int]:
    """Multiply-accumulates per sample of each conv / linear (from the recorded shapes)."""
    macs = {}
    for node in gm.graph.nodes:
        parts = _linear_parts(node)
        out = ir.shape(node)
        if parts is None or out is None or not isinstance(parts[1], fx.Node):
            continue
        w = ir.shape(parts[1])
        if w is None:
            w = tuple(ir.get_tensor(gm, parts[1]).shape)
        macs[node.name] = int(math.prod(w[1:]) * math.prod(out[1:]))
    return macs


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates per sample of every conv / linear."""
    return sum(macs_by_node(gm).values())


def _macs_after(base: dict[str, int], units: list["_Unit"]) -> float:
    """MACs of the graph with each unit cut to ``unit.keep``: a conv loses the kept fraction of its outputs
    (writers, per-channel convs) and of its inputs (readers) -- both for a conv between two units."""
    scale = dict.fromkeys(base, 1.0)
    for unit in units:
        frac = unit.keep / unit.size
        for node in unit.writers + unit.depthwise + unit.readers:
            scale[node.name] *= frac
        for node in unit.inner:  # reads and writes the same unit (already scaled once as a writer)
            scale[node.name] *= frac
    return sum(base[name] * scale[name] for name in base)


class _Unit:
    """A set of channels that are deleted together, indexed by a base index j < size.

    An untied space is a unit of its own (j = its channel). Spaces whose permutations are tied by
    per-channel ops and products (a PDEBlock's hidden halves z1, z2, their product p and the depthwise
    output y) form one unit: deleting base index j deletes z1_j, z2_j, p_j and y's channels j*k..j*k+k-1
    together. ``base_of[node]`` maps each channel of a value in the unit to its base index."""

    def __init__(self, uid: int, members, size: int):
        self.id = uid
        self.members = members  # [(ChannelSpace, mult)]
        self.size = size
        self.base_of: dict[str, torch.Tensor] = {}
        self.writers: list[fx.Node] = []  # conv/linear from outside the unit into it: rows
        self.depthwise: list[fx.Node] = []  # per-channel convs inside the unit: rows and groups
        self.slices: list[fx.Node] = []  # x[:, a:b] inside the unit
        self.readers: list[fx.Node] = []  # conv/linear from the unit out: columns
        self.inner: list[fx.Node] = []  # conv/linear from the unit into it (also in writers): rows and columns
        self.constants: list[tuple[fx.Node, int]] = []  # (add node, arg index of the constant)
        self.radials: list[fx.Node] = []
        self.order: torch.Tensor | None = None  # base indices, most important first
        self.rotation: torch.Tensor | None = None
        self.keep: int = size
        self.macs_per_channel: float = 0.0

    @property
    def space(self):
        return self.members[0][0]

    @property
    def rotatable(self) -> bool:
        return len(self.members) == 1 and self.members[0][1] == 1 and self.space.group.value in ("O", "GL")

    def describe(self) -> str:
        groups = sorted({m.group.value for m, _ in self.members})
        ids = ",".join(str(m.id) for m, _ in self.members)
        return f"space{'s' if len(self.members) > 1 else ''} {ids} ({'/'.join(groups)}, {self.size} ch)"

    def dropped_channels(self, node_name: str, dropped_base: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(torch.isin(self.base_of[node_name], dropped_base)).flatten()

    def kept_channels(self, node_name: str, dropped_base: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(~torch.isin(self.base_of[node_name], dropped_base)).flatten()


def _units(report) -> list[_Unit]:
    units, seen = [], set()
    for space in report.spaces:
        if space.id in seen:
            continue
        if space.tie is None:
            units.append(_Unit(space.id, [(space, 1)], space.size))
            seen.add(space.id)
            continue
        members = [(report.spaces[sid], m) for sid, m in report.ties[space.tie]]
        base = min(sp.size // m for sp, m in members)
        units.append(_Unit(min(sp.id for sp, _ in members), members, base))
        seen.update(sp.id for sp, _ in members)
    return units


def _slice_bounds(node: fx.Node, channels: int):
    """(x, start, stop) of a channel slice x[:, start:stop], or None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    x, index = node.args
    idx = index if isinstance(index, tuple) else (index,)
    if len(idx) >= 2 and isinstance(idx[1], slice) and idx[1].step in (None, 1):
        start, stop, _ = idx[1].indices(channels)
        return x, start, stop
    return None


def _plan(gm: fx.GraphModule, report, unit: _Unit) -> str | None:
    """Fill ``unit`` with its ops; return None when its channels can be deleted, else the reason."""
    if any(sp.group.value == "identity" for sp, _ in unit.members):
        return "identity group (network input/output or an op the analysis does not understand)"
    if unit.size < 2:
        return "a single channel"
    if len(unit.members) == 1 and unit.space.derived:
        return "a product's output space whose factors are not tied to it"
    nodes = {n.name: n for n in gm.graph.nodes}
    # channel -> base index, for every value holding a member space
    for sp, tie_mult in unit.members:
        for seg in sp.segments:
            node = nodes.get(seg.node)
            shp = ir.shape(node) if node is not None else None
            if node is None or shp is None or len(shp) < 2:
                return f"value {seg.node} has no channel axis"
            base = unit.base_of.setdefault(seg.node, torch.full((shp[1],), -1, dtype=torch.long))
            c = torch.arange(seg.stop - seg.start)  # channel within the segment
            space_channel = c // seg.mult  # segment holds `mult` copies: channel start + c*mult + r
            base[seg.start:seg.stop] = space_channel // tie_mult
    members = set(unit.base_of)
    for name, base in unit.base_of.items():
        if bool((base < 0).any()):
            return f"value {name} holds the space as part of a wider channel axis (a cat or flatten)"
    for name in members:
        node = nodes[name]
        kind = report.node_kinds.get(name)
        parts = _linear_parts(node)
        x = parts[0] if parts is not None else None
        inside = isinstance(x, fx.Node) and x.name in members
        if kind == "linear" and parts is not None:
            if not isinstance(parts[1], fx.Node) or parts[1].op != "get_attr":
                return f"{name}: its weight is computed in the graph"
            unit.writers.append(node)
            if inside:  # reads and writes the unit (e.g. conv_a of the paper's Eq.(3)): rows and columns
                unit.inner.append(node)
        elif kind in ("depthwise", "shared-depthwise") and inside and ir.ConvCall.of(node) is not None:
            conv = ir.ConvCall.of(node)
            cin, cout = ir.shape(x)[1], ir.shape(node)[1]
            if conv.groups != cin or conv.weight.op != "get_attr":
                return f"{name}: a grouped conv that is not one-group-per-channel"
            k = cout // cin
            if not torch.equal(unit.base_of[name], unit.base_of[x.name].repeat_interleave(k)):
                return f"{name}: its output channels do not follow its input channels"
            unit.depthwise.append(node)
        elif kind == "slice" and _slice_bounds(node, ir.shape(node.args[0])[1]) is not None:
            src, a, b = _slice_bounds(node, ir.shape(node.args[0])[1])
            if src.name not in members or not torch.equal(unit.base_of[name], unit.base_of[src.name][a:b]):
                return f"{name}: a channel slice of a value outside the unit"
            unit.slices.append(node)
        elif kind == "radial":
            unit.radials.append(node)
        elif kind in ("activation", "add-constant", "product") or \
                (node.op == "call_function" and node.target in _PASS_THROUGH_TARGETS):
            for i, a in enumerate(node.args):
                if not isinstance(a, fx.Node):
                    continue
                if a.op == "get_attr":
                    t = ir.get_tensor(gm, a)
                    axis = t.dim() - (len(ir.shape(node)) - 1)
                    if kind == "add-constant" and axis >= 0 and t.shape[axis] == ir.shape(node)[1]:
                        unit.constants.append((node, i))
                    elif t.numel() > 1:
                        return f"{name}: a constant operand this pass cannot slice"
                elif a.name not in members or not torch.equal(unit.base_of[a.name], unit.base_of[name]):
                    return f"{name}: combines values whose channels do not line up"
        else:
            what = node.target if node.op != "call_function" else getattr(node.target, "__name__", node.target)
            return f"{name} ({node.op} {what}) cannot lose channels"
        for user in node.users:
            if user.name in members:
                continue
            uparts = _linear_parts(user)
            if report.node_kinds.get(user.name) == "linear" and uparts is not None and uparts[0] is node:
                if not isinstance(uparts[1], fx.Node) or uparts[1].op != "get_attr":
                    return f"{user.name}: its weight is computed in the graph"
                unit.readers.append(user)
            elif user.op == "output":
                return "a network output"
            else:
                return f"{user.name} reads the unit and cannot lose input channels"
    if not unit.writers:
        return "nothing writes it with a weight"
    for node in unit.writers + unit.depthwise:
        w = tuple(ir.get_tensor(gm, _linear_parts(node)[1]).shape)
        unit.macs_per_channel += math.prod(w[1:]) * math.prod(ir.shape(node)[2:]) * ir.shape(node)[1] / unit.size
    for node in unit.readers + unit.inner:
        w = tuple(ir.get_tensor(gm, _linear_parts(node)[1]).shape)
        unit.macs_per_channel += w[0] * math.prod(w[2:]) * math.prod(ir.shape(node)[2:]) * w[1] / unit.size
    return None


def _batched(sets: list[tuple[torch.Tensor, ...]]):
    """Concatenate input sets along the batch axis when they agree in shape (one forward instead of
    many); returns (inputs, sizes) or None."""
    if not sets:
        return None
    try:
        inputs = tuple(torch.cat([s[i] for s in sets]) for i in range(len(sets[0])))
    except (RuntimeError, TypeError, IndexError):
        return None
    return inputs, [s[0].shape[0] for s in sets]


class _Evaluator:
    """The lossy-pass error, max over input sets and outputs of max|new-ref| / max|ref|, and the top-1
    accuracy (percent, first output) on the sets that carry labels."""

    def __init__(self, gm: fx.GraphModule, sets: list[tuple[torch.Tensor, ...]], labels: list[torch.Tensor | None]):
        self.sets = sets
        self.labels = labels + [None] * (len(sets) - len(labels))
        self.labelled = any(y is not None for y in self.labels)
        self.batch = _batched(sets)
        self.refs = self._outputs(gm)
        self.base_accuracy = self._accuracy(self.refs)
        self.accuracy = self.base_accuracy

    def _accuracy(self, outputs) -> float:
        if not self.labelled:
            return float("nan")
        correct = total = 0
        for out, y in zip(outputs[0], self.labels):
            if y is not None:
                c, n = top1_correct(out, y)
                correct, total = correct + c, total + n
        return 100.0 * correct / max(total, 1)

    def _run(self, gm, inputs):
        with torch.no_grad():
            out = gm(*inputs)
        flat = out if isinstance(out, (tuple, list)) else (out,)
        return [t.detach().double() for t in flat if isinstance(t, torch.Tensor)]

    def _outputs(self, gm) -> list[list[torch.Tensor]]:
        if self.batch is not None:
            try:
                outs = self._run(gm, self.batch[0])
                if all(o.shape[0] == sum(self.batch[1]) for o in outs):
                    return [list(o.split(self.batch[1])) for o in outs]
            except RuntimeError:
                pass
            self.batch = None
        per_set = [self._run(gm, s) for s in self.sets]
        return [[p[i] for p in per_set] for i in range(len(per_set[0]))]

    def error(self, gm) -> float:
        """The budget's error; also sets ``self.mean_error``, the mean over outputs of
        ||new - ref||^2 / ||ref||^2 (the ranking score: smooth in the deletion, where the max is
        decided by a single worst pixel of a single input)."""
        worst, mean_terms = 0.0, []
        self.mean_error, self.accuracy = float("inf"), float("-inf")
        outputs = self._outputs(gm)
        for refs, news in zip(self.refs, outputs):
            for r, n in zip(refs, news):
                if r.shape != n.shape:
                    return float("inf")
                ref_max = float(r.abs().max())
                diff = float((n - r).abs().max())
                if not math.isfinite(diff):
                    return float("inf")
                worst = max(worst, diff / ref_max if ref_max > 0 else (0.0 if diff == 0 else float("inf")))
                ref_energy = float(r.pow(2).sum())
                mean_terms.append(float((n - r).pow(2).sum()) / ref_energy if ref_energy > 0 else 0.0)
        self.mean_error = sum(mean_terms) / max(len(mean_terms), 1)
        self.accuracy = self._accuracy(outputs)
        return worst


def _statistics(gm: fx.GraphModule, units: list[_Unit], sets, full: set[int]):
    """Second moments over the calibration sets: for units in ``full`` (rotatable), the matrix
    M = sum over the unit's values of E_pixels[x x^T]; for every value read by a reader, the per-channel
    energy E_pixels[x_c^2]."""
    full_watch: dict[str, int] = {}
    diag_watch: set[str] = set()
    for unit in units:
        if unit.id in full:
            for name in unit.base_of:
                full_watch[name] = unit.id
        for reader in unit.readers + unit.inner:
            diag_watch.add(_linear_parts(reader)[0].name)
    sums: dict[str, torch.Tensor] = {}
    energies: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if (n.name in full_watch or n.name in diag_watch) and isinstance(value, torch.Tensor):
                x = value.detach().double().movedim(1, -1).reshape(-1, value.shape[1])
                counts[n.name] = counts.get(n.name, 0) + x.shape[0]
                energies[n.name] = energies.get(n.name, 0) + (x * x).sum(0)
                if n.name in full_watch:
                    sums[n.name] = sums.get(n.name, 0) + x.T @ x
            return value

    batch = _batched(sets)
    with torch.no_grad():
        if batch is not None:
            Recorder(gm).run(*batch[0])
        else:
            for s in sets:
                Recorder(gm).run(*s)
    moments = {uid: 0 for uid in full}
    for name, total in sums.items():
        moments[full_watch[name]] = moments[full_watch[name]] + total / counts[name]
    return moments, {name: e / counts[name] for name, e in energies.items()}


def _compensable(node: fx.Node) -> bool:
    """A reader whose input channel can be replaced by its mean through the bias: a linear or a
    pointwise conv (with a spatial kernel, zero padding makes the border pixels differ)."""
    conv = ir.ConvCall.of(node)
    if conv is None:
        return node.op == "call_function" and node.target is F.linear and len(ir.shape(node) or ()) == 2
    w = ir.shape(conv.weight)
    return conv.groups == 1 and conv.padding in ((0, 0), "valid") and (w is None or tuple(w[2:]) == (1, 1))


def _chunks(sets, samples: int = 512):
    """The input sets regrouped into batches of about ``samples`` samples (fewer, larger forward passes);
    sets that cannot be concatenated are yielded as they are."""
    group: list = []
    for inputs in sets:
        group.append(inputs)
        if sum(s[0].shape[0] for s in group) >= samples:
            merged = _batched(group)
            yield from ([merged[0]] if merged is not None else group)
            group = []
    if group:
        merged = _batched(group)
        yield from ([merged[0]] if merged is not None else group)


def _reader_view(reader: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """The pixels of ``x`` a compensable reader actually sees (a strided 1x1 conv skips some)."""
    conv = ir.ConvCall.of(reader)
    if conv is not None and x.dim() == 4 and tuple(conv.stride) != (1, 1):
        return x[:, :, ::conv.stride[0], ::conv.stride[1]]
    return x


def _reader_key(reader: fx.Node) -> tuple[str, tuple]:
    conv = ir.ConvCall.of(reader)
    return _linear_parts(reader)[0].name, (tuple(conv.stride) if conv is not None else ())


def _reader_moments(reference: fx.GraphModule, current: fx.GraphModule | None, units: list[_Unit], sets):
    """For the input x of every compensable reader, over calibration samples and the pixels it reads,
    with x~ = [x; 1]: A = E[x~' x~'^T] and B = E[x~' x~^T], where x is the value in ``reference`` and x'
    the same value in ``current`` (the graph with the deletions so far; None: the reference itself, so
    B = A). The refit of a reader then reproduces its reference output from what it now receives."""
    readers = {_reader_key(r): r for u in units for r in u.readers if _compensable(r)}
    names = {name for name, _ in readers}
    a_sums, b_sums, counts = {}, {}, {}

    def record(gm, inputs) -> dict[str, torch.Tensor]:
        values = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if n.name in names and isinstance(value, torch.Tensor):
                    values[n.name] = value.detach()
                return value

        with torch.no_grad():
            Recorder(gm).run(*inputs)
        return values

    def rows(reader, value):
        x = _reader_view(reader, value).double().movedim(1, -1).reshape(-1, value.shape[1])
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)

    for inputs in _chunks(sets):
        ref_values = record(reference, inputs)
        new_values = record(current, inputs) if current is not None else ref_values
        for key, reader in readers.items():
            x_ref, x_new = rows(reader, ref_values[key[0]]), rows(reader, new_values[key[0]])
            a_sums[key] = a_sums.get(key, 0) + x_new.T @ x_new
            if current is not None:
                b_sums[key] = b_sums.get(key, 0) + x_new.T @ x_ref
            counts[key] = counts.get(key, 0) + x_new.shape[0]
    out = {}
    for key, total in a_sums.items():
        a = total / counts[key]
        out[key] = (a, b_sums[key] / counts[key] if current is not None else a)
    return out


def _parse_keep(keep) -> dict[int, int] | None:
    if keep is None or keep == "" or keep == "none":
        return None
    if isinstance(keep, dict):
        return {int(k): int(v) for k, v in keep.items()}
    if isinstance(keep, str):  # "3:16/5:32" (pipeline strings cannot hold dicts)
        out = {}
        for item in keep.replace(";", "/").split("/"):
            k, v = item.split(":")
            out[int(k)] = int(v)
        return out
    raise UsageError(f"slice: keep must be a dict {{space id: channels}} or 'id:n/id:n', got {keep!r}")


# --------------------------------------------------------------------------------------- the pass
@register_pass
class Slice(Pass):
    name = "slice"
    description = ("rotate channel spaces to the principal axes of calibration activations and delete low-variance "
                   "directions within an output-error budget or an accuracy drop on labelled data")
    contract = "lossy"
    option_defaults = {"budget": None, "accuracy_drop": None, "method": "pca", "keep": None, "random_inputs": 2,
                       "seed": 0, "granularity": 0.0625, "min_channels": 1, "spaces": "all", "compensate": "refit",
                       "score": "mean", "target_macs": None}
    default_budget = 0.01  # the output-error budget when neither budget nor accuracy_drop is given

    def lossy_budgets(self):
        budget, drop = super().lossy_budgets()
        return (self.default_budget if budget is None and drop is None else budget), drop

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from qlfx.symmetry import analyze, apply_elements

        method = self.options["method"]
        if method not in _METHODS:
            raise UsageError(f"slice: method must be one of {', '.join(_METHODS)}, got {method!r}")
        keep_given = _parse_keep(self.options["keep"])
        budget, accuracy_drop = self.lossy_budgets()
        if self.options["compensate"] not in _COMPENSATE:
            raise UsageError(f"slice: compensate must be one of {', '.join(map(str, _COMPENSATE))}, "
                             f"got {self.options['compensate']!r}")
        calibration = list(ctx.calibration)
        labels = list(ctx.labels)
        if accuracy_drop is not None and keep_given is None and not any(y is not None and bool((y >= 0).any())
                                                                        for y in labels):
            raise UsageError("slice<accuracy_drop=...> needs labelled calibration data: "
                             "qlfx.compile(model, 'slice<accuracy_drop=0.5>', calibration=x, labels=y)")
        if not calibration and (method == "pca" or keep_given is None):
            raise UsageError("slice needs calibration data (the activations it rotates to, and the inputs its budget "
                             "is measured on): qlfx.compile(model, 'slice<budget=0.01>', calibration=images)")
        result = PassResult(changed=False)
        report = analyze(gm)
        units: list[_Unit] = []
        rotatable_only = self.options["spaces"] == "rotatable"
        for unit in _units(report):
            if rotatable_only and not unit.rotatable:
                continue
            why = _plan(gm, report, unit)
            if why is not None:
                if not any(sp.group.value == "identity" for sp, _ in unit.members):
                    result.skipped.append(Skip(f"{unit.describe()}; {unit.space.sites[0] if unit.space.sites else ''}", why))
                continue
            units.append(unit)
        if not units:
            result.notes.append("no channel space can be sliced")
            return result

        # rank each unit's channels (and rotate rotatable ones to their principal axes for method="pca")
        if method == "pca":
            rotate = {u.id for u in units if u.rotatable}
            moments, energies = _statistics(gm, units, calibration, rotate)
            elements = {}
            for unit in units:
                if unit.id in rotate:
                    lam, u = torch.linalg.eigh(moments[unit.id])
                    unit.rotation = u.flip(1).T.contiguous()  # rows: principal axes, descending variance
                    elements[unit.space.id] = unit.rotation
                    unit.order = torch.arange(unit.size)
                else:
                    # no rotation in this group: rank base channels by what the readers receive from them,
                    # E[x_c^2] * |W_reader[:, c]|^2, summed over the readers and the unit's copies
                    score = torch.zeros(unit.size, dtype=torch.float64)
                    for reader in unit.readers + unit.inner:
                        x = _linear_parts(reader)[0]
                        w = ir.get_tensor(gm, _linear_parts(reader)[1]).detach().double()
                        col = w.movedim(1, 0).reshape(w.shape[1], -1).pow(2).sum(1)
                        score.index_add_(0, unit.base_of[x.name], energies[x.name] * col)
                    unit.order = torch.argsort(score, descending=True)
            if elements:
                apply_elements(gm, elements, report)
        else:
            for unit in units:
                norms = torch.zeros(unit.size, dtype=torch.float64)
                for node in unit.writers:
                    w = ir.get_tensor(gm, _linear_parts(node)[1]).detach().double()
                    norms.index_add_(0, unit.base_of[node.name], w.reshape(w.shape[0], -1).pow(2).sum(1))
                unit.order = torch.argsort(norms, descending=True)

        # private copies of every tensor we will mask or slice (a shared constant must not change elsewhere)
        self._unshare(gm, units)
        self._calibration = calibration
        self._reference = copy.deepcopy(gm)  # the rotated, unsliced graph: what refits reproduce
        self._drifted = False  # True once the moments are those of a graph with deletions
        self._moments = _reader_moments(gm, None, units, calibration) if self.options["compensate"] and calibration else {}

        eval_sets = calibration + make_random_inputs(ctx.example_inputs, int(self.options["seed"]),
                                                     int(self.options["random_inputs"]))
        # references: after the exact rotation
        evaluator = _Evaluator(gm, eval_sets, labels) if eval_sets else None
        if keep_given is not None:
            by_id = {u.id: u for u in units}
            unknown = set(keep_given) - set(by_id)
            if unknown:
                raise UsageError(f"slice: keep names unit(s) {sorted(unknown)} that cannot be sliced here; "
                                 f"sliceable: {sorted(by_id)}")
            for uid, k in keep_given.items():
                by_id[uid].keep = max(int(self.options["min_channels"]), min(by_id[uid].size, int(k)))
            if self.options["compensate"] == "refit" and calibration:
                for _ in range(2):  # the deletion is one step; refit twice so upstream refits settle
                    self._moments = _reader_moments(self._reference, self._masked(gm, units), units, calibration)
                    self._drifted = True
        else:
            self._greedy(gm, units, evaluator, budget, accuracy_drop, ctx, result)
        error = evaluator.error(self._masked(gm, units)) if evaluator is not None else float("nan")
        if evaluator is not None and evaluator.labelled:
            result.stats.update({"accuracy_before": evaluator.base_accuracy, "accuracy_after": evaluator.accuracy})

        macs_before = count_macs(gm)
        for unit in units:
            if unit.keep < unit.size:
                if keep_given is not None and not ctx.allow_rewrite():
                    unit.keep = unit.size
                    continue
                self._delete(gm, unit)
                result.rewrites.append(f"{unit.describe()}: kept {unit.keep}"
                                       f"{' principal directions' if unit.rotation is not None else ' channels'}")
                result.changed = True
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
        ir.propagate_shapes(gm, ctx.example_inputs)
        macs_after = count_macs(gm)
        result.stats.update({
            "method": method, "budget": budget, "accuracy_drop": accuracy_drop, "error": error, "macs_before": macs_before, "macs_after": macs_after,
            "keep": {u.id: u.keep for u in units},
            "dropped": {u.id: sorted(int(j) for j in u.order[u.keep:]) for u in units if u.keep < u.size},
            "spaces": {u.id: {"groups": sorted({sp.group.value for sp, _ in u.members}), "size": u.size,
                              "kept": u.keep, "rotated": u.rotation is not None,
                              "members": [sp.id for sp, _ in u.members],
                              "site": u.space.sites[0] if u.space.sites else ""} for u in units},
        })
        accuracy = (f"; top-1 {evaluator.base_accuracy:.2f}% -> {evaluator.accuracy:.2f}% on labelled calibration "
                    f"(allowed drop {accuracy_drop})" if evaluator is not None and evaluator.labelled else "")
        result.notes.append(f"method={method}: MACs {macs_before:,} -> {macs_after:,} "
                            f"({macs_before / max(macs_after, 1):.2f}x fewer); output error {error:.3g} "
                            f"(budget {budget}) on {len(eval_sets)} input set(s){accuracy}")
        return result

    # ---------------------------------------------------------------------------------- internals
    def _unshare(self, gm, units) -> None:
        def private(node, w, b, hint):
            with gm.graph.inserting_before(node):
                new_w = ir.constant_node(gm, ir.get_tensor(gm, w).detach().clone(), f"{hint}_weight_sl")
                new_b = None if b is None else ir.constant_node(gm, ir.get_tensor(gm, b).detach().clone(), f"{hint}_bias_sl")
            return new_w, new_b

        done = set()
        for unit in units:
            for node in unit.writers + unit.readers + unit.depthwise:
                if node.name in done:
                    continue
                done.add(node.name)
                _, w, b, _ = _linear_parts(node)
                new_w, new_b = private(node, w, b, node.name)
                if new_b is None and self.options["compensate"] and node in unit.readers and _compensable(node):
                    with gm.graph.inserting_before(node):
                        cout = ir.get_tensor(gm, new_w).shape[0]
                        new_b = ir.constant_node(gm, torch.zeros(cout, dtype=ir.get_tensor(gm, new_w).dtype),
                                                 f"{node.name}_bias_sl")
                _set_linear_parts(node, new_w, new_b)
            for node, i in unit.constants:
                with gm.graph.inserting_before(node):
                    c = ir.constant_node(gm, ir.get_tensor(gm, node.args[i]).detach().clone(), f"{node.name}_const_sl")
                args = list(node.args)
                args[i] = c
                node.args = tuple(args)
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        gm.recompile()
        self._saved = {}  # unmasked tensors, restored before each trial
        for unit in units:
            for node in unit.writers + unit.depthwise + unit.readers:
                _, w, b, _ = _linear_parts(node)
                self._saved[w.target] = ir.get_tensor(gm, w).detach().clone()
                if b is not None:
                    self._saved[b.target] = ir.get_tensor(gm, b).detach().clone()
            for node, i in unit.constants:
                self._saved[node.args[i].target] = ir.get_tensor(gm, node.args[i]).detach().clone()

    def _masked(self, gm, units) -> fx.GraphModule:
        """Every tensor at its saved value, with the deleted channels of every unit zeroed where they
        are produced (writers' and per-channel convs' rows and biases, added constants): a zero channel
        stays zero through the unit's ops, so this computes exactly what the sliced graph computes."""
        with torch.no_grad():
            for target, value in self._saved.items():
                ir.get_tensor(gm, target).copy_(value)
            mode = self.options["compensate"]
            for unit in units:  # first the readers' compensation (a reader may also be a writer)
                if not mode or (unit.keep >= unit.size and not self._drifted):
                    continue
                dropped_base = unit.order[unit.keep:]
                for node in unit.readers:
                    x, w, b, _ = _linear_parts(node)
                    if b is None or not _compensable(node) or _reader_key(node) not in self._moments:
                        continue
                    weight, bias = ir.get_tensor(gm, w), ir.get_tensor(gm, b)
                    w2 = weight.reshape(weight.shape[0], weight.shape[1])  # a view: writes reach the weight
                    a, cross = self._moments[_reader_key(node)]
                    c = w2.shape[1]
                    full = torch.cat([w2.double(), bias.double()[:, None]], dim=1)  # [W, b] of the reference
                    if mode in ("refit", "refit-once"):
                        # least squares: [W'_K, b'] = [W, b] E[x~ x~'_K~^T] E[x~'_K~ x~'_K~^T]^-1, K~ = kept + bias
                        kept = torch.cat([unit.kept_channels(x.name, dropped_base), torch.tensor([c])])
                        gram = a[kept][:, kept]
                        gram = gram + 1e-6 * float(torch.diagonal(gram).mean()) * torch.eye(len(kept), dtype=gram.dtype)
                        fitted = torch.linalg.solve(gram, (full @ cross[kept].T).T).T
                        w2[:, kept[:-1]] = fitted[:, :-1].to(w2.dtype)
                        bias.copy_(fitted[:, -1].to(bias.dtype))
                    else:  # the dropped channels' reference means, through the bias
                        dropped = unit.dropped_channels(x.name, dropped_base)
                        bias.add_((w2[:, dropped].double() @ cross[c, dropped]).to(bias.dtype))
            for unit in units:
                if unit.keep >= unit.size:
                    continue
                dropped_base = unit.order[unit.keep:]
                for node in unit.writers + unit.depthwise:
                    dropped = unit.dropped_channels(node.name, dropped_base)
                    _, w, b, _ = _linear_parts(node)
                    ir.get_tensor(gm, w)[dropped] = 0.0
                    if b is not None:
                        ir.get_tensor(gm, b)[dropped] = 0.0
                for node, i in unit.constants:
                    t = ir.get_tensor(gm, node.args[i])
                    axis = t.dim() - (len(ir.shape(node)) - 1)
                    t.index_fill_(axis, unit.dropped_channels(node.name, dropped_base), 0.0)
        return gm

    def _greedy(self, gm, units, evaluator, budget, accuracy_drop, ctx, result) -> None:
        if evaluator is None or (budget is None and accuracy_drop is None):
            raise UsageError("slice: give a budget or an accuracy_drop (and calibration data), or keep={space id: channels}")
        # margin for the rounding of the final (physically sliced) graph
        limit = budget * (1.0 - 1e-3) if budget is not None else float("inf")
        if self.options["score"] not in ("mean", "max"):
            raise UsageError(f"slice: score must be 'mean' or 'max', got {self.options['score']!r}")
        by_mean = self.options["score"] == "mean" or budget is None

        def accurate() -> bool:  # of the state the evaluator measured last
            return accuracy_drop is None or evaluator.base_accuracy - evaluator.accuracy <= accuracy_drop + 1e-9

        def fits(err: float) -> bool:
            return err <= limit and accurate()

        target = self.options["target_macs"]
        base_macs = macs_by_node(gm)
        current = evaluator.error(self._masked(gm, units))
        current_mean = evaluator.mean_error
        granularity = float(self.options["granularity"])
        floor = int(self.options["min_channels"])
        # Lazy greedy: each space's next move is scored (MACs saved per unit of error added) when it is
        # tried; after a move is taken the other scores are stale, and only the best-looking one is
        # re-measured before it is taken. Every accepted move is measured in the current state, so the
        # budget holds exactly; only the ordering is heuristic. ~2 evaluations per move instead of #spaces.
        cache: dict[int, tuple] = {}  # space id -> (gain, error, fresh, mean, (fits budget, fits accuracy))
        done: set[int] = set()
        evaluations = refits = 0

        def step_of(plan):
            return max(1, round(plan.size * granularity))

        def measure(plan):
            nonlocal evaluations
            step = step_of(plan)
            plan.keep -= step
            err = evaluator.error(self._masked(gm, units))
            ok = (err <= limit, accurate())
            plan.keep += step
            evaluations += 1
            if by_mean:
                gain = plan.macs_per_channel * step / max(evaluator.mean_error - current_mean, 1e-12)
            else:
                gain = plan.macs_per_channel * step / max(err - current, 1e-9 * max(limit, 1e-12))
            return gain, err, True, evaluator.mean_error, ok

        while True:
            if target is not None and _macs_after(base_macs, units) <= float(target):
                break
            live = [p for p in units if p.id not in done and p.keep - step_of(p) >= floor]
            if not live:
                break
            for plan in live:
                if plan.id not in cache:
                    cache[plan.id] = measure(plan)
            # The path is chosen without labels (gain from the mean output error; the output budget
            # retires a space). The accuracy budget only stops it, at the first best move that breaks it:
            # searching on for other moves that happen to keep the labelled accuracy would fit the
            # search to those few labels (measured: 0.4 points drop there, 1.3 on unseen images).
            feasible = [p for p in live if cache[p.id][4][0] or not cache[p.id][2]]
            if not feasible:
                break
            plan = max(feasible, key=lambda p: cache[p.id][0])
            gain, err, fresh, mean, ok = cache[plan.id]
            if not fresh:
                cache[plan.id] = gain, err, fresh, mean, ok = measure(plan)
                if not ok[0]:
                    done.add(plan.id)
                    continue
                others = [cache[p.id][0] for p in feasible if p is not plan]
                if others and gain < max(others):
                    continue  # re-rank with the fresh score
            elif not ok[0]:
                done.add(plan.id)
                continue
            if not ok[1]:
                result.stats["stopped_by"] = "accuracy_drop"
                break
            if not ctx.allow_rewrite():
                result.skipped.append(Skip("slice", "rewrite limit reached (bisection)"))
                break
            plan.keep -= step_of(plan)
            current, current_mean = err, mean
            if self.options["compensate"] == "refit" and self._calibration:
                # refit after every step: the readers reproduce their reference outputs from what they now
                # receive (earlier deletions included); kept only if the result still fits the budget
                saved = self._moments, self._drifted
                self._moments = _reader_moments(self._reference, self._masked(gm, units), units, self._calibration)
                self._drifted = True
                err = evaluator.error(self._masked(gm, units))
                refits += 1
                if fits(err):
                    current, current_mean = err, evaluator.mean_error
                else:
                    self._moments, self._drifted = saved
            del cache[plan.id]
            cache.update({k: (v[0], v[1], False, v[3], v[4]) for k, v in cache.items()})
        result.stats["evaluations"] = evaluations
        result.stats["refits"] = refits
        self._masked(gm, units)

    def _delete(self, gm, unit: _Unit) -> None:
        dropped_base = unit.order[unit.keep:]

        def replace(node, new_w, new_b, keep_bias_node=False):
            _, w, b, _ = _linear_parts(node)
            with gm.graph.inserting_before(node):
                wn = ir.constant_node(gm, new_w, f"{node.name}_weight_sliced")
                bn = b if keep_bias_node else (None if new_b is None else ir.constant_node(gm, new_b, f"{node.name}_bias_sliced"))
            _set_linear_parts(node, wn, bn)
            self._saved[wn.target] = new_w
            if bn is not None and not keep_bias_node:
                self._saved[bn.target] = new_b
            return wn

        def current(t_node):  # the masked graph computes the sliced function: slice its tensors
            return ir.get_tensor(gm, t_node).detach()

        for node in unit.writers:
            kept = unit.kept_channels(node.name, dropped_base)
            _, w, b, _ = _linear_parts(node)
            replace(node, current(w)[kept].contiguous(), None if b is None else current(b)[kept].contiguous())
        for node in unit.depthwise:
            kept = unit.kept_channels(node.name, dropped_base)
            _, w, b, _ = _linear_parts(node)
            replace(node, current(w)[kept].contiguous(), None if b is None else current(b)[kept].contiguous())
            conv = ir.ConvCall.of(node)
            conv.set_args(groups=int(unit.kept_channels(conv.input.name, dropped_base).numel()))
        for node in unit.slices:
            x = node.args[0]
            _, a, b = _slice_bounds(node, ir.shape(x)[1])
            gone = torch.isin(unit.base_of[x.name], dropped_base)
            a2, b2 = a - int(gone[:a].sum()), b - int(gone[:b].sum())
            index = list(node.args[1])
            index[1] = slice(a2, b2, None)
            node.args = (x, tuple(index))
        for node in unit.readers + unit.inner:
            x = _linear_parts(node)[0]
            kept = unit.kept_channels(x.name, dropped_base)
            _, w, b, _ = _linear_parts(node)
            replace(node, current(w)[:, kept].contiguous(), None, keep_bias_node=True)
        for node, i in unit.constants:
            t = ir.get_tensor(gm, node.args[i]).detach()
            axis = t.dim() - (len(ir.shape(node)) - 1)
            with gm.graph.inserting_before(node):
                c = ir.constant_node(gm, t.index_select(axis, unit.kept_channels(node.name, dropped_base)),
                                     f"{node.name}_const_sliced")
            args = list(node.args)
            args[i] = c
            node.args = tuple(args)
        for node in unit.radials:
            mod = gm.get_submodule(node.target)
            if getattr(mod, "radius", None) is None:
                # keep r = sqrt(C_original): the default would shrink with the channel count
                fixed = copy.deepcopy(mod)
                fixed.radius = math.sqrt(ir.shape(node)[1])
                new_name = node.target.replace(".", "_") + "_r"
                while hasattr(gm, new_name):
                    new_name += "_"
                gm.add_submodule(new_name, fixed)
                node.target = new_name
