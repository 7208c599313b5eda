"""qlfx's custom torch ops. Importing this module registers them (importing again is harmless).

Each is an op of the ``qlfx`` library whose one kernel is a CompositeImplicitAutograd definition in
plain torch ops. That choice gives each op two lives: qlfx's capture (``run_decompositions({})``) keeps
CompositeImplicit ops whole, so the IR holds ONE node per fused product or radial activation (passes
and the symmetry analysis match it by name; the emitters lower it to a qlfx-domain ONNX function or a
TVM kernel); every other tool decomposes it into its definition on its own — ``torch.onnx.export`` of a
zoo model, ``torch.compile``, the core ATen table — so a model or ExportedProgram using these ops needs
no qlfx to run or export. Fake tensors and autograd come from the definition too.

``torch.ops.qlfx.branch_product`` — the product of two linear branches of the same input
=====================================================================================

Schema::

    qlfx::branch_product(Tensor x, Tensor weight_a, Tensor? bias_a, Tensor weight_b, Tensor? bias_b,
                         int[] stride, int[] padding_b, int[] dilation_b, int groups_b) -> Tensor

Math, for x of shape (N, C, H, W)::

    a   = conv2d(x, weight_a, bias_a, stride, padding=0)          weight_a: [M, C, 1, 1], groups 1
    b   = conv2d(x, weight_b, bias_b, stride, padding_b, dilation_b, groups_b)
    out = a * b                                                   (N, M, H', W'), no broadcasting

i.e. per output pixel ``out[:, m] = (w_a[m] . x[:, p] + c_a[m]) * (sum_taps w_b[m] . x[:, p + tap] + c_b[m])``.
Two kinds occur in QLNets (the fuse-product pass makes both):

- **pointwise**: weight_b is [M, C, 1, 1], groups_b = 1, padding_b = 0. The authors' PDEBlock
  ``z = conv1x1(u); z[:, :M] * z[:, M:]`` (weight_a, weight_b = the two row halves of the conv) and
  GLU-style gating ``conv_a(u) * conv_b(u)``. One GEMM with 2M output rows whose epilogue multiplies
  row m by row M + m.
- **depthwise**: weight_b is [M, 1, k, k] with groups_b = C (output channel j reads input channel
  j // (M / C)), the paper's Eq.(3) ``conv1x1_a(u) * dw3x3(u)``.

The a-branch always has padding 0, so the two branches produce the same H' x W' only when
``padding_b`` matches the b-kernel's extent (e.g. 1 for a 3x3 with dilation 1); the op checks it.
The reference implementation below is two ``F.conv2d`` calls and a multiply: the op exists so that a
graph can name the fused computation and emitters (ONNX function ``qlfx.BranchProduct``, TVM kernels
in :mod:`qlfx.kernels`) can lower it to one kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["branch_product", "BRANCH_PRODUCT_SCHEMA", "branch_product_reference", "branch_product_kind",
           "hardball", "softball", "radius_of", "RADIAL_OPS"]

BRANCH_PRODUCT_SCHEMA = (
    "(Tensor x, Tensor weight_a, Tensor? bias_a, Tensor weight_b, Tensor? bias_b, int[] stride, "
    "int[] padding_b, int[] dilation_b, int groups_b) -> Tensor"
)


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_shapes(x, weight_a, bias_a, weight_b, bias_b, stride, padding_b, dilation_b, groups_b) -> tuple[int, ...]:
    """Validate the arguments; return the output shape (N, M, H', W'). Plain ``if``s: this runs on every
    call, and a dozen torch._check calls cost more than the op's small convs."""
    def fail(message: str):
        raise RuntimeError(f"qlfx::branch_product: {message}")

    if x.dim() != 4:
        fail(f"x must be (N, C, H, W), got {x.dim()} dims")
    n, c, h, w = x.shape
    if weight_a.dim() != 4 or weight_a.shape[1] != c or weight_a.shape[2] != 1 or weight_a.shape[3] != 1:
        fail(f"weight_a must be [M, {c}, 1, 1], got {tuple(weight_a.shape)}")
    m = weight_a.shape[0]
    if weight_b.dim() != 4 or weight_b.shape[0] != m or weight_b.shape[1] * groups_b != c:
        fail(f"weight_b must be [{m}, C/groups_b, k, k] with C = {c}, groups_b = {groups_b}; "
             f"got {tuple(weight_b.shape)}")
    for name, bias in (("bias_a", bias_a), ("bias_b", bias_b)):
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != m):
            fail(f"{name} must be [{m}], got {tuple(bias.shape)}")
    if len(stride) != 2 or len(padding_b) != 2 or len(dilation_b) != 2:
        fail("stride, padding_b and dilation_b take two ints each")
    size_a = (_output_size(h, 1, stride[0], 0, 1), _output_size(w, 1, stride[1], 0, 1))
    size_b = (_output_size(h, weight_b.shape[2], stride[0], padding_b[0], dilation_b[0]),
              _output_size(w, weight_b.shape[3], stride[1], padding_b[1], dilation_b[1]))
    if size_a != size_b:
        fail(f"the branches give different sizes, {size_a} vs {size_b}; padding_b must match weight_b's extent")
    return (n, m, size_a[0], size_a[1])


def branch_product_reference(x, weight_a, bias_a, weight_b, bias_b, stride, padding_b, dilation_b, groups_b):
    """The op's definition in plain torch (also the CPU/any-device implementation)."""
    a = F.conv2d(x, weight_a, bias_a, stride, 0, 1, 1)
    b = F.conv2d(x, weight_b, bias_b, stride, padding_b, dilation_b, groups_b)
    return a * b


