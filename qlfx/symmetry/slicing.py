"""The statistics and refits behind the ``slice`` pass (passes/slice.py): the units of channels it
deletes together, running a graph on calibration data, second moments of channel values and their
principal axes, least-squares refits of the values' readers, trial deletions, and the output score the
search ranks its moves by.

**Units** (:class:`Unit`, :func:`units_of`): an untied channel space, or a class of spaces whose
permutations are tied (per-channel ops, products); base index j names the channels deleted together.
A product's channels may also form a unit of their own (:mod:`qlfx.symmetry.product_slicing`), so two
units can delete channels of one value.

**Running.** A graph captured without ``dynamic_batch`` specialises the example's batch size B (a
flatten is ``aten.view(x, [B, C*H*W])``), so :class:`Runner` feeds it chunks of exactly B samples; a
last chunk of r < B samples is padded with repeats of its own samples and the padding is cut from
every value before use -- exact, since the samples of an eval-mode graph do not interact. A graph with
a symbolic batch runs each input set whole.

**Moments.** x in R^C is a value's channel vector at one pixel of one sample; over all of them

    M = E[x x^T]      (uncentred),      energies  e_c = E[x_c^2] = M_cc.

Summing M over several values of one channel space gives that space's moment. Its principal axes:
with M = U diag(lambda) U^T, lambda descending, the rows of P = U^T (:func:`principal_axes`) are the
directions of decreasing energy, and dropping the last C - k of them loses sum_{i>k} lambda_i, the
least any C - k deleted directions can.

**Refits.** A reader (a linear, or a 1x1 conv with one group and no padding) computes y = W x + b.
With x~ = [x; 1], x the reader's input in a reference graph and x' the same value in the current one,
:func:`reader_moments` measures, over the pixels the reader reads,

    A = E[x~' x~'^T],      B = E[x~' x~^T],

and :func:`refit` solves  [W'_K, b'] = argmin E||W'_K x'_K + b' - (W x + b)||^2 over the kept channels
K (those every unit holding the reader's input keeps, and the bias entry, K~):  [W'_K, b'] = [W, b] B[K~]^T A[K~, K~]^-1 (ridge 1e-6 * mean diag).
:func:`mean_shift` is the cheap alternative: b' = b + W[:, D] E[x_D] for the deleted channels D.

**Trial deletions** (:class:`TrialDeletion`): the graph keeps its shapes; the deleted channels are
zeroed where they are produced (writers' rows and biases, per-channel constants) after the readers
are refitted. A zero channel stays zero through every op of its unit and adds nothing to a radial
norm, so this computes exactly what the physically sliced graph computes.

**Progress** (:class:`Progress`): one line per evaluation on stderr -- moves tried / accepted, the
current error against the budget, the MACs saved -- like the TVM tuner's lines (qlfx.emit.tvm).

**Score** (:class:`OutputScore`): per output, over the input sets, max|new - ref| / max|ref| (the lossy
budget, as the pass manager checks it), the mean of ||new - ref||^2 / ||ref||^2 (smooth: every sample
counts) and the top-1 accuracy of the first output on the labelled sets. With ``mean="kl"`` the first
output counts as class logits instead: the mean over samples of KL(softmax(ref) || softmax(new)), which
weighs a sample's change by how much it moves the predicted distribution -- a small logit change barely
counts on a confident sample and counts fully near the decision boundary, where top-1 flips.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Iterable, Iterator, Sequence

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.verify import run_outputs, top1_correct

__all__ = ["Unit", "units_of", "linear_view", "Runner", "channel_moments", "principal_axes", "compensable",
           "reader_key", "reader_moments", "refit", "mean_shift", "TrialDeletion", "OutputScore", "Progress",
           "record_values"]

InputSet = tuple[torch.Tensor, ...]


# -------------------------------------------------------------------------------------------- units
class Unit:
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
        self.regrouped: list[fx.Node] = []  # per-channel convs into the unit from outside: rows only (product units)
        self.slices: list[fx.Node] = []  # x[:, a:b] inside the unit
        self.reshapes: list[fx.Node] = []  # view / reshape inside the unit: the channel size
        self.readers: list[fx.Node] = []  # conv/linear from the unit out: columns
        self.inner: list[fx.Node] = []  # conv/linear from the unit into it (also in writers): rows and columns
        self.constants: list[tuple[fx.Node, int]] = []  # (node, arg index of a per-channel constant)
        self.radials: list[fx.Node] = []
        self.order: torch.Tensor | None = None  # base indices, most important first
        self.rotation: torch.Tensor | None = None
        self.keep: int = size
        self.importance: torch.Tensor | None = None  # per base index: what deleting it costs (a proxy)
        self.energy: torch.Tensor | None = None  # a rotated unit: the energy of principal axis j
        self.product: str | None = None  # a product unit: the product node (qlfx.symmetry.product_slicing)

    @property
    def space(self):
        return self.members[0][0]

    @property
    def rotatable(self) -> bool:
        return len(self.members) == 1 and self.members[0][1] == 1 and self.space.group.value in ("O", "GL")

    @property
    def convs(self) -> list[fx.Node]:
        """Every conv/linear whose weight the unit slices (rows, columns or both; each once)."""
        return list(dict.fromkeys(self.writers + self.depthwise + self.regrouped + self.readers))

    def describe(self) -> str:
        groups = sorted({m.group.value for m, _ in self.members})
        ids = ",".join(str(m.id) for m, _ in self.members)
        if self.product is not None:
            return f"product {self.product} (unit {self.id}, space {ids}: {'/'.join(groups)}, {self.size} ch)"
        return f"space{'s' if len(self.members) > 1 else ''} {ids} ({'/'.join(groups)}, {self.size} ch)"

    def dropped_channels(self, node_name: str) -> torch.Tensor:
        return torch.nonzero(torch.isin(self.base_of[node_name], self.order[self.keep:])).flatten()

    def kept_channels(self, node_name: str) -> torch.Tensor:
        return torch.nonzero(~torch.isin(self.base_of[node_name], self.order[self.keep:])).flatten()


def units_of(report) -> list[Unit]:
    """The units of a symmetry report: each untied space, and each class of tied spaces."""
    units, seen = [], set()
    for space in report.spaces:
        if space.id in seen:
            continue
        if space.tie is None:
            units.append(Unit(space.id, [(space, 1)], space.size))
            seen.add(space.id)
            continue
        members = [(report.spaces[sid], m) for sid, m in report.ties[space.tie]]
        base = min(sp.size // m for sp, m in members)
        units.append(Unit(min(sp.id for sp, _ in members), members, base))
        seen.update(sp.id for sp, _ in members)
    return units


def linear_view(node: fx.Node) -> ir.ConvCall | ir.LinearCall | None:
    """The conv / linear view of a node whose weight a unit slices."""
    return ir.ConvCall.of(node) or ir.LinearCall.of(node)


# ------------------------------------------------------------------------------------------ running
class Runner:
    """Runs a graph on input sets of any size: in chunks of the example's batch when the graph has a
    static batch size (``batch``), else each set whole (``batch=None``)."""

    def __init__(self, example_inputs: Sequence[torch.Tensor], dynamic_batch: bool):
        self.batch = None if dynamic_batch else int(example_inputs[0].shape[0])
        self.samples = 0  # samples run so far, all graphs together: the search's machine-independent cost

    def chunks(self, inputs: InputSet) -> Iterator[tuple[InputSet, int]]:
        """(inputs of exactly ``batch`` samples, how many of them are real), covering the set in order."""
        n = int(inputs[0].shape[0])
        self.samples += n
        if self.batch is None or n == self.batch:
            yield inputs, n
            return
        for start in range(0, n, self.batch):
            piece = tuple(t[start:start + self.batch] for t in inputs)
            real = int(piece[0].shape[0])
            if real < self.batch:  # pad with the chunk's own samples; cut again by trim()
                repeat = torch.arange(self.batch) % real
                piece = tuple(t[repeat] for t in piece)
            yield piece, real

    def trim(self, value: torch.Tensor, real: int) -> torch.Tensor:
        if self.batch is None or real == self.batch:
            return value
        if value.dim() == 0 or value.shape[0] != self.batch:
            raise ValueError(f"a value of shape {tuple(value.shape)} has no batch axis, so a calibration set whose "
                             f"size is not a multiple of the example batch ({self.batch}) cannot be padded; give "
                             f"calibration sets of {self.batch} samples or capture with dynamic_batch=True")
        return value[:real]

    def outputs(self, gm: fx.GraphModule, inputs: InputSet) -> list[torch.Tensor]:
        """The graph's tensor outputs on the whole set, in float64."""
        parts = [[self.trim(t.detach().double(), real) for t in run_outputs(gm, piece)]
                 for piece, real in self.chunks(inputs)]
        return [torch.cat(ts) for ts in zip(*parts)]

    def values(self, graphs: Sequence[fx.GraphModule], names: set[str],
               sets: Iterable[InputSet]) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Per chunk of every set: for each graph, the values of the nodes named ``names``."""
        for inputs in sets:
            for piece, real in self.chunks(inputs):
                yield [{k: self.trim(v, real) for k, v in record_values(gm, names, piece).items()} for gm in graphs]


def record_values(gm: fx.GraphModule, names: set[str], inputs: InputSet) -> dict[str, torch.Tensor]:
    """The values of the nodes named ``names`` in one run of ``gm`` on ``inputs`` (no autograd)."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in names and isinstance(value, torch.Tensor):
                values[n.name] = value.detach()
            return value

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(samples * pixels, C) rows of a value (N, C, ...), in float64."""
    return x.double().movedim(1, -1).reshape(-1, x.shape[1])


# ------------------------------------------------------------------------------------------ moments
def channel_moments(runner: Runner, gm: fx.GraphModule, sets: Sequence[InputSet], full: dict[str, tuple[object, int]],
                    diagonal: set[str]) -> tuple[dict[object, torch.Tensor], dict[str, torch.Tensor]]:
    """(M per key: the sum of E[x x^T] over the values ``full`` maps to (key, copies); e_c = E[x_c^2]
    over the channel axis of every value in ``diagonal``). A value holding ``copies`` copies of its
    space (channel c*copies + r is the space's channel c, e.g. a flatten) counts each copy as a pixel."""
    names = set(full) | set(diagonal)
    sums: dict[str, torch.Tensor] = {}
    energies: dict[str, torch.Tensor] = {}
    rows: dict[tuple[str, bool], int] = {}  # (name, as copies) -> rows summed
    for (values,) in runner.values([gm], names, sets):
        for name, value in values.items():
            if name in diagonal:
                x = _pixels(value)
                rows[name, False] = rows.get((name, False), 0) + x.shape[0]
                energies[name] = energies.get(name, 0) + (x * x).sum(0)
            if name in full:
                copies = full[name][1]
                x = _pixels(value.unflatten(1, (value.shape[1] // copies, copies)))
                rows[name, True] = rows.get((name, True), 0) + x.shape[0]
                sums[name] = sums.get(name, 0) + x.T @ x
    moments: dict[object, torch.Tensor] = {}
    for name, total in sums.items():  # every value weighs the same, however many pixels it has
        moments[full[name][0]] = moments.get(full[name][0], 0) + total / rows[name, True]
    return moments, {name: e / rows[name, False] for name, e in energies.items()}


def principal_axes(moment: torch.Tensor) -> torch.Tensor:
    """P = U^T for M = U diag(lambda) U^T: row i is the i-th principal axis (lambda descending)."""
    _, u = torch.linalg.eigh(moment)
    return u.flip(1).T.contiguous()


# ------------------------------------------------------------------------------------------- refits
def compensable(reader: fx.Node) -> bool:
    """A reader whose inputs can be refitted per pixel: a linear on (N, C), or a 1x1 conv with one group
    and no padding (with a spatial kernel, zero padding makes the border pixels differ)."""
    conv = ir.ConvCall.of(reader)
    if conv is None:
        return ir.LinearCall.of(reader) is not None and len(ir.shape(reader) or ()) == 2
    return conv.groups == 1 and conv.padding in ((0, 0), "valid") and conv.kernel == (1, 1)


def reader_key(reader: fx.Node) -> tuple[str, tuple]:
    """(the value it reads, its stride): readers with the same key see the same pixels."""
    conv = ir.ConvCall.of(reader)
    view = conv or ir.LinearCall.of(reader)
    return view.input.name, (tuple(conv.stride) if conv is not None else ())


def _reader_rows(key: tuple[str, tuple], value: torch.Tensor) -> torch.Tensor:
    """x~ = [x; 1] at the pixels the reader reads (a strided 1x1 conv skips some)."""
    stride = key[1]
    if value.dim() == 4 and stride and tuple(stride) != (1, 1):
        value = value[:, :, ::stride[0], ::stride[1]]
    x = _pixels(value)
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def reader_moments(runner: Runner, reference: fx.GraphModule, current: fx.GraphModule | None,
                   readers: Iterable[fx.Node], sets: Sequence[InputSet]) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per reader key (module docstring), x from ``reference`` and x' from ``current`` (None: the
    reference itself, so B = A)."""
    keys = {reader_key(r) for r in readers if compensable(r)}
    names = {name for name, _ in keys}
    graphs = [reference] if current is None else [reference, current]
    a_sums: dict[tuple, torch.Tensor] = {}
    b_sums: dict[tuple, torch.Tensor] = {}
    counts: dict[tuple, int] = {}
    for recorded in runner.values(graphs, names, sets):
        ref_values, new_values = recorded[0], recorded[-1]
        for key in keys:
            x_new = _reader_rows(key, new_values[key[0]])
            a_sums[key] = a_sums.get(key, 0) + x_new.T @ x_new
            if current is not None:
                b_sums[key] = b_sums.get(key, 0) + x_new.T @ _reader_rows(key, ref_values[key[0]])
            counts[key] = counts.get(key, 0) + x_new.shape[0]
    out = {}
    for key, total in a_sums.items():
        a = total / counts[key]
        out[key] = (a, b_sums[key] / counts[key] if current is not None else a)
    return out


def refit(weight: torch.Tensor, bias: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor],
          kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares [W'_K, b'] = [W, b] B[K~]^T A[K~, K~]^-1 for a reader with weight ``weight``
    [C_out, C_in] and ``bias``; returns (W'_K [C_out, |K|], b') in float64."""
    a, cross = moments
    c = weight.shape[1]
    full = torch.cat([weight.double(), bias.double()[:, None]], dim=1)  # [W, b] of the reference
    rows = torch.cat([kept, torch.tensor([c])])  # K~: the kept channels and the bias entry
    gram = a[rows][:, rows]
    gram = gram + 1e-6 * float(torch.diagonal(gram).mean()) * torch.eye(len(rows), dtype=gram.dtype)
    fitted = torch.linalg.solve(gram, (full @ cross[rows].T).T).T
    return fitted[:, :-1], fitted[:, -1]


def mean_shift(weight: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor], dropped: torch.Tensor) -> torch.Tensor:
    """W[:, D] E[x_D]: what the deleted channels D added to a reader's output on average."""
    cross = moments[1]
    return weight[:, dropped].double() @ cross[weight.shape[1], dropped]


# ---------------------------------------------------------------------------------- trial deletions
class TrialDeletion:
    """The graph with every unit cut to ``unit.keep`` simulated in place: private copies of the tensors
    it slices (a shared constant must not change elsewhere), their unsliced values saved, the readers'
    refit moments."""

    def __init__(self, gm: fx.GraphModule, units: list[Unit], compensate):
        self.gm, self.units, self.compensate = gm, units, compensate
        self._moments: dict = {}
        self._fits: dict = {}  # (reader, kept count) -> its refit under the current moments
        self.drifted = False  # True once the moments are those of a graph with deletions
        self._unshare()
        # reader -> the units whose channels its input holds (readers of several units are fitted once)
        self._readers = {r: [u for u in units if linear_view(r).input.name in u.base_of]
                         for r in dict.fromkeys(r for u in units for r in u.readers)}
        self.saved = {}
        for unit in units:
            for node in unit.convs:
                for t in (linear_view(node).weight, linear_view(node).bias):
                    if t is not None:
                        self.saved[t.target] = ir.get_tensor(gm, t).detach().clone()
            for node, i in unit.constants:
                self.saved[node.args[i].target] = ir.get_tensor(gm, node.args[i]).detach().clone()

    @property
    def moments(self) -> dict:
        return self._moments

    @moments.setter
    def moments(self, value: dict) -> None:
        self._moments, self._fits = value, {}  # a refit is a function of the moments and the kept channels

    def _unshare(self) -> None:
        gm = self.gm

        def private(node, t, hint):
            with gm.graph.inserting_before(node):
                return ir.constant_node(gm, ir.get_tensor(gm, t).detach().clone(), hint)

        readers = {r for u in self.units for r in u.readers}
        for node in dict.fromkeys(n for u in self.units for n in u.convs):
            view = linear_view(node)
            weight = private(node, view.weight, f"{node.name}_weight_sl")
            bias = None if view.bias is None else private(node, view.bias, f"{node.name}_bias_sl")
            if bias is None and self.compensate and node in readers and compensable(node):
                w = ir.get_tensor(gm, weight)
                with gm.graph.inserting_before(node):  # a refit needs a bias to write to
                    bias = ir.constant_node(gm, torch.zeros(w.shape[0], dtype=w.dtype), f"{node.name}_bias_sl")
            view.set_args(weight=weight, bias=bias)
        for unit in self.units:
            for node, i in unit.constants:
                args = list(node.args)
                args[i] = private(node, args[i], f"{node.name}_const_sl")
                node.args = tuple(args)
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        gm.recompile()

    def apply(self) -> fx.GraphModule:
        """Every tensor at its saved value, the readers refitted, then the deleted channels of every unit
        zeroed where they are produced (writers' and per-channel convs' rows and biases, constants): a
        zero channel stays zero through the unit's ops, so this computes what the sliced graph computes."""
        gm = self.gm
        with torch.no_grad():
            for target, value in self.saved.items():
                ir.get_tensor(gm, target).copy_(value)
            for node, holders in self._readers.items():  # first the readers' compensation
                # (a reader may also be a writer); its input may lose channels to several units (a
                # product unit and the stream's): it is fitted to what all of them keep
                if not self.compensate or (all(u.keep >= u.size for u in holders) and not self.drifted):
                    continue
                view = linear_view(node)
                key = reader_key(node)
                if view.bias is None or not compensable(node) or key not in self.moments:
                    continue
                weight, bias = ir.get_tensor(gm, view.weight), ir.get_tensor(gm, view.bias)
                w2 = weight.reshape(weight.shape[0], weight.shape[1])  # a view: writes reach the weight
                kept_mask = torch.ones(w2.shape[1], dtype=torch.bool)
                for unit in holders:
                    kept_mask &= ~torch.isin(unit.base_of[view.input.name], unit.order[unit.keep:])
                if self.compensate in ("refit", "refit-once"):
                    kept = torch.nonzero(kept_mask).flatten()
                    fit = (node.name, tuple(u.keep for u in holders))  # the search revisits states: solve each once
                    if fit not in self._fits:
                        self._fits[fit] = refit(self.saved[view.weight.target].reshape(w2.shape),
                                                self.saved[view.bias.target], self.moments[key], kept)
                    fitted_w, fitted_b = self._fits[fit]
                    w2[:, kept] = fitted_w.to(w2.dtype)
                    bias.copy_(fitted_b.to(bias.dtype))
                else:
                    dropped = torch.nonzero(~kept_mask).flatten()
                    bias.add_(mean_shift(w2, self.moments[key], dropped).to(bias.dtype))
            for unit in self.units:
                if unit.keep >= unit.size:
                    continue
                for node in unit.writers + unit.depthwise + unit.regrouped:
                    dropped = unit.dropped_channels(node.name)
                    view = linear_view(node)
                    ir.get_tensor(gm, view.weight)[dropped] = 0.0
                    if view.bias is not None:
                        ir.get_tensor(gm, view.bias)[dropped] = 0.0
                for node, i in unit.constants:
                    t = ir.get_tensor(gm, node.args[i])
                    t.index_fill_(t.dim() - (len(ir.shape(node)) - 1), unit.dropped_channels(node.name), 0.0)
        return gm


# -------------------------------------------------------------------------------------------- score
class OutputScore:
    """The output error of a graph against the reference outputs on fixed input sets, and its top-1
    accuracy (percent, first output) on the sets that carry labels (module docstring)."""

    def __init__(self, runner: Runner, gm: fx.GraphModule, sets: list[InputSet], labels: list[torch.Tensor | None],
                 mean: str = "mse"):
        self.runner = runner
        self.mean = mean  # "mse": relative squared error per output; "kl": the first output as logits (below)
        self.sets = sets
        self.labels = list(labels) + [None] * (len(sets) - len(labels))
        self.labelled = any(y is not None for y in self.labels)
        self.refs = self._outputs(gm)
        self.base_accuracy = self._accuracy(self.refs)
        self.accuracy = self.base_accuracy
        self.mean_error = 0.0

    def _outputs(self, gm) -> list[list[torch.Tensor]]:
        """Per input set, the graph's outputs."""
        return [self.runner.outputs(gm, s) for s in self.sets]

    def _accuracy(self, outputs) -> float:
        if not self.labelled:
            return float("nan")
        correct = total = 0
        for outs, y in zip(outputs, self.labels):
            if y is not None:
                c, n = top1_correct(outs[0], y)
                correct, total = correct + c, total + n
        return 100.0 * correct / max(total, 1)

    def error(self, gm: fx.GraphModule) -> float:
        """The budget's error, max over sets and outputs of max|new - ref| / max|ref|; also sets
        ``mean_error`` and ``accuracy``."""
        worst, mean_terms = 0.0, []
        self.mean_error, self.accuracy = float("inf"), float("-inf")
        outputs = self._outputs(gm)
        for refs, news in zip(self.refs, outputs):
            for index, (r, n) in enumerate(zip(refs, news)):
                if r.shape != n.shape:
                    return float("inf")
                ref_max = float(r.abs().max())
                diff = float((n - r).abs().max())
                if not math.isfinite(diff):
                    return float("inf")
                worst = max(worst, diff / ref_max if ref_max > 0 else (0.0 if diff == 0 else float("inf")))
                if self.mean == "kl" and index == 0 and r.dim() == 2:  # logits: KL(softmax(r) || softmax(n))
                    log_p = torch.log_softmax(r, dim=1)
                    mean_terms.append(float((log_p.exp() * (log_p - torch.log_softmax(n, dim=1))).sum(1).mean()))
                    continue
                ref_energy = float(r.pow(2).sum())
                mean_terms.append(float((n - r).pow(2).sum()) / ref_energy if ref_energy > 0 else 0.0)
        self.mean_error = sum(mean_terms) / max(len(mean_terms), 1)
        self.accuracy = self._accuracy(outputs)
        return worst


# ----------------------------------------------------------------------------------------- progress
class Progress:
    """The search's progress on stderr (when ``enabled``): one line per evaluated state."""

    def __init__(self, enabled: bool, budget: float | None, macs_before: int, name: str = "slice"):
        self.enabled, self.budget, self.macs_before, self.name = enabled, budget, macs_before, name
        self.start = time.perf_counter()

    def say(self, tried: int, accepted: int, error: float, macs: float, what: str = "") -> None:
        if not self.enabled:
            return
        saved = 100.0 * (1.0 - macs / max(self.macs_before, 1))
        budget = f" (budget {self.budget:g})" if self.budget is not None else ""
        print(f"[qlfx.{self.name}] {tried} moves tried, {accepted} accepted; error {error:.3g}{budget}; MACs "
              f"{_short(self.macs_before)} -> {_short(macs)} ({saved:.1f}% saved); "
              f"{time.perf_counter() - self.start:.0f}s{'; ' + what if what else ''}", file=sys.stderr, flush=True)


def _short(count: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3f}{suffix}"
    return f"{count:.0f}"
