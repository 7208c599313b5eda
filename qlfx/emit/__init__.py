"""Emitters: the qlfx IR -> ONNX (:mod:`qlfx.emit.onnx`) and TVM (:mod:`qlfx.emit.tvm`).

Both re-export the rewritten graph with ``qlfx.capture.to_exported_program`` and hand the
ExportedProgram to the ecosystem's converter (torch.onnx, TVM's ``from_exported_program``) with
translations for qlfx's own ops only. Before converting, each checks every op of the program the
converter will see (after its decompositions) and reports all it cannot convert at once, each at the
node of the qlfx graph it came from (:func:`site`).

This package module imports nothing heavy: :mod:`qlfx.emit.tvm_runtime` is imported through it on
machines without torch.
"""
from __future__ import annotations

from typing import Any


def origin(gm: Any, node: Any) -> Any:
    """The node of ``gm`` (the qlfx graph) that ``node`` (of a program re-exported and decomposed from
    it) came from, by torch.fx's provenance (``node.meta["from_node"]``); ``node`` itself if none."""
    names = {n.name: n for n in gm.graph.nodes}
    pending = list(node.meta.get("from_node") or [])
    while pending:
        source = pending.pop(0)
        if source.graph_id == id(gm.graph) and source.name in names:
            return names[source.name]
        pending.extend(source.from_node or [])
    return node


def unsupported_sites(gm: Any, nodes: list, what: str) -> list[str]:
    """One line per node of ``gm`` that ``nodes`` (unconvertible nodes of the program derived from it)
    came from: 'layer1_0_act_cummax (cummax in layer1.0.act) at model.py:12: <what> aten.cummax.default',
    naming the decomposed ops when they differ from the node's own."""
    from .. import ir

    found: dict[Any, list[str]] = {}
    for node in nodes:
        targets = found.setdefault(origin(gm, node), [])
        if str(node.target) not in targets:
            targets.append(str(node.target))
    lines = []
    for source, targets in found.items():
        line = ir.source_line(source)
        via = f" (what {source.target} decomposes to)" if [str(source.target)] != targets else ""
        lines.append(f"{ir.describe(source)}{' at ' + line if line else ''}: {what} {', '.join(targets)}{via}")
    return lines
