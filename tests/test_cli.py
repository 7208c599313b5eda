"""The ``qlfx`` command end to end: ``qlfx.cli.main([...])`` in process, plus real subprocesses."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlfx
from passtools import ExactButPerturbs  # noqa: F401  (registers test-exact-perturbs)

from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from qlfx import ir
from qlfx.cli import EXIT_INTERNAL, EXIT_NOT_EQUIVALENT, EXIT_OK, EXIT_USAGE, main
from qlfx.pass_manager import Pass, PassResult, register_pass

BLOCKS = str(Path(__file__).with_name("blocks.py"))
MODEL = [f"{BLOCKS}:small_convnet", "--input-shape", "1,3,8,8"]


@register_pass
class NegatesSecondBias(Pass):
    """Deliberately wrong: negates the bias of the second conv that has one (after fold-bn every conv has)."""

    name = "test-cli-negates-second-bias"
    description = "test pass: flips the sign of one conv bias"
    contract = "equivalent"

    def run(self, gm, ctx):
        result = PassResult(False)
        seen = 0
        for n in list(gm.graph.nodes):
            conv = ir.ConvCall.of(n)
            if conv is None or conv.bias is None or not ctx.allow_rewrite():
                continue
            seen += 1
            if seen == 2:
                with gm.graph.inserting_before(n):
                    conv.set_args(bias=ir.constant_node(gm, -ir.get_tensor(gm, conv.bias), f"{n.name}_neg"))
                result.changed = True
            result.rewrites.append(n.name)
        return result


@register_pass
class Crashes(Pass):
    name = "test-cli-crashes"
    description = "test pass: raises"
    contract = "exact"

    def run(self, gm, ctx):
        raise RuntimeError("pass bug")


def _second_biased_conv() -> str:
    import qlfx
    from blocks import small_convnet
    import torch

    gm = qlfx.compile(small_convnet(), "fold-bn", (torch.randn(1, 3, 8, 8),)).graph_module
    return [n.name for n in gm.graph.nodes if ir.ConvCall.of(n) and ir.ConvCall.of(n).bias is not None][1]


def test_passes_and_models(capsys):
    assert main(["passes"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "fold-bn" in out and "equivalent" in out
    assert main(["models"]) == EXIT_OK
    assert "qlnet-tiny" in capsys.readouterr().out


def test_help_documents_exit_codes(capsys):
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for code in ("0  every check held", "1  a pass broke", "2  bad usage", "3  internal error"):
        assert code in out
    assert main(["run", "--help"]) == EXIT_OK
    assert "--bisect" in capsys.readouterr().out


def test_run_ok_with_print_and_dump(tmp_path, capsys):
    dump = tmp_path / "dump"
    rc = main(["run", *MODEL, "--print-after", "fold-bn", "--print-changed", "--dump-dir", str(dump)])
    out = capsys.readouterr().out
    assert rc == EXIT_OK
    assert "# *** IR after fold-bn ***" in out and "# *** fold-bn changed the IR ***" in out
    assert '-    stem_1: "f32[1, 8, 8, 8]" = aten.batch_norm.default(stem_0, ' in out  # the diff removes the stem BN
    names = sorted(p.name for p in dump.iterdir())
    stages = ["input"] + qlfx.DEFAULT_PIPELINE.split(",")
    for stem in (f"{i:03d}_{name}" for i, name in enumerate(stages)):
        assert f"{stem}.py" in names and f"{stem}.dot" in names
    assert (dump / "001_fold-bn.py").read_text().startswith('# after fold-bn (changed)\ndef forward(self, x: "f32[1, 3, 8, 8]"):')
    # diff of two dumped stages
    assert main(["diff", str(dump / "000_input.py"), str(dump / "001_fold-bn.py")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "removed: stem_1," in out and "added: stem_0_weight_bn" in out and "changed: stem_0, stem_2" in out
    assert re.search(r" <$", out, re.M) and " | " in out  # side by side: lines only in A, changed lines
    dce_stem = f"{stages.index('dce'):03d}_dce"
    assert main(["diff", "-u", str(dump / "001_fold-bn.py"), str(dump / f"{dce_stem}.py")]) == EXIT_OK
    assert "@@" in capsys.readouterr().out
    assert main(["diff", str(dump / "001_fold-bn.py"), str(dump / "001_fold-bn.py")]) == EXIT_OK
    assert "same graph" in capsys.readouterr().out
    assert main(["diff", str(dump / "009_nope.py"), str(dump / "001_fold-bn.py")]) == EXIT_USAGE
    assert "Stages in" in capsys.readouterr().err


def test_broken_pass_exits_1_naming_pass_and_node(capsys):
    rc = main(["run", *MODEL, "--passes", "fold-bn,test-cli-negates-second-bias,dce"])
    err = capsys.readouterr().err
    assert rc == EXIT_NOT_EQUIVALENT
    assert "pass 'test-cli-negates-second-bias' broke equivalence" in err
    assert f"first diverging node: %{_second_biased_conv()}" in err


def test_bisect_cli(capsys):
    rc = main(["run", *MODEL, "--passes", "fold-bn,test-cli-negates-second-bias,dce", "--bisect"])
    out = capsys.readouterr().out
    assert rc == EXIT_NOT_EQUIVALENT
    assert "first bad pass: #2 'test-cli-negates-second-bias'" in out
    assert f"first bad rewrite: #2 of" in out and _second_biased_conv() in out
    assert main(["run", *MODEL, "--bisect"]) == EXIT_OK
    assert "no pass broke its contract" in capsys.readouterr().out


def test_bisect_cli_agrees_with_run_on_an_exact_pass_that_moves_outputs_by_1e7(capsys):
    """`run` holds an exact pass to tolerance 0; `--bisect` must judge it the same way, although the
    outputs stay within 1e-4 of the model."""
    passes = ["--passes", "fold-bn,test-exact-perturbs,dce"]
    assert main(["run", *MODEL, *passes]) == EXIT_NOT_EQUIVALENT
    assert "pass 'test-exact-perturbs' broke equivalence" in capsys.readouterr().err
    assert main(["run", *MODEL, *passes, "--bisect"]) == EXIT_NOT_EQUIVALENT
    assert "first bad pass: #2 'test-exact-perturbs' (exact contract)" in capsys.readouterr().out


def test_report_and_svg(tmp_path, capsys):
    rc = main(["run", *MODEL, "--report", str(tmp_path / "r.html"), "--svg-dir", str(tmp_path / "svg")])
    assert rc == EXIT_OK
    html = (tmp_path / "r.html").read_text()
    assert "fold-bn" in html and "MACs" in html
    assert len(list((tmp_path / "svg").iterdir())) == 1 + len(qlfx.DEFAULT_PIPELINE.split(","))
    # also written when a pass fails, marking it
    rc = main(["run", *MODEL, "--passes", "fold-bn,test-cli-negates-second-bias", "--report", str(tmp_path / "bad.md")])
    assert rc == EXIT_NOT_EQUIVALENT
    assert "FAILED" in (tmp_path / "bad.md").read_text()
    assert main(["run", *MODEL, "--report", str(tmp_path / "r.txt")]) == EXIT_USAGE
    assert ".html or .md" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["run", "qlnet-tni"], "Did you mean 'qlnet-tiny'"),
    (["run", *MODEL, "--passes", "fold-bm"], "Did you mean 'fold-bn'"),
    (["run", f"{BLOCKS}:small_convnet"], "--input-shape is required"),
    (["run", f"{BLOCKS}:small_convnet", "--input-shape", "1,4,8,8"], "fails on the example inputs"),
    (["run", f"{BLOCKS}:small_convnet", "--input-shape", "1,-3,8,8"], "bad --input-shape"),
    (["run", *MODEL, "--emit", "onnx"], "--emit onnx needs -o PATH"),
    (["run", *MODEL, "--load", "no/such/passes.py"], "does not exist"),
    (["run", *MODEL, "--leaf", "blocks.0"], "unrecognized arguments: --leaf"),  # torch.export has no leaves
    (["run"], ""),
    (["frobnicate"], ""),
])
def test_usage_errors_exit_2(argv, message, capsys):
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_unwritable_output_leaves_nothing(tmp_path, capsys):
    # a folder that cannot be created (even by root)
    assert main(["run", *MODEL, "--emit", "onnx", "-o", "/proc/qlfx-test/m.onnx"]) == EXIT_USAGE
    assert "cannot create output folder '/proc/qlfx-test'" in capsys.readouterr().err
    (tmp_path / "adir").mkdir()
    assert main(["run", *MODEL, "--emit", "onnx", "-o", str(tmp_path / "adir")]) == EXIT_USAGE
    assert "is a folder" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", *MODEL, "--json", str(blocker / "sub" / "r.json")]) == EXIT_USAGE
    assert "cannot create output folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file"]
    assert list((tmp_path / "adir").iterdir()) == []
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write read-only folders
            rc = main(["run", *MODEL, "--emit", "onnx", "-o", str(locked / "m.onnx")])
            assert rc == EXIT_USAGE and "not writable" in capsys.readouterr().err
            assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_crashing_pass_exits_3_naming_the_pass_without_a_traceback(capsys, tmp_path):
    rc = main(["run", *MODEL, "--passes", "fold-bn,test-cli-crashes", "--report", str(tmp_path / "r.md")])
    captured = capsys.readouterr()
    assert rc == EXIT_INTERNAL
    assert "error: pass 'test-cli-crashes' raised: RuntimeError: pass bug" in captured.err
    assert "(RuntimeError raised at test_cli.py:" in captured.err and "in run)" in captured.err
    assert "Traceback" not in captured.err
    assert "fold-bn" in captured.out  # the report up to the failing pass
    assert "FAILED" in (tmp_path / "r.md").read_text()


def test_untraceable_model_exits_2_saying_where_and_what_to_do(tmp_path, capsys):
    source = tmp_path / "branchy.py"
    source.write_text(
        "import torch\n"
        "class Branchy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return x * 2\n"
        "        return x\n"
        "def model():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), Branchy())\n")
    assert main(["run", f"{source}:model", "--input-shape", "1,3,4,4"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "torch.export could not capture the model" in err and "Traceback" not in err
    assert "module '1' (Branchy), branchy.py:4: `if x.sum() > 0:`" in err
    assert "What to do" in err and "torch.where" in err


def test_dynamic_batch(tmp_path, capsys):
    dump = tmp_path / "dump"
    assert main(["run", *MODEL, "--dynamic-batch", "--passes", "fold-bn,dce", "--dump-dir", str(dump)]) == EXIT_OK
    first = (dump / "000_input.py").read_text().splitlines()[1]
    assert first.startswith('def forward(self, x: "f32[s') and first.endswith(', 3, 8, 8]"):')
    capsys.readouterr()
    assert main(["run", *MODEL, "--dynamic-batch", "--passes", "fold-bn,test-cli-negates-second-bias", "--bisect"]) \
        == EXIT_NOT_EQUIVALENT
    assert "first bad pass: #2 'test-cli-negates-second-bias'" in capsys.readouterr().out


def test_compare_cli(tmp_path, capsys):
    try:
        import qlfx.emit.onnx  # noqa: F401
    except ImportError as err:
        pytest.skip(f"ONNX emitter not available: {err}")
    path = tmp_path / "m.onnx"
    assert main(["run", *MODEL, "--emit", "onnx", "-o", str(path)]) == EXIT_OK
    capsys.readouterr()
    assert main(["compare", *MODEL, str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith(str(path)))
    assert row.split()[1:3] == ["onnxruntime", "0"] and row.endswith("PASS") and "smallest relative tolerance" in out
    assert main(["compare", *MODEL, str(path), "--tolerance", "0"]) in (EXIT_OK, EXIT_NOT_EQUIVALENT)
    assert main(["compare", *MODEL, str(tmp_path / "nope.onnx")]) == EXIT_USAGE


def test_symmetry_cli(capsys):
    try:
        from qlfx.symmetry import analyze, format_report  # noqa: F401
    except ImportError as err:
        pytest.skip(f"qlfx.symmetry has no analyze/format_report: {err}")
    assert main(["symmetry", *MODEL]) == EXIT_OK
    assert capsys.readouterr().out.strip()


def _qlfx(*args, timeout=300):
    exe = Path(sys.executable).with_name("qlfx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qlfx.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # small model: one thread is faster, and fair to a loaded machine
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def test_subprocess_run_qlnet_tiny():
    done = _qlfx("run", "qlnet-tiny")
    assert done.returncode == EXIT_OK, done.stderr
    assert "fold-bn" in done.stdout and "dce" in done.stdout


def test_subprocess_loaded_crashing_pass_exits_3(tmp_path):
    plugin = tmp_path / "my_passes.py"
    plugin.write_text(
        "from qlfx import ir\n"
        "from qlfx.pass_manager import Pass, PassResult, register_pass\n"
        "@register_pass\n"
        "class Crashes(Pass):\n"
        "    name = 'plugin-crashes'\n"
        "    description = 'a bug'\n"
        "    contract = 'equivalent'\n"
        "    def run(self, gm, ctx):\n"
        "        for node in gm.graph.nodes:\n"
        "            if ir.ConvCall.of(node) is not None:\n"
        "                ir.get_tensor(gm, node.args[1]) + 'one'\n"
        "        return PassResult(False)\n")
    done = _qlfx("run", *MODEL, "--load", str(plugin), "--passes", "fold-bn,plugin-crashes")
    assert done.returncode == EXIT_INTERNAL, done.stderr
    assert "pass 'plugin-crashes' raised while working on node stem_0 (conv2d in stem.0): TypeError" in done.stderr
    assert "(TypeError raised at my_passes.py:11 in run)" in done.stderr and "Traceback" not in done.stderr


def test_subprocess_loaded_broken_pass_exits_1(tmp_path):
    plugin = tmp_path / "my_passes.py"
    plugin.write_text(
        "from qlfx import ir\n"
        "from qlfx.pass_manager import Pass, PassResult, register_pass\n"
        "@register_pass\n"
        "class DropsFirstBias(Pass):\n"
        "    name = 'plugin-drops-first-bias'\n"
        "    description = 'wrong on purpose'\n"
        "    contract = 'equivalent'\n"
        "    def run(self, gm, ctx):\n"
        "        for n in gm.graph.nodes:\n"
        "            c = ir.ConvCall.of(n)\n"
        "            if c is not None and c.bias is not None:\n"
        "                c.set_args(bias=None)\n"
        "                return PassResult(True, [n.name])\n"
        "        return PassResult(False)\n")
    done = _qlfx("run", *MODEL, "--load", str(plugin), "--passes", "fold-bn,plugin-drops-first-bias")
    assert done.returncode == EXIT_NOT_EQUIVALENT, done.stderr
    assert "plugin-drops-first-bias" in done.stderr and "first diverging node: %stem_0" in done.stderr


def test_zoo_models_are_seeded_so_run_and_compare_agree(tmp_path, capsys):
    """`qlfx run NAME --emit onnx` then `qlfx compare NAME file.onnx` must compare the same weights."""
    path = tmp_path / "tiny.onnx"
    assert main(["run", "qlnet-tiny", "--emit", "onnx", "-o", str(path)]) == EXIT_OK
    assert main(["compare", "qlnet-tiny", str(path)]) == EXIT_OK
    assert "PASS" in capsys.readouterr().out


def test_run_with_labelled_calibration_and_an_accuracy_budget(tmp_path, capsys):
    import numpy as np

    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(16) % 10)
    np.save(tmp_path / "yf.npy", (np.arange(16) % 10).astype(np.float32))
    passes = ["--passes", "fold-bn,slice<accuracy_drop=100;random_inputs=0>"]
    code = main(["run", *MODEL, *passes, "--calibration", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    # a quarter of the 16 labelled sets is held out (PassContext.holdout_indices): checked on 12, reported on 4
    assert "[slice] checked top-1" in out and "on 12 labelled samples" in out and "held-out" in out
    import json

    row = json.loads((tmp_path / "r.json").read_text())[-1]
    assert row["pass"] == "slice" and row["accuracy"]["samples"] == 12 and row["accuracy"]["allowed_drop"] == 100
    # labels without calibration, float labels, no labels for an accuracy budget: usage errors
    assert main(["run", *MODEL, *passes, "--labels", str(tmp_path / "y.npy")]) == EXIT_USAGE
    assert "--labels has no effect without --calibration" in capsys.readouterr().err
    assert main(["run", *MODEL, *passes, "--calibration", str(tmp_path / "x.npy"),
                 "--labels", str(tmp_path / "yf.npy")]) == EXIT_USAGE
    assert "integer class indices" in capsys.readouterr().err
    assert main(["run", *MODEL, *passes, "--calibration", str(tmp_path / "x.npy")]) == EXIT_USAGE
    assert "no calibration sample is labelled" in capsys.readouterr().err


# Flags that would be silently ignored or would write the wrong thing are refused before any work: each
# case fails in a fraction of the time a capture takes (the model is never loaded).
@pytest.mark.parametrize("extra,message", [
    (["-o", "out/x.txt"], "cannot tell what to write from '.txt'"),
    (["-o", "out/x"], "cannot tell what to write from 'no extension'"),
    (["--emit", "onnx", "-o", "model.txt"], "--emit onnx writes a .onnx file, but -o is 'model.txt'"),
    (["--emit", "tvm", "-o", "m.onnx"], "or use --emit onnx"),
    (["--emit", "onnx", "-o", "m.so"], "or use --emit tvm"),
    (["--tune-trials", "4"], "--tune-trials has no effect without --emit tvm"),
    (["-o", "m.onnx", "--target", "cuda"], "--target has no effect without --emit tvm"),
    (["--tuning-db", "db/"], "--tuning-db has no effect without --emit tvm"),
    (["--labels", "y.npy"], "--labels has no effect without --calibration"),
    (["--no-verify", "--tolerance", "1e-3"], "--tolerance has no effect without the checks"),
    (["--bisect", "-o", "m.onnx"], "--emit has no effect without a normal run"),
    (["--bisect", "--report", "r.html"], "--report has no effect without a normal run"),
    (["--emit", "tvm", "-o", "m.so", "--tune-trials", "-1"], "--tune-trials must be >= 0"),
    (["--emit", "tvm", "-o", "m.txt"], "Name the output *.so"),
    (["--verbose"], "--verbose has no effect without --emit tvm"),
    (["-o", "m.onnx", "--verbose"], "--verbose has no effect without --emit tvm"),
    (["--bisect", "--print-changed"], "--print-changed has no effect without a normal run"),
    (["--bisect", "--time-passes"], "--time-passes has no effect without a normal run"),
    (["--bisect", "--svg-dir", "svg"], "--svg-dir has no effect without a normal run"),
    (["--bisect", "--auto-prereqs"], "--auto-prereqs has no effect without a normal run"),
    (["--passes", "fold-bn", "--print-after", "dce"], "'dce' is not in --passes (fold-bn), so nothing would be printed"),
    (["--print-before", "fold-bm"], "Did you mean 'fold-bn'"),
    (["--report", "r.txt"], "must end in .html or .md"),
    (["-o", "/proc/m.onnx"], "output folder '/proc' is not writable"),
    (["-o", "/proc/qlfx-new/m.onnx"], "cannot create output folder '/proc/qlfx-new'"),
    (["--dump-dir", "/proc/qlfx-dump"], "cannot create output folder '/proc/qlfx-dump'"),
    (["-o", "out/m.onnx", "--json", "/proc/r.json"], "output folder '/proc' is not writable"),  # out/ not made
])
def test_ineffective_or_conflicting_flags_exit_2_before_loading_the_model(extra, message, capsys, monkeypatch,
                                                                          tmp_path):
    import qlfx.loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qlfx.loading, "load_model", lambda spec: pytest.fail("the model was loaded"))
    assert main(["run", *MODEL, *extra]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder made


def test_emit_is_inferred_from_the_output_extension_and_a_new_folder_is_said(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "new" / "sub" / "m.onnx"
    assert main(["run", *MODEL, "--passes", "fold-bn", "-o", str(path)]) == EXIT_OK
    assert f"note: created folder '{path.parent}' for -o" in capsys.readouterr().err
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def test_an_unwritable_output_is_refused_before_torch_is_imported(tmp_path):
    """What the user waits for: a fresh `qlfx run ... -o /proc/m.onnx` fails at once, with torch made
    unimportable to show that the refusal comes before any model, capture or pass code."""
    import time

    script = ("import sys; sys.modules['torch'] = None\n"
              "from qlfx.cli import main\n"
              "sys.exit(main(['run', 'qlnet-tiny', '-o', '/proc/m.onnx']))")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "output folder '/proc' is not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 1.0, f"refusing took {seconds:.2f}s"


def test_fuse_product_alone_says_it_needs_fold_bn_and_auto_prereqs_runs_it(tmp_path, capsys):
    import json

    args = ["run", "qlnet-tiny", "--passes", "fuse-product"]
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "fuse-product needs fold-bn first (4 products are blocked by a BN)" in out
    assert out.count("[needs bn-folded: run fold-bn first]") == 4
    assert main([*args, "--auto-prereqs", "--json", str(tmp_path / "r.json")]) == EXIT_OK
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["pass"] for r in rows] == ["(trace)", "fold-bn", "fuse-product"]
    assert len(rows[-1]["rewrites"]) == 4 and not rows[-1]["skipped"] and not rows[-1]["unmet_requirements"]


def test_passes_lists_what_each_pass_needs(capsys):
    assert main(["passes"]) == EXIT_OK
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("fuse-product "))
    assert "[needs bn-folded (fold-bn), constants-folded (constant-fold), no-dead-code (dce)]" in line


@pytest.mark.parametrize("argv,message", [
    (["--width", "80", "-u"], "--width has no effect without the side-by-side view"),
    (["--width", "80", "--nodes-only"], "--width has no effect without the side-by-side view"),
    (["-u", "--nodes-only"], "--unified has no effect without the code view"),
])
def test_diff_flags_without_effect_exit_2(argv, message, capsys):
    assert main(["diff", "a.py", "b.py", *argv]) == EXIT_USAGE  # refused before the files are read
    assert message in capsys.readouterr().err


def test_tar_output_is_a_tvm_module_that_compare_loads(tmp_path, capsys):
    """-o m.tar picks the TVM emitter (tvm's tarball of objects, linked when loaded); --verbose is accepted
    with it and leaves the logging configuration as it found it."""
    pytest.importorskip("tvm")
    from qlfx.emit import tvm_runtime

    path = tmp_path / "m.tar"
    assert main(["run", *MODEL, "--passes", "fold-bn", "-o", str(path), "--verbose"]) == EXIT_OK
    assert path.is_file() and path.with_suffix(".json").is_file() and not path.with_suffix(".so").exists()
    assert main(["compare", *MODEL, str(path), "--verbose"]) == EXIT_OK
    row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(str(path)))
    assert row.split()[1:3] == ["tvm", "0"] and row.endswith("PASS")
    assert not tvm_runtime.verbose()


def test_compare_verbose_without_a_tvm_artifact_exits_2(capsys):
    assert main(["compare", *MODEL, "m.onnx", "--verbose"]) == EXIT_USAGE
    assert "--verbose has no effect without a TVM ARTIFACT" in capsys.readouterr().err


def test_train_mode_model_gets_a_warning_and_is_switched_to_eval_mode(tmp_path, capsys):
    factory = tmp_path / "trainmode.py"
    factory.write_text(f"import sys; sys.path.insert(0, {str(Path(BLOCKS).parent)!r})\n"
                       "from blocks import small_convnet\n"
                       "def build():\n    return small_convnet().train()\n")
    assert main(["run", f"{factory}:build", "--input-shape", "1,3,8,8", "--passes", "fold-bn"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "is in train mode; qlfx switches it to eval mode" in captured.err
    assert len([l for l in captured.err.splitlines() if "train mode" in l]) == 1  # one line
    assert "fold-bn" in captured.out


def test_a_train_mode_model_object_of_the_user_is_left_in_train_mode(tmp_path, capsys, monkeypatch):
    """MODEL may name a module attribute (pkg.module:model): qlfx compiles an eval copy, the object stays as it was."""
    import importlib

    (tmp_path / "user_models.py").write_text(f"import sys; sys.path.insert(0, {str(Path(BLOCKS).parent)!r})\n"
                                             "from blocks import small_convnet\n"
                                             "model = small_convnet().train()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["run", "user_models:model", "--input-shape", "1,3,8,8", "--passes", "fold-bn"]) == EXIT_OK
    assert "switches it to eval mode" in capsys.readouterr().err
    user = importlib.import_module("user_models").model
    assert user.training and all(m.training for m in user.modules())


def test_diff_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`qlfx diff A B | head -1`: the reader closes the pipe after one line; qlfx stops like a Unix tool."""
    dump = tmp_path / "dump"
    assert main(["run", *MODEL, "--passes", "fold-bn", "--dump-dir", str(dump)]) == EXIT_OK
    command = [sys.executable, "-m", "qlfx.cli", "diff", str(dump / "000_input.py"), str(dump / "001_fold-bn.py"),
               "--width", "20000"]  # wide columns: far more output than a pipe buffer holds
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


# --------------------------------------------------------------------------- compare (files, several) / bench
@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """MODEL's ONNX (default pipeline) and the ONNX of the same layout with other weights."""
    pytest.importorskip("onnxruntime")
    from blocks import ConvNet, randomize, small_convnet

    folder = tmp_path_factory.mktemp("cli_onnx")
    x = torch.randn(1, 3, 8, 8)
    good = qlfx.compile(small_convnet(), qlfx.DEFAULT_PIPELINE, (x,)).to_onnx(folder / "good.onnx")
    spec = [("bottleneck", 8, 1, "relu"), ("repvgg", 8, 2, "relu"), ("dwsep_se", 8, 1, "relu")]
    other = qlfx.compile(randomize(ConvNet(spec, stem=8), seed=12), "fold-bn", (x,)).to_onnx(folder / "other.onnx")
    return good, other


def test_compare_several_artifacts_one_table_exit_1_and_a_verdict(small_onnx, capsys):
    good, other = small_onnx
    code = main(["compare", *MODEL, str(good), str(other), "--passes", "fold-bn,dce", "--random-inputs", "2"])
    captured = capsys.readouterr()
    assert code == EXIT_NOT_EQUIVALENT
    lines = captured.out.splitlines()
    assert "2 input set(s) (seeded random, seed 0)" in lines[0] and lines[1].split()[:2] == ["artifact", "engine"]
    rows = {l.split()[0]: l for l in lines[3:6]}
    assert rows[str(good)].endswith("PASS") and "FAIL: probably a different model" in rows[str(other)]
    assert rows["qlfx"].endswith("PASS")
    assert f"'{other}' is probably a different model" in captured.err and str(good) + "'" not in captured.err


def test_compare_inputs_file_and_old_integer_spelling(small_onnx, tmp_path, capsys):
    import numpy as np

    good, _ = small_onnx
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32))
    assert main(["compare", *MODEL, str(good), "--inputs", str(tmp_path / "x.npy"), "--mark", "all"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"4 input set(s) (from {tmp_path / 'x.npy'})" in out and "per layer:" in out and "values paired" in out
    assert main(["compare", *MODEL, str(good), "--inputs", "2"]) == EXIT_OK  # the old spelling of --random-inputs
    assert "2 input set(s) (seeded random" in capsys.readouterr().out
    # a file model without --input-shape: the file's arrays are the inputs as they are
    assert main(["compare", f"{BLOCKS}:small_convnet", str(good), "--inputs", str(tmp_path / "x.npy")]) \
        == EXIT_USAGE  # batch 4 against an artifact built for batch 1: the pairing check says so
    assert "does not pair with the model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--inputs", "{tmp}/bad.npy"], "must be [K*1, 3, 8, 8]"),
    (["--inputs", "{tmp}/nothere.npz"], "does not exist"),
    (["--inputs", "{tmp}/bad.npy", "--seed", "3"], "--seed has no effect with --inputs"),
    (["--inputs", "2", "--random-inputs", "2"], "give one"),
    (["--random-inputs", "0"], "--random-inputs must be >= 1"),
    (["--passes", "fold-bm"], "fold-bn"),
])
def test_compare_bad_inputs_exit_2(argv, message, small_onnx, tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 9, 8), np.float32))
    good, _ = small_onnx
    assert main(["compare", *MODEL, str(good), *[a.format(tmp=tmp_path) for a in argv]]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_compare_mark_all_with_only_tvm_artifacts_exits_2_before_work(capsys):
    assert main(["compare", *MODEL, "m.so", "--mark", "all"]) == EXIT_USAGE
    assert "--mark all compares per layer for .onnx artifacts" in capsys.readouterr().err


def _bench_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("engine"))
    return [re.split(r"\s{2,}", l.strip()) for l in lines[start + 2:] if l.strip()]


