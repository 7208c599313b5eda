"""TVM emitter: from_exported_program + qlfx's lowering; llvm build == torch, fused kernels, dynamic batch,
tuning database reuse, all unsupported ops listed at once, torch-free export, cuda build."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import qlfx
from qlfx.errors import UnsupportedOpsError
from qlfx.models import create_model, qlnet, qlnet_eq3, randomize_batchnorm

tvm = pytest.importorskip("tvm")
from qlfx.emit import tvm as emit_tvm  # noqa: E402
from qlfx.emit.tvm import build_tvm  # noqa: E402

SMALL = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)
BRANCH_PRODUCT = torch.ops.qlfx.branch_product.default


def _small_model(kind: str) -> nn.Module:
    model = qlnet(**SMALL) if kind == "pde" else qlnet_eq3(**SMALL)  # eq3: softball, weight sharing
    randomize_batchnorm(model.eval(), seed=3)
    return model


def _close(actual, expected, rel=2e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err < rel, f"TVM output differs from torch: max rel err {err:.2e}"


def _fused(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is BRANCH_PRODUCT]


def _products(module) -> list:
    """The module's records of branch-product sites (the other kernel sites: kinds conv1x1, separable)."""
    return [r for r in module.kernels if r.is_branch_product]


@pytest.fixture(scope="module")
def compiled_small():
    """(model, Compiled, input) for the PDEBlock and Eq.(3) twins at 64x64, after the default pipeline."""
    out = {}
    for kind in ("pde", "eq3"):
        model = _small_model(kind)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        out[kind] = (model, qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,)), x)
    return out


@pytest.mark.parametrize("kind", ["pde", "eq3"])
def test_llvm_build_matches_torch_with_fused_kernels(compiled_small, kind):
    model, compiled, x = compiled_small[kind]
    module = compiled.to_tvm("llvm", progress=False)
    with torch.no_grad():
        expected = model(x)
    _close(module(x), expected)
    # numpy in -> numpy out, and a second input (not the example) also matches
    x2 = torch.randn_like(x)
    with torch.no_grad():
        _close(module(x2.numpy()), model(x2).numpy())
    fused = _fused(compiled.graph_module)
    products = _products(module)
    assert len(fused) == 4 and len(products) == 4
    assert [r.node for r in products] == [n.name for n in fused]  # named after the qlfx nodes
    assert all(r.kind == ("pointwise" if kind == "pde" else "depthwise") for r in products)
    assert all(r.kernel.startswith("branch_product_") for r in products), module.kernels
    assert all(r.kernel.startswith("packed_conv1x1_") for r in module.kernels if r.kind == "conv1x1")
    # PDEBlock: dw3x3 -> conv1x1_out is one separable kernel with the shortcut add in its epilogue
    separable = [r for r in module.kernels if r.kind == "separable"]
    assert len(separable) == (4 if kind == "pde" else 0) and all(r.kernel.endswith("_residual") for r in separable)
    names = {gv.name_hint for gv in module.relax_module.get_global_vars()}
    assert {r.kernel for r in module.kernels} <= names


