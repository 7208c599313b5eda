"""The full timm sweep (not part of the default test run): every model of tests/timm_models.py through
the default pipeline -> ONNX -> onnxruntime, the TVM subset -> TVM llvm too.

    QLFX_STRESS=1 pytest tests/stress/test_timm_sweep.py
    python3 benchmarks/timm_sweep.py          # the same sweep as a table
"""
import os

import pytest

pytest.importorskip("timm")

from timm_models import ALL, TVM_SUBSET, check, sweep_one  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("QLFX_STRESS") != "1",
                                reason="stress run: set QLFX_STRESS=1 (QLFX_STRESS=1 pytest tests/stress)")


@pytest.mark.parametrize("name", ALL)
def test_timm_sweep(name, tmp_path):
    check(sweep_one(name, tmp_path, tvm=name in TVM_SUBSET))
