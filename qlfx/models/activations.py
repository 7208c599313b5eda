"""Radial activations of the QLNet paper: hardball and softball.

Both act on the channel vector at each pixel, x in R^C (dim 1 of an (N, C) or (N, C, H, W) tensor),
and only rescale it, so they commute with any orthogonal change of basis of the channel space:

    hardball(x) = x                 if |x| <= r
                = r * x / |x|       otherwise          (projection onto the ball of radius r)
    softball(x) = x / sqrt(1 + |x|^2 / r^2)            (smooth, |softball(x)| < r)

|x| is the Euclidean norm over channels; r = sqrt(C) unless a radius is given.

The qlfx tracer treats these as leaf modules, so their forward may read ``x.shape``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["Hardball", "Softball", "resolve_radius"]


def resolve_radius(radius: float | None, num_channels: int) -> float:
    """The radius in use: ``radius`` if given, otherwise sqrt(num_channels)."""
    return float(radius) if radius is not None else math.sqrt(num_channels)


def _check_input(module_name: str, x: torch.Tensor) -> None:
    # torch._assert (not `if`) so that even a plain torch.fx.symbolic_trace, which inlines these
    # modules, does not hit data-dependent control flow.
    torch._assert(
        x.dim() >= 2,
        f"{module_name} expects an input of shape (N, C) or (N, C, H, W) with channels on dim 1; "
        "add a batch dimension.",
    )


class _RadialActivation(nn.Module):
    def __init__(self, radius: float | None = None):
        super().__init__()
        if radius is not None and not radius > 0:
            raise ValueError(f"{type(self).__name__}: radius must be > 0 (or None for sqrt(C)), got {radius}")
        # None means sqrt(C), with C read from the input at run time (never cached, so one module
        # may serve inputs of different widths).
        self.radius = None if radius is None else float(radius)

    def _radius_for(self, x: torch.Tensor):
        """r for input x. Written as C ** 0.5 (not math.sqrt) so it also traces when inlined."""
        return self.radius if self.radius is not None else x.shape[1] ** 0.5

    def extra_repr(self) -> str:
        return "radius=sqrt(C)" if self.radius is None else f"radius={self.radius:g}"


class Hardball(_RadialActivation):
    """hardball(x) = x if |x| <= r else r x / |x|, norm over dim 1; r = sqrt(C) by default.

    Computed as x * r / max(|x|, r): equal to the definition, and it never divides by zero
    (r > 0), so a zero pixel maps to zero with finite gradients.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("Hardball", x)
        r = self._radius_for(x)
        norm = torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True)
        return x * (r / torch.clamp(norm, min=r))


class Softball(_RadialActivation):
    """softball(x) = x / sqrt(1 + |x|^2 / r^2), norm over dim 1; r = sqrt(C) by default."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("Softball", x)
        r = self._radius_for(x)
        squared_norm = (x * x).sum(dim=1, keepdim=True)
        return x * torch.rsqrt(1.0 + squared_norm / (r * r))