class _Adds(nn.Module):
    """Residual adds the epilogue may take (a 1x1 conv read only by the add, either operand order, a
    branch product) and adds it must not: a conv with a second reader, alpha != 1, a broadcast."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Conv2d(8, 8, 1) for _ in range(5))
        self.p, self.q = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = x + self.a(x)                    # fused (conv on the right)
        x = self.b(x) + x                    # fused (conv on the left)
        y = self.c(x)
        x = y + x + y.mean()                 # y has two readers: not fused
        x = torch.add(x, self.d(x), alpha=2)  # alpha: not fused
        x = self.e(x) + x.mean((2, 3), keepdim=True)  # broadcast: not fused
        return x + self.p(x) * self.q(x)     # a branch product with the add in its epilogue


def test_residual_adds_run_in_the_kernel_epilogue():
    model = _Adds().eval()
    x = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(4))
    # no merge-parallel: it would fold x + a(x) into one conv
    compiled = qlfx.compile(model, "fuse-product,dce", example_inputs=(x,))
    module = compiled.to_tvm("llvm", progress=False)
    with torch.no_grad():
        _close(module(x), model(x))
    residual = [r.node for r in module.kernels if r.kernel.endswith("_residual")]
    assert len(module.kernels) == 6, module.kernels  # five 1x1 convs, one product
    assert len(residual) == 3 and sum("branch_product" in n for n in residual) == 1, module.kernels


class _Alphas(nn.Module):
    def forward(self, x):
        y = torch.add(x, x.flip(3), alpha=2) + torch.sub(x, x * x, alpha=-0.5)
        return torch.rsub(y, x, alpha=3) + torch.add(y, 3, alpha=2) - torch.sub(y, 1.5, alpha=4)


def test_alpha_of_add_and_sub_is_applied():
    """TVM's frontend converts add / sub / rsub without their alpha; qlfx folds it into the operand."""
    model, x = _Alphas(), torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(5))
    module = build_tvm(qlfx.trace(model, (x,)), (x,), target="llvm", progress=False)
    _close(module(x), model(x))


class _Separables(nn.Module):
    """Depthwise-separable convs as users write them: MobileNet's dw-BN-ReLU6-pw-BN with a residual
    add; a depthwise conv with multiplier 2 read twice (stays apart); one without padding (changes the
    size: stays apart)."""

    def __init__(self, c=8):
        super().__init__()
        self.dw1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.pw1, self.bn2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.dw2, self.pw2 = nn.Conv2d(c, 2 * c, 3, padding=1, groups=c), nn.Conv2d(2 * c, c, 1)
        self.dw3, self.pw3 = nn.Conv2d(c, c, 3, groups=c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = x + self.bn2(self.pw1(nn.functional.relu6(self.bn1(self.dw1(x)))))
        h = self.dw2(x)
        x = self.pw2(h) + h.mean()
        return self.pw3(self.dw3(x))


def test_depthwise_then_1x1_runs_as_one_separable_kernel():
    model = randomize_batchnorm(_Separables().eval(), seed=6)
    x = torch.randn(2, 8, 10, 12, generator=torch.Generator().manual_seed(7))
    compiled = qlfx.compile(model, "fold-bn,dce", example_inputs=(x,))
    module = compiled.to_tvm("llvm", progress=False)
    with torch.no_grad():
        _close(module(x), model(x))
    kernels = sorted(r.kernel for r in module.kernels)
    assert kernels == ["packed_conv1x1_n2_c16_10x12_m8_s1_biasa", "packed_conv1x1_n2_c8_8x10_m8_s1_biasa",
                       "separable_n2_c8_10x12_mid8_m8_s1_k3_d1_biasab_clamp0p0_6p0_residual"], kernels
    plain = compiled.to_tvm("llvm", use_kernels=False, progress=False)
    assert plain.kernels == []
    with torch.no_grad():
        _close(plain(x), model(x))


def test_timm_mobilenet_runs_its_separable_convs_as_separable_kernels():
    """timm's MobileNetV2 (dw-BN-ReLU6-pw-BN, residual adds), as timm writes it."""
    timm = pytest.importorskip("timm")
    model = randomize_batchnorm(timm.create_model("mobilenetv2_050").eval(), seed=8)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    module = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,)).to_tvm("llvm", progress=False)
    with torch.no_grad():
        _close(module(x), model(x), rel=1e-5)
    separable = [r for r in module.kernels if r.kind == "separable"]
    assert len(separable) == 17 and all("_clamp0p0_6p0" in r.kernel for r in separable)
    assert sum(r.kernel.endswith("_residual") for r in separable) == 10


