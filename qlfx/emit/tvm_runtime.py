"""Load and run a module written by :meth:`qlfx.emit.tvm.TVMModule.export` -- with tvm and numpy only.

This module must not import torch (nor any qlfx module that does): it is what a deployment needs.

An export is two files side by side::

    model.so     the compiled Relax VM executable (kernels + VM bytecode + baked-in weights)
    model.json   metadata: {"format": "qlfx-tvm", "version": 2, "entry": "main",
                            "inputs": [{"name", "shape", "dtype"}...], "num_outputs": n,
                            "outputs": [{"shape", "dtype"}...], "target": "...", "device": "cpu"|"cuda"}

A ``null`` in a shape is a size the module takes at any value (the batch of a module built from a graph
captured with ``dynamic_batch``; version 2). Version 1 exports have static shapes only.

Usage::

    from qlfx.emit.tvm_runtime import load
    model = load("model.so")                 # or the .json path
    (logits,) = model(np.random.randn(1, 3, 224, 224).astype("float32"))
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

FORMAT = "qlfx-tvm"
FORMAT_VERSION = 2


LIBRARY_SUFFIXES = (".so", ".tar")  # a shared library, or tvm's tarball of objects (linked when loaded)


def metadata_path(path: str | os.PathLike) -> Path:
    """The JSON metadata file that goes with a ``.so`` / ``.tar`` export (same name, ``.json`` suffix)."""
    return Path(path).with_suffix(".json")


def library_path(path: str | os.PathLike) -> Path:
    """The library of an export: ``path`` itself when it names a .so or .tar; for any other name (the
    .json), the .so or .tar beside it that exists (the .so when neither does)."""
    p = Path(path)
    if p.suffix in LIBRARY_SUFFIXES:
        return p
    return next((p.with_suffix(s) for s in LIBRARY_SUFFIXES if p.with_suffix(s).exists()), p.with_suffix(".so"))


# ------------------------------------------------------------------------------------ native logging
# TVM's C++ runtime logs straight to the process's stderr, bypassing Python's logging: e.g. one
# "[12:00:00] .../executable.cc:276: Warning: Scope Saving:global" line per constant when an executable
# is saved and "Scope Loaded:" when it is loaded. Such lines (debug, info, warning; never errors) are
# hidden unless the "qlfx" logger is at DEBUG (CLI: --verbose).
_NATIVE_LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: (?!Error: )")


def verbose() -> bool:
    """Whether TVM's own logging is shown: the "qlfx" logger is at DEBUG (``qlfx --verbose`` sets it)."""
    return logging.getLogger("qlfx").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def native_log_filter(show: bool | None = None) -> Iterator[None]:
    """Around a short TVM call (a build, an export, a load; not a tuning run, whose progress would be
    held back): what the C++ side writes to file descriptor 2 is collected and, on the way out, written
    back without TVM's log lines, unless ``show`` (default: :func:`verbose`)."""
    if show if show is not None else verbose():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as collected:
        os.dup2(collected.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            collected.seek(0)
            lines = collected.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _NATIVE_LOG_LINE.match(line))
            if kept:
                os.write(2, kept.encode())


def device_for(kind: str, index: int = 0):
    """tvm device for a target kind name ("llvm"/"c" -> cpu, "cuda" -> cuda)."""
    import tvm

    if kind in ("llvm", "c", "cpu"):
        return tvm.cpu(index)
    if kind == "cuda":
        return tvm.cuda(index)
    raise ValueError(f"no tvm device for target kind {kind!r}; expected llvm or cuda")


