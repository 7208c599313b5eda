"""basis-change: change the basis of channel spaces by elements of their symmetry groups.

For every selected channel space S (see :mod:`qlfx.symmetry.spaces`) pick an element M_S of its group
(random, seeded, unless given) and rewrite the weights (``W' = M_y W M_x^-1``, ``c' = M_y c``,
per-channel weights permuted and rescaled, see :mod:`qlfx.symmetry.action`). Because M_S lies in the
group that every op touching S commutes with, each value v of S becomes M_S v and the network outputs
(identity spaces) are unchanged: the contract is "equivalent" (exact up to float rounding).

Tied spaces (joined by a per-channel op or a product) change together: one shared permutation, and a
product's output scaling D_z = D_a D_b derived from its factors.

Options: ``seed`` (int), ``spaces`` ("all", an id, or ids "3,5" -- in a pipeline string write
``basis-change<seed=1;spaces=3,5>``), and, from Python only, ``elements={space_id: element}``
(a Monomial, a diagonal or a matrix) -- spaces given there use that element instead of a random one.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qlfx.errors import UsageError
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.symmetry import Group, analyze, apply_elements


def parse_space_ids(spaces, count: int) -> list[int]:
    """'all' / int / '3,5' / [3, 5] -> sorted ids, checked against the number of spaces."""
    if spaces is None or (isinstance(spaces, str) and spaces.strip().lower() == "all"):
        return list(range(count))
    if isinstance(spaces, int):
        ids = [spaces]
    elif isinstance(spaces, str):
        try:
            ids = [int(s) for s in spaces.replace(";", ",").split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"spaces={spaces!r}: give 'all' or space ids like 3,5 (see `qlfx symmetry MODEL`)") from None
    else:
        ids = [int(s) for s in spaces]
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise UsageError(f"spaces {bad} do not exist: this graph has spaces 0..{count - 1} (see `qlfx symmetry MODEL`)")
    return sorted(set(ids))


@register_pass
class BasisChange(Pass):
    name = "basis-change"
    description = "apply an element of each channel space's symmetry group to the weights (random unless given)"
    contract = "equivalent"
    option_defaults = {"seed": 0, "spaces": "all", "elements": None}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        report = analyze(gm)
        ids = parse_space_ids(self.options["spaces"], len(report.spaces))
        given = {report.space(k).id: v for k, v in (self.options["elements"] or {}).items()}
        try:  # an element outside its space's group would change the outputs: the caller's mistake
            report.complete_elements(given, check=True)
        except ValueError as err:
            raise UsageError(f"basis-change: {err}") from None
        generator = torch.Generator().manual_seed(int(self.options["seed"]))

        # tie classes touched by a given element are not randomised (their permutation is the user's)
        fixed = report.tie_closure(given)
        units: list[set[int]] = []  # spaces that change together (one bisection step each)
        seen: set[int] = set()
        for sid in sorted(set(ids) | set(given)):
            if sid in seen:
                continue
            unit = report.tie_closure([sid])
            seen |= unit
            units.append(unit)
        chosen: set[int] = set()
        for unit in units:
            trivial = all(report.spaces[s].group is Group.IDENTITY for s in unit)
            if trivial:
                continue
            if not ctx.allow_rewrite():
                result.skipped.append(Skip(f"spaces {sorted(unit)}", "rewrite limit reached (bisection)"))
                continue
            chosen |= unit
        randomised = report.random_elements(generator, spaces=sorted(chosen - fixed)) if chosen - fixed else {}
        elements = {sid: e for sid, e in randomised.items() if sid in chosen - fixed and not report.spaces[sid].derived}
        elements.update({sid: e for sid, e in given.items() if sid in chosen})
        if not elements:
            result.notes.append("no space with a non-trivial group selected")
            return result
        touched = apply_elements(gm, elements, report, check=True)
        result.changed = bool(touched)
        for sid in sorted(chosen):
            s = report.spaces[sid]
            how = "given" if sid in given else ("derived D_z = D_a D_b" if s.derived else "random")
            result.rewrites.append(f"space {sid} ({s.group}, size {s.size}, {how}): {s.sites[0]}")
        result.stats = {"spaces": len(chosen), "nodes_rewritten": len(touched),
                        "continuous_dimension": report.continuous_dimension}
        result.notes.append(f"{len(chosen)} space(s) changed basis; {len(touched)} node(s) rewritten: "
                            f"{', '.join(touched[:8])}{' ...' if len(touched) > 8 else ''}")
        return result
