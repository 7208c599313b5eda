"""Instruments: observers the pass manager calls around every pass (after TVM's PassInstrument and
LLVM's -print-after / -print-changed / -time-passes), and the readable listing of the IR they print.

An instrument implements any of ``on_start(gm)``, ``before_pass(index, pass_, gm)``,
``after_pass(index, pass_, gm, result, check)``, ``on_end(gm)``.

The listing (:func:`graph_code`) has one line per node, in graph order, Python-shaped::

    def forward(self, x: "f32[1, 3, 8, 8]"):
        stem_0_weight_bn: "f32[8, 3, 3, 3]" = self["stem_0_weight_bn"]  # by fold-bn
        stem_0_bias_bn: "f32[8]" = self["stem_0_bias_bn"]  # by fold-bn
        stem_0: "f32[1, 8, 8, 8]" = aten.conv2d.default(x, stem_0_weight_bn, stem_0_bias_bn, [1, 1], [1, 1], [1, 1], 1)
        stem_2: "f32[1, 8, 8, 8]" = aten.relu.default(stem_0)
        ...
        return head

a stored tensor is read by its state-dict path, a call names its ATen overload, each value is
annotated with its dtype and shape (``s31``-like symbols for a symbolic batch), and a node a pass
created says which. Node names come from module paths (``stem_0`` is ``stem.0``), so a line says where
in the model it is; a stage diff (:func:`parse_graph_code`) compares lines by node name.
"""
from __future__ import annotations

import difflib
import operator
import re
import sys
import time
from pathlib import Path
from typing import Iterable, TextIO

import torch
import torch.fx as fx
from torch.fx.graph import dtype_abbrs

from . import ir
from .io import atomic_write, ensure_writable_dir


class Instrument:
    def on_start(self, gm) -> None:
        pass

    def before_pass(self, index, pass_, gm) -> None:
        pass

    def after_pass(self, index, pass_, gm, result, check) -> None:
        pass

    def on_end(self, gm) -> None:
        pass


def _selected(which: str | Iterable[str] | None, name: str) -> bool:
    if which is None:
        return False
    if isinstance(which, str):
        return which == "all" or name in which.split(",")
    return "all" in which or name in which


# ------------------------------------------------------------------------------------------ listing
def value_type(value) -> str:
    """``f32[1, 8, 8, 8]`` for a (fake) tensor, ``Sym(s0)`` for a symbolic int, a tuple of those."""
    if isinstance(value, torch.Tensor):
        return f"{dtype_abbrs.get(value.dtype, str(value.dtype))}[{', '.join(str(d) for d in value.shape)}]"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"Sym({value})"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(value_type(v) for v in value) + ")"
    return ""


def _argument(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, tuple):
        return "(" + ", ".join(_argument(x) for x in a) + ("," if len(a) == 1 else "") + ")"
    if isinstance(a, list):
        return "[" + ", ".join(_argument(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_argument(v)}" for k, v in a.items()) + "}"
    if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return f"torch.{str(a).replace('torch.', '')}"
    return repr(a)


