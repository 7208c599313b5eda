"""ONNX emitter: torch.onnx export of the re-exported graph, onnx.checker (full shape inference),
onnxruntime == torch graph, qlfx's ops as model-local functions, all unsupported ops listed at once."""
from __future__ import annotations

import inspect
import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qlfx
from qlfx.emit.onnx import QLFX_DOMAIN, OnnxCheckError, export_onnx, to_onnx_model
from qlfx.errors import UnsupportedOpsError, UsageError
from qlfx.models import Hardball, Softball, create_model, qlnet, qlnet_eq3, randomize_batchnorm
from qlfx.verify import Tolerance, compare_tensor, run_outputs

from blocks import BLOCK_KINDS, ConvNet, randomize

TINY = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)
DYNAMIC_BATCHES = (1, 3, 8)


def run_onnx(path_or_model, inputs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]


def assert_onnx_matches(gm, inputs, path, tol=Tolerance(), batches=None):
    """Export, full-check, run in onnxruntime on fresh random inputs (of each batch size in ``batches``,
    default the example's), compare with the torch graph."""
    export_onnx(gm, inputs, path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    gen = torch.Generator().manual_seed(11)
    for batch in batches or (None, None):
        fresh = tuple(torch.randn((batch or t.shape[0],) + tuple(t.shape[1:]), generator=gen, dtype=t.dtype)
                      for t in inputs)
        want = run_outputs(gm, fresh)
        got = run_onnx(path, fresh)
        assert len(got) == len(want)
        for i, (w, g) in enumerate(zip(want, got)):
            check = compare_tensor(w, g, tol, i)
            assert check.passed, check
    return model


def functions_of(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(f.domain, f.name) for f in model.functions}


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def line_of(obj, text: str) -> str:
    """'test_onnx.py:<n>' of the line of ``obj``'s source that contains ``text`` (where the op is written)."""
    lines, first = inspect.getsourcelines(obj)
    return f"{os.path.basename(__file__)}:{first + next(i for i, s in enumerate(lines) if text in s)}"


# ----------------------------------------------------------------------------------- the zoo
ZOO_CASES = {
    "qlnet-tiny": (lambda: create_model("qlnet-tiny"), {"BranchProduct", "Hardball"}),
    "qlnet-eq3-tiny": (lambda: create_model("qlnet-eq3-tiny"), {"BranchProductRepeat", "Softball"}),
    "eq3-hardball": (lambda: qlnet_eq3(**TINY, activation="hardball"), {"BranchProductRepeat", "Hardball"}),
    "eq3-hardtanh": (lambda: qlnet_eq3(**TINY, activation="hardtanh"), {"BranchProductRepeat"}),
    "eq3-relu": (lambda: qlnet_eq3(**TINY, activation="relu_all"), {"BranchProductRepeat"}),
    "eq3-nows-x6": (lambda: qlnet_eq3(**TINY, weight_sharing=False, expansion=6), {"BranchProductRepeat", "Softball"}),
    "qlnet-2121": (lambda: qlnet(layers=(2, 1, 2, 1), widths=(8, 16, 32, 64), num_classes=10),
                   {"BranchProduct", "Hardball"}),
}


@pytest.mark.parametrize("case", list(ZOO_CASES))
def test_zoo_tiny_after_pipeline(case, tmp_path):
    build, functions = ZOO_CASES[case]
    model = randomize_batchnorm(build(), seed=3).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,), verify=False)  # passes: tested elsewhere
    onnx_model = assert_onnx_matches(compiled.graph_module, (x,), tmp_path / "m.onnx")
    assert functions_of(onnx_model) == {(QLFX_DOMAIN, f) for f in functions}
    blocks = sum(model.layers_config)
    # Eq.(3)'s depthwise b branch has a channel multiplier: emitted as BranchProductRepeat
    types = Counter(op_types(onnx_model))
    assert types["BranchProduct"] + types["BranchProductRepeat"] == blocks
    assert {o.domain: o.version for o in onnx_model.opset_import} == {"": 18, QLFX_DOMAIN: 1}
    # The same model, straight from the eager module, also matches (emitter vs. the user's model).
    got = run_onnx(tmp_path / "m.onnx", (x,))[0]
    with torch.no_grad():
        assert compare_tensor(model(x), got, Tolerance()).passed


