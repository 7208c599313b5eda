"""qlfx's default CPU schedules (qlfx.kernels.cpu_schedules) and the layered tuning databases
(qlfx.kernels.module_tuning): each rule matches the ops it is for and computes what the unscheduled
TIR computes; packaged records are used for their own target only, the user's records first."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from qlfx.kernels import cpu_schedules as cs  # noqa: E402
from qlfx.kernels import module_tuning as mt  # noqa: E402

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
R = relax.op


def _fused_primfuncs(build) -> dict:
    """Legalized + fused PrimFuncs of a Relax function built by ``build(bb, x)`` on a 1x8x12x12 input."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 12, 12), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(build(bb, x))
        bb.emit_func_output(out)
    mod = bb.get()
    with HOST:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                        relax.transform.FuseTIR()])(mod)
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _const(rng, *shape):
    return relax.const(rng.standard_normal(shape).astype("float32"))


def _conv(stride, padding, kernel, groups, out_channels=16):
    def build(bb, x):
        rng = np.random.default_rng(0)
        weight = _const(rng, out_channels, 8 // groups, kernel, kernel)
        y = bb.emit(R.nn.conv2d(x, weight, strides=stride, padding=padding, groups=groups))
        y = bb.emit(R.add(y, _const(rng, 1, out_channels, 1, 1)))
        return bb.emit(R.nn.relu(y))
    return build


CASES = {
    # name: (Relax builder, the rule that must schedule its one PrimFunc)
    "conv3x3": (_conv(1, 1, 3, 1), cs.ConvNCHW),
    "stem7x7s2": (_conv(2, 3, 7, 1), cs.ConvNCHW),
    "pointwise_s2": (_conv(2, 0, 1, 1), cs.ConvNCHW),
    "depthwise_s2": (_conv(2, 1, 3, 8, out_channels=8), cs.ConvNCHW),
    "depthwise_x2": (_conv(1, 1, 3, 8, out_channels=16), cs.ConvNCHW),
    "grouped": (_conv(1, 1, 3, 4), cs.ConvNCHW),
    "maxpool": (lambda bb, x: bb.emit(R.nn.max_pool2d(x, pool_size=3, strides=2, padding=1)), cs.Reduction),
    "mean": (lambda bb, x: bb.emit(R.mean(x, axis=[2, 3], keepdims=True)), cs.Reduction),
    "channel_norm": (lambda bb, x: bb.emit(R.sum(bb.emit(R.multiply(x, x)), axis=[1], keepdims=True)), cs.Reduction),
    "radial": (lambda bb, x: bb.emit(R.multiply(x, bb.emit(R.rsqrt(bb.emit(R.add(
        bb.emit(R.sum(bb.emit(R.multiply(x, x)), axis=[1], keepdims=True)), relax.const(1.0, "float32"))))))), None),
}


def _run(func, args):
    lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=HOST)
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib(*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_schedules_op_and_matches_unscheduled(case):
    build, expected_rule = CASES[case]
    funcs = _fused_primfuncs(build)
    rng = np.random.default_rng(1)
    for name, func in funcs.items():
        rule = next((r for r in cs.default_rules() if r.apply(func, HOST, False) is not None), None)
        assert rule is not None, f"no rule scheduled {name}"
        if expected_rule is not None and len(funcs) == 1:
            assert isinstance(rule, expected_rule), (name, type(rule).__name__)
        scheduled = rule.apply(func, HOST, False).mod["main"]
        assert "T.parallel" in scheduled.script(), scheduled.script()
        # vector loops wherever the data runs along the inner loop (not: a mean over rows x columns)
        assert case == "mean" or "T.vectorized" in scheduled.script(), scheduled.script()
        # positive inputs: a PrimFunc may take a sum of squares (the radial norm) as its input
        args = [rng.uniform(0.1, 2.0, [int(d) for d in a.shape]).astype("float32")
                for a in ms.arg_info.ArgInfo.from_prim_func(func)]
        expected = _run(func, args)
        actual = _run(scheduled, args)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_strided_conv_reads_contiguous_phases():
    """The stem's padded input is stored phase-split, so the conv loads it without gathers."""
    (func,) = _fused_primfuncs(_conv(2, 3, 7, 1)).values()
    script = cs.ConvNCHW().apply(func, HOST, False).mod["main"].script()
    assert "T.int64(2), T.int64(9)" in script  # pad_temp [1, 8, 18, 2, 9]: 18 columns as 2 phases of 9


def test_conv_tile_fits_the_registers():
    for channels, height, width in [(64, 112, 112), (128, 28, 28), (256, 14, 14), (512, 7, 7), (1024, 7, 7)]:
        for lanes in (8, 16):
            for depthwise in (False, True):
                ft, yt, xt = cs.conv_tile(channels, height, width, lanes, depthwise=depthwise)
                assert channels % ft == 0 and height % yt == 0 and width % xt == 0
                assert ft * yt * -(-xt // lanes) <= cs.ACCUMULATOR_REGISTERS
                assert not depthwise or ft == 1
    assert cs.vector_lanes(AVX2) == 8 and cs.vector_lanes(AVX512) == 16
    # dense convs use whole vectors when they divide the row, with the most FMAs per load (stem: 4x1x16)
    assert cs.conv_tile(64, 112, 112, 8) == (4, 1, 16)
    assert cs.conv_tile(64, 56, 56, 8)[2] % 8 == 0


def test_depthwise_padding_stays_a_stage():
    """The padded input is its own (per-channel) stage: inlined, its bounds test would sit in the
    conv's vector loop and turn every load into a masked gather."""
    (func,) = _fused_primfuncs(_conv(1, 1, 3, 8, out_channels=8)).values()
    sch = cs.ConvNCHW().apply(func, HOST, False)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    assert "pad_temp" in names, names
    conv = sch.get(sch.get_sblock(next(n for n in names if n.endswith("_update"))))
    assert "if_then_else" not in str(conv.body), conv.body


def test_pool_keeps_its_padding_and_leaves_the_strided_row_to_llvm():
    """A max pool's padded input is its own stage (no bounds test in the pool's loop), rows run in
    parallel, and the stride-2 loop along a row is not vectorised (every lane would be a gather)."""
    (func,) = _fused_primfuncs(CASES["maxpool"][0]).values()
    sch = cs.Reduction().apply(func, HOST, False)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    assert "pad_temp" in names, names
    pool = sch.get_sblock("pool_max")
    assert "if_then_else" not in str(sch.get(pool).body)
    loops = [sch.get(loop) for loop in sch.get_loops(pool)]
    assert loops[0].kind == tvm.tirx.ForKind.PARALLEL and loops[0].extent == 8 * 6  # channels x rows
    assert all(loop.kind == tvm.tirx.ForKind.SERIAL for loop in loops[1:])


def test_branch_product_default_tile_fits_avx2():
    from qlfx.kernels import BranchProductSpec, default_llvm_knobs

    spec = BranchProductSpec(batch=1, in_channels=64, height=56, width=56, out_channels=256, kind="pointwise",
                             stride=1, kernel_size_b=1, padding_b=0, dilation_b=1, groups_b=1, has_bias_a=True,
                             has_bias_b=True)
    avx2, avx512 = default_llvm_knobs(spec, target=AVX2), default_llvm_knobs(spec, target=AVX512)
    assert 2 * avx2.m_vecs * avx2.p_tile <= 6 < 2 * avx512.m_vecs * avx512.p_tile <= 16
    # one channel vector, 14 accumulators; p_tile 8 (16 accumulators) lets LLVM vectorise the epilogue into gathers
    assert (avx512.m_vecs, avx512.p_tile, avx512.pixel_outer) == (1, 7, 0)


# ------------------------------------------------------------------------------- databases
def _record_in(folder, func, target, seconds):
    """Commit the default schedule of ``func`` as a record measured on ``target`` into ``folder``."""
    database = mt.json_database(folder)
    schedule = next(s for s in (r.apply(func, HOST, False) for r in cs.default_rules()) if s is not None)
    mod = tvm.IRModule({"main": func})
    workload = database.commit_workload(mod)
    database.commit_tuning_record(ms.database.TuningRecord(
        schedule.trace, workload, [seconds], target, ms.arg_info.ArgInfo.from_prim_func(func)))
    return mod


def test_packaged_records_serve_their_target_only(tmp_path):
    (func,) = _fused_primfuncs(_conv(1, 1, 3, 1)).values()
    other = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 8})
    root = tmp_path / "packaged"
    mod = _record_in(mt.packaged_folder(AVX2, root) / "other-ops", func, AVX2, 1e-3)
    _record_in(mt.packaged_folder(other, root) / "other-ops", func, other, 1e-4)
    user = tmp_path / "user" / "other-ops"

    found = mt.layered_database(user, AVX2, root).query_tuning_record(mod, AVX2, "main")
    assert found is not None and str(found.target) == str(AVX2)
    assert not user.exists()  # looking up creates nothing
    # a CPU with no records of its own gets none (not the other CPU's)
    third = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 16})
    assert mt.layered_database(user, third, root).query_tuning_record(mod, third, "main") is None
    # MetaSchedule itself would hand out a record measured on another target: why qlfx filters
    mixed = tmp_path / "mixed"
    _record_in(mixed, func, other, 1e-4)
    assert mt.json_database(mixed).query_tuning_record(mod, AVX2, "main") is not None
    assert mt.records_for_target(mt.json_database(mixed), AVX2).query_tuning_record(mod, AVX2, "main") is None


