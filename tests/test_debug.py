"""qlfx.debug: bisection to the first bad pass and rewrite site, stage diffs, MAC counts, reports,
artifact comparison."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qlfx
from passtools import ExactButPerturbs
from blocks import ConvNet, randomize
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from qlfx import debug, ir
from qlfx.errors import UsageError
from qlfx.instruments import DumpDir, graph_code
from qlfx.ops import branch_product
from qlfx.pass_manager import Pass, PassResult, register_pass

aten = torch.ops.aten


@register_pass
class ScalesNthConv(Pass):
    """A deliberately wrong pass: rewrites every conv (copies its weight), but the ``bad``-th copy
    is scaled by 1.5. Counts its sites with ctx.allow_rewrite() like a real pass."""

    name = "test-debug-scales-nth-conv"
    description = "test pass: scales the n-th conv's weight (a silent-wrong bug)"
    contract = "equivalent"
    option_defaults = {"bad": 3}

    def run(self, gm, ctx):
        result = PassResult(False)
        k = 0
        for n in list(gm.graph.nodes):
            conv = ir.ConvCall.of(n)
            if conv is None or not ctx.allow_rewrite():
                continue
            k += 1
            w = ir.get_tensor(gm, conv.weight)
            with gm.graph.inserting_before(n):
                conv.set_args(weight=ir.constant_node(gm, w * (1.5 if k == self.options["bad"] else 1.0), f"{n.name}_w"))
            result.changed = True
            result.rewrites.append(n.name)
        return result


SMALL_NET = [("bottleneck", 8, 1, "relu"), ("repvgg", 8, 2, "relu"), ("dwsep_se", 8, 1, "relu"),
             ("inverted_residual", 8, 1, "hardswish")]


@pytest.fixture(scope="module")
def tiny():
    """A small ConvNet (16 convs, 8x8 input): bisection runs the graph a dozen times."""
    return randomize(ConvNet(SMALL_NET, stem=8), seed=3), (torch.randn(1, 3, 8, 8),)


def test_bisect_finds_pass_and_rewrite_site(tiny):
    model, x = tiny
    found = debug.bisect(model, "fold-bn,constant-fold,test-debug-scales-nth-conv<bad=5>,dce", x)
    assert found.found
    assert (found.pass_name, found.pass_index) == ("test-debug-scales-nth-conv", 3)
    convs = [n.name for n in qlfx.compile(model, "fold-bn", x).graph_module.graph.nodes if ir.ConvCall.of(n)]
    assert found.rewrite_index == 5 and found.site == convs[4]
    assert found.rewrites_total == len(convs)
    assert found.divergence is not None and found.divergence.node == convs[4]
    # log2 searches, not a linear scan: 3 pass-count probes + ~log2(16)+2 rewrite probes
    assert found.runs <= 12
    text = str(found)
    assert "test-debug-scales-nth-conv" in text and convs[4] in text


def test_bisect_first_site(tiny):
    model, x = tiny
    found = debug.bisect(model, ["test-debug-scales-nth-conv<bad=1>"], x)
    assert (found.pass_index, found.rewrite_index) == (1, 1)


def test_bisect_reports_nothing_when_all_passes_hold(tiny):
    model, x = tiny
    found = debug.bisect(model, qlfx.DEFAULT_PIPELINE, x)
    assert not found.found and found.pass_name is None
    assert "no pass broke its contract" in str(found)


def test_bisect_judges_each_pass_by_its_own_contract_as_run_does(tiny):
    """An exact pass that moves the outputs by 1e-7 after an equivalent one: `run` rejects it (tolerance
    0 for exact), so bisect must name it too, although the graph is within 1e-4 of the model."""
    model, x = tiny
    pipeline = "fold-bn,test-exact-perturbs,dce"
    with pytest.raises(qlfx.EquivalenceError) as info:
        qlfx.compile(model, pipeline, x)
    assert info.value.pass_name == "test-exact-perturbs"
    found = debug.bisect(model, pipeline, x)
    assert (found.pass_name, found.pass_index, found.contract) == ("test-exact-perturbs", 2, "exact")
    assert "allowed 0" in found.error and "exact contract" in str(found)
    # the same pass under an equivalent contract holds, for run and bisect alike
    loose = ExactButPerturbs()
    loose.contract = "equivalent"
    qlfx.compile(model, ["fold-bn", loose, "dce"], x)
    assert not debug.bisect(model, ["fold-bn", loose, "dce"], x).found


def test_bisect_pass_that_raises(tiny):
    @register_pass
    class Raises(Pass):
        name = "test-debug-raises"
        description = "test pass: raises"
        contract = "exact"

        def run(self, gm, ctx):
            raise RuntimeError("boom")

    model, x = tiny
    found = debug.bisect(model, "fold-bn,test-debug-raises,dce", x)
    assert (found.pass_name, found.pass_index) == ("test-debug-raises", 2) and "boom" in found.error


def test_bisect_names_the_node_a_crashing_pass_was_working_on(tiny):
    @register_pass
    class CrashesOnDepthwise(Pass):
        name = "test-debug-crashes-on-depthwise"
        description = "test pass: a TypeError at the first depthwise conv"
        contract = "equivalent"

        def run(self, gm, ctx):
            for node in gm.graph.nodes:
                conv = ir.ConvCall.of(node)
                if conv is not None and conv.groups > 1:
                    conv.groups + "1"  # the bug
            return PassResult(False)

    model, x = tiny
    found = debug.bisect(model, "fold-bn,test-debug-crashes-on-depthwise", x)
    gm = qlfx.compile(model, "fold-bn", x).graph_module
    depthwise = next(n.name for n in gm.graph.nodes if ir.ConvCall.of(n) and ir.ConvCall.of(n).groups > 1)
    assert found.pass_name == "test-debug-crashes-on-depthwise" and "TypeError" in found.error
    assert found.site.startswith(f"{depthwise} (conv2d in ") and f"while working on node {depthwise}" in str(found)


def test_count_macs_from_shapes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 10)).eval()
    expected = 2 * 8 * 25 * 3 * 9 + 2 * 8 * 25 * 2 * 9 + 2 * 10 * 200
    gm = qlfx.trace(model, (torch.randn(2, 3, 5, 5),))
    assert debug.count_macs(gm) == expected
    # a symbolic batch counts as the example's batch
    assert debug.count_macs(qlfx.trace(model, (torch.randn(2, 3, 5, 5),), dynamic_batch=True)) == expected


def test_count_macs_of_matmuls_and_branch_products():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.wa = nn.Parameter(torch.randn(8, 4, 1, 1))
            self.wb = nn.Parameter(torch.randn(8, 1, 3, 3))
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            p = branch_product(x, self.wa, None, self.wb, None, padding_b=1, groups_b=4)  # depthwise b-branch
            v = p.mean((2, 3))
            return torch.addmm(self.fc.bias, v, self.fc.weight.t()) + v @ self.fc.weight.t()

    x = torch.randn(2, 4, 5, 5)
    gm = qlfx.trace(Heads().eval(), (x,))
    assert {aten.addmm.default, torch.ops.qlfx.branch_product.default} <= {n.target for n in gm.graph.nodes}
    assert debug.count_macs(gm) == 2 * 8 * 25 * (4 + 9) + 2 * (2 * 5 * 8)


def test_diff_stages_lists_nodes(tmp_path, tiny):
    model, x = tiny
    qlfx.compile(model, "fold-bn,dce", x, instruments=[DumpDir(tmp_path, pictures=False)])
    d = debug.diff_stages(tmp_path / "000_input.py", tmp_path / "001_fold-bn.py")
    # fold-bn removes the stem's BN, adds folded weights, gives the conv new weights (changed) and
    # rewires the ReLU that read the BN (changed)
    assert "stem_1" in d.removed and "stem_0_weight_bn" in d.added and {"stem_0", "stem_2"} <= set(d.changed)
    assert '-    stem_1: "f32[1, 8, 8, 8]" = aten.batch_norm.default(stem_0, stem_1_weight, ' in d.unified
    assert '+    stem_0_weight_bn: "f32[8, 3, 3, 3]" = self["stem_0_weight_bn"]  # by fold-bn' in d.unified
    assert "|" in d.side_by_side or "<" in d.side_by_side
    same = debug.diff_stages(tmp_path / "001_fold-bn.py", tmp_path / "001_fold-bn.py")
    assert same.identical
    with pytest.raises(UsageError, match="000_input.py"):
        debug.diff_stages(tmp_path / "000_inptu.py", tmp_path / "001_fold-bn.py")


@pytest.mark.parametrize("suffix", [".html", ".md"])
def test_report_has_every_pass(tmp_path, tiny, suffix):
    model, x = tiny
    collector = debug.ReportCollector()
    compiled = qlfx.compile(model, "fold-bn,constant-fold,dce", x, instruments=[collector])
    debug.adopt_report_times(collector, compiled.report)
    path = debug.write_report(tmp_path / f"r{suffix}", collector)
    text = path.read_text()
    for name in ("fold-bn", "constant-fold", "dce", "equivalent", "exact", "MACs", "stem_1"):
        assert name in text
    assert f"{debug.count_macs(compiled.graph_module):,}" in text
    if collector.svg_problem is None:
        assert ("<svg" in text) if suffix == ".html" else (tmp_path / "r_svg" / "001_fold-bn.svg").is_file()
    with pytest.raises(UsageError, match=r"\.html or \.md"):
        debug.write_report(tmp_path / "r.txt", collector)


def test_report_marks_the_failing_pass(tmp_path, tiny):
    model, x = tiny
    collector = debug.ReportCollector(pictures=False)
    with pytest.raises(qlfx.EquivalenceError) as info:
        qlfx.compile(model, "fold-bn,test-debug-scales-nth-conv", x, instruments=[collector])
    path = debug.write_report(tmp_path / "r.md", collector, error=str(info.value))
    text = path.read_text()
    assert "FAILED" in text and "broke equivalence" in text and collector.stages[-1].failed


def test_svg_dir(tmp_path, tiny):
    model, x = tiny
    svg = debug.SvgDir(tmp_path / "pics")
    qlfx.compile(model, "fold-bn,dce", x, instruments=[svg])
    names = sorted(p.name for p in svg.written)
    if svg.problem:
        assert names == ["000_input.dot", "001_fold-bn.dot", "002_dce.dot"] and "graphviz" in svg.problem
    else:
        assert names == ["000_input.svg", "001_fold-bn.svg", "002_dce.svg"]
        assert "#ffb347" in (tmp_path / "pics" / "001_fold-bn.svg").read_text()  # fold-bn's nodes highlighted


def test_listing_reads_like_the_model():
    """The dump of a stage: weights by state-dict path, ATen ops by overload, every value's dtype and
    shape (a symbolic batch under dynamic_batch), and which pass made a node."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), seed=1)
    x = torch.randn(1, 3, 6, 6)
    lines = graph_code(qlfx.trace(model, (x,))).splitlines()
    assert lines[0] == 'def forward(self, input_1: "f32[1, 3, 6, 6]"):'
    assert '    _1_running_var: "f32[4]" = self["1.running_var"]' in lines
    assert '    _0: "f32[1, 4, 6, 6]" = aten.conv2d.default(input_1, _0_weight, _0_bias, [1, 1], [1, 1])' in lines
    assert lines[-2] == '    _2: "f32[1, 4, 6, 6]" = aten.relu.default(_1)' and lines[-1] == "    return _2"
    folded = graph_code(qlfx.compile(model, "fold-bn,dce", (x,)).graph_module).splitlines()
    assert '    _0_weight_bn: "f32[4, 3, 3, 3]" = self["0_weight_bn"]  # by fold-bn' in folded
    assert not any("batch_norm" in line for line in folded)
    dynamic = graph_code(qlfx.trace(model, (x,), dynamic_batch=True)).splitlines()
    batch = dynamic[0].split('"f32[')[1].split(",")[0]
    assert batch.startswith("s") and dynamic[-2] == f'    _2: "f32[{batch}, 4, 6, 6]" = aten.relu.default(_1)'