def branch_product_kind(weight_b_shape: Sequence[int], groups_b: int, in_channels: int) -> str | None:
    """"pointwise", "depthwise" or None (a b-branch no qlfx kernel covers)."""
    m, cin_g, kh, kw = weight_b_shape
    if groups_b == 1 and (kh, kw) == (1, 1):
        return "pointwise"
    if groups_b == in_channels and cin_g == 1 and m % in_channels == 0:
        return "depthwise"
    return None


# A Library removes its definitions when it is garbage collected: importlib.reload (which re-runs this
# module in the same namespace) must keep the first one alive rather than replace it.
_LIBRARY = globals().get("_LIBRARY") or torch.library.Library("qlfx", "FRAGMENT")


def _define(name: str, schema: str, definition) -> None:
    """Define ``qlfx::name`` with ``definition`` as its CompositeImplicitAutograd kernel (once)."""
    try:
        getattr(torch.ops.qlfx, name).default  # noqa: B018  (already defined: importlib.reload)
        return
    except (AttributeError, RuntimeError):
        pass
    _LIBRARY.define(f"{name}{schema}")
    _LIBRARY.impl(name, definition, "CompositeImplicitAutograd")


def _branch_product_kernel(x, weight_a, bias_a, weight_b, bias_b, stride, padding_b, dilation_b, groups_b):
    _check_shapes(x, weight_a, bias_a, weight_b, bias_b, stride, padding_b, dilation_b, groups_b)
    return branch_product_reference(x, weight_a, bias_a, weight_b, bias_b, stride, padding_b, dilation_b, groups_b)


_define("branch_product", BRANCH_PRODUCT_SCHEMA, _branch_product_kernel)


# ------------------------------------------------------------------------------ radial activations
"""``torch.ops.qlfx.hardball(Tensor x, float? radius) -> Tensor`` and ``qlfx.softball`` (same schema)
=================================================================================================

They act on the channel vector at each pixel, x in R^C (dim 1 of an (N, C, ...) tensor), and only
rescale it, so they commute with every orthogonal change of basis of the channels::

    hardball(x) = x * r / max(|x|, r)          = x if |x| <= r, else r x / |x|
    softball(x) = x / sqrt(1 + |x|^2 / r^2)

|x| is the Euclidean norm over dim 1; r = sqrt(C) when ``radius`` is None.
"""


def radius_of(x: torch.Tensor, radius: Optional[float]) -> float:
    """The radius in use: ``radius`` if given, otherwise sqrt(C) with C = x.shape[1]."""
    return float(radius) if radius is not None else float(x.shape[1]) ** 0.5


def _check_radial(name: str, x: torch.Tensor, radius: Optional[float]) -> None:
    if x.dim() < 2:
        raise RuntimeError(f"qlfx::{name} expects an input of shape (N, C) or (N, C, H, W) with channels on "
                           f"dim 1, got {x.dim()} dims; add a batch dimension")
    if radius is not None and not radius > 0:
        raise RuntimeError(f"qlfx::{name}: radius must be > 0 (or None for sqrt(C)), got {radius}")


def hardball_reference(x: torch.Tensor, radius: Optional[float] = None) -> torch.Tensor:
    # x * r / max(|x|, r): equal to the definition, never divides by zero, finite gradients at 0
    r = radius_of(x, radius)
    return x * (r / torch.clamp(torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True), min=r))


def softball_reference(x: torch.Tensor, radius: Optional[float] = None) -> torch.Tensor:
    r = radius_of(x, radius)
    return x * torch.rsqrt(1.0 + (x * x).sum(dim=1, keepdim=True) / (r * r))


def _radial_kernel(name: str, reference):
    def kernel(x, radius):
        _check_radial(name, x, radius)
        return reference(x, radius)
    return kernel


_define("hardball", "(Tensor x, float? radius) -> Tensor", _radial_kernel("hardball", hardball_reference))
_define("softball", "(Tensor x, float? radius) -> Tensor", _radial_kernel("softball", softball_reference))
RADIAL_OPS = {"hardball": torch.ops.qlfx.hardball.default, "softball": torch.ops.qlfx.softball.default}


def hardball(x: torch.Tensor, radius: Optional[float] = None) -> torch.Tensor:
    """``torch.ops.qlfx.hardball``: x if |x| <= r else r x / |x| (norm over dim 1, r = sqrt(C) by default)."""
    return torch.ops.qlfx.hardball(x, None if radius is None else float(radius))


def softball(x: torch.Tensor, radius: Optional[float] = None) -> torch.Tensor:
    """``torch.ops.qlfx.softball``: x / sqrt(1 + |x|^2 / r^2) (norm over dim 1, r = sqrt(C) by default)."""
    return torch.ops.qlfx.softball(x, None if radius is None else float(radius))


def branch_product(x, weight_a, bias_a, weight_b, bias_b, stride=(1, 1), padding_b=(0, 0), dilation_b=(1, 1),
                   groups_b=1) -> torch.Tensor:
    """Call ``torch.ops.qlfx.branch_product`` (see module docstring); ints may be given as scalars."""
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]  # noqa: E731
    return torch.ops.qlfx.branch_product(x, weight_a, bias_a, weight_b, bias_b, pair(stride), pair(padding_b),
                                         pair(dilation_b), int(groups_b))
