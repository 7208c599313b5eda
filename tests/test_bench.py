"""qlfx.bench: the measuring code shared by `qlfx bench` and benchmarks/*.py (statistics, alternation)."""
from __future__ import annotations

import statistics

import pytest

from qlfx.bench import Engine, bench, format_bench, measure, parse_batches, parse_engines
from qlfx.errors import UsageError


def test_engine_statistics():
    e = Engine("x", lambda: None, batch=8, times=[0.004, 0.001, 0.002, 0.003, 0.010])
    assert e.median_ms == pytest.approx(3.0)
    assert e.p90_ms == pytest.approx(statistics.quantiles(e.times, n=10, method="inclusive")[-1] * 1e3)
    assert e.median_ms <= e.p90_ms <= max(e.times) * 1e3
    assert e.throughput == pytest.approx(8 / 0.003)
    assert Engine("y", None).median_ms is None and Engine("y", None).throughput is None


def test_measure_alternates_blocks_and_skips_unavailable_engines():
    calls = []
    a = Engine("a", lambda: calls.append("a"))
    b = Engine("b", lambda: calls.append("b"))
    missing = Engine("c", None, "n/a: not built")
    measure([a, missing, b], blocks=3, block_seconds=0.0)  # one run per block: a b a b a b after warm-up
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up + sizing run of each
    assert calls[4:] == ["a", "b"] * 3
    assert len(a.times) == len(b.times) == 3 and not missing.times
    assert "n/a: not built" in format_bench([a, missing, b])


def test_bench_api_on_a_torch_model():
    import torch.nn as nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    results = bench("conv", model=model, input_shape=(1, 3, 8, 8), batches=[1, 3], engines=["torch"], seconds=0.05,
                    blocks=2)
    assert [(e.name, e.batch) for e in results] == [("torch eager", 1), ("torch eager", 3)]
    for e in results:
        assert e.times and all(t > 0 for t in e.times) and e.median_ms <= e.p90_ms
        assert e.throughput == pytest.approx(e.batch / (e.median_ms / 1e3))


def test_parse_errors():
    assert parse_batches("1,8,1") == [1, 8] and parse_engines("tvm,torch") == ["tvm", "torch"]
    for bad in ("", "0", "a,b"):
        with pytest.raises(UsageError, match="positive batch sizes"):
            parse_batches(bad)
    with pytest.raises(UsageError, match="choose from torch,ort,tvm"):
        parse_engines("onnx")
