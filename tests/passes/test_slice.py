"""slice: PCA rotation + deletion of stream directions within a relative output-error budget."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qlfx
import qlfx.passes.slice  # noqa: F401  (registers the pass before passes/__init__ lists it)
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from qlfx import ir
from qlfx.debug import count_macs
from qlfx.errors import UsageError
from qlfx.models import Hardball, Softball, create_model, randomize_batchnorm
from qlfx.pass_manager import PassContext, PassManager
from qlfx.symmetry import analyze
from qlfx.symmetry.slicing import Runner, channel_moments

aten = torch.ops.aten


class CorrelatedStream(nn.Module):
    """x (4 ch) -> 1x1 conv to a 16-channel stream -> hardball -> 1x1 conv to 5 outputs.

    The stream's weight is rank 3 plus a little noise and every channel has about the same norm: the
    stream lives in a 3-dimensional subspace that no single channel aligns with. Rotating to the
    principal axes makes 13 directions nearly empty; deleting channels as they are cannot."""

    def __init__(self, radius=None, act=Hardball):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(4, 16, 1)
        self.act = act(radius)
        self.conv_out = nn.Conv2d(16, 5, 1)
        with torch.no_grad():
            low_rank = torch.randn(16, 3, generator=gen) @ torch.randn(3, 4, generator=gen)
            low_rank += 0.01 * torch.randn(16, 4, generator=gen)
            self.conv_in.weight.copy_(low_rank[:, :, None, None])
            self.conv_in.bias.zero_()
            self.conv_out.weight.copy_(torch.randn(5, 16, 1, 1, generator=gen) * 0.3)

    def forward(self, x):
        return self.conv_out(self.act(self.conv_in(x)))


def _calibration(shape=(64, 4, 6, 6), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _slice(model, options: str, calibration, example_batch=8, **kw):
    example = (calibration[:example_batch],)
    c = qlfx.compile(model, f"slice<{options}>", example_inputs=example, calibration=calibration, **kw)
    return c, next(r for r in c.report.rows if r.pass_name == "slice")


def _run(gm, x, batch):
    """gm on x in chunks of ``batch`` samples (a captured graph specialises its example's batch size); a
    shorter tail is taken from the last full chunk, x[-batch:]."""
    with torch.no_grad():
        whole = len(x) // batch * batch
        out = [gm(chunk) for chunk in x[:whole].split(batch)]
        if whole < len(x):
            out.append(gm(x[-batch:])[whole - len(x):])
        return torch.cat(out)


def _error(ref_model, gm, x) -> float:
    with torch.no_grad():
        ref, new = ref_model(x), gm(x)
    return float((new - ref).abs().max() / ref.abs().max())


def test_pca_beats_magnitude_pruning_on_correlated_channels():
    model = CorrelatedStream(radius=3.0).eval()
    cal = _calibration()
    pca, pca_row = _slice(model, "budget=0.01;random_inputs=0", cal, verify_inputs=0)
    mag, mag_row = _slice(model, "budget=0.01;method=magnitude;random_inputs=0", cal, verify_inputs=0)
    (sid,) = pca_row.result.stats["keep"]
    assert pca_row.result.stats["keep"][sid] <= 4  # the rank-3 stream keeps ~3 directions
    assert mag_row.result.stats["keep"][sid] >= 12  # every single channel matters
    assert pca_row.result.stats["macs_after"] < mag_row.result.stats["macs_after"]
    # at equal channel count, the rotation loses far less
    k = pca_row.result.stats["keep"][sid]
    mag_eq, _ = _slice(model, f"budget=1e30;method=magnitude;keep={sid}:{k};random_inputs=0", cal, verify_inputs=0)
    held_out = _calibration(seed=9)
    assert _error(model, pca.graph_module, held_out) < 0.1 * _error(model, mag_eq.graph_module, held_out)
    assert count_macs(mag_eq.graph_module) == count_macs(pca.graph_module)


def test_slice_respects_budget_and_shrinks_channels_on_zoo_model():
    model = randomize_batchnorm(create_model("qlnet-tiny"), seed=5).eval()
    cal = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    budget = 0.05
    folded = qlfx.compile(model, "fold-bn,dce", example_inputs=(cal[:8],)).graph_module.eval()
    c, row = _slice(folded, f"budget={budget};granularity=0.25", cal)  # default: also 2 random inputs, as verified
    stats = row.result.stats
    assert stats["error"] <= budget
    assert row.check.passed and row.check.needed <= budget  # the manager's own check on calibration + random
    shrunk = [sid for sid, k in stats["keep"].items() if k < stats["spaces"][sid]["size"]]
    assert shrunk, stats["keep"]
    assert stats["macs_after"] < stats["macs_before"]
    assert count_macs(c.graph_module) == stats["macs_after"]
    # the stream convs really lost channels
    widths = {n.name: ir.shape(n)[1] for n in c.graph_module.graph.nodes if ir.shape(n) and len(ir.shape(n)) == 4}
    assert any(widths[name] < 64 for name in widths if "layer4_0_conv3" in name or "layer4_0_skip" in name) or \
        any(stats["keep"][sid] < stats["spaces"][sid]["size"] for sid in shrunk)
    # the error the pass reports is the error on the calibration it searched on (the first batch); the
    # second batch is held out (PassContext.holdout_indices) and its error is reported beside it
    assert _error(folded, c.graph_module, cal[:8]) <= budget
    assert row.check.holdout is not None and row.check.holdout.inputs_checked == 1
    assert row.check.holdout.needed == pytest.approx(_error(folded, c.graph_module, cal[8:]), rel=1e-3)
    assert "held-out: err/max|ref|" in str(c.report)


def test_radius_is_kept_at_its_original_value():
    model = CorrelatedStream(radius=None, act=Softball).eval()  # default radius sqrt(C) = 4
    cal = _calibration()
    c, row = _slice(model, "budget=0.02;random_inputs=0", cal, verify_inputs=0)
    (sid, kept), = row.result.stats["keep"].items()
    assert kept < 16
    gm = c.graph_module
    radial = [n for n in gm.graph.nodes if ir.is_op(n, torch.ops.qlfx.softball)]
    assert radial and all(ir.op_args(n)["radius"] == pytest.approx(math.sqrt(16)) for n in radial)
    assert all(ir.channels(n) == kept for n in radial)


def test_keep_option_sets_exact_channel_counts_for_both_methods():
    model = CorrelatedStream(radius=3.0).eval()
    cal = _calibration()
    gm = qlfx.compile(model, "dce", example_inputs=(cal[:8],)).graph_module.eval()
    sid = next(s.id for s in analyze(gm).spaces if s.group.value == "O")
    for method in ("pca", "magnitude"):
        c, row = _slice(gm, f"budget=1e30;method={method};keep={sid}:5;random_inputs=0", cal, verify_inputs=0)
        assert row.result.stats["keep"] == {sid: 5}
        convs = [n for n in c.graph_module.graph.nodes if ir.is_op(n, aten.conv2d)]
        assert [ir.shape(n)[1] for n in convs] == [5, 5]  # conv_in writes 5 channels, conv_out still 5 outputs
        assert ir.get_tensor(c.graph_module, convs[1].args[1]).shape[1] == 5


def test_slice_needs_calibration():
    model = CorrelatedStream(radius=3.0).eval()
    with pytest.raises(UsageError, match="calibration"):
        qlfx.compile(model, "slice<budget=0.01>", example_inputs=(torch.randn(2, 4, 6, 6),))


def test_deleting_tied_product_channels_equals_zeroing_them():
    """A PDEBlock's hidden unit (z1, z2, p = z1 * z2, y = dw(p)) loses channel j everywhere at once;
    the sliced graph must compute exactly what the original computes with conv1's rows j and W + j
    zeroed (then z1_j = z2_j = 0, p_j = 0, and y's channels 2j, 2j+1 carry only the dw bias, zeroed too)."""
    model = randomize_batchnorm(create_model("qlnet-tiny"), seed=11).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    folded = qlfx.compile(model, "fold-bn,dce", example_inputs=(x[:4],)).graph_module.eval()
    folded = qlfx.compile(folded, "dce", example_inputs=(x[:4],)).graph_module.eval()  # names stable under retrace
    report = analyze(folded)
    # the last block's hidden unit: the tie class of its product p = z1 * z2
    product = [n for n in folded.graph.nodes if report.node_kinds.get(n.name) == "product"][-1]
    conv1_name = product.args[0].args[0].name
    dw_name = next(iter(product.users)).name
    tie = report.spaces[report.spaces_of(product.name)[0]].tie
    uid = min(sid for sid, _ in report.ties[tie])
    base = min(report.spaces[sid].size // m for sid, m in report.ties[tie])
    c, row = _slice(folded, f"budget=1e30;method=magnitude;keep={uid}:{base - 5};random_inputs=0;compensate=false", x, example_batch=4,
                    verify_inputs=0)
    dropped = row.result.stats["dropped"][uid]
    assert len(dropped) == 5
    gm = c.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    assert ir.shape(nodes[conv1_name])[1] == 2 * (base - 5)
    assert ir.ConvCall.of(nodes[dw_name]).groups == base - 5
    # reference: the original graph with those channels zeroed where they are produced
    ref = ir.copy_graph_module(folded)
    rnodes = {n.name: n for n in ref.graph.nodes}
    with torch.no_grad():
        conv1 = ir.ConvCall.of(rnodes[conv1_name])
        rows = torch.tensor(dropped + [j + base for j in dropped])
        ir.get_tensor(ref, conv1.weight)[rows] = 0
        if conv1.bias is not None:
            ir.get_tensor(ref, conv1.bias)[rows] = 0
        dw = ir.ConvCall.of(rnodes[dw_name])
        k = ir.shape(dw.node)[1] // base
        outs = torch.tensor([j * k + r for j in dropped for r in range(k)])
        if dw.bias is not None:
            ir.get_tensor(ref, dw.bias)[outs] = 0
    expected, got = _run(ref, x, 4), _run(gm, x, 4)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(got, _run(folded, x, 4), rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


class ReluStream(nn.Module):
    """conv 1x1 (4 -> 8, positive biases) -> ReLU -> conv 1x1 (8 -> 3): channels with large means."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.a = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 3, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(8, 4, 1, 1, generator=gen) * 0.3)
            self.a.bias.copy_(torch.rand(8, generator=gen) * 2 + 1)
            self.b.weight.copy_(torch.randn(3, 8, 1, 1, generator=gen))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_mean_compensation_reduces_the_error_of_a_deletion():
    model = ReluStream().eval()
    cal = _calibration()
    errors = {}
    for compensate in ("mean", "refit", "false"):
        c, row = _slice(model, f"budget=1e30;method=magnitude;keep=1:4;random_inputs=0;compensate={compensate}",
                        cal, verify_inputs=0)
        assert row.result.stats["keep"] == {1: 4}
        errors[compensate] = _error(model, c.graph_module, _calibration(seed=5))
    assert errors["mean"] < 0.5 * errors["false"], errors
    assert errors["refit"] < 0.5 * errors["false"], errors


@pytest.mark.parametrize("score", ["mean", "max"])
def test_both_scores_respect_the_budget_and_delete_directions(score):
    model = CorrelatedStream().eval()
    cal = _calibration()
    budget = 0.05
    c, row = _slice(model, f"budget={budget};score={score};granularity=0.0625", cal)
    stats = row.result.stats
    assert stats["error"] <= budget and row.check.passed and row.check.needed <= budget
    assert stats["macs_after"] < stats["macs_before"], stats["keep"]
    assert _error(model, c.graph_module, cal) <= budget


def test_unknown_score_is_a_usage_error():
    model = CorrelatedStream().eval()
    with pytest.raises(UsageError, match="score"):
        _slice(model, "budget=0.05;score=median", _calibration())


class TwoStreams(nn.Module):
    """conv 1x1 (4 -> 8) -> hardtanh -> conv 1x1 (8 -> 8) -> hardtanh -> conv 1x1 (8 -> 3): two channel
    spaces (signed permutations: no rotation), each read by one pointwise conv."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.a, self.b, self.c = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 3, 1)
        with torch.no_grad():
            for conv in (self.a, self.b, self.c):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.6)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.3)

    def forward(self, x):
        return self.c(torch.nn.functional.hardtanh(self.b(torch.nn.functional.hardtanh(self.a(x)))))


def _inputs_of(gm, node_name, x):
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name == node_name:
                seen["x"] = value
            return value

    with torch.no_grad():
        out = Recorder(gm).run(x)
    return seen["x"], out


def test_refit_reproduces_the_reference_reader_output_from_the_sliced_input():
    """The last reader's refit is the least-squares fit of its reference output from what it receives
    in the sliced graph (upstream deletions and refits included) -- checked against torch.linalg.lstsq."""
    model = TwoStreams().eval()
    cal = _calibration()
    c, row = _slice(model, "budget=1e30;method=magnitude;keep=1:5/2:5;random_inputs=0", cal, verify_inputs=0)
    assert row.result.stats["keep"] == {1: 5, 2: 5}
    gm = c.graph_module
    reader = next(n for n in gm.graph.nodes if ir.is_op(n, aten.conv2d) and ir.get_tensor(gm, n.args[1]).shape[0] == 3)
    searched = torch.cat([s[0] for s in c.context.search_calibration])  # the held-out sets are not fitted
    assert len(searched) == 48
    x_new, _ = _inputs_of(gm, reader.args[0].name, searched)
    with torch.no_grad():
        target = model(searched)  # the reference reader's output is the network output
    rows = x_new.double().movedim(1, -1).reshape(-1, x_new.shape[1])
    design = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, target.double().movedim(1, -1).reshape(-1, 3)).solution.T
    weight = ir.get_tensor(gm, reader.args[1]).double().reshape(3, -1)
    bias = ir.get_tensor(gm, reader.args[2]).double()
    assert weight.shape == (3, 5)
    assert torch.allclose(weight, solution[:, :5], atol=1e-4), (weight, solution)
    assert torch.allclose(bias, solution[:, 5], atol=1e-4)
    # refitting against the unsliced upstream (refit-once) gives other weights and a larger error
    once, _ = _slice(model, "budget=1e30;method=magnitude;keep=1:5/2:5;random_inputs=0;compensate=refit-once",
                     cal, verify_inputs=0)
    assert _error(model, gm, cal) < _error(model, once.graph_module, cal)


def _labelled(model, count=256, seed=11):
    """Inputs and the labels the model itself predicts (with a few flipped): an accuracy to lose."""
    x = _calibration((count, 4, 6, 6), seed)
    with torch.no_grad():
        y = model(x).mean(dim=(2, 3)).argmax(1)
    y[::10] = (y[::10] + 1) % 3
    return x, y


class Classifier(nn.Module):
    """CorrelatedStream + global average pool: class scores [N, 3]."""

    def __init__(self):
        super().__init__()
        self.body = CorrelatedStream()
        self.head = nn.Conv2d(5, 3, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(3, 5, 1, 1, generator=torch.Generator().manual_seed(8)))

    def forward(self, x):
        return self.head(self.body(x)).mean(dim=(2, 3))


@pytest.mark.parametrize("drop", [0.0, 2.0])
def test_accuracy_budget_holds_on_the_labelled_calibration_data(drop):
    model = Classifier().eval()
    x, _ = _labelled(model.body)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::10] = (y[::10] + 1) % 3  # 90% correct before slicing
    c, row = _slice(model, f"accuracy_drop={drop};random_inputs=0", x, labels=y, verify_inputs=0)
    stats = row.result.stats
    searched = _searched(c, len(x))  # the samples of the calibration sets the search saw (not held out)
    assert len(searched) == 192  # 32 sets of 8, every 4th held out
    before = float((model(x[searched]).argmax(1) == y[searched]).double().mean()) * 100
    assert stats["budget"] is None and stats["accuracy_drop"] == drop
    assert stats["accuracy_before"] == pytest.approx(before) and before == pytest.approx(90.0, abs=2.0)
    assert stats["accuracy_before"] - stats["accuracy_after"] <= drop + 1e-9
    assert stats["macs_after"] < stats["macs_before"]
    # the pass manager checked the same budget on the same labelled data, and the held-out sets apart
    assert row.check.accuracy is not None and row.check.accuracy.passed
    assert row.check.accuracy.samples == len(searched) and row.check.holdout.accuracy.samples == len(y) - len(searched)
    with torch.no_grad():
        after = float((c.graph_module(x[searched]).argmax(1) == y[searched]).double().mean()) * 100
    assert after == pytest.approx(stats["accuracy_after"]) and before - after <= drop + 1e-9


