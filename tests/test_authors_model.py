"""The authors' layout written in their style (tests/authors_resnet.py: x.size()[1], computed slice bounds,
x += x0, a numpy-scalar hardball with torch.where, ConvBN wrappers, a timm shell) through every pass and
both emitters, with random weights and random BN statistics; its symmetry matches the zoo's layout."""
import numpy as np
import pytest
import torch

pytest.importorskip("timm")

import qlfx  # noqa: E402
from authors_resnet import SoftBall, authors_resnet  # noqa: E402
from qlfx.models import qlnet, randomize_batchnorm  # noqa: E402
from qlfx.symmetry import analyze  # noqa: E402

LAYERS, WIDTHS = (1, 2, 1, 1), (8, 16, 32, 64)
FOLDED = "fold-bn,constant-fold,dce"
EVERY_EQUIVALENT_PASS = ("fold-bn,merge-parallel,constant-fold,dce,fuse-product,expand-depthwise,"
                         "basis-change,rebalance,sparsify,factor,merge-pointwise,dce")


def _model(act=None, seed=3):
    torch.manual_seed(seed)
    kwargs = {} if act is None else {"act": act}
    return randomize_batchnorm(authors_resnet(LAYERS, 10, WIDTHS, **kwargs), seed=seed).eval()


def _x(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _rel(got, ref) -> float:
    got, ref = np.asarray(got), np.asarray(ref)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("act", [None, SoftBall], ids=["hardball", "softball"])
def test_every_equivalent_pass_keeps_the_authors_model(act):
    model, x = _model(act), _x()
    compiled = qlfx.compile(model, EVERY_EQUIVALENT_PASS, example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
    assert _rel(compiled(x), ref) <= 1e-4
    changed = {r.pass_name for r in compiled.report.rows if r.changed}
    # the passes that have work to do on this layout did it
    assert {"fold-bn", "fuse-product", "expand-depthwise", "basis-change", "rebalance", "sparsify"} <= changed
    products = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.qlfx.branch_product.default]
    assert len(products) == sum(LAYERS)  # one fused product per block, computed slice bounds or not


def test_slice_on_the_authors_model_stays_within_its_budget():
    model, x = _model(), _x()
    calibration = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    compiled = qlfx.compile(model, "fold-bn,constant-fold,dce,slice<budget=0.05>", example_inputs=(x,),
                            calibration=calibration)
    row = next(r for r in compiled.report.rows if r.pass_name == "slice")
    assert row.check.passed and row.check.needed <= 0.05
    assert row.params < compiled.report.rows[0].params  # it deleted something


def test_authors_model_emits_onnx_and_tvm_that_match(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x = _model(), _x()
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    ref = compiled(x).numpy()
    path = compiled.to_onnx(tmp_path / "authors.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _rel(got, ref) <= 1e-4
    pytest.importorskip("tvm")
    module = compiled.to_tvm(target="llvm")
    assert _rel(module(x.numpy()), ref) <= 1e-4


def test_authors_model_with_dynamic_batch_runs_at_any_batch_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(_x(1),), dynamic_batch=True)
    session = ort.InferenceSession(str(compiled.to_onnx(tmp_path / "dyn.onnx")), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 8):
        x = _x(batch, seed=batch)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert _rel(got, ref) <= 1e-4


def test_authors_model_has_the_zoo_layouts_symmetry():
    x = _x()
    authors = qlfx.compile(_model(), FOLDED, example_inputs=(x,)).graph_module
    zoo_model = randomize_batchnorm(qlnet(layers=LAYERS, widths=WIDTHS, num_classes=10), seed=3).eval()
    zoo = qlfx.compile(zoo_model, FOLDED, example_inputs=(x,)).graph_module
    a, z = analyze(authors), analyze(zoo)
    assert a.continuous_dimension == z.continuous_dimension > 0
    assert a.group_counts() == z.group_counts()
