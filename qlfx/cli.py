"""The ``qlfx`` command.

Exit codes: 0 every check held; 1 a pass broke equivalence (or a compare failed); 2 bad usage or bad
input (unknown model/pass, wrong shape, unwritable path, ...); 3 an internal error (a bug: please report).
"""
from __future__ import annotations

import argparse
import sys
import traceback

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

EPILOG = """exit codes:
  0  every check held
  1  a pass broke equivalence (the failing pass and first diverging node are printed)
  2  bad usage or bad input (unknown model or pass, wrong input shape, unwritable path, ...)
  3  internal error (a bug in qlfx)

MODEL is a zoo name (qlnet50, qlnet-eq3, qlnet-tiny, ... see `qlfx models`), path/to/file.py:factory or
package.module:factory (factory: a callable returning an nn.Module, or an nn.Module object)."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="zoo name, path/file.py:factory or pkg.module:factory")
    p.add_argument("--input-shape", metavar="N,C,H,W",
                   help="example input shape (default: the zoo model's, e.g. 1,3,224,224)")
    p.add_argument("--leaf", action="append", default=[], metavar="QUALNAME",
                   help="keep this submodule opaque when tracing (repeatable); use for untraceable code")


def build_parser() -> argparse.ArgumentParser:
    from .api import DEFAULT_PIPELINE

    parser = argparse.ArgumentParser(
        prog="qlfx", description="qlfx: a compiler for quasi-linear ConvNets (trace, verified passes, emit).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="qlfx 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("passes", help="list the passes with their contract and description",
                   description="List every registered pass: name, contract (exact / equivalent / lossy), description.")
    sub.add_parser("models", help="list the model zoo", description="List the zoo's model names and input shapes.")

    run = sub.add_parser(
        "run", help="trace MODEL, run passes with an equivalence check after each, print the report",
        description="Trace MODEL, run the pipeline with an equivalence check after every pass, print the "
                    "per-pass report, optionally emit ONNX or TVM.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(run)
    run.add_argument("--passes", default=DEFAULT_PIPELINE,
                     help=f"comma-separated pipeline, options in <>: e.g. 'fold-bn,slice<budget=0.01>' "
                          f"(default: {DEFAULT_PIPELINE})")
    run.add_argument("--print-before", metavar="NAME|all", help="print the IR before this pass (comma list or all)")
    run.add_argument("--print-after", metavar="NAME|all", help="print the IR after this pass (comma list or all)")
    run.add_argument("--print-changed", action="store_true", help="print a diff of the IR after each pass that changed it")
    run.add_argument("--time-passes", action="store_true", help="print each pass's time as it finishes")
    run.add_argument("--dump-dir", metavar="DIR", help="write every stage (000_input.py, 001_fold-bn.py, ... + .dot/.svg) here")
    run.add_argument("--calibration", metavar="FILE.npy", help="calibration inputs [N,C,H,W], also used by the checks")
    run.add_argument("--tolerance", type=float, metavar="REL",
                     help="relative tolerance of the checks: max|new-ref| <= REL * max|ref| (default by dtype; fp32 1e-4)")
    run.add_argument("--no-verify", action="store_true", help="skip the equivalence checks (not recommended)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random check inputs (default 0)")
    run.add_argument("--emit", choices=("onnx", "tvm"), help="write the result as ONNX or a TVM .so")
    run.add_argument("-o", "--output", metavar="PATH", help="output path for --emit")
    run.add_argument("--target", default="llvm", help="TVM target for --emit tvm: llvm or cuda (default llvm)")
    run.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials for --emit tvm (default 0)")
    run.add_argument("--tuning-db", metavar="DIR", help="persistent tuning database folder for --emit tvm")
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    return parser


def _example_inputs(args):
    import torch

    from .errors import UsageError
    from .loading import default_input_shape, parse_shape

    shape = parse_shape(args.input_shape) if args.input_shape else default_input_shape(args.model)
    if shape is None:
        raise UsageError(f"--input-shape is required for '{args.model}' (e.g. --input-shape 1,3,224,224)")
    return (torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)),)


def cmd_passes(args) -> int:
    from .pass_manager import list_passes

    rows = [(name, cls.contract, cls.description) for name, cls in list_passes().items()]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for name, contract, desc in rows:
        print(f"{name:<{w0}}  {contract:<{w1}}  {desc}")
    return EXIT_OK


def cmd_models(args) -> int:
    from .models import ZOO, default_input_shape

    for name in sorted(ZOO):
        print(f"{name:<24} input {','.join(map(str, default_input_shape(name)))}")
    return EXIT_OK


def cmd_run(args) -> int:
    import json

    from . import instruments as ins
    from .api import compile as qlfx_compile
    from .errors import UsageError
    from .io import atomic_write
    from .loading import load_array, load_model

    if args.emit and not args.output:
        raise UsageError("--emit needs -o PATH")
    model = load_model(args.model)
    example = _example_inputs(args)
    instruments = []
    if args.print_before or args.print_after:
        instruments.append(ins.PrintIR(before=args.print_before, after=args.print_after))
    if args.print_changed:
        instruments.append(ins.PrintChanged())
    if args.time_passes:
        instruments.append(ins.Timing())
    dump = ins.DumpDir(args.dump_dir) if args.dump_dir else None
    if dump:
        instruments.append(dump)
    calibration = load_array(args.calibration) if args.calibration else None
    compiled = qlfx_compile(model, passes=args.passes, example_inputs=example, calibration=calibration,
                            verify=not args.no_verify, tolerance=args.tolerance, instruments=instruments,
                            leaf_modules=args.leaf, seed=args.seed)
    print(compiled.report)
    if dump and dump.svg_problem:
        print(f"note: {dump.svg_problem}")
    if args.json:
        atomic_write(args.json, json.dumps(compiled.report.to_dict(), indent=2))
    if args.emit == "onnx":
        path = compiled.to_onnx(args.output)
        print(f"wrote {path}")
    elif args.emit == "tvm":
        module = compiled.to_tvm(target=args.target, tune_trials=args.tune_trials, tuning_db=args.tuning_db)
        path = module.export(args.output)
        print(f"wrote {path}")
    return EXIT_OK


COMMANDS = {"passes": cmd_passes, "models": cmd_models, "run": cmd_run}


def main(argv=None) -> int:
    from .errors import EquivalenceError, UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except EquivalenceError as err:
        if err.report is not None:
            print(err.report)
        print(f"\nerror: {err}", file=sys.stderr)
        return EXIT_NOT_EQUIVALENT
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        print("\nerror: internal error in qlfx (exit 3). Please report it with the traceback above.", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