def _searched(compiled, n, batch=8):
    """Indices of the calibration samples in the sets a lossy pass searched on (PassContext.holdout_indices)."""
    held = set(compiled.context.holdout_indices)
    return torch.tensor([i for i in range(n) if i // batch not in held])


def test_accuracy_budget_without_labels_is_a_usage_error():
    model = Classifier().eval()
    x, _ = _labelled(model.body)
    with pytest.raises(UsageError, match="labelled"):
        _slice(model, "accuracy_drop=0.5", x)
    with pytest.raises(UsageError, match="labelled"):  # all samples marked unlabelled
        _slice(model, "accuracy_drop=0.5", x, labels=torch.full((len(x),), -1))


def test_unlabelled_samples_do_not_count_towards_the_accuracy():
    model = Classifier().eval()
    x, _ = _labelled(model.body)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[: len(y) // 2] = -1
    c, row = _slice(model, "accuracy_drop=1.0;random_inputs=0", x, labels=y, verify_inputs=0)
    assert row.result.stats["accuracy_before"] == 100.0
    searched = _searched(c, len(x))
    assert row.check.accuracy.samples == int((y[searched] >= 0).sum()) == 96


def test_target_macs_stops_the_search_at_a_cost():
    model = CorrelatedStream().eval()
    cal = _calibration()
    full = count_macs(qlfx.compile(model, [], example_inputs=(cal[:8],)).graph_module)
    c, row = _slice(model, f"method=magnitude;budget=1e30;target_macs={full // 2};random_inputs=0", cal,
                    verify_inputs=0)
    after = row.result.stats["macs_after"]
    assert after == count_macs(c.graph_module)
    # one deletion step (1 of 16 channels) past the target at most
    assert full // 2 - full / 16 <= after <= full // 2, (after, full)


class FlattenHead(nn.Module):
    """conv 3x3 (3 -> 12) -> BN -> hardball (radius sqrt(C)) -> 2x2 average pool -> flatten -> linear
    (48 -> 5): the stream is read through a flatten, which the graph holds as aten.view(x, [batch, 48])."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.act = Hardball()
        self.fc = nn.Linear(12 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.avg_pool2d(self.act(self.bn(self.conv(x))), 2), 1))


def test_runner_runs_a_batch_specialised_graph_on_sets_of_any_size():
    model = randomize_batchnorm(FlattenHead(), seed=3).eval()
    x = torch.randn(22, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    gm = qlfx.trace(model, (x[:4],))
    view = next(n for n in gm.graph.nodes if ir.is_op(n, aten.view))
    assert list(ir.op_args(view)["size"]) == [4, 48]  # the batch is baked in: gm(x) itself fails
    with pytest.raises(RuntimeError):
        gm(x)
    runner = Runner((x[:4],), dynamic_batch=False)
    assert [real for _, real in runner.chunks((x,))] == [4, 4, 4, 4, 4, 2]
    (out,) = runner.outputs(gm, (x,))
    with torch.no_grad():
        assert torch.allclose(out, model(x).double(), atol=1e-5)
        act = model.act(model.bn(model.conv(x))).double()
    rows = act.movedim(1, -1).reshape(-1, 12)
    moments, energies = channel_moments(runner, gm, [(x,)], {"act": ("stream", 1)}, {"act"})
    assert torch.allclose(moments["stream"], rows.T @ rows / len(rows), atol=1e-5)
    assert torch.allclose(energies["act"], (rows * rows).mean(0), atol=1e-5)


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_slice_resizes_a_flatten_and_calibrates_at_any_batch(dynamic_batch):
    """The unit reaches the linear head through a flatten: the view's size shrinks with the channels,
    the default radius stays sqrt(12), and calibration of 150 samples runs on a graph captured at batch 4."""
    model = randomize_batchnorm(FlattenHead(), seed=3).eval()
    x = torch.randn(150, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    folded = qlfx.compile(model, "fold-bn", example_inputs=(x[:4],), dynamic_batch=dynamic_batch).graph_module
    budget = 0.05
    p = qlfx.get_pass("slice", budget=budget, random_inputs=0)
    ctx = PassContext(example_inputs=(x[:4],), calibration=[(x,)], dynamic_batch=dynamic_batch)
    gm, result = PassManager([p], verify=False).apply(p, folded, ctx)
    (uid, kept), = result.stats["keep"].items()
    assert kept < 12 and result.stats["spaces"][uid]["rotated"]
    view = next(n for n in gm.graph.nodes if ir.is_op(n, aten.view))
    assert ir.shape(view)[1] == kept * 4
    (radial,) = [n for n in gm.graph.nodes if ir.is_op(n, torch.ops.qlfx.hardball)]
    assert ir.op_args(radial)["radius"] == pytest.approx(math.sqrt(12))
    with torch.no_grad():
        ref = model(x)
        new = gm(x) if dynamic_batch else _run(gm, x, 4)
    error = float((new - ref).abs().max() / ref.abs().max())
    assert error <= budget
    assert error == pytest.approx(result.stats["error"], rel=1e-3, abs=1e-6)
    assert result.stats["macs_after"] == count_macs(gm) < result.stats["macs_before"]


@pytest.mark.parametrize("split", ["chunk", "split", "tensor_split", "narrow", "index"])
def test_tied_halves_written_any_way_lose_the_same_channels(split):
    """conv (4 -> 16) -> BN -> two halves (however written: one aten.slice each) -> product -> conv
    (8 -> 3): deleting base channels j removes conv rows j and 8 + j; the result equals the folded graph
    with those rows zeroed."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 16, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            h = self.bn(self.conv1(x))
            if split == "chunk":
                a, b = h.chunk(2, dim=1)
            elif split == "split":
                a, b = torch.split(h, 8, dim=1)
            elif split == "tensor_split":
                a, b = torch.tensor_split(h, 2, dim=1)
            elif split == "narrow":
                a, b = h.narrow(1, 0, 8), h.narrow(1, 8, 8)
            else:
                c = h.size()[1] // 2
                a, b = h[:, :c], h[:, c:]
            return self.conv2(a * b)

    model = randomize_batchnorm(Gated(), seed=7).eval()
    x = _calibration((16, 4, 5, 5), seed=3)
    folded = qlfx.compile(model, "fold-bn", example_inputs=(x[:8],)).graph_module.eval()
    report = analyze(folded)
    product = next(n for n in folded.graph.nodes if report.node_kinds.get(n.name) == "product")
    uid = min(sid for sid, _ in report.ties[report.spaces[report.spaces_of(product.name)[0]].tie])
    c, row = _slice(folded, f"budget=1e30;method=magnitude;keep={uid}:6;random_inputs=0;compensate=false", x,
                    verify_inputs=0)
    dropped = row.result.stats["dropped"][uid]
    assert len(dropped) == 2
    gm = c.graph_module
    slices = [ir.ChannelSlice.of(n) for n in gm.graph.nodes if ir.is_op(n, aten.slice)]
    assert sorted((s.start, s.stop) for s in slices) == [(0, 6), (6, 12)]
    ref = ir.copy_graph_module(folded)
    conv1 = ir.ConvCall.of(next(n for n in ref.graph.nodes if ir.is_op(n, aten.conv2d)))
    with torch.no_grad():
        rows = torch.tensor(dropped + [j + 8 for j in dropped])
        ir.get_tensor(ref, conv1.weight)[rows] = 0
        ir.get_tensor(ref, conv1.bias)[rows] = 0
        expected, got = ref(x[:8]), gm(x[:8])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert not torch.allclose(got, folded(x[:8]), rtol=1e-3)


class ShiftScale(nn.Module):
    """conv 1x1 (4 -> 8, no bias) -> + shift (per channel) -> ReLU -> * scale (per channel) -> conv 1x1
    (8 -> 3): two per-channel constants inside one unit (the ReLU stream and the scaled stream, tied)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(12)
        self.a = nn.Conv2d(4, 8, 1, bias=False)
        self.b = nn.Conv2d(8, 3, 1)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1, generator=gen))
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1, generator=gen) + 0.5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) + self.shift) * self.scale)


def test_per_channel_constants_lose_the_deleted_entries():
    model = ShiftScale().eval()
    x = _calibration((16, 4, 5, 5), seed=8)
    gm = qlfx.trace(model, (x[:8],)).eval()
    report = analyze(gm)
    assert {"add-constant", "mul-constant"} <= set(report.node_kinds.values())
    c, row = _slice(gm, "budget=1e30;method=magnitude;keep=1:5;random_inputs=0;compensate=false", x, verify_inputs=0)
    dropped = row.result.stats["dropped"][1]
    assert len(dropped) == 3 and row.result.stats["keep"] == {1: 5}
    sliced = c.graph_module
    constants = [ir.get_tensor(sliced, a) for n in sliced.graph.nodes if ir.is_op(n, aten.add, aten.mul)
                 for a in n.args if ir.is_constant(a)]
    assert sorted(tuple(t.shape) for t in constants) == [(1, 5, 1, 1), (1, 5, 1, 1)]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.a.weight[dropped] = 0
        reference.shift[:, dropped] = 0
        expected = reference(x[:8])
        assert torch.allclose(sliced(x[:8]), expected, atol=1e-6 * float(expected.abs().max()))
        assert not torch.allclose(model(x[:8]), expected, atol=1e-3)


# ---------------------------------------------------------------- the search for large graphs (issue 11.3)
def test_bisect_search_keeps_the_budget_in_few_evaluations():
    model = TwoStreams().eval()
    cal = _calibration()
    _, greedy = _slice(model, "budget=0.2;search=greedy;random_inputs=0", cal, verify_inputs=0)
    c, bisect = _slice(model, "budget=0.2;search=bisect;probe_samples=16;random_inputs=0", cal, verify_inputs=0)
    g, b = greedy.result.stats, bisect.result.stats
    assert g["search"] == "greedy" and b["search"] == "bisect"
    assert b["error"] <= 0.2 and bisect.check.passed and bisect.check.needed <= 0.2
    assert b["macs_after"] < b["macs_before"] and b["moves_accepted"] > 0
    # what it costs: one probe per unit, then per refit round and per retired unit a bisection of the path
    # (and a re-check after each refit)
    units, rounds = len(b["keep"]), 1 + b["refits"] + b["retired_units"]
    moves = sum(sp["size"] - 1 for sp in b["spaces"].values())  # granularity 1/16 of 8 channels: one each
    assert b["evaluations"] <= units + rounds * (math.ceil(math.log2(moves + 1)) + 1)
    # as good as the greedy search here (both keep the same budget on the same data)
    assert b["macs_after"] <= g["macs_after"]
    # what it reports is what the sliced graph computes
    worst = max(_error(model, c.graph_module, s[0]) for s in c.context.search_calibration)  # per set, as checked
    assert worst == pytest.approx(b["error"], rel=1e-3, abs=1e-7)


def test_bisect_search_on_a_zoo_model_with_random_bn(monkeypatch):
    import qlfx.passes.slice as slice_pass

    model = randomize_batchnorm(create_model("qlnet-tiny"), seed=7).eval()
    cal = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    folded = qlfx.compile(model, "fold-bn,dce", example_inputs=(cal[:8],)).graph_module.eval()
    monkeypatch.setattr(slice_pass, "_GREEDY_WORK_LIMIT", 0.0)  # search=auto takes bisect on any graph now
    c, row = _slice(folded, "budget=0.05;granularity=0.25", cal)
    stats = row.result.stats
    assert stats["search"] == "bisect"
    assert stats["error"] <= 0.05 and row.check.passed and row.check.needed <= 0.05
    assert stats["macs_after"] < stats["macs_before"] and count_macs(c.graph_module) == stats["macs_after"]
    assert _error(folded, c.graph_module, cal[:8]) <= 0.05


def test_auto_search_is_greedy_on_small_graphs_and_progress_is_quiet_unless_asked(capsys):
    model = TwoStreams().eval()
    cal = _calibration()
    _, row = _slice(model, "budget=0.02;random_inputs=0", cal, verify_inputs=0)
    assert row.result.stats["search"] == "greedy"
    assert "[qlfx.slice]" not in capsys.readouterr().err  # progress="auto": stderr is not a terminal here
    _, row = _slice(model, "budget=0.02;search=bisect;progress=true;random_inputs=0", cal, verify_inputs=0)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[qlfx.slice]")]
    assert len(lines) == row.result.stats["evaluations"] + 1  # one per evaluation, and the final state
    assert "moves tried" in lines[-1] and "accepted" in lines[-1] and "% saved" in lines[-1]
    assert f"{row.result.stats['moves_accepted']} accepted" in lines[-1]


@pytest.mark.parametrize("option", ["search=fast", "probe_samples=0", "progress=maybe"])
def test_bad_search_options_are_usage_errors(option):
    with pytest.raises(UsageError, match=option.split("=")[0]):
        _slice(TwoStreams().eval(), f"budget=0.02;{option}", _calibration())


# ------------------------------------------------------------- product units (issue 11.3: the Eq.(3) layout)
def _eq3_folded(seed=5, n=32):
    """qlnet-eq3-tiny (random weights, random BN statistics), BN folded; and its calibration images."""
    model = randomize_batchnorm(create_model("qlnet-eq3-tiny"), seed=seed).eval()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    folded = qlfx.compile(model, "fold-bn,constant-fold,dce", example_inputs=(x[:8],)).graph_module.eval()
    return qlfx.compile(folded, "dce", example_inputs=(x[:8],)).graph_module.eval(), x  # names stable under retrace


def _product_units(gm):
    """product node name -> its unit (the ids slice gives them: after the symmetry report's spaces)."""
    from qlfx.symmetry.product_slicing import product_units

    report = analyze(gm)
    found, _ = product_units(gm, report, set(), len(report.spaces))
    return {u.product: u for u in found}


def _factors(gm, product):
    """(the one-group conv factor, the per-channel conv factor) of an Eq.(3) product a * dw(u)."""
    kinds = analyze(gm).node_kinds
    a, b = product.args[:2]
    return (a, b) if kinds[a.name] == "linear" else (b, a)


def test_product_channels_go_without_the_stream_and_equal_zeroing_a_factor_row():
    """Eq.(3): z = conv_a(u) * dw(u) is tied to the stream u, whose unit deletes z's channels only 4 at
    a time with a stream channel. Its product unit deletes z_j alone: conv_a's row j, the depthwise output
    j (the conv now reads a gather of u), conv_out's column j; u keeps every channel. The sliced graph
    computes what the original computes with conv_a's row j and bias j zeroed (z_j = 0)."""
    folded, x = _eq3_folded()
    units = _product_units(folded)
    assert len(units) == 4  # one per block; each stream unit ties its block's product k = 4 channels at a time
    nodes = {n.name: n for n in folded.graph.nodes}
    name, unit = next(iter(units.items()))
    conv_a, dw = _factors(folded, nodes[name])
    stream = ir.ConvCall.of(dw).input
    c, row = _slice(folded, f"budget=1e30;method=magnitude;keep={unit.id}:{unit.size - 5};random_inputs=0;"
                            f"compensate=false", x, verify_inputs=0)
    dropped = row.result.stats["dropped"][unit.id]
    assert len(dropped) == 5 and row.result.stats["keep"][unit.id] == unit.size - 5
    gm = c.graph_module
    new = {n.name: n for n in gm.graph.nodes}
    assert ir.shape(new[conv_a.name])[1] == ir.shape(new[dw.name])[1] == unit.size - 5
    gather = ir.ConvCall.of(new[dw.name]).input
    assert ir.is_op(gather, aten.index_select) and gather.args[0].name == stream.name
    assert ir.shape(new[stream.name])[1] == ir.shape(stream)[1]  # the stream keeps its channels
    reader = next(iter(nodes[name].users))
    assert ir.get_tensor(gm, ir.ConvCall.of(new[reader.name]).weight).shape[1] == unit.size - 5
    ref = ir.copy_graph_module(folded)
    conv = ir.ConvCall.of({n.name: n for n in ref.graph.nodes}[conv_a.name])
    with torch.no_grad():
        ir.get_tensor(ref, conv.weight)[dropped] = 0
        ir.get_tensor(ref, conv.bias)[dropped] = 0
    expected, got = _run(ref, x, 8), _run(gm, x, 8)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(got, _run(folded, x, 8), rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


def test_product_and_stream_units_deleting_the_same_values_compute_what_the_search_measured():
    """The stream's unit and the product unit both delete channels of the product (and its factors);
    physically the stream's unit goes first and the product unit's channels are mapped onto what is
    left. With refitted readers (a reader of both units is fitted to what both keep), the sliced graph
    computes what the trial deletion measured."""
    folded, x = _eq3_folded(seed=8)
    units = _product_units(folded)
    report = analyze(folded)
    name, unit = next(iter(units.items()))
    tie = report.spaces[report.spaces_of(name)[0]].tie
    stream_uid = min(sid for sid, _ in report.ties[tie])
    stream_size = min(report.spaces[sid].size // m for sid, m in report.ties[tie])
    p = qlfx.get_pass("slice", budget=1e30, random_inputs=0,
                      keep=f"{stream_uid}:{stream_size - 3}/{unit.id}:{unit.size // 2}")
    ctx = PassContext(example_inputs=(x[:8],), calibration=[(x,)])
    gm, result = PassManager([p], verify=False).apply(p, folded, ctx)
    dropped = result.stats["dropped"]
    assert len(dropped[stream_uid]) == 3 and len(dropped[unit.id]) == unit.size - unit.size // 2
    # channels of the product both units delete (stream channel s takes product channels 4s..4s+3)
    k = unit.size // stream_size
    by_stream = {s * k + r for s in dropped[stream_uid] for r in range(k)}
    conv_a, _ = _factors(folded, {n.name: n for n in folded.graph.nodes}[name])
    survivors = set(range(unit.size)) - by_stream - set(dropped[unit.id])
    assert ir.shape({n.name: n for n in gm.graph.nodes}[conv_a.name])[1] == max(1, len(survivors))
    with torch.no_grad():
        error = float((_run(gm, x, 8) - _run(folded, x, 8)).abs().max() / _run(folded, x, 8).abs().max())
    assert error == pytest.approx(result.stats["error"], rel=1e-3, abs=1e-6)
    assert result.stats["macs_after"] == count_macs(gm) < result.stats["macs_before"]


def test_product_units_hold_a_tight_budget_and_shrink_an_eq3_net():
    folded, x = _eq3_folded(seed=3)
    for budget in (0.05, 1e-6):  # 1e-6: too tight for any deletion
        c, row = _slice(folded, f"budget={budget};granularity=0.25;random_inputs=1", x)
        stats = row.result.stats
        assert row.check.passed and stats["error"] <= budget and row.check.needed <= budget
        assert _error(folded, c.graph_module, x[:8]) <= budget
        products = [uid for uid, sp in stats["spaces"].items() if sp["product"] is not None]
        assert len(products) == 4
        if budget == 1e-6:
            assert stats["macs_after"] == stats["macs_before"]
        else:
            assert any(stats["keep"][uid] < stats["spaces"][uid]["size"] for uid in products)
            assert stats["macs_after"] < stats["macs_before"]


def test_products_option_and_layouts_without_tied_products():
    """The PDEBlock's hidden product is the base of its own unit (its halves are slices of one conv): no
    product unit. products=false turns them off; anything but a boolean is a usage error. (A target
    above the graph's MACs ends each search before its first move: only the units are looked at.)"""
    model = randomize_batchnorm(create_model("qlnet-tiny"), seed=4).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    folded = qlfx.compile(model, "fold-bn,dce", example_inputs=(x[:8],)).graph_module.eval()
    no_search = "budget=1e30;random_inputs=0;target_macs=1e30"
    _, row = _slice(folded, no_search, x)
    assert row.result.stats["spaces"] and not any(sp["product"] for sp in row.result.stats["spaces"].values())
    eq3, y = _eq3_folded(n=16)
    for option, count in (("", 4), (";products=false", 0)):
        _, row = _slice(eq3, no_search + option, y)
        assert sum(1 for sp in row.result.stats["spaces"].values() if sp["product"]) == count
    with pytest.raises(UsageError, match="products"):
        _slice(eq3, "budget=0.05;products=maybe", y)


class HandWrittenEq3(nn.Module):
    """An Eq.(3) net written the way a user would, not with qlfx's zoo: BN after every factor, the
    depthwise factor's multiplier from ``x.size()[1]``, a numpy scale, ``x += x0``, an nn.Sequential
    wrapper, hardtanh once per stage."""

    class Block(nn.Module):
        def __init__(self, width, mult=4):
            super().__init__()
            self.pw = nn.Sequential(nn.Conv2d(width, width * mult, 1), nn.BatchNorm2d(width * mult))
            self.dw = nn.Sequential(nn.Conv2d(width, width * mult, 3, padding=1, groups=width),
                                    nn.BatchNorm2d(width * mult))
            self.out = nn.Sequential(nn.Conv2d(width * mult, width, 1), nn.BatchNorm2d(width))

        def forward(self, x):
            x0 = x
            assert x.size()[1] * 4 == self.pw[0].out_channels
            x = self.out(self.pw(x) * self.dw(x)) * np.float32(0.5)
            x += x0
            return x

    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.Hardtanh())
        self.body = nn.Sequential(self.Block(width), self.Block(width), nn.Hardtanh())
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_product_units_on_a_hand_written_eq3_net():
    """Product units are found from the graph's structure, not the zoo's module names: on a hand-written
    Eq.(3) net (random weights and BN statistics) each product gets one, some shrink, and the budget
    holds on every calibration image."""
    model = randomize_batchnorm(HandWrittenEq3(), seed=2).eval()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    c = qlfx.compile(model, "fold-bn,slice<budget=0.05;granularity=0.25;random_inputs=0>", example_inputs=(x[:8],),
                     calibration=x)
    row = next(r for r in c.report.rows if r.pass_name == "slice")
    stats = row.result.stats
    products = [uid for uid, sp in stats["spaces"].items() if sp["product"] is not None]
    assert len(products) == 2 and row.check.passed
    assert any(stats["keep"][uid] < stats["spaces"][uid]["size"] for uid in products)
    assert stats["macs_after"] < stats["macs_before"]
    error = float((_run(c.graph_module, x, 8) - _run(model, x, 8)).abs().max() / _run(model, x, 8).abs().max())
    # all 32 images: the search's sets and the quarter the pass manager held out (a superset: max >= search's)
    assert stats["error"] - 1e-6 <= error <= 0.05


@pytest.mark.parametrize("kept", [[0, 1, 3, 4, 6, 7, 9, 10], [0, 2, 5, 7, 8, 11]])
def test_a_per_channel_conv_keeps_any_outputs_with_its_input_whole(kept):
    """Depthwise 3x3 (4 groups, 3 outputs each, stride 2, bias): keeping outputs K gives conv(x)[:, K]
    exactly -- same groups when every group keeps as many (first case), else a gather of the inputs the
    kept outputs read and one group per output (second case)."""
    from qlfx.symmetry.product_slicing import shrink_per_channel_conv

    conv = nn.Conv2d(4, 12, 3, stride=2, padding=1, groups=4)
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    gm = qlfx.trace(conv.eval(), (x,))
    node = next(n for n in gm.graph.nodes if ir.is_op(n, aten.conv2d))
    shrink_per_channel_conv(gm, node, torch.tensor(kept))
    gm.graph.lint()
    gm.recompile()
    gathered = any(ir.is_op(n, aten.index_select) for n in gm.graph.nodes)
    assert gathered == (len(kept) == 6)
    assert ir.ConvCall.of(node).groups == (4 if len(kept) == 8 else 6)
    with torch.no_grad():
        assert torch.allclose(gm(x), conv(x)[:, kept], atol=1e-6)