class VMRunner:
    """A Relax VM over a built executable, run on numpy arrays; shared by the builder and the loader.

    ``__call__(*arrays)`` -> list of numpy arrays (always a list, one per graph output).
    """

    def __init__(self, executable: Any, device, inputs: Sequence[dict], num_outputs: int, entry: str = "main"):
        import tvm
        from tvm import relax

        self.device = device
        self.inputs = [dict(i) for i in inputs]
        self.num_outputs = int(num_outputs)
        self.entry = entry
        with native_log_filter():
            self._vm = relax.VirtualMachine(executable, device)
        self._fn = self._vm[entry]
        self._tvm = tvm

    def check_inputs(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) != len(self.inputs):
            raise ValueError(
                f"the module takes {len(self.inputs)} input(s) "
                f"({', '.join(i['name'] for i in self.inputs)}); got {len(arrays)}"
            )
        checked = []
        for spec, a in zip(self.inputs, arrays):
            a = np.ascontiguousarray(a)
            want = spec["shape"]
            if a.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, a.shape)):
                shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
                raise ValueError(
                    f"input '{spec['name']}' must have shape {shown}; got {tuple(a.shape)}. The module was built "
                    f"for these shapes: rebuild with example inputs of the new shape"
                    + (" (or capture with dynamic_batch=True for any batch size)." if want and want[0] is not None
                       else ".")
                )
            if str(a.dtype) != spec["dtype"]:
                a = a.astype(spec["dtype"])
            checked.append(a)
        return checked

    def to_device(self, arrays: Sequence[np.ndarray]) -> list:
        return [self._tvm.runtime.tensor(a, self.device) for a in self.check_inputs(arrays)]

    def run_device(self, device_inputs: Sequence) -> Any:
        """Run on tensors already on the device; returns the raw VM result (for timing loops)."""
        return self._fn(*device_inputs)

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        result = self.run_device(self.to_device(arrays))
        return _flatten_outputs(result)

    def time_evaluator(self, number: int = 10, repeat: int = 3, min_repeat_ms: int = 0):
        """tvm's own timer over the entry function (seconds per run for each repeat)."""
        return self._vm.time_evaluator(self.entry, self.device, number=number, repeat=repeat,
                                       min_repeat_ms=min_repeat_ms)


def _flatten_outputs(result: Any) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    out: list[np.ndarray] = []
    for item in result:  # a tvm Array/tuple of tensors (possibly nested)
        out.extend(_flatten_outputs(item))
    return out


class LoadedModule(VMRunner):
    """A module loaded from an export. ``model(*numpy_arrays)`` returns what ``TVMModule`` returns (and
    the torch model did): one array for a single output, a tuple for several. ``model.run(*arrays)``
    always returns a list, as onnxruntime's ``session.run`` does."""

    def __init__(self, library: Any, metadata: dict, device=None):
        device = device if device is not None else device_for(metadata.get("device", "cpu"))
        super().__init__(library, device, metadata["inputs"], metadata["num_outputs"], metadata.get("entry", "main"))
        self.metadata = metadata
        self.multi_output = bool(metadata.get("multi_output", self.num_outputs != 1))

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        return VMRunner.__call__(self, *arrays)

    def __call__(self, *arrays: np.ndarray):
        outputs = self.run(*arrays)
        return tuple(outputs) if self.multi_output else outputs[0]


def load(path: str | os.PathLike, device=None) -> LoadedModule:
    """Load ``path`` (the ``.so`` / ``.tar`` or its ``.json``) written by ``TVMModule.export``."""
    import tvm

    so, meta_file = library_path(path), metadata_path(path)
    for f, what in ((so, "compiled library"), (meta_file, "metadata")):
        if not f.exists():
            raise FileNotFoundError(
                f"{what} '{f}' not found: an export is a .so (or .tar) plus a .json of the same name; "
                f"write both with TVMModule.export('{so}')"
            )
    metadata = json.loads(meta_file.read_text())
    if metadata.get("format") != FORMAT or int(metadata.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"'{meta_file}' is not a qlfx TVM export this loader understands "
            f"(format={metadata.get('format')!r}, version={metadata.get('version')!r})"
        )
    with native_log_filter():
        library = tvm.runtime.load_module(str(so))
    return LoadedModule(library, metadata, device)