def test_plain_graph_without_kernels_matches_torch():
    """Relax from the plain captured graph (no passes): batch_norm, slices, hardball as Relax ops."""
    model = _small_model("pde")
    x = torch.randn(1, 3, 64, 64)
    module = build_tvm(qlfx.trace(model, (x,)), (x,), target="llvm", progress=False)
    assert _products(module) == [] and module.kernels  # no products; the 1x1 convs on packed kernels
    with torch.no_grad():
        _close(module(x), model(x))
    with pytest.raises(ValueError, match=r"must have shape \(1, 3, 64, 64\).*dynamic_batch"):
        module(torch.randn(2, 3, 64, 64))


def test_relax_fallback_when_kernels_are_off(compiled_small):
    model, compiled, x = compiled_small["eq3"]
    module = compiled.to_tvm("llvm", use_kernels=False, progress=False)
    assert [r.kernel for r in module.kernels] == ["relax-fallback"] * 4
    assert all(r.note == "use_kernels=False" for r in module.kernels)
    with torch.no_grad():
        _close(module(x), model(x))


@pytest.mark.parametrize("kind", ["pde", "eq3"])
def test_dynamic_batch_runs_at_any_batch_size(kind):
    model = _small_model(kind)
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,), dynamic_batch=True)
    module = compiled.to_tvm("llvm", progress=False)
    assert module.inputs[0]["shape"] == [None, 3, 32, 32] and module.outputs[0]["shape"] == [None, 10]
    assert len(_products(module)) == len(_fused(compiled.graph_module)) == 4
    assert all("nany" in r.kernel for r in module.kernels)  # the kernels take any batch size too
    for batch in (1, 3, 8):
        xb = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            _close(module(xb), model(xb))


class _Cummax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, dim=1).values