def test_dump_pictures_highlight_what_the_pass_touched(tmp_path, tiny):
    """fold-bn gives the stem conv new weights without making a new node: the picture of its stage
    still marks the conv (and the rewired ReLU), and nothing the pass left alone."""
    model, x = tiny
    qlfx.compile(model, "fold-bn,dce", x, instruments=[DumpDir(tmp_path)])
    dot = (tmp_path / "001_fold-bn.dot").read_text()
    marked = {line.split('"')[1] for line in dot.splitlines() if "#ffb347" in line}
    assert {"stem_0", "stem_2"} <= marked and "x" not in marked
    assert 'label="stem_0\\nconv2d 3x3\\nf32[1, 8, 8, 8]"' in dot
    assert "#ffb347" not in (tmp_path / "002_dce.dot").read_text()  # dce only drops dead weights and nodes


def _onnx_or_skip():
    try:
        from qlfx.emit.onnx import export_onnx  # noqa: F401
    except ImportError as err:
        pytest.skip(f"ONNX emitter not available: {err}")


def test_compare_onnx_artifact(tmp_path):
    _onnx_or_skip()
    net = randomize(ConvNet([("bottleneck", 8, 2, "relu")], stem=4), seed=2)
    x = torch.randn(1, 3, 12, 12)
    path = qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (x,)).to_onnx(tmp_path / "m.onnx")
    good = debug.compare_artifact(net, path, (x,))
    assert good.passed and good.engine == "onnxruntime" and good.needed < 1e-4
    assert "smallest relative tolerance" in str(good)
    # A different model against the same artifact: fails, and says which tolerance would pass.
    other = randomize(ConvNet([("bottleneck", 8, 2, "relu")], stem=4), seed=3)
    bad = debug.compare_artifact(other, path, (x,))
    assert not bad.passed and bad.needed > 1e-3
    with pytest.raises(UsageError, match="input shape"):
        debug.compare_artifact(net, path, (torch.randn(1, 3, 14, 13),))


