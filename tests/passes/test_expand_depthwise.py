"""expand-depthwise: multiplier-m depthwise conv == repeat_interleave + pure depthwise conv."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import qlfx
from qlfx import ir
from qlfx.models import qlnet, randomize_batchnorm


class DepthwiseMultiplier(nn.Module):
    def __init__(self, channels=6, multiplier=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * multiplier, 3, stride, padding=1, groups=channels)
        self.bn = nn.BatchNorm2d(channels * multiplier)
        self.pure = nn.Conv2d(channels * multiplier, channels * multiplier, 3, padding=1, groups=channels * multiplier)

    def forward(self, x):
        return self.pure(self.bn(self.conv(x)))


@pytest.mark.parametrize("multiplier,stride", [(2, 1), (3, 2)])
def test_expand_depthwise_is_equivalent_and_leaves_pure_depthwise_alone(multiplier, stride):
    model = randomize_batchnorm(DepthwiseMultiplier(6, multiplier, stride), seed=4).eval()
    x = torch.randn(2, 6, 9, 11)
    compiled = qlfx.compile(model, passes="fold-bn,expand-depthwise", example_inputs=(x,))
    row = compiled.report.rows[-1]
    assert row.pass_name == "expand-depthwise" and len(row.result.rewrites) == 1  # `pure` untouched
    gm = compiled.graph_module
    convs = [ir.ConvCall.of(n) for n in gm.graph.nodes if ir.ConvCall.of(n) is not None]
    assert [c.groups for c in convs] == [6 * multiplier, 6 * multiplier]
    (repeat,) = [n for n in gm.graph.nodes if ir.is_op(n, torch.ops.aten.repeat_interleave)]
    assert convs[0].input is repeat and ir.op_args(repeat)["repeats"] == multiplier
    with torch.no_grad():
        ref = model(x)
    assert (compiled(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_the_repeat_must_interleave():
    """Guard for the math: tiling (x, x, x) instead of interleaving (x0, x0, x1, x1, ...) is wrong."""
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        ref = conv(x)
        right = nn.functional.conv2d(torch.repeat_interleave(x, 2, dim=1), conv.weight, conv.bias, padding=1, groups=8)
        wrong = nn.functional.conv2d(x.repeat(1, 2, 1, 1), conv.weight, conv.bias, padding=1, groups=8)
    assert torch.allclose(right, ref, atol=1e-6) and not torch.allclose(wrong, ref, atol=1e-2)


def test_default_pipeline_expands_pdeblock_depthwise_and_onnx_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = randomize_batchnorm(qlnet(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10), seed=7).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(model, example_inputs=(x,))
    rewrites = next(r for r in compiled.report.rows if r.pass_name == "expand-depthwise").result.rewrites
    assert len(rewrites) == 4  # the W -> 2W depthwise conv of every block
    sess = ort.InferenceSession(str(compiled.to_onnx(tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
