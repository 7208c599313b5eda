"""timm ConvNets the tests compile: models written by others, across families, at a small input size.

``sweep_one(name)`` runs one through what a user does — random weights and random BN statistics,
``qlfx.compile(model, DEFAULT_PIPELINE)`` (every pass checked), ``to_onnx`` -> onnxruntime, optionally
``to_tvm`` (llvm, untuned) — and returns what it found; the tests assert on it and
``benchmarks/timm_sweep.py`` prints it as a table.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# family -> timm model names (the smallest variant of each family that timm builds without weights)
FAMILIES = {
    "ResNet": ["resnet18", "resnet26d"],
    "ResNeXt": ["resnext26ts"],
    "SE/ECA/GC/SK": ["seresnext26d_32x4d", "ecaresnet26t", "gcresnet33ts", "skresnet18"],
    "ResNeSt": ["resnest14d"],
    "MobileNetV2/V3": ["mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv3_large_100", "lcnet_050"],
    "EfficientNet": ["efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0", "tinynet_e"],
    "MnasNet/FBNet": ["mnasnet_050", "semnasnet_050", "fbnetc_100", "hardcorenas_a", "mixnet_s"],
    "RegNet": ["regnetx_002", "regnety_002"],
    "GhostNet": ["ghostnet_050", "repghostnet_050"],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto"],
    "DenseNet/DPN": ["densenet121", "dpn68"],
    "RepVGG/MobileOne/FastViT": ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m1"],
    "DLA/VoVNet/CSP": ["dla34", "ese_vovnet19b_dw", "cs3darknet_focus_s", "selecsls42b", "hgnetv2_b0"],
    "NFNet/BiT": ["nf_resnet26", "resnetv2_50x1_bit"],
    "Other": ["rexnet_100", "tresnet_m", "xception41", "efficientvit_m0", "edgenext_xx_small"],
}
ALL = [name for names in FAMILIES.values() for name in names]
# Models whose training form has parallel branches that timm's reparameterize_model merges.
REPARAMETERIZED = {"repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m1"}
# Pre-activation nets: their BNs sit between a concat / add and a ReLU, with no linear op beside
# them, so some stay (fold-bn says why for each); every other model must end with none.
PREACTIVATION = {"densenet121", "dpn68"}
# A few of different families for CI (the full sweep is tests/stress/test_timm_sweep.py).
CI = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0", "regnety_002", "ghostnet_050", "convnext_atto",
      "repvgg_a0", "mobileone_s0"]
TVM_SUBSET = ["resnet18", "mobilenetv3_small_050", "repvgg_a0"]
SIZE = 64
BN = torch.ops.aten.batch_norm.default
CONV = torch.ops.aten.conv2d.default


@dataclass
class SweepResult:
    name: str
    family: str
    bn_total: int = 0
    bn_left: int = 0
    bn_left_explained: bool = True      # every BN left is in fold-bn's skipped list, with its reason
    convs: int = 0
    deploy_convs: int | None = None     # convs in timm's reparameterize_model form (REPARAMETERIZED only)
    fused_products: int = 0
    onnx_rel_err: float | None = None   # max|ORT - torch graph| / max|torch graph|
    tvm_rel_err: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def family_of(name: str) -> str:
    return next(f for f, names in FAMILIES.items() if name in names)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    import timm

    from qlfx.models import randomize_batchnorm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    return randomize_batchnorm(model, seed=seed + 1).eval()


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def deploy_convs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Convs of timm's own deploy form (``reparameterize_model``), counted on its capture."""
    import qlfx
    from timm.utils.model import reparameterize_model

    deployed = reparameterize_model(copy.deepcopy(model))
    return _count(qlfx.trace(deployed, (x,)), CONV)


def sweep_one(name: str, workdir: Path, tvm: bool = False) -> SweepResult:
    import onnxruntime as ort

    import qlfx

    start = time.perf_counter()
    result = SweepResult(name, family_of(name))
    model = build(name)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    captured = qlfx.trace(model, (x,))
    result.bn_total = _count(captured, BN)
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, example_inputs=(x,))
    gm = compiled.graph_module
    result.bn_left = _count(gm, BN)
    fold = next(r for r in compiled.report.rows if r.pass_name == "fold-bn")
    explained = {s.site for s in fold.result.skipped}
    result.bn_left_explained = all(n.name in explained for n in gm.graph.nodes if n.target is BN)
    result.convs = _count(gm, CONV)
    result.fused_products = _count(gm, torch.ops.qlfx.branch_product.default)
    if name in REPARAMETERIZED:
        result.deploy_convs = deploy_convs(model, x)
        merge = next(r for r in compiled.report.rows if r.pass_name == "merge-parallel")
        result.notes += merge.result.notes
    reference = compiled(x).detach().numpy()
    path = compiled.to_onnx(workdir / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    result.onnx_rel_err = _rel(got, reference)
    if tvm:
        module = compiled.to_tvm(target="llvm")
        result.tvm_rel_err = _rel(np.asarray(module(x.numpy())), reference)
    result.seconds = time.perf_counter() - start
    return result


def check(result: SweepResult, tol: float = 1e-4) -> None:
    """What every swept model must satisfy (the tests' assertions)."""
    assert result.bn_left_explained, f"{result.name}: a batchnorm is left without a reason"
    if result.name not in PREACTIVATION:
        assert result.bn_left == 0, f"{result.name}: {result.bn_left} of {result.bn_total} batchnorms not folded"
    assert result.onnx_rel_err is not None and result.onnx_rel_err <= tol, result
    if result.tvm_rel_err is not None:
        assert result.tvm_rel_err <= tol, result
    if result.deploy_convs is not None:
        assert result.convs <= result.deploy_convs, (
            f"{result.name}: {result.convs} convs after merge-parallel, timm's deploy form has {result.deploy_convs}")