def test_compare_errors(tmp_path):
    net = nn.Conv2d(3, 3, 1).eval()
    with pytest.raises(UsageError, match="does not exist"):
        debug.compare_artifact(net, tmp_path / "missing.onnx", (torch.randn(1, 3, 4, 4),))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UsageError, match="cannot load"):
        debug.compare_artifact(net, tmp_path / "junk.onnx", (torch.randn(1, 3, 4, 4),))
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="unknown artifact type"):
        debug.compare_artifact(net, tmp_path / "m.pt", (torch.randn(1, 3, 4, 4),))


def test_compare_tvm_artifact(tmp_path):
    try:
        from qlfx.emit.tvm import build_tvm  # noqa: F401
    except ImportError as err:
        pytest.skip(f"TVM emitter not available: {err}")
    net = randomize(ConvNet([("repvgg", 8, 2, "relu")], stem=4), seed=2)
    x = torch.randn(1, 3, 8, 8)
    path = qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (x,)).to_tvm("llvm", progress=False).export(tmp_path / "m.so")
    result = debug.compare_artifact(net, path, (x,), count=2)
    assert result.engine == "tvm" and result.passed, str(result)


# ------------------------------------------------------------------ compare: inputs, verdicts, per layer
@pytest.fixture(scope="module")
def authors_onnx(tmp_path_factory):
    """A model we did not write (the authors' PDE ResNet, small), random weights and BN statistics, emitted
    with the default pipeline (its products fused into qlfx.BranchProduct nodes)."""
    pytest.importorskip("onnxruntime")
    from authors_resnet import authors_resnet
    from qlfx.models import randomize_batchnorm

    torch.manual_seed(5)
    net = authors_resnet(layers=(1, 1, 1, 1), num_classes=10).eval()
    randomize_batchnorm(net, 3)
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (x,))
    return net, x, compiled, compiled.to_onnx(tmp_path_factory.mktemp("onnx") / "authors.onnx")


