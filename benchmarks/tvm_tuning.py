"""qlfx's TVM module: tuning budget, wall time, per-task table, and latency against onnxruntime.

    python benchmarks/tvm_tuning.py                                  # qlnet50 b1 224, no tuning (records)
    python benchmarks/tvm_tuning.py --trials 16 --tuning-db /tmp/db   # tune: 16 trials per task on average
    python benchmarks/tvm_tuning.py --models qlnet50,qlnet-eq3 --batches 1,8 --trials 32
    python benchmarks/tvm_tuning.py --fill-packaged --trials 16      # tune into qlfx/tuning_records/ (best record per workload kept)

Per model and batch: builds qlfx's TVM module (qlfx.DEFAULT_PIPELINE, fused kernels, every other
task tuned with ``--trials`` per task on average, weighted by FLOPs; 0: the database's records and
qlfx's designed default schedules), prints the budget, the tuning wall time and the per-task table
(calls, MFLOP, default schedule's time, best time, share of the module), then times, in alternating
blocks (medians over all runs, ``--threads`` threads each, onnxruntime with allow_spinning=0):
``tvm qlfx``, ``ort qlfx`` (onnxruntime on qlfx's ONNX), ``ort plain`` (onnxruntime on the plain
torch.onnx export), and states the ratios and the GEMM floor (conv+linear FLOPs / torch's fp32 GEMM
rate on the same threads). Timings on a shared machine are noisy: rerun on a quiet one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure(runs: dict, repeat: int, block_seconds: float) -> dict:
    """name -> list of seconds per run, blocks of consecutive runs alternating between engines."""
    times = {name: [] for name in runs}
    for run in runs.values():  # warm up
        run()
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            while time.perf_counter() - start < block_seconds:
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    return times


def gemm_floor(gm, threads: int) -> float | None:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import common  # type: ignore

        conv, _ = common.conv_flops(gm)
        return conv / common.peak_gemm_flops(threads)
    except Exception as err:  # noqa: BLE001 -- the floor is context, not the measurement
        log(f"(no GEMM floor: {type(err).__name__}: {err})")
        return None


def bench(name: str, batch: int, args, workdir: Path) -> None:
    import numpy as np
    import torch

    import qlfx
    from qlfx.kernels.module_tuning import format_rows
    from qlfx.models import create_model, default_input_shape, randomize_batchnorm

    torch.set_num_threads(args.threads)
    model = create_model(name).eval()
    randomize_batchnorm(model, seed=0)
    shape = (batch,) + tuple(default_input_shape(name)[1:]) if args.size is None else (batch, 3, args.size, args.size)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x_np = x.numpy()
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,))

    start = time.perf_counter()
    module = compiled.to_tvm("llvm", tune_trials=args.trials, tuning_db=args.tuning_db, progress=True,
                             tune_other_ops=args.trials > 0)
    wall = time.perf_counter() - start
    kernels = module.kernels
    print(f"\n== {name} batch {batch} {shape[2]}x{shape[3]}  target {module.target}")
    print(f"tuning: {args.trials} trials per task on average (fused kernels: {args.trials} each, designed space), "
          f"database {args.tuning_db}; build + tuning wall time {wall:.0f} s")
    print(f"fused kernels: {sum(r.trials_run for r in kernels)} trials run, "
          f"{sum(1 for r in kernels if r.from_database)}/{len(kernels)} from a database")
    if module.tuning is not None:
        t = module.tuning
        print(f"other ops: {t.tasks_total} tasks, {t.tasks_from_database} from a database, {t.tasks_tuned} tuned, "
              f"{t.trials_run} trials, cost model {t.cost_model}, {t.seconds:.0f} s")
        print(format_rows(t.rows))

    runner = module.runner
    device_inputs = runner.to_device([x_np])
    runs = {"tvm qlfx": lambda: runner.run_device(device_inputs)}
    onnx_path = workdir / f"{name}_b{batch}_qlfx.onnx"
    compiled.to_onnx(str(onnx_path))
    session = ort_session(str(onnx_path), args.threads)
    feed = {session.get_inputs()[0].name: x_np}
    runs["ort qlfx"] = lambda: session.run(None, feed)
    plain_path = workdir / f"{name}_b{batch}_plain.onnx"
    try:
        torch.onnx.export(model, (x,), str(plain_path), dynamo=True, optimize=True)
        plain = ort_session(str(plain_path), args.threads)
        plain_feed = {plain.get_inputs()[0].name: x_np}
        runs["ort plain"] = lambda: plain.run(None, plain_feed)
    except Exception as err:  # noqa: BLE001
        log(f"(no plain export: {type(err).__name__}: {err})")

    with torch.no_grad():
        expected = model(x).numpy()
    err = np.abs(np.asarray(module(x_np)) - expected).max() / np.abs(expected).max()
    times = measure(runs, args.repeat, args.block_seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    floor = gemm_floor(qlfx.trace(model, (x,)), args.threads)
    print(f"latency (median ms, {args.threads} threads, {args.repeat} blocks of {args.block_seconds}s):")
    for k, v in medians.items():
        extra = f"  {v / floor:.2f}x floor" if floor else ""
        print(f"  {k:10s} {v * 1e3:8.2f} ms  ({len(times[k])} runs){extra}")
    tvm_ms = medians["tvm qlfx"]
    print(f"tvm qlfx vs ort qlfx: {medians['ort qlfx'] / tvm_ms:.2f}x faster" +
          (f"; vs ort plain: {medians['ort plain'] / tvm_ms:.2f}x" if "ort plain" in medians else "") +
          (f"; GEMM floor {floor * 1e3:.2f} ms" if floor else "") + f"; max rel err vs torch {err:.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qlnet50")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--size", type=int, default=None, help="input height = width (default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per task on average; 0: none")
    parser.add_argument("--tuning-db", default=str(Path.home() / ".cache" / "qlfx" / "tvm-tuning"))
    parser.add_argument("--fill-packaged", action="store_true",
                        help="tune into the records kept with qlfx (qlfx/tuning_records/<target key>)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--block-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    if args.fill_packaged:
        from qlfx.emit.tvm import make_target
        from qlfx.kernels.module_tuning import packaged_folder

        args.tuning_db = str(packaged_folder(make_target("llvm")))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for batch in [int(b) for b in args.batches.split(",")]:
                bench(name, batch, args, Path(tmp))
    if args.fill_packaged:  # ship the best record per workload, no logs
        import shutil

        from qlfx.kernels.module_tuning import RECORD_FILE, prune_to_best

        for folder in Path(args.tuning_db).iterdir():
            shutil.rmtree(folder / "logs", ignore_errors=True)
            if (folder / RECORD_FILE).exists():
                before, after = prune_to_best(folder)
                log(f"{folder}: kept the best of {before} records per workload: {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
