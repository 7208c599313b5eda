"""fuse-product: replace the product of two linear branches of one input by one fused op.

Pattern (after fold-bn and constant-fold, so BN is gone and every weight is a stored constant)::

    a = conv_a(u)      1x1, groups 1, padding 0           (or rows R_a of a conv's output)
    b = conv_b(u)      1x1 (pointwise) or depthwise kxk   (or rows R_b of a conv's output)
    p = a * b          same shape, no broadcasting

becomes ``p = torch.ops.qlfx.branch_product(u, W_a, c_a, W_b, c_b, stride, padding_b, dilation_b,
groups_b)`` (see :mod:`qlfx.ops`), which computes exactly ``conv(u; W_a, c_a) * conv(u; W_b, c_b)``.
Equivalent, not bit-exact: the fused kernels may sum in another order.

The layouts it finds:

- authors' PDEBlock: ``z = conv1x1(u)`` with 2M outputs, ``z[:, :M] * z[:, M:]``. Slicing the output
  rows of a conv is slicing the rows of its weight and bias: ``conv(u; W, c)[:, R] = conv(u; W[R], c[R])``,
  so ``W_a = W[R_a], W_b = W[R_b]`` for any two channel slices R_a, R_b of equal width (halves, or any
  other pair; steps allowed) of a groups-1 conv. However the user wrote the slices (``z[:, :M]``,
  ``z[:, :z.shape[1] // 2]``, ``z.chunk(2, 1)``, ``torch.split``, ``tensor_split``, ``narrow``), they
  reach the pass as ``aten.slice.Tensor`` on dim 1 with constant bounds (capture's canonical form);
  slices of slices compose;
- paper Eq.(3): ``conv1x1_a(u) * dw3x3(u)`` (the dw weight is a constant [kC, 1, 3, 3] with groups C after
  constant-fold) -> the depthwise kind, with the conv strides equal;
- any other such product, e.g. GLU-style gating ``conv_a(u) * conv_b(u)`` of two 1x1 convs.

Left alone, each with its reason in ``PassResult.skipped``: a factor that is not a conv (squeeze-excitation
``x * sigmoid(fc(pool(x)))``, a BN, an activation), factors computed from different inputs, weights
computed in the graph instead of stored (e.g. the shared kernel ``w.repeat(C, 1, 1, 1)`` before
constant-fold), a conv output (or slice) that is also used elsewhere (fusing would compute it twice),
strides that differ, a b-branch that is neither pointwise nor depthwise (no qlfx kernel), broadcasting.
A multiplication by a number or a stored constant (a layer scale) is no product of branches and is
passed over without a note.

Fusing the FOLLOWING depthwise 3x3 too (PDEBlock: product -> conv2 dw W -> 2W, groups W, + folded BN)
------------------------------------------------------------------------------------------------------
Measured; NOT done. ``python -m qlfx.passes.fuse_product [rounds]`` reruns :func:`measure_following_depthwise`:
torch 2.13 CPU, 2 threads, batch 1, qlnet50 non-downsampling block shapes, variants interleaved round by
round, MIN of 40 rounds in ms. The machine ran other jobs (load 5-13 on 2 cores; medians were 2-50x the
minimum). Three runs: stages 3-4 agree to ~10 %; stages 1-2 vary up to 3x (ranges in brackets)::

    stage (C, HxW, W)     reference  conv1x1  product  dw W->2W     pure dw 2W->2W  op    op+dw  op(2W)+pure dw  banded
    1 (64, 56x56, 256)      24.6      1.36     0.31     7.4 [7-24]      1.14       1.86   23.9      36.1       14.5 [14-46]
    2 (128, 28x28, 512)      3.6      1.07     0.16     2.3             0.58       1.29   11.4*     20.7*      12.4*
    3 (256, 14x14, 512)      1.33     0.47     0.05     0.74            0.21       0.71    1.42      1.41       2.04
    4 (512, 7x7, 1024)       1.51     0.74     0.04     0.71            0.21       1.06    1.75      2.08       1.70
    (* disturbed by other jobs: 3.4 and 3.8 ms in another run)

reference = conv1x1 (2W rows) -> slice product -> dw; op = this pass's fused op (reference impl.);
op(2W)+pure dw = the product computed with a- and b-weights repeated row-wise so it yields the 2W channels
the dw reads (output o reads p[o // 2]), then a pure depthwise 2W -> 2W; banded = conv1x1 -> product ->
dw per band of 7/14 output rows with a recomputed one-row halo, so the product tile stays in cache.

Decision: no fused formulation pays. The product is 3-4 % of the block front (0.05 of 1.33 ms at stage 3),
so the most a fused product+dw kernel can save is that plus the round trip of p through memory; the
banded form loses to per-call overhead and halo recompute (stages 2-4), the 2W form to its doubled GEMM.
What does cost time is torch's depthwise with channel multiplier 2: 3.5x (stages 3-4) and 6-20x (stage 1)
slower than a pure depthwise on ``repeat_interleave(p, 2)``; banded's one stage-1 win (14.5 vs 24.6 ms)
comes from running that slow depthwise on cache-sized tiles, which the pure-depthwise form gets without
recompute. That is an exact rewrite of its own
(``conv(p, w, groups=W) == conv(p.repeat_interleave(2, 1), w, groups=2W)``), independent of the product,
and belongs in a separate pass, not in the branch_product op (whose schema and TVM kernels are fixed).

Note also that in torch eager the fused op is SLOWER than the unfused pair (0.71 vs 0.52 ms at stage 3):
two half-size GEMMs instead of one, plus ~60 us of ``torch.library.custom_op`` dispatch per call. The op
is for the emitters (the ONNX function ``qlfx.BranchProduct``, the TVM kernels), not for eager speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

import qlfx.ops  # noqa: F401  (registers torch.ops.qlfx.branch_product)
from qlfx import ir
from qlfx.ops import branch_product_kind
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.requirements import BN_FOLDED, CONSTANTS_FOLDED, NO_DEAD_CODE, Requirement

BRANCH_PRODUCT = torch.ops.qlfx.branch_product.default


class _NoMatch(Exception):
    """Why a product is not fused (the message goes into PassResult.skipped); ``needs``: the requirement
    whose establishing pass would have let it match (a BN fold-bn folds, a weight constant-fold stores)."""

    def __init__(self, message: str, needs: Requirement | None = None):
        super().__init__(message)
        self.needs = needs


@dataclass
class Factor:
    """One factor of the product, seen as (rows of) a conv's output."""

    node: fx.Node  # the mul's argument: the conv itself or a channel slice of it
    conv: ir.ConvCall
    rows: list[int] | None  # output channels of the conv this factor reads; None = all
    slices: tuple[fx.Node, ...] = ()  # the aten.slice nodes between the conv and the factor

    def weight_bias(self, gm: fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = ir.get_tensor(gm, self.conv.weight)
        b = ir.get_tensor(gm, self.conv.bias) if self.conv.bias is not None else None
        if self.rows is None:
            return w, b
        index = torch.tensor(self.rows, dtype=torch.long)
        return w[index], (b[index] if b is not None else None)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        shape = ir.shape(self.conv.weight)
        return shape if self.rows is None else (len(self.rows),) + shape[1:]


def _factor(node: fx.Node) -> Factor:
    """The factor as rows of a conv: the conv itself, or channel slices of it (``z[:, :M]``, chunk, split,
    tensor_split and narrow all arrive as ``aten.slice.Tensor`` on dim 1; slices of slices compose)."""
    rows, slices, source = None, [], node
    while ir.is_op(source, ir.SLICE):
        piece = ir.ChannelSlice.of(source)
        if piece is None:
            raise _NoMatch(f"factor {node.name} slices {ir.describe(source.args[0])} along another axis than "
                           f"the channels")
        rows = piece.rows if rows is None else [piece.rows[r] for r in rows]
        slices.append(source)
        source = piece.input
    conv = ir.ConvCall.of(source)
    if conv is None:
        what = f"{node.name} (a channel slice of {ir.describe(source)})" if slices else ir.describe(node)
        if BN_FOLDED.violated_by(source):  # conv -> BN: once folded, the conv itself is the factor
            raise _NoMatch(f"factor {what} is a batchnorm's output, not a conv's", needs=BN_FOLDED)
        raise _NoMatch(f"factor {what} is not a conv (or a channel slice of one)")
    if rows is not None and conv.groups != 1:
        raise _NoMatch(f"factor {node.name} slices the grouped conv {source.name} "
                       f"(groups={conv.groups}); its rows are not a conv of their own")
    return Factor(node, conv, rows, tuple(slices))


def _stored(node, what: str, conv_name: str) -> None:
    if node is not None and not ir.is_constant(node):
        computed = CONSTANTS_FOLDED.violated_by(node)  # from weights alone: constant-fold stores it
        raise _NoMatch(f"the {what} of {conv_name} is computed in the graph ({ir.describe(node)}), not a stored "
                       f"constant" + ("" if computed else " (it depends on the input)"),
                       needs=CONSTANTS_FOLDED if computed else None)


def _used_elsewhere(others: list[fx.Node], message: str) -> _NoMatch:
    """Other users of a factor block the fusion; when every one of them is dead, dce would remove them."""
    dead = all(NO_DEAD_CODE.violated_by(u) for u in others)
    return _NoMatch(message + (" (nothing reads them)" if dead else ""), needs=NO_DEAD_CODE if dead else None)


def _symmetric_padding(conv: ir.ConvCall, kernel: tuple[int, int]) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [conv.dilation[i] * (kernel[i] - 1) for i in range(2)]
        if any(t % 2 for t in totals):
            raise _NoMatch(f"{conv.node.name} pads 'same' asymmetrically; branch_product pads symmetrically")
        return (totals[0] // 2, totals[1] // 2)
    return tuple(int(p) for p in conv.padding)


@register_pass
class FuseProduct(Pass):
    name = "fuse-product"
    description = "fuse a product of two linear branches of one input (conv1x1 * conv1x1|dwconv) into qlfx::branch_product"
    contract = "equivalent"
    requires = (BN_FOLDED, CONSTANTS_FOLDED, NO_DEAD_CODE)
    site_noun = "product"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False, stats={"pointwise": 0, "depthwise": 0})
        for node in list(gm.graph.nodes):
            if not ir.is_op(node, ir.MUL):
                continue
            factors = [ir.op_args(node)[k] for k in ("self", "other")]
            if not all(isinstance(a, fx.Node) and not ir.is_constant(a) for a in factors):
                continue  # a scaling by a number or a stored constant (a layer scale): not a product of branches
            try:
                a, b = self._match(gm, node, factors)
            except _NoMatch as why:
                result.skipped.append(Skip(node.name, str(why), needs=why.needs))
                continue
            if not ctx.allow_rewrite():
                result.skipped.append(Skip(node.name, "rewrite limit reached (bisection)"))
                continue
            kind = self._rewrite(gm, node, a, b)
            result.changed = True
            result.stats[kind] += 1
            result.rewrites.append(f"{node.name} = {a.node.name} * {b.node.name} ({kind})")
        return result

    # -------------------------------------------------------------------------------------- match
    def _match(self, gm: fx.GraphModule, mul: fx.Node, factors: list[fx.Node]) -> tuple[Factor, Factor]:
        a, b = (_factor(arg) for arg in factors)
        if a.conv.input is not b.conv.input:
            raise _NoMatch(f"the factors read different inputs ({ir.describe(a.conv.input)} and "
                           f"{ir.describe(b.conv.input)})")
        shapes = [ir.shape(mul), ir.shape(a.node), ir.shape(b.node)]
        if None in shapes or len({str(s) for s in shapes}) != 1:  # as text: a symbolic batch matches itself
            raise _NoMatch(f"the factors' shapes differ or broadcast: {ir.shape(a.node)} * {ir.shape(b.node)}")
        for f in (a, b):
            _stored(f.conv.weight, "weight", f.conv.node.name)
            _stored(f.conv.bias, "bias", f.conv.node.name)
        for f in (a, b):
            if set(f.node.users) != {mul}:
                others = [u for u in f.node.users if u is not mul]
                raise _used_elsewhere(others, f"{f.node.name} is also used by "
                                      f"{', '.join(u.name for u in others)}; fusing would compute it twice")
            # every value between the conv and the factors feeds the factors only
            inside = {a.node, b.node, *a.slices, *b.slices, mul}
            for n in (f.conv.node, *f.slices):
                outside = [u for u in n.users if u not in inside]
                if outside:
                    raise _used_elsewhere(outside, f"the output of {n.name} is also used by "
                                                      f"{', '.join(u.name for u in outside)}")
        if not a.conv.is_pointwise:
            a, b = b, a
        if not a.conv.is_pointwise:
            raise _NoMatch("neither factor is a 1x1 conv with groups 1 and no padding (branch_product's a-branch)")
        if a.conv.stride != b.conv.stride:
            raise _NoMatch(f"the branches' strides differ: {a.conv.stride} vs {b.conv.stride}")
        if ir.dtype(a.conv.weight) != ir.dtype(b.conv.weight):
            raise _NoMatch("the branches' weights have different dtypes")
        in_channels = ir.channels(a.conv.input)
        if branch_product_kind(b.weight_shape, b.conv.groups, in_channels) is None:
            raise _NoMatch(f"{b.conv.node.name} (kernel {b.weight_shape[2:]}, groups {b.conv.groups}) is neither "
                           f"pointwise nor depthwise; no branch_product kernel covers it")
        _symmetric_padding(b.conv, b.weight_shape[2:])
        return a, b

    # ------------------------------------------------------------------------------------ rewrite
    def _rewrite(self, gm: fx.GraphModule, mul: fx.Node, a: Factor, b: Factor) -> str:
        u = a.conv.input
        with gm.graph.inserting_before(mul):
            args = []
            for f, tag in ((a, "a"), (b, "b")):
                if f.rows is None:  # the conv's own constants serve as they are
                    args += [f.conv.weight, f.conv.bias]
                    continue
                w, c = f.weight_bias(gm)
                args.append(ir.constant_node(gm, w, f"{mul.name}_weight_{tag}"))
                args.append(ir.constant_node(gm, c, f"{mul.name}_bias_{tag}") if c is not None else None)
            padding_b = _symmetric_padding(b.conv, b.weight_shape[2:])
            fused = ir.call(gm, BRANCH_PRODUCT, (u, args[0], args[1], args[2], args[3], list(a.conv.stride),
                                                 list(padding_b), list(b.conv.dilation), b.conv.groups), like=mul)
        kind = branch_product_kind(b.weight_shape, b.conv.groups, ir.channels(u))
        fused.meta["qlfx_branch_product_kind"] = kind
        fused.meta["qlfx_fused_from"] = [mul.name, a.node.name, b.node.name]
        ir.replace_value(mul, fused)
        # Remove the old product, its slices, the convs and the weight reads nobody uses any more.
        dead = [mul, a.node, *a.slices, b.node, *b.slices, a.conv.node, b.conv.node]
        reads = [a.conv.weight, a.conv.bias, b.conv.weight, b.conv.bias]
        for n in dict.fromkeys(dead):
            if n in gm.graph.nodes and not n.users:
                gm.graph.erase_node(n)
        for n in dict.fromkeys(r for r in reads if r is not None):
            if not n.users:
                gm.graph.erase_node(n)
        return kind


# --------------------------------------------------------------------------------- measurement
def measure_following_depthwise(rounds: int = 30, threads: int = 2) -> list[dict[str, float]]:
    """Time, at batch 1, one PDEBlock's ``conv1x1 -> split product -> depthwise 3x3 (W -> 2W) + bias`` on
    qlnet50's stage shapes (the reference), against fused formulations of product + depthwise.

    Variants are interleaved round by round (other processes on the machine slow them alike); returns
    per stage the min and median milliseconds of each. Run: ``python -m qlfx.passes.fuse_product``.
    """
    import statistics
    import time

    import torch.nn.functional as F

    torch.set_num_threads(threads)
    stages = [(1, 64, 56, 256), (2, 128, 28, 512), (3, 256, 14, 512), (4, 512, 7, 1024)]  # (stage, C, H, W)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for stage, c, h, width in stages:
            u = torch.randn(1, c, h, h, generator=gen)
            w1 = torch.randn(2 * width, c, 1, 1, generator=gen) / c ** 0.5
            b1 = torch.randn(2 * width, generator=gen)
            w2 = torch.randn(2 * width, 1, 3, 3, generator=gen) / 3
            b2 = torch.randn(2 * width, generator=gen)
            wa, wb, ba, bb = (t.contiguous() for t in (w1[:width], w1[width:], b1[:width], b1[width:]))
            # dw W -> 2W (groups W) reads input o // 2 for output o: = repeat_interleave(2) + pure depthwise.
            # Folding that repeat into the product's weights makes the op emit 2W channels directly.
            wa2, wb2, ba2, bb2 = (t.repeat_interleave(2, dim=0) for t in (wa, wb, ba, bb))
            out = torch.empty(1, 2 * width, h, h)

            def reference():
                z = F.conv2d(u, w1, b1)
                return F.conv2d(z[:, :width] * z[:, width:], w2, b2, 1, 1, 1, width)

            def op_then_dw():
                p = torch.ops.qlfx.branch_product(u, wa, ba, wb, bb, [1, 1], [0, 0], [1, 1], 1)
                return F.conv2d(p, w2, b2, 1, 1, 1, width)

            def op2w_then_pure_dw():
                p2 = torch.ops.qlfx.branch_product(u, wa2, ba2, wb2, bb2, [1, 1], [0, 0], [1, 1], 1)
                return F.conv2d(p2, w2, b2, 1, 1, 1, 2 * width)

            def banded(band):
                def run():  # product tile of band+2 rows stays in cache; the halo rows are recomputed
                    for r0 in range(0, h, band):
                        r1 = min(h, r0 + band)
                        lo, hi = max(0, r0 - 1), min(h, r1 + 1)
                        z = F.conv2d(u[:, :, lo:hi], w1, b1)
                        p = F.pad(z[:, :width] * z[:, width:], (1, 1, 1 if r0 == 0 else 0, 1 if r1 == h else 0))
                        out[:, :, r0:r1] = F.conv2d(p, w2, b2, 1, 0, 1, width)
                    return out
                return run

            variants = {"reference": reference, "op+dw": op_then_dw, "op(2W)+pure dw": op2w_then_pure_dw,
                        "banded 7": banded(7), "banded 14": banded(14) if h > 14 else banded(4)}
            want = reference()
            for name, fn in variants.items():
                assert torch.allclose(fn(), want, rtol=1e-4, atol=1e-3), name
            p_example = want[:, :width].contiguous()
            p2_example = want.contiguous()
            parts = {"conv1x1": lambda: F.conv2d(u, w1, b1),
                     "product": (lambda z: lambda: z[:, :width] * z[:, width:])(F.conv2d(u, w1, b1)),
                     "op alone": lambda: torch.ops.qlfx.branch_product(u, wa, ba, wb, bb, [1, 1], [0, 0], [1, 1], 1),
                     "dw W->2W": lambda: F.conv2d(p_example, w2, b2, 1, 1, 1, width),
                     "pure dw 2W->2W": lambda: F.conv2d(p2_example, w2, b2, 1, 1, 1, 2 * width)}
            variants.update(parts)
            times = {k: [] for k in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            row = {"stage": stage, "C": c, "H": h, "W": width}
            for name, ts in times.items():
                row[f"{name} min"] = min(ts) * 1e3
                row[f"{name} median"] = statistics.median(ts) * 1e3
            rows.append(row)
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    return rows


if __name__ == "__main__":  # pragma: no cover - measurement
    import sys

    measure_following_depthwise(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
