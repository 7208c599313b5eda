"""Symmetry of qlfx graphs: channel spaces, their groups, and group actions on the weights.

    report = qlfx.symmetry.analyze(gm)            # gm: BN-folded canonical graph
    print(qlfx.symmetry.format_report(report))    # table: space, size, group, Lie dim, sites
    elements = report.random_elements(torch.Generator().manual_seed(0))
    qlfx.symmetry.apply_elements(gm, elements, report)   # outputs unchanged

See :mod:`.spaces` (the rules), :mod:`.groups` (the lattice, elements), :mod:`.action` (weight rewrites).
"""
from .action import SymmetryActionError, apply_element, apply_elements, site_element
from .groups import (Element, Group, Monomial, as_element, block_diag, element_equal, identity_element, inverse,
                     is_member, is_subgroup, join, kron_identity, lie_dimension, meet, random_element,
                     random_orthogonal, random_permutation, random_scaling, to_dense)
from .spaces import ChannelSpace, ProductConstraint, Segment, SymmetryReport, analyze, format_report
from .optimize import l1_of_weights, minimize_l1

__all__ = [
    "analyze", "format_report", "SymmetryReport", "ChannelSpace", "Segment", "ProductConstraint",
    "apply_element", "apply_elements", "site_element", "SymmetryActionError",
    "Group", "meet", "join", "is_subgroup", "lie_dimension", "Monomial", "Element", "as_element", "to_dense",
    "inverse", "kron_identity", "block_diag", "element_equal", "identity_element", "is_member",
    "random_element", "random_orthogonal", "random_permutation", "random_scaling",
    "minimize_l1", "l1_of_weights",
]
