"""Quantise the trained digits QLNets to int8 with qlfx's ``quantize`` pass; compare with fp32 and with
onnxruntime's own ``quantize_static`` on the same calibration data: accuracy, and the int8 output error
with and without the fp32-equivalent symmetry passes ``equalize,rotate`` (a table and a plot).

    python examples/train_digits.py                 # writes examples/out/digits_{qlnet,eq3}.pt
    python examples/quantize_digits.py [--arch both|qlnet|eq3] [--no-latency] [--out examples/out]

One column per pipeline string (:data:`COLUMNS`; a column is its label and its pipeline, run on the
graph of qlfx's default pipeline, compiled once: the fp32 column is that graph), then ``quantize`` with
each activation-range estimator.
Every int8 column is evaluated twice: the torch fake-quant simulation the pass manager checks, and the
int8 ONNX artifact in onnxruntime (``compiled.to_onnx``), which is the number that counts. The last
column is onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax
calibration, ``reduce_range`` as qlfx chose it) applied to qlfx's fp32 ONNX (its functions inlined), fed
the same calibration images.

**Output error** (the ``rel. err`` column, the summary table and ``quantize_digits.png`` in ``--out``):
||y_int8 - y_fp32|| / ||y_fp32|| over all logits of the 360 held-out test images, both models in
onnxruntime. The summary table has the three numbers issue 11 asks for: ``quantize`` alone, ``equalize,
rotate,quantize`` and ``quantize_static``, all with minmax activation ranges (as quantize_static's
MinMax calibration). examples/equalize_digits.py has the same table with an ablation of the passes and
a diagnosis of where the error comes from.

Data (train_digits.py's split, as in compress_digits.py): calibration = the training images
(unlabelled) + the validation images and 3 shifted copies of them (labelled: the ``accuracy_drop``
budget is checked on those); the 360 test images only report. ``--accuracy-drop`` is the budget each
quantize column declares (default 100: measure, do not enforce; the issue's target is 0.5).

Measured (2 shared CPU cores under heavy load, AVX2 without VNNI so 7-bit weights; test accuracy of
the ONNX model in onnxruntime, torch simulation identical; latency noisy)::

    PDEBlock net   fp32 98.61 | int8 minmax 98.61  percentile 98.61  mse 98.61 | ORT quantize_static 98.89
    Eq.(3) net     fp32 99.44 | int8 minmax 99.72  percentile 99.72  mse 99.72 | ORT quantize_static 99.44

On these 32x32 nets at batch 32 the int8 ONNX ran slower than fp32 (3-16 ms vs 1.2-2.8 ms): the
radial activations run in fp32 between DequantizeLinear / QuantizeLinear pairs and the convs are tiny.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_digits  # noqa: E402  (same folder: calibration split, batched accuracy)
import train_digits  # noqa: E402

import qlfx  # noqa: E402
from qlfx.defaults import DEFAULT_PIPELINE  # noqa: E402

BATCH = compress_digits.BATCH
# label -> pipeline run on the default pipeline's graph ("" = that graph); "{drop}" is the accuracy budget.
# Other symmetry passes add their columns here, e.g. ("int8 equalize", "equalize,quantize<accuracy_drop={drop}>").
COLUMNS = [
    ("fp32", ""),
    ("int8 minmax", "quantize<accuracy_drop={drop},estimator=minmax>"),
    ("int8 percentile", "quantize<accuracy_drop={drop},estimator=percentile>"),
    ("int8 mse", "quantize<accuracy_drop={drop},estimator=mse>"),
    # fp32-equivalent symmetry passes first (positive scalings, then rotations of the O(C) streams);
    # relative output errors of these columns: examples/equalize_digits.py
    ("int8 equalize,rotate minmax", "equalize,rotate,quantize<accuracy_drop={drop},estimator=minmax>"),
    ("int8 equalize,rotate mse", "equalize,rotate,quantize<accuracy_drop={drop},estimator=mse>"),
]


def _session(path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_outputs(session, x: torch.Tensor) -> np.ndarray:
    """Logits of an ONNX model captured at batch BATCH (the last chunk padded with its own images)."""
    name, outs = session.get_inputs()[0].name, []
    for start in range(0, len(x), BATCH):
        chunk = x[start:start + BATCH]
        real = len(chunk)
        outs.append(session.run(None, {name: chunk[torch.arange(BATCH) % real].numpy()})[0][:real])
    return np.concatenate(outs)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| over all entries (every test image's logits)."""
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# the three numbers of issue 11: label in the tables -> column label in COLUMNS (or the ORT row)
ERROR_SUMMARY = {"int8": "int8 minmax", "int8 equalize,rotate": "int8 equalize,rotate minmax",
                 "ORT quantize_static": "ORT quantize_static"}


