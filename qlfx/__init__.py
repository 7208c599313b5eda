"""qlfx: a compiler for quasi-linear ConvNets.

model -> :func:`trace` (torch.fx IR) -> [pass -> equivalence check]* -> ONNX / TVM.
"""
from .api import DEFAULT_PIPELINE, Compiled, compile
from .errors import EquivalenceError, QlfxError, TraceError, UnknownPassError, UsageError
from .ir import trace
from .pass_manager import Pass, PassContext, PassManager, PassResult, Report, Skip, get_pass, list_passes, register_pass
from .verify import Tolerance

__all__ = [
    "compile", "trace", "list_passes", "get_pass", "register_pass", "Pass", "PassResult", "PassContext",
    "PassManager", "Report", "Skip", "Compiled", "Tolerance", "DEFAULT_PIPELINE",
    "QlfxError", "UsageError", "TraceError", "UnknownPassError", "EquivalenceError",
]
__version__ = "0.1.0"