def test_qlfx_functions_hold_standard_ops_and_stay_called(tmp_path):
    """The qlfx nodes survive torch.onnx (not inlined) and their functions are the documented math."""
    model = randomize_batchnorm(qlnet_eq3(**TINY, activation="hardball"), seed=1).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,), verify=False).graph_module
    onnx_model = to_onnx_model(gm, (x,))
    bodies = {f.name: [n.op_type for n in f.node] for f in onnx_model.functions}
    assert bodies["BranchProductRepeat"] == ["Conv", "Gather", "Conv", "Mul"]
    assert {"ReduceSumSquare", "Sqrt", "Max", "Div", "Mul"} <= set(bodies["Hardball"])
    for f in onnx_model.functions:
        assert f.domain == QLFX_DOMAIN and {(o.domain, o.version) for o in f.opset_import} == {("", 18)}
    qlfx_nodes = [n for n in onnx_model.graph.node if n.domain == QLFX_DOMAIN]
    assert Counter(n.op_type for n in qlfx_nodes) == {"BranchProductRepeat": 4, "Hardball": 4}
    assert "Gather" not in op_types(onnx_model)  # the repeat lives inside the function only


@pytest.mark.parametrize("name", ["qlnet-tiny", "qlnet-eq3-tiny"])
def test_dynamic_batch_runs_at_any_batch_size(name, tmp_path):
    model = randomize_batchnorm(create_model(name), seed=5).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,), dynamic_batch=True)
    onnx_model = assert_onnx_matches(compiled.graph_module, (x,), tmp_path / "dyn.onnx", batches=DYNAMIC_BATCHES)
    for value in list(onnx_model.graph.input) + list(onnx_model.graph.output):
        batch = value.type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.HasField("dim_value"), value
    assert any(f.name.startswith("BranchProduct") for f in onnx_model.functions)
    for batch in DYNAMIC_BATCHES:  # the user's model too, not only the graph
        xb = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert compare_tensor(model(xb), run_onnx(onnx_model, (xb,))[0], Tolerance()).passed


def test_compiled_to_onnx_and_untransformed_graph(tmp_path):
    """Compiled.to_onnx, and a graph with batchnorm and unfused products (no passes)."""
    model = randomize_batchnorm(create_model("qlnet-eq3-tiny"), seed=4).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = qlfx.compile(model, "", example_inputs=(x,))
    path = compiled.to_onnx(tmp_path / "raw.onnx")
    assert path == tmp_path / "raw.onnx"
    onnx_model = assert_onnx_matches(compiled.graph_module, (x,), tmp_path / "raw.onnx")
    # torch.onnx's optimizer folds BN into the convs by itself; the products stay plain Conv * Conv
    assert Counter(op_types(onnx_model))["Mul"] >= 4
    assert {f.name for f in onnx_model.functions} == {"Softball"}


@pytest.mark.slow  # 30-60 s each on 2 busy cores
@pytest.mark.parametrize("name", ["qlnet50", "qlnet-eq3"])
def test_full_size_zoo_through_onnxruntime(name, tmp_path):
    model = randomize_batchnorm(create_model(name), seed=2).eval()
    x = torch.randn(1, 3, 224, 224)
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,), verify=False)
    path = export_onnx(compiled.graph_module, (x,), tmp_path / f"{name}.onnx")
    with torch.no_grad():
        want = model(x)
    got = run_onnx(path, (x,))[0]
    check = compare_tensor(want, got, Tolerance())
    assert check.passed, check
    types = Counter(op_types(onnx.load(str(path), load_external_data=False)))
    assert types["BranchProduct"] + types["BranchProductRepeat"] == 16


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_block_zoo(kind, tmp_path):
    """Conv variants (grouped, dilated, strided), SE, norms, concat, pools from tests/blocks.py."""
    model = randomize(ConvNet([(kind, 8, 1, "relu"), (kind, 12, 2, "gelu")]), seed=1)
    x = torch.randn(2, 3, 16, 16)
    gm = qlfx.trace(model, (x,))  # BN unfolded: BatchNormalization too
    assert_onnx_matches(gm, (x,), tmp_path / "b.onnx")


