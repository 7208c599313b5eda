"""TVM emitter: llvm build + equivalence, fused kernels, tuning database reuse, torch-free export, cuda build."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import qlfx
from qlfx.errors import UnsupportedOpsError
from qlfx.models import qlnet, qlnet_eq3, randomize_batchnorm

tvm = pytest.importorskip("tvm")
from qlfx.emit.tvm import build_tvm  # noqa: E402

RUNTIME_FILE = Path(__file__).resolve().parents[2] / "qlfx" / "emit" / "tvm_runtime.py"
SMALL = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)


def _fuse_pipeline() -> str:
    try:
        import qlfx.passes.fuse_product  # noqa: F401 -- registers the pass if passes/__init__ does not yet
    except ImportError:
        pass
    return "fold-bn,constant-fold,dce,fuse-product" if "fuse-product" in qlfx.list_passes() else qlfx.DEFAULT_PIPELINE


def _small_model(kind: str) -> nn.Module:
    model = qlnet(**SMALL) if kind == "pde" else qlnet_eq3(**SMALL)  # eq3: softball, weight sharing
    randomize_batchnorm(model.eval(), seed=3)
    return model


def _close(actual, expected, rel=2e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err < rel, f"TVM output differs from torch: max rel err {err:.2e}"


@pytest.fixture(scope="module")
def compiled_small():
    """(model, Compiled, input) for the PDEBlock and Eq.(3) twins at 64x64, after fuse-product."""
    out = {}
    pipeline = _fuse_pipeline()
    for kind in ("pde", "eq3"):
        model = _small_model(kind)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        out[kind] = (model, qlfx.compile(model, passes=pipeline, example_inputs=(x,)), x)
    return out


@pytest.mark.parametrize("kind", ["pde", "eq3"])
def test_llvm_build_matches_torch_with_fused_kernels(compiled_small, kind):
    model, compiled, x = compiled_small[kind]
    module = compiled.to_tvm("llvm", progress=False)
    with torch.no_grad():
        expected = model(x)
    _close(module(x), expected)
    # numpy in -> numpy out, and a second input (not the example) also matches
    x2 = torch.randn_like(x)
    with torch.no_grad():
        _close(module(x2.numpy()), model(x2).numpy())
    fused = [n for n in compiled.graph_module.graph.nodes if str(n.target) == "qlfx.branch_product.default"]
    assert len(module.kernels) == len(fused)
    if fused:
        assert all(r.kind == ("pointwise" if kind == "pde" else "depthwise") for r in module.kernels)
        try:
            from qlfx.kernels.branch_product import schedule_branch_product  # noqa: F401
        except ImportError:
            return
        assert all(r.kernel.startswith("branch_product_") for r in module.kernels), module.kernels
        names = {gv.name_hint for gv in module.relax_module.get_global_vars()} if module.relax_module else set()
        assert not names or any(n.startswith("branch_product_") for n in names)


def test_plain_graph_without_kernels_matches_torch():
    """Relax from the plain traced graph (no passes): batch_norm, slices, Hardball as Relax ops."""
    model = _small_model("pde")
    x = torch.randn(1, 3, 64, 64)
    module = build_tvm(qlfx.trace(model, (x,)), (x,), target="llvm", progress=False)
    assert module.kernels == []
    with torch.no_grad():
        _close(module(x), model(x))


class _Unsupported(nn.Module):
    def forward(self, x):
        y = torch.cumsum(x, dim=1)
        return torch.special.erfcx(y) + torch.fft.fft(y).real


def test_unsupported_ops_are_listed_at_once():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(UnsupportedOpsError) as info:
        build_tvm(qlfx.trace(_Unsupported(), (x,)), (x,), progress=False)
    message = str(info.value)
    assert len(info.value.sites) >= 3, message  # cumsum, erfcx, fft (and the getattr of .real)
    for name in ("cumsum", "erfcx", "fft"):
        assert name in message


@pytest.mark.slow
def test_many_block_kinds_match_torch():
    """Every block kind of tests/blocks.py (grouped, dilated, concat, SE, norms, ...) through TVM."""
    from blocks import BLOCK_KINDS, ConvNet, randomize

    acts = ["relu", "relu6", "hardswish", "silu", "gelu", "leaky_relu", "hardtanh"] * 2
    spec = [(k, 8, 2 if i % 5 == 0 else 1, act) for i, (k, act) in enumerate(zip(BLOCK_KINDS, acts))]
    model = randomize(ConvNet(spec, stem=8), 3)
    x = torch.randn(2, 3, 16, 16)
    module = build_tvm(qlfx.trace(model, (x,)), (x,), progress=False)
    with torch.no_grad():
        _close(module(x), model(x))


class _GatedConv(nn.Module):
    """conv1x1 -> split -> product: one pointwise branch product after fuse-product."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 64, 1)

    def forward(self, x):
        z = self.conv(x)
        return z[:, :32] * z[:, 32:]


