"""Model registry: name -> builder, plus each model's default input shape.

    create_model("qlnet50")                 authors' PDEBlock layout, 1000 classes, 224x224
    create_model("qlnet-eq3")               paper Eq.(3), weight sharing, softball@ds, 100 classes
    create_model("qlnet-tiny")              small PDEBlock net for tests/CI (10 classes, 32x32)

Keyword arguments given to ``create_model`` override the entry's defaults.
"""
from __future__ import annotations

import difflib
from functools import partial
from typing import Callable

import torch.nn as nn

from .eq3 import qlnet_eq3
from .pde_block import qlnet, qlnet26, qlnet50

__all__ = ["ZOO", "create_model", "default_input_shape", "DEFAULT_MODEL", "IMAGENET_INPUT_SHAPE", "TINY_INPUT_SHAPE"]

IMAGENET_INPUT_SHAPE = (1, 3, 224, 224)
TINY_INPUT_SHAPE = (1, 3, 32, 32)
_TINY = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)

ZOO: dict[str, Callable[..., nn.Module]] = {
    "qlnet50": qlnet50,
    "qlnet26": qlnet26,
    "qlnet-eq3": partial(qlnet_eq3, num_classes=100, weight_sharing=True, activation="softball"),
    "qlnet-eq3-hardtanh": partial(qlnet_eq3, num_classes=100, activation="hardtanh"),
    "qlnet-eq3-hardball": partial(qlnet_eq3, num_classes=100, activation="hardball"),
    "qlnet-eq3-nows": partial(qlnet_eq3, num_classes=100, weight_sharing=False),
    "qlnet-eq3-nows-x6": partial(qlnet_eq3, num_classes=100, weight_sharing=False, expansion=6),
    "qlnet-eq3-relu": partial(qlnet_eq3, num_classes=100, activation="relu_all"),
    "qlnet-tiny": partial(qlnet, **_TINY),
    "qlnet-eq3-tiny": partial(qlnet_eq3, **_TINY),
}

_INPUT_SHAPES: dict[str, tuple[int, int, int, int]] = {
    name: TINY_INPUT_SHAPE if name.endswith("-tiny") else IMAGENET_INPUT_SHAPE for name in ZOO
}

DEFAULT_MODEL = "qlnet50"


def _unknown_name_error(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(ZOO), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(ZOO))}")


def create_model(name: str = DEFAULT_MODEL, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` override its defaults (e.g. num_classes)."""
    if name not in ZOO:
        raise _unknown_name_error(name)
    return ZOO[name](**kwargs)


def default_input_shape(name: str) -> tuple[int, int, int, int]:
    """(N, C, H, W) the model ``name`` is meant to run on: 1x3x224x224, or 1x3x32x32 for tiny ones."""
    if name not in _INPUT_SHAPES:
        raise _unknown_name_error(name)
    return _INPUT_SHAPES[name]
