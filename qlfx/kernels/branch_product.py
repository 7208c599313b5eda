"""The fused branch-product kernel: two convolutions of one input, multiplied elementwise (and its
one-branch case, the packed 1x1 convolution every other 1x1 conv of the network runs on).

Math (NCHW, fp32)::

    out[n, m, ho, wo] = A[n, m, ho, wo] * B[n, m, ho, wo]
    A = conv2d(x, weight_a, bias_a, stride, padding=0)            weight_a: [M, Cin, 1, 1]
    B = conv2d(x, weight_b, bias_b, stride, padding_b, dilation_b, groups_b)

Three kinds:

* ``pointwise`` (PDEBlock / GLU): weight_b is also [M, Cin, 1, 1], groups 1. Both operands are rows of
  one GEMM ``[2M, Cin] x [Cin, P]`` (P = Ho*Wo); the kernel accumulates the A row and the B row of the
  same output channel in registers side by side and multiplies them in the epilogue, so the product
  never touches memory.
* ``depthwise`` (paper Eq.(3)): weight_b is [M, 1, k, k] with groups_b = Cin and M = mult*Cin; output
  channel o reads input channel o // mult. A is a GEMM; B is a 9-tap stencil computed for the same
  output tile right before the epilogue, vectorised along the tile's pixels (part of one output row,
  contiguous in the padded input), its weights broadcast. (Vectorised along the channels instead, a
  vector holds only the ``mult`` outputs of one input channel: the stencil then cost as much as the
  GEMM at stage 1 of Eq.(3).)
* ``conv1x1``: the A branch alone, ``out = conv2d(x, weight_a) + bias_a`` (no weight_b): the 1x1
  convolutions that are no branch product (projections, strided shortcuts, expansions) get the same
  packed-weight GEMM micro-kernel. TVM's legalized NCHW conv vectorises along pixels and broadcasts
  weights, which re-streams the whole input from L3 once per channel tile (10-18 GFLOP/s on qlnet50's
  projections, against 80+ for this kernel).

* ``separable``: a depthwise conv, then a 1x1 conv over its output (a depthwise-separable conv; the
  PDEBlock's dw3x3 -> conv1x1_out after expand-depthwise, MobileNet's dw -> pw)::

      hidden = clamp(conv2d(x, weight_b, bias_b, stride, padding_b, dilation_b, groups=Cin))   [Cin*mult]
      out    = conv2d(hidden, weight_a) + bias_a

  with an optional clamp (ReLU, ReLU6, hardtanh) between the two. ``hidden`` (the largest tensor of
  a PDEBlock: 2W channels) never touches memory: for every pixel tile it is computed into a buffer of
  ``mid_channels x p_tile`` floats, vectorised along the pixels of the tile (one output row holds the
  tile), and the GEMM runs every channel tile over it (pixel tiles outer). The padded input is one
  stage of its own.

Any kind may end in a residual add (``has_residual``): ``out = op(x) + residual``, residual an input of
the output's shape, added in the epilogue while the tile is in registers. The residual stream of a
ResNet-shaped net then costs one read instead of an extra kernel that reads both operands and writes
the sum (the adds were 7 % of the Eq.(3) module's time).

Design (why it is formulated this way)
--------------------------------------
* Weights are constants, so they are packed once, on the host, into a blocked layout
  ``[ceil(M/16), Cin, 16]`` (see :func:`pack_weights`): one 16-wide block of output channels is one
  AVX-512 register, and a block's whole reduction panel is one contiguous stream. M is padded to a
  multiple of 16 with zero rows, so the reduction never needs a predicate; only the epilogue (which
  writes the real M channels) has one.
* The GEMM accumulator is its own block ``acc[n, p, t, m]`` (t = 0 for A, 1 for B) with the output
  channel innermost: vectors along m are contiguous in the accumulator tile, and the register tile is
  ``(p_tile) x (t) x (m_vecs*16)``. The epilogue block ``out`` is the schedule's *anchor*: it is tiled,
  and the producers are ``compute_at``-ed into its tile loop. That sidesteps the
  ``reverse_compute_at`` failures MetaSchedule's default space runs into on a naive ``split * mul``.
* The micro-kernel (llvm): for each reduction step c, load ``2*m_vecs`` weight vectors, broadcast
  ``p_tile`` input scalars, issue ``2*m_vecs*p_tile`` FMAs. With m_vecs=1, p_tile=7 that is 14
  accumulators + 2 weight registers + 1 broadcast: the tiles that fill all 32 zmm registers measured
  slower (see :func:`default_llvm_knobs`).

TVM 0.27 API notes / pitfalls (learned the hard way)
----------------------------------------------------
* Schedules live in ``tvm.s_tir`` (``tvm.s_tir.Schedule``); blocks are ``sch.get_sblock(name)``; TIR
  nodes/ops are ``tvm.tirx``. ``te.create_prim_func([...])`` makes the schedulable PrimFunc.
* ``tvm.compile(mod, target)`` returns a ``tvm.runtime.Executable``: call it (runs ``main``) or use
  ``exe.mod`` (the runtime Module) for ``time_evaluator("main", dev, ...)`` and
  ``inspect_source("asm"|"ll")``. CUDA source: ``exe.mod.imports[0].inspect_source()``.
* Targets are dicts: ``Target({"kind": "llvm", "mcpu": "...", "num-cores": 2})``.
* Intermediate buffers above 1024 bytes (``kMaxStackAlloca``) are allocated with
  ``TVMBackendAllocWorkspace`` rather than on the stack. LLVM still keeps the accumulators in
  registers inside the reduction loop, *provided every access to the tile uses constant indices*:
  the epilogue loops must be unrolled too, or the whole tile is spilled and the kernel runs 40x slower.
* The accumulator layout matters: with m not innermost the "vector" loads of the tile become
  16 ``vinsertps`` gathers per FMA.
* Knobs must reach the schedule as RVs: ``sch.split(loop, [None, sch.sample_categorical(...)])``.
  A Python int read back from a sample is baked into the trace as a constant, so re-sampling it (what
  MetaSchedule's search does) would change nothing, and trace simplification drops the unused sample.
* ``sch.fuse(ho, wo)`` followed by a pixel split that crosses rows gives compute_at a non-constant
  ("Sub") region; ``transform_block_layout`` to one flat pixel iter var avoids it.
* ``tvm.ir.structural_equal`` is gone in 0.27; use ``tvm.ir.assert_structural_equal``.
* The target's ``num-cores`` does not set the runtime thread count; ``TVM_NUM_THREADS`` does.
* The unrolled reduction order must be (c, p, t, m-vec): broadcast one x scalar and use it for the A
  and B FMAs at once. With (c, t, p) LLVM keeps p_tile broadcasts live across t and spills.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

#: Output channels per packed weight block (one AVX-512 fp32 vector).
WEIGHT_BLOCK = 16

Kind = Literal["pointwise", "depthwise", "conv1x1", "separable"]
KINDS = ("pointwise", "depthwise", "conv1x1", "separable")


# ----------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class BranchProductSpec:
    """Shape and options of one branch-product op; all static but ``batch``, which may be None: any
    batch size (a symbolic ``n`` in the PrimFunc, for graphs captured with ``dynamic_batch``; the
    schedules never split the batch, so a schedule tuned at one batch size serves every batch size).

    ``kernel_size_b``/``padding_b``/``groups_b`` default from ``kind``: pointwise 1/0/1,
    depthwise 3/dilation_b*(k-1)//2/in_channels; conv1x1 has no b branch (1/0/1, ``has_bias_b`` False).
    separable: the b branch is the depthwise conv (``in_channels -> mid_channels``, a multiple; default
    ``in_channels``), conv a the 1x1 conv over it (``mid_channels -> out_channels``), ``clamp_min`` /
    ``clamp_max`` the optional clamp between them; the stride is the depthwise conv's.
    """

    batch: int | None
    in_channels: int
    height: int
    width: int
    out_channels: int
    kind: Kind = "pointwise"
    stride: int = 1
    kernel_size_b: int | None = None
    padding_b: int | None = None
    dilation_b: int = 1
    groups_b: int | None = None
    has_bias_a: bool = True
    has_bias_b: bool = True
    has_residual: bool = False
    mid_channels: int | None = None
    clamp_min: float | None = None
    clamp_max: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"BranchProductSpec.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "separable":
            if self.mid_channels is None:
                object.__setattr__(self, "mid_channels", self.in_channels)
            if self.mid_channels % self.in_channels:
                raise ValueError(f"separable needs mid_channels ({self.mid_channels}) to be a multiple of in_channels "
                                 f"({self.in_channels}): depthwise channel o reads input channel o // multiplier")
        elif self.mid_channels is not None or self.clamp_min is not None or self.clamp_max is not None:
            raise ValueError("mid_channels / clamp_min / clamp_max belong to kind='separable'")
        one_by_one = self.kind not in ("depthwise", "separable")
        if self.kernel_size_b is None:
            object.__setattr__(self, "kernel_size_b", 1 if one_by_one else 3)
        if self.padding_b is None:
            pad = 0 if one_by_one else self.dilation_b * (self.kernel_size_b - 1) // 2
            object.__setattr__(self, "padding_b", pad)
        if self.groups_b is None:
            object.__setattr__(self, "groups_b", 1 if one_by_one else self.in_channels)
        if self.kind == "conv1x1" and (self.has_bias_b or (self.kernel_size_b, self.padding_b, self.groups_b,
                                                           self.dilation_b) != (1, 0, 1, 1)):
            raise ValueError("a conv1x1 spec has no b branch: leave kernel_size_b/padding_b/groups_b/dilation_b "
                             "at their defaults and set has_bias_b=False")
        for name in ("batch", "in_channels", "height", "width", "out_channels", "stride", "dilation_b"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"BranchProductSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.kind in ("conv1x1", "separable"):
            pass
        elif self.kind == "pointwise":
            if (self.kernel_size_b, self.padding_b, self.groups_b) != (1, 0, 1):
                raise ValueError(
                    "pointwise branch product needs weight_b 1x1, padding_b 0, groups_b 1; got "
                    f"kernel_size_b={self.kernel_size_b}, padding_b={self.padding_b}, groups_b={self.groups_b}. "
                    "Use kind='depthwise' for a depthwise weight_b."
                )
        else:
            if self.groups_b != self.in_channels:
                raise ValueError(
                    f"depthwise branch product needs groups_b == in_channels ({self.in_channels}), got {self.groups_b}"
                )
            if self.out_channels % self.in_channels:
                raise ValueError(
                    f"depthwise branch product needs out_channels ({self.out_channels}) to be a multiple of "
                    f"in_channels ({self.in_channels}): output channel o reads input channel o // multiplier"
                )
        out_a = ((self.height - 1) // self.stride + 1, (self.width - 1) // self.stride + 1)
        out_b = tuple(
            (size + 2 * self.padding_b - self.dilation_b * (self.kernel_size_b - 1) - 1) // self.stride + 1
            for size in (self.height, self.width)
        )
        if out_a != out_b:
            raise ValueError(
                f"the two branches disagree on the output size: conv a (1x1, stride {self.stride}) gives {out_a}, "
                f"conv b (k={self.kernel_size_b}, padding {self.padding_b}, dilation {self.dilation_b}) gives "
                f"{out_b}; choose padding_b = dilation_b*(kernel_size_b-1)//2"
            )

    # --- derived shapes
    @property
    def out_height(self) -> int:
        return (self.height - 1) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width - 1) // self.stride + 1

    @property
    def out_pixels(self) -> int:
        return self.out_height * self.out_width

    @property
    def output_shape(self) -> tuple:
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def input_shape(self) -> tuple:
        return (self.batch, self.in_channels, self.height, self.width)

    def with_batch(self, batch: int | None) -> "BranchProductSpec":
        return dataclasses.replace(self, batch=batch)

    @property
    def depth_multiplier(self) -> int:
        """Output channels per input channel of conv b (depthwise, separable); 1 otherwise."""
        if self.kind == "separable":
            return self.mid_channels // self.in_channels
        return self.out_channels // self.in_channels if self.kind == "depthwise" else 1

    @property
    def reduction_channels(self) -> int:
        """Channels the GEMM reduces over: the depthwise conv's outputs for separable, else the input's."""
        return self.mid_channels if self.kind == "separable" else self.in_channels

    @property
    def operands(self) -> int:
        """Accumulator rows per output channel in the GEMM tile: 2 for pointwise (A and B), else 1."""
        return 2 if self.kind == "pointwise" else 1

    @property
    def padded_out_channels(self) -> int:
        """M rounded up to the weight block: the packed weights carry zero rows beyond M."""
        return -(-self.out_channels // WEIGHT_BLOCK) * WEIGHT_BLOCK

    @property
    def weight_a_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.reduction_channels, 1, 1)

    @property
    def weight_b_shape(self) -> tuple[int, int, int, int]:
        k = self.kernel_size_b
        if self.kind == "separable":
            return (self.mid_channels, 1, k, k)
        return (self.out_channels, self.in_channels // self.groups_b, k, k)

    @property
    def packed_weight_a_shape(self) -> tuple[int, int, int]:
        return (self.padded_out_channels // WEIGHT_BLOCK, self.reduction_channels, WEIGHT_BLOCK)

    @property
    def packed_weight_b_shape(self) -> tuple[int, ...] | None:
        if self.kind == "conv1x1":
            return None
        if self.kind in ("separable", "depthwise"):  # [channels, k, k]: scalars broadcast along pixels
            return (self.weight_b_shape[0], self.kernel_size_b, self.kernel_size_b)
        return (self.padded_out_channels // WEIGHT_BLOCK, self.in_channels, WEIGHT_BLOCK)

    @property
    def flops(self) -> int:
        """2 * (MACs of conv a + MACs of conv b) + one multiply per output element (biases not counted),
        per image when the batch is symbolic; conv1x1: 2 * MACs of conv a."""
        outputs = (self.batch or 1) * self.out_channels * self.out_pixels
        macs_a = outputs * self.reduction_channels
        if self.kind == "conv1x1":
            return 2 * macs_a
        if self.kind == "separable":
            return 2 * macs_a + 2 * (self.batch or 1) * self.mid_channels * self.out_pixels * self.kernel_size_b**2
        macs_b = outputs * (self.in_channels // self.groups_b) * self.kernel_size_b**2
        return 2 * (macs_a + macs_b) + outputs

    def name(self) -> str:
        bias = ("a" if self.has_bias_a else "") + ("b" if self.has_bias_b else "")
        residual = "_residual" if self.has_residual else ""
        if self.kind == "conv1x1":
            return (f"packed_conv1x1_n{self.batch or 'any'}_c{self.in_channels}_{self.height}x{self.width}"
                    f"_m{self.out_channels}_s{self.stride}_bias{bias or 'none'}{residual}")
        if self.kind == "separable":
            clamp = "" if self.clamp_min is None and self.clamp_max is None else \
                f"_clamp{self.clamp_min}_{self.clamp_max}".replace(".", "p").replace("-", "m")
            return (f"separable_n{self.batch or 'any'}_c{self.in_channels}_{self.height}x{self.width}"
                    f"_mid{self.mid_channels}_m{self.out_channels}_s{self.stride}_k{self.kernel_size_b}"
                    f"_d{self.dilation_b}_bias{bias or 'none'}{clamp}{residual}")
        return (
            f"branch_product_{self.kind}_n{self.batch or 'any'}_c{self.in_channels}_{self.height}x{self.width}"
            f"_m{self.out_channels}_s{self.stride}_k{self.kernel_size_b}_d{self.dilation_b}_bias{bias or 'none'}"
            f"{residual}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------- weight packing
def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype="float32")


def pack_weights(
    spec: BranchProductSpec,
    weight_a: Any,
    bias_a: Any | None,
    weight_b: Any | None = None,
    bias_b: Any | None = None,
) -> list[np.ndarray]:
    """Torch-layout weights -> the kernel's argument list (without x and out), in parameter order.

    weight_a [M, Cin, 1, 1] -> [ceil(M/16), Cin, 16]   (packed[mb, c, j] = weight_a[16*mb + j, c])
    weight_b pointwise: same; depthwise [M, 1, k, k] -> [M, k, k].
    Rows beyond M are zero. Biases stay [M]; absent biases are dropped when the spec has none.
    conv1x1: weight_b and bias_b are None. separable: weight_a [M, mid, 1, 1] -> [ceil(M/16), mid, 16],
    weight_b [mid, 1, k, k] -> [mid, k, k], bias_b [mid].
    """
    wa = _to_numpy(weight_a)
    if wa.shape != spec.weight_a_shape:
        raise ValueError(f"weight_a has shape {wa.shape}, the spec needs {spec.weight_a_shape}")
    if spec.kind == "conv1x1" and (weight_b is not None or bias_b is not None):
        raise ValueError("a conv1x1 spec has no b branch: pass weight_b=None, bias_b=None")
    wb = None if spec.kind == "conv1x1" else _to_numpy(weight_b)
    if wb is not None and wb.shape != spec.weight_b_shape:
        raise ValueError(f"weight_b has shape {wb.shape}, the spec needs {spec.weight_b_shape}")
    m, mp, vb = spec.out_channels, spec.padded_out_channels, WEIGHT_BLOCK

    def blocked(rows: np.ndarray) -> np.ndarray:  # rows: [M, ...] -> [Mp/16, ..., 16]
        padded = np.zeros((mp,) + rows.shape[1:], dtype="float32")
        padded[:m] = rows
        blocks = padded.reshape((mp // vb, vb) + rows.shape[1:])
        return np.ascontiguousarray(np.moveaxis(blocks, 1, -1))

    args: list[np.ndarray] = [blocked(wa.reshape(m, spec.reduction_channels))]
    if spec.has_bias_a:
        if bias_a is None:
            raise ValueError("the spec has has_bias_a=True but bias_a is None")
        args.append(_to_numpy(bias_a).reshape(m))
    if spec.kind == "conv1x1":
        return args
    if spec.kind == "pointwise":
        args.append(blocked(wb.reshape(m, spec.in_channels)))
    else:
        args.append(np.ascontiguousarray(wb.reshape(spec.packed_weight_b_shape), dtype="float32"))
    if spec.has_bias_b:
        if bias_b is None:
            raise ValueError("the spec has has_bias_b=True but bias_b is None")
        args.append(_to_numpy(bias_b).reshape(spec.mid_channels if spec.kind == "separable" else m))
    return args


def reference_numpy(spec: BranchProductSpec, x, weight_a, bias_a, weight_b=None, bias_b=None,
                    residual=None) -> np.ndarray:
    """Plain (slow, float64) numpy reference of the op, for tests without torch."""
    out = _reference_without_residual(spec, x, weight_a, bias_a, weight_b, bias_b)
    if spec.has_residual:
        out = out + _to_numpy(residual).astype("float64")
    return out.astype("float32")


def _depthwise_reference(spec: BranchProductSpec, x: np.ndarray, wb: np.ndarray, channels: int) -> np.ndarray:
    """float64 depthwise conv of x ([N, Cin, H, W]) with wb ([channels, 1, k, k], channel o reading
    input channel o // (channels // Cin)), the spec's stride, padding_b and dilation_b."""
    s, k, d, pad = spec.stride, spec.kernel_size_b, spec.dilation_b, spec.padding_b
    ho, wo = spec.out_height, spec.out_width
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    xin = np.repeat(xp, channels // x.shape[1], axis=1)
    out = np.zeros((x.shape[0], channels, ho, wo))
    for kh in range(k):
        for kw in range(k):
            tap = xin[:, :, kh * d : kh * d + (ho - 1) * s + 1 : s, kw * d : kw * d + (wo - 1) * s + 1 : s]
            out += wb[None, :, 0, kh, kw, None, None] * tap
    return out


def _reference_without_residual(spec: BranchProductSpec, x, weight_a, bias_a, weight_b, bias_b) -> np.ndarray:
    x = _to_numpy(x).astype("float64")
    if spec.kind == "separable":
        hidden = _depthwise_reference(spec, x, _to_numpy(weight_b).astype("float64"), spec.mid_channels)
        if bias_b is not None:
            hidden += _to_numpy(bias_b).reshape(1, -1, 1, 1)
        hidden = np.clip(hidden, -np.inf if spec.clamp_min is None else spec.clamp_min,
                         np.inf if spec.clamp_max is None else spec.clamp_max)
        out = np.einsum("mc,nchw->nmhw", _to_numpy(weight_a).astype("float64")[:, :, 0, 0], hidden)
        return out if bias_a is None else out + _to_numpy(bias_a).reshape(1, -1, 1, 1)
    wa = _to_numpy(weight_a).astype("float64")
    s, ho, wo = spec.stride, spec.out_height, spec.out_width
    xs = x[:, :, : (ho - 1) * s + 1 : s, : (wo - 1) * s + 1 : s]
    a = np.einsum("mc,nchw->nmhw", wa[:, :, 0, 0], xs)
    if bias_a is not None:
        a += _to_numpy(bias_a).reshape(1, -1, 1, 1)
    if spec.kind == "conv1x1":
        return a
    wb = _to_numpy(weight_b).astype("float64")
    if spec.kind == "pointwise":
        b = np.einsum("mc,nchw->nmhw", wb[:, :, 0, 0], xs)
    else:
        b = _depthwise_reference(spec, x, wb, spec.out_channels)
    if bias_b is not None:
        b += _to_numpy(bias_b).reshape(1, -1, 1, 1)
    return a * b


# ------------------------------------------------------------------------------ the PrimFunc
def _depthwise_stage(spec: BranchProductSpec, x: Any, weight_b: Any, n_: Any, channels: int) -> Any:
    """The depthwise conv of the depthwise and separable kinds, ``dw[n, c, p]`` over the flat output
    pixel p (its padded input ``xpad`` a stage of its own)::

        xpad[n, c, i, j] = x[n, c, i - pad, j - pad] inside, 0 outside
        dw[n, c, p]      = sum_{ki,kj} Wb[c, ki, kj] * xpad[n, c // mult, ho*s + ki*d, wo*s + kj*d]
    """
    _, cin, h, w = spec.input_shape
    k, d, pad, s, mult = spec.kernel_size_b, spec.dilation_b, spec.padding_b, spec.stride, spec.depth_multiplier
    wo = spec.out_width
    xpad = te.compute(
        (n_, cin, h + 2 * pad, w + 2 * pad),
        lambda n, c, i, j: tirx.if_then_else(tirx.all(i >= pad, i < h + pad, j >= pad, j < w + pad),
                                             x[n, c, i - pad, j - pad], tirx.const(0.0, "float32")),
        name="xpad",
    )
    ki = te.reduce_axis((0, k), name="ki")
    kj = te.reduce_axis((0, k), name="kj")
    return te.compute(
        (n_, channels, spec.out_pixels),
        lambda n, c, p: te.sum(weight_b[c, ki, kj] * xpad[n, c // mult, (p // wo) * s + ki * d, (p % wo) * s + kj * d],
                               axis=[ki, kj]),
        name="dw",
    )


def _separable_hidden(spec: BranchProductSpec, x: Any, weight_b: Any, bias_b: Any, n_: Any) -> Any:
    """The separable kind's hidden value ``hidden[n, c, p] = clamp(dw[n, c, p] + bias_b[c])``."""
    dw = _depthwise_stage(spec, x, weight_b, n_, spec.mid_channels)

    def activation(n, c, p):
        value = dw[n, c, p] if bias_b is None else dw[n, c, p] + bias_b[c]
        if spec.clamp_min is not None:
            value = tirx.max(value, tirx.const(spec.clamp_min, "float32"))
        if spec.clamp_max is not None:
            value = tirx.min(value, tirx.const(spec.clamp_max, "float32"))
        return value

    return te.compute((n_, spec.mid_channels, spec.out_pixels), activation, name="hidden")


def branch_product_primfunc(spec: BranchProductSpec) -> tirx.PrimFunc:
    """Unscheduled TIR of the op. Parameters: x, weight_a (packed), bias_a?, weight_b (packed)?, bias_b?,
    residual?, out.

    Blocks::

        acc[n, p, t, m] = sum_c W_t[m, c] * x[n, c, (p // Wo)*s, (p % Wo)*s]    t in {A} or {A, B}
        dw[n, m, p]     = sum_{i,j} Wb[m, i, j] * xpad[n, m // mult, ho*s + i*d, wo*s + j*d]  (m < M)
                                                                               (depthwise kind only)
        out[n, m, ho, wo] = (acc[n, p, 0, m] + bias_a[m]) * (B[n, p, m] + bias_b[m]),  p = ho*Wo + wo
                          (conv1x1: acc[n, p, 0, m] + bias_a[m]);  + residual[n, m, ho, wo] if any

    over the padded channel range m < ceil(M/16)*16 for the producers (zero weight rows) and m < M for
    ``out``. The PrimFunc is named after ``spec.name()`` via the ``global_symbol`` attribute.
    """
    vb = WEIGHT_BLOCK
    n_, cin, h, w = spec.input_shape
    if n_ is None:  # any batch size: bound from x's shape when called
        n_ = tirx.Var("n", "int32")
    m_out, mp = spec.out_channels, spec.padded_out_channels
    ho, wo, s = spec.out_height, spec.out_width, spec.stride
    pixels = spec.out_pixels

    x = te.placeholder((n_, cin, h, w), "float32", name="x")
    weight_a = te.placeholder(spec.packed_weight_a_shape, "float32", name="weight_a")
    weight_b = None if spec.kind == "conv1x1" else te.placeholder(spec.packed_weight_b_shape, "float32",
                                                                   name="weight_b")
    bias_a = te.placeholder((m_out,), "float32", name="bias_a") if spec.has_bias_a else None
    bias_b = te.placeholder((spec.mid_channels if spec.kind == "separable" else m_out,), "float32",
                            name="bias_b") if spec.has_bias_b else None
    residual = te.placeholder((n_, m_out, ho, wo), "float32", name="residual") if spec.has_residual else None

    def x_at(n, c, p):
        return x[n, c, (p // wo) * s, (p % wo) * s]

    c = te.reduce_axis((0, cin), name="c")
    if spec.kind == "pointwise":
        # One reduction produces both operands: t selects the weight; after unrolling t the select
        # folds away, and one broadcast of x feeds the A and the B FMA.
        acc = te.compute(
            (n_, pixels, 2, mp),
            lambda n, p, t, m: te.sum(
                tirx.if_then_else(t == 0, weight_a[m // vb, c, m % vb], weight_b[m // vb, c, m % vb])
                * x_at(n, c, p),
                axis=c,
            ),
            name="acc",
        )
        operand_b = lambda n, p, m: acc[n, p, 1, m]  # noqa: E731
    elif spec.kind == "conv1x1":
        acc = te.compute(
            (n_, pixels, 1, mp),
            lambda n, p, t, m: te.sum(weight_a[m // vb, c, m % vb] * x_at(n, c, p), axis=c),
            name="acc",
        )
        operand_b = None
    elif spec.kind == "separable":
        hidden = _separable_hidden(spec, x, weight_b, bias_b, n_)
        c = te.reduce_axis((0, spec.mid_channels), name="c")
        acc = te.compute(
            (n_, pixels, 1, mp),
            lambda n, p, t, m: te.sum(weight_a[m // vb, c, m % vb] * hidden[n, c, p], axis=c),
            name="acc",
        )
        operand_b = None
    else:
        acc = te.compute(
            (n_, pixels, 1, mp),
            lambda n, p, t, m: te.sum(weight_a[m // vb, c, m % vb] * x_at(n, c, p), axis=c),
            name="acc",
        )
        dw = _depthwise_stage(spec, x, weight_b, n_, m_out)  # the real channels: only out reads it
        operand_b = lambda n, p, m: dw[n, m, p]  # noqa: E731

    def value(n, m, i, j):
        p = i * wo + j
        a_val = acc[n, p, 0, m]
        if bias_a is not None:
            a_val = a_val + bias_a[m]
        if operand_b is None:
            return a_val
        b_val = operand_b(n, p, m)
        if bias_b is not None:
            b_val = b_val + bias_b[m]
        return a_val * b_val

    def epilogue(n, m, i, j):
        return value(n, m, i, j) if residual is None else value(n, m, i, j) + residual[n, m, i, j]

    out = te.compute((n_, m_out, ho, wo), epilogue, name="out")
    params = [x, weight_a] + ([bias_a] if bias_a is not None else []) + ([weight_b] if weight_b is not None else [])
    params += ([bias_b] if bias_b is not None else []) + ([residual] if residual is not None else []) + [out]
    func = te.create_prim_func(params)
    return func.with_attr("global_symbol", "main")


# ------------------------------------------------------------------------------ knobs
@dataclass(frozen=True)
class LlvmKnobs:
    """Knobs of the CPU schedule.

    m_vecs: 16-wide channel vectors per register tile (the tile is 16*m_vecs channels);
    p_tile: output pixels per register tile (divides Ho*Wo, so the micro-kernel has no predicate);
    pixel_outer: 0 = channel tiles outer (a tile's weight panel stays in L1 while it sweeps all
    pixels), 1 = pixel tiles outer (the x panel stays in L1 while the weights stream).
    Accumulator registers = operands * m_vecs * p_tile (operands: 2 pointwise, 1 depthwise); AVX-512
    has 32, so keep that <= ~30.
    """

    m_vecs: int = 1
    p_tile: int = 14
    pixel_outer: int = 0


@dataclass(frozen=True)
class CudaKnobs:
    """Knobs of the CUDA schedule: threads per block along channels/pixels and outputs per thread."""

    threads_m: int = 32
    threads_p: int = 4
    per_thread_m: int = 2
    per_thread_p: int = 2


CUDA_KNOB_CHOICES = {
    "threads_m": (16, 32, 64),
    "threads_p": (1, 2, 4, 8),
    "per_thread_m": (1, 2, 4),
    "per_thread_p": (1, 2, 4),
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def llvm_knob_choices(spec: BranchProductSpec) -> dict[str, list[int]]:
    """Values each llvm knob may take for ``spec`` (the tuning space is their product).

    p_tile: divisors of Ho*Wo in [2, 28] (or the largest divisor <= 28 when there is none);
    m_vecs: 1, 2, 4 where they divide ceil(M/16). depthwise and separable: p_tile divides Wo (a tile
    is part of one output row, so its depthwise stage runs on contiguous pixels); separable: pixel
    tiles outer (the depthwise stage is computed once per pixel tile, for every channel tile).
    """
    blocks = spec.padded_out_channels // WEIGHT_BLOCK
    run = spec.out_width if spec.kind in ("separable", "depthwise") else spec.out_pixels
    pixels = [d for d in _divisors(run) if 2 <= d <= 28]
    if not pixels:
        pixels = [max(d for d in _divisors(run) if d <= 28)]
    return {
        "m_vecs": [v for v in (1, 2, 4) if blocks % v == 0],
        "p_tile": pixels,
        "pixel_outer": [1] if spec.kind == "separable" else [0, 1],
    }


def default_llvm_knobs(spec: BranchProductSpec, max_registers: int | None = None, target: Any = None) -> LlvmKnobs:
    """Untuned choice: one channel vector where possible, the fullest register tile within
    ``max_registers`` accumulators, pixel runs that are no multiple of 8, channel tiles outer.

    ``max_registers``: accumulators, in 16-lane units, the tile may use; default from ``target``'s
    CPU: 16 with AVX-512, 6 otherwise (AVX2: a unit is 2 of the 16 ymm; 12 of them for accumulators).
    Measured on znver4 (one core, every knob of qlnet50's and Eq.(3)'s stage shapes): tiles of 14-16
    accumulators run at 95-115 GFLOP/s, the 28-30 of the full register file at 35-100 (LLVM spills
    the weights and the broadcast); a pixel run of 8 or 16 lets LLVM's SLP vectoriser turn the
    unrolled epilogue into gathers from the accumulator tile (p_tile 8: 76, p_tile 7: 96 GFLOP/s on
    the stage-1 product). Tuning (``qlfx.kernels.tuning``) searches the whole space.
    """
    if max_registers is None:
        from .cpu_schedules import vector_lanes

        lanes = 16 if target is None else vector_lanes(target if isinstance(target, tvm.target.Target)
                                                       else tvm.target.Target(target))
        max_registers = 16 if lanes >= 16 else 6
    choices = llvm_knob_choices(spec)
    operands = spec.operands
    tiles = [
        (m, p) for m in choices["m_vecs"] for p in choices["p_tile"] if operands * m * p <= max_registers
    ] or [(choices["m_vecs"][0], choices["p_tile"][0])]
    best = max(tiles, key=lambda t: (-t[0], t[1] % 8 != 0, operands * t[0] * t[1]))
    return LlvmKnobs(m_vecs=best[0], p_tile=best[1], pixel_outer=choices["pixel_outer"][0])


# ------------------------------------------------------------------------------ schedules
def _sample(sch: Schedule, candidates: Sequence[int], chosen: int | None, knob: str) -> tuple[Any, int]:
    """sample_categorical over ``candidates`` -> (ExprRV, value); ``chosen`` fixes the decision.

    The RV (not the Python int) is what feeds ``split``: only then does the trace link the decision
    to the loop structure, so that MetaSchedule's mutators/replay actually change the schedule, and the
    decision survives trace simplification (an unused sample would be dropped from the trace).
    """
    candidates = [int(v) for v in candidates]
    if chosen is not None and int(chosen) not in candidates:
        raise ValueError(f"knob {knob}={chosen} is not one of the allowed values {candidates}")
    decision = None if chosen is None else candidates.index(int(chosen))
    rv = sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates), decision=decision)
    return rv, int(sch.get(rv))


def _flatten_out_pixels(sch: Schedule, spec: BranchProductSpec, out: Any) -> list[Any]:
    """Give the epilogue block one pixel iter var p = ho*Wo + wo (instead of fusing the two loops).

    Fusing the loops leaves the block with iter vars ho = f // Wo, wo = f % Wo, and compute_at's region
    analysis then relaxes them separately: a pixel tile that crosses a row gives the producer a
    data-dependent ("Sub") extent. With one iter var the accumulator index simplifies to p itself.
    """
    wo = spec.out_width
    sch.transform_block_layout(out, lambda n, m, i, j: (n, m, i * wo + j))
    return sch.get_loops(out)


def _inner_loops(sch: Schedule, block: Any, names: Sequence[str]) -> dict[str, Any]:
    """The innermost ``len(names)`` loops of ``block``, named (compute_at keeps unit loops here)."""
    loops = sch.get_loops(block)[-len(names):]
    return dict(zip(names, loops))


def schedule_llvm(sch: Schedule, spec: BranchProductSpec, knobs: LlvmKnobs | None = None,
                  pixel_outer: int | None = None) -> LlvmKnobs:
    """Hand schedule for x86 (AVX-512 / AVX2). ``knobs=None`` samples m_vecs and p_tile (the
    MetaSchedule design space); ``pixel_outer`` (a loop order, not expressible as a sample) then comes
    from the argument, default 0.

    Loop nest (per parallel task)::

        for tile in parallel(n * m_tiles * p_tiles):      # m_tiles outer unless pixel_outer
          acc_tile[p_tile, t, 16*m_vecs] = 0               (vectorised)
          for c in Cin:                                    # the micro-kernel, fully unrolled inside
            for p, t, v: acc_tile[p, t, v*16:(v+1)*16] += W_t[block v, c, :] * x[c, p]
          dw_tile (depthwise)                              (k*k taps, vectorised along channels)
          for m, p (unrolled): out = (acc_a + bias_a) * (acc_b + bias_b)

    Returns the knobs used. The out block is annotated ``qlfx.pixel_outer`` so the order can be read
    back from a tuned PrimFunc.
    """
    choices = llvm_knob_choices(spec)
    if knobs is not None:
        pixel_outer = knobs.pixel_outer
    pixel_outer = int(pixel_outer if pixel_outer is not None else choices["pixel_outer"][0])
    if pixel_outer not in choices["pixel_outer"]:
        raise ValueError(f"pixel_outer={pixel_outer} is not one of {choices['pixel_outer']} for kind {spec.kind}")
    # The sampled value is the channel tile 16*m_vecs itself: split factors must be plain RVs.
    m_tile_rv, m_tile = _sample(
        sch, [WEIGHT_BLOCK * v for v in choices["m_vecs"]],
        None if knobs is None else WEIGHT_BLOCK * knobs.m_vecs, "16*m_vecs",
    )
    m_vecs = m_tile // WEIGHT_BLOCK
    p_rv, p_tile = _sample(sch, choices["p_tile"], None if knobs is None else knobs.p_tile, "p_tile")

    out = sch.get_sblock("out")
    sch.annotate(out, "qlfx.pixel_outer", pixel_outer)
    n, m, p = _flatten_out_pixels(sch, spec, out)
    m_outer, m_inner = sch.split(m, [None, m_tile_rv])
    p_outer, p_inner = sch.split(p, [None, p_rv])
    pixel_tile = None
    if spec.kind == "separable":  # the depthwise stage per pixel tile, the channel tiles inside
        sch.reorder(n, p_outer, m_outer, m_inner, p_inner)
        pixel_tile = sch.fuse(n, p_outer)
        sch.parallel(pixel_tile)
        anchor = m_outer
    elif pixel_outer:
        sch.reorder(n, p_outer, m_outer, m_inner, p_inner)
        anchor = sch.fuse(n, p_outer, m_outer)
        sch.parallel(anchor)
    else:
        sch.reorder(n, m_outer, p_outer, m_inner, p_inner)
        anchor = sch.fuse(n, m_outer, p_outer)
        sch.parallel(anchor)

    # GEMM accumulator: computed per tile, in registers.
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, anchor, preserve_unit_loops=True)
    loops = _inner_loops(sch, acc, ["n", "p", "t", "m", "c"])
    a_mv, a_lane = sch.split(loops["m"], [None, WEIGHT_BLOCK])
    order = [loops["c"], loops["n"], loops["p"], loops["t"], a_mv, a_lane]
    sch.reorder(*order)
    for loop in order[1:-1]:
        sch.unroll(loop)
    sch.vectorize(a_lane)
    init = sch.decompose_reduction(acc, loops["c"])
    sch.vectorize(sch.get_loops(init)[-1])

    if spec.kind == "depthwise":  # the stencil of this tile's channels and pixels
        _schedule_depthwise_stage(sch, anchor, _stage_multiplier(spec, m_tile))
    if pixel_tile is not None:  # every channel of this pixel tile, then the clamp
        hidden = sch.get_sblock("hidden")
        sch.compute_at(hidden, pixel_tile, preserve_unit_loops=True)
        _schedule_depthwise_stage(sch, pixel_tile, _stage_multiplier(spec, spec.mid_channels))
        sch.vectorize(sch.get_loops(hidden)[-1])

    # Epilogue: fully unrolled so every tile access is a constant index (keeps acc in registers).
    sch.unroll(m_inner)
    sch.unroll(p_inner)
    return LlvmKnobs(m_vecs=m_vecs, p_tile=p_tile, pixel_outer=pixel_outer)


def _stage_multiplier(spec: BranchProductSpec, channels: int) -> int:
    """Channels of the depthwise stage computed side by side: the depth multiplier where it divides
    the stage's channel count (a tile's, or all), else 1."""
    mult = spec.depth_multiplier
    return mult if mult > 1 and channels % mult == 0 and mult <= WEIGHT_BLOCK else 1


def _schedule_depthwise_stage(sch: Schedule, tile_loop: Any, multiplier: int) -> None:
    """The depthwise stage (depthwise and separable kinds): the padded input once, as a whole
    (parallel over the channels; per tile instead, its three-row halo cost 15 % more at stage 1 of
    qlnet50), then the taps per tile at ``tile_loop``, vectorised along the tile's pixels (contiguous:
    the tile is part of one row), weights broadcast; the ``multiplier`` channels that read one input
    channel side by side, so each input vector is loaded once for all of them."""
    dw, xpad = sch.get_sblock("dw"), sch.get_sblock("xpad")
    sch.compute_at(dw, tile_loop, preserve_unit_loops=True)
    n, c, _, j = sch.get_loops(xpad)
    sch.parallel(sch.fuse(n, c))
    sch.vectorize(sch.split(j, [None, WEIGHT_BLOCK])[1])
    loops = _inner_loops(sch, dw, ["n", "c", "p", "ki", "kj"])
    c_outer, c_inner = sch.split(loops["c"], [None, multiplier])
    sch.reorder(loops["n"], c_outer, loops["ki"], loops["kj"], c_inner, loops["p"])
    for loop in (loops["ki"], loops["kj"], c_inner):
        sch.unroll(loop)
    sch.vectorize(loops["p"])
    init = sch.decompose_reduction(dw, loops["ki"])
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_cuda(sch: Schedule, spec: BranchProductSpec, knobs: CudaKnobs | None = None) -> CudaKnobs:
    """GPU schedule: one thread computes per_thread_m x per_thread_p outputs with both operands in
    registers (``local`` scope) and multiplies them; thread blocks tile (n, channels, pixels).

    Channels vary fastest across threads, so a warp reads consecutive packed weights; x values are
    shared by the warp (broadcast loads). The product is in the same kernel as the reduction (one
    ``blockIdx``/``threadIdx`` nest). ``knobs=None`` samples them (MetaSchedule design space).
    The separable kind has no GPU schedule (the TVM emitter keeps its two convs apart on GPUs).
    """
    if spec.kind == "separable":
        raise ValueError("the separable kernel has a CPU schedule only; on cuda run its depthwise and 1x1 "
                         "convs apart (qlfx's TVM emitter does)")
    values = {}
    rvs = {}
    for name, candidates in CUDA_KNOB_CHOICES.items():
        rvs[name], values[name] = _sample(sch, candidates, None if knobs is None else getattr(knobs, name), name)
    out = sch.get_sblock("out")
    n, m, p = _flatten_out_pixels(sch, spec, out)
    m_block, m_thread, m_inner = sch.split(m, [None, rvs["threads_m"], rvs["per_thread_m"]])
    p_block, p_thread, p_inner = sch.split(p, [None, rvs["threads_p"], rvs["per_thread_p"]])
    sch.reorder(n, m_block, p_block, p_thread, m_thread, p_inner, m_inner)
    block = sch.fuse(n, m_block, p_block)
    thread = sch.fuse(p_thread, m_thread)
    sch.bind(block, "blockIdx.x")
    sch.bind(thread, "threadIdx.x")

    acc = sch.get_sblock("acc")
    # compute_at with preserve_unit_loops keeps the loop nest's shape independent of the knob values
    # (a per-thread extent of 1 would otherwise drop a loop), so re-sampled traces replay cleanly.
    sch.compute_at(acc, thread, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    loops = _inner_loops(sch, acc, ["n", "p", "t", "m", "c"])
    spatial = [loops[k] for k in ("n", "p", "t", "m")]
    sch.reorder(loops["c"], *spatial)
    for loop in spatial:
        sch.unroll(loop)
    sch.decompose_reduction(acc, loops["c"])
    if spec.kind == "depthwise":
        sch.compute_inline(sch.get_sblock("xpad"))  # the bounds test in the tap: no extra pass on a GPU
        dw = sch.get_sblock("dw")
        sch.compute_at(dw, thread, preserve_unit_loops=True)
        sch.set_scope(dw, 0, "local")
        loops = _inner_loops(sch, dw, ["n", "m", "p", "i", "j"])
        for loop in loops.values():
            sch.unroll(loop)
        sch.decompose_reduction(dw, loops["i"])
    sch.unroll(m_inner)
    sch.unroll(p_inner)
    return CudaKnobs(**values)


# ------------------------------------------------------------------------------ build helpers
def host_llvm_target(num_cores: int = 2) -> tvm.target.Target:
    """llvm target for this machine's CPU (``mcpu`` = LLVM's host CPU name, so AVX-512 is used when present)."""
    mcpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": num_cores})


def cuda_target(arch: str = "sm_90a") -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def schedule_branch_product(spec: BranchProductSpec, target: Any, knobs: Any = None) -> tuple[tirx.PrimFunc, Any]:
    """Hand-scheduled PrimFunc for ``target`` (llvm or cuda) and the knobs used."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    sch = Schedule(branch_product_primfunc(spec))
    if target.kind.name == "llvm":
        used = schedule_llvm(sch, spec, knobs or default_llvm_knobs(spec, target=target))
    elif target.kind.name == "cuda":
        used = schedule_cuda(sch, spec, knobs or CudaKnobs())
    else:
        raise ValueError(f"no branch-product schedule for target kind {target.kind.name!r}; use llvm or cuda")
    return sch.mod["main"], used


class BranchProductKernel:
    """A built kernel plus the spec; call it with torch-layout tensors or pre-packed arrays.

    ``kernel(x, weight_a, bias_a, weight_b, bias_b)`` packs the weights (cached by object id when
    ``cache_weights``) and returns a numpy array; ``kernel.run_packed(x, *packed)`` skips packing.
    """

    def __init__(self, spec: BranchProductSpec, executable: Any, device: Any = None):
        self.spec = spec
        self.executable = executable
        self.module = executable.mod if hasattr(executable, "mod") else executable
        self.device = device if device is not None else tvm.cpu()
        self._function = self.module["main"] if hasattr(self.module, "__getitem__") else None

    def packed_arguments(self, weight_a, bias_a, weight_b=None, bias_b=None) -> list[Any]:
        return [
            tvm.runtime.tensor(a, self.device)
            for a in pack_weights(self.spec, weight_a, bias_a, weight_b, bias_b)
        ]

    def output_shape(self, x: Any) -> tuple[int, int, int, int]:
        return (int(x.shape[0]),) + tuple(self.spec.output_shape[1:])

    def run_packed(self, x: Any, *packed: Any, residual: Any = None, out: Any = None) -> Any:
        if (residual is None) == self.spec.has_residual:
            raise ValueError("pass residual= exactly when the spec has has_residual=True")
        x_t = x if isinstance(x, tvm.runtime.Tensor) else tvm.runtime.tensor(_to_numpy(x), self.device)
        if out is None:
            out = tvm.runtime.tensor(np.empty(self.output_shape(x_t), "float32"), self.device)
        extra = [] if residual is None else [residual if isinstance(residual, tvm.runtime.Tensor)
                                             else tvm.runtime.tensor(_to_numpy(residual), self.device)]
        self._function(x_t, *packed, *extra, out)
        return out

    def __call__(self, x, weight_a, bias_a, weight_b=None, bias_b=None, residual=None) -> np.ndarray:
        packed = self.packed_arguments(weight_a, bias_a, weight_b, bias_b)
        return self.run_packed(x, *packed, residual=residual).numpy()

    def time(self, x, packed: Sequence[Any], number: int = 10, repeat: int = 20) -> list[float]:
        """Seconds per run, one entry per repeat (TVM's time_evaluator)."""
        x_t = tvm.runtime.tensor(_to_numpy(x), self.device)
        out = tvm.runtime.tensor(np.empty(self.output_shape(x_t), "float32"), self.device)
        residual = [tvm.runtime.tensor(np.zeros(self.output_shape(x_t), "float32"), self.device)] \
            if self.spec.has_residual else []
        evaluator = self.module.time_evaluator("main", self.device, number=number, repeat=repeat)
        return list(evaluator(x_t, *packed, *residual, out).results)


def build_branch_product(
    spec: BranchProductSpec, target: Any = None, knobs: Any = None, primfunc: tirx.PrimFunc | None = None
) -> BranchProductKernel | Any:
    """Schedule (unless ``primfunc`` is given, already scheduled) and compile.

    llvm -> a runnable :class:`BranchProductKernel`; cuda -> the ``tvm.runtime.Executable`` (nothing
    can run it on a machine without a GPU; its source is ``exe.mod.imports[0].inspect_source()``).
    """
    target = host_llvm_target() if target is None else target
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if primfunc is None:
        primfunc, _ = schedule_branch_product(spec, target, knobs)
    mod = tvm.IRModule({"main": primfunc})
    executable = tvm.compile(mod, target=target)
    if target.kind.name == "llvm":
        return BranchProductKernel(spec, executable)
    return executable
