"""Graph pictures: Graphviz DOT text for a stage, and SVG when the `dot` program is installed.

One box per computed value: its name (from the module path), the op (``conv2d 3x3/2 g8``,
``batch_norm``, ``branch_product``) and its dtype and shape. Stored weights are left out (the listing
has them). The nodes named in ``highlight`` — those a pass added or changed — are filled orange, so a
picture shows what the pass did.
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Iterable

import torch.fx as fx

from . import ir
from .instruments import value_type

HIGHLIGHT = "#ffb347"
ENDPOINT = "#d0e0ff"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _op_detail(node: fx.Node) -> str:
    """The op and what distinguishes it at a glance: kernel, stride, groups of a conv."""
    if node.op != "call_function":
        return "input" if node.op == "placeholder" else node.op
    conv = ir.ConvCall.of(node)
    if conv is None or conv.kernel is None:
        return ir.op_name(node)
    detail = "x".join(map(str, conv.kernel))
    if conv.stride != (1, 1):
        detail += f"/{conv.stride[0]}" if conv.stride[0] == conv.stride[1] else f"/{conv.stride}"
    if conv.groups != 1:
        detail += f" g{conv.groups}"
    return f"conv2d {detail}"


def _label(node: fx.Node) -> str:
    op = _op_detail(node)
    parts = (node.name, "" if op in node.name else op, value_type(ir.val(node)))  # 'view_1' names its op already
    return "\\n".join(_quote(part) for part in parts if part)


def to_dot(gm: fx.GraphModule, highlight: Iterable[str] = (), title: str = "") -> str:
    """DOT text of ``gm``; the nodes named in ``highlight`` are filled orange."""
    highlight = set(highlight)
    lines = ["digraph qlfx {", '  rankdir=TB; node [shape=box, fontsize=10, fontname="Helvetica"];']
    if title:
        lines.append(f'  label="{_quote(title)}"; labelloc=t;')
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        style = ""
        if node.name in highlight:
            style = f', style=filled, fillcolor="{HIGHLIGHT}"'
        elif node.op in ("placeholder", "output"):
            style = f', style=filled, fillcolor="{ENDPOINT}"'
        lines.append(f'  "{node.name}" [label="{_label(node)}"{style}];')
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                lines.append(f'  "{arg.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_available() -> bool:
    return shutil.which("dot") is not None


def render_svg(dot_text: str) -> bytes:
    """SVG bytes of the DOT text. Raises RuntimeError with install advice when Graphviz is missing."""
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError(
            "Graphviz's `dot` program is not installed, so no SVG was drawn (the .dot file was written). "
            "Install it (`apt-get install graphviz`) or open the .dot file in any Graphviz viewer."
        )
    done = subprocess.run([exe, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"dot failed: {done.stderr.decode(errors='replace')[:500]}")
    return done.stdout
