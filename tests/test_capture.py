"""Capture with torch.export: what user code turns into in the ATen IR, and the errors it gives."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

import qlfx
from qlfx import ir
from qlfx.models import randomize_batchnorm

aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class AuthorsStyleBlock(nn.Module):
    """Written the way research code is: size()[1] arithmetic, numpy scalars, in-place residual add,
    a guard, an attribute cached in forward."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4 * c)
        self.conv2 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.radius = None

    def forward(self, x):
        torch._assert(x.ndim == 4, "expects NCHW")
        x0 = x
        h = self.bn1(self.conv1(x))
        half = h.size()[1] // 2
        h = h[:, :half, :, :] * h[:, half:, :, :]
        x = self.conv2(h)
        x += x0
        if self.radius is None:
            self.radius = np.sqrt(x.size()[1])
        norm = torch.sqrt((x * x).sum(1, keepdim=True))
        return torch.where(norm > self.radius, self.radius * x / norm, x)


def test_authors_style_code_captures_into_plain_aten():
    model = randomize_batchnorm(AuthorsStyleBlock(), seed=1).eval()
    x = torch.randn(2, 4, 6, 6)
    gm = qlfx.trace(model, (x,))
    targets = _targets(gm)
    # guards, shape arithmetic and in-place ops are gone; the computed slice bounds are plain ints
    assert all(isinstance(t, torch._ops.OpOverload) for t in targets), targets
    assert aten.add_.Tensor not in targets and aten._assert_async.msg not in targets
    slices = [ir.ChannelSlice.of(n) for n in gm.graph.nodes if ir.is_op(n, aten.slice.Tensor)]
    assert [(s.start, s.stop) for s in slices] == [(0, 8), (8, 16)]
    assert aten.batch_norm.default in targets
    torch.testing.assert_close(gm(x), model(x))
    # the numpy scalar arrived as a Python float argument
    wheres = [n for n in gm.graph.nodes if ir.is_op(n, aten.where.self)]
    assert len(wheres) == 1


def test_user_model_is_not_mutated_even_by_a_forward_that_writes_attributes():
    model = randomize_batchnorm(AuthorsStyleBlock(), seed=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qlfx.trace(model, (torch.randn(1, 4, 6, 6),))
    assert model.radius is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


@pytest.mark.parametrize("form", ["chunk", "split", "split_sizes", "tensor_split", "narrow", "unbind", "index"])
def test_channel_pieces_become_slices(form):
    class Pieces(nn.Module):
        def forward(self, h):
            if form == "chunk":
                a, b = h.chunk(2, 1)
            elif form == "split":
                a, b = torch.split(h, 3, dim=1)
            elif form == "split_sizes":
                a, b = h.split([3, 3], 1)
            elif form == "tensor_split":
                a, b = torch.tensor_split(h, 2, dim=1)
            elif form == "narrow":
                a, b = h.narrow(1, 0, 3), h.narrow(1, 3, 3)
            elif form == "unbind":
                a, b = h.unbind(1)[0], h.unbind(1)[5]
            else:
                a, b = h[:, :h.shape[1] // 2], h[:, h.shape[1] // 2:]
            return a * b

    h = torch.randn(2, 6, 4, 4)
    gm = qlfx.trace(Pieces(), (h,))
    targets = _targets(gm)
    expected = aten.select.int if form == "unbind" else aten.slice.Tensor
    assert set(targets) == {expected, aten.mul.Tensor}, targets
    torch.testing.assert_close(gm(h), Pieces()(h))


def test_conv_same_padding_and_wrapper_modules():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Conv2d(3, 5, 3, padding="same"), nn.ReLU(inplace=True))

        def forward(self, x):
            return self.inner(x) + F.conv2d(x, self.inner[0].weight, padding="valid").mean()

    model = Wrapper().eval()
    x = torch.randn(1, 3, 7, 7)
    gm = qlfx.trace(model, (x,))
    convs = [ir.ConvCall.of(n) for n in gm.graph.nodes if ir.ConvCall.of(n)]
    assert [c.padding for c in convs] == [(1, 1), (0, 0)]
    assert all(c.node.target is aten.conv2d.default for c in convs)
    torch.testing.assert_close(gm(x), model(x))
    assert "inner_0" in {n.name for n in gm.graph.nodes}  # names come from module paths


def test_every_value_has_a_fake_val_and_refresh_follows_a_shape_change():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    gm = qlfx.trace(model, (torch.randn(1, 3, 5, 5),))
    for n in gm.graph.nodes:
        if n.op != "output":
            assert isinstance(n.meta.get("val"), FakeTensor), n
    before = ir.args_snapshot(gm)
    first = next(ir.ConvCall.of(n) for n in gm.graph.nodes if ir.ConvCall.of(n))
    w = ir.get_tensor(gm, first.weight)[:4]
    with gm.graph.inserting_before(first.node):
        first.set_args(weight=ir.constant_node(gm, w, "narrow_weight"),
                       bias=ir.constant_node(gm, ir.get_tensor(gm, first.bias)[:4], "narrow_bias"))
    second = [ir.ConvCall.of(n) for n in gm.graph.nodes if ir.ConvCall.of(n)][1]
    with gm.graph.inserting_before(second.node):
        second.set_args(weight=ir.constant_node(gm, ir.get_tensor(gm, second.weight)[:, :4], "narrow_reader"))
    recomputed = ir.refresh_vals(gm, before)
    assert ir.shape(first.node) == (1, 4, 5, 5)
    relu = next(iter(first.node.users))
    assert ir.shape(relu) == (1, 4, 5, 5)
    assert recomputed < len(gm.graph.nodes)


def test_dynamic_batch_gives_a_symbolic_batch_that_runs_at_any_size():
    model = randomize_batchnorm(AuthorsStyleBlock(), seed=2).eval()
    gm = qlfx.trace(model, (torch.randn(1, 4, 6, 6),), dynamic_batch=True)
    x_val = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    assert isinstance(x_val.shape[0], torch.SymInt) and x_val.shape[1:] == (4, 6, 6)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 4, 6, 6)
        torch.testing.assert_close(gm(x), model(x))


def test_data_dependent_control_flow_gives_a_trace_error_that_says_where_and_what_to_do():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # a Python decision on tensor values
                return x * 2
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy())

        def forward(self, x):
            return self.body(x)

    with pytest.raises(qlfx.TraceError) as info:
        qlfx.trace(Outer().eval(), (torch.randn(1, 3, 4, 4),))
    message = str(info.value)
    assert "torch.export could not capture" in message
    assert "module 'body.1' (Branchy)" in message
    assert "test_capture.py" in message and "if x.sum() > 0" in message
    assert "What to do" in message and "torch.where" in message


def test_bad_example_inputs_are_usage_errors():
    model = nn.Conv2d(3, 3, 1)
    with pytest.raises(qlfx.UsageError, match="example_inputs is required"):
        qlfx.trace(model, None)
    with pytest.raises(qlfx.UsageError, match="needs torch.Tensor inputs"):
        qlfx.trace(model, ([1, 2, 3],))
    with pytest.raises(qlfx.UsageError, match="torch.nn.Module"):
        qlfx.trace(lambda x: x, (torch.randn(1),))
