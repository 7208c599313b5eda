"""compile(): the user's model is never touched; bad input gets a clear error."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

import qlfx
from qlfx.models import qlnet_eq3, randomize_batchnorm

aten = torch.ops.aten


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_users_model_is_unchanged_after_compile():
    model = randomize_batchnorm(qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)).eval()
    before = _state(model)
    modules_before = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 32, 32)
    compiled = qlfx.compile(model, passes="fold-bn,constant-fold,dce", example_inputs=(x,))
    after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [type(m) for m in model.modules()] == modules_before
    assert not model.training
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=0, atol=1e-4 * model(x).abs().max().item())


class CachesRadius(nn.Module):
    """Research-code style: the forward writes an attribute on first use (the authors'
    ``if self.radius is None: self.radius = ...``), and has batchnorm and a Hardball module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = qlfx.models.Hardball()
        self.radius = None

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        if self.radius is None:
            self.radius = np.sqrt(h.size()[1])
        norm = torch.sqrt((h * h).sum(1, keepdim=True))
        return torch.where(norm > self.radius, self.radius * h / norm, h)


def test_forward_that_writes_attributes_leaves_the_users_model_untouched():
    model = randomize_batchnorm(CachesRadius(), seed=3).eval()
    before = _state(model)
    params = {k: id(v) for k, v in model.named_parameters()}
    x = torch.randn(2, 3, 6, 6)
    compiled = qlfx.compile(model, passes="fold-bn,constant-fold,dce", example_inputs=(x,), dynamic_batch=True)
    assert model.radius is None  # qlfx ran the forward on copies only
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == model.state_dict().keys()
    assert {k: id(v) for k, v in model.named_parameters()} == params
    assert [type(m) for m in model.modules()] == [CachesRadius, nn.Conv2d, nn.BatchNorm2d, qlfx.models.Hardball]
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


def test_untraceable_model_names_module_and_says_what_to_do():
    """No leaf modules with torch.export: a data-dependent branch is a TraceError that says what
    torch.export said, the module path and source line, and what to do instead."""
    model = Untraceable().eval()
    with pytest.raises(qlfx.TraceError) as info:
        qlfx.compile(model, example_inputs=(torch.randn(1, 3),))
    msg = str(info.value)
    assert msg.startswith("torch.export could not capture the model: ")
    assert "data-dependent" in msg.lower()  # what torch.export said
    assert "module 'inner' (Branchy), test_api.py:" in msg and "`if x.sum() > 0:  # data-dependent control flow`" in msg
    assert "What to do:" in msg and "torch.where" in msg and "torch.cond" in msg
    assert isinstance(info.value, qlfx.UsageError)  # the CLI's exit 2
    # the same code written with tensor ops captures and computes the same function
    class Traceable(nn.Module):
        def forward(self, x):
            return torch.where(x.sum() > 0, x * 2, x)

    compiled = qlfx.compile(Traceable().eval(), [], example_inputs=(torch.randn(1, 3),))
    for x in (torch.ones(1, 3), -torch.ones(1, 3)):
        assert torch.equal(compiled(x), model(x))


def test_subpackages_are_attributes_of_qlfx():
    """`import qlfx` alone gives qlfx.models and qlfx.symmetry (in a fresh interpreter: nothing else
    imported them first)."""
    code = ("import qlfx, types; "
            "assert isinstance(qlfx.models, types.ModuleType) and isinstance(qlfx.symmetry, types.ModuleType); "
            "assert callable(qlfx.models.qlnet) and 'models' in dir(qlfx) and 'symmetry' in dir(qlfx); "
            "print(qlfx.models.__name__, qlfx.symmetry.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["qlfx.models", "qlfx.symmetry"]


def test_training_mode_nan_weights_bad_shape_are_clear_errors():
    model = qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)
    with pytest.raises(qlfx.UsageError, match="training mode"):
        qlfx.compile(model, example_inputs=(torch.randn(1, 3, 32, 32),))
    model.eval()
    with pytest.raises(qlfx.UsageError, match=r"example inputs \(\(1, 5, 32, 32\) float32\)"):
        qlfx.compile(model, example_inputs=(torch.randn(1, 5, 32, 32),))
    with pytest.raises(qlfx.UsageError, match="example_inputs is required"):
        qlfx.compile(model)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(qlfx.UsageError, match="NaN or Inf in conv1.weight"):
        qlfx.compile(broken, example_inputs=(torch.randn(1, 3, 32, 32),))


def test_trace_records_shapes_and_functional_form():
    model = qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10).eval()
    gm = qlfx.trace(model, (torch.randn(2, 3, 32, 32),))
    assert {n.op for n in gm.graph.nodes} == {"placeholder", "get_attr", "call_function", "output"}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert all(isinstance(t, torch._ops.OpOverload) for t in targets), set(targets)
    # the radial activations are one node each: qlfx's custom op, not its arithmetic
    assert targets.count(torch.ops.qlfx.softball.default) == 4 and aten.linalg_vector_norm.default not in targets
    convs = [n for n in gm.graph.nodes if n.target is aten.conv2d.default]
    assert convs and all(isinstance(n.meta["val"], FakeTensor) and n.meta["val"].shape[0] == 2 for n in convs)
