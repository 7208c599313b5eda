"""Small helpers shared by pass tests."""
import torch

import qlfx
from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassManager, PassResult, register_pass


def rel_error(ref, new) -> float:
    """max|new - ref| / max|ref| — the quantity qlfx's equivalence rule bounds."""
    return float((ref - new).abs().max() / ref.abs().max())


def capture(model, x, dynamic_batch=False):
    """The qlfx IR of ``model`` (torch.export capture) for example input ``x``."""
    return qlfx.trace(model, (x,), dynamic_batch=dynamic_batch)


def run_pass(pass_obj, gm, x):
    """Run one pass on a copy of ``gm`` outside the equivalence check (vals refreshed, origins stamped,
    as the pass manager does); returns (new graph, PassResult)."""
    return PassManager([pass_obj], verify=False).apply(pass_obj, gm, PassContext(example_inputs=(x,)))


@register_pass
class ExactButPerturbs(Pass):
    """A test pass that claims ``exact`` but adds 1e-7 to the output: far inside the fp32 tolerance of an
    equivalent pass, so only a check that holds a pass to its own contract (tolerance 0) catches it."""

    name = "test-exact-perturbs"
    description = "test pass: exact contract, adds 1e-7 to the output"
    contract = "exact"

    def run(self, gm, ctx):
        out = gm.graph.output_node()
        (value,) = ir.output_values(gm)
        with gm.graph.inserting_before(out):
            out.args = ((ir.call(gm, torch.ops.aten.add.Scalar, (value, 1e-7), like=value),),)
        return PassResult(changed=True, rewrites=[value.name])
