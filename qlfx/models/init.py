"""Random BatchNorm statistics for equivalence tests.

A freshly built BatchNorm has running_mean = 0, running_var = 1, weight = 1, bias = 0: the identity
(up to eps), which hides bugs in BN folding, channel permutations and sign/scale symmetries. Every
equivalence test in qlfx randomizes BN first with this function.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["randomize_batchnorm"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """In place, for every BatchNorm{1,2,3}d of ``model`` (in ``model.modules()`` order):

        running_mean ~ N(0, 0.5^2)
        running_var  ~ U(0.5, 2.0)
        weight       ~ +-U(0.5, 1.5)  (random sign: exercises negative BN scales)
        bias         ~ N(0, 0.3^2)

    drawn from ``torch.Generator().manual_seed(seed)`` (same seed, same model -> same values).
    Affine-less or stat-less BNs get only the tensors they have. Returns ``model``.
    """
    generator = torch.Generator().manual_seed(seed)

    for module in model.modules():
        if not isinstance(module, _BATCHNORMS):
            continue
        n = module.num_features
        # All five are drawn even when a tensor is absent, so later BNs get the same values.
        mean = torch.randn(n, generator=generator) * 0.5
        var = torch.empty(n).uniform_(0.5, 2.0, generator=generator)
        magnitude = torch.empty(n).uniform_(0.5, 1.5, generator=generator)
        sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        bias = torch.randn(n, generator=generator) * 0.3
        if module.running_mean is not None:
            module.running_mean.copy_(mean)
        if module.running_var is not None:
            module.running_var.copy_(var)
        if module.weight is not None:
            module.weight.copy_(magnitude * sign)
        if module.bias is not None:
            module.bias.copy_(bias)
    return model
