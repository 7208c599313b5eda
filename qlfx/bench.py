"""Latency and throughput measuring (``qlfx bench``; benchmarks/*.py use the same code via benchmarks/common.py).

Timing method (DESIGN.md §5): on a small machine, engines that keep thread pools spinning
(onnxruntime) slow down whatever runs next to them. So every ORT session gets
``session.intra_op.allow_spinning = "0"``; engines are measured in BLOCKS of consecutive runs, the
blocks of all engines alternate (A B C A B C ...), and the reported numbers are the median and the
90th percentile over all runs of an engine. A warm-up run (which also sizes the blocks) precedes the
measured ones. Throughput is samples per second at the median: ``batch / median``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

ENGINES = ("torch", "ort", "tvm")
ENGINE_NAMES = {"torch": "torch eager", "ort": "onnxruntime", "tvm": "tvm"}


def set_threads(threads: int) -> None:
    """Pin every engine to ``threads`` threads. Call before torch / tvm / onnxruntime start pools."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # No engine may keep its workers spinning after a run: on 2 cores a spinning pool steals the cores
    # of the engine measured next (torch eager measured 5-100x slower right after TVM blocks without
    # this). ORT's equivalent is the allow_spinning session option (ort_session below).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (interop pool started)
        pass


def ort_session(path, threads: int):
    """An onnxruntime CPU session with non-spinning thread pools and ``threads`` intra-op threads
    (``path``: a file path or the serialized model)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                providers=["CPUExecutionProvider"])


@dataclass
class Engine:
    """One way to run the model: ``run()`` does one inference on a fixed input of ``batch`` samples."""

    name: str
    run: Callable[[], object] | None
    note: str = ""
    times: list[float] = field(default_factory=list)
    runs_per_block: int = 1
    batch: int = 1

    @property
    def available(self) -> bool:
        return self.run is not None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times) * 1e3 if self.times else None

    @property
    def p90_ms(self) -> float | None:
        if not self.times:
            return None
        if len(self.times) == 1:
            return self.times[0] * 1e3
        return statistics.quantiles(self.times, n=10, method="inclusive")[-1] * 1e3

    @property
    def throughput(self) -> float | None:
        """Samples per second at the median latency."""
        median = self.median_ms
        return self.batch / (median / 1e3) if median else None


def measure(engines: Sequence[Engine], blocks: int = 5, block_seconds: float = 1.0, max_runs_per_block: int = 20,
            progress: Callable[[str], None] | None = None) -> None:
    """Fill ``engine.times`` (seconds per run) for every available engine, alternating blocks.

    Each engine runs once to warm up and to size its block (about ``block_seconds`` of runs, at most
    ``max_runs_per_block``, at least one); then ``blocks`` rounds of one block per engine.
    """
    live = [e for e in engines if e.available]
    for e in live:
        e.run()  # warm-up (first-run allocation, lazy init)
        t0 = time.perf_counter()
        e.run()
        single = time.perf_counter() - t0
        e.runs_per_block = max(1, min(max_runs_per_block, int(block_seconds / max(single, 1e-6))))
    for b in range(blocks):
        for e in live:
            for _ in range(e.runs_per_block):
                t0 = time.perf_counter()
                e.run()
                e.times.append(time.perf_counter() - t0)
        if progress:
            progress(f"  block {b + 1}/{blocks} done")


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in list(rows) + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 or i == len(r) - 1 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def short_reason(err: BaseException, limit: int = 100) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------ qlfx bench
def parse_engines(text: str) -> list[str]:
    from .errors import UsageError

    names = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in names if e not in ENGINES]
    if unknown or not names:
        raise UsageError(f"--engines {text}: unknown engine(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(ENGINES)}")
    return list(dict.fromkeys(names))


def parse_batches(text: str) -> list[int]:
    from .errors import UsageError

    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or any(b <= 0 for b in batches):
        raise UsageError(f"--batch {text}: give positive batch sizes like 1,8")
    return list(dict.fromkeys(batches))


def artifact_engine(path: str) -> str | None:
    """'ort' for an .onnx file, 'tvm' for a TVM .so / .tar export, None for anything else (a MODEL)."""
    suffix = os.path.splitext(path)[1].lower()
    return "ort" if suffix == ".onnx" else "tvm" if suffix in (".so", ".tar") else None


def _model_engines(model, shape: tuple[int, ...], engines: Sequence[str], threads: int, passes: str, workdir: str,
                   seed: int) -> list[Engine]:
    import torch

    from .api import compile as qlfx_compile

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    batch = int(shape[0])
    out: list[Engine] = []
    compiled = None
    for name in engines:
        label = ENGINE_NAMES[name]
        start = time.perf_counter()
        try:
            if name == "torch":
                def run(model=model, x=x):
                    with torch.no_grad():
                        return model(x)
                note = "the model itself, torch.no_grad"
            else:
                if compiled is None:
                    compiled = qlfx_compile(model, passes=passes, example_inputs=(x,))
                if name == "ort":
                    path = compiled.to_onnx(os.path.join(workdir, f"model_b{batch}.onnx"))
                    session = ort_session(path, threads)
                    feed = {session.get_inputs()[0].name: x.numpy()}
                    run = lambda session=session, feed=feed: session.run(None, feed)  # noqa: E731
                    note = f"qlfx --passes {passes}, intra_op threads {threads}, spinning off"
                else:
                    module = compiled.to_tvm(target="llvm", progress=False)
                    runner = module.runner  # the VM on device-resident inputs: no copies in the timed loop
                    run = lambda runner=runner, d=runner.to_device([x.numpy()]): runner.run_device(d)  # noqa: E731
                    note = f"qlfx --passes {passes}, llvm, untuned"
            note += f"; ready in {time.perf_counter() - start:.1f}s"
            out.append(Engine(label, run, note, batch=batch))
        except Exception as err:  # noqa: BLE001 - one engine failing must not hide the others' numbers
            out.append(Engine(label, None, f"n/a: {short_reason(err)}", batch=batch))
    return out


def _artifact_engine(path: str, shape: tuple[int, ...], threads: int, seed: int) -> Engine:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if artifact_engine(path) == "ort":
        session = ort_session(path, threads)
        feed = {session.get_inputs()[0].name: x}
        return Engine("onnxruntime", lambda: session.run(None, feed), f"{path}, intra_op threads {threads}, "
                      f"spinning off", batch=int(shape[0]))
    from .emit.tvm_runtime import load

    module = load(path)
    device_inputs = module.to_device([x])
    return Engine("tvm", lambda: module.run_device(device_inputs), f"{path}", batch=int(shape[0]))


def artifact_input_shape(path: str) -> tuple:
    """The artifact's (single) input shape, None where a dimension is dynamic."""
    from .errors import UsageError

    if artifact_engine(path) == "ort":
        import onnx

        model = onnx.load(path, load_external_data=False)
        initializers = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        dims = [inputs[0].type.tensor_type.shape.dim] if inputs else []
        count = len(inputs)
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[0]) if dims else ()
    else:
        import json

        from .emit.tvm_runtime import metadata_path

        meta = metadata_path(path)
        if not meta.is_file():
            raise UsageError(f"'{meta}' not found: a TVM export is a .so (or .tar) plus a .json of the same name")
        specs = json.loads(meta.read_text())["inputs"]
        count = len(specs)
        shape = tuple(specs[0]["shape"]) if specs else ()
    if count != 1:
        raise UsageError(f"qlfx bench feeds one input; '{path}' takes {count}")
    return shape