def test_user_records_come_before_packaged_ones(tmp_path):
    (func,) = _fused_primfuncs(_conv(1, 1, 3, 1)).values()
    root = tmp_path / "packaged"
    mod = _record_in(mt.packaged_folder(AVX2, root) / "other-ops", func, AVX2, 1e-4)
    user = tmp_path / "user" / "other-ops"
    _record_in(user, func, AVX2, 5e-3)
    found = mt.layered_database(user, AVX2, root).query_tuning_record(mod, AVX2, "main")
    assert [float(s) for s in found.run_secs] == [5e-3]


def test_target_key_names_cpu_and_cores():
    assert mt.target_key(AVX2) == "llvm-znver3-2c"
    assert mt.cost_model_name() in ("xgb", "random")


def test_flops_weights_rank_convs_above_elementwise():
    class Task:  # what flops_weights reads of an ExtractedTask
        def __init__(self, func, weight):
            self.dispatched, self.weight = [tvm.IRModule({"main": func})], weight

    conv = next(iter(_fused_primfuncs(_conv(1, 1, 3, 1)).values()))
    add = next(iter(_fused_primfuncs(lambda bb, x: bb.emit(R.add(x, x))).values()))
    conv_weight, add_weight = mt.flops_weights([Task(conv, 1), Task(add, 3)])
    assert conv_weight > 50 * add_weight  # 3 calls of an add still weigh less than one conv
