"""factor: split a conv into a conv and a 1x1 conv, so the channels between them form a GL space.

A conv y = W * x + b (C_out x C_in x k x k, one group) equals the same conv without its bias,
h = W * x, followed by a 1x1 conv y = I h + b (the 1x1 weight is the identity; only the rounding of
the bias add can differ). The new value h
sits between two convs with nothing else touching it, so its group is GL(C_out) whatever the group of
y is (a ReLU, a product, the paper's Eq.(3) stream pinned to permutations). `slice` can then rotate h
to its principal axes on calibration data and delete directions: keeping r of them is the low-rank
factorization W ~ U_r (U_r^T W), with U_r the principal subspace of the conv's outputs, and costs
r (C_in k^2 + C_out) MACs per output pixel instead of C_out C_in k^2. That pays when

    r < r* = C_out C_in k^2 / (C_in k^2 + C_out);

where `slice` did not get that far, `merge-pointwise` multiplies the two convs back together.
`slice` prices a split at its merged cost (qlfx.symmetry.slice_cost): deleting its inner channels saves
nothing above r*, and deletions it stops with above r* are given back.

Which convs: one group, a constant weight, at least ``min_share`` of the graph's conv/linear MACs,
an r* of at least 2, and an output whose channel space has no rotations of its own (an O/GL space is
one `slice` shrinks directly -- its writers and readers all at once; ``all=true`` factors those too).

**With calibration data, only splits that can pay.** A split slice cannot shrink below r* costs MACs
until merge-pointwise undoes it, and slice's search time and error budget on the way. With
M = E[h h^T] the second moment of the bias-free output h = W * x on the calibration sets (the search
sets of a lossy pass: ctx.search_calibration) and lambda_1 >= lambda_2 >= ... its eigenvalues, the conv
is split only when the directions beyond the width k = floor(3 r* / 4) (which saves a quarter of its
MACs) hold at most ``energy`` of the output's energy:

    sum_{i > k} lambda_i  <=  energy * sum_i lambda_i          (default energy = 0.005)

Without calibration data, or with energy=1, every candidate is split. Measured on the digits models
(fraction beyond k): the 7x7 stems 6e-4 (Eq.(3)) and 2e-3 (PDEBlock) -- split; Eq.(3)'s conv1x1_a 6e-3
and the PDEBlock's first conv1 9e-3 (their input has 16 channels, r* = 12.8 / 14.2) and every conv1x1
out / later conv1 (8e-2 and up) -- not split.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.errors import UsageError
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.requirements import BN_FOLDED, CONSTANTS_FOLDED


def _conv_macs(conv: ir.ConvCall) -> int:
    return math.prod(ir.shape(conv.weight)[1:]) * math.prod(ir.shape(conv.node)[1:])


def break_even_rank(weight_shape) -> float:
    """r* = C_out C_in k^2 / (C_in k^2 + C_out): inner widths below it need fewer MACs than the conv."""
    c_out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
    return c_out * fan_in / (fan_in + c_out)


@register_pass
class Factor(Pass):
    name = "factor"
    description = "split convs into conv + identity 1x1 conv: a GL channel space slice can shrink (low-rank factorization)"
    contract = "equivalent"  # the bias moves to a separate add: the same value up to rounding
    option_defaults = {"min_share": 0.05, "all": False, "energy": 0.005}
    # The choice reads the symmetry analysis, which a BN (a per-channel map) pins down, and the weight's values.
    requires = (BN_FOLDED, CONSTANTS_FOLDED)
    site_noun = "conv"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from qlfx.symmetry import analyze

        energy = self.options["energy"]
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 <= energy:
            raise UsageError(f"factor: energy is a fraction of a conv's output energy (0..1), got {energy!r}")
        result = PassResult(changed=False)
        convs = [c for c in map(ir.ConvCall.of, gm.graph.nodes)
                 if c is not None and ir.shape(c.node) is not None and ir.shape(c.weight) is not None]
        # a weight computed from weights alone counts: constant-fold turns it into a stored one
        total = sum(_conv_macs(c) for c in convs
                    if ir.is_constant(c.weight) or CONSTANTS_FOLDED.violated_by(c.weight)) or 1
        report = analyze(gm)
        candidates = []
        for conv in convs:
            node = conv.node
            if conv.groups != 1:
                continue  # depthwise / grouped convs: nothing to factor
            if not ir.is_constant(conv.weight) and not CONSTANTS_FOLDED.violated_by(conv.weight):
                continue  # a weight computed from the input: no fixed matrix to factor
            share = _conv_macs(conv) / total
            if share < float(self.options["min_share"]):
                continue
            if not ir.is_constant(conv.weight):
                result.skipped.append(Skip(node.name, f"its weight is computed in the graph "
                                                      f"({ir.describe(conv.weight)})", needs=CONSTANTS_FOLDED))
                continue
            bns = [u for u in node.users if BN_FOLDED.violated_by(u)]
            if bns:  # a BN scales each channel: the analysis sees a pinned space that folding would free
                result.skipped.append(Skip(node.name, f"its output feeds the batchnorm {bns[0].name}, which fixes its "
                                                      f"channel space's group until folded", needs=BN_FOLDED))
                continue
            weight = ir.get_tensor(gm, conv.weight)
            if break_even_rank(weight.shape) < 2:
                result.skipped.append(Skip(node.name, f"no inner width pays (r* = {break_even_rank(weight.shape):.1f})"))
                continue
            groups = {report.spaces[i].group.value for i in report.spaces_of(node.name)}
            if groups & {"O", "GL"} and not self.options["all"]:
                result.skipped.append(Skip(node.name, "its output space already rotates (O/GL): slice shrinks it directly"))
                continue
            candidates.append((conv, weight, share))
        residual = _residual_energy(gm, ctx, [c.node for c, _, _ in candidates], float(self.options["energy"]))
        for conv, weight, share in candidates:
            node = conv.node
            width = math.floor(0.75 * break_even_rank(weight.shape))
            if node.name in residual and residual[node.name][width - 1] > float(self.options["energy"]):
                beyond = residual[node.name][width - 1]
                result.skipped.append(Skip(node.name, f"not low-rank on the calibration data: {beyond:.1e} of its output "
                                                      f"energy lies beyond {width} principal directions "
                                                      f"(energy={self.options['energy']})"))
                continue
            if not ctx.allow_rewrite():
                break
            c_out = weight.shape[0]
            identity = torch.eye(c_out, dtype=weight.dtype).reshape(c_out, c_out, 1, 1)
            # The new node is the bias-free conv; the old one becomes the 1x1 and keeps its value and name.
            with gm.graph.inserting_before(node):
                padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)  # 'same' stays
                inner = ir.call(gm, node.target, (conv.input, conv.weight, None, list(conv.stride), padding,
                                                  list(conv.dilation), 1), like=node)
                eye = ir.constant_node(gm, identity, f"{node.name}_factor")
            conv.set_args(input=inner, weight=eye, stride=(1, 1), padding=(0, 0), dilation=(1, 1))
            result.rewrites.append(f"{node.name}: {tuple(weight.shape)} -> conv to {c_out} + 1x1 "
                                   f"(pays below {break_even_rank(weight.shape):.1f} inner channels; {share:.0%} of MACs)")
            result.changed = True
        return result


def _residual_energy(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], energy: float) -> dict[str, torch.Tensor]:
    """Per conv: the fraction of its bias-free output's energy beyond its top i+1 principal directions
    (index i), on the search calibration sets; empty without calibration data or with energy >= 1."""
    from qlfx.symmetry.slicing import Runner

    sets = ctx.search_calibration
    if not sets or not nodes or energy >= 1:
        return {}
    biases = {n.name: ir.ConvCall.of(n).bias for n in nodes}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for (values,) in Runner(ctx.example_inputs, ctx.dynamic_batch).values([gm], set(biases), sets):
        for name, y in values.items():
            h = y.double()
            if biases[name] is not None:
                h = h - ir.get_tensor(gm, biases[name]).double().reshape(1, -1, *([1] * (h.dim() - 2)))
            h = h.movedim(1, -1).reshape(-1, y.shape[1])
            sums[name] = sums.get(name, 0) + h.T @ h
            rows[name] = rows.get(name, 0) + h.shape[0]
    out = {}
    for name, total in sums.items():
        eigenvalues = torch.linalg.eigvalsh(total / rows[name]).flip(0).clamp_min(0.0)
        out[name] = 1.0 - eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-300)
    return out
