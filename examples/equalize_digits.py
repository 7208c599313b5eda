"""Int8 output error of the trained digits QLNets with and without the fp32-equivalent symmetry passes
``equalize`` and ``rotate``, against onnxruntime's own ``quantize_static``; a table and a plot.

    python examples/train_digits.py                 # writes examples/out/digits_{qlnet,eq3}.pt
    python examples/equalize_digits.py [--arch both|qlnet|eq3] [--estimator minmax] [--out examples/out]

Columns (all on the graph of qlfx's default pipeline, all evaluated as int8 ONNX in onnxruntime):

- ``int8``: ``quantize<estimator=E>``;
- ``int8 equalize,rotate``: ``equalize,rotate,quantize<estimator=E>`` (the two passes keep the fp32
  function -- the pass manager checks it on random inputs and on the calibration images);
- ``ORT quantize_static``: onnxruntime's QDQ quantiser (per-channel int8 weights, uint8 activations,
  MinMax) on qlfx's fp32 ONNX, same calibration images, same weight bits as qlfx chose.

The number is the relative output error on the 360 held-out test images, ||y_int8 - y_fp32|| / ||y_fp32||
over all logits (and top-1 accuracy beside it). Calibration as in quantize_digits.py. The plot
(``equalize_digits.png`` in ``--out``) shows the error per column and architecture.
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
import compress_digits  # noqa: E402
import quantize_digits  # noqa: E402  (ORT session and quantize_static helpers)
import train_digits  # noqa: E402

import qlfx  # noqa: E402
from qlfx.defaults import DEFAULT_PIPELINE  # noqa: E402

BATCH = compress_digits.BATCH
COLUMNS = [("int8", "quantize<accuracy_drop=100,estimator={e}>"),
           ("int8 equalize,rotate", "equalize,rotate,quantize<accuracy_drop=100,estimator={e}>")]


def ort_outputs(session, x: torch.Tensor) -> np.ndarray:
    """Logits of an ONNX model captured at batch BATCH (the last chunk padded with its own images)."""
    name, outs = session.get_inputs()[0].name, []
    for start in range(0, len(x), BATCH):
        chunk = x[start:start + BATCH]
        real = len(chunk)
        outs.append(session.run(None, {name: chunk[torch.arange(BATCH) % real].numpy()})[0][:real])
    return np.concatenate(outs)


def _plot(results: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    labels = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(results)
    for i, (arch, row) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(labels))], [row[k] for k in labels], width, label=arch)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("relative int8 output error (test)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)  # atomic
    return f"plot: {path}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--checkpoint-dir", default=str(here / "out"))
    parser.add_argument("--out", default=None, help="where the plot goes (default: the checkpoint dir)")
    parser.add_argument("--arch", choices=("qlnet", "eq3", "both"), default="both")
    parser.add_argument("--estimator", default="minmax", help="quantize's activation-range estimator")
    parser.add_argument("--val-copies", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = train_digits.load_digits_tensors()
    calibration, labels = compress_digits.calibration_data(data, args.val_copies)
    example = (data["x_train"][:BATCH],)
    x_test, y_test = data["x_test"], data["y_test"].numpy()
    results = {}
    for arch in (("qlnet", "eq3") if args.arch == "both" else (args.arch,)):
        path = Path(args.checkpoint_dir) / f"digits_{arch}.pt"
        if not path.exists():
            raise SystemExit(f"no checkpoint {path}: run `python examples/train_digits.py --out {args.checkpoint_dir}` first")
        model, _ = train_digits.load_checkpoint(path)
        fp32 = qlfx.compile(model, DEFAULT_PIPELINE, example_inputs=example)
        base = fp32.graph_module.eval()
        print(f"\n=== {arch} ({path.name}), estimator {args.estimator} ===")
        print(f"{'column':<24} {'rel. output error':>17} {'test acc':>8} {'compile s':>9}")
        row, bits = {}, 8
        with tempfile.TemporaryDirectory() as tmp:
            fp32_path = Path(tmp) / "fp32.onnx"
            fp32.to_onnx(fp32_path)
            ref = ort_outputs(quantize_digits._session(fp32_path, args.threads), x_test)
            print(f"{'fp32':<24} {0.0:>17.4f} {100 * (ref.argmax(1) == y_test).mean():>8.2f}")

            def report(label, out, seconds):
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                row[label] = err
                print(f"{label:<24} {err:>17.4f} {100 * (out.argmax(1) == y_test).mean():>8.2f} {seconds:>9.1f}")

            for label, pipeline in COLUMNS:
                start = time.perf_counter()
                compiled = qlfx.compile(base, pipeline.format(e=args.estimator), example_inputs=example,
                                        calibration=calibration, labels=labels, verify_inputs=0)
                seconds = time.perf_counter() - start
                onnx_path = Path(tmp) / f"{label.replace(' ', '_').replace(',', '_')}.onnx"
                compiled.to_onnx(onnx_path)
                report(label, ort_outputs(quantize_digits._session(onnx_path, args.threads), x_test), seconds)
                for r in compiled.report.rows:
                    if r.pass_name == "quantize":
                        bits = r.result.stats["weight_bits"]
                    if r.pass_name in ("equalize", "rotate"):
                        print(f"    {r.pass_name}: {'; '.join(r.result.notes)}")
            start = time.perf_counter()
            static = Path(tmp) / "ort_static.onnx"
            quantize_digits.ort_quantize_static(fp32_path, static, calibration, reduce_range=bits == 7)
            report("ORT quantize_static", ort_outputs(quantize_digits._session(static, args.threads), x_test),
                   time.perf_counter() - start)
        ratio = row["int8 equalize,rotate"] / row["int8"]
        print(f"equalize,rotate / plain int8 error: {ratio:.2f} (weights {bits} bits)")
        results[arch] = row
    out_dir = Path(args.out or args.checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(_plot(results, out_dir / "equalize_digits.png"))


if __name__ == "__main__":
    main()
