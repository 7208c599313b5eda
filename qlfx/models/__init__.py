"""qlfx model zoo: the QLNet layouts (authors' PDEBlock, paper Eq.(3)) and their activations."""
from .activations import Hardball, Softball
from .eq3 import Eq3Block, QLNetEq3, qlnet_eq3
from .init import randomize_batchnorm
from .pde_block import PDEBlock, QLNet, qlnet, qlnet26, qlnet50
from .zoo import DEFAULT_MODEL, ZOO, create_model, default_input_shape

__all__ = [
    "Hardball",
    "Softball",
    "PDEBlock",
    "Eq3Block",
    "QLNet",
    "QLNetEq3",
    "qlnet",
    "qlnet50",
    "qlnet26",
    "qlnet_eq3",
    "ZOO",
    "create_model",
    "default_input_shape",
    "DEFAULT_MODEL",
    "randomize_batchnorm",
]
