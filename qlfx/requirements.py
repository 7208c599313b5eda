"""What a pass needs from the graph, as predicates the pass manager can check.

A pass lists its needs in ``requires`` (a tuple of :class:`Requirement`); each requirement is a
predicate on nodes ("this node is a batchnorm") plus the pass that removes such nodes. The manager
checks every requirement before the pass runs; when one is unmet the pass still runs (it may do part
of its work) and the report says which pass would have enabled the rest, or, with
``qlfx.compile(..., auto_prereqs=True)``, the manager runs that pass first (as TVM's required passes).

A pass says which of its skipped sites a requirement blocked with ``Skip(site, reason, needs=REQ)``:
only the pass knows which nodes it wanted to match, so the count in "fuse-product needs fold-bn first
(16 products are blocked by a BN)" is the pass's own, and the skip's text names what would enable it.

This module holds the predicates only; what a pass does with a violating node is the pass's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from . import ir


@dataclass(frozen=True, eq=False)  # compared by identity: each requirement is one module-level object
class Requirement:
    """A property of the graph, as a predicate on its nodes.

    ``violated_by(node)`` is True for a node that breaks the property (a batchnorm for ``bn-folded``);
    the property holds when no node breaks it. ``established_by`` names the pass that establishes it,
    or is None when no pass can (then ``remedy`` says what the user does instead).
    """

    name: str  # kebab-case, like pass names: "bn-folded"
    established_by: str | None  # the pass that establishes it: "fold-bn"
    blocker: str  # a violating node, after "blocked by": "a BN"
    nodes: tuple[str, str]  # a violating node, singular and plural: ("batchnorm", "batchnorms")
    check: Callable[[fx.Node], bool]
    remedy: str = ""  # what to do when no pass establishes it

    def violated_by(self, node: fx.Node) -> bool:
        return isinstance(node, fx.Node) and bool(self.check(node))

    def violations(self, gm: fx.GraphModule) -> list[fx.Node]:
        return [n for n in gm.graph.nodes if self.violated_by(n)]

    def met(self, gm: fx.GraphModule) -> bool:
        return not any(self.violated_by(n) for n in gm.graph.nodes)

    @property
    def what_enables(self) -> str:
        """How to establish it, for messages: 'run fold-bn first'."""
        return f"run {self.established_by} first" if self.established_by else self.remedy

    def count_nodes(self, n: int) -> str:
        return f"{n} {self.nodes[0] if n == 1 else self.nodes[1]}"

    def __repr__(self) -> str:
        return f"Requirement({self.name!r}, established_by={self.established_by!r})"


# ------------------------------------------------------------------------------------ predicates
def _is_batchnorm(node: fx.Node) -> bool:
    return ir.BatchNormCall.of(node) is not None


def _computed_from_weights(node: fx.Node) -> bool:
    """A value computed in the graph from stored constants alone (``w.repeat(C, 1, 1, 1)``, ``w.t()``),
    which could be stored instead. Random ops are not: folding them would freeze one draw."""
    seen: dict[fx.Node, bool] = {}

    def weight_only(n: fx.Node) -> bool:
        if n in seen:
            return seen[n]
        seen[n] = False  # a cycle cannot happen in an fx graph; this only stops repeated walks
        if n.op == "get_attr":
            seen[n] = True
        elif n.op == "call_function" and not n.is_impure() \
                and torch.Tag.nondeterministic_seeded not in getattr(n.target, "tags", ()):
            inputs = n.all_input_nodes
            seen[n] = all(weight_only(i) for i in inputs) if inputs else isinstance(ir.val(n), torch.Tensor)
        return seen[n]

    return node.op == "call_function" and weight_only(node)


def _is_dead(node: fx.Node) -> bool:
    """A computed value nothing reads (a dead user still counts as a use to a pass matching a pattern)."""
    return node.op == "call_function" and not node.users and not node.is_impure()


def _has_symbolic_shape(node: fx.Node) -> bool:
    shape = ir.shape(node)
    return shape is not None and any(not isinstance(d, int) for d in shape)


BN_FOLDED = Requirement(
    "bn-folded", "fold-bn", "a BN", ("batchnorm", "batchnorms"), _is_batchnorm)
CONSTANTS_FOLDED = Requirement(
    "constants-folded", "constant-fold", "a weight computed in the graph",
    ("value computed from weights alone", "values computed from weights alone"), _computed_from_weights)
NO_DEAD_CODE = Requirement(
    "no-dead-code", "dce", "a user nothing reads", ("dead node", "dead nodes"), _is_dead)
STATIC_SHAPES = Requirement(
    "static-shapes", None, "a symbolic shape", ("node with a symbolic shape", "nodes with a symbolic shape"),
    _has_symbolic_shape, remedy="capture with static shapes (drop dynamic_batch / --dynamic-batch)")

REQUIREMENTS = {r.name: r for r in (BN_FOLDED, CONSTANTS_FOLDED, NO_DEAD_CODE, STATIC_SHAPES)}


# ------------------------------------------------------------------------------------ reporting
@dataclass
class UnmetRequirement:
    """A requirement of a pass that did not hold when the pass ran."""

    pass_name: str
    requirement: Requirement
    violations: int  # nodes breaking it before the pass ran
    blocked: int  # sites the pass skipped because of it (Skip.needs)
    site_noun: str  # what the pass's sites are: "product"
    establisher_ran: bool  # its establishing pass already ran in this pipeline

    @property
    def message(self) -> str:
        r = self.requirement
        if self.blocked:
            sites = f"{self.blocked} {self.site_noun}{'' if self.blocked == 1 else 's'}"
            detail = f"{sites} {'is' if self.blocked == 1 else 'are'} blocked by {r.blocker}"
        else:  # unmet, but the pass named no site it blocked
            detail = f"the graph has {r.count_nodes(self.violations)}; no {self.site_noun} was skipped for one"
        if r.established_by is None:
            return f"{self.pass_name} needs {r.name}: {r.remedy} ({detail})"
        if self.establisher_ran:  # it ran and left some: its own skipped notes say why
            return (f"{self.pass_name} needs {r.name}, which {r.established_by} left unmet ({detail}; see "
                    f"{r.established_by}'s skipped notes)")
        return f"{self.pass_name} needs {r.established_by} first ({detail})"
