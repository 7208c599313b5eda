"""Resolving a MODEL argument: a zoo name, ``path/file.py:factory`` or ``pkg.module:factory``."""
from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import UsageError


def load_model(spec: str, **factory_kwargs) -> nn.Module:
    """Build the model named by ``spec`` and put it in eval mode."""
    from .models import ZOO, create_model

    if ":" not in spec:
        if spec in ZOO:
            # Zoo models have random weights: seed them, so `qlfx run` and `qlfx compare` of the same
            # name build the same model (and the user's global RNG is left as it was).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return create_model(spec, **factory_kwargs).eval()
        close = difflib.get_close_matches(spec, list(ZOO), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UsageError(
            f"unknown model '{spec}'.{hint} Give a zoo name ({', '.join(sorted(ZOO))}), "
            f"path/to/file.py:factory or package.module:factory"
        )
    where, _, factory_name = spec.rpartition(":")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file '{path}' does not exist")
        mod_name = f"qlfx_user_model_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise UsageError(f"importing '{path}' failed: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise UsageError(f"cannot import module '{where}': {err}") from err
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise UsageError(f"'{where}' has no attribute '{factory_name}'")
    model = factory(**factory_kwargs) if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise UsageError(f"'{spec}' gave a {type(model).__name__}, not a torch.nn.Module")
    if model.training:  # said, because it changes what batchnorm and dropout compute
        print(f"warning: the model from '{spec}' is in train mode; qlfx switches it to eval mode (batchnorm uses "
              f"its running statistics, dropout is off). Call .eval() in the factory to silence this.",
              file=sys.stderr)
        # a copy: the object may be the user's own (a module attribute, a cached model), left as it was
        model = copy.deepcopy(model)
    return model.eval()


def default_input_shape(spec: str) -> tuple[int, ...] | None:
    from .models import ZOO, default_input_shape as zoo_shape

    return tuple(zoo_shape(spec)) if spec in ZOO else None


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.strip().split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"bad --input-shape '{text}': write positive integers like 1,3,224,224")
    return dims


def _read_npy(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} file '{p}' does not exist")
    try:
        return np.load(p, allow_pickle=False)
    except Exception as err:
        raise UsageError(f"cannot read '{p}' as a .npy array: {err}") from err


def load_array(path: str) -> torch.Tensor:
    """Calibration inputs from a float .npy file."""
    arr = _read_npy(path, "calibration")
    if not np.issubdtype(arr.dtype, np.floating):
        raise UsageError(f"calibration array '{path}' has dtype {arr.dtype}; a float array is needed")
    return torch.from_numpy(np.ascontiguousarray(arr)).float()


def load_label_array(path: str) -> torch.Tensor:
    """Class labels from an integer .npy file (one per calibration sample; negative: unlabelled)."""
    arr = _read_npy(path, "labels")
    if not np.issubdtype(arr.dtype, np.integer):
        raise UsageError(f"labels array '{path}' has dtype {arr.dtype}; integer class indices are needed")
    return torch.from_numpy(np.ascontiguousarray(arr)).long()
