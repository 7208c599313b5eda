"""Benchmark: the fused branch-product kernel (TVM, tuned) against torch, on qlnet50's stage shapes.

    python benchmarks/kernels.py --trials 16 [--database DIR] [--repeats 15] [--kinds pointwise,depthwise]

Shapes (batch 1, 224x224 input): PDEBlock product ("pointwise": conv1x1 Cin -> 2M, product of the
halves) at stage1 Cin=64 M=256 56x56, stage2 128/512 28x28, stage3 256/512 14x14, stage4 512/1024
7x7; and the paper's Eq.(3) product ("depthwise": conv1x1 Cin -> 4Cin times a 3x3 depthwise conv with
multiplier 4) at the same stages. Both with biases (BN folded), stride 1.

torch baseline (torch.set_num_threads(2)): pointwise = one conv1x1 to 2M channels + split + mul (what
the eager model does); depthwise = conv1x1 + depthwise conv + mul.

Peak: rate of a 2048x2048 fp32 torch.matmul with 2 threads (the GEMM roofline actually reachable on
this machine). Each rate is printed as the median run and the best run; %peak (best run / best peak
run) and speedup (best / best) use best runs, because on a shared 2-core machine the medians mostly
measure the other processes.

Measuring: TVM's and torch's thread pools spin after a run, so the engines are measured in
alternating blocks (one block of runs each, several rounds) and the median over all runs is reported,
never interleaved run by run (DESIGN.md §5). The tuning database is reused across runs: the second
invocation runs zero trials.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from qlfx.kernels.branch_product import BranchProductSpec, host_llvm_target
from qlfx.kernels.tuning import tune_branch_product

STAGES = [  # (name, Cin, M of the PDEBlock product, spatial size)
    ("stage1", 64, 256, 56),
    ("stage2", 128, 512, 28),
    ("stage3", 256, 512, 14),
    ("stage4", 512, 1024, 7),
]


def measure_peak_gemm(size: int = 2048, runs: int = 30) -> tuple[float, float]:
    """(median, best) GFLOP/s of a size^3 fp32 matmul with torch's current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9, 2 * size**3 / min(times) / 1e9


