"""Compress the trained digits QLNets with qlfx's symmetry passes and compare with plain pruning.

    python examples/train_digits.py                 # writes examples/out/digits_{qlnet,eq3}.pt
    python examples/compress_digits.py [--arch qlnet] [--budgets 0.02,0.05,0.1,0.2]

Pipeline: the lossless prefix (fold-bn, constant-fold, dce, and basis-change / rebalance when those
passes are registered), ``sparsify`` (exact zeros, same function), then per budget
``slice<budget=b>`` (PCA rotation + deletion of low-variance stream directions within a relative
output-error budget on calibration images), ``sparsify`` again on the sliced net, and
``fuse-product`` if registered. The baseline is the same ``slice`` pass with ``method=magnitude``
(no rotation, channels ranked by weight norm): (a) at exactly the channel counts PCA kept ("equal
FLOPs"), (b) with its own greedy search under the same budget.

The table: test accuracy, parameters, nonzeros, MACs (conv/linear, per image, from the graph's shapes),
latency (one batch of 32 images, onnxruntime via ``to_onnx`` and TVM via ``to_tvm``; "n/a: reason" where an emitter
is not ready). A PNG plot of accuracy vs MACs for both methods goes next to the checkpoint.
Data: calibration = the first ``--calibration`` training images; validation = the last
``--validation`` training images (never calibration), each shifted by up to 3 pixels in 3 random copies
(the model fits its unshifted training images perfectly, so they cannot tell budgets apart); test =
the 360 held-out test images. The budget is chosen on validation only -- the largest MACs reduction
whose validation accuracy drop is <= ``--max-val-drop`` -- and its test accuracy is reported once.
"""
from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits  # noqa: E402  (same folder: data split, model config, accuracy)

import qlfx  # noqa: E402
from qlfx import ir  # noqa: E402

# The passes this example needs; imported explicitly so it runs before they are in passes/__init__.py.
SHIFT_DEFAULT = 0
_PASS_MODULES = ("sparsify", "slice", "basis_change", "rebalance", "fuse_product")