def print_error_table(errors: dict[str, dict[str, float]], columns=ERROR_SUMMARY, log=print) -> None:
    """One row per architecture, one column per ``columns`` label (``errors[arch][columns[label]]``), and
    the ratio of the second column to the first."""
    labels = list(columns)
    log("\nint8 output error ||y_int8 - y_fp32|| / ||y_fp32|| (test images, onnxruntime)")
    log(f"{'layout':<10} " + " ".join(f"{label:>22}" for label in labels) + f" {labels[1] + ' / ' + labels[0]:>30}")
    for arch, row in errors.items():
        values = [row[columns[label]] for label in labels]
        log(f"{arch:<10} " + " ".join(f"{v:>22.4f}" for v in values) + f" {values[1] / values[0]:>30.2f}")


def plot_errors(errors: dict[str, dict[str, float]], path: Path, columns=ERROR_SUMMARY) -> str:
    """Bars: one group per ``columns`` label, one bar per architecture."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    labels = list(columns)
    fig, ax = plt.subplots(figsize=(1.9 * len(labels) + 1.5, 3.5))
    width = 0.8 / len(errors)
    for i, (arch, row) in enumerate(errors.items()):
        ax.bar([j + i * width for j in range(len(labels))], [row[columns[k]] for k in labels], width, label=arch)
    ax.set_xticks([j + width * (len(errors) - 1) / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("relative int8 output error (test)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)  # atomic
    return f"plot: {path}"


def ort_latency_ms(session, x: torch.Tensor, runs: int = 30) -> float:
    feed = {session.get_inputs()[0].name: x.numpy()}
    return compress_digits._median_ms(lambda: session.run(None, feed), warmup=3, runs=runs)


def ort_quantize_static(fp32_path: Path, out_path: Path, images: torch.Tensor, reduce_range: bool) -> None:
    """onnxruntime's own static int8 quantisation of an fp32 ONNX model, calibrated on ``images``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            name = _session(fp32_path).get_inputs()[0].name
            whole = len(images) // BATCH * BATCH
            self.batches = iter([{name: images[i:i + BATCH].numpy()} for i in range(0, whole, BATCH)])

        def get_next(self):
            return next(self.batches, None)

    import onnx
    import onnx.inliner

    inlined = out_path.with_name(out_path.stem + "_fp32_inlined.onnx")  # quantize_static sees graph nodes only
    onnx.save(onnx.inliner.inline_local_functions(onnx.load(str(fp32_path))), str(inlined))
    quantize_static(str(inlined), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--checkpoint-dir", default=str(here / "out"))
    parser.add_argument("--arch", choices=("qlnet", "eq3", "both"), default="both")
    parser.add_argument("--accuracy-drop", type=float, default=100.0,
                        help="the budget every quantize column declares (points on the labelled validation data)")
    parser.add_argument("--val-copies", type=int, default=3)
    parser.add_argument("--no-latency", action="store_true", help="skip the onnxruntime timings (batch 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="where the plot goes (default: the checkpoint dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = train_digits.load_digits_tensors()
    calibration, labels = compress_digits.calibration_data(data, args.val_copies)
    example = (data["x_train"][:BATCH],)
    archs = ("qlnet", "eq3") if args.arch == "both" else (args.arch,)
    errors: dict[str, dict[str, float]] = {}
    for arch in archs:
        path = Path(args.checkpoint_dir) / f"digits_{arch}.pt"
        if not path.exists():
            raise SystemExit(f"no checkpoint {path}: run `python examples/train_digits.py --out {args.checkpoint_dir}` first")
        model, checkpoint = train_digits.load_checkpoint(path)
        print(f"\n=== {arch}: {path.name}, trained test accuracy {checkpoint['test_accuracy']:.2f}% ===")
        print(f"{'column':<28} {'val drop':>8} {'test (torch)':>12} {'test (ORT)':>10} {'drop (ORT)':>10} "
              f"{'rel. err':>8} {'ORT ms/32':>9} {'compile s':>9}")
        base_acc, fp32_onnx, reduce_range, ref = None, None, True, None
        errors[arch] = row = {}
        # checked on random inputs only: the equivalent passes need no calibration data, and checking
        # them on all of it costs minutes
        fp32 = qlfx.compile(model, DEFAULT_PIPELINE, example_inputs=example)
        base = fp32.graph_module.eval()
        with tempfile.TemporaryDirectory() as tmp:
            for label, pipeline in COLUMNS:
                start = time.perf_counter()
                compiled = fp32 if not pipeline else qlfx.compile(
                    base, pipeline.format(drop=args.accuracy_drop), example_inputs=example, calibration=calibration,
                    labels=labels, verify_inputs=0)
                seconds = time.perf_counter() - start
                onnx_path = Path(tmp) / f"{arch}_{label.replace(' ', '_')}.onnx"
                compiled.to_onnx(onnx_path)
                session = _session(onnx_path, args.threads)
                torch_acc = compress_digits.accuracy(compiled, data["x_test"], data["y_test"])
                out = ort_outputs(session, data["x_test"])
                acc = 100.0 * float((out.argmax(1) == data["y_test"].numpy()).mean())
                check = compiled.report.rows[-1].check
                val_drop = (check.accuracy.before - check.accuracy.after
                            if check is not None and check.accuracy is not None else float("nan"))
                if base_acc is None:
                    base_acc, fp32_onnx, ref = acc, onnx_path, out
                row[label] = relative_error(out, ref)
                quantize_row = next((r for r in compiled.report.rows if r.pass_name == "quantize"), None)
                if quantize_row is not None:
                    reduce_range = quantize_row.result.stats["weight_bits"] == 7
                latency = "-" if args.no_latency else f"{ort_latency_ms(session, data['x_test'][:BATCH]):.3f}"
                print(f"{label:<28} {val_drop:>8.2f} {torch_acc:>12.2f} {acc:>10.2f} {base_acc - acc:>10.2f} "
                      f"{row[label]:>8.4f} {latency:>9} {seconds:>9.1f}")
            static_path = Path(tmp) / f"{arch}_ort_static.onnx"
            start = time.perf_counter()
            ort_quantize_static(fp32_onnx, static_path, calibration, reduce_range)
            seconds = time.perf_counter() - start
            session = _session(static_path, args.threads)
            out = ort_outputs(session, data["x_test"])
            acc = 100.0 * float((out.argmax(1) == data["y_test"].numpy()).mean())
            row["ORT quantize_static"] = relative_error(out, ref)
            latency = "-" if args.no_latency else f"{ort_latency_ms(session, data['x_test'][:BATCH]):.3f}"
            print(f"{'ORT quantize_static':<28} {'-':>8} {'-':>12} {acc:>10.2f} {base_acc - acc:>10.2f} "
                  f"{row['ORT quantize_static']:>8.4f} {latency:>9} {seconds:>9.1f}")
        print(f"(reduce_range={reduce_range}: {'7' if reduce_range else '8'}-bit weights"
              f"{' (this CPU has no VNNI)' if reduce_range else ''}; "
              f"test = {len(data['y_test'])} images, one image = {100 / len(data['y_test']):.2f} points)")
    print_error_table(errors)
    print(plot_errors(errors, Path(args.out or args.checkpoint_dir) / "quantize_digits.png"))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
