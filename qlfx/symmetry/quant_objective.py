"""Int8 quantisation error of the weights and activations a channel space carries, measured exactly and
as a smooth objective over the symmetry group (used by the ``equalize`` and ``rotate`` passes).

Conventions are those of :mod:`qlfx.quantization` (the ``quantize`` pass, onnxruntime's QDQ kernels):
weights symmetric int8 per output channel, activations asymmetric uint8 per tensor over the calibration
range [min(lo, 0), max(hi, 0)].

**Measured errors** (relative, so tensors of any scale count alike):

    weight W:      e_W = ||Q(W) - W||_F^2 / ||W||_F^2                 (real rounding, Q per channel)
    activation x:  e_x = (s^2 / 12) / E[x^2],  s = (max(hi, 0) - min(lo, 0)) / 255

e_x is the uniform-noise model of rounding on a grid of step s (it needs one pass over the calibration
data instead of two; clipping cannot happen at a min/max calibration).

**Smooth surrogate** for descent: the same formulas with each max replaced by a p-norm
``||v||_p = m (sum (|v|/m)^p)^(1/p)`` (m = max|v|, detached: it only keeps the powers finite), which
is differentiable everywhere and pulls every near-maximal entry down, not just one. Per output channel
o of W' with n_o entries, the rounding noise is n_o s_o^2 / 12 with s_o = max|W'_o| / 127, so

    E_W(g) = sum_o n_o (||W'_o||_p / 127)^2 / 12 / ||W||_F^2,
    E_x(g) = ((||x'^+||_p + ||x'^-||_p) / 255)^2 / 12 / E[x^2]

(x'^+ / x'^-: the positive / negative parts, whose maxima bound the range). Under an orthogonal
element W' and x' keep their norms, so the denominators are constants and a lower E means less noise
in the same signal; errors in rotated coordinates map back isometrically.

**Activation samples.** The range of x' = M x over all calibration pixels is needed for every M the
search tries, so per value we keep the rows (pixels) of largest norm (max_k |(M x)_k| <= ||x||, so
they hold the range of every rotation) plus a uniform random sample, and the exact per-channel
min / max, E[x^2] and moments (for the kurtosis in the report).

**Output-referred noise model** (:func:`int8_noise`; the objective of ``equalize`` and ``rotate`` when
calibration data is given). The errors above count every tensor alike, but what matters is the error
each tensor's rounding causes at the network's output. To first order, rounding noise n (zero mean,
independent entries) added to a value x moves the outputs y by J n (J = dy/dx), and

    E||J n||^2 = sum_k Var(n_k) G_k,     G_k = E_samples[ sum_(pixels of channel k) ||dy/dx_k||^2 ] / E||y||^2

(the *sensitivity* of channel k, relative to the output energy). G is measured on the calibration data
by Hutchinson probes (:func:`collect_activations` with ``sensitivities=True``): for v ~ N(0, I) over the
outputs, E_v[(v^T J)_k^2] = ||J e_k||^2, one backward pass per probe for every value at once. Under an
element M of the space (x' = M x; the quantiser sees x'), isotropic noise of variance sigma^2 in the
quantiser's coordinates is M^-1 n' in the original ones, so

    activation (per-tensor grid of step s = range(M x) / 255):   s^2 / 12 * sum_k G_k ||(M^-1)_(k,:)||^2
    (for a diagonal M, G_k times the fraction of channel k's entries that are not exactly 0: a ReLU's zeros
    and zero padding round exactly; a rotation mixes them with the rest)
    weight W' = M_y W M_x^-1 (row o on its own grid s_o = max|W'_o| / levels, read by inputs of
    second moment E_i = (M_x diag(E[x^2]) M_x^T)_ii over its taps):
        sum_o (s_o^2 / 12) (sum_(i in row o) E_i) * sum_k G_(y,k) (M_y^-1)_(k,o)^2

and the predicted relative output error is the square root of the sum over every value the ``quantize``
pass puts on a per-tensor grid (:func:`int8_graph`: inputs and outputs of convs / linears, adds and
products of quantised values, one grid per chain of moves) and every weight touching the spaces. For
a diagonal D this is ``(max_k d_k r_k)^2 sum_k G_k / d_k^2``: each term a max of exponentials of linear
functions of log d, so the objective is convex in the log-scales; a per-channel weight grid makes a
row's scale drop out (only the columns' scalings count), and per-tensor activation ranges are balanced
against the weights' columns by how much each reaches the output. Under an orthogonal Q the activation
gain is sum_k G_k (a rotation moves only the range), the weights' output gain is sum_k G_k Q_(o,k)^2.
Maxima are p-norms in the descent (:func:`smooth_max`) and exact (``p=None``, real rounding of the
weights) when candidates are compared.

**Report** per space: weight and activation kurtosis (E[v^4] / E[v^2]^2: 3 for a Gaussian, large with
outlier channels), the activation peak-to-RMS ratio max|x| / sqrt(E[x^2]), the spread of channel ranges
(max / mean over channels), and the measured quantisation errors e_W, e_x averaged over the tensors
of the space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.fx as fx

from qlfx.quantization import quantize_weight_per_channel

from .optimize import GroupView, weight_terms
from .spaces import SymmetryReport

__all__ = ["ActivationStats", "collect_activations", "Int8Graph", "int8_graph", "int8_stats", "int8_noise",
           "hadamard", "orthogonal_start", "smooth_max", "weight_error", "activation_error", "surrogate", "measured",
           "space_summary", "format_summary", "with_derived", "touching", "activation_nodes", "space_reports"]

ACTIVATION_LEVELS = 255  # uint8 grid over the activation range


@dataclass
class ActivationStats:
    """One value's channel vectors on the calibration data: exact moments and a sample of rows."""

    node: str
    channels: int
    count: int = 0  # number of entries (rows * channels)
    sum_sq: float = 0.0
    sum_4: float = 0.0
    lo: torch.Tensor | None = None  # per-channel min
    hi: torch.Tensor | None = None  # per-channel max
    rows: torch.Tensor | None = None  # [n, C] float64 sample: largest-norm rows + random rows
    channel_sq: torch.Tensor | None = None  # per-channel sum of x^2 (over count / channels rows)
    channel_nonzero: torch.Tensor | None = None  # per-channel count of entries != 0 (exact zeros round exactly)
    sensitivity: torch.Tensor | None = None  # per-channel G_k (output-referred; None: not measured)
    _random: torch.Tensor | None = field(default=None, repr=False)
    _top: torch.Tensor | None = field(default=None, repr=False)

    @property
    def mean_sq(self) -> float:
        return self.sum_sq / max(self.count, 1)

    @property
    def kurtosis(self) -> float:
        m2 = self.mean_sq
        return (self.sum_4 / max(self.count, 1)) / (m2 * m2) if m2 > 0 else float("nan")

    @property
    def channel_mean_sq(self) -> torch.Tensor:
        """Per-channel E[x_k^2]."""
        return self.channel_sq / max(self.count // max(self.channels, 1), 1)

    @property
    def channel_nonzero_fraction(self) -> torch.Tensor:
        """Per channel, the fraction of entries that are not exactly 0 (a ReLU's zeros, zero padding): only
        those carry rounding noise."""
        return self.channel_nonzero / max(self.count // max(self.channels, 1), 1)

    @property
    def abs_range(self) -> torch.Tensor:
        """Per-channel max |x| (for equalize)."""
        return torch.maximum(self.hi.abs(), self.lo.abs())


def _rows(value: torch.Tensor) -> torch.Tensor:
    """(pixels, C) float64 rows of a value (N, C, ...) or (N, C)."""
    v = value.detach().double()
    if v.dim() > 2:
        v = v.movedim(1, -1)
    return v.reshape(-1, v.shape[-1])


def collect_activations(gm: fx.GraphModule, nodes: Iterable[str], input_sets: Sequence[tuple],
                        example_inputs: Sequence[torch.Tensor], dynamic_batch: bool = False,
                        keep: int = 2048, seed: int = 0, sensitivities: bool = False,
                        probes: int = 2) -> dict[str, ActivationStats]:
    """Statistics of the values of ``nodes`` over the calibration ``input_sets``: exact moments and
    ranges (overall and per channel), and ``keep`` largest-norm rows plus ``keep`` random rows per value.
    ``sensitivities``: also each channel's output sensitivity G_k (module docstring), from ``probes``
    Hutchinson probes per chunk (one backward pass each)."""
    from .slicing import Runner, record_values  # runs graphs with a static batch in chunks of the example batch

    names = set(nodes)
    stats: dict[str, ActivationStats] = {}
    generator = torch.Generator().manual_seed(seed)
    runner = Runner(example_inputs, dynamic_batch)
    gains: dict[str, torch.Tensor] = {}
    out_energy = 0.0
    for inputs in input_sets:
        for piece, real in runner.chunks(inputs):
            if sensitivities:
                values, grads, energy = _values_and_gains(gm, names, piece, real, probes, generator)
                out_energy += energy
                for name, g in grads.items():
                    gains[name] = g if name not in gains else gains[name] + g
            else:
                values = record_values(gm, names, piece)
            for name, value in values.items():
                value = runner.trim(value, real)
                if value.dim() < 2 or not value.is_floating_point():
                    continue
                _observe(stats, name, value, keep, generator)
    for st in stats.values():
        st.rows = torch.cat([st._top, st._random])
        st._top = st._random = None
        if sensitivities and st.node in gains and out_energy > 0:
            st.sensitivity = gains[st.node] / probes / out_energy  # per sample over per-sample energy
    return stats


def _observe(stats: dict[str, ActivationStats], name: str, value: torch.Tensor, keep: int,
             generator: torch.Generator) -> None:
    rows = _rows(value)
    st = stats.get(name)
    if st is None:
        st = stats[name] = ActivationStats(name, rows.shape[1])
    st.count += rows.numel()
    sq = rows * rows
    st.sum_sq += float(sq.sum())
    st.sum_4 += float((sq * sq).sum())
    channel_sq = sq.sum(0)
    st.channel_sq = channel_sq if st.channel_sq is None else st.channel_sq + channel_sq
    nonzero = (rows != 0).sum(0).double()
    st.channel_nonzero = nonzero if st.channel_nonzero is None else st.channel_nonzero + nonzero
    lo, hi = rows.amin(0), rows.amax(0)
    st.lo = lo if st.lo is None else torch.minimum(st.lo, lo)
    st.hi = hi if st.hi is None else torch.maximum(st.hi, hi)
    top = rows if st._top is None else torch.cat([st._top, rows])
    if top.shape[0] > keep:
        top = top[torch.topk(top.norm(dim=1), keep).indices]
    st._top = top
    pick = rows[torch.randperm(rows.shape[0], generator=generator)[:keep]]
    rnd = pick if st._random is None else torch.cat([st._random, pick])
    if rnd.shape[0] > keep:
        rnd = rnd[torch.randperm(rnd.shape[0], generator=generator)[:keep]]
    st._random = rnd


def _values_and_gains(gm: fx.GraphModule, names: set[str], inputs: tuple, real: int, probes: int,
                      generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """One chunk: the values of ``names``, the per-channel sums over the real samples of
    ||(v^T dy/dx)_k||^2 over ``probes`` probes v ~ N(0, I) on the outputs, and sum ||y||^2."""
    from torch.utils._pytree import tree_flatten

    values: dict[str, torch.Tensor] = {}
    probes_at: dict[str, torch.Tensor] = {}

    class Probed(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in names and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
                values[n.name] = value.detach()
                delta = torch.zeros_like(value, requires_grad=True)  # d(out)/d(delta) = d(out)/d(value)
                probes_at[n.name] = delta
                return value + delta
            return value

    with torch.enable_grad():
        out, _ = tree_flatten(Probed(gm).run(*inputs))
        outs = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        energy = float(sum((t.detach()[:real].double() ** 2).sum() for t in outs))
        gains: dict[str, torch.Tensor] = {}
        if not outs or not probes_at:
            return values, gains, energy
        leaves = list(probes_at.values())
        for i in range(probes):
            vs = []
            for t in outs:
                v = torch.randn(t.shape, generator=generator, dtype=t.dtype)
                v[real:] = 0  # padding samples (a static batch) count nothing
                vs.append(v)
            grads = torch.autograd.grad(sum((t * v).sum() for t, v in zip(outs, vs)), leaves,
                                        retain_graph=i < probes - 1, allow_unused=True)
            for name, grad in zip(probes_at, grads):
                if grad is None:
                    continue
                g = (grad.detach()[:real].double() ** 2)
                g = g.movedim(1, -1).reshape(-1, g.shape[1]).sum(0) if g.dim() > 2 else g.sum(0)
                gains[name] = g if name not in gains else gains[name] + g
    return values, gains, energy


# ------------------------------------------------------------------------------- what quantize quantises
@dataclass
class Int8Graph:
    """``graph``: a copy of a graph with every fused branch product expanded (conv, conv, mul: what the
    ``quantize`` pass runs); ``names``: its node names -> the names the original graph's symmetry report
    uses (a branch's conv -> ``<product>.a`` / ``.b``, the mul -> ``<product>``, others unchanged);
    ``grids``: the values (original names) ``quantize`` puts on a per-tensor grid, one per grid."""

    graph: fx.GraphModule
    names: dict[str, str]
    grids: list[str]

    def original(self, name: str) -> str:
        return self.names.get(name, name)


def int8_graph(gm: fx.GraphModule) -> Int8Graph:
    """The values the ``quantize`` pass quantises per tensor (passes/quantize.py, same rules): the input
    and output of every conv / linear with stored weights (the output after a relu it absorbs), adds and
    muls of quantised values (grown to a fixed point), and no value that moves or selects the entries of
    another quantised value (it is on that value's grid: its rounding happened there)."""
    import copy

    from qlfx.quantization import expand_branch_products, int8_values, linear_op, movement_source

    graph = copy.deepcopy(gm)
    before = {n.name: n.prev for n in graph.graph.nodes
              if n.op == "call_function" and n.target == torch.ops.qlfx.branch_product.default}
    expand_branch_products(graph)
    names = {}
    for product, prev in before.items():  # expansion inserts conv a, conv b, mul where the product was
        a = prev.next
        names[a.name], names[a.next.name], names[a.next.next.name] = f"{product}.a", f"{product}.b", product
    values = int8_values(graph.graph, [n for n in graph.graph.nodes if linear_op(n) is not None]).values
    grids = []
    for node in graph.graph.nodes:
        if node.name not in values:
            continue
        root = movement_source(node)
        if root is not None and root.name in values:
            continue  # on its source's grid
        grids.append(names.get(node.name, node.name))
    return Int8Graph(graph, names, grids)


def int8_stats(gm: fx.GraphModule, report: SymmetryReport, terms, input_sets: Sequence[tuple],
               example_inputs: Sequence[torch.Tensor], dynamic_batch: bool = False, keep: int = 1024,
               probes: int = 2, seed: int = 0) -> tuple[dict[str, ActivationStats], list[str]]:
    """Statistics and output sensitivities (original names) of every value the noise model needs: the
    int8 grids, and the inputs and outputs of the weights ``terms``; and the grids' names."""
    int8 = int8_graph(gm)
    wanted = set(int8.grids) | {t.x for t in terms if t.x is not None} | {t.y for t in terms}
    expanded = [n.name for n in int8.graph.graph.nodes if int8.original(n.name) in wanted]
    raw = collect_activations(int8.graph, expanded, input_sets, example_inputs, dynamic_batch, keep=keep,
                              seed=seed, sensitivities=True, probes=probes)
    stats = {}
    for name, st in raw.items():
        st.node = int8.original(name)
        stats[st.node] = st
    return stats, [g for g in int8.grids if g in stats]


# ------------------------------------------------------------------------------------------ starts
def hadamard(n: int) -> torch.Tensor | None:
    """The orthonormal Sylvester-Hadamard matrix of size n (a power of two), else None."""
    if n < 2 or n & (n - 1):
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def orthogonal_start(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """A rotation that spreads outliers over all channels: Hadamard when n is a power of two (every
    entry +-1/sqrt(n): a one-channel outlier becomes n equal entries), else Haar-random."""
    from .groups import random_orthogonal

    h = hadamard(n)
    if h is not None:
        return h, "hadamard"
    return random_orthogonal(n, generator), "random orthogonal"


# ---------------------------------------------------------------------------------------- measures
def smooth_max(v: torch.Tensor, p: float, dim=None) -> torch.Tensor:
    """||v||_p along ``dim`` (all entries when None), computed stably: an upper bound of max|v| that is
    smooth in v."""
    a = v.abs()
    m = (a.amax() if dim is None else a.amax(dim=dim, keepdim=True)).detach().clamp_min(1e-30)
    s = ((a / m) ** p).sum() if dim is None else ((a / m) ** p).sum(dim=dim, keepdim=True)
    out = m * s ** (1.0 / p)
    return out if dim is None else out.squeeze(dim)


def weight_error(w: torch.Tensor, bits: int = 8) -> float:
    """Measured e_W = ||Q(W) - W||^2 / ||W||^2 (symmetric per output channel, ``bits`` bits)."""
    w32 = w.detach().float()
    denom = float((w32.double() ** 2).sum())
    if denom == 0:
        return 0.0
    return float(((quantize_weight_per_channel(w32, bits).double() - w32.double()) ** 2).sum()) / denom


def activation_error(lo: float, hi: float, mean_sq: float) -> float:
    """e_x = (s^2 / 12) / E[x^2] for the uint8 grid of step s over [min(lo, 0), max(hi, 0)]."""
    if mean_sq <= 0:
        return 0.0
    s = (max(hi, 0.0) - min(lo, 0.0)) / ACTIVATION_LEVELS
    return s * s / 12.0 / mean_sq


def surrogate(view: GroupView, acts: dict[str, ActivationStats], p: float = 16.0,
              activation_weight: float = 1.0, weight_bits: int = 8) -> torch.Tensor:
    """The smooth objective E = mean_W E_W + activation_weight * mean_x E_x (module docstring) over the
    weights of ``view.terms`` and the values ``acts`` (weights on a ``weight_bits`` grid: 127 or 63 levels)."""
    levels = 2 ** (int(weight_bits) - 1) - 1
    total = torch.zeros((), dtype=torch.float64)
    if view.terms:
        part = torch.zeros((), dtype=torch.float64)
        for t in view.terms:
            w = view.weight(t).reshape(t.weight.shape[0], -1)
            norm_sq = float((t.weight ** 2).sum())
            if norm_sq == 0:
                continue
            row_max = smooth_max(w, p, dim=1)
            part = part + (w.shape[1] * (row_max / levels) ** 2).sum() / 12.0 / norm_sq
        total = total + part / len(view.terms)
    if acts and activation_weight:
        part = torch.zeros((), dtype=torch.float64)
        for name, st in acts.items():
            x = view.channels(name, st.rows)
            span = smooth_max(torch.relu(x), p) + smooth_max(torch.relu(-x), p)
            part = part + (span / ACTIVATION_LEVELS) ** 2 / 12.0 / st.mean_sq
        total = total + activation_weight * part / len(acts)
    return total


def _peak(v: torch.Tensor, p: float | None, dim=None) -> torch.Tensor:
    """max|v| (``p`` None) or its smooth upper bound ||v||_p, over all entries or along ``dim``; 0 for
    an all-zero v (whose p-norm has no gradient)."""
    if p is None:
        return v.abs().amax() if dim is None else v.abs().amax(dim=dim)
    if dim is None:
        return smooth_max(v, p) if bool(v.detach().abs().max() > 0) else v.abs().sum() * 0
    zero = v.detach().abs().amax(dim=dim, keepdim=True) == 0  # an all-zero row (a pruned channel)
    return torch.where(zero.squeeze(dim), 0.0, smooth_max(torch.where(zero, 1.0, v), p, dim=dim))


def _output_gain(sensitivity: torch.Tensor, e) -> torch.Tensor:
    """Per channel j of the quantiser's coordinates: sum_k G_k (M^-1)_(k,j)^2, the output energy that unit
    noise on channel j of M x reaches (module docstring)."""
    if e.dense is not None:
        return (sensitivity[:, None] * e.dense_inv ** 2).sum(0)
    if e.diag is not None:
        return sensitivity / e.diag ** 2
    return sensitivity


def int8_noise(view: GroupView, stats: dict[str, ActivationStats], grids: Iterable[str], p: float | None = 16.0,
               weight_bits: int = 8) -> torch.Tensor:
    """Predicted squared int8 output error relative to the output energy (module docstring): the
    per-tensor grids of ``grids`` and the per-row grids of the weights ``view.terms``, each rounding
    noise weighted by how much of it reaches the outputs (the values' measured ``sensitivity``).
    ``p``: p-norms for maxima (smooth, for descent); None: exact maxima and real weight rounding."""
    levels = 2 ** (int(weight_bits) - 1) - 1
    total = torch.zeros((), dtype=torch.float64)
    for name in grids:
        st = stats.get(name)
        if st is None or st.sensitivity is None:
            continue
        e = view.site(name)
        if e.dense is not None:
            x = st.rows @ e.dense.T
            top, bottom = x, x
            gain = _output_gain(st.sensitivity, e)  # a rotation mixes exact zeros with the rest
        else:
            d = e.diag if e.diag is not None else torch.ones(st.channels, dtype=torch.float64)
            a, b = d * st.hi, d * st.lo
            top, bottom = torch.maximum(a, b), torch.minimum(a, b)
            gain = _output_gain(st.sensitivity * st.channel_nonzero_fraction, e)  # zeros stay exact
        span = _peak(torch.relu(top), p) + _peak(torch.relu(-bottom), p)  # the grid always holds 0
        total = total + (span / ACTIVATION_LEVELS) ** 2 / 12.0 * gain.sum()
    for t in view.terms:
        x_st, y_st = stats.get(t.x), stats.get(t.y)
        if x_st is None or y_st is None or y_st.sensitivity is None:
            continue
        w = view.weight(t)
        rows, taps = w.shape[0], (w[0, 0].numel() if w.dim() > 2 else 1)
        ex = view.site(t.x, "in")
        energy = x_st.channel_mean_sq
        if ex.dense is not None:
            energy = (ex.dense ** 2) @ energy
        elif ex.diag is not None:
            energy = ex.diag ** 2 * energy
        # row o reads the inputs of its group: [rows, inputs per group]
        energy_rows = energy.reshape(t.groups, -1).repeat_interleave(rows // t.groups, dim=0)
        w2 = w.reshape(rows, w.shape[1], taps)
        if p is None:
            err = (quantize_weight_per_channel(w2.detach().float(), weight_bits).double() - w2.detach()) ** 2
            noise = (err.sum(2) * energy_rows).sum(1)
        else:
            step = _peak(w2.reshape(rows, -1), p, dim=1) / levels
            noise = step ** 2 / 12.0 * energy_rows.sum(1) * taps
        total = total + (noise * _output_gain(y_st.sensitivity, view.site(t.y))).sum()
    return total


def measured(view: GroupView, acts: dict[str, ActivationStats], weight_bits: int = 8) -> tuple[float, float]:
    """(mean e_W over view.terms, mean e_x over acts) with real rounding for the weights and the
    sampled rows' range for the activations (exact for the identity; a lower bound otherwise)."""
    with torch.no_grad():
        ew = [weight_error(view.weight(t), weight_bits) for t in view.terms]
        ex = []
        for name, st in acts.items():
            x = view.channels(name, st.rows)
            ex.append(activation_error(float(x.min()), float(x.max()), st.mean_sq))
    return (sum(ew) / len(ew) if ew else 0.0), (sum(ex) / len(ex) if ex else 0.0)


def _kurtosis(v: torch.Tensor) -> float:
    v = v.double().reshape(-1)
    m2 = float((v * v).mean())
    return float((v ** 4).mean()) / (m2 * m2) if m2 > 0 else float("nan")


def space_summary(weights: dict[str, torch.Tensor], axes: dict[str, int], acts: dict[str, ActivationStats],
                  weight_bits: int = 8) -> dict:
    """Statistics of one space from the graph as it is: ``weights`` {name: tensor} with ``axes`` {name:
    the weight axis that carries the space (0: written, 1: read)}, and the exact activation stats."""
    out = {"weights": len(weights), "activations": len(acts)}
    if weights:
        out["weight_kurtosis"] = sum(_kurtosis(w) for w in weights.values()) / len(weights)
        out["weight_error"] = sum(weight_error(w, weight_bits) for w in weights.values()) / len(weights)
        spreads = []
        for name, w in weights.items():
            r = w.detach().double().abs().movedim(axes[name], 0).reshape(w.shape[axes[name]], -1).amax(1)
            if float(r.mean()) > 0:
                spreads.append(float(r.max() / r.mean()))
        out["weight_range_spread"] = sum(spreads) / len(spreads) if spreads else float("nan")
    if acts:
        out["activation_kurtosis"] = sum(a.kurtosis for a in acts.values()) / len(acts)
        out["activation_error"] = sum(activation_error(float(a.lo.min()), float(a.hi.max()), a.mean_sq)
                                      for a in acts.values()) / len(acts)
        out["activation_peak_to_rms"] = sum(float(a.abs_range.max()) / math.sqrt(a.mean_sq)
                                            for a in acts.values() if a.mean_sq > 0) / len(acts)
        out["activation_range_spread"] = sum(float(a.abs_range.max() / a.abs_range.mean().clamp_min(1e-30))
                                             for a in acts.values()) / len(acts)
    return out


def format_summary(sid: int, label: str, before: dict, after: dict) -> str:
    """One line: 'space 3 (O, 64 ch): weight kurtosis 9.1 -> 3.2, int8 error 1.2e-4 -> 4e-5; ...'."""
    parts = []
    for key, name, fmt in (("weight_range_spread", "weight range max/mean", ".3g"),
                           ("weight_kurtosis", "weight kurtosis", ".3g"),
                           ("weight_error", "weight int8 error", ".2e"),
                           ("activation_range_spread", "activation range max/mean", ".3g"),
                           ("activation_peak_to_rms", "activation peak/rms", ".3g"),
                           ("activation_kurtosis", "activation kurtosis", ".3g"),
                           ("activation_error", "activation int8 error", ".2e")):
        if key in before and key in after:
            parts.append(f"{name} {before[key]:{fmt}} -> {after[key]:{fmt}}")
    return f"space {sid} ({label}): " + ", ".join(parts)


# ----------------------------------------------------------------------------- which tensors a space has
def with_derived(report: SymmetryReport, ids: Iterable[int]) -> set[int]:
    """``ids`` plus the product spaces whose scalings are derived from them (transitively)."""
    out = set(ids)
    changed = True
    while changed:
        changed = False
        for p in report.products:
            if (p.a[0] in out or p.b[0] in out) and report.spaces[p.z[0]].derived and p.z[0] not in out:
                out.add(p.z[0])
                changed = True
    return out


def touching(report: SymmetryReport, node: str | None, spaces: set[int]) -> bool:
    return node is not None and bool(set(report.spaces_of(node)) & spaces)


def activation_nodes(report: SymmetryReport, terms, spaces: set[int]) -> list[str]:
    """The values in ``spaces`` that a conv / linear / fused product reads or a conv / linear writes:
    the tensors an int8 graph quantises per tensor around its matmuls (a fused product's branch
    outputs are not values of the graph and are left out)."""
    reads = {t.x for t in terms if touching(report, t.x, spaces)}
    writes = {t.y for t in terms if "." not in t.y and touching(report, t.y, spaces)}  # "<node>.a": virtual
    return sorted(reads | writes)


def space_reports(gm: fx.GraphModule, report: SymmetryReport, space_ids: Iterable[int],
                  acts: dict[str, ActivationStats], weight_bits: int = 8) -> dict[int, dict]:
    """:func:`space_summary` of every space of ``space_ids`` in the graph as it is now (the weights it
    writes (axis 0) or reads (axis 1), the values of it that matmuls read)."""
    ids = list(space_ids)
    terms = weight_terms(gm, report, ids)
    out = {}
    for sid in ids:
        weights, axes = {}, {}
        for t in terms:
            if touching(report, t.y, {sid}):
                weights[t.node], axes[t.node] = t.weight, 0
            elif touching(report, t.x, {sid}):
                weights[t.node], axes[t.node] = t.weight, 0 if t.kind == "depthwise" else 1
        mine = {n: a for n, a in acts.items() if touching(report, n, {sid})}
        out[sid] = space_summary(weights, axes, mine, weight_bits)
    return out
