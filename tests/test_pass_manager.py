"""The pass manager: registry, pipelines, verification after every pass, instruments."""
import io

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import qlfx
from passtools import ExactButPerturbs
from qlfx import instruments as ins
from qlfx import ir
from qlfx.models import create_model, qlnet, randomize_batchnorm
from qlfx.pass_manager import Pass, PassResult, parse_pipeline
from qlfx.requirements import BN_FOLDED, CONSTANTS_FOLDED, NO_DEAD_CODE, STATIC_SHAPES

aten = torch.ops.aten


class ScaleOneConv(Pass):
    """Deliberately wrong: scales the weights of the second conv by 1.5."""

    name = "scale-one-conv"
    description = "broken on purpose"
    contract = "equivalent"

    def run(self, gm, ctx):
        convs = [n for n in gm.graph.nodes if ir.ConvCall.of(n)]
        target = ir.ConvCall.of(convs[1])
        w = ir.get_tensor(gm, target.weight)
        with gm.graph.inserting_before(convs[1]):
            target.set_args(weight=ir.constant_node(gm, w * 1.5, "scaled"))
        return PassResult(changed=True, rewrites=[convs[1].name])


def _model():
    return randomize_batchnorm(qlnet(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10), seed=2).eval()


def test_wrong_pass_is_caught_and_named_with_first_diverging_node():
    x = torch.randn(1, 3, 32, 32)
    model = _model()
    with pytest.raises(qlfx.EquivalenceError) as info:
        qlfx.compile(model, passes=["fold-bn", ScaleOneConv(), "dce"], example_inputs=(x,))
    err = info.value
    assert err.pass_name == "scale-one-conv"
    assert "scale-one-conv" in str(err)
    # the second conv of the graph is the first value that differs
    assert err.divergence is not None and err.divergence.node == "layer1_0_conv1_conv"
    assert err.divergence.created_by == "trace"
    # the last good graph (after fold-bn) is kept and still correct
    with torch.no_grad():
        ref = model(x)
    assert (err.last_good(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert [r.pass_name for r in err.report.rows] == ["(trace)", "fold-bn", "scale-one-conv"]


def test_exact_contract_is_checked_bit_for_bit():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(qlfx.EquivalenceError) as info:
        qlfx.compile(_model(), passes=[ExactButPerturbs()], example_inputs=(x,))
    assert info.value.pass_name == "test-exact-perturbs"
    # the same perturbation is fine for an 'equivalent' pass
    loose = ExactButPerturbs()
    loose.contract = "equivalent"
    qlfx.compile(_model(), passes=[loose], example_inputs=(x,))


def test_verification_uses_calibration_inputs_too():
    """A pass that is only wrong on large inputs is caught when calibration data has them."""

    class ClampSmall(Pass):
        name = "clamp-input"
        description = "wrong outside [-10, 10]"
        contract = "equivalent"

        def run(self, gm, ctx):
            x = next(n for n in gm.graph.nodes if n.op == "placeholder")
            with gm.graph.inserting_after(x):
                c = ir.call(gm, aten.clamp.default, (x, -10.0, 10.0), like=x)
            x.replace_all_uses_with(c, delete_user_cb=lambda user: user is not c)
            return PassResult(changed=True)

    x = torch.randn(1, 3, 32, 32)
    qlfx.compile(_model(), passes=[ClampSmall()], example_inputs=(x,))  # random normal inputs: passes
    with pytest.raises(qlfx.EquivalenceError):
        qlfx.compile(_model(), passes=[ClampSmall()], example_inputs=(x,), calibration=torch.randn(2, 3, 32, 32) * 50)


def test_pipeline_strings_and_unknown_names():
    passes = parse_pipeline("fold-bn, constant-fold ,dce")
    assert [p.name for p in passes] == ["fold-bn", "constant-fold", "dce"]
    with pytest.raises(qlfx.UnknownPassError, match="Did you mean 'fold-bn'"):
        parse_pipeline("fold-bm")
    with pytest.raises(qlfx.UsageError, match="no option"):
        parse_pipeline("dce<aggressive=true>")
    reg = qlfx.list_passes()
    for name in ("fold-bn", "dce", "constant-fold"):
        assert reg[name].contract in ("exact", "equivalent", "lossy") and reg[name].description


def test_instruments_print_and_dump(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    before_after, changed, times = io.StringIO(), io.StringIO(), io.StringIO()
    timing = ins.Timing(stream=times)
    qlfx.compile(_model(), passes="fold-bn,constant-fold,dce", example_inputs=(x,), instruments=[
        ins.PrintIR(before="fold-bn", after="all", stream=before_after), ins.PrintChanged(stream=changed),
        ins.DumpDir(tmp_path), timing])
    assert list(timing.seconds) == ["fold-bn", "constant-fold", "dce"]
    assert [line.split(":")[0] for line in times.getvalue().splitlines()] == [
        "[timing] 001 fold-bn", "[timing] 002 constant-fold", "[timing] 003 dce"]
    text = before_after.getvalue()
    assert "IR before fold-bn" in text and "IR after dce" in text and "IR after constant-fold" in text
    assert "batch_norm" in text.split("IR after fold-bn")[0]
    diff = changed.getvalue()
    assert "fold-bn changed the IR" in diff and "constant-fold changed" not in diff  # qlnet has no constants to fold
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "000_input.py" in names and "001_fold-bn.py" in names and "003_dce.py" in names
    assert "001_fold-bn.dot" in names
    assert "batch_norm" not in (tmp_path / "003_dce.py").read_text()


def test_report_table_has_the_columns():
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(_model(), passes="fold-bn,dce", example_inputs=(x,))
    text = str(compiled.report)
    for col in ("pass", "changed", "err/max|ref|", "allowed", "max abs err", "elementwise rel", "seconds", "params",
                "nonzero"):
        assert col in text
    rows = compiled.report.rows
    assert rows[-1].params < rows[0].params  # BN parameters are gone
    assert all(r.check.passed for r in rows[1:])


def test_provenance_names_the_pass_that_made_nodes():
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.compile(_model(), passes="fold-bn", example_inputs=(x,)).graph_module
    origins = {n.meta[ir.ORIGIN] for n in gm.graph.nodes}
    assert origins == {"trace", "fold-bn"}
    for n in gm.graph.nodes:
        if n.op != "output":
            assert isinstance(n.meta["val"], FakeTensor), n.name  # refreshed after the pass


class RaisesAtSecondConv(Pass):
    """A bug: a TypeError at the second conv."""

    name = "raises-at-second-conv"
    description = "broken on purpose"
    contract = "equivalent"

    def run(self, gm, ctx):
        convs = 0
        for node in gm.graph.nodes:
            if ir.ConvCall.of(node) is not None:
                convs += 1
                if convs == 2:
                    ir.ConvCall.of(node).stride + 1  # tuple + int
        return PassResult(changed=False)


class LeavesUseBeforeDefinition(Pass):
    """A bug that raises nothing itself: the first conv reads a value computed after it."""

    name = "leaves-use-before-definition"
    description = "broken on purpose"
    contract = "equivalent"

    def run(self, gm, ctx):
        convs = [ir.ConvCall.of(n) for n in gm.graph.nodes if ir.ConvCall.of(n)]
        convs[0].set_args(input=convs[-1].node)
        return PassResult(changed=True)


def test_a_pass_that_raises_is_a_pass_error_naming_pass_and_node():
    x = torch.randn(1, 3, 32, 32)
    model = _model()
    with pytest.raises(qlfx.PassError) as info:
        qlfx.compile(model, passes=["fold-bn", RaisesAtSecondConv(), "dce"], example_inputs=(x,))
    err = info.value
    assert err.pass_name == "raises-at-second-conv" and isinstance(err.error, TypeError)
    assert err.node == "layer1_0_conv1_conv (conv2d in layer1.0.conv1.conv)"
    assert "pass 'raises-at-second-conv' raised while working on node layer1_0_conv1_conv" in str(err)
    assert "TypeError" in str(err) and ".last_good" in str(err)
    # last_good is the graph before the pass: after fold-bn, and still the model's function
    after_fold = qlfx.compile(model, passes="fold-bn", example_inputs=(x,)).graph_module
    assert ins.graph_code(err.last_good) == ins.graph_code(after_fold)
    assert [r.pass_name for r in err.report.rows] == ["(trace)", "fold-bn"]
    with torch.no_grad():
        torch.testing.assert_close(err.last_good(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_pass_that_leaves_a_malformed_graph_is_a_pass_error():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(qlfx.PassError, match="'leaves-use-before-definition' left a malformed graph") as info:
        qlfx.compile(_model(), passes=[LeavesUseBeforeDefinition()], example_inputs=(x,))
    assert "used before it has been defined" in str(info.value.error)
    assert info.value.last_good is not None


class NegateLogits(Pass):
    """A lossy pass that multiplies the class scores by ``scale``: with scale -1 the argmax becomes the
    argmin, so no accuracy budget can hold."""

    name = "negate-logits"
    description = "lossy on purpose"
    contract = "lossy"
    option_defaults = {"budget": None, "accuracy_drop": None, "scale": -1.0}

    def run(self, gm, ctx):
        out = gm.graph.output_node()
        (logits,) = ir.output_values(gm)
        with gm.graph.inserting_before(out):
            scaled = ir.call(gm, aten.mul.Scalar, (logits, float(self.options["scale"])), like=logits)
        out.args = ((scaled,),)
        return PassResult(changed=True)


def _labelled_data(model, n=64):
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return x, model(x).argmax(1)


def test_accuracy_budget_of_a_lossy_pass_is_checked_on_labelled_calibration():
    model = _model()
    x, y = _labelled_data(model)
    with pytest.raises(qlfx.EquivalenceError) as info:
        qlfx.compile(model, passes=[NegateLogits(accuracy_drop=5.0)], example_inputs=(x[:8],), calibration=x, labels=y)
    err = info.value
    assert err.pass_name == "negate-logits" and err.check.accuracy is not None
    assert err.check.accuracy.before == 100.0 and err.check.accuracy.drop > 5.0
    assert "top-1" in str(err) and "allowed 5.00" in str(err)
    # scaling by 2 keeps every argmax: no accuracy lost, and with no output budget the change is allowed
    c = qlfx.compile(model, passes=[NegateLogits(accuracy_drop=0.0, scale=2.0)], example_inputs=(x[:8],),
                     calibration=x, labels=y)
    check = c.report.rows[-1].check
    assert check.passed and check.accuracy.drop == 0.0 and check.needed == pytest.approx(1.0, rel=1e-5)
    # an output budget given as well is checked too
    with pytest.raises(qlfx.EquivalenceError, match="needs tol"):
        qlfx.compile(model, passes=[NegateLogits(accuracy_drop=0.0, budget=0.5, scale=2.0)], example_inputs=(x[:8],),
                     calibration=x, labels=y)


def test_labels_are_validated_against_the_calibration_data():
    from qlfx.errors import UsageError

    model = _model()
    x, y = _labelled_data(model)
    lossy = NegateLogits(accuracy_drop=1.0, scale=2.0)
    with pytest.raises(UsageError, match="one label per calibration sample"):
        qlfx.compile(model, passes=[lossy], example_inputs=(x[:8],), calibration=x, labels=y[:10])
    with pytest.raises(UsageError, match="integer class indices"):
        qlfx.compile(model, passes=[lossy], example_inputs=(x[:8],), calibration=x, labels=y.float())
    with pytest.raises(UsageError, match="without calibration"):
        qlfx.compile(model, passes=[lossy], example_inputs=(x[:8],), labels=y)
    with pytest.raises(UsageError, match="no calibration sample is labelled"):
        qlfx.compile(model, passes=[lossy], example_inputs=(x[:8],), calibration=x)
    with pytest.raises(UsageError, match="needs a budget"):
        qlfx.compile(model, passes=[NegateLogits()], example_inputs=(x[:8],), calibration=x, labels=y)


# ------------------------------------------------------------------------------ pass requirements
BRANCH_PRODUCT = torch.ops.qlfx.branch_product.default


def _products(gm):
    """Products of two computed values (what fuse-product looks at)."""
    return [n for n in gm.graph.nodes if ir.is_op(n, aten.mul.Tensor)
            and all(isinstance(a, torch.fx.Node) and not ir.is_constant(a) for a in n.args[:2])]


def _fused(gm):
    return [n for n in gm.graph.nodes if n.target is BRANCH_PRODUCT]


def test_fuse_product_alone_says_each_product_needs_fold_bn():
    compiled = qlfx.compile(_model(), "fuse-product", example_inputs=(torch.randn(1, 3, 32, 32),))
    gm, row = compiled.graph_module, compiled.report.rows[-1]
    assert not _fused(gm) and len(_products(gm)) == 4  # one per block: the BN sits between conv and product
    skipped = row.result.skipped
    assert len(skipped) == 4 and all(s.needs is BN_FOLDED for s in skipped)
    assert all("batchnorm" in s.reason and "run fold-bn first" in str(s) for s in skipped)
    (unmet,) = row.result.unmet
    assert unmet.requirement is BN_FOLDED and unmet.blocked == 4 and unmet.violations > 4
    assert "fuse-product needs fold-bn first (4 products are blocked by a BN)" in str(compiled.report)
    (entry,) = compiled.report.to_dict()[-1]["unmet_requirements"]
    assert entry["requirement"] == "bn-folded" and entry["established_by"] == "fold-bn" and entry["blocked"] == 4


def test_auto_prereqs_runs_fold_bn_first_and_every_product_is_fused():
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(model, "fuse-product", example_inputs=(x,), auto_prereqs=True)
    rows = compiled.report.rows
    assert [p.name for p in compiled.passes] == ["fold-bn", "fuse-product"]
    assert [r.pass_name for r in rows] == ["(trace)", "fold-bn", "fuse-product"]
    assert rows[1].result.notes[0] == "inserted before fuse-product, which needs bn-folded (auto_prereqs)"
    assert all(r.check.passed for r in rows)  # the inserted pass is checked like any other
    gm = compiled.graph_module
    assert len(_fused(gm)) == 4 and not _products(gm)
    assert not rows[-1].result.skipped and not rows[-1].result.unmet
    with torch.no_grad():
        ref = model(x)
    assert (compiled(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_the_default_pipeline_meets_every_requirement():
    compiled = qlfx.compile(_model(), example_inputs=(torch.randn(1, 3, 32, 32),))
    assert all(not r.result.unmet for r in compiled.report.rows if r.result is not None)
    assert "needs" not in str(compiled.report)


def test_sparsify_alone_names_the_streams_a_bn_pins_and_fold_bn_gives_them_back():
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(_model(), "sparsify<method=qr>", example_inputs=(x,))
    row = compiled.report.rows[-1]
    pinned = [s for s in row.result.skipped if s.needs is BN_FOLDED]
    # stages 2-4: the hardball stream (skip BN + conv3 BN) is O(C) once folded, monomial before
    assert len(pinned) == 3 and all("folded it is O" in s.reason for s in pinned)
    assert not row.result.stats["triangularised"]
    assert "sparsify needs fold-bn first (3 spaces are blocked by a BN)" in str(compiled.report)
    folded = qlfx.compile(_model(), "fold-bn,sparsify<method=qr>", example_inputs=(x,))
    result = folded.report.rows[-1].result
    assert not result.unmet and not [s for s in result.skipped if s.needs is BN_FOLDED]
    assert len(result.stats["triangularised"]) >= 3  # what the BNs blocked is now done


class _PointwisePairBehindABN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = torch.nn.Conv2d(8, 16, 1), torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(self.bn(self.c1(x)))


def test_merge_pointwise_says_a_bn_hides_the_pair_and_merges_it_after_fold_bn():
    model = randomize_batchnorm(_PointwisePairBehindABN(), seed=3).eval()
    x = torch.randn(1, 8, 5, 5)
    row = qlfx.compile(model, "merge-pointwise", example_inputs=(x,)).report.rows[-1]
    (skip,) = row.result.skipped
    assert skip.needs is BN_FOLDED and "batchnorm" in skip.reason and not row.result.changed
    assert row.result.unmet[0].message == "merge-pointwise needs fold-bn first (1 conv pair is blocked by a BN)"
    compiled = qlfx.compile(model, "merge-pointwise", example_inputs=(x,), auto_prereqs=True)
    assert compiled.report.rows[-1].result.changed
    convs = [n for n in compiled.graph_module.graph.nodes if ir.ConvCall.of(n) is not None]
    assert len(convs) == 1
    with torch.no_grad():
        ref = model(x)
    assert (compiled(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


class _ProductOfAnUnfoldableBN(torch.nn.Module):
    """z = BN(h), h = conv(u) also read elsewhere: fold-bn cannot fold the BN (no rule applies), so it
    still blocks the product z[:, :4] * z[:, 4:] after fold-bn ran."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, u):
        h = self.conv(u)
        z = self.bn(h)
        return z[:, :4] * z[:, 4:] + h[:, :4]


def test_what_the_establishing_pass_left_is_reported_and_it_is_not_run_again():
    model = randomize_batchnorm(_ProductOfAnUnfoldableBN(), seed=1).eval()
    compiled = qlfx.compile(model, "fold-bn,fuse-product", example_inputs=(torch.randn(1, 4, 6, 6),),
                            auto_prereqs=True)
    assert [p.name for p in compiled.passes] == ["fold-bn", "fuse-product"]
    (unmet,) = compiled.report.rows[-1].result.unmet
    assert unmet.blocked == 1 and unmet.establisher_ran
    assert unmet.message == ("fuse-product needs bn-folded, which fold-bn left unmet (1 product is blocked by a BN; "
                             "see fold-bn's skipped notes)")
    assert compiled.report.rows[1].result.skipped  # and fold-bn says why it left the BN


class _LeavesADeadNode(Pass):
    name = "test-leaves-dead-node"
    description = "test pass: adds a relu of the input that nothing reads"

    def run(self, gm, ctx):
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(x):
            ir.call(gm, aten.relu.default, (x,), like=x)
        return PassResult(changed=True)


class _Needs(Pass):
    """A test pass that only declares requirements (and so names no site they blocked)."""

    name = "test-needs"
    description = "test pass: declares requirements, changes nothing"
    site_noun = "conv"

    def __init__(self, *requires):
        super().__init__()
        self.requires = requires

    def run(self, gm, ctx):
        return PassResult(changed=False)


def test_an_unmet_requirement_no_site_names_is_reported_with_the_graph_count():
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(_model(), [_LeavesADeadNode(), _Needs(NO_DEAD_CODE)], example_inputs=(x,))
    assert compiled.report.rows[-1].result.notes == [
        "test-needs needs dce first (the graph has 1 dead node; no conv was skipped for one)"]


def test_auto_prereqs_inserts_each_establishing_pass_once():
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(_model(), [_LeavesADeadNode(), _Needs(NO_DEAD_CODE), _Needs(NO_DEAD_CODE, BN_FOLDED)],
                            example_inputs=(x,), auto_prereqs=True)
    assert [p.name for p in compiled.passes] == ["test-leaves-dead-node", "dce", "test-needs", "fold-bn",
                                                 "test-needs"]
    assert all(not r.result.unmet for r in compiled.report.rows[1:])
    assert not NO_DEAD_CODE.violations(compiled.graph_module) and BN_FOLDED.met(compiled.graph_module)


def test_a_requirement_no_pass_establishes_says_what_to_do_instead():
    compiled = qlfx.compile(_model(), [_Needs(STATIC_SHAPES)], example_inputs=(torch.randn(2, 3, 32, 32),),
                            dynamic_batch=True, auto_prereqs=True)
    assert [p.name for p in compiled.passes] == ["test-needs"]  # nothing to insert
    (note,) = compiled.report.rows[-1].result.notes
    assert note.startswith("test-needs needs static-shapes: capture with static shapes (drop dynamic_batch")
    # captured with static shapes the requirement holds, and nothing is said
    static = qlfx.compile(_model(), [_Needs(STATIC_SHAPES)], example_inputs=(torch.randn(2, 3, 32, 32),))
    assert not static.report.rows[-1].result.notes and STATIC_SHAPES.met(static.graph_module)


def test_constants_folded_is_what_constant_fold_establishes():
    """The predicate agrees with the pass: what constant-fold stores is what constants-folded flags."""
    model = create_model("qlnet-eq3-tiny").eval()  # the shared kernel w.repeat(C, 1, 1, 1) per block
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.trace(model, (x,))
    flagged = CONSTANTS_FOLDED.violations(gm)
    assert flagged and all(ir.op_name(n) == "repeat" for n in flagged)
    folded = qlfx.compile(model, "constant-fold", example_inputs=(x,)).graph_module
    assert CONSTANTS_FOLDED.met(folded)


# ------------------------------------------------------------------------ held-out calibration (12.5)
class ShiftLogits(Pass):
    """A lossy pass that adds ``shift * max|x|`` (x: the input) to the class scores and records the
    calibration it was given: its error relative to max|ref| grows with the input's magnitude."""

    name = "shift-logits"
    description = "lossy on purpose"
    contract = "lossy"
    option_defaults = {"budget": None, "accuracy_drop": None, "shift": 0.0}
    seen: list = []

    def run(self, gm, ctx):
        ShiftLogits.seen = list(ctx.search_calibration)
        out = gm.graph.output_node()
        (logits,) = ir.output_values(gm)
        x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.users)
        with gm.graph.inserting_before(out):
            size = ir.call(gm, aten.amax.default, (ir.call(gm, aten.abs.default, (x,)), [0, 1, 2, 3]))
            term = ir.call(gm, aten.mul.Scalar, (size, float(self.options["shift"])))
            shifted = ir.call(gm, aten.add.Tensor, (logits, term), like=logits)
        out.args = ((shifted,),)
        return PassResult(changed=True)


def test_calibration_split_is_deterministic_and_evenly_spaced():
    from qlfx.errors import UsageError
    from qlfx.pass_manager import PassContext

    def ctx(n, **config):
        sets = [(torch.full((1, 2), float(i)),) for i in range(n)]
        return PassContext(example_inputs=sets[0] if sets else (torch.zeros(1, 2),), calibration=sets,
                           labels=[torch.tensor([i]) for i in range(n)], config=config)

    assert ctx(1).holdout_indices == [] and len(ctx(1).search_calibration) == 1 and ctx(1).holdout_calibration == []
    assert ctx(2).holdout_indices == [1]
    assert ctx(8).holdout_indices == [3, 7]  # a quarter, every 4th, ending at the last set
    assert ctx(64).holdout_indices == list(range(3, 64, 4))
    assert ctx(8, holdout=0.5).holdout_indices == [1, 3, 5, 7]
    assert ctx(8, holdout=0).holdout_indices == [] and len(ctx(8, holdout=0).search_calibration) == 8
    c = ctx(8)
    search = [int(s[0][0, 0]) for s in c.search_calibration]
    assert search == [0, 1, 2, 4, 5, 6] and [int(y) for y in c.search_labels] == search  # labels stay aligned
    assert [int(y) for y in c.holdout_labels] == [int(s[0][0, 0]) for s in c.holdout_calibration] == [3, 7]
    with pytest.raises(UsageError, match="fraction of calibration sets"):
        ctx(8, holdout=1.5).holdout_indices


def _shift_setup():
    """4 single-sample calibration sets, the last (the held-out one) scaled up 20x; per set, the
    ratio max|x| / max|class scores| that ShiftLogits's relative error is proportional to."""
    model = _model()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x[3] *= 20
    with torch.no_grad():
        ratios = [float(x[i].abs().max() / model(x[i:i + 1]).abs().max()) for i in range(4)]
    return model, x, ratios


def test_a_lossy_budget_is_checked_on_the_search_sets_and_reported_on_held_out_ones():
    from qlfx.pass_manager import HeldOutBudgetWarning

    model, x, ratios = _shift_setup()
    held = 3  # of 4 sets of one sample, the last is held out
    assert ratios[held] > 2 * max(ratios[:3])
    budget = 0.01
    # shift * ratio is within the budget on every search set, beyond it on the held-out one
    shift = budget / (max(ratios[:3]) * ratios[held]) ** 0.5
    with pytest.warns(HeldOutBudgetWarning, match="EXCEEDS the budget"):
        c = qlfx.compile(model, passes=[ShiftLogits(budget=budget, shift=shift)], example_inputs=(x[:1],),
                         calibration=x, verify_inputs=0)
    assert len(ShiftLogits.seen) == 3 and not any(torch.equal(s[0], x[held:held + 1]) for s in ShiftLogits.seen)
    check = c.report.rows[-1].check
    assert check.passed and check.needed <= budget and check.inputs_checked == 3
    assert check.holdout.inputs_checked == 1 and not check.holdout.passed
    assert check.holdout.needed == pytest.approx(shift * ratios[held], rel=1e-3)
    assert "held-out: err/max|ref|" in str(c.report) and "EXCEEDS" in str(c.report)
    row = c.report.to_dict()[-1]
    assert row["holdout"]["passed"] is False and row["holdout"]["sets"] == 1
    # within the budget on the held-out set too: no warning, the verdict says so
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", HeldOutBudgetWarning)
        c = qlfx.compile(model, passes=[ShiftLogits(budget=budget, shift=0.9 * budget / ratios[held])],
                         example_inputs=(x[:1],), calibration=x, verify_inputs=0)
    assert c.report.rows[-1].check.holdout.passed and "within the budget" in str(c.report)
    # a search-set error beyond the budget still fails the pass
    with pytest.raises(qlfx.EquivalenceError):
        qlfx.compile(model, passes=[ShiftLogits(budget=budget, shift=2 * budget / min(ratios[:3]))],
                     example_inputs=(x[:1],), calibration=x, verify_inputs=0)


def test_held_out_accuracy_is_reported_and_a_single_set_cannot_be_split():
    model = _model()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1)
    c = qlfx.compile(model, passes=[ShiftLogits(accuracy_drop=0.0, shift=0.1)], example_inputs=(x[:1],),
                     calibration=x, labels=y, verify_inputs=0)
    check = c.report.rows[-1].check
    assert check.accuracy.samples == 6 and check.holdout.accuracy.samples == 2  # sets 3 and 7 held out
    assert check.holdout.accuracy.drop == 0.0 and check.holdout.passed
    # one calibration set of 8 samples: nothing to hold out; said once for the run, not per lossy pass
    c = qlfx.compile(model, passes=[ShiftLogits(budget=0.5, shift=1e-3), ShiftLogits(budget=0.5, shift=1e-3)],
                     example_inputs=(x,), calibration=x, verify_inputs=0)
    assert all(r.check.holdout is None for r in c.report.rows[1:])
    assert str(c.report).count("no held-out calibration: there is a single calibration set") == 1
    assert len(ShiftLogits.seen) == 1
