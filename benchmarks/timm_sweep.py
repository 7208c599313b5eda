"""The timm sweep as a table: every model of tests/timm_models.py through qlfx's default pipeline,
ONNX (onnxruntime) and, for the TVM subset, TVM llvm; BNs folded, convs vs timm's deploy form, errors.

    python3 benchmarks/timm_sweep.py [--tvm] [--threads 2] [names...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import set_threads  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--tvm", action="store_true", help="TVM for every model, not only the subset")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from timm_models import ALL, TVM_SUBSET, check, sweep_one

    names = args.names or ALL
    print("| model | family | BN folded | convs (deploy) | fused products | ONNX rel err | TVM rel err | s | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                r = sweep_one(name, Path(tmp), tvm=args.tvm or name in TVM_SUBSET)
                check(r)
                status = "ok"
            except Exception as err:  # noqa: BLE001 - a table row per model, whatever happened
                failures += 1
                print(f"<!-- {name}: {traceback.format_exc().splitlines()[-1]} -->", file=sys.stderr)
                print(f"| {name} | | | | | | | | FAIL: {type(err).__name__}: {str(err).splitlines()[0][:120]} |")
                continue
            deploy = f" ({r.deploy_convs})" if r.deploy_convs is not None else ""
            tvm = f"{r.tvm_rel_err:.1e}" if r.tvm_rel_err is not None else "-"
            print(f"| {name} | {r.family} | {r.bn_total - r.bn_left}/{r.bn_total} | {r.convs}{deploy} | "
                  f"{r.fused_products} | {r.onnx_rel_err:.1e} | {tvm} | {r.seconds:.1f} | {status} |", flush=True)
    print(f"\n{len(names) - failures}/{len(names)} models passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