def _scaled_conv_copy(path, out, keys, index, factor):
    """A copy of the ONNX model at ``path`` with the weight of its ``index``-th Conv whose output pairs with
    a model value (``keys``: debug.onnx_value_keys) scaled by ``factor``; returns that Conv's output name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.output[0] in keys]
    conv = convs[index]
    weights = {t.name: t for t in model.graph.initializer}
    w = weights[conv.input[1]]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * factor, w.name))
    onnx.save(model, str(out))
    return conv.output[0]


def test_compare_mark_all_names_the_first_diverging_value_of_a_corrupted_onnx(authors_onnx, tmp_path):
    net, x, compiled, path = authors_onnx
    keys = debug.onnx_value_keys(compiled.graph_module, (x,))
    good = debug.compare_artifact(net, path, (x,), mark_all=True, count=1)
    assert good.passed and good.layers.divergence is None
    # most of what ONNX keeps pairs with a model value (BN-folded convs carry the BN's value)
    assert good.layers.paired >= 0.6 * good.layers.kept and good.layers.paired > 20, str(good.layers)
    bad_path = tmp_path / "corrupt.onnx"
    corrupted = _scaled_conv_copy(path, bad_path, keys, 3, 1.5)
    bad = debug.compare_artifact(net, bad_path, (x,), mark_all=True, count=1)
    assert not bad.passed
    div = bad.layers.divergence
    assert div is not None and div.node == corrupted, str(bad)
    traced_node = next(n for n in qlfx.trace(net, (x,)).graph.nodes if n.name == keys[corrupted][0])
    assert div.module == ir.module_path(traced_node) and div.module  # named with its module path
    assert "authors_resnet.py:" in div.created_by                    # and the model's source line


def test_compare_verdict_tells_a_tolerance_question_from_another_model(authors_onnx, tmp_path):
    net, x, compiled, path = authors_onnx
    keys = debug.onnx_value_keys(compiled.graph_module, (x,))
    slightly = tmp_path / "slightly.onnx"
    _scaled_conv_copy(path, slightly, keys, 3, 1.002)
    from authors_resnet import authors_resnet
    from qlfx.models import randomize_batchnorm

    torch.manual_seed(6)
    other = authors_resnet(layers=(1, 1, 1, 1), num_classes=10).eval()
    randomize_batchnorm(other, 4)
    results = debug.compare_artifacts(other, [path], (x,), count=2)
    assert not results[0].passed and results[0].probably_different()
    assert "probably a different model" in debug.format_comparisons(results)
    results = debug.compare_artifacts(net, [path, slightly], (x,), count=2, passes="fold-bn,dce")
    good, slight, graph = results
    assert good.passed and graph.artifact == "qlfx graph" and graph.passed
    assert not slight.passed and not slight.probably_different(), str(slight)
    assert slight.correlations[0] > 0.99
    table = debug.format_comparisons(results)
    assert table.count("\n") >= 5 and str(path) in table and "slightly.onnx" in table and "qlfx graph" in table


def test_compare_inputs_from_npz_npy_and_their_errors(authors_onnx, tmp_path):
    import numpy as np

    from qlfx.inputs import load_input_sets

    net, x, compiled, path = authors_onnx
    data = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "named.npz", x=data)
    np.savez(tmp_path / "ordered.npz", data)
    np.save(tmp_path / "one.npy", data.astype(np.float64))  # a float64 array is cast to the input's float32
    for name in ("named.npz", "ordered.npz", "one.npy"):
        sets = load_input_sets(tmp_path / name, (x,), ["x"])
        assert len(sets) == 3 and sets[1][0].dtype == torch.float32
        assert torch.equal(sets[2][0], torch.from_numpy(data[2:3]))
    result = debug.compare_artifact(net, path, (x,), input_sets=load_input_sets(tmp_path / "named.npz", (x,), ["x"]))
    assert result.passed and result.inputs_checked == 3
    np.save(tmp_path / "wrong_shape.npy", data[:, :, :16])
    np.save(tmp_path / "ints.npy", data.astype(np.int64))
    np.savez(tmp_path / "wrong_names.npz", image=data, extra=data)
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    for name, message in (("wrong_shape.npy", r"shape \[3, 3, 16, 32\].*must be \[K\*1, 3, 32, 32\]"),
                          ("ints.npy", "dtype int64.*float array"),
                          ("wrong_names.npz", r"holds arrays \['extra', 'image'\].*takes 1 input"),
                          ("junk.npz", "cannot read"), ("missing.npy", "does not exist")):
        with pytest.raises(UsageError, match=message):
            load_input_sets(tmp_path / name, (x,), ["x"])


def test_image_folder_preprocessing(tmp_path):
    """RGB, shorter side to max(H,W)*256/224, center crop, /255, ImageNet mean/std: on a two-colour image
    whose left half is red and right half blue, channel order and crop position show."""
    import numpy as np
    from PIL import Image

    from qlfx.inputs import IMAGENET_MEAN, IMAGENET_STD, load_input_sets

    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = (200, 0, 0)
    pixels[:, 30:] = (0, 0, 100)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(np.full((50, 50, 3), 128, np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image: skipped")
    sets = load_input_sets(tmp_path, (torch.zeros(1, 3, 8, 8),), ["x"])
    assert len(sets) == 2 and sets[0][0].shape == (1, 3, 8, 8)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None], torch.tensor(IMAGENET_STD)[:, None]
    a = sets[0][0][0]
    red = (torch.tensor([200, 0, 0]) / 255.0)[:, None]
    blue = (torch.tensor([0, 0, 100]) / 255.0)[:, None]
    assert torch.allclose(a[:, 4, :3], ((red - mean) / std).expand(3, 3), atol=1e-5)
    assert torch.allclose(a[:, 4, -3:], ((blue - mean) / std).expand(3, 3), atol=1e-5)
    assert torch.allclose(sets[1][0][0], ((torch.full((3, 1, 1), 128 / 255.0) - mean[..., None]) / std[..., None])
                          .expand(3, 8, 8), atol=1e-5)
    with pytest.raises(UsageError, match=r"one \[N, 3, H, W\]"):
        load_input_sets(tmp_path, (torch.zeros(1, 8),), ["x"])


def test_compare_pairing_names_both_sides(authors_onnx):
    net, x, compiled, path = authors_onnx
    with pytest.raises(UsageError) as info:
        debug.compare_artifact(net, path, (torch.randn(2, 3, 16, 16),))
    text = str(info.value)
    assert "artifact inputs: x: float32[1, 3, 32, 32]" in text and "model inputs:    x: float32[2, 3, 16, 16]" in text