def _callee(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # aten.conv2d.default, qlfx.branch_product.default
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _node_line(node: fx.Node) -> str:
    kind = value_type(ir.val(node))
    head = f"{node.name}: \"{kind}\"" if kind else node.name
    if node.op == "get_attr":
        rhs = f'self["{node.target}"]'
    elif node.target is operator.getitem:
        rhs = f"{_argument(node.args[0])}[{_argument(node.args[1])}]"
    else:
        args = [_argument(a) for a in node.args] + [f"{k}={_argument(v)}" for k, v in node.kwargs.items()]
        rhs = f"{_callee(node.target)}({', '.join(args)})"
    origin = node.meta.get(ir.ORIGIN)
    note = f"  # by {origin}" if origin not in (None, "trace") else ""
    return f"    {head} = {rhs}{note}"



def graph_code(gm: fx.GraphModule) -> str:
    """The readable listing of the graph (module docstring): what dumps, prints and diffs show."""
    inputs, body, outputs = [], [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind = value_type(ir.val(node))
            inputs.append(f"{node.name}: \"{kind}\"" if kind else node.name)
        elif node.op == "output":
            outputs = ir.output_values(gm)
        else:
            body.append(_node_line(node))
    names = ", ".join(n.name for n in outputs)
    returned = names if len(outputs) == 1 else f"({names})"
    return "\n".join([f"def forward({', '.join(['self'] + inputs)}):", *body, f"    return {returned}"]) + "\n"


_LINE = re.compile(r'^ {4}([A-Za-z_][A-Za-z0-9_]*)(?:: "[^"]*")? = (.+)$')


def parse_graph_code(code: str) -> dict[str, str]:
    """``node name -> its line`` for every node line of a listing (:func:`graph_code`, a dump file)."""
    nodes: dict[str, str] = {}
    for line in code.splitlines():
        m = _LINE.match(line)
        if m:
            nodes[m.group(1)] = line.strip()
    return nodes


def touched_nodes(before: dict[str, str], gm: fx.GraphModule) -> list[str]:
    """Names of the nodes of ``gm`` that are new or whose line changed since ``before``
    (:func:`parse_graph_code` of the earlier listing). Provenance alone would miss rewired nodes,
    e.g. a conv that fold-bn gave new weights."""
    return [name for name, line in parse_graph_code(graph_code(gm)).items() if before.get(name) != line]


# ------------------------------------------------------------------------------------- instruments
class Timing(Instrument):
    """Prints each pass's wall time (the report has them too)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.seconds: dict[str, float] = {}
        self._t0 = 0.0

    def before_pass(self, index, pass_, gm):
        self._t0 = time.perf_counter()

    def after_pass(self, index, pass_, gm, result, check):
        self.seconds[pass_.name] = time.perf_counter() - self._t0
        print(f"[timing] {index:03d} {pass_.name}: {self.seconds[pass_.name]:.3f} s", file=self.stream or sys.stderr)


class PrintIR(Instrument):
    """``before`` / ``after``: a pass name, a comma list, or "all"."""

    def __init__(self, before=None, after=None, stream: TextIO | None = None):
        self.before, self.after, self.stream = before, after, stream

    def before_pass(self, index, pass_, gm):
        if _selected(self.before, pass_.name):
            print(f"# *** IR before {pass_.name} ***\n{graph_code(gm)}", file=self.stream or sys.stdout)

    def after_pass(self, index, pass_, gm, result, check):
        if _selected(self.after, pass_.name):
            print(f"# *** IR after {pass_.name} ***\n{graph_code(gm)}", file=self.stream or sys.stdout)


class PrintChanged(Instrument):
    """After each pass that changed the graph, a unified diff of its listing (LLVM -print-changed=diff)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self._before = ""

    def before_pass(self, index, pass_, gm):
        self._before = graph_code(gm)

    def after_pass(self, index, pass_, gm, result, check):
        if not result.changed:
            return
        diff = difflib.unified_diff(self._before.splitlines(), graph_code(gm).splitlines(),
                                    f"before {pass_.name}", f"after {pass_.name}", lineterm="")
        print(f"# *** {pass_.name} changed the IR ***", file=self.stream or sys.stdout)
        print("\n".join(diff), file=self.stream or sys.stdout)


class DumpDir(Instrument):
    """Writes every stage to a folder: ``000_input.py``, ``001_fold-bn.py``, ... (the listing), a
    ``.dot`` picture of each with the nodes the pass added or changed filled orange, and ``.svg`` when
    Graphviz is installed (else ``svg_problem`` says so). Files are written atomically."""

    def __init__(self, directory: str | Path, pictures: bool = True):
        self.directory = ensure_writable_dir(directory)
        self.pictures = pictures
        self.svg_problem: str | None = None
        self._before: dict[str, str] = {}

    def _write(self, stem: str, gm, highlight: Iterable[str], title: str) -> None:
        from .graphviz import dot_available, render_svg, to_dot  # graphviz draws with this module's labels

        atomic_write(self.directory / f"{stem}.py", f"# {title}\n" + graph_code(gm))
        if not self.pictures:
            return
        dot = to_dot(gm, highlight=highlight, title=title)
        atomic_write(self.directory / f"{stem}.dot", dot)
        if dot_available():
            atomic_write(self.directory / f"{stem}.svg", render_svg(dot))
        else:
            self.svg_problem = "Graphviz `dot` not installed: wrote .dot files only (apt-get install graphviz)"

    def on_start(self, gm):
        self._write("000_input", gm, (), "input graph")

    def before_pass(self, index, pass_, gm):
        self._before = parse_graph_code(graph_code(gm))

    def after_pass(self, index, pass_, gm, result, check):
        status = "changed" if result.changed else "unchanged"
        self._write(f"{index:03d}_{pass_.name}", gm, touched_nodes(self._before, gm),
                    f"after {pass_.name} ({status})")
