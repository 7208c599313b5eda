"""What a slicing state costs: the MACs the ``slice`` pass (passes/slice.py) predicts for its units cut
to given channel counts, and the size of each unit's next move.

**Prediction.** With base MACs B_n of every conv/linear n a unit touches (as
:func:`qlfx.debug.count_macs` counts them, at the example's batch size), keeping k_u of the size_u
channels of each unit u scales B_n by the kept fraction f_u = k_u / size_u once for every role u plays
at n: rows (a writer, a per-channel conv), columns (a reader), both (a conv inside a unit). Units that
delete channels of the same value (a product unit and its stream's unit) multiply their fractions, as
if the deletions were independent.

**Mergeable pairs.** A unit whose one value h is written by one conv W (C_in -> r, kernel K x K, one
group) and read only by one pointwise conv R (r -> C_out, stride 1) -- what ``factor`` makes, and what
``merge-pointwise`` multiplies back into one conv when that needs fewer MACs -- costs per output pixel

    min( k (C_in K^2 + C_out),  C_out C_in K^2 )        for k kept channels of h,

that is, its cost after merge-pointwise (C_in and C_out scaled by what other units keep of them).
Deleting channels of h above the break-even width r* = C_out C_in K^2 / (C_in K^2 + C_out) then saves
nothing. The search ranks such a unit's moves by its average saving per channel on the way down
(:meth:`CostModel.rank_saving`: the first moves of a low-rank split are cheap and lead somewhere), and
where it stops with the unit still above r* (:meth:`CostModel.wasted`), it undoes those deletions, which
only cost error, and goes on with the budget they held.
"""
from __future__ import annotations

import math

import torch.fx as fx

from qlfx import ir
from qlfx.debug import count_macs
from qlfx.symmetry.slicing import Unit, linear_view

__all__ = ["CostModel", "node_macs"]


def node_macs(gm: fx.GraphModule, node: fx.Node, batch: int) -> int:
    """A conv/linear's MACs as qlfx.debug.count_macs counts them (a symbolic batch as the example's)."""
    w = ir.get_tensor(gm, linear_view(node).weight).shape
    return math.prod(w[1:]) * math.prod(d if isinstance(d, int) else batch for d in ir.shape(node))


def _mergeable_pair(unit: Unit) -> tuple[fx.Node, fx.Node] | None:
    """(W, R) when the unit is one value written by a one-group conv W and read only by a pointwise conv R."""
    if (len(unit.writers) != 1 or len(unit.readers) != 1 or len(unit.base_of) != 1 or unit.inner or unit.depthwise
            or unit.regrouped or unit.constants or unit.slices or unit.reshapes or unit.radials):
        return None
    writer, reader = unit.writers[0], unit.readers[0]
    first, second = ir.ConvCall.of(writer), ir.ConvCall.of(reader)
    if (first is None or second is None or first.groups != 1 or not second.is_pointwise or second.stride != (1, 1)
            or second.input is not writer or len(writer.users) != 1 or writer.name not in unit.base_of):
        return None
    return writer, reader


class CostModel:
    """Predicted MACs of the graph with its units cut to ``unit.keep`` (or to given counts)."""

    def __init__(self, gm: fx.GraphModule, units: list[Unit], batch: int):
        self.units = units
        self.total = count_macs(gm)
        self.base = {n.name: node_macs(gm, n, batch) for u in units for n in u.convs}
        self.pairs: dict[int, tuple[str, str, float]] = {}  # unit id -> (W, R, MACs of the merged conv)
        for unit in units:
            pair = _mergeable_pair(unit)
            if pair is not None:
                writer, reader = pair
                merged = self.base[writer.name] / ir.channels(writer) * ir.channels(reader)
                self.pairs[unit.id] = (writer.name, reader.name, merged)

    def macs(self, keeps: dict[int, int] | None = None) -> float:
        """The MACs with each unit u cut to ``keeps[u.id]`` (default: ``u.keep``)."""
        frac = {u.id: (keeps or {}).get(u.id, u.keep) / u.size for u in self.units}
        scale = dict.fromkeys(self.base, 1.0)
        for unit in self.units:
            for node in unit.writers + unit.depthwise + unit.regrouped + unit.readers + unit.inner:  # inner: both
                scale[node.name] *= frac[unit.id]
        total = self.total - sum(self.base[name] * (1.0 - scale[name]) for name in self.base)
        for uid, (writer, reader, merged) in self.pairs.items():
            pair = self.base[writer] * scale[writer] + self.base[reader] * scale[reader]
            f = frac[uid]
            merged_now = merged * (scale[writer] / f) * (scale[reader] / f) if f > 0 else 0.0
            total -= max(0.0, pair - merged_now)
        return total

    def saving(self, unit: Unit, keep_from: int, keep_to: int, keeps: dict[int, int] | None = None) -> float:
        """MACs saved by cutting ``unit`` from ``keep_from`` to ``keep_to`` channels, the others as in ``keeps``."""
        state = {u.id: u.keep for u in self.units} if keeps is None else dict(keeps)
        state[unit.id] = keep_from
        before = self.macs(state)
        state[unit.id] = keep_to
        return before - self.macs(state)

    def rank_saving(self, unit: Unit, keep_from: int, keep_to: int, floor: int,
                    keeps: dict[int, int] | None = None) -> float:
        """What the search credits a move with: its saving, or, where that is more, the unit's average
        saving per channel down to ``floor`` times the channels it deletes. The two differ only for a
        mergeable pair above its break-even width, whose moves save nothing until the width drops below
        it: credited with the average, such a unit is not shut out by the first moves of its way down
        (which the search then undoes if it stops above the break-even: :meth:`wasted`)."""
        saved = self.saving(unit, keep_from, keep_to, keeps)
        if unit.id not in self.pairs or unit.size <= floor:
            return saved
        average = self.saving(unit, unit.size, floor, keeps) / (unit.size - floor)
        return max(saved, average * (keep_from - keep_to))

    def wasted(self, unit: Unit, keeps: dict[int, int] | None = None) -> bool:
        """A mergeable pair cut to a width that saves nothing (merge-pointwise multiplies it back)."""
        keep = (keeps or {}).get(unit.id, unit.keep)
        return unit.id in self.pairs and keep < unit.size and self.saving(unit, unit.size, keep, keeps) <= 0
