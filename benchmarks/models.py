"""CPU latency of whole QLNets under every engine, in one run.

    python benchmarks/models.py                          # qlnet50 + qlnet-eq3, batch 1 and 8, 224x224
    python benchmarks/models.py --models qlnet50 --batches 1 --trials 64
    python benchmarks/models.py --quick                  # tiny models, smoke test

Engines (fp32, ``--threads`` threads each, default 2):
  torch eager         the model itself under torch.no_grad
  torch.compile       inductor (n/a with the reason when it fails)
  ort plain           onnxruntime on torch.onnx.export of the model (dynamo exporter, no qlfx)
  ort qlfx            onnxruntime on qlfx's ONNX (qlfx.DEFAULT_PIPELINE)
  tvm plain           TVM Relax from the plain traced graph, no qlfx passes, untuned (default schedules)
  tvm qlfx            qlfx passes + fused kernels, MetaSchedule-tuned (--trials per task, database reused)

int8 engines (skip with --skip-int8), calibrated on --calibration seeded random images:
  ort qlfx int8       onnxruntime on qlfx's int8 QDQ ONNX: DEFAULT_PIPELINE + quantize (estimator mse)
  ort static int8     onnxruntime's quantize_static (QDQ, per-channel int8 weights, uint8 activations,
                      MinMax, reduce_range as qlfx chose it) on qlfx's fp32 ONNX with its functions
                      inlined, same images
After each table: the ratios ort plain / ort qlfx int8 (issue 11 target >= 2.5) and ort static int8 /
ort qlfx int8 (target >= 1), from the same run. int8 outputs are checked against fp32 within
--int8-tolerance (relative max error; random weights, so this bounds rather than judges accuracy).

Method (DESIGN.md §5): every onnxruntime session has ``allow_spinning = 0`` and ``intra_op_num_threads``
= threads; engines run in blocks of consecutive runs, blocks of all engines alternate, medians over all
runs. Roofline floor = conv+linear FLOPs of the model (from the traced graph's shapes) / the measured
fp32 GEMM rate of torch on the same threads; "x floor" is latency / floor (1.0 would be GEMM speed).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # type: ignore  # noqa: E402
else:
    from . import common  # noqa: E402



def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def qlfx_pipeline() -> str:
    """qlfx's default pipeline (fold-bn, merge-parallel, constant-fold, dce, fuse-product, expand-depthwise)."""
    import qlfx

    return qlfx.DEFAULT_PIPELINE