def bench(target: str, *, model=None, input_shape: Sequence[int] | None = None, batches: Sequence[int] = (1,),
          engines: Sequence[str] = ENGINES, threads: int = 1, passes: str | None = None, seconds: float = 5.0,
          blocks: int = 5, seed: int = 0, progress: Callable[[str], None] | None = None) -> list[Engine]:
    """Measure ``model`` (an nn.Module, named ``target``) under ``engines`` -- or, when ``model`` is None,
    the artifact at ``target`` (.onnx: onnxruntime; .so / .tar: tvm) -- at every batch size; per batch the
    engines' blocks alternate (:func:`measure`), each engine getting about ``seconds`` of runs in
    ``blocks`` blocks. Returns one :class:`Engine` per engine and batch (``times`` filled; ``run`` None
    with the reason in ``note`` for an engine that could not be built). Call :func:`set_threads` first."""
    import tempfile

    from .defaults import DEFAULT_PIPELINE
    from .errors import UsageError

    if seconds <= 0 or blocks < 1:
        raise UsageError(f"--seconds must be > 0 and --blocks >= 1 (got {seconds:g}, {blocks})")
    results: list[Engine] = []
    with tempfile.TemporaryDirectory(prefix="qlfx-bench-") as workdir:
        for batch in batches:
            if model is None:
                shape = tuple(input_shape) if input_shape else artifact_input_shape(target)
                if shape and shape[0] is not None and shape[0] != batch:
                    raise UsageError(f"'{target}' was built for batch {shape[0]}; --batch {batch} cannot run it "
                                     f"(build it with --dynamic-batch, or bench batch {shape[0]})")
                shape = (batch,) + tuple(shape[1:])
                if any(d is None for d in shape):
                    raise UsageError(f"'{target}' has dynamic dimensions beyond the batch: give --input-shape")
                group = [_artifact_engine(target, shape, threads, seed)]
            else:
                shape = (batch,) + tuple(input_shape[1:])
                group = _model_engines(model, shape, engines, threads, passes or DEFAULT_PIPELINE, workdir, seed)
            if progress:
                progress(f"batch {batch}: measuring {', '.join(e.name for e in group if e.available)}")
            measure(group, blocks=blocks, block_seconds=seconds / blocks, max_runs_per_block=1000, progress=progress)
            results += group
    return results


BENCH_COLUMNS = ["engine", "batch", "median ms", "p90 ms", "samples/s", "runs", "notes"]


def format_bench(results: Sequence[Engine]) -> str:
    rows = []
    for e in results:
        if e.times:
            rows.append([e.name, str(e.batch), f"{e.median_ms:.4g}", f"{e.p90_ms:.4g}", f"{e.throughput:.5g}",
                         str(len(e.times)), e.note])
        else:
            rows.append([e.name, str(e.batch), "-", "-", "-", "0", e.note])
    return format_table(rows, BENCH_COLUMNS)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
