"""Shared benchmark helpers: thread settings, careful timing, FLOP counting, the machine's GEMM peak.

Timing method (DESIGN.md §5): on a small machine, engines that keep thread pools spinning
(onnxruntime) slow down whatever runs next to them. So every ORT session gets
``session.intra_op.allow_spinning = "0"``; engines are measured in BLOCKS of consecutive runs, the
blocks of all engines alternate (A B C A B C ...), and the reported number is the median over all
runs of an engine. A warm-up block precedes the measured ones.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


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


def ort_session(path: str, threads: int):
    """An onnxruntime CPU session with non-spinning thread pools and ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@dataclass
class Engine:
    """One way to run the model: ``run()`` does one inference on a fixed input."""

    name: str
    run: Callable[[], object] | None
    note: str = ""
    times: list[float] = field(default_factory=list)
    runs_per_block: int = 1

    @property
    def available(self) -> bool:
        return self.run is not None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times) * 1e3 if self.times else None


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


def conv_flops(gm) -> tuple[int, int]:
    """(conv FLOPs, conv+linear FLOPs) of a traced qlfx graph: 2 * MACs, from the graph's shapes.

    conv2d: 2 * N * Cout * Hout * Wout * (Cin / groups) * kh * kw;
    branch_product: both branches (a: 1x1 over C, b: its kernel over C / groups_b);  linear: 2 * rows * in * out.
    """
    import torch

    from qlfx import ir

    conv = 0
    linear = 0
    for node in gm.graph.nodes:
        view = ir.ConvCall.of(node)
        if view is not None:
            n, cout, ho, wo = ir.shape(node)
            w = ir.shape(view.weight)
            conv += 2 * n * cout * ho * wo * w[1] * w[2] * w[3]
        elif ir.is_op(node, torch.ops.qlfx.branch_product.default):
            n, m, ho, wo = ir.shape(node)
            wa, wb = ir.shape(node.args[1]), ir.shape(node.args[3])
            conv += 2 * n * m * ho * wo * (wa[1] + wb[1] * wb[2] * wb[3])
        elif ir.LinearCall.of(node) is not None:
            out = ir.shape(node)
            w = ir.shape(node.args[1])
            rows = 1
            for s in out[:-1]:
                rows *= s
            linear += 2 * rows * w[0] * w[1]
    return conv, conv + linear


def peak_gemm_flops(threads: int, size: int = 2048, runs: int = 7) -> float:
    """Measured fp32 GEMM rate (FLOP/s) of torch's BLAS on ``threads`` threads: the median of ``runs``
    multiplications of two ``size`` x ``size`` matrices (the machine's practical compute roof)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / statistics.median(times)


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in list(rows) + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 or i == len(r) - 1 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def short_reason(err: BaseException, limit: int = 100) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