def torch_branch_product(spec: BranchProductSpec, seed: int = 0):
    """A closure running the torch version of ``spec`` (weights random, biases present)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.input_shape, generator=gen)
    m = spec.out_channels
    if spec.kind == "pointwise":
        weight = torch.randn(2 * m, spec.in_channels, 1, 1, generator=gen)
        bias = torch.randn(2 * m, generator=gen)

        def run():
            z = F.conv2d(x, weight, bias, stride=spec.stride)
            return z[:, :m] * z[:, m:]
    else:
        weight_a = torch.randn(spec.weight_a_shape, generator=gen)
        weight_b = torch.randn(spec.weight_b_shape, generator=gen)
        bias_a, bias_b = torch.randn(m, generator=gen), torch.randn(m, generator=gen)

        def run():
            a = F.conv2d(x, weight_a, bias_a, stride=spec.stride)
            b = F.conv2d(x, weight_b, bias_b, stride=spec.stride, padding=spec.padding_b, groups=spec.groups_b)
            return a * b

    return run


def time_blocks(engines: dict, rounds: int, per_block: int) -> dict[str, list[float]]:
    """Seconds per run for each engine, measured in alternating blocks of ``per_block`` runs."""
    times = {name: [] for name in engines}
    for name, fn in engines.items():  # warm-up: at least 0.3 s each
        start = time.perf_counter()
        while time.perf_counter() - start < 0.3:
            fn()
    for _ in range(rounds):
        for name, fn in engines.items():
            # Let the other engine's spinning threads go to sleep. Observed here: torch's 2-thread
            # conv ran at ~1 GFLOP/s for seconds after a burst of other work and at 150+ after a
            # 1 s pause; 0.05 s was not enough.
            time.sleep(0.5)
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="tuning budget per kernel (default 16)")
    parser.add_argument(
        "--database", default=os.path.expanduser("~/.cache/qlfx/branch-product-db"),
        help="tuning database directory (reused: tuned shapes run zero trials)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    parser.add_argument("--per-block", type=int, default=10, help="runs per engine per round")
    parser.add_argument("--kinds", default="pointwise,depthwise")
    parser.add_argument("--stages", default="stage1,stage2,stage3,stage4")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and TVM (default 2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # TVM's pool reads this when it starts (first parallel kernel run); the target's num-cores does not.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    target = host_llvm_target(num_cores=args.threads)
    peak, peak_best = measure_peak_gemm()
    print(f"target: {target}")
    print(
        f"measured peak: torch fp32 GEMM 2048^3, {args.threads} threads: {peak:.1f} GFLOP/s median, "
        f"{peak_best:.1f} best run; %peak and speedup use best runs (least disturbed by other load)"
    )
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes make every number lower and noisier)")
    print(f"tuning: {args.trials} trials per kernel, database {args.database}")
    print()
    header = (
        f"{'stage':7} {'kind':9} {'Cin':>4} {'M':>5} {'HxW':>6} {'GFLOP':>6} {'trials':>6}  {'knobs':24}"
        f" {'fused GF/s':>10} {'best':>6} {'%peak':>6} {'torch GF/s':>10} {'best':>6} {'%peak':>6} {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    kinds = [k for k in args.kinds.split(",") if k]
    for stage, cin, m_pde, size in STAGES:
        if stage not in args.stages.split(","):
            continue
        for kind in kinds:
            m = m_pde if kind == "pointwise" else 4 * cin
            spec = BranchProductSpec(1, cin, size, size, m, kind)
            tuned = tune_branch_product(spec, target, args.trials, args.database)
            kernel = tuned.build()
            gen = np.random.default_rng(0)
            weights = (
                gen.standard_normal(spec.weight_a_shape).astype("float32"),
                gen.standard_normal(m).astype("float32"),
                gen.standard_normal(spec.weight_b_shape).astype("float32"),
                gen.standard_normal(m).astype("float32"),
            )
            packed = kernel.packed_arguments(*weights)
            x = gen.standard_normal(spec.input_shape).astype("float32")
            import tvm  # noqa: PLC0415 -- after torch.set_num_threads

            x_tvm = tvm.runtime.tensor(x)
            out_tvm = tvm.runtime.tensor(np.empty(spec.output_shape, "float32"))
            engines = {
                "fused": lambda: kernel.run_packed(x_tvm, *packed, out=out_tvm),
                "torch": torch_branch_product(spec),
            }
            time.sleep(1.0)  # after tuning/compiling
            times = time_blocks(engines, args.rounds, args.per_block)
            fused = spec.flops / statistics.median(times["fused"]) / 1e9
            ref = spec.flops / statistics.median(times["torch"]) / 1e9
            fused_best = spec.flops / min(times["fused"]) / 1e9
            ref_best = spec.flops / min(times["torch"]) / 1e9
            knobs = tuned.knobs
            knob_text = f"m{knobs.m_vecs} p{knobs.p_tile} {'pix-outer' if knobs.pixel_outer else 'ch-outer'}"
            trials = f"{tuned.trials_run}" if tuned.trials_run else "db"
            print(
                f"{stage:7} {kind:9} {cin:>4} {m:>5} {size:>3}x{size:<2} {spec.flops / 1e9:>6.3f} {trials:>6}  "
                f"{knob_text:24} {fused:>10.1f} {fused_best:>6.1f} {fused_best / peak_best:>6.0%} {ref:>10.1f} "
                f"{ref_best:>6.1f} {ref_best / peak_best:>6.0%} "
                f"{fused_best / ref_best:>6.2f}x",
                flush=True,
            )
            rows.append((stage, kind, fused, ref))
    print()
    print(
        "fused = one TVM kernel (both convs + product, weights pre-packed), tuned over the hand schedule's "
        "knobs; torch = conv(s) + split/mul. GF/s = median run, best = fastest run; 'db' = tuning record "
        "reused (0 trials)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
