"""The ``qlfx`` command.

Exit codes: 0 every check held; 1 a pass broke equivalence (or --bisect found one, or a compare failed); 2 bad usage or bad
input (unknown model/pass, wrong shape, unwritable path, a model torch.export cannot capture, ...); 3 an internal error
(a pass that crashed or left a malformed graph, or a bug in qlfx: please report).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool whose reader went away

EPILOG = """exit codes:
  0  every check held
  1  a pass broke equivalence (the failing pass and first diverging node are printed),
     --bisect found a bad pass, or `compare` found an output beyond --tolerance
  2  bad usage or bad input (unknown model or pass, wrong input shape, unwritable path, a model
     torch.export cannot capture: the message says where and what to do, ...)
  3  internal error: a pass crashed or left a malformed graph (the pass and node are named), or a bug in qlfx
  141 the reader of the output went away (`qlfx diff ... | head`), as for any Unix tool

debugging (LLVM opt / Polygraphy style):
  qlfx run MODEL --passes a,b --bisect        first bad pass and first bad rewrite site
  qlfx run MODEL --dump-dir D                 every stage as D/000_input.py, D/001_fold-bn.py, ... (+ .dot/.svg)
  qlfx diff D/000_input.py D/001_fold-bn.py   nodes added / removed / changed, code diff
  qlfx run MODEL --report r.html (or .md)     per pass: contract, changed nodes, errors, params, MACs, time, picture
  qlfx run MODEL --emit onnx -o m.onnx && qlfx compare MODEL m.onnx    per-output errors, smallest passing tol
  qlfx compare MODEL m.onnx m.so --mark all   several artifacts, one table; per layer: first diverging value
  qlfx bench MODEL --batch 1,8 --threads 2    median / p90 latency, samples/s: torch, onnxruntime, TVM
  qlfx run MODEL --passes fuse-product --auto-prereqs   first run what each pass needs (fold-bn), see `qlfx passes`

MODEL is a zoo name (qlnet50, qlnet-eq3, qlnet-tiny, ... see `qlfx models`), path/to/file.py:factory or
package.module:factory (factory: a callable returning an nn.Module, or an nn.Module object)."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="zoo name, path/file.py:factory or pkg.module:factory")
    p.add_argument("--input-shape", metavar="N,C,H,W",
                   help="example input shape (default: the zoo model's, e.g. 1,3,224,224)")


