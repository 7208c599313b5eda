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

__all__ = ["ActivationStats", "collect_activations", "hadamard", "orthogonal_start", "smooth_max",
           "weight_error", "activation_error", "surrogate", "measured", "space_summary", "format_summary",
           "with_derived", "touching", "activation_nodes", "space_reports"]

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
                        keep: int = 2048, seed: int = 0) -> dict[str, ActivationStats]:
    """Statistics of the values of ``nodes`` over the calibration ``input_sets``: exact moments and
    ranges, and ``keep`` largest-norm rows plus ``keep`` random rows per value."""
    from .slicing import Runner  # runs graphs with a static batch in chunks of the example batch

    names = set(nodes)
    stats: dict[str, ActivationStats] = {}
    generator = torch.Generator().manual_seed(seed)
    runner = Runner(example_inputs, dynamic_batch)
    for (values,) in runner.values([gm], names, input_sets):
        for name, value in values.items():
            if value.dim() < 2 or not value.is_floating_point():
                continue
            rows = _rows(value)
            st = stats.get(name)
            if st is None:
                st = stats[name] = ActivationStats(name, rows.shape[1])
            st.count += rows.numel()
            sq = rows * rows
            st.sum_sq += float(sq.sum())
            st.sum_4 += float((sq * sq).sum())
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
    for st in stats.values():
        st.rows = torch.cat([st._top, st._random])
        st._top = st._random = None
    return stats


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
