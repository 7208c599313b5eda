"""quantize: int8 post-training quantisation, simulated in torch (fake-quant) and emitted as ONNX QDQ
that onnxruntime runs with its int8 kernels (lossy).

Every ``aten.conv2d`` / ``aten.linear`` with a stored weight (a *quantised op*; the two branch convs of a
``qlfx::branch_product`` count, the product is first replaced by its definition conv, conv, mul) gets:

- **weights** symmetric int8 per output channel c: s_c = max|W_c| / 127, W_hat = s_c clamp(rint(W / s_c),
  -128, 127) (``aten.fake_quantize_per_channel_affine`` on the stored weight, zero point 0);
- **activations** asymmetric uint8 per tensor on the op's input AND output value, so that every
  quantised op sits between a DequantizeLinear and a QuantizeLinear, which is the pattern onnxruntime
  fuses into QLinearConv / QGemm. For a value with calibrated range [lo, hi] (widened to hold 0):
  s = (hi - lo) / 255, z = rint(-lo / s), x_hat = s (clamp(rint(x / s) + z, 0, 255) - z)
  (``aten.fake_quantize_per_tensor_affine``). A value read by several ops is quantised once; a quantised
  op's output is quantised for all its readers (the int8 kernel writes it so), a value that no quantised
  op writes only for the quantised ops reading it (an fp32 exception keeps reading fp32);
- **int8 elementwise ops**: an ``aten.add`` / ``aten.mul`` of two quantised values (a residual add, the
  product of a branch product's two convs) is a quantised op too: it reads its inputs quantised and
  its output is quantised (onnxruntime: QLinearAdd / QLinearMul), grown to a fixed point (the output of
  one makes the next add's input quantised). Without this a residual stream runs in fp32 between a
  DequantizeLinear and a QuantizeLinear in every block (measured on qlnet50, 224, 2 threads: 16 fp32
  Adds + 21 Q + 24 DQ, 6 % of the int8 model's time);
- **absorbed relu**: when a quantised op's only reader is a ``relu``, the op's output value is the relu's
  (range [0, hi], so z = 0, and relu-then-quantise = quantise: the uint8 grid saturates at 0 as the relu
  does); onnxruntime drops the Relu before the QuantizeLinear (ReluQuantFusion) and the conv/add runs
  in int8 with the relu inside;
- **grids that move**: when the op's input is made from another value by ops that only move entries
  (unsqueeze / expand / reshape / permute / repeat ..., e.g. expand-depthwise's channel repeat after a
  branch product) or select them (max pool: the quantiser is monotone, max of quantised = quantised
  max), it is on that value's grid -- the same function (the quantiser commutes with moving and
  selecting entries; quantising twice on one grid is quantising once) -- and that value is quantised
  on it when nothing else quantises it, so the op that makes it runs in int8 too and onnxruntime runs
  the chain on uint8 (it drops the DequantizeLinear / QuantizeLinear around each op of one grid);
- **bias** rounded to the int32 grid of the accumulator, step s_x s_c: b_hat = s_x s_c rint(b / (s_x s_c)),
  which is what the int8 kernel adds (the ONNX emitter stores it as int32).

So the graph computes, op by op, what the int8 kernels compute, up to where a float sum lands within
rounding of a .5 step of the next quantiser (then the two differ by one step there). Rounding is half to
even in both. Ops that are not quantised (radial activations, average pools, the BN of an unfolded graph, ...) run
in fp32 on dequantised values.

**Calibration** (``ctx.search_calibration``, required: the manager holds the rest out to report the budget on; plus ``random_inputs`` seeded random input sets if asked)
runs the fp32 graph once and observes every quantised value: its exact min / max and a seeded
subsample of its entries (2^16 per chunk, 2^20 in all). ``estimator`` picks the range from them:

- ``minmax``: [min, max] -- nothing clipped, but one outlier sets the step of the whole tensor;
- ``percentile`` (``percentile=99.99``): the (100 - p)-th and p-th percentiles of the subsample;
- ``mse`` (default): [a min, a max] for the a in a 96-point grid over [0.05, 1] that minimises the mean
  squared fake-quantisation error of the subsample (balances rounding against clipping).

Measured (examples/quantize_digits.py, trained digits nets, 7-bit weights as this AVX2 CPU needs, the
int8 ONNX in onnxruntime, 360 test images, one image = 0.28 points): PDEBlock net fp32 98.61 %, int8
98.61 % with each of minmax / percentile / mse (drop 0.00; on the labelled validation data the drops
were 0.12 / 0.00 / 0.12); onnxruntime's quantize_static on the same data 98.89 %. Eq.(3) net fp32
99.44 %, int8 99.72 % with each estimator (validation drops 0.12 / 0.00 / 0.35), quantize_static 99.44 %.
On nets this small
the estimator does not show; mse is the default because it is the one that adapts to heavy tails
without a tuned percentile (tests/passes/test_quantize.py shows it clipping where minmax cannot).

**Weight range** (``reduce_range``): ``true`` quantises weights to 7 bits (|q| <= 63, scale max|W_c| / 63)
inside int8 storage, as onnxruntime's ``reduce_range``; ``false`` to the full 8 bits; ``auto`` (default):
7 bits when this CPU has no VNNI. Without VNNI onnxruntime's x86 u8 x s8 kernels add pairs of products
in int16 (vpmaddubsw), which saturates for full-range weights (255 * 127 * 2 > 32767) and makes the
int8 model disagree with its simulation (measured: 10 % of the output's range on a 3-layer net, AVX2);
7-bit weights cannot saturate. With VNNI the products are summed in int32 and 8 bits are exact.

**Exceptions** kept in fp32: ``skip`` is a "/"-separated list of ``first`` (the first quantised op in
graph order, the stem), ``last`` (the last, usually the classifier), and fnmatch patterns matched against
the op's module path and node name (``skip=first/last``, ``skip=head.*``). Each is reported as skipped.

**Budget**: a lossy pass declares one; the pass manager checks it on the graph after the pass --
``budget`` (relative output error, max|new - ref| / max|ref|, on the manager's random inputs and the
calibration sets) and/or ``accuracy_drop`` (top-1 points on the labelled calibration data). The pass
does no search: a budget the quantised graph does not meet fails with the pass named. Run it last
(after fold-bn and the other rewrites): a pass after it would see fake-quant ops as ordinary ops
(constant-fold would fold the weight quantisation into plain fp32 weights).

Emission: :func:`qlfx.emit.onnx.to_onnx_model` exports ``fake_quantize`` as QuantizeLinear ->
DequantizeLinear and stores each quantised weight as int8 and each bias as int32
(:func:`qlfx.emit.onnx.store_quantized_constants`). Stats: ops quantised, values quantised, the
estimator, and per value its range and (scale, zero point).
"""
from __future__ import annotations

