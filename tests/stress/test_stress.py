"""Stress run of the reliability properties (not part of the default test run).

    QLFX_STRESS=1 pytest tests/stress                      # 200 random nets, ONNX on all, TVM on 8
    QLFX_STRESS=1 QLFX_STRESS_EXAMPLES=1000 pytest tests/stress

Random small ConvNets from tests/blocks.py and both QLNet layouts (random widths, strides, BN
statistics, activations) go through the default pipeline and through every registered equivalent pass;
each pass is verified by the pass manager, the result end to end against the model, and the ONNX (and,
for a few, TVM) artifacts against the model.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

import qlfx
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from test_reliability import _all_equivalent_pipeline, check_net, random_nets

pytestmark = pytest.mark.skipif(os.environ.get("QLFX_STRESS") != "1",
                                reason="stress run: set QLFX_STRESS=1 (QLFX_STRESS=1 pytest tests/stress)")

EXAMPLES = int(os.environ.get("QLFX_STRESS_EXAMPLES", 200))
TVM_EXAMPLES = int(os.environ.get("QLFX_STRESS_TVM_EXAMPLES", 8))
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
# No example database in the repository; a failure prints the @reproduce_failure blob to replay it.
_NO_DB = dict(database=None, print_blob=True)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=_HEALTH, **_NO_DB)
@given(case=random_nets())
def test_stress_random_nets_onnx(case, tmp_path_factory):
    net, x = case
    tmp = tmp_path_factory.mktemp("net")
    check_net(net, x, qlfx.DEFAULT_PIPELINE, tmp, onnx=True)
    check_net(net, x, _all_equivalent_pipeline(), tmp, onnx=True)


@settings(max_examples=TVM_EXAMPLES, deadline=None, suppress_health_check=_HEALTH, **_NO_DB)
@given(case=random_nets())
def test_stress_random_nets_tvm(case, tmp_path_factory):
    try:
        from qlfx.emit.tvm import build_tvm  # noqa: F401
    except ImportError as err:
        pytest.skip(f"TVM emitter not available: {err}")
    net, x = case
    check_net(net, x, _all_equivalent_pipeline(), tmp_path_factory.mktemp("tvm"), onnx=False, tvm=True)