def build_engines(name: str, batch: int, args, workdir: Path) -> tuple[list[common.Engine], dict]:
    """Every engine for one model/batch, each with its own warm state; plus facts for the report."""
    import numpy as np
    import torch

    import qlfx
    from qlfx.emit.tvm import build_tvm
    from qlfx.models import create_model, default_input_shape, randomize_batchnorm

    shape = list(default_input_shape(name))
    shape[0] = batch
    if args.size and not name.endswith("-tiny"):
        shape[2] = shape[3] = args.size
    model = create_model(name).eval()
    randomize_batchnorm(model, seed=0)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x_np = x.numpy()
    with torch.no_grad():
        reference = model(x).numpy()
    facts: dict = {"shape": shape}
    engines: list[common.Engine] = []

    def check(engine_name: str, out, tolerance: float) -> str:
        out = np.asarray(out)
        err = float(np.abs(out - reference).max() / max(1e-12, float(np.abs(reference).max())))
        if not np.isfinite(err) or err > tolerance:
            return f"WRONG: rel err {err:.1e}"
        return f"rel err {err:.0e}"

    def add(engine_name: str, make, tolerance: float = 1e-3) -> None:
        log(f"[{name} b{batch}] preparing {engine_name}")
        start = time.perf_counter()
        try:
            run, out, note = make()
            note = "; ".join(x for x in (check(engine_name, out, tolerance), note) if x)
            engines.append(common.Engine(engine_name, run, f"{note}; ready in {time.perf_counter() - start:.0f}s"))
        except Exception as err:  # noqa: BLE001 -- an engine that fails is reported n/a, the others go on
            if args.verbose:
                traceback.print_exc()
            engines.append(common.Engine(engine_name, None, f"n/a: {common.short_reason(err)}"))

    # --- torch eager
    def eager():
        def run():
            with torch.no_grad():
                return model(x)

        return run, run().numpy(), ""

    add("torch eager", eager)

    # --- torch.compile
    def compiled():
        fn = torch.compile(model)

        def run():
            with torch.no_grad():
                return fn(x)

        return run, run().numpy(), ""

    if not args.skip_torch_compile:
        add("torch.compile", compiled)

    # --- onnxruntime on the plain export
    def ort_plain():
        path = workdir / f"{name}_b{batch}_plain.onnx"
        # what a user gets without qlfx (the zoo's Hardball/Softball ops decompose into plain ops)
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], verbose=False)
        session = common.ort_session(str(path), args.threads)
        feed = {session.get_inputs()[0].name: x_np}
        run = lambda: session.run(None, feed)  # noqa: E731
        return run, run()[0], "torch.onnx (dynamo)"

    add("ort plain", ort_plain)

    pipeline = qlfx_pipeline()
    compiled_qlfx = {}

    def qlfx_compiled():
        if "c" not in compiled_qlfx:
            compiled_qlfx["c"] = qlfx.compile(model, passes=pipeline, example_inputs=(x,))
        return compiled_qlfx["c"]

    # --- onnxruntime on qlfx's ONNX
    def ort_qlfx():
        path = workdir / f"{name}_b{batch}_qlfx.onnx"
        qlfx_compiled().to_onnx(str(path))
        session = common.ort_session(str(path), args.threads)
        feed = {session.get_inputs()[0].name: x_np}
        run = lambda: session.run(None, feed)  # noqa: E731
        return run, run()[0], pipeline

    add("ort qlfx", ort_qlfx)

    # --- int8: qlfx's quantize pass, and onnxruntime's quantize_static on qlfx's fp32 ONNX
    calibration = torch.randn(args.calibration, *shape[1:], generator=torch.Generator().manual_seed(1))
    int8 = {}

    def ort_qlfx_int8():
        compiled = qlfx.compile(model, passes=f"{pipeline},quantize<budget=inf>", example_inputs=(x,),
                                calibration=calibration)
        stats = next(r.result.stats for r in compiled.report.rows if r.pass_name == "quantize")
        int8["reduce_range"] = stats["weight_bits"] == 7
        path = workdir / f"{name}_b{batch}_qlfx_int8.onnx"
        compiled.to_onnx(str(path))
        session = common.ort_session(str(path), args.threads)
        feed = {session.get_inputs()[0].name: x_np}
        run = lambda: session.run(None, feed)  # noqa: E731
        return run, run()[0], (f"{stats['ops']} int8 ops, {stats['weight_bits']}-bit weights, {stats['estimator']}, "
                               f"{stats['samples']} calibration images")

    def ort_static_int8():
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)

        fp32_path = workdir / f"{name}_b{batch}_qlfx.onnx"
        if not fp32_path.exists():
            qlfx_compiled().to_onnx(str(fp32_path))
        reduce_range = int8.get("reduce_range", True)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter([{"x": calibration[i:i + batch].numpy()}
                                   for i in range(0, len(calibration) - batch + 1, batch)])

            def get_next(self):
                return next(self.feeds, None)

        # qlfx's ONNX functions (qlfx.BranchProduct, ...) inlined: quantize_static quantises graph nodes only
        import onnx
        import onnx.inliner

        inlined = workdir / f"{name}_b{batch}_qlfx_inlined.onnx"
        onnx.save(onnx.inliner.inline_local_functions(onnx.load(str(fp32_path))), str(inlined))
        path = workdir / f"{name}_b{batch}_ort_static_int8.onnx"
        quantize_static(str(inlined), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        session = common.ort_session(str(path), args.threads)
        feed = {session.get_inputs()[0].name: x_np}
        run = lambda: session.run(None, feed)  # noqa: E731
        return run, run()[0], f"quantize_static QDQ per-channel, reduce_range={reduce_range}"

    if not args.skip_int8:
        add("ort qlfx int8", ort_qlfx_int8, tolerance=args.int8_tolerance)
        add("ort static int8", ort_static_int8, tolerance=args.int8_tolerance)

    # --- TVM without qlfx passes, untuned
    def tvm_plain():
        gm = qlfx.trace(model, (x,))
        module = build_tvm(gm, (x,), target="llvm", tune_trials=0, use_kernels=False, progress=False)
        return _tvm_runner(module, x_np), module(x_np), "default schedules"

    if not args.skip_tvm_plain:
        add("tvm plain", tvm_plain)

    # --- qlfx's TVM module, tuned
    def tvm_qlfx():
        t0 = time.perf_counter()
        module = qlfx_compiled().to_tvm("llvm", tune_trials=args.trials, tuning_db=args.tuning_db, progress=True,
                                       tune_other_ops=args.trials > 0 and not args.no_tune_other_ops)
        tuned = sum(r.trials_run for r in module.kernels)
        products = [r for r in module.kernels if r.is_branch_product]
        fused = sum(1 for r in products if r.kernel != "relax-fallback")
        other = module.tuning
        note = (f"{fused}/{len(products)} fused kernels, {len(module.kernels) - len(products)} packed 1x1 / separable, "
                f"{tuned} kernel trials run")
        if other is not None:
            note += (f", other ops: {other.tasks_tuned} tasks tuned x {args.trials}, "
                     f"{other.tasks_from_database} from db")
        note += f", built in {time.perf_counter() - t0:.0f}s"
        return _tvm_runner(module, x_np), module(x_np), note

    if not args.skip_tvm_qlfx:
        add("tvm qlfx", tvm_qlfx)

    gm_plain = qlfx.trace(model, (x,))
    facts["conv_flops"], facts["flops"] = common.conv_flops(gm_plain)
    return engines, facts


def _tvm_runner(module, x_np):
    """A run() over device-resident input: what a deployment's steady state looks like."""
    runner = module.runner
    device_inputs = runner.to_device([x_np])
    return lambda: runner.run_device(device_inputs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qlnet50,qlnet-eq3")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--size", type=int, default=224, help="input height = width (224)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=32,
                        help="MetaSchedule trials per task for 'tvm qlfx' (fused kernels and other ops); 0: untuned")
    parser.add_argument("--tuning-db", default=str(Path.home() / ".cache" / "qlfx" / "tvm-tuning"),
                        help="persistent tuning database folder (shared with build_tvm's default)")
    parser.add_argument("--no-tune-other-ops", action="store_true", help="tune only the fused kernels")
    parser.add_argument("--repeat", type=int, default=7, help="measured blocks per engine")
    parser.add_argument("--block-seconds", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 1, few repeats, 4 trials")
    parser.add_argument("--skip-torch-compile", action="store_true")
    parser.add_argument("--skip-tvm-plain", action="store_true")
    parser.add_argument("--skip-tvm-qlfx", action="store_true")
    parser.add_argument("--skip-int8", action="store_true", help="skip the int8 onnxruntime engines")
    parser.add_argument("--calibration", type=int, default=8, help="random calibration images for the int8 engines")
    parser.add_argument("--int8-tolerance", type=float, default=0.5,
                        help="int8 engines: largest relative max error against fp32 before 'WRONG' (random weights)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.repeat, args.block_seconds = "qlnet-tiny,qlnet-eq3-tiny", "1", 3, 0.3
        args.trials = min(args.trials, 4)

    common.set_threads(args.threads)
    import torch

    log(f"measuring the fp32 GEMM peak on {args.threads} threads ...")
    peak = common.peak_gemm_flops(args.threads)
    print(f"machine: fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s on {args.threads} threads (torch {torch.__version__}); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"tvm qlfx: --trials {args.trials} per task, database {args.tuning_db}\n")

    workdir = Path(tempfile.mkdtemp(prefix="qlfx_bench_"))
    for name in [m for m in args.models.split(",") if m]:
        for batch in [int(b) for b in args.batches.split(",") if b]:
            engines, facts = build_engines(name, batch, args, workdir)
            log(f"[{name} b{batch}] measuring {sum(e.available for e in engines)} engines, {args.repeat} blocks")
            common.measure(engines, blocks=args.repeat, block_seconds=args.block_seconds, progress=log)
            floor_ms = facts["flops"] / peak * 1e3
            eager = next((e.median_ms for e in engines if e.name == "torch eager"), None)
            rows = []
            for e in engines:
                ms = e.median_ms
                rows.append([
                    e.name,
                    f"{ms:.2f}" if ms is not None else "n/a",
                    f"{eager / ms:.2f}x" if ms and eager else "-",
                    f"{ms / floor_ms:.1f}" if ms else "-",
                    f"{len(e.times)}",
                    e.note,
                ])
            print(f"== {name}  batch {batch}  input {tuple(facts['shape'])}  conv+linear {facts['flops'] / 1e9:.2f} "
                  f"GFLOP  floor {floor_ms:.2f} ms")
            print(common.format_table(rows, ["engine", "median ms", "speedup vs eager", "x floor", "runs", "notes"]))
            ms = {e.name: e.median_ms for e in engines if e.median_ms}
            if "ort qlfx int8" in ms:
                ratios = [f"{other} / ort qlfx int8 = {ms[other] / ms['ort qlfx int8']:.2f}x (target >= {target})"
                          for other, target in (("ort plain", 2.5), ("ort static int8", 1.0), ("ort qlfx", "-"))
                          if other in ms]
                print("int8: " + "; ".join(ratios))
            print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
