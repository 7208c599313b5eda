"""qlfx: a compiler for quasi-linear ConvNets.

model -> :func:`capture` (torch.export -> a functional ATen graph) -> [pass -> equivalence check]* ->
ONNX (torch.onnx) / TVM (Relax's from_exported_program).

The names below are imported lazily, so that ``qlfx.emit.tvm_runtime`` (which runs an exported TVM
module with tvm + numpy alone) can be imported on a machine without torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "compile": "api", "tune": "api", "Compiled": "api", "DEFAULT_PIPELINE": "api",
    "trace": "capture:capture", "to_exported_program": "capture",
    "list_passes": "pass_manager", "get_pass": "pass_manager", "register_pass": "pass_manager",
    "Pass": "pass_manager", "PassResult": "pass_manager", "PassContext": "pass_manager",
    "PassManager": "pass_manager", "Report": "pass_manager", "Skip": "pass_manager",
    "Tolerance": "verify",
    "QlfxError": "errors", "UsageError": "errors", "TraceError": "errors", "UnknownPassError": "errors",
    "EquivalenceError": "errors", "UnsupportedOpsError": "errors", "PassError": "errors",
}
_SUBPACKAGES = ("models", "symmetry", "passes", "emit", "kernels")
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _SUBPACKAGES:  # qlfx.models, qlfx.symmetry, ... without importing them first
        value = import_module(f"qlfx.{name}")
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qlfx' has no attribute {name!r}")
    module, _, attribute = module.partition(":")
    value = getattr(import_module(f"qlfx.{module}"), attribute or name)
    globals()[name] = value  # cache: later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__ + list(_SUBPACKAGES))


def _register_dynamo_backend() -> None:
    """``torch.compile(m, backend="qlfx")`` after ``import qlfx``, when dynamo is loaded already: qlfx's
    own import stays light (no torch: qlfx.emit.tvm_runtime runs without it; no dynamo: seconds to
    import). The ``torch_dynamo_backends`` entry point in pyproject.toml covers every other case
    (torch's backend lookup loads qlfx.dynamo from it)."""
    import sys

    if "torch._dynamo" in sys.modules:
        try:
            import_module("qlfx.dynamo")
        except Exception as error:  # noqa: BLE001 -- the rest of qlfx works without the backend
            import warnings

            warnings.warn(f"qlfx: torch.compile backend 'qlfx' not registered: {type(error).__name__}: {error}")


_register_dynamo_backend()
