"""Small helpers shared by pass tests."""
import copy

from qlfx.pass_manager import PassContext


def rel_error(ref, new) -> float:
    """max|new - ref| / max|ref| — the quantity qlfx's equivalence rule bounds."""
    return float((ref - new).abs().max() / ref.abs().max())


def run_pass(pass_obj, gm, x):
    """Run one pass on a copy of ``gm`` outside the pass manager; returns (new graph, PassResult)."""
    new = copy.deepcopy(gm)
    result = pass_obj.run(new, PassContext(example_inputs=(x,)))
    new.recompile()
    return new, result