class _Unsupported(nn.Module):
    """Three ops TVM's importer has no converter for, around supported ones."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.running = _Cummax()

    def forward(self, x):
        k = torch.kthvalue(x, 2, dim=1, keepdim=True).values
        c = self.running(self.conv(x))
        return c + k + torch.special.erfcx(x) + torch.relu(x)


def _line_of(obj, text: str) -> str:
    lines, first = inspect.getsourcelines(obj)
    return f"{os.path.basename(__file__)}:{first + next(i for i, s in enumerate(lines) if text in s)}"


def test_unsupported_ops_are_listed_at_once():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(UnsupportedOpsError) as info:
        build_tvm(qlfx.trace(_Unsupported(), (x,)), (x,), progress=False)
    sites = info.value.sites
    assert [s.split(" ")[0] for s in sites] == ["kthvalue", "running_cummax", "special_erfcx"], sites
    assert f"at {_line_of(_Unsupported.forward, 'kthvalue')}: no TVM converter for aten.kthvalue.default" in sites[0]
    assert f"in running) at {_line_of(_Cummax.forward, 'cummax')}: no TVM converter for aten.cummax" in sites[1]
    assert "aten.special_erfcx.default" in sites[2]
    assert "3 unsupported op(s)" in str(info.value)


@pytest.mark.slow
def test_many_block_kinds_match_torch():
    """Every block kind of tests/blocks.py (grouped, dilated, concat, SE, norms, ...) through TVM."""
    from blocks import BLOCK_KINDS, ConvNet, randomize

    acts = ["relu", "relu6", "hardswish", "silu", "gelu", "leaky_relu", "hardtanh"] * 2
    spec = [(k, 8, 2 if i % 5 == 0 else 1, act) for i, (k, act) in enumerate(zip(BLOCK_KINDS, acts))]
    model = randomize(ConvNet(spec, stem=8), 3)
    x = torch.randn(2, 3, 16, 16)
    module = build_tvm(qlfx.trace(model, (x,)), (x,), progress=False)
    with torch.no_grad():
        _close(module(x), model(x))


def test_timm_model_through_default_pipeline():
    timm = pytest.importorskip("timm")
    model = randomize_batchnorm(timm.create_model("mobilenetv3_small_050", pretrained=False).eval(), seed=0)
    x = torch.randn(1, 3, 64, 64)
    module = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,)).to_tvm("llvm", progress=False)
    with torch.no_grad():
        _close(module(x), model(x), rel=1e-4)


class _AuthorsStyleBlock(nn.Module):
    """1x1 convs that are no branch product (projection with bias, strided shortcut without), and a
    channel repeat feeding a depthwise conv, written the way users write them."""

    def __init__(self, c=16):
        super().__init__()
        self.expand = nn.Conv2d(c, c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.shortcut = nn.Conv2d(c, 2 * c, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        x0 = x
        y = torch.repeat_interleave(torch.relu(self.expand(x)), 2, dim=1)
        y = self.bn(self.project(torch.relu(self.dw(y))))
        y += x0
        return self.shortcut(torch.relu(y))


class _RepeatThenDepthwise(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)

    def forward(self, x):
        return self.dw(torch.repeat_interleave(x, 2, dim=1)).relu()


def test_plain_1x1_convs_and_channel_repeats_lower_to_qlfx_kernels():
    """Every 1x1 conv runs on the packed GEMM kernel (kind conv1x1, bias or not, stride 2 too); the
    depthwise conv reading repeated channels and the 1x1 conv after it run as one separable kernel
    that reads channel o // 2 in place (no repeat left in the module); a depthwise conv reading
    repeated channels on its own reads them in place too."""
    model = randomize_batchnorm(_AuthorsStyleBlock().eval(), seed=2)
    x = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(0))
    gm = qlfx.compile(model, "fold-bn", example_inputs=(x,)).graph_module
    module = build_tvm(gm, (x,), progress=False)
    with torch.no_grad():
        _close(module(x), model(x))
    assert sorted(r.kernel for r in module.kernels) == [
        "packed_conv1x1_n2_c16_12x12_m16_s1_biasa", "packed_conv1x1_n2_c16_12x12_m32_s2_biasnone",
        "separable_n2_c16_12x12_mid32_m16_s1_k3_d1_biasab_clamp0p0_None_residual"], module.kernels  # y += x0 too
    from tvm import relax

    script = relax.transform.DeadCodeElimination()(module.relax_module).script()  # as the build does first
    assert "R.broadcast_to" not in script and "R.nn.conv2d" not in script
    plain = build_tvm(gm, (x,), progress=False, use_kernels=False)
    assert plain.kernels == [] and "groups=32" in plain.relax_module.script()
    with torch.no_grad():
        _close(plain(x), model(x))

    alone = _RepeatThenDepthwise().eval()
    module = build_tvm(qlfx.trace(alone, (x,)), (x,), progress=False)
    assert "groups=16" in module.relax_module.script() and "groups=32" not in module.relax_module.script()
    with torch.no_grad():
        _close(module(x), alone(x))


class _GatedConv(nn.Module):
    """conv1x1 -> split -> product: one pointwise branch product after fuse-product."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 64, 1)

    def forward(self, x):
        z = self.conv(x)
        return z[:, :32] * z[:, 32:]


def test_tuning_database_is_reused(tmp_path, monkeypatch):
    x = torch.randn(1, 16, 8, 8)
    model = _GatedConv().eval()
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    assert len(_fused(compiled.graph_module)) == 1
    first = compiled.to_tvm("llvm", tune_trials=2, tuning_db=tmp_path, progress=False)
    assert [r.trials_run for r in first.kernels] == [2], first.kernels
    assert not first.kernels[0].from_database and first.kernels[0].best_us > 0
    assert (tmp_path / "branch-product" / "database_tuning_record.json").stat().st_size > 0

    from qlfx.kernels import tuning

    def no_tuning(*args, **kwargs):
        raise AssertionError("the second build must not tune")

    monkeypatch.setattr(tuning.ms.tune, "tune_tasks", no_tuning)
    second = compiled.to_tvm("llvm", tune_trials=2, tuning_db=tmp_path, progress=False)
    assert [r.trials_run for r in second.kernels] == [0], second.kernels
    assert second.kernels[0].from_database
    with torch.no_grad():
        expected = model(x)
    _close(first(x), expected)
    _close(second(x), expected)


