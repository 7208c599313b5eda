"""Instruments: observers the pass manager calls around every pass (after TVM's PassInstrument and
LLVM's -print-after / -print-changed / -time-passes).

An instrument implements any of ``on_start(gm)``, ``before_pass(index, pass_, gm)``,
``after_pass(index, pass_, gm, result, check)``, ``on_end(gm)``.
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Iterable, TextIO

from .graphviz import dot_available, render_svg, to_dot
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


def graph_code(gm) -> str:
    """Readable Python of the graph (what the dump files and print instruments show)."""
    return gm.code.strip() + "\n"


class Timing(Instrument):
    """Prints each pass's wall time (the report has them too)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.seconds: dict[str, float] = {}
        self._t0 = 0.0

    def before_pass(self, index, pass_, gm):
        import time

        self._t0 = time.perf_counter()

    def after_pass(self, index, pass_, gm, result, check):
        import time

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
    """After each pass that changed the graph, a unified diff of its code (LLVM -print-changed=diff)."""

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
    """Writes every stage to a folder: ``000_input.py``, ``001_fold-bn.py``, ... (readable code), a
    ``.dot`` picture of each with the nodes the pass made highlighted, and ``.svg`` when Graphviz is
    installed. Files are written atomically."""

    def __init__(self, directory: str | Path, pictures: bool = True):
        self.directory = ensure_writable_dir(directory)
        self.pictures = pictures
        self.svg_problem: str | None = None

    def _write(self, stem: str, gm, origin: str | None, title: str) -> None:
        atomic_write(self.directory / f"{stem}.py", f"# {title}\n" + graph_code(gm))
        if not self.pictures:
            return
        dot = to_dot(gm, highlight_origin=origin, title=title)
        atomic_write(self.directory / f"{stem}.dot", dot)
        if dot_available():
            atomic_write(self.directory / f"{stem}.svg", render_svg(dot))
        else:
            self.svg_problem = "Graphviz `dot` not installed: wrote .dot files only (apt-get install graphviz)"

    def on_start(self, gm):
        self._write("000_input", gm, None, "input graph")

    def after_pass(self, index, pass_, gm, result, check):
        status = "changed" if result.changed else "unchanged"
        self._write(f"{index:03d}_{pass_.name}", gm, pass_.name, f"after {pass_.name} ({status})")
