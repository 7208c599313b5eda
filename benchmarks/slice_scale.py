"""`slice` at full scale (issue 11 part 3): qlnet50 at 224x224, 64 calibration images, budget 0.01.

    python benchmarks/slice_scale.py                                  # the target
    python benchmarks/slice_scale.py --images 8 --resolution 96       # a short run
    python benchmarks/slice_scale.py --search greedy --images 4       # the old search, for comparison

Runs ``fold-bn,slice<budget=B;progress=true;search=S>`` through qlfx.compile (capture, fold-bn, the
slice search, the pass manager's checks, the held-out report) and prints the wall time of the whole
compile and of the slice pass, the process's peak RSS (resource.getrusage: the high-water mark of the
whole process, model and capture included), the moves the search evaluated and accepted, the samples it
ran through the graph (its machine-independent cost), the MACs before/after, and the held-out error.
The progress lines of the search go to stderr.

The weights are the zoo's random initialisation and the calibration images seeded Gaussian noise (no
data set is needed): the numbers measure cost, not accuracy. The BN statistics are the fresh ones by
default: with randomised ones (``--bn random``, randomize_batchnorm seed 0) qlnet50's class scores vary
by 0.03% of their size across inputs (measured at 96x96), the function is nearly constant, and the search
rightly deletes ~99% of the MACs -- a run that measures nothing about realistic budgets.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qlnet50")
    ap.add_argument("--images", type=int, default=64, help="calibration images (default 64)")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--search", default="auto", choices=("auto", "greedy", "bisect"))
    ap.add_argument("--options", default="", help="more slice options, e.g. 'granularity=0.125;probe_samples=4'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--bn", default="fresh", choices=("fresh", "random"), help="BN statistics (see above)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)

    import torch

    import qlfx
    from qlfx.models import create_model, randomize_batchnorm

    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model(args.model).eval()
    if args.bn == "random":
        model = randomize_batchnorm(model, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, args.resolution, args.resolution, generator=gen)
    calibration = torch.randn(args.images, 3, args.resolution, args.resolution, generator=gen)
    options = f"budget={args.budget};progress=true;search={args.search}" + (f";{args.options}" if args.options else "")
    start = time.perf_counter()
    compiled = qlfx.compile(model, f"fold-bn,slice<{options}>", example_inputs=(example,), calibration=calibration)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row = next(r for r in compiled.report.rows if r.pass_name == "slice")
    stats = row.result.stats
    holdout = row.check.holdout
    numbers = {
        "model": args.model, "resolution": args.resolution, "images": args.images, "budget": args.budget,
        "bn": args.bn, "search": stats.get("search"), "threads": torch.get_num_threads(),
        "wall_s": round(wall, 1), "slice_s": round(row.seconds, 1), "peak_rss_mb": round(peak_mb),
        "evaluations": stats.get("evaluations"), "refits": stats.get("refits"),
        "moves_accepted": stats.get("moves_accepted"), "path_moves": stats.get("path_moves"),
        "samples_run": stats.get("samples_run"),
        "macs_before": stats["macs_before"], "macs_after": stats["macs_after"],
        "macs_saved_pct": round(100 * (1 - stats["macs_after"] / stats["macs_before"]), 2),
        "error_search": stats["error"], "error_checked": row.check.needed,
        "error_holdout": None if holdout is None else holdout.needed,
    }
    for key, value in numbers.items():
        print(f"{key:>16}: {value}")
    if args.json:
        from qlfx.io import atomic_write

        atomic_write(Path(args.json), json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
