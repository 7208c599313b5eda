"""How long qlfx takes to compile, against torch.onnx.export of the same model, in one run.

    python3 benchmarks/compile.py [--model qlnet50] [--rounds 2] [--threads 2]

Rows: ``torch.onnx.export`` of the model (dynamo exporter, optimize=True: what a user would run),
then qlfx stage by stage — capture (torch.export + canonical forms), the default pipeline with the
equivalence check after every pass, ``to_onnx`` (re-export, torch.onnx with qlfx's translations,
checker with full shape inference, an onnxruntime run) — and their total. The two are alternated
``--rounds`` times and the minimum of each is reported (compilation is single-shot work; the minimum
is the least disturbed run). The ratio column is qlfx's total over torch.onnx.export's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qlnet50")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    import torch

    import qlfx
    from qlfx.api import DEFAULT_PIPELINE
    from qlfx.models import create_model, default_input_shape

    model = create_model(args.model).eval()
    x = torch.randn(*default_input_shape(args.model))
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            start = time.perf_counter()
            torch.onnx.export(model, (x,), str(Path(tmp) / "plain.onnx"), dynamo=True, optimize=True)
            keep("torch.onnx.export(model)", time.perf_counter() - start)

            start = time.perf_counter()
            compiled = qlfx.compile(model, DEFAULT_PIPELINE, example_inputs=(x,))
            middle = time.perf_counter()
            compiled.to_onnx(Path(tmp) / "qlfx.onnx")
            end = time.perf_counter()
            capture_s = compiled.report.rows[0].seconds
            keep("  capture (torch.export)", capture_s)
            keep("  passes + checks", middle - start - capture_s)
            keep("  to_onnx", end - middle)
            keep("qlfx.compile + to_onnx", end - start)

    reference = best["torch.onnx.export(model)"]
    width = max(len(k) for k in best)
    print(f"{args.model}, input {tuple(x.shape)}, {args.threads} threads, min of {args.rounds} rounds")
    print(f"{'step'.ljust(width)}  {'seconds':>8}  {'x torch.onnx':>12}")
    for name, seconds in best.items():
        print(f"{name.ljust(width)}  {seconds:8.2f}  {seconds / reference:12.2f}")


if __name__ == "__main__":
    main()