def test_packaged_records_are_used_for_their_target_only(tmp_path, monkeypatch):
    """Records kept with qlfx (qlfx/tuning_records/<target key>, filled by a tuning run pointed there)
    serve a build that tunes nothing, on the same target; a build for another CPU does not use them,
    and looking them up writes nothing into the user's database folder."""
    from qlfx.kernels import module_tuning

    monkeypatch.setattr(module_tuning, "PACKAGED_RECORDS", tmp_path / "packaged")
    x = torch.randn(1, 16, 8, 8)
    model = _GatedConv().eval()
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    target = emit_tvm.make_target("llvm")
    compiled.to_tvm("llvm", tune_trials=2, tuning_db=module_tuning.packaged_folder(target), progress=False)
    module = compiled.to_tvm("llvm", tune_trials=0, tuning_db=tmp_path / "user", progress=False)
    (record,) = module.kernels
    assert record.from_database and record.trials_run == 0 and "packaged" in record.note, record
    assert not (tmp_path / "user").exists()
    other = compiled.to_tvm({"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}, tune_trials=0,
                            tuning_db=tmp_path / "user", progress=False)
    assert not other.kernels[0].from_database and other.kernels[0].note == "hand schedule"
    with torch.no_grad():
        expected = model(x)
    _close(module(x), expected)
    _close(other(x), expected)


def test_packaged_records_keep_the_best_record_per_workload_and_target(tmp_path):
    """prune_to_best (run by benchmarks/tvm_tuning.py --fill-packaged): per workload and target only the
    fastest valid record stays, failed runs (1e10 s) go, and a build still finds the pruned kernel record."""
    from qlfx.kernels import module_tuning

    x = torch.randn(1, 16, 8, 8)
    model = _GatedConv().eval()
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    compiled.to_tvm("llvm", tune_trials=4, tuning_db=tmp_path, progress=False)
    folder = tmp_path / "branch-product"
    path = folder / module_tuning.RECORD_FILE
    lines = path.read_text().splitlines()
    assert len(lines) >= 2
    workload, (trace, _, target, args_info) = json.loads(lines[0])
    # the same workload measured on another CPU: kept on its own
    other = dict(target, mcpu="x86-64" if target.get("mcpu") != "x86-64" else "skylake")
    extra = [[workload, [trace, [1e10], target, args_info]], [workload, [trace, [5.0], other, args_info]],
             [workload, [trace, [9.0], other, args_info]]]
    path.write_text("\n".join(lines + [json.dumps(e) for e in extra]) + "\n")
    fastest = min(sum(r[1][1]) / len(r[1][1]) for r in map(json.loads, lines))
    assert module_tuning.prune_to_best(folder) == (len(lines) + 3, 2)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(sum(r[1][1]) / len(r[1][1]) for r in kept) == [fastest, 5.0]
    module = compiled.to_tvm("llvm", tune_trials=0, tuning_db=tmp_path, progress=False)
    assert module.kernels[0].from_database
    with torch.no_grad():
        _close(module(x), model(x))


def test_tuned_kernel_serves_a_dynamic_batch(tmp_path):
    """A symbolic-batch site is tuned at the example's batch size; the tuned knobs schedule the kernel
    that takes any batch size, and the database entry is the example batch's."""
    x = torch.randn(2, 16, 8, 8)
    model = _GatedConv().eval()
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,), dynamic_batch=True)
    module = compiled.to_tvm("llvm", tune_trials=2, tuning_db=tmp_path, progress=False)
    (record,) = module.kernels
    assert record.trials_run == 2 and "nany" in record.kernel
    for batch in (1, 3):
        xb = torch.randn(batch, 16, 8, 8)
        with torch.no_grad():
            _close(module(xb), model(xb))
    static = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    again = static.to_tvm("llvm", tune_trials=2, tuning_db=tmp_path, progress=False)
    assert again.kernels[0].trials_run == 0 and again.kernels[0].from_database


