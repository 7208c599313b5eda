"""dce: remove nodes whose values nothing uses, and the weights no node reads any more.

Exact: only unused computations go, so every output is bit-identical. The IR is functional (torch.export
functionalised it), so an unused node has no effect; fx's ``is_impure`` still keeps anything that
declares side effects.
"""
from __future__ import annotations

import torch.fx as fx

from qlfx.pass_manager import Pass, PassContext, PassResult, register_pass


def remove_unread_tensors(gm: fx.GraphModule) -> int:
    """Delete every stored tensor no get_attr node reads, and the submodules left empty; return the count."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    stale = [name for name, _ in gm.named_buffers() if name not in read]
    stale += [name for name, _ in gm.named_parameters() if name not in read]
    for name in stale:
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        owner._buffers.pop(attr, None)
        owner._parameters.pop(attr, None)
    gm.delete_all_unused_submodules()  # keeps modules on a get_attr path, drops the emptied ones
    return len(stale)


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    description = "remove unused nodes and the weights nothing reads"
    contract = "exact"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        removed_nodes = before - len(gm.graph.nodes)
        stale = remove_unread_tensors(gm)
        result = PassResult(changed=bool(removed_nodes or stale))
        result.stats = {"nodes": removed_nodes, "weights": stale}
        if result.changed:
            result.notes.append(f"removed {removed_nodes} node(s) and {stale} stale weight(s)")
        return result
