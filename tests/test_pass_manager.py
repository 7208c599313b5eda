"""The pass manager: registry, pipelines, verification after every pass, instruments."""
import io

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import qlfx
from passtools import ExactButPerturbs
from qlfx import instruments as ins
from qlfx import ir
from qlfx.models import qlnet, randomize_batchnorm
from qlfx.pass_manager import Pass, PassResult, parse_pipeline

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