TIMM_MODELS = ["mobilenetv3_small_050", "regnety_002", "ghostnet_050"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_after_default_pipeline(name, tmp_path):
    """Real ConvNets (SE, hardswish, grouped convs, ghost modules) at 64x64, random weights and BN."""
    timm = pytest.importorskip("timm")
    model = randomize_batchnorm(timm.create_model(name, pretrained=False).eval(), seed=0)
    x = torch.randn(1, 3, 64, 64)
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    assert_onnx_matches(compiled.graph_module, (x,), tmp_path / "t.onnx")
    with torch.no_grad():
        assert compare_tensor(model(x), run_onnx(tmp_path / "t.onnx", (x,))[0], Tolerance()).passed


# ------------------------------------------------------------------------------ op coverage
class ManyOps(nn.Module):
    """A wide mix of ops (convs with every padding form, norms, activations, pools, resizes, slicing,
    reshapes, reductions, qlfx's radial ops), with two inputs and a tuple output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_same = nn.Parameter(torch.randn(6, 4, 4, 4, generator=g) * 0.2)   # even kernel: asymmetric 'same'
        self.w_dil = nn.Parameter(torch.randn(6, 2, 3, 3, generator=g) * 0.2)    # groups 2, dilation 2
        self.b_dil = nn.Parameter(torch.randn(6, generator=g))
        self.bn = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(3, 6)
        self.ln_w = nn.Parameter(torch.randn(8, generator=g))
        self.ln_b = nn.Parameter(torch.randn(8, generator=g))
        self.lin = nn.Linear(8, 5)
        self.hardball = Hardball()            # radius sqrt(C)
        self.softball = Softball(radius=1.5)

    def forward(self, x, y):
        a = F.conv2d(x, self.w_same, None, 1, "same")                                    # 8x8
        b_valid = F.conv2d(x, self.w_dil, self.b_dil, (1, 1), "valid", (2, 2), 2)         # 4x4
        b = F.conv2d(x, self.w_dil, self.b_dil, 2, 2, 2, 2)                               # 4x4
        b = b + F.interpolate(b_valid, size=(6, 6), mode="nearest")[:, :, 1:5, 1:5]       # ratio 4/6
        a = self.bn(a) + F.interpolate(b, scale_factor=2, mode="nearest")
        acts = [F.relu(a), F.hardtanh(a, -0.5, 0.7), F.relu6(a * 4), torch.sigmoid(a), F.hardsigmoid(a),
                F.hardswish(a), F.silu(a), F.gelu(a), F.gelu(a, approximate="tanh"), torch.tanh(a),
                F.leaky_relu(a, 0.2), a.sigmoid(), a.relu(), torch.clamp(a, -0.3, 0.4), a.abs()]
        s = acts[0]
        for t in acts[1:]:
            s = s + t
        s = self.gn(s) + torch.add(s, y, alpha=2.0) - torch.mul(s, 0.5) / (2.0 + s.abs())
        s = 1.0 - s + 3 * s - s / 4
        m = F.max_pool2d(s, 3, 2, 1)                                                       # 8 -> 4
        p = F.avg_pool2d(s, 3, 2, 1, count_include_pad=False) + F.avg_pool2d(s, 2) + m
        p = p + F.max_pool2d(s, 3, 2, 0, ceil_mode=True)                                   # 8 -> 4 (ceil)
        q = F.adaptive_avg_pool2d(s, (2, 2)) + F.adaptive_avg_pool2d(s, 1)
        up = F.interpolate(p, scale_factor=2, mode="nearest")                              # 4 -> 8
        cat = torch.cat([up, s, s[:, 1:3], s[..., ::2, :].reshape(2, 3, 8, 8),
                         s[:, :, :, ::2].flatten(2).view(2, 3, 8, 8)], dim=1)              # 20 channels
        row = cat[:, :, 1:-1, 2]                                                           # int index drops a dim
        lead = cat[0]                                                                      # batch index
        unsq = cat[:, None, 0]
        mean = cat.mean((2, 3), keepdim=True) + torch.mean(cat, dim=1, keepdim=True)
        ln = F.layer_norm(cat, (8,), self.ln_w, self.ln_b) + F.layer_norm(cat, (8, 8))
        lin = self.lin(ln)                                                                 # 4-D linear
        flat = torch.flatten(F.adaptive_avg_pool2d(cat, 1), 1)
        head = F.linear(flat[:, :8], self.lin.weight, self.lin.bias)                       # 2-D linear
        rad = self.hardball(cat * 3) + self.softball(cat)
        return (lin.mean(-1, keepdim=True) + mean + rad, q, row, lead.sum(0), unsq.transpose(1, 2), head, y)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_many_ops(tmp_path):
    model = ManyOps().eval()
    randomize_batchnorm(model, seed=1)
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    gm = qlfx.trace(model, (x, y))
    with torch.no_grad():
        for want, got in zip(model(x, y), gm(x, y)):
            assert torch.equal(want, got)
    onnx_model = assert_onnx_matches(gm, (x, y), tmp_path / "ops.onnx")
    ops = set(op_types(onnx_model))
    for expected in ("Conv", "MaxPool", "AveragePool", "Resize", "Slice", "Concat",
                     "LayerNormalization", "MatMul", "Gemm", "Transpose", "Hardball", "Softball"):
        assert expected in ops, expected
    assert functions_of(onnx_model) == {(QLFX_DOMAIN, "Hardball"), (QLFX_DOMAIN, "Softball")}
    radii = sorted(onnx.helper.get_attribute_value(a) for n in onnx_model.graph.node if n.domain == QLFX_DOMAIN
                   for a in n.attribute)
    assert radii == pytest.approx([1.5, 20 ** 0.5])  # Softball's own, Hardball's sqrt(C) with C = 20
    assert [i.name for i in onnx_model.graph.input] == ["x", "y"]
    assert [o.name for o in onnx_model.graph.output] == [f"output_{i}" for i in range(7)]


class HandBranchProducts(nn.Module):
    """qlfx::branch_product written by hand: no biases on a (the function gets zeros), depthwise b with
    a channel multiplier, stride 2; and a pointwise one without any bias."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.wa = nn.Parameter(torch.randn(8, 4, 1, 1, generator=g))
        self.wb = nn.Parameter(torch.randn(8, 1, 3, 3, generator=g))
        self.bb = nn.Parameter(torch.randn(8, generator=g))
        self.wp = nn.Parameter(torch.randn(8, 4, 1, 1, generator=g))

    def forward(self, x):
        dw = torch.ops.qlfx.branch_product(x, self.wa, None, self.wb, self.bb, [2, 2], [1, 1], [1, 1], 4)
        pw = torch.ops.qlfx.branch_product(x, self.wa, None, self.wp, None, [2, 2], [0, 0], [1, 1], 1)
        return dw + pw


def test_branch_product_without_bias(tmp_path):
    x = torch.randn(1, 4, 9, 9)
    gm = qlfx.trace(HandBranchProducts().eval(), (x,))
    onnx_model = assert_onnx_matches(gm, (x,), tmp_path / "bp.onnx")
    # multiplier 2 over 4 channels: b reads the channel-repeated input through a groups-8 conv
    calls = {n.op_type: n for n in onnx_model.graph.node if n.domain == QLFX_DOMAIN}
    assert set(calls) == {"BranchProduct", "BranchProductRepeat"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in calls["BranchProductRepeat"].attribute}
    assert attrs == {"strides": [2, 2], "pads_b": [1, 1, 1, 1], "dilations_b": [1, 1], "group_b": 8}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in calls["BranchProduct"].attribute}
    assert attrs == {"strides": [2, 2], "pads_b": [0, 0, 0, 0], "dilations_b": [1, 1], "group_b": 1}
    assert len(calls["BranchProductRepeat"].input) == 6 and len(calls["BranchProduct"].input) == 5
    bodies = {f.name: [n.op_type for n in f.node] for f in onnx_model.functions}
    assert bodies == {"BranchProduct": ["Conv", "Conv", "Mul"], "BranchProductRepeat": ["Conv", "Gather", "Conv", "Mul"]}