@pytest.mark.slow  # MetaSchedule's task extraction imports tvm's tensor intrinsics: minutes with torch loaded
def test_tune_other_ops_reuses_its_database(tmp_path):
    x = torch.randn(1, 16, 8, 8)
    compiled = qlfx.compile(_GatedConv().eval(), "", example_inputs=(x,))
    first = compiled.to_tvm("llvm", tune_trials=1, tuning_db=tmp_path, tune_other_ops=True, progress=False)
    assert first.tuning.tasks_total > 0 and first.tuning.tasks_tuned == first.tuning.tasks_total
    # every task was measured with qlfx's default schedule first: the record tuning has to beat
    assert all(r.baseline_us is not None and r.best_us <= r.baseline_us for r in first.tuning.rows), first.tuning.rows
    second = compiled.to_tvm("llvm", tune_trials=1, tuning_db=tmp_path, tune_other_ops=True, progress=False)
    assert second.tuning.tasks_tuned == 0 and second.tuning.tasks_from_database == first.tuning.tasks_total
    with torch.no_grad():
        _close(second(x), compiled(x))


def _run_without_torch(so: Path, batches: dict[int, tuple[Path, Path]]) -> str:
    """What a deployment machine without torch does: import qlfx's loader (qlfx's package import is
    lazy, and the loader needs tvm + numpy only), with any `import torch` failing."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from qlfx.emit import tvm_runtime as runtime
        model = runtime.load({str(so)!r})
        for x_file, expected_file in {[(str(a), str(b)) for a, b in batches.values()]!r}:
            y = model(np.load(x_file))  # one output: an array, as TVMModule and the torch model return
            assert isinstance(y, np.ndarray) and isinstance(model.run(np.load(x_file)), list)
            expected = np.load(expected_file)
            err = np.abs(y - expected).max() / np.abs(expected).max()
            assert err < 2e-5, err
        assert sys.modules["torch"] is None  # nothing managed to import torch
        assert "qlfx.api" not in sys.modules and "qlfx.ir" not in sys.modules
        print("ok", err)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    return result.stdout


def _save_cases(model, inputs, folder: Path) -> dict:
    cases = {}
    for x in inputs:
        b = x.shape[0]
        np.save(folder / f"x{b}.npy", x.numpy())
        with torch.no_grad():
            np.save(folder / f"expected{b}.npy", model(x).numpy())
        cases[b] = (folder / f"x{b}.npy", folder / f"expected{b}.npy")
    return cases


def test_export_loads_and_runs_without_torch(compiled_small, tmp_path):
    model, compiled, x = compiled_small["eq3"]
    module = compiled.to_tvm("llvm", progress=False)
    so = module.export(tmp_path / "model.so")
    meta = json.loads((tmp_path / "model.json").read_text())
    assert so.exists() and meta["inputs"][0]["shape"] == [2, 3, 64, 64] and meta["num_outputs"] == 1
    products = [k["node"] for k in meta["kernels"] if k["kind"] not in ("conv1x1", "separable")]
    assert meta["version"] == 2 and products == [n.name for n in _fused(compiled.graph_module)]
    assert len(meta["kernels"]) > len(products)  # the other 1x1 convs run on packed kernels too
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"
    _run_without_torch(so, _save_cases(model, [x], tmp_path))


def test_dynamic_batch_export_loads_without_torch(tmp_path):
    model = _small_model("pde")
    x = torch.randn(1, 3, 32, 32)
    module = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,), dynamic_batch=True).to_tvm(
        "llvm", progress=False)
    so = module.export(tmp_path / "dyn.so")
    assert json.loads(so.with_suffix(".json").read_text())["inputs"][0]["shape"] == [None, 3, 32, 32]
    _run_without_torch(so, _save_cases(model, [torch.randn(b, 3, 32, 32) for b in (1, 3, 8)], tmp_path))


def test_cuda_build_contains_fused_kernel(compiled_small, tmp_path):
    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        pytest.skip("this tvm was built without the cuda code generator")
    model, compiled, x = compiled_small["eq3"]
    module = compiled.to_tvm({"kind": "cuda", "arch": "sm_90a"}, progress=False)
    assert "sm_90a" in str(module.target)
    source = module.source()
    assert "__global__" in source
    assert len(_products(module)) == 4 and all(r.kernel.startswith("branch_product_") for r in _products(module))
    assert all(r.kernel.startswith("packed_conv1x1_") for r in module.kernels if r.kind == "conv1x1")
    assert all(f"{r.kernel}_kernel" in source for r in module.kernels), module.kernels
    so = module.export(tmp_path / "cuda_model.so")
    assert so.stat().st_size > 0 and json.loads(so.with_suffix(".json").read_text())["device"] == "cuda"
    if not tvm.cuda(0).exist:
        with pytest.raises(RuntimeError, match="no such device"):
            module(x)
    else:
        with torch.no_grad():
            _close(module(x), model(x))


def test_make_target_fills_in_what_metaschedule_needs():
    llvm = emit_tvm.make_target("llvm")
    assert llvm.kind.name == "llvm" and int(llvm.attrs["num-cores"]) >= 1 and llvm.attrs["mcpu"]
    cuda = emit_tvm.make_target("cuda")
    assert cuda.kind.name == "cuda" and cuda.attrs["arch"] == "sm_90a" and cuda.host.kind.name == "llvm"
    with pytest.raises(qlfx.UsageError, match="llvm .CPU. and cuda"):
        emit_tvm.make_target({"kind": "metal"})


class _TwoHeads(nn.Module):
    """Two graph outputs: the multi-output side of the return convention."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.a(x), torch.relu(self.b(x))


