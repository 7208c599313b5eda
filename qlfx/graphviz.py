"""Graph pictures: Graphviz DOT text for a stage, and SVG when the `dot` program is installed.

Nodes created by a given pass are filled orange, so a picture shows what that pass changed.
"""
from __future__ import annotations

import shutil
import subprocess

import torch.fx as fx

from .ir import ORIGIN, shape


def _label(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    s = shape(node)
    dims = "x".join(map(str, s)) if s else ""
    return f"{node.name}\\n{node.op}: {target}" + (f"\\n[{dims}]" if dims else "")


def to_dot(gm: fx.GraphModule, highlight_origin: str | None = None, title: str = "") -> str:
    lines = ["digraph qlfx {", '  rankdir=TB; node [shape=box, fontsize=10, fontname="Helvetica"];']
    if title:
        lines.append(f'  label="{title}"; labelloc=t;')
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue  # weights clutter the picture; they show in the code dump
        style = ""
        if highlight_origin is not None and node.meta.get(ORIGIN) == highlight_origin:
            style = ', style=filled, fillcolor="#ffb347"'
        elif node.op in ("placeholder", "output"):
            style = ', style=filled, fillcolor="#d0e0ff"'
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
