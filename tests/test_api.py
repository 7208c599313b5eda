"""compile(): the user's model is never touched; bad input gets a clear error."""
import copy

import pytest
import torch
import torch.nn as nn

import qlfx
from qlfx.models import qlnet_eq3, randomize_batchnorm


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


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


def test_untraceable_model_names_module_and_says_what_to_do():
    with pytest.raises(qlfx.TraceError) as info:
        qlfx.compile(Untraceable().eval(), example_inputs=(torch.randn(1, 3),))
    msg = str(info.value)
    assert "'inner' (Branchy)" in msg and "leaf" in msg and "control flow" in msg
    compiled = qlfx.compile(Untraceable().eval(), example_inputs=(torch.randn(1, 3),), leaf_modules=[Branchy])
    x = torch.ones(1, 3)
    assert torch.equal(compiled(x), x * 2)


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
    ops = {n.op for n in gm.graph.nodes}
    assert "call_module" in ops  # the radial activations stay leaves
    for n in gm.graph.nodes:
        if n.op == "call_module":
            assert type(gm.get_submodule(n.target)).__name__ in ("Softball", "Hardball")
    convs = [n for n in gm.graph.nodes if n.target is torch.conv2d]
    assert convs and all(n.meta["tensor_meta"].shape[0] == 2 for n in convs)