def test_bench_model_and_artifact(small_onnx, capsys):
    good, _ = small_onnx
    assert main(["bench", *MODEL, "--engines", "torch,ort", "--batch", "2,3", "--threads", "1", "--seconds", "0.2",
                 "--blocks", "2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "1 thread(s) per engine" in out and "spinning off" in out
    rows = _bench_rows(out)
    assert [(r[0], r[1]) for r in rows] == [("torch eager", "2"), ("onnxruntime", "2"), ("torch eager", "3"),
                                            ("onnxruntime", "3")]
    for name, batch, median, p90, throughput, runs, _note in rows:
        median, p90, throughput = float(median), float(p90), float(throughput)
        assert 0 < median <= p90 and int(runs) >= 2
        assert throughput == pytest.approx(int(batch) / (median / 1e3), rel=2e-3)  # rounding of the printed median
    assert main(["bench", str(good), "--threads", "1", "--seconds", "0.1", "--blocks", "1"]) == EXIT_OK
    rows = _bench_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0][:2] == ["onnxruntime", "1"] and float(rows[0][2]) > 0


@pytest.mark.parametrize("argv, message", [
    (["{model}", "--engines", "torch,trt"], "unknown engine(s) trt"),
    (["{model}", "--batch", "0"], "positive batch sizes"),
    (["{onnx}", "--engines", "tvm"], "--engines has no effect for an artifact"),
    (["{onnx}", "--batch", "4"], "was built for batch 1"),
    (["missing.onnx"], "does not exist"),
    (["{model}", "--seconds", "0"], "--seconds must be > 0"),
])
def test_bench_bad_usage_exits_2(argv, message, small_onnx, capsys):
    good, _ = small_onnx
    argv = [a.format(model=MODEL[0], onnx=good) for a in argv]
    extra = MODEL[1:] if argv[0] == MODEL[0] else []
    assert main(["bench", *argv, *extra, "--threads", "1", "--seconds", argv.count("--seconds") and "0" or "0.1"]
                ) == EXIT_USAGE
    assert message in capsys.readouterr().err