def test_tuning_database_is_reused(tmp_path):
    pipeline = _fuse_pipeline()
    if "fuse-product" not in pipeline:
        pytest.skip("fuse-product pass not registered")
    pytest.importorskip("qlfx.kernels.tuning")
    x = torch.randn(1, 16, 8, 8)
    model = _GatedConv().eval()
    compiled = qlfx.compile(model, passes=pipeline, example_inputs=(x,))
    first = compiled.to_tvm("llvm", tune_trials=2, tuning_db=tmp_path, progress=False)
    assert [r.trials_run for r in first.kernels] and first.kernels[0].trials_run > 0, first.kernels
    assert (tmp_path / "branch-product" / "database_tuning_record.json").stat().st_size > 0
    second = compiled.to_tvm("llvm", tune_trials=2, tuning_db=tmp_path, progress=False)
    assert [r.trials_run for r in second.kernels] == [0], second.kernels
    assert second.kernels[0].from_database
    with torch.no_grad():
        expected = model(x)
    _close(first(x), expected)
    _close(second(x), expected)


def test_export_loads_and_runs_without_torch(compiled_small, tmp_path):
    model, compiled, x = compiled_small["eq3"]
    module = compiled.to_tvm("llvm", progress=False)
    so = module.export(tmp_path / "model.so")
    meta = json.loads((tmp_path / "model.json").read_text())
    assert so.exists() and meta["inputs"][0]["shape"] == [2, 3, 64, 64] and meta["num_outputs"] == 1
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(x).numpy())
    # What a deployment machine without torch does: import qlfx's loader (qlfx's package import is lazy,
    # and the loader needs tvm + numpy only), with any `import torch` failing.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from qlfx.emit import tvm_runtime as runtime
        model = runtime.load({str(so)!r})
        (y,) = model(np.load({str(tmp_path / 'x.npy')!r}))
        expected = np.load({str(tmp_path / 'expected.npy')!r})
        err = np.abs(y - expected).max() / np.abs(expected).max()
        assert err < 2e-5, err
        assert sys.modules["torch"] is None  # nothing managed to import torch
        assert "qlfx.api" not in sys.modules and "qlfx.ir" not in sys.modules
        print("ok", err)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_cuda_build_contains_fused_kernel(compiled_small, tmp_path):
    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        pytest.skip("this tvm was built without the cuda code generator")
    model, compiled, x = compiled_small["eq3"]
    module = compiled.to_tvm({"kind": "cuda", "arch": "sm_90a"}, progress=False)
    source = module.source()
    assert "__global__" in source
    fused = [n for n in compiled.graph_module.graph.nodes if str(n.target) == "qlfx.branch_product.default"]
    if fused and all(r.kernel.startswith("branch_product_") for r in module.kernels):
        assert any(f"{r.kernel}_kernel" in source for r in module.kernels), module.kernels
    so = module.export(tmp_path / "cuda_model.so")
    assert so.stat().st_size > 0 and json.loads(so.with_suffix(".json").read_text())["device"] == "cuda"
    if not tvm.cuda(0).exist:
        with pytest.raises(RuntimeError, match="no such device"):
            module(x)
