"""Helpers shared by the equalize / rotate tests: a BN-folded capture, a verified pipeline run, and a
minimal int8 simulation (independent of the passes and of the quantize pass)."""
from __future__ import annotations

import torch
import torch.nn as nn

import qlfx
from qlfx import ir
from qlfx.pass_manager import PassContext, PassManager, parse_pipeline
from qlfx.quantization import quantize_weight_per_channel


def folded(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """BN-folded graph (fold-bn is tested on its own; not re-verified here)."""
    return qlfx.compile(model, "fold-bn,constant-fold,dce", example_inputs=(x,), verify=False).graph_module


def run_verified(gm, pipeline: str, x, calibration=()):
    """Run ``pipeline`` through the pass manager, which checks equivalence after every pass."""
    ctx = PassContext(example_inputs=(x,), calibration=list(calibration))
    new, report = PassManager(parse_pipeline(pipeline)).run(gm, ctx)
    rows = {row.pass_name: row for row in report.rows}
    return new, rows


def simulated_int8_error(gm, inputs) -> float:
    """Relative output error of ``gm`` with every conv weight int8 per output channel and every conv
    input uint8 per tensor over its range on ``inputs`` -- a minimal int8 model, independent of the pass."""
    convs = [n for n in gm.graph.nodes if ir.ConvCall.of(n) is not None]
    ranges = {}

    class Observe(torch.fx.Interpreter):
        def run_node(self, n):
            if n in convs:
                xin = self.env[ir.ConvCall.of(n).input]
                lo, hi = ranges.get(n, (0.0, 0.0))
                ranges[n] = (min(lo, float(xin.min())), max(hi, float(xin.max())))
            return super().run_node(n)

    class Int8(torch.fx.Interpreter):
        def run_node(self, n):
            conv = ir.ConvCall.of(n)
            if conv is None:
                return super().run_node(n)
            lo, hi = ranges[n]
            scale = (hi - lo) / 255
            zp = int(round(-lo / scale))
            xq = torch.fake_quantize_per_tensor_affine(self.env[conv.input], scale, zp, 0, 255)
            w = quantize_weight_per_channel(ir.get_tensor(gm, conv.weight))
            b = ir.get_tensor(gm, conv.bias) if conv.bias is not None else None
            return torch.nn.functional.conv2d(xq, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)

    with torch.no_grad():
        ref = Observe(gm).run(inputs)
        out = Int8(gm).run(inputs)
    return float((out - ref).norm() / ref.norm())
