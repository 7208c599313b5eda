"""torch.compile(model, backend="qlfx"): qlfx's pipeline on dynamo's graphs, ORT/TVM artifacts, eager fallback."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import qlfx.dynamo as qdynamo
from blocks import randomize
from qlfx.errors import QlfxError
from qlfx.loading import load_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (dynamo caches compiled frames per code object) and sees every
    fallback warning (they are given once per reason)."""
    torch._dynamo.reset()
    qdynamo._warned.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The runners the backend built with qlfx (graphs that fell back are not in the list)."""
    made = []
    real = qdynamo.compile_graph

    def spy(gm, example_inputs, settings):
        runner = real(gm, example_inputs, settings)
        made.append(runner)
        return runner

    monkeypatch.setattr(qdynamo, "compile_graph", spy)
    return made


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_zoo_model_runs_qlfx_onnx_artifact_and_matches_eager(compiled_graphs):
    model = randomize(load_model("qlnet-tiny"), seed=3)  # random weights and random BN statistics
    before = _state(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fast = torch.compile(model, backend="qlfx", dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: qlfx took the graph
        with torch.no_grad():
            out = fast(x)
    with torch.no_grad():
        ref = model(x)
    assert len(compiled_graphs) == 1 and compiled_graphs[0].qlfx_engine == "onnx"
    report = compiled_graphs[0].qlfx_compiled.report
    assert "fold-bn" in str(report)  # the default pipeline ran, with its checks
    assert _rel(out, ref) < 1e-4
    x2 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(fast(x2), model(x2)) < 1e-4  # the artifact, on new values of the same shape
    assert len(compiled_graphs) == 1  # no recompile
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is untouched


def test_a_new_batch_size_recompiles_and_a_dynamic_graph_falls_back_to_eager(compiled_graphs):
    """dynamo marks the batch dynamic on its recompile; qlfx compiles static shapes, so that graph runs
    eagerly (one warning saying why and what to do) and gives the right result. With dynamic=False
    each batch size gets its own qlfx graph."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 4, 1)), seed=5)
    x, x3 = torch.randn(1, 3, 8, 8), torch.randn(3, 3, 8, 8)
    fast = torch.compile(model, backend="qlfx")
    with torch.no_grad():
        assert _rel(fast(x), model(x)) < 1e-4
        with pytest.warns(UserWarning, match="symbolic sizes.*dynamic=False"):
            out3 = fast(x3)
        assert _rel(out3, model(x3)) < 1e-6
    assert len(compiled_graphs) == 1
    torch._dynamo.reset()
    static = torch.compile(model, backend="qlfx", dynamic=False)
    with torch.no_grad():
        assert _rel(static(x), model(x)) < 1e-4 and _rel(static(x3), model(x3)) < 1e-4
    assert len(compiled_graphs) == 3


def test_training_mode_graph_falls_back_and_updates_bn_like_eager():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    fast = torch.compile(model, backend="qlfx")
    with pytest.warns(UserWarning, match="training mode"):
        out = fast(x)
    assert torch.allclose(out, twin(x), atol=1e-5)
    assert torch.allclose(model[1].running_mean, twin[1].running_mean, atol=1e-6)  # eager semantics kept


def test_a_graph_qlfx_fails_on_runs_eagerly_with_the_reason(monkeypatch):
    def broken(gm, example_inputs, settings):
        raise QlfxError("pass fold-bn broke equivalence (as a test)")

    monkeypatch.setattr(qdynamo, "compile_graph", broken)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=2)
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(UserWarning, match="QlfxError: pass fold-bn broke equivalence"):
        with torch.no_grad():
            out = torch.compile(model, backend="qlfx")(x)
    with torch.no_grad():
        assert torch.allclose(out, model(x))


class WithGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.a(x)
        torch._dynamo.graph_break()  # two graphs, each compiled by qlfx
        return self.b(y)


def test_graph_break_gives_two_qlfx_graphs_and_the_right_result(compiled_graphs):
    model = randomize(WithGraphBreak(), seed=7)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        out = torch.compile(model, backend="qlfx", dynamic=False)(x)
        ref = model(x)
    assert len(compiled_graphs) == 2
    assert _rel(out, ref) < 1e-4


def test_unknown_option_is_an_error_not_a_fallback():
    model = nn.Conv2d(3, 3, 1).eval()
    with pytest.raises(Exception, match="unknown qlfx backend option.*known: passes"):
        torch.compile(model, backend="qlfx", options={"pases": "fold-bn"})(torch.randn(1, 3, 4, 4))
    with pytest.raises(Exception, match="engine must be one of onnx, tvm"):
        torch.compile(model, backend="qlfx", options={"engine": "trt"})(torch.randn(1, 3, 4, 4))


@pytest.mark.slow
def test_timm_resnet18_compiled_with_the_qlfx_backend(compiled_graphs):
    timm = pytest.importorskip("timm")
    model = randomize(timm.create_model("resnet18", pretrained=False, num_classes=10), seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = torch.compile(model, backend="qlfx", dynamic=False)(x)
    with torch.no_grad():
        ref = model(x)
    assert len(compiled_graphs) == 1
    assert _rel(out, ref) < 1e-4


@pytest.mark.slow
def test_tvm_engine_on_a_small_convnet(compiled_graphs):
    pytest.importorskip("tvm")
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 4, 1)), seed=9)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        out = torch.compile(model, backend="qlfx", dynamic=False, options={"engine": "tvm"})(x)
        ref = model(x)
    assert compiled_graphs and compiled_graphs[0].qlfx_engine == "tvm"
    assert _rel(out, ref) < 1e-4
