"""Shared benchmark helpers: FLOP counting and the machine's GEMM peak, plus the measuring code of
``qlfx bench`` (thread settings, non-spinning ORT sessions, alternating blocks of runs, medians, tables),
which lives in :mod:`qlfx.bench` and is re-exported here for the benchmark scripts.

Timing method (DESIGN.md §5): see :mod:`qlfx.bench`.
"""
from __future__ import annotations

import statistics
import time

from qlfx.bench import Engine, format_table, measure, ort_session, set_threads, short_reason  # noqa: F401


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
