"""dce: remove nodes whose values nothing uses, and the weights no node reads any more.

Exact: only unused computations go, so every output is bit-identical. Nodes with side effects (fx's
``is_impure``: in-place ops, opaque modules that declare themselves impure) stay.
"""
from __future__ import annotations

import torch.fx as fx

from qlfx.pass_manager import Pass, PassContext, PassResult, register_pass


def _unused_root_tensors(gm: fx.GraphModule) -> list[str]:
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return [name for name in list(gm._buffers) + list(gm._parameters) if name not in read]


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    description = "remove unused nodes, submodules and weights"
    contract = "exact"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        removed_nodes = before - len(gm.graph.nodes)
        modules_before = sum(1 for _ in gm.modules())
        gm.delete_all_unused_submodules()
        removed_modules = modules_before - sum(1 for _ in gm.modules())
        stale = _unused_root_tensors(gm)
        for name in stale:
            gm._buffers.pop(name, None)
            gm._parameters.pop(name, None)
        result = PassResult(changed=bool(removed_nodes or removed_modules or stale))
        result.stats = {"nodes": removed_nodes, "submodules": removed_modules, "weights": len(stale)}
        if result.changed:
            result.notes.append(f"removed {removed_nodes} node(s), {removed_modules} submodule(s), {len(stale)} stale weight(s)")
        return result