def load_passes() -> dict:
    problems = {}
    for module in _PASS_MODULES:
        try:
            importlib.import_module(f"qlfx.passes.{module}")
        except Exception as err:  # a pass still being written must not stop the example
            problems[module] = f"{type(err).__name__}: {err}"
    return problems


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates per image: for every conv, (Cin/groups)*kh*kw per output element; for every
    linear, in_features per output element; the fused branch product counts both of its convs."""
    total = 0
    for node in gm.graph.nodes:
        out = ir.shape(node)
        if node.op != "call_function" or out is None:
            continue
        per_image_out = math.prod(out[1:])
        if node.target is torch.conv2d:
            w = ir.get_tensor(gm, node.args[1]) if node.args[1].op == "get_attr" else None
            wshape = tuple(w.shape) if w is not None else ir.shape(node.args[1])
            total += math.prod(wshape[1:]) * per_image_out
        elif node.target is F.linear:
            wshape = ir.shape(node.args[1]) or tuple(ir.get_tensor(gm, node.args[1]).shape)
            total += wshape[1] * per_image_out
        elif "branch_product" in str(node.target):
            wa = ir.get_tensor(gm, node.args[1])
            wb = ir.get_tensor(gm, node.args[3])
            total += (math.prod(wa.shape[1:]) + math.prod(wb.shape[1:])) * per_image_out
    return int(total)


def evaluate(gm: fx.GraphModule, data) -> float:
    return train_digits.accuracy(gm, data["x_test"], data["y_test"])


def _median_ms(fn, warmup: int = 5, runs: int = 50) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def latency_ort(compiled, x) -> str:
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            compiled.to_onnx(str(path))
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # DESIGN.md §5
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            feed = {name: x.numpy()}
            return f"{_median_ms(lambda: session.run(None, feed)):.3f}"
    except Exception as err:
        return f"n/a ({type(err).__name__}: {str(err).strip().splitlines()[0][:60] if str(err).strip() else ''})"


def latency_tvm(compiled, x) -> str:
    try:
        module = compiled.to_tvm({"kind": "llvm", "num-cores": 2})
        module(x)
        return f"{_median_ms(lambda: module(x)):.3f}"
    except Exception as err:
        return f"n/a ({type(err).__name__}: {str(err).strip().splitlines()[0][:60] if str(err).strip() else ''})"


def validation_set(data, count: int, seed: int = 0, shift: int = 3, copies: int = 3):
    """The last ``count`` training images (kept out of calibration), shifted by up to ``shift`` pixels in
    ``copies`` random copies: training data only, but harder than what the model memorised."""
    x, y = data["x_train"][-count:], data["y_train"][-count:]
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([train_digits._augment(x, generator, shift) for _ in range(copies)]), y.repeat(copies)


def row(label: str, compiled, data, x1, latency: bool, extra: str = "") -> dict:
    gm = compiled.graph_module
    params, nonzero = ir.count_params(gm)
    r = {"label": label, "acc": evaluate(gm, data), "params": params, "nonzero": nonzero, "macs": count_macs(gm),
         "val": train_digits.accuracy(gm, *data["validation"]),
         "ort": latency_ort(compiled, x1) if latency else "-", "tvm": latency_tvm(compiled, x1) if latency else "-",
         "extra": extra}
    return r


def print_table(rows: list[dict], base_macs: int, base_acc: float, base_val: float) -> None:
    head = f"{'variant':<34} {'val drop':>8} {'test acc':>8} {'drop':>6} {'params':>8} {'nonzero':>8} {'MACs':>9} {'x fewer':>7}  {'ORT ms/32':<10} {'TVM ms/32':<10} notes"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['label']:<34} {base_val - r['val']:>8.2f} {r['acc']:>7.2f}% {base_acc - r['acc']:>6.2f} {r['params']:>8,} {r['nonzero']:>8,} "
              f"{r['macs']:>9,} {base_macs / max(r['macs'], 1):>7.2f}  {r['ort']:<10} {r['tvm']:<10} {r['extra']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--checkpoint-dir", default=str(here / "out"))
    parser.add_argument("--arch", choices=("qlnet", "eq3", "both"), default="both")
    parser.add_argument("--budgets", default="0.02,0.05,0.1,0.2,0.3")
    parser.add_argument("--calibration", type=int, default=1024, help="training images used as calibration data")
    parser.add_argument("--calibration-shift", type=int, default=SHIFT_DEFAULT,
                        help="shift half of the calibration images by up to this many pixels (0: none)")
    parser.add_argument("--validation", type=int, default=300,
                        help="last training images held out of calibration to choose the budget on")
    parser.add_argument("--max-val-drop", type=float, default=0.5,
                        help="largest validation accuracy drop (points) a chosen budget may cause")
    parser.add_argument("--no-latency", action="store_true", help="skip the onnxruntime / TVM timings")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    problems = load_passes()
    for module, why in problems.items():
        print(f"note: pass module qlfx.passes.{module} not available: {why}")
    registered = qlfx.list_passes()
    data = train_digits.load_digits_tensors()
    available = len(data["x_train"]) - args.validation
    if available < 1:
        raise SystemExit(f"--validation {args.validation} leaves no training images for calibration")
    calibration = data["x_train"][: min(args.calibration, available)]
    if args.calibration_shift > 0:  # half of it shifted: the function is kept where the data varies, too
        half = len(calibration) // 2
        generator = torch.Generator().manual_seed(7)
        calibration = torch.cat([calibration[:half],
                                 train_digits._augment(calibration[half:], generator, args.calibration_shift)])
    data["validation"] = validation_set(data, args.validation)
    example = (data["x_train"][:32],)  # calibration is split into batches of 32
    x1 = data["x_test"][:32]  # latency at the traced batch size (the emitters build for the example shape)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    archs = ("qlnet", "eq3") if args.arch == "both" else (args.arch,)
    for arch in archs:
        path = Path(args.checkpoint_dir) / f"digits_{arch}.pt"
        if not path.exists():
            raise SystemExit(f"no checkpoint {path}: run `python examples/train_digits.py --out {args.checkpoint_dir}` first")
        model, checkpoint = train_digits.load_checkpoint(path)
        print(f"\n=== {arch}: {path.name}, trained test accuracy {checkpoint['test_accuracy']:.2f}% ===")
        prefix = [p for p in ("fold-bn", "constant-fold", "dce", "basis-change", "rebalance") if p in registered]
        lossless = qlfx.compile(model, ",".join(prefix), example_inputs=example, calibration=calibration)
        base = lossless.graph_module
        rows = [row("float model (" + ",".join(prefix) + ")", lossless, data, x1, not args.no_latency)]
        base_macs, base_acc, base_val = rows[0]["macs"], rows[0]["acc"], rows[0]["val"]
        chosen = None  # (pca row, equal-FLOPs magnitude row, budget)
        sparse = qlfx.compile(base, "sparsify", example_inputs=example, calibration=calibration)
        st = sparse.report.rows[-1].result.stats
        rows.append(row("+ sparsify", sparse, data, x1, False,
                        f"{st['zeros_created']} exact zeros; bytes {st['dense_bytes']:,} -> {st['compressed_bytes']:,}; "
                        f"max rel err {sparse.report.rows[-1].check.needed:.1e}"))
        curves = {"pca": [(base_macs, base_acc)], "magnitude": [(base_macs, base_acc)]}
        for budget in budgets:
            start = time.perf_counter()
            pipeline = f"slice<budget={budget};random_inputs=0>,sparsify" + (",fuse-product" if "fuse-product" in registered else "")
            try:
                pca = qlfx.compile(base, pipeline, example_inputs=example, calibration=calibration, verify_inputs=0)
            except Exception as err:
                print(f"slice at budget {budget} failed: {type(err).__name__}: {err}")
                continue
            stats = next(r.result.stats for r in pca.report.rows if r.pass_name == "slice")
            zeros = next(r.result.stats for r in pca.report.rows if r.pass_name == "sparsify")["zeros_created"]
            rows.append(row(f"slice pca  budget={budget}", pca, data, x1, not args.no_latency,
                            f"err {stats['error']:.3f}; keep {stats['keep']}; +{zeros} zeros; {time.perf_counter() - start:.0f}s"))
            curves["pca"].append((rows[-1]["macs"], rows[-1]["acc"]))
            keep = "/".join(f"{k}:{v}" for k, v in stats["keep"].items())
            # baseline (a): plain pruning at the channel counts PCA kept -> equal FLOPs (no budget check)
            mag = qlfx.compile(base, f"slice<method=magnitude;keep={keep};budget=1e30;random_inputs=0>",
                               example_inputs=example, calibration=calibration, verify_inputs=0)
            mstats = mag.report.rows[-1].result.stats
            rows.append(row("  magnitude, equal FLOPs", mag, data, x1, False, f"err {mstats['error']:.3f}"))
            curves["magnitude"].append((rows[-1]["macs"], rows[-1]["acc"]))
            if base_val - rows[-2]["val"] <= args.max_val_drop and (chosen is None or rows[-2]["macs"] < chosen[0]["macs"]):
                chosen = (rows[-2], rows[-1], budget)
            # baseline (b): plain pruning with its own greedy search under the same budget
            mag_b = qlfx.compile(base, f"slice<method=magnitude;budget={budget};random_inputs=0>",
                                 example_inputs=example, calibration=calibration, verify_inputs=0)
            bstats = mag_b.report.rows[-1].result.stats
            rows.append(row("  magnitude, same budget", mag_b, data, x1, False,
                            f"err {bstats['error']:.3f}; keep {bstats['keep']}"))
        print_table(rows, base_macs, base_acc, base_val)
        if chosen is None:
            print(f"no budget keeps the validation drop <= {args.max_val_drop}")
        else:
            pca_row, mag_row, budget = chosen
            print(f"chosen on validation: budget {budget}: {base_macs / max(pca_row['macs'], 1):.2f}x fewer MACs, "
                  f"test drop {base_acc - pca_row['acc']:.2f} points (plain pruning at equal FLOPs: "
                  f"{base_acc - mag_row['acc']:.2f})")
        _plot(curves, Path(args.checkpoint_dir) / f"compress_digits_{arch}.png", arch)


def _plot(curves: dict, path: Path, arch: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("pca", "o-"), ("magnitude", "s--")):
        pts = sorted(curves[name])
        ax.plot([m / 1e3 for m, _ in pts], [a for _, a in pts], style,
                label="slice (PCA rotation)" if name == "pca" else "plain pruning (weight norm), equal FLOPs")
    ax.set_xlabel("kMACs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits {arch}: accuracy vs compute")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
