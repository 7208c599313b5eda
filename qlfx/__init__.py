"""qlfx: a compiler for quasi-linear ConvNets.

model -> :func:`trace` (torch.fx IR) -> [pass -> equivalence check]* -> ONNX / TVM.

The names below are imported lazily, so that ``qlfx.emit.tvm_runtime`` (which runs an exported TVM
module with tvm + numpy alone) can be imported on a machine without torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "compile": "api", "Compiled": "api", "DEFAULT_PIPELINE": "api",
    "trace": "ir",
    "list_passes": "pass_manager", "get_pass": "pass_manager", "register_pass": "pass_manager",
    "Pass": "pass_manager", "PassResult": "pass_manager", "PassContext": "pass_manager",
    "PassManager": "pass_manager", "Report": "pass_manager", "Skip": "pass_manager",
    "Tolerance": "verify",
    "QlfxError": "errors", "UsageError": "errors", "TraceError": "errors", "UnknownPassError": "errors",
    "EquivalenceError": "errors", "UnsupportedOpsError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qlfx' has no attribute {name!r}")
    value = getattr(import_module(f"qlfx.{module}"), name)
    globals()[name] = value  # cache: later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
