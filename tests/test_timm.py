"""timm ConvNets (models written by others) through the default pipeline -> ONNX -> onnxruntime, and a
few -> TVM; every foldable BN folded; reparameterisable nets merged down to timm's own deploy form.
CI runs a few families; tests/stress/test_timm_sweep.py runs all of tests/timm_models.py."""
import pytest

pytest.importorskip("timm")

from timm_models import CI, TVM_SUBSET, check, sweep_one  # noqa: E402


@pytest.mark.parametrize("name", CI)
def test_timm_convnet_compiles_and_emits_onnx(name, tmp_path):
    check(sweep_one(name, tmp_path))


@pytest.mark.parametrize("name", TVM_SUBSET[:1])
def test_timm_convnet_emits_tvm(name, tmp_path):
    pytest.importorskip("tvm")
    check(sweep_one(name, tmp_path, tvm=True))
