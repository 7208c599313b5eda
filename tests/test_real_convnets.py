"""Well-known ConvNets written by others' conventions: the default pipeline traces, rewrites and verifies
them on random weights and random BN statistics; ONNX emission matches in onnxruntime."""
import numpy as np
import pytest
import torch

import qlfx
from qlfx import ir
from qlfx.models import randomize_batchnorm
from realnets import REAL_NETS


def _prepare(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(REAL_NETS[name](), seed=5).eval()
    return model, torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name", sorted(REAL_NETS))
def test_default_pipeline_keeps_real_convnets_equivalent(name):
    model, x = _prepare(name)
    compiled = qlfx.compile(model, passes=qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
    out = compiled(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    gm = compiled.graph_module
    # every BatchNorm that sits next to a linear op is gone
    left = [n for n in gm.graph.nodes if ir.is_op(n, ir.BATCH_NORM)]
    fold_row = next(r for r in compiled.report.rows if r.pass_name == "fold-bn")
    skipped = fold_row.result.skipped
    assert len(left) == len(skipped), (left, skipped)
    for bn in left:  # what is left has no linear op of its own on either side
        before = bn.args[0]
        assert not ((ir.ConvCall.of(before) or ir.LinearCall.of(before)) and len(before.users) == 1), bn
        assert not all(ir.ConvCall.of(u) or ir.LinearCall.of(u) for u in bn.users), bn


@pytest.mark.parametrize("name", sorted(REAL_NETS))
def test_real_convnets_emit_onnx_that_matches(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x = _prepare(name)
    compiled = qlfx.compile(model, passes=qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    path = compiled.to_onnx(tmp_path / f"{name}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    ref = compiled(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