import fnmatch

import torch.fx as fx

from qlfx import ir
from qlfx.errors import UsageError
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.quantization import (ESTIMATORS, RangeObserver, activation_qparams, expand_branch_products,
                               fake_quantize_value, fake_quantize_weight, has_vnni, int8_values, linear_op,
                               movement_source)
from qlfx.requirements import BN_FOLDED
from qlfx.symmetry.slicing import Runner
from qlfx.verify import random_inputs as make_random_inputs


def _skip_reason(node: fx.Node, index: int, count: int, patterns: list[str]) -> str | None:
    for pattern in patterns:
        if (pattern == "first" and index == 0) or (pattern == "last" and index == count - 1):
            return f"kept in fp32 (skip={pattern})"
        if pattern not in ("first", "last") and any(
                fnmatch.fnmatchcase(name, pattern) for name in (ir.module_path(node), node.name)):
            return f"kept in fp32 (skip matches {pattern!r})"
    return None


@register_pass
class Quantize(Pass):
    name = "quantize"
    description = ("int8 post-training quantisation: weights per output channel, activations per tensor calibrated "
                   "on the calibration data; simulated in torch, emitted as ONNX QDQ for onnxruntime's int8 kernels")
    contract = "lossy"
    option_defaults = {"budget": None, "accuracy_drop": None, "estimator": "mse", "percentile": 99.99,
                       "skip": "", "reduce_range": "auto", "random_inputs": 0, "seed": 0}
    requires = (BN_FOLDED,)  # a BN between a conv and its output quantiser keeps onnxruntime from fusing them
    site_noun = "conv / linear"

    def _check_options(self, ctx: PassContext) -> list[str]:
        o = self.options
        if o["estimator"] not in ESTIMATORS:
            raise UsageError(f"quantize: estimator must be one of {', '.join(ESTIMATORS)}, got {o['estimator']!r}")
        if not isinstance(o["percentile"], (int, float)) or not 50 < float(o["percentile"]) <= 100:
            raise UsageError(f"quantize: percentile must be a number in (50, 100], got {o['percentile']!r}")
        if not isinstance(o["random_inputs"], int) or o["random_inputs"] < 0:
            raise UsageError(f"quantize: random_inputs must be a count >= 0, got {o['random_inputs']!r}")
        if o["reduce_range"] not in ("auto", True, False):
            raise UsageError(f"quantize: reduce_range must be auto, true or false, got {o['reduce_range']!r}")
        if not ctx.calibration and not o["random_inputs"]:
            raise UsageError("quantize needs calibration data to choose the activation ranges: "
                             "qlfx.compile(model, 'fold-bn,quantize<accuracy_drop=0.5>', calibration=x, labels=y) "
                             "(CLI: --calibration x.npy --labels y.npy)")
        return [p.strip() for p in str(o["skip"] or "").split("/") if p.strip()]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        patterns = self._check_options(ctx)
        result = PassResult(changed=False)
        expanded = expand_branch_products(gm)
        if expanded:
            result.changed = True
            result.notes.append(f"{len(expanded)} qlfx::branch_product replaced by conv, conv, mul (int8 convs)")
        candidates = [(node, view) for node in gm.graph.nodes if (view := linear_op(node)) is not None]
        ops = []
        for index, (node, view) in enumerate(candidates):
            why = _skip_reason(node, index, len(candidates), patterns)
            if why is not None:
                result.skipped.append(Skip(node.name, why))
            elif not ctx.allow_rewrite():
                result.skipped.append(Skip(node.name, "rewrite limit reached (bisection)"))
            else:
                ops.append(node)
        if not ops:
            result.notes.append("no conv2d / linear with a stored weight to quantise")
            return result

        # adds / muls of quantised values (a residual add, a branch product) run in int8 too: their inputs
        # are read quantised and their output is quantised (QLinearAdd / QLinearMul)
        plan = int8_values(gm.graph, ops)
        values, written, elementwise = plan.values, plan.written, plan.elementwise
        input_of = {node.name: linear_op(node).input.name for node in ops}
        sets = list(ctx.search_calibration) + make_random_inputs(ctx.example_inputs, int(self.options["seed"]),
                                                          int(self.options["random_inputs"]), ctx.dynamic_batch)
        observers = {name: RangeObserver(seed=int(self.options["seed"]) + i) for i, name in enumerate(values)}
        for (recorded,) in Runner(ctx.example_inputs, ctx.dynamic_batch).values([gm], set(values), sets):
            for name, value in recorded.items():
                observers[name].observe(value)

        estimator = self.options["estimator"]
        qparams, ranges = {}, {}
        for name, observer in observers.items():
            lo, hi = observer.range(estimator, float(self.options["percentile"]))
            ranges[name] = (observer.lo, observer.hi, lo, hi)
            qparams[name] = activation_qparams(lo, hi)
        # a value made by moving / selecting another one's entries (a channel repeat, a max pool) is on
        # that one's grid: quantising twice on one grid is quantising once, and onnxruntime then runs the
        # chain on uint8 without requantising. The source's grid when it is quantised itself, else the
        # first such value's (and the source is quantised on it, so the op that makes it runs in int8)
        sources = {}
        for name, value in values.items():
            source = movement_source(value)
            if source is None:
                continue
            if source.name in values:
                qparams[name] = qparams[source.name]
            elif source.name in sources:
                qparams[name] = qparams[sources[source.name][1]]
            else:
                sources[source.name] = (source, name)
        quantised = set(ops) | set(elementwise)
        for name, value in values.items():
            # an int8 op's output is what every reader gets; an input only the int8 ops read quantised
            readers = None if value in written else {u for u in value.users if u in quantised}
            fake_quantize_value(gm, value, *qparams[name], users=readers)
        for source, name in sources.values():
            fake_quantize_value(gm, source, *qparams[name])
        reduce_range = self.options["reduce_range"]
        reduce_range = (not has_vnni()) if reduce_range == "auto" else reduce_range
        weight_bits = 7 if reduce_range else 8
        for node in ops:  # the input now reads a fake-quant node; the weight is still the stored one
            fake_quantize_weight(gm, ir.ConvCall.of(node) or ir.LinearCall.of(node), qparams[input_of[node.name]][0],
                                 weight_bits)
            result.rewrites.append(node.name)
        result.changed = True
        samples = sum(int(s[0].shape[0]) for s in sets)
        result.notes.append(f"{len(ops)} ops int8 (weights per output channel, symmetric, {weight_bits} bits"
                            f"{' (reduce_range: this CPU has no VNNI)' if reduce_range and self.options['reduce_range'] == 'auto' else ''}), "
                            f"{len(elementwise)} adds / muls int8, "
                            f"{len(values)} activations uint8 per tensor, ranges by {estimator} on {samples} "
                            f"calibration samples")
        result.stats = {"estimator": estimator, "weight_bits": weight_bits, "ops": len(ops), "elementwise": len(elementwise),
                        "values": len(values), "samples": samples,
                        "qparams": {k: {"observed": r[:2], "range": r[2:], "scale": qparams[k][0],
                                        "zero_point": qparams[k][1]} for k, r in ranges.items()}}
        return result