def test_built_and_loaded_modules_return_alike(tmp_path):
    """One convention for TVMModule and the torch-free loader: ``module(x)`` returns what the torch model
    does (one array bare, several as a tuple); ``module.run(x)`` always a list, as onnxruntime's run.
    Checked on a single- and a two-output graph, exported as .so and as .tar (tvm's object tarball)."""
    from qlfx.emit import tvm_runtime

    for model, shape in ((_GatedConv().eval(), (1, 16, 6, 6)), (_TwoHeads().eval(), (1, 4, 6, 6))):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        built = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,)).to_tvm("llvm", progress=False)
        suffixes = (".so", ".tar") if len(expected) == 1 else (".so",)
        modules = [built] + [tvm_runtime.load(built.export(tmp_path / f"m{len(expected)}{s}")) for s in suffixes]
        for module in modules:
            called, listed = module(x.numpy()), module.run(x.numpy())
            assert isinstance(listed, list) and len(listed) == len(expected)
            if len(expected) == 1:
                assert isinstance(called, np.ndarray)
                called = [called]
            else:
                assert isinstance(called, tuple)
            for got, again, want in zip(called, listed, expected):
                _close(got, want.numpy(), rel=1e-5)
                np.testing.assert_array_equal(got, again)
        assert isinstance(built(x), torch.Tensor if len(expected) == 1 else tuple)  # torch in, torch out


def test_native_log_lines_are_hidden_unless_verbose(capfd):
    """TVM's C++ runtime logs straight to fd 2 ("Scope Saving:..." per constant on export): hidden unless
    the qlfx logger is at DEBUG (qlfx --verbose); other output and TVM's errors pass through."""
    import logging

    from qlfx.emit import tvm_runtime

    def chatter():
        os.write(2, b"[12:00:00] /src/runtime/vm/executable.cc:276: Warning: Scope Saving:global\n")
        os.write(2, b"[12:00:00] /src/runtime/vm/executable.cc:340: Warning: Scope Loaded:global\n")
        os.write(2, b"ptxas info: a compiler's own line\n")
        os.write(2, b"[12:00:01] /src/runtime/x.cc:9: Error: kept\n")

    with tvm_runtime.native_log_filter():
        chatter()
    err = capfd.readouterr().err
    assert "Scope" not in err and "ptxas info: a compiler's own line" in err and "Error: kept" in err
    logger = logging.getLogger("qlfx")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with tvm_runtime.native_log_filter():
            chatter()
    finally:
        logger.setLevel(level)
    assert capfd.readouterr().err.count("Scope") == 2