def build_parser() -> argparse.ArgumentParser:
    from .defaults import DEFAULT_PIPELINE  # not from .api: the parser must not import torch

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
    run.add_argument("--load", action="append", default=[], metavar="FILE.py|pkg.module",
                     help="import this file or module first, so the passes it registers (@register_pass) can be "
                          "named in --passes (repeatable; like opt -load)")
    run.add_argument("--passes", default=DEFAULT_PIPELINE,
                     help=f"comma-separated pipeline, options in <>: e.g. 'fold-bn,slice<budget=0.01>' "
                          f"(default: {DEFAULT_PIPELINE})")
    run.add_argument("--auto-prereqs", action="store_true",
                     help="before a pass whose requirement does not hold (fuse-product needs bn-folded), run the "
                          "pass that establishes it (fold-bn), once; without it the report says what each "
                          "skipped site needed")
    run.add_argument("--print-before", metavar="NAME|all", help="print the IR before this pass (comma list or all)")
    run.add_argument("--print-after", metavar="NAME|all", help="print the IR after this pass (comma list or all)")
    run.add_argument("--print-changed", action="store_true", help="print a diff of the IR after each pass that changed it")
    run.add_argument("--time-passes", action="store_true", help="print each pass's time as it finishes")
    run.add_argument("--dump-dir", metavar="DIR", help="write every stage (000_input.py, 001_fold-bn.py, ... + .dot/.svg) here")
    run.add_argument("--calibration", metavar="FILE.npy", help="calibration inputs [N,C,H,W], also used by the checks")
    run.add_argument("--labels", metavar="FILE.npy",
                     help="integer class labels [N] of the calibration inputs (negative: unlabelled), for accuracy "
                          "budgets such as slice<accuracy_drop=0.5>")
    run.add_argument("--tolerance", type=float, metavar="REL",
                     help="relative tolerance of the checks: max|new-ref| <= REL * max|ref| (default by dtype; fp32 1e-4)")
    run.add_argument("--no-verify", action="store_true", help="skip the equivalence checks (not recommended)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random check inputs (default 0)")
    run.add_argument("--dynamic-batch", action="store_true",
                     help="capture with a symbolic batch size, so the result (and --emit's ONNX / TVM module) runs "
                          "at any batch size; the checks then also run at another batch size")
    run.add_argument("--emit", choices=("onnx", "tvm"),
                     help="write the result as ONNX or a TVM module (default: from -o's extension: .onnx, .so or .tar)")
    run.add_argument("-o", "--output", metavar="PATH",
                     help="output path: .onnx for --emit onnx; .so (or .tar, tvm's tarball of objects) for --emit tvm, "
                          "its metadata beside it as .json. A missing folder is created (and said so)")
    run.add_argument("--target", help="TVM target for --emit tvm: llvm or cuda (default llvm)")
    run.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials for --emit tvm (default 0)")
    run.add_argument("--tuning-db", metavar="DIR", help="persistent tuning database folder for --emit tvm")
    run.add_argument("--verbose", action="store_true",
                     help="show TVM's own logging (with --emit tvm): MetaSchedule's task tables, the C++ runtime's "
                          "info and warning lines")
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    run.add_argument("--bisect", action="store_true",
                     help="instead of stopping at the first failing check, find the first pass that breaks its "
                          "contract (checked as `run` checks it) and bisect over how many rewrites it makes to "
                          "the first bad rewrite site (exit 1 when found, 0 when nothing breaks)")
    run.add_argument("--report", metavar="FILE.html|FILE.md",
                     help="write a per-pass report: contract, changed nodes, errors, params, MACs, time, picture "
                          "(written also when a pass fails)")
    run.add_argument("--svg-dir", metavar="DIR",
                     help="draw every stage as DIR/000_input.svg, DIR/001_<pass>.svg ... with the nodes each pass "
                          "made highlighted (needs Graphviz `dot`; else .dot files)")

    diff = sub.add_parser(
        "diff", help="diff two dumped stages (files from --dump-dir)",
        description="Compare two stages written by `qlfx run --dump-dir DIR` (e.g. DIR/000_input.py "
                    "DIR/001_fold-bn.py): nodes added / removed / changed by name, then the code side by side "
                    "('|' changed line, '<' only in A, '>' only in B) or, with -u, as a unified diff.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    diff.add_argument("a", metavar="A", help="first stage file (e.g. DIR/000_input.py)")
    diff.add_argument("b", metavar="B", help="second stage file (e.g. DIR/001_fold-bn.py)")
    diff.add_argument("--unified", "-u", action="store_true", help="a unified diff instead of two columns")
    diff.add_argument("--width", type=int, help="total width of the two columns (default 160)")
    diff.add_argument("--nodes-only", action="store_true", help="only the lists of changed nodes")

    cmp = sub.add_parser(
        "compare", help="run MODEL and .onnx / TVM artifacts (and a pipeline's graph) on the same inputs: errors",
        description="Run MODEL (torch) and every ARTIFACT (.onnx through onnxruntime, a TVM .so / .tar from "
                    "`qlfx run --emit tvm`) on the same inputs (seeded random, or --inputs FILE); one table, a row "
                    "per artifact and output: err/max|ref| beside the allowed tolerance, max abs error, elementwise "
                    "relative error, the correlation of the outputs, and the verdict (PASS, FAIL, or 'probably a "
                    "different model' when the error is of the order of the outputs, err/max|ref| >= 0.5, or the "
                    "correlation is below 0.2). The artifacts' inputs are checked against the model's (count, "
                    "shapes, dtypes) before anything runs. Exit 1 when any output fails --tolerance.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(cmp)
    cmp.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="model.onnx, model.so or model.tar (several: one table)")
    cmp.add_argument("--tolerance", type=float, default=1e-4, metavar="REL",
                     help="relative tolerance: max|new-ref| <= REL * max|ref| (default 1e-4)")
    cmp.add_argument("--inputs", metavar="FILE.npz|FILE.npy|DIR",
                     help="inputs from a file instead of random ones: .npy (one input), .npz (one array per input, "
                          "by input name or in order: arr_0, arr_1), or a folder of images preprocessed as for "
                          "ImageNet: RGB, shorter side resized to max(H,W)*256/224, center crop to the input's HxW, "
                          "/255, mean (0.485,0.456,0.406), std (0.229,0.224,0.225). An array of K*N samples (N the "
                          "input's batch) is K input sets. (An integer, the old spelling, means --random-inputs N)")
    cmp.add_argument("--random-inputs", type=int, metavar="N", help="number of seeded random input sets (default 3)")
    cmp.add_argument("--seed", type=int, metavar="S", help="seed of the random inputs (default 0)")
    cmp.add_argument("--passes", metavar="PIPELINE",
                     help="also compare MODEL compiled with this pipeline (the qlfx graph, run in torch); with "
                          "--mark all it is the pipeline the ONNX artifacts were built with (default: the default pipeline)")
    cmp.add_argument("--mark", choices=("all",),
                     help="per layer: every intermediate value an .onnx ARTIFACT (or the --passes graph) keeps is "
                          "compared with the model value it came from, on the first input set; the first diverging "
                          "one is named with its node, module path and source line (TVM artifacts: outputs only)")
    cmp.add_argument("--verbose", action="store_true", help="show TVM's own logging while loading a TVM ARTIFACT")

    bench = sub.add_parser(
        "bench", help="latency (median, p90) and throughput of torch eager, onnxruntime and TVM on the same inputs",
        description="Measure MODEL under torch eager, onnxruntime and TVM (MODEL is compiled with --passes, the "
                    "default pipeline unless given, and emitted to a temporary folder; TVM untuned), or ARTIFACT "
                    "under its own engine (.onnx: onnxruntime, .so / .tar: tvm), on the same seeded random input, "
                    "per batch size. Method: engines run in blocks of consecutive runs, the blocks of all engines "
                    "alternate, a warm-up run first; median and 90th percentile over all runs, throughput = batch / "
                    "median; onnxruntime's thread pools do not spin (session.intra_op.allow_spinning=0). "
                    "Timings on a machine shared with other work are noisy.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("model", metavar="MODEL|ARTIFACT",
                       help="zoo name, path/file.py:factory, pkg.module:factory, or an .onnx / .so / .tar file")
    bench.add_argument("--input-shape", metavar="N,C,H,W",
                       help="input shape (default: the zoo model's, or the artifact's); its batch is replaced by --batch")
    bench.add_argument("--batch", default="1", metavar="B[,B...]", help="batch sizes to measure (default 1)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="threads of every engine: torch, onnxruntime intra-op, TVM (default: the cores this "
                            "process may use); stated in the output")
    bench.add_argument("--engines", metavar="LIST", help="for a MODEL: any of torch,ort,tvm (default all three)")
    bench.add_argument("--passes", metavar="PIPELINE", help="pipeline for the ort and tvm engines (default: the default pipeline)")
    bench.add_argument("--seconds", type=float, default=5.0, metavar="S",
                       help="measuring time per engine and batch, split over --blocks (default 5)")
    bench.add_argument("--blocks", type=int, default=5, metavar="K", help="alternating blocks per engine (default 5)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")

    sym = sub.add_parser(
        "symmetry", help="trace MODEL, fold batchnorm, and print its channel spaces and symmetry groups",
        description="Trace MODEL, run fold-bn,constant-fold,dce, then print the channel spaces and the group "
                    "acting on each (qlfx.symmetry.analyze).", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(sym)
    sym.add_argument("--seed", type=int, default=0, help="seed of the example input (default 0)")

    tune = sub.add_parser(
        "tune", help="compile MODEL and tune its TVM module with MetaSchedule (locally or over an RPC tracker)",
        description="Compile MODEL (verified passes), then tune its TVM kernels with MetaSchedule against a "
                    "persistent database; with --rpc-tracker every trial is measured on the servers of a TVM "
                    "RPC tracker (python -m tvm.exec.rpc_tracker / rpc_server --tracker HOST:PORT --key KEY).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(tune)
    tune.add_argument("--passes", default=DEFAULT_PIPELINE, help=f"pipeline before tuning (default: {DEFAULT_PIPELINE})")
    tune.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per kernel shape (default 16)")
    tune.add_argument("--tune-other-ops", action="store_true", help="also tune the TIR tasks of the other ops")
    tune.add_argument("--tuning-db", metavar="DIR", help="persistent tuning database folder "
                                                         "(default ~/.cache/qlfx/tvm-tuning)")
    tune.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on the servers of this TVM RPC tracker")
    tune.add_argument("--rpc-key", metavar="KEY", help="the key the tracker's servers registered with (--key)")
    tune.add_argument("--target", help="TVM target: llvm or cuda (default llvm)")
    tune.add_argument("-o", "--output", metavar="PATH.so|PATH.tar", help="also write the tuned module here")
    tune.add_argument("--seed", type=int, default=0, help="seed of the example input (default 0)")
    tune.add_argument("--verbose", action="store_true", help="show TVM's own logging while tuning")
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

    def needs(cls) -> str:  # what the pass requires, and which pass establishes it (--auto-prereqs runs that)
        items = [f"{r.name} ({r.established_by or 'capture'})" for r in cls.requires]
        return f"  [needs {', '.join(items)}]" if items else ""

    rows = [(name, cls.contract, cls.description + needs(cls)) for name, cls in list_passes().items()]
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

    _check_run_flags(args)  # these two import nothing heavy (no torch): bad usage fails in milliseconds
    folders = _check_outputs(args)

    from . import debug
    from . import instruments as ins
    from .api import compile as qlfx_compile
    from .errors import EquivalenceError, PassError
    from .io import atomic_write
    from .loading import load_array, load_label_array, load_model

    for spec in args.load:
        _load_plugin(spec)
    pipeline = _check_pipeline(args)  # unknown passes and --print-* names that never print, before any work
    _make_folders(folders)
    calibration = load_array(args.calibration) if args.calibration else None
    labels = load_label_array(args.labels) if args.labels else None
    model = load_model(args.model)
    example = _example_inputs(args)
    if args.bisect:
        found = debug.bisect(model, args.passes, example, tolerance=args.tolerance, calibration=calibration,
                             labels=labels, dynamic_batch=args.dynamic_batch, seed=args.seed)
        print(found)
        return EXIT_NOT_EQUIVALENT if found.found else EXIT_OK
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
    svg = debug.SvgDir(args.svg_dir) if args.svg_dir else None
    if svg:
        instruments.append(svg)
    collector = debug.ReportCollector() if args.report else None
    if collector:
        instruments.append(collector)
    title = f"qlfx run {args.model} --passes {args.passes}"
    try:
        compiled = qlfx_compile(model, passes=pipeline, example_inputs=example, calibration=calibration, labels=labels,
                                verify=not args.no_verify, tolerance=args.tolerance, instruments=instruments,
                                dynamic_batch=args.dynamic_batch, seed=args.seed, auto_prereqs=args.auto_prereqs)
    except (EquivalenceError, PassError) as err:
        if collector:
            debug.adopt_report_times(collector, err.report)
            path = debug.write_report(args.report, collector, title, error=str(err))
            print(f"wrote report {path}", file=sys.stderr)
        raise
    print(compiled.report)
    if dump and dump.svg_problem:
        print(f"note: {dump.svg_problem}")
    if svg:
        print(f"wrote {len(svg.written)} picture(s) to {args.svg_dir}" + (f"\nnote: {svg.problem}" if svg.problem else ""))
    if collector:
        debug.adopt_report_times(collector, compiled.report)
        print(f"wrote report {debug.write_report(args.report, collector, title)}"
              + (f"\nnote: {collector.svg_problem}" if collector.svg_problem else ""))
    if args.json:
        atomic_write(args.json, json.dumps(compiled.report.to_dict(), indent=2))
    if args.emit == "onnx":
        path = compiled.to_onnx(args.output)
        print(f"wrote {path}")
    elif args.emit == "tvm":
        with _tvm_logging(args.verbose):
            module = compiled.to_tvm(target=args.target or "llvm", tune_trials=args.tune_trials,
                                     tuning_db=args.tuning_db)
            path = module.export(args.output)
        print(f"wrote {path}")
    return EXIT_OK


EMIT_EXTENSIONS = {"onnx": (".onnx",), "tvm": (".so", ".tar")}


def _check_run_flags(args) -> None:
    """Refuse, before any work, flags that would be silently ignored or would write the wrong thing.
    Fills in ``args.emit`` from ``-o``'s extension when it is not given."""
    from .errors import UsageError

    if args.output and os.path.isdir(args.output):
        pass  # a folder: _check_outputs says so
    elif args.output:
        suffix = os.path.splitext(args.output)[1].lower()
        implied = next((kind for kind, exts in EMIT_EXTENSIONS.items() if suffix in exts), None)
        if args.emit is None:
            if implied is None:
                raise UsageError(f"-o '{args.output}': cannot tell what to write from '{suffix or 'no extension'}'. "
                                 f"Name it .onnx (ONNX) or .so / .tar (TVM module), or give --emit onnx|tvm")
            args.emit = implied
        elif implied != args.emit:
            wanted = " or ".join(EMIT_EXTENSIONS[args.emit])
            raise UsageError(f"--emit {args.emit} writes a {wanted} file, but -o is '{args.output}'. "
                             f"Name the output *{EMIT_EXTENSIONS[args.emit][0]}"
                             + (f", or use --emit {implied}" if implied else ""))
    elif args.emit:
        raise UsageError(f"--emit {args.emit} needs -o PATH (e.g. -o out/model{EMIT_EXTENSIONS[args.emit][0]})")
    # flags that do nothing without another one
    needs = [("--target", args.target is not None, "--emit tvm", args.emit == "tvm"),
             ("--tune-trials", args.tune_trials != 0, "--emit tvm", args.emit == "tvm"),
             ("--tuning-db", args.tuning_db is not None, "--emit tvm", args.emit == "tvm"),
             ("--verbose", args.verbose, "--emit tvm (it shows TVM's own logging)", args.emit == "tvm"),
             ("--labels", args.labels is not None, "--calibration", args.calibration is not None),
             ("--tolerance", args.tolerance is not None, "the checks (drop --no-verify)", not args.no_verify)]
    if args.bisect:  # bisect reruns the pipeline its own way: no instruments, no outputs
        needs += [(flag, given, "a normal run (drop --bisect: it reports the bad pass and writes nothing)", False)
                  for flag, given in (("--emit", args.emit is not None), ("--json", args.json is not None),
                                      ("--report", args.report is not None), ("--dump-dir", args.dump_dir is not None),
                                      ("--svg-dir", args.svg_dir is not None), ("--no-verify", args.no_verify),
                                      ("--print-before", args.print_before is not None),
                                      ("--print-after", args.print_after is not None),
                                      ("--print-changed", args.print_changed), ("--time-passes", args.time_passes),
                                      ("--auto-prereqs", args.auto_prereqs))]
    for flag, given, other, present in needs:
        if given and not present:
            raise UsageError(f"{flag} has no effect without {other}")
    if args.tune_trials < 0:
        raise UsageError(f"--tune-trials must be >= 0, not {args.tune_trials}")
    if args.report and not args.report.lower().endswith((".html", ".htm", ".md")):
        raise UsageError(f"--report '{args.report}' must end in .html or .md")


def _check_pipeline(args) -> list:
    """Parse --passes (an unknown pass fails here, before the model is loaded) and refuse --print-before /
    --print-after names that would print nothing: not a pass, or not one that runs."""
    from .errors import UsageError
    from .pass_manager import get_pass, parse_pipeline

    pipeline = parse_pipeline(args.passes)
    names = {p.name for p in pipeline}
    for flag, spec in (("--print-before", args.print_before), ("--print-after", args.print_after)):
        if not spec or spec == "all":
            continue
        for name in filter(None, (n.strip() for n in spec.split(","))):
            get_pass(name)  # an unknown name: UnknownPassError with the closest known one
            if name not in names and not args.auto_prereqs:  # with --auto-prereqs it may be inserted
                raise UsageError(f"{flag} {name}: '{name}' is not in --passes ({args.passes}), so nothing would be "
                                 f"printed. Add it to --passes or name one of {', '.join(sorted(names)) or 'them'}")
    return pipeline


def _check_outputs(args) -> list[tuple[str, str]]:
    """Check every path the run will write, without writing anything; return the folders to make
    (flag, folder), so that :func:`_make_folders` makes them once every other check has passed."""
    from .io import check_writable

    outputs = [("-o", args.output, False), ("--json", args.json, False), ("--report", args.report, False),
               ("--dump-dir", args.dump_dir, True), ("--svg-dir", args.svg_dir, True),
               ("--tuning-db", args.tuning_db, True)]
    folders = []
    for flag, path, is_folder in outputs:
        if path and check_writable(path, folder=is_folder) is not None:
            folders.append((flag, path if is_folder else os.path.dirname(path)))
    return folders


def _make_folders(folders: list[tuple[str, str]]) -> None:
    for flag, folder in folders:
        if not os.path.isdir(folder):  # two outputs may share a new folder
            os.makedirs(folder)
            print(f"note: created folder '{folder}' for {flag}", file=sys.stderr)


@contextlib.contextmanager
def _tvm_logging(verbose: bool):
    """With --verbose, TVM's own logging on stderr while TVM works: its Python loggers at INFO (MetaSchedule's
    task tables) and the "qlfx" logger at DEBUG, which lets the C++ runtime's log lines through
    (:func:`qlfx.emit.tvm_runtime.native_log_filter`). Restored afterwards: main() may run in-process."""
    import logging

    if not verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("qlfx", "tvm", "tvm.s_tir.meta_schedule")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG if logger.name == "qlfx" else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger("tvm").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("tvm").removeHandler(handler)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _load_plugin(spec: str) -> None:
    """Import a file or module that registers passes."""
    import importlib
    import importlib.util
    from pathlib import Path

    from .errors import UsageError

    try:
        if spec.endswith(".py") or "/" in spec:
            path = Path(spec)
            if not path.is_file():
                raise UsageError(f"--load: file '{path}' does not exist")
            module_spec = importlib.util.spec_from_file_location(f"qlfx_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"--load '{spec}' failed: {type(err).__name__}: {err}") from err


def cmd_diff(args) -> int:
    from .debug import diff_stages
    from .errors import UsageError

    for flag, given, other, present in (
            ("--width", args.width is not None, "the side-by-side view (drop -u / --nodes-only)",
             not (args.unified or args.nodes_only)),
            ("--unified", args.unified, "the code view (drop --nodes-only)", not args.nodes_only)):
        if given and not present:
            raise UsageError(f"{flag} has no effect without {other}")
    d = diff_stages(args.a, args.b, width=args.width or 160)
    print(d.summary())
    if not args.nodes_only and not d.identical:
        print()
        print(d.unified if args.unified else d.side_by_side)
    return EXIT_OK


def _check_compare_flags(args) -> None:
    """Refuse, before any work, compare flags that would be ignored. Fills in ``args.random_inputs``
    (an integer --inputs is its old spelling)."""
    from .emit.tvm_runtime import LIBRARY_SUFFIXES
    from .errors import UsageError

    suffixes = [os.path.splitext(a)[1].lower() for a in args.artifacts]
    if args.inputs is not None and args.inputs.isdigit() and not os.path.exists(args.inputs):
        if args.random_inputs is not None:
            raise UsageError(f"--inputs {args.inputs} (the old spelling of --random-inputs) and --random-inputs: give one")
        args.random_inputs, args.inputs = int(args.inputs), None
    if args.inputs is not None:
        for flag, given in (("--random-inputs", args.random_inputs is not None), ("--seed", args.seed is not None)):
            if given:
                raise UsageError(f"{flag} has no effect with --inputs {args.inputs} (the inputs come from the file)")
    if args.random_inputs is not None and args.random_inputs < 1:
        raise UsageError(f"--random-inputs must be >= 1, not {args.random_inputs}")
    if args.verbose and not any(s in LIBRARY_SUFFIXES + (".json",) for s in suffixes):
        raise UsageError("--verbose has no effect without a TVM ARTIFACT (.so / .tar): it shows TVM's own logging")
    if args.mark and args.passes is None and ".onnx" not in suffixes:
        raise UsageError("--mark all compares per layer for .onnx artifacts and the --passes graph; with only TVM "
                         "artifacts it has no effect (add the .onnx, or --passes PIPELINE)")


def cmd_compare(args) -> int:
    _check_compare_flags(args)  # imports nothing heavy: bad usage fails before torch is loaded

    from .debug import compare_artifacts, format_comparisons, input_names
    from .inputs import load_input_sets
    from .loading import load_model
    from .pass_manager import parse_pipeline

    if args.passes is not None:
        parse_pipeline(args.passes)  # an unknown pass: exit 2 before the model is loaded
    model = load_model(args.model)
    seed = args.seed or 0
    fit = args.inputs is not None and not args.input_shape and not _has_default_shape(args.model)
    if fit:  # a model file without --input-shape: the file's arrays are the inputs as they are
        import numpy as np
        import torch

        from .inputs import count_arrays, read_arrays

        arrays = read_arrays(args.inputs, input_names(model, count_arrays(args.inputs)))
        examples = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        examples = tuple(t.float() if t.is_floating_point() else t for t in examples)
    else:
        args.seed = seed
        examples = _example_inputs(args)
    sets = (load_input_sets(args.inputs, examples, input_names(model, len(examples)), fit_examples=fit)
            if args.inputs is not None else None)
    with _tvm_logging(args.verbose):
        results = compare_artifacts(model, args.artifacts, examples, tolerance=args.tolerance,
                                    count=args.random_inputs or 3, seed=seed, input_sets=sets,
                                    input_source=f"from {args.inputs}" if sets is not None else None,
                                    passes=args.passes, mark_all=args.mark == "all")
    print(format_comparisons(results))
    failed = [r for r in results if not r.passed]
    for r in failed:
        if r.probably_different():
            print(f"\nerror: '{r.artifact}' is probably a different model (or weights, or input layout): "
                  + ("; ".join(r.problems) if r.problems else
                     f"its error is of the order of the outputs themselves (err/max|ref| {r.needed:.3g}), not a "
                     f"tolerance question"), file=sys.stderr)
        else:
            print(f"\nerror: '{r.artifact}' differs from the model beyond tolerance {args.tolerance:g}; "
                  f"it would pass with --tolerance {r.needed:.3g}", file=sys.stderr)
    return EXIT_NOT_EQUIVALENT if failed else EXIT_OK


def _has_default_shape(model: str) -> bool:
    from .loading import default_input_shape

    return default_input_shape(model) is not None


def cmd_bench(args) -> int:
    from .bench import artifact_engine, parse_batches, parse_engines
    from .errors import UsageError

    batches = parse_batches(args.batch)  # usage first: no torch imported yet
    engine = artifact_engine(args.model)
    if engine is not None:
        for flag, given in (("--engines", args.engines is not None), ("--passes", args.passes is not None)):
            if given:
                raise UsageError(f"{flag} has no effect for an artifact ('{args.model}' runs in its own engine, "
                                 f"{'onnxruntime' if engine == 'ort' else 'tvm'}); give a MODEL to compare engines")
        if not os.path.isfile(args.model):
            raise UsageError(f"artifact '{args.model}' does not exist (write one with `qlfx run MODEL -o {args.model}`)")
    engines = parse_engines(args.engines) if args.engines else ["torch", "ort", "tvm"]
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, not {args.threads}")
    if args.seconds <= 0 or args.blocks < 1:
        raise UsageError(f"--seconds must be > 0 and --blocks >= 1 (got {args.seconds:g}, {args.blocks})")
    if args.passes is not None:
        from .pass_manager import parse_pipeline

        parse_pipeline(args.passes)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    from .bench import bench, format_bench, log, set_threads
    from .loading import default_input_shape, load_model, parse_shape

    set_threads(threads)
    shape = parse_shape(args.input_shape) if args.input_shape else None
    model = None
    if engine is None:
        model = load_model(args.model)
        shape = shape or default_input_shape(args.model)
        if shape is None:
            raise UsageError(f"--input-shape is required for '{args.model}' (e.g. --input-shape 1,3,224,224)")
    results = bench(args.model, model=model, input_shape=shape, batches=batches, engines=engines, threads=threads,
                    passes=args.passes, seconds=args.seconds, blocks=args.blocks, seed=args.seed, progress=log)
    print(f"qlfx bench {args.model}: {threads} thread(s) per engine (torch, onnxruntime intra-op, TVM), onnxruntime "
          f"spinning off; {args.blocks} alternating blocks of ~{args.seconds / args.blocks:.2g} s per engine and batch")
    print(format_bench(results))
    return EXIT_OK


def cmd_symmetry(args) -> int:
    from .api import compile as qlfx_compile
    from .errors import UsageError
    from .loading import load_model

    try:
        from .symmetry import analyze, format_report
    except ImportError as err:
        raise UsageError(f"qlfx.symmetry has no analyze/format_report in this build ({err})") from err
    model = load_model(args.model)
    compiled = qlfx_compile(model, passes="fold-bn,constant-fold,dce", example_inputs=_example_inputs(args),
                            seed=args.seed)
    print(format_report(analyze(compiled.graph_module)))
    return EXIT_OK


def cmd_tune(args) -> int:
    from .errors import UsageError
    from .io import check_writable

    # bad usage fails before anything heavy is imported or loaded
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, not {args.trials}")
    if args.rpc_key is not None and args.rpc_tracker is None:
        raise UsageError("--rpc-key has no effect without --rpc-tracker HOST:PORT")
    if args.output and os.path.splitext(args.output)[1].lower() not in EMIT_EXTENSIONS["tvm"]:
        raise UsageError(f"-o '{args.output}': a TVM module is written as .so or .tar")
    for flag, path, folder in (("-o", args.output, False), ("--tuning-db", args.tuning_db, True)):
        if path and check_writable(path, folder=folder) is not None and not folder:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rpc = None
    if args.rpc_tracker is not None:
        from .kernels.rpc import RPCSettings

        rpc = RPCSettings.parse(args.rpc_tracker, args.rpc_key)
        servers = rpc.check()  # unreachable tracker / no server with the key: exit 2 with what to start
        print(f"tracker {rpc.address}: {servers} server(s) with key '{rpc.key}'", file=sys.stderr)
    from .api import compile as qlfx_compile
    from .loading import load_model

    compiled = qlfx_compile(load_model(args.model), passes=args.passes, example_inputs=_example_inputs(args),
                            seed=args.seed)
    print(compiled.report)
    with _tvm_logging(args.verbose):
        module = compiled.tune(trials=args.trials, database=args.tuning_db, target=args.target or "llvm",
                               rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
                               tune_other_ops=args.tune_other_ops)
        path = module.export(args.output) if args.output else None
    for record in module.kernels:
        best = f"{record.best_us:.1f} us" if record.best_us is not None else "-"
        source = "database" if record.from_database else f"{record.trials_run} trials"
        print(f"kernel {record.node}: {record.kernel} ({source}, best {best}){' ' + record.note if record.note else ''}")
    if path:
        print(f"wrote {path}")
    return EXIT_OK


COMMANDS = {"passes": cmd_passes, "models": cmd_models, "run": cmd_run, "diff": cmd_diff,
            "compare": cmd_compare, "bench": cmd_bench, "symmetry": cmd_symmetry, "tune": cmd_tune}


def _where_raised(error: BaseException) -> str:
    """'my_passes.py:12 in run': the innermost frame of the error's traceback in the pass's own code
    (not in torch or qlfx's core), or ''."""
    import torch

    library = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(library)]
    if not frames:
        return ""
    last = frames[-1]
    return f"{os.path.basename(last.filename)}:{last.lineno} in {last.name}"


def main(argv=None) -> int:
    from .errors import EquivalenceError, PassError, UsageError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help / --version exit 0, bad usage exits 2
        return int(stop.code or 0)
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
    except PassError as err:  # contained: the pass and node are named, the traceback would only repeat it
        if err.report is not None:
            print(err.report)
        where = _where_raised(err.error)
        print(f"\nerror: {err}" + (f"\n  ({type(err.error).__name__} raised at {where})" if where else ""),
              file=sys.stderr)
        return EXIT_INTERNAL
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader stopped reading (`qlfx diff ... | head`): stop quietly like any Unix tool, and point
        # stdout at /dev/null so the interpreter's final flush does not raise again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_BROKEN_PIPE
    except Exception:
        traceback.print_exc()
        print("\nerror: internal error in qlfx (exit 3). Please report it with the traceback above.", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