def test_hardball_radius_attribute(tmp_path):
    """radius = module.radius when set, sqrt(C) otherwise, both outside and inside the ball."""

    class Radial(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Hardball(radius=2.0), Hardball()

        def forward(self, x):
            return self.a(x), self.b(x * 0.1), self.b(x * 10)

    x = torch.randn(1, 9, 4, 4)
    gm = qlfx.trace(Radial(), (x,))
    onnx_model = assert_onnx_matches(gm, (x,), tmp_path / "r.onnx")
    radii = sorted(onnx.helper.get_attribute_value(n.attribute[0]) for n in onnx_model.graph.node
                   if n.op_type == "Hardball")
    assert radii == pytest.approx([2.0, 3.0, 3.0])


# ------------------------------------------------------------------------------------ errors
class RunningMax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, dim=1).values


class Unsupported(nn.Module):
    """Three ops torch.onnx has no translation for (kthvalue, cummax, and digamma, which decomposes to a
    prim it has none for either), around supported ones."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.running = RunningMax()

    def forward(self, x):
        k = torch.kthvalue(x, 2, dim=1, keepdim=True).values
        c = self.running(self.conv(x))
        return c + k + torch.digamma(x.abs() + 1) + F.elu(x)


def test_unsupported_ops_all_reported_nothing_written(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    gm = qlfx.trace(Unsupported(), (x,))
    path = tmp_path / "bad.onnx"
    with pytest.raises(UnsupportedOpsError) as info:
        export_onnx(gm, (x,), path)
    sites = info.value.sites
    assert len(sites) == 3, sites
    assert [s.split(" ")[0] for s in sites] == ["kthvalue", "running_cummax", "digamma"]
    assert "in running" in sites[1]  # the module path
    assert f"at {line_of(Unsupported.forward, 'kthvalue')}:" in sites[0]
    assert f"at {line_of(RunningMax.forward, 'cummax')}:" in sites[1]
    assert f"at {line_of(Unsupported.forward, 'digamma')}:" in sites[2]
    assert "aten.kthvalue.default" in sites[0] and "aten.cummax.default" in sites[1]
    assert "prims.digamma.default (what aten.digamma.default decomposes to)" in sites[2]
    assert "3 unsupported op(s)" in str(info.value)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_unwritable_path_is_a_usage_error(tmp_path):
    model = randomize_batchnorm(create_model("qlnet-tiny"), seed=0).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.compile(model, "fold-bn", example_inputs=(x,)).graph_module
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="a_file"):
        export_onnx(gm, (x,), blocker / "sub" / "m.onnx")
    with pytest.raises(UsageError, match="folder"):
        export_onnx(gm, (x,), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_checker_failure_leaves_no_file(tmp_path, monkeypatch):
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.trace(randomize_batchnorm(create_model("qlnet-tiny")).eval(), (x,))

    def reject(model, full_check=False):
        raise onnx.checker.ValidationError("rejected for the test")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(OnnxCheckError, match="rejected for the test"):
        export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
    # check=False skips the checker.
    assert export_onnx(gm, (x,), tmp_path / "m.onnx", check=False).exists()


def test_bad_arguments():
    with pytest.raises(UsageError, match="GraphModule"):
        to_onnx_model(nn.ReLU(), (torch.randn(1),))
    gm = qlfx.trace(nn.ReLU(), (torch.randn(1, 2),))
    with pytest.raises(UsageError, match="opset"):
        to_onnx_model(gm, (torch.randn(1, 2),), opset=13)
