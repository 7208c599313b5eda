"""Radial activations of the QLNet paper: hardball and softball.

Both act on the channel vector at each pixel, x in R^C (dim 1 of an (N, C) or (N, C, H, W) tensor),
and only rescale it, so they commute with any orthogonal change of basis of the channel space:

    hardball(x) = x                 if |x| <= r
                = r * x / |x|       otherwise          (projection onto the ball of radius r)
    softball(x) = x / sqrt(1 + |x|^2 / r^2)            (smooth, |softball(x)| < r)

|x| is the Euclidean norm over channels; r = sqrt(C) unless a radius is given.

Both run qlfx's custom ops (:mod:`qlfx.ops`), so a captured graph holds each as one node; the symmetry
analysis also recognises radial activations written out by hand (see qlfx.symmetry).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import hardball, softball

__all__ = ["Hardball", "Softball", "resolve_radius"]


def resolve_radius(radius: float | None, num_channels: int) -> float:
    """The radius in use: ``radius`` if given, otherwise sqrt(num_channels)."""
    return float(radius) if radius is not None else math.sqrt(num_channels)


class _RadialActivation(nn.Module):
    op = None  # the qlfx custom op

    def __init__(self, radius: float | None = None):
        super().__init__()
        if radius is not None and not radius > 0:
            raise ValueError(f"{type(self).__name__}: radius must be > 0 (or None for sqrt(C)), got {radius}")
        # None means sqrt(C), with C read from the input at run time (never cached, so one module
        # may serve inputs of different widths).
        self.radius = None if radius is None else float(radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self).op(x, self.radius)

    def extra_repr(self) -> str:
        return "radius=sqrt(C)" if self.radius is None else f"radius={self.radius:g}"


class Hardball(_RadialActivation):
    """hardball(x) = x if |x| <= r else r x / |x|, norm over dim 1; r = sqrt(C) by default.
    Runs ``torch.ops.qlfx.hardball`` (computed as x * r / max(|x|, r): never divides by zero)."""

    op = staticmethod(hardball)


class Softball(_RadialActivation):
    """softball(x) = x / sqrt(1 + |x|^2 / r^2), norm over dim 1; r = sqrt(C) by default.
    Runs ``torch.ops.qlfx.softball``."""

    op = staticmethod(softball)
