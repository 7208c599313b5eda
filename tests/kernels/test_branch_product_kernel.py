"""Tests of the fused branch-product kernel (qlfx.kernels): math against torch, CUDA codegen, tuning DB.

Every numeric test uses random weights and biases on odd sizes (Cin=24, M=40, 7x9 ...) so that
padding of M to the 16-wide weight block, pixel tiles that cross rows, and stride-2 indexing are all
exercised; a wrong index or a dropped bias changes the output by O(1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

tvm = pytest.importorskip("tvm")

from qlfx.kernels import branch_product as bp  # noqa: E402
from qlfx.kernels import tuning  # noqa: E402
from qlfx.kernels.branch_product import (  # noqa: E402
    BranchProductSpec,
    LlvmKnobs,
    build_branch_product,
    cuda_target,
    llvm_knob_choices,
    pack_weights,
)
from qlfx.kernels.tuning import TuningDatabaseError, tune_branch_product  # noqa: E402


def random_problem(spec: BranchProductSpec, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.input_shape, generator=gen)
    weight_a = torch.randn(spec.weight_a_shape, generator=gen) / spec.in_channels**0.5
    weight_b = None if spec.kind == "conv1x1" else torch.randn(spec.weight_b_shape, generator=gen) / spec.in_channels**0.5
    bias_a = torch.randn(spec.out_channels, generator=gen) if spec.has_bias_a else None
    bias_b = torch.randn(spec.weight_b_shape[0], generator=gen) if spec.has_bias_b else None
    return x, weight_a, bias_a, weight_b, bias_b


def torch_reference(spec: BranchProductSpec, x, weight_a, bias_a, weight_b, bias_b) -> np.ndarray:
    if spec.kind == "separable":  # conv1x1(clamp(depthwise(x repeated))), in float64
        x = x.double().repeat_interleave(spec.depth_multiplier, 1)
        hidden = F.conv2d(x, weight_b.double(), None if bias_b is None else bias_b.double(), stride=spec.stride,
                          padding=spec.padding_b, dilation=spec.dilation_b, groups=spec.mid_channels)
        hidden = hidden.clamp(spec.clamp_min, spec.clamp_max) if {spec.clamp_min, spec.clamp_max} != {None} else hidden
        return F.conv2d(hidden, weight_a.double(), None if bias_a is None else bias_a.double()).float().numpy()
    a = F.conv2d(x.double(), weight_a.double(), None if bias_a is None else bias_a.double(), stride=spec.stride)
    if spec.kind == "conv1x1":
        return a.float().numpy()
    b = F.conv2d(
        x.double(), weight_b.double(), None if bias_b is None else bias_b.double(), stride=spec.stride,
        padding=spec.padding_b, dilation=spec.dilation_b, groups=spec.groups_b,
    )
    return (a * b).float().numpy()


def assert_matches_torch(spec: BranchProductSpec, kernel, seed: int = 0) -> None:
    problem = random_problem(spec, seed)
    if spec.has_residual:  # out = op(x) + residual
        residual = torch.randn(spec.output_shape, generator=torch.Generator().manual_seed(seed + 1))
        got = kernel(*problem, residual=residual)
        want = torch_reference(spec, *problem) + residual.numpy()
    else:
        got = kernel(*problem)
        want = torch_reference(spec, *problem)
    assert got.shape == want.shape == spec.output_shape
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(np.abs(want).max()))


# ----------------------------------------------------------------------------------- the spec
def test_spec_shapes_and_flops():
    spec = BranchProductSpec(2, 24, 7, 9, 40, "pointwise", stride=2)
    assert spec.output_shape == (2, 40, 4, 5)
    assert spec.padded_out_channels == 48
    assert spec.flops == 2 * (2 * 40 * 20 * 24) * 2 + 2 * 40 * 20
    dw = BranchProductSpec(1, 8, 7, 9, 32, "depthwise")
    assert (dw.kernel_size_b, dw.padding_b, dw.groups_b, dw.depth_multiplier) == (3, 1, 8, 4)
    assert dw.weight_b_shape == (32, 1, 3, 3)
    assert dw.flops == 2 * (32 * 63 * 8 + 32 * 63 * 9) + 32 * 63
    one = BranchProductSpec(1, 8, 7, 9, 32, "conv1x1", stride=2, has_bias_b=False)
    assert one.output_shape == (1, 32, 4, 5) and one.packed_weight_b_shape is None and one.operands == 1
    assert one.flops == 2 * 32 * 20 * 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="depthwise", out_channels=30), "multiple of in_channels"),
        (dict(kind="depthwise", padding_b=0), "disagree on the output size"),
        (dict(kind="pointwise", kernel_size_b=3), "pointwise branch product needs"),
        (dict(kind="conv"), "must be one of pointwise, depthwise, conv1x1"),
        (dict(kind="conv1x1"), "no b branch"),  # has_bias_b defaults to True
        (dict(kind="conv1x1", has_bias_b=False, kernel_size_b=3), "no b branch"),
    ],
)
def test_spec_rejects_inconsistent_shapes(kwargs, message):
    base = dict(batch=1, in_channels=8, height=7, width=9, out_channels=32)
    with pytest.raises(ValueError, match=message):
        BranchProductSpec(**{**base, **kwargs})


def test_pack_weights_layout():
    spec = BranchProductSpec(1, 3, 4, 4, 20, "pointwise", has_bias_b=False)
    x, wa, ba, wb, bb = random_problem(spec)
    packed = pack_weights(spec, wa, ba, wb, bb)
    assert [p.shape for p in packed] == [(2, 3, 16), (20,), (2, 3, 16)]
    assert packed[0][1, 2, 3] == wa[19, 2, 0, 0]
    assert np.all(packed[0][1, :, 4:] == 0)  # rows 20..31 are padding
    with pytest.raises(ValueError, match="bias_a is None"):
        pack_weights(spec, wa, None, wb, None)


# ---------------------------------------------------------------------------- llvm numerics
ODD_SPECS = [
    BranchProductSpec(1, 24, 7, 9, 40, "pointwise"),
    BranchProductSpec(2, 24, 7, 9, 40, "pointwise", stride=2, has_bias_a=False),
    BranchProductSpec(1, 24, 7, 9, 40, "pointwise", has_bias_a=False, has_bias_b=False),
    BranchProductSpec(1, 10, 7, 9, 40, "depthwise"),
    BranchProductSpec(2, 10, 7, 9, 40, "depthwise", stride=2, has_bias_b=False),
    BranchProductSpec(1, 24, 9, 7, 48, "depthwise", stride=2, has_bias_a=False, has_bias_b=False),
    BranchProductSpec(1, 8, 11, 6, 32, "depthwise", dilation_b=2),
    BranchProductSpec(1, 24, 7, 9, 40, "conv1x1", has_bias_b=False),
    BranchProductSpec(2, 24, 7, 9, 40, "conv1x1", stride=2, has_bias_a=False, has_bias_b=False),
    BranchProductSpec(2, 24, 7, 9, 40, "conv1x1", stride=2, has_bias_b=False, has_residual=True),
    BranchProductSpec(1, 24, 7, 9, 40, "pointwise", has_residual=True),
    BranchProductSpec(1, 10, 7, 9, 40, "depthwise", stride=2, has_residual=True),
    BranchProductSpec(1, 8, 6, 10, 24, "separable", mid_channels=16),  # PDEBlock: 2x repeat, dw, 1x1
    BranchProductSpec(2, 8, 7, 9, 40, "separable", stride=2, has_bias_a=False, clamp_min=0.0, clamp_max=6.0),
    BranchProductSpec(1, 8, 11, 6, 32, "separable", mid_channels=32, dilation_b=2, has_bias_b=False, clamp_min=0.0,
                      has_residual=True),
    BranchProductSpec(1, 4, 9, 9, 16, "separable", kernel_size_b=5, padding_b=2, clamp_min=-1.0, clamp_max=1.0),
]


def test_separable_spec_and_knobs():
    spec = BranchProductSpec(1, 8, 6, 10, 24, "separable", mid_channels=16, stride=2)
    assert spec.weight_a_shape == (24, 16, 1, 1) and spec.weight_b_shape == (16, 1, 3, 3)
    assert spec.packed_weight_a_shape == (2, 16, 16) and spec.output_shape == (1, 24, 3, 5)
    assert spec.flops == 2 * 24 * 16 * 15 + 2 * 16 * 15 * 9
    choices = llvm_knob_choices(spec)
    assert choices["pixel_outer"] == [1] and choices["p_tile"] == [5]  # tiles within one output row
    with pytest.raises(ValueError, match="multiple of in_channels"):
        BranchProductSpec(1, 8, 6, 10, 24, "separable", mid_channels=12)
    with pytest.raises(ValueError, match="belong to kind='separable'"):
        BranchProductSpec(1, 8, 6, 10, 24, "conv1x1", has_bias_b=False, clamp_min=0.0)
    with pytest.raises(ValueError, match="pixel_outer=0 is not one of"):
        build_branch_product(spec, knobs=LlvmKnobs(1, 5, 0))


def test_residual_is_an_argument_exactly_when_the_spec_has_one():
    spec = BranchProductSpec(1, 8, 4, 4, 16, "conv1x1", has_bias_b=False, has_residual=True)
    kernel = build_branch_product(spec)
    problem = random_problem(spec)
    with pytest.raises(ValueError, match="residual= exactly when"):
        kernel(*problem)
    assert spec.name().endswith("_residual") and spec != dataclasses.replace(spec, has_residual=False)


@pytest.mark.parametrize("spec", ODD_SPECS, ids=lambda s: s.name())
def test_llvm_kernel_matches_torch(spec):
    assert_matches_torch(spec, build_branch_product(spec))


@pytest.mark.parametrize("kind", ["pointwise", "depthwise", "conv1x1", "separable"])
def test_llvm_kernel_every_knob_value(kind):
    """Each value of each knob once (m_vecs 1/2/4, pixel tiles that cross rows, both loop orders;
    depthwise and separable: tiles within a row; separable: pixel tiles outer)."""
    spec = BranchProductSpec(1, 16, 6, 10, 64, kind, has_bias_b=False)  # 60 pixels, rows of 10
    choices = llvm_knob_choices(spec)
    assert choices["m_vecs"] == [1, 2, 4]
    if kind in ("depthwise", "separable"):  # tiles within one row of 10
        assert choices["p_tile"] == [2, 5, 10]
        orders = choices["pixel_outer"]
        configs = {LlvmKnobs(m, p, orders[i % len(orders)]) for i, (m, p) in enumerate([(1, 2), (2, 5), (4, 10)])}
    else:
        assert 4 in choices["p_tile"] and 12 in choices["p_tile"]
        configs = {LlvmKnobs(m, p, o) for m, p, o in [(1, 4, 0), (2, 12, 1), (4, 3, 0), (1, 20, 1)]}
    for knobs in sorted(configs, key=str):
        assert_matches_torch(spec, build_branch_product(spec, knobs=knobs), seed=hash(knobs) % 1000)


@pytest.mark.parametrize(
    "spec",
    [BranchProductSpec(None, 24, 7, 9, 40, "pointwise", stride=2),
     BranchProductSpec(None, 10, 7, 9, 40, "depthwise", has_bias_b=False)],
    ids=lambda s: s.name(),
)
def test_symbolic_batch_kernel_runs_at_any_batch_size(spec):
    """batch=None: one kernel for every batch size (graphs captured with dynamic_batch), scheduled with
    the knobs of a static batch."""
    assert spec.input_shape[0] is None and "_nany_" in spec.name()
    static = spec.with_batch(3)
    kernel = build_branch_product(spec, knobs=bp.default_llvm_knobs(static))
    for batch in (1, 3, 8):
        sized = spec.with_batch(batch)
        problem = random_problem(sized, seed=batch)
        got = kernel(*problem)
        want = torch_reference(sized, *problem)
        assert got.shape == want.shape == sized.output_shape
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(np.abs(want).max()))


def test_symbolic_batch_cuda_kernel_builds():
    spec = BranchProductSpec(None, 10, 7, 9, 40, "depthwise", stride=2)
    source = build_branch_product(spec, cuda_target("sm_90a")).mod.imports[0].inspect_source()
    assert len(_kernel_bodies(source)) == 1 and "blockIdx.x" in source


def test_invalid_knobs_are_rejected_with_the_allowed_values():
    spec = BranchProductSpec(1, 16, 7, 7, 32, "pointwise")
    with pytest.raises(ValueError, match=r"p_tile=5 is not one of the allowed values \[7\]"):
        build_branch_product(spec, knobs=LlvmKnobs(1, 5, 0))


def test_kernel_reads_a_real_product_not_a_sum():
    """The epilogue multiplies the two branches: zeroing branch b must zero the output (biases off)."""
    spec = BranchProductSpec(1, 24, 5, 5, 40, "pointwise", has_bias_a=False, has_bias_b=False)
    x, wa, _, wb, _ = random_problem(spec)
    out = build_branch_product(spec)(x, wa, None, torch.zeros_like(wb), None)
    assert np.all(out == 0)


# ------------------------------------------------------------------------------------- cuda
def _kernel_bodies(source: str) -> list[str]:
    """The bodies of the __global__ functions defined in a CUDA source."""
    bodies = []
    for chunk in source.split("__global__")[1:]:
        head, brace, rest = chunk.partition("{")
        if ";" in head:  # a declaration, not a definition
            continue
        bodies.append(rest)
    return bodies


@pytest.mark.parametrize(
    "spec",
    [BranchProductSpec(1, 24, 7, 9, 40, "pointwise"), BranchProductSpec(1, 10, 7, 9, 40, "depthwise", stride=2)],
    ids=lambda s: s.kind,
)
def test_cuda_builds_one_fused_kernel(spec):
    executable = build_branch_product(spec, cuda_target("sm_90a"))
    source = executable.mod.imports[0].inspect_source()
    bodies = _kernel_bodies(source)
    assert len(bodies) == 1, "the reduction and the product must be one kernel"
    body = bodies[0]
    assert "threadIdx.x" in body and "blockIdx.x" in body
    assert "acc_local" in body and "for (int" in body  # the reduction accumulates in registers ...
    assert "out_ptr[" in body  # ... and the same kernel writes the product
    assert "weight_a_ptr" in body and "weight_b_ptr" in body
    if spec.kind == "depthwise":
        assert "dw_local" in body


# ------------------------------------------------------------------------------------ tuning
TINY = BranchProductSpec(1, 16, 6, 6, 32, "pointwise", has_bias_a=False)


def test_tuning_then_reuse_from_database(tmp_path, monkeypatch):
    db = str(tmp_path / "db")
    reports = []
    first = tune_branch_product(TINY, None, 4, db, progress=lambda *r: reports.append(r))
    assert first.trials_run == 4
    assert reports and reports[-1][:2] == (4, 4) and reports[-1][2] > 0
    assert all(b[0] >= a[0] and b[2] >= a[2] for a, b in zip(reports, reports[1:]))
    assert first.best_gflops == pytest.approx(TINY.flops / first.best_seconds / 1e9)
    assert sorted(os.listdir(db)) == ["database_tuning_record.json", "database_workload.json", "logs"]
    assert_matches_torch(TINY, first.build())

    # Second call: served from the database; no tuning machinery may even be constructed.
    def no_tuning(*args, **kwargs):
        raise AssertionError("the second call must not tune")

    monkeypatch.setattr(tuning, "_tune_context", no_tuning)
    monkeypatch.setattr(tuning.ms.tune, "tune_tasks", no_tuning)
    start = time.perf_counter()
    again = tune_branch_product(TINY, None, 4, db)
    assert time.perf_counter() - start < 1.0
    assert again.trials_run == 0
    assert again.knobs == first.knobs and again.best_seconds == first.best_seconds
    tvm.ir.assert_structural_equal(again.primfunc, first.primfunc)
    assert_matches_torch(TINY, again.build(), seed=1)


def test_tuning_a_separable_kernel_searches_its_one_loop_order(tmp_path):
    spec = BranchProductSpec(1, 8, 6, 10, 32, "separable", mid_channels=16, clamp_min=0.0)
    tuned = tune_branch_product(spec, None, 3, str(tmp_path))
    assert tuned.trials_run == 3 and tuned.knobs.pixel_outer == 1
    assert_matches_torch(spec, tuned.build())


def test_tuning_stores_the_untuned_schedule_as_the_record_to_beat(tmp_path, monkeypatch):
    """The default knobs are measured and stored before the search: with a search that measures
    nothing, the database's best record is the untuned schedule (so a tuned build is never slower
    than an untuned one, however few trials the search gets)."""
    monkeypatch.setattr(tuning.ms.tune, "tune_tasks", lambda *args, **kwargs: None)
    spec = BranchProductSpec(1, 16, 6, 6, 32, "conv1x1", has_bias_b=False)
    tuned = tune_branch_product(spec, None, 4, str(tmp_path))
    assert tuned.knobs == bp.default_llvm_knobs(spec, target=tuned.target)
    assert tuned.best_seconds > 0
    assert_matches_torch(spec, tuned.build())


def test_tuned_kernel_exposes_knobs_that_rebuild_the_same_schedule(tmp_path):
    spec = BranchProductSpec(1, 10, 5, 6, 40, "depthwise", stride=1)
    tuned = tune_branch_product(spec, None, 3, str(tmp_path))
    assert 1 <= tuned.trials_run <= 3
    hand, used = bp.schedule_branch_product(spec, tuned.target, tuned.knobs)
    assert used == tuned.knobs
    tvm.ir.assert_structural_equal(hand, tuned.primfunc)
    assert_matches_torch(spec, tuned.build())


def test_corrupted_record_file_names_the_file_and_says_to_delete_it(tmp_path):
    db = str(tmp_path)
    tune_branch_product(TINY, None, 1, db)
    record_file = os.path.join(db, tuning.RECORD_FILE)
    with open(record_file, "a", encoding="utf-8") as handle:
        handle.write('[0, {"trace": [[["SampleCat\n')  # a write cut short
    with pytest.raises(TuningDatabaseError) as error:
        tune_branch_product(TINY, None, 1, db)
    assert record_file in str(error.value) and "Delete" in str(error.value)


def test_wellformed_json_that_is_not_a_record_is_reported(tmp_path):
    (tmp_path / tuning.WORKLOAD_FILE).write_text(json.dumps(["not", "a", "workload"]) + "\n")
    with pytest.raises(TuningDatabaseError, match="cannot be loaded by MetaSchedule.*Delete"):
        tune_branch_product(TINY, None, 1, str(tmp_path))


def test_tuning_a_symbolic_batch_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"static batch size, e.g. spec.with_batch\(1\)"):
        tune_branch_product(TINY.with_batch(None), None, 2, str(tmp_path))


def test_cuda_tuning_without_a_gpu_runner_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="needs a runner"):
        tune_branch_product(TINY, cuda_target(), 2, str(tmp_path))
