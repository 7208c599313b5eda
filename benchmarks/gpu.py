"""GPU latency of qlnet50 / qlnet-eq3 built by qlfx for cuda, checked against torch. One self-contained script.

    python benchmarks/gpu.py                       # qlnet50 + qlnet-eq3, batch 1 and 8, 224x224
    python benchmarks/gpu.py --models qlnet50 --batches 1 --repeat 10

For each model and batch: builds (a) TVM from the plain traced graph (no qlfx passes) and (b) qlfx's
module (qlfx.DEFAULT_PIPELINE; fused kernels with their hand cuda schedule, the rest
with Relax's default cuda pipeline / dlight), runs both on the GPU through tvm's cuda device, compares
with torch on the GPU when torch has CUDA (else with CPU torch outputs computed here), and prints a
latency table (median of tvm's time_evaluator repeats; torch timed with cuda events).

Without a GPU it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cuda_arch(device) -> str:
    """sm_XY of the device; Hopper (9.0) gets sm_90a so its arch-specific instructions are allowed."""
    major, minor = str(device.compute_version).split(".")[:2]
    return f"sm_{major}{minor}" + ("a" if major == "9" and minor == "0" else "")


def time_tvm(module, x_np, repeat: int) -> float:
    """Median ms per run from tvm's time_evaluator (device-synchronised)."""
    runner = module.runner
    device_inputs = runner.to_device([x_np])
    runner.run_device(device_inputs)
    evaluator = runner.time_evaluator(number=10, repeat=repeat, min_repeat_ms=50)
    return statistics.median(evaluator(*device_inputs).results) * 1e3


def time_torch_cuda(model, x, repeat: int) -> float:
    import torch

    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qlnet50,qlnet-eq3")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--skip-plain", action="store_true", help="skip TVM without qlfx passes")
    args = parser.parse_args(argv)

    try:
        import tvm
    except ImportError as err:
        print(f"benchmarks/gpu.py: tvm is not importable here ({err}); nothing to run.")
        return 0
    device = tvm.cuda(0)
    if not device.exist:
        print("benchmarks/gpu.py: no CUDA GPU visible to tvm on this machine; nothing to run "
              "(run it on a machine with an NVIDIA GPU and a CUDA driver).")
        return 0

    import numpy as np
    import torch

    import qlfx
    from qlfx.emit.tvm import build_tvm
    from qlfx.models import create_model, default_input_shape, randomize_batchnorm

    pipeline = qlfx.DEFAULT_PIPELINE
    torch_cuda = torch.cuda.is_available()
    target = {"kind": "cuda", "arch": cuda_arch(device)}
    print(f"GPU: {device.device_name} (compute {device.compute_version}), target {target}; "
          f"torch {torch.__version__} {'with' if torch_cuda else 'WITHOUT'} CUDA; qlfx passes: {pipeline}\n")

    rows = []
    failures = 0
    for name in [m for m in args.models.split(",") if m]:
        for batch in [int(b) for b in args.batches.split(",") if b]:
            shape = list(default_input_shape(name))
            shape[0] = batch
            shape[2] = shape[3] = args.size
            model = create_model(name).eval()
            randomize_batchnorm(model, seed=0)
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            x_np = x.numpy()
            torch_ms = None
            with torch.no_grad():
                if torch_cuda:
                    model_gpu = model.to("cuda")
                    reference = model_gpu(x.to("cuda")).cpu().numpy()
                    torch_ms = time_torch_cuda(model_gpu, x.to("cuda"), args.repeat)
                    model = model.to("cpu")
                    ref_where = "torch cuda"
                else:
                    reference = model(x).numpy()
                    ref_where = "torch cpu"
            if torch_ms is not None:
                rows.append([name, batch, "torch eager (cuda)", f"{torch_ms:.3f}", "-", "-"])
            builds = []
            if not args.skip_plain:
                builds.append(("tvm plain", lambda: build_tvm(qlfx.trace(model, (x,)), (x,), target=target,
                                                              use_kernels=False, progress=False)))
            builds.append(("tvm qlfx", lambda: qlfx.compile(model, passes=pipeline, example_inputs=(x,)).to_tvm(
                target, progress=False)))
            for engine, build in builds:
                log(f"[{name} b{batch}] building {engine} for {target['arch']}")
                try:
                    t0 = time.perf_counter()
                    module = build()
                    built = time.perf_counter() - t0
                    out = module(x_np)
                    err = float(np.abs(out - reference).max() / np.abs(reference).max())
                    ms = time_tvm(module, x_np, args.repeat)
                    fused = sum(1 for r in module.kernels if r.kernel != "relax-fallback")
                    status = "ok" if err < 1e-3 else "WRONG"
                    failures += status != "ok"
                    rows.append([name, batch, engine, f"{ms:.3f}", f"{err:.1e} vs {ref_where} ({status})",
                                 f"{fused} fused kernels, built in {built:.0f}s"])
                except Exception as err:  # noqa: BLE001 -- report and go on with the others
                    traceback.print_exc()
                    failures += 1
                    rows.append([name, batch, engine, "n/a", f"{type(err).__name__}: {str(err)[:80]}", ""])

    header = ["model", "batch", "engine", "median ms", "max rel err", "notes"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
