"""sparsify: triangularising O/GL channel spaces creates exact zeros and keeps the function."""
from __future__ import annotations

import pytest
import torch

import qlfx
import qlfx.passes.sparsify as sparsify_module  # registers the pass before passes/__init__ lists it
from qlfx import ir
from qlfx.models import create_model, randomize_batchnorm
from qlfx.pass_manager import PassContext, PassManager, parse_pipeline
from qlfx.passes.sparsify import _structural_zeros, weight_storage
from qlfx.verify import Tolerance, check_equivalence

# Expected exact zeros, from the stream widths (each O(C) space triangularises its best weight):
# qlnet-tiny: O(16): 16*15/2 = 120, O(32): 496, O(64): 2016 -> 2632
# qlnet-eq3-tiny: only the last stream is O(64) (the dw product pins the others): 2016
EXPECTED_ZEROS = {"qlnet-tiny": 2632, "qlnet-eq3-tiny": 2016}


@pytest.fixture(scope="module", params=sorted(EXPECTED_ZEROS))
def folded(request):
    """(name, BN-folded graph) with random weights and random BN statistics, any batch size."""
    model = randomize_batchnorm(create_model(request.param), seed=7).eval()
    c = qlfx.compile(model, "fold-bn,constant-fold,dce", example_inputs=(torch.randn(2, 3, 32, 32),),
                     dynamic_batch=True)
    return request.param, c.graph_module


def _run_sparsify(gm, options: str):
    """sparsify<options> on the graph through the pass manager (its equivalence check included)."""
    ctx = PassContext(example_inputs=(torch.randn(2, 3, 32, 32),), dynamic_batch=True)
    new, report = PassManager(parse_pipeline(f"sparsify<{options}>")).run(gm, ctx)
    row = report.rows[-1]
    assert row.pass_name == "sparsify" and row.check.passed
    return new, row.result


def test_structural_zero_count():
    assert _structural_zeros(4, 10) == 0 + 1 + 2 + 3
    assert _structural_zeros(5, 2) == 0 + 1 + 2 + 2 + 2  # wide stream, thin weight: rows past 2 vanish


def test_sparsify_creates_exact_zeros_and_keeps_the_function(folded):
    name, gm = folded
    new, result = _run_sparsify(gm, "method=qr")
    assert result.changed
    assert result.stats["zeros_created"] == EXPECTED_ZEROS[name], result.rewrites
    # the zeros really are in the graph's weights, and count_params sees them
    params_before, nonzero_before = ir.count_params(gm)
    params_after, nonzero_after = ir.count_params(new)
    assert params_after == params_before
    assert nonzero_before - nonzero_after == EXPECTED_ZEROS[name]
    # each triangularised weight has exact zeros strictly below (writer) / above (reader) its diagonal
    nodes = {n.name: n for n in new.graph.nodes}
    for node_name, info in result.stats["triangularised"].items():
        w = ir.get_tensor(new, sparsify_module._linear_parts(nodes[node_name])[1])
        c = w.shape[0] if info["role"] == "writer" else w.shape[1]
        m = w.reshape(c, -1) if info["role"] == "writer" else w.movedim(1, -1).reshape(-1, c).T
        assert bool((torch.tril(m, diagonal=-1) == 0).all()), node_name
    # outputs unchanged on fresh inputs (the pass manager checked too)
    inputs = [(torch.randn(3, 3, 32, 32),) for _ in range(2)]
    assert check_equivalence(gm, new, inputs, Tolerance(rel=1e-4)).passed


def test_l1_after_triangularisation_keeps_the_zeros_and_lowers_l1(folded):
    name, gm = folded
    _, qr_l1 = _run_sparsify(gm, "method=qr+l1;l1_steps=15;l1_lr=0.05")
    _, l1 = _run_sparsify(gm, "method=l1;l1_steps=15;l1_lr=0.05")
    assert qr_l1.stats["zeros_created"] == EXPECTED_ZEROS[name]  # scalings map 0 to 0
    history = qr_l1.stats["l1_history"]  # L1 of the weights touching the scaled spaces, after QR
    assert history[-1] < 0.98 * history[0]
    assert l1.stats["zeros_created"] == 0  # descent alone makes no exact zeros
    assert l1.stats["l1_after"] < l1.stats["l1_before"]


def test_weight_storage_sizes():
    w = torch.zeros(4, 6)
    w[0, :3] = 1.0
    w[2, 5] = 2.0
    s = weight_storage(w)
    assert (s["zeros"], s["nonzero"]) == (20, 4)
    assert s["dense_bytes"] == 24 * 4
    assert s["csr_bytes"] == 4 * (4 + 4) + 5 * 4


def test_sparsify_rejects_unknown_method():
    model = create_model("qlnet-tiny").eval()
    with pytest.raises(qlfx.errors.UsageError, match="method"):
        qlfx.compile(model, "sparsify<method=svd>", example_inputs=(torch.randn(1, 3, 32, 32),))
