"""The groups a channel space can carry, their lattice, their elements, and random elements.

A channel space of size n carries one of seven matrix groups (all subgroups of GL(n)):

    GL                  every invertible matrix                              Lie dimension n^2
    O                   orthogonal matrices (Q^T Q = I)                      n(n-1)/2
    monomial            D P: a permutation times an invertible diagonal      n
    positive-monomial   D P with D > 0                                       n
    signed-permutation  D P with D = +-1 (= O intersect monomial)            0
    permutation         P                                                    0
    identity            I                                                    0

Subgroup order (a Hasse diagram; an arrow points to the bigger group):

    identity -> permutation -> signed-permutation -> O -> GL
                permutation -> positive-monomial -> monomial -> GL
                               signed-permutation -> monomial

What an op *demands* of a space is one of these groups; the space's group is the **meet** (the
largest common subgroup in this list) of all demands, e.g. meet(O, monomial) = signed-permutation,
meet(O, positive-monomial) = permutation. Every intersection of two groups of the list is again in
the list, so the meet is exact (not just a lower bound). The lattice is encoded below by each group's
down-set (the set of its subgroups in the list); meet = the element whose down-set is the intersection.

Elements. A dense element is an (n, n) float64 matrix M acting on a channel vector x as x' = M x. A
:class:`Monomial` ``(perm, scale)`` is the matrix M[i, perm[i]] = scale[i], i.e.
``(M x)_i = scale[i] * x[perm[i]]``; it is kept in that form so permuting/scaling big weights is an
index operation, not a matrix product. ``kron(M, I_m)`` (the element a space induces on a channel axis
that holds m copies of it, channel c*m + r) stays monomial.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

import torch

__all__ = [
    "Group", "meet", "join", "is_subgroup", "lie_dimension", "Monomial", "Element", "as_element",
    "identity_element", "to_dense", "inverse", "kron_identity", "block_diag", "is_member", "random_element",
    "random_permutation", "random_scaling", "element_equal",
]


class Group(enum.Enum):
    GL = "GL"
    O = "O"
    MONOMIAL = "monomial"
    POSITIVE_MONOMIAL = "positive-monomial"
    SIGNED_PERMUTATION = "signed-permutation"
    PERMUTATION = "permutation"
    IDENTITY = "identity"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: "str | Group") -> "Group":
        if isinstance(name, Group):
            return name
        for g in cls:
            if name in (g.value, g.name, g.name.lower()):
                return g
        raise ValueError(f"unknown group {name!r}; known: {', '.join(g.value for g in cls)}")

    @property
    def is_monomial(self) -> bool:
        """Every element is a scaled permutation (so it can be stored as a Monomial)."""
        return self in _DOWN[Group.MONOMIAL]

    @property
    def scalings(self) -> str:
        """Which diagonals the group contains: 'any' (nonzero), 'positive', 'sign' (+-1) or 'one'."""
        return _SCALINGS[self]


_G = Group
# down-set of each group: the groups of the list that are subgroups of it (itself included)
_DOWN: dict[Group, frozenset[Group]] = {
    _G.IDENTITY: frozenset({_G.IDENTITY}),
    _G.PERMUTATION: frozenset({_G.PERMUTATION, _G.IDENTITY}),
    _G.SIGNED_PERMUTATION: frozenset({_G.SIGNED_PERMUTATION, _G.PERMUTATION, _G.IDENTITY}),
    _G.POSITIVE_MONOMIAL: frozenset({_G.POSITIVE_MONOMIAL, _G.PERMUTATION, _G.IDENTITY}),
    _G.MONOMIAL: frozenset({_G.MONOMIAL, _G.POSITIVE_MONOMIAL, _G.SIGNED_PERMUTATION, _G.PERMUTATION,
                            _G.IDENTITY}),
    _G.O: frozenset({_G.O, _G.SIGNED_PERMUTATION, _G.PERMUTATION, _G.IDENTITY}),
    _G.GL: frozenset(Group),
}
_SCALINGS = {_G.GL: "any", _G.MONOMIAL: "any", _G.POSITIVE_MONOMIAL: "positive", _G.O: "sign",
             _G.SIGNED_PERMUTATION: "sign", _G.PERMUTATION: "one", _G.IDENTITY: "one"}


def is_subgroup(a: Group, b: Group) -> bool:
    """a <= b in the lattice."""
    return a in _DOWN[b]


def meet(*groups: Group) -> Group:
    """The largest group of the list contained in all of ``groups`` (GL for none)."""
    common = frozenset(Group)
    for g in groups:
        common &= _DOWN[Group.parse(g)]
    for candidate in common:
        if _DOWN[candidate] == common:
            return candidate
    raise AssertionError(f"lattice not closed under meet: {groups}")  # the table is wrong


def join(*groups: Group) -> Group:
    """The smallest group of the list containing all of ``groups`` (identity for none)."""
    ups = [frozenset(h for h in Group if g in _DOWN[h]) for g in map(Group.parse, groups)]
    common = frozenset(Group).intersection(*ups) if ups else frozenset(Group)
    for candidate in common:
        if all(is_subgroup(candidate, other) for other in common):
            return candidate
    raise AssertionError(f"lattice not closed under join: {groups}")


def lie_dimension(group: Group, n: int) -> int:
    """Dimension of the group's Lie algebra on an n-dimensional space (0 for discrete groups)."""
    group = Group.parse(group)
    if group is Group.GL:
        return n * n
    if group is Group.O:
        return n * (n - 1) // 2
    if group in (Group.MONOMIAL, Group.POSITIVE_MONOMIAL):
        return n
    return 0


# ------------------------------------------------------------------------------------------ elements
@dataclass
class Monomial:
    """M[i, perm[i]] = scale[i]: ``(M x)_i = scale[i] * x[perm[i]]``."""

    perm: torch.Tensor  # long, a permutation of range(n)
    scale: torch.Tensor  # float64, nonzero

    def __post_init__(self):
        self.perm = torch.as_tensor(self.perm, dtype=torch.long)
        self.scale = torch.as_tensor(self.scale, dtype=torch.float64)
        if self.perm.shape != self.scale.shape or self.perm.dim() != 1:
            raise ValueError(f"Monomial: perm {tuple(self.perm.shape)} and scale {tuple(self.scale.shape)} "
                             f"must be 1-D of the same length")

    @property
    def size(self) -> int:
        return int(self.perm.numel())

    @classmethod
    def identity(cls, n: int) -> "Monomial":
        return cls(torch.arange(n), torch.ones(n, dtype=torch.float64))

    @classmethod
    def diagonal(cls, d) -> "Monomial":
        d = torch.as_tensor(d, dtype=torch.float64)
        return cls(torch.arange(d.numel()), d.clone())

    def is_identity(self) -> bool:
        return bool((self.perm == torch.arange(self.size)).all()) and bool((self.scale == 1).all())


Element = Union[Monomial, torch.Tensor]


def identity_element(n: int) -> Monomial:
    return Monomial.identity(n)


def as_element(value, n: int | None = None) -> Element:
    """Normalise a user's element: a Monomial, a 1-D tensor (a diagonal) or an (n, n) matrix (kept
    as a Monomial when it has exactly one nonzero per row and column)."""
    if isinstance(value, Monomial):
        element = value
    else:
        t = torch.as_tensor(value).detach().to(torch.float64)
        if t.dim() == 1:
            element = Monomial.diagonal(t)
        elif t.dim() == 2 and t.shape[0] == t.shape[1]:
            nz = t != 0
            if bool((nz.sum(0) == 1).all()) and bool((nz.sum(1) == 1).all()):
                perm = nz.to(torch.int8).argmax(dim=1)
                element = Monomial(perm, t[torch.arange(t.shape[0]), perm])
            else:
                element = t.clone()
        else:
            raise ValueError(f"a group element is a 1-D diagonal or a square matrix, got shape {tuple(t.shape)}")
    size = element.size if isinstance(element, Monomial) else element.shape[0]
    if n is not None and size != n:
        raise ValueError(f"element of size {size} for a space of size {n}")
    return element


def to_dense(e: Element) -> torch.Tensor:
    if isinstance(e, Monomial):
        m = torch.zeros(e.size, e.size, dtype=torch.float64)
        m[torch.arange(e.size), e.perm] = e.scale
        return m
    return e


def inverse(e: Element) -> Element:
    """M^-1. For a Monomial: (M^-1 y)_j = y[perm^-1[j]] / scale[perm^-1[j]]."""
    if isinstance(e, Monomial):
        inv = torch.empty_like(e.perm)
        inv[e.perm] = torch.arange(e.size)
        return Monomial(inv, 1.0 / e.scale[inv])
    return torch.linalg.inv(e)


def kron_identity(e: Element, m: int) -> Element:
    """kron(M, I_m): the element on an axis holding m copies of the space (channel c*m + r)."""
    if m == 1:
        return e
    if isinstance(e, Monomial):
        r = torch.arange(m)
        return Monomial((e.perm[:, None] * m + r[None, :]).reshape(-1), e.scale.repeat_interleave(m))
    return torch.kron(e, torch.eye(m, dtype=torch.float64))


def block_diag(blocks: list[Element]) -> Element:
    if len(blocks) == 1:
        return blocks[0]
    if all(isinstance(b, Monomial) for b in blocks):
        perms, offset = [], 0
        for b in blocks:
            perms.append(b.perm + offset)
            offset += b.size
        return Monomial(torch.cat(perms), torch.cat([b.scale for b in blocks]))
    return torch.block_diag(*[to_dense(b) for b in blocks])


def element_equal(a: Element, b: Element, tol: float = 1e-9) -> bool:
    if isinstance(a, Monomial) and isinstance(b, Monomial):
        return bool((a.perm == b.perm).all()) and bool(torch.allclose(a.scale, b.scale, rtol=tol, atol=tol))
    da, db = to_dense(a), to_dense(b)
    return da.shape == db.shape and bool(torch.allclose(da, db, rtol=tol, atol=tol * max(1.0, float(db.abs().max()))))


def is_member(e: Element, group: Group, tol: float = 1e-8) -> bool:
    """Whether the element lies in ``group`` (up to ``tol`` for O)."""
    group = Group.parse(group)
    if group is Group.GL:
        d = to_dense(e)
        return bool(torch.isfinite(d).all()) and abs(float(torch.linalg.det(d))) > 0 and \
            float(torch.linalg.cond(d)) < 1e12
    if group is Group.O:
        d = to_dense(e)
        return bool(torch.allclose(d.T @ d, torch.eye(d.shape[0], dtype=torch.float64), atol=tol))
    if not isinstance(e, Monomial):
        e2 = as_element(e)
        if not isinstance(e2, Monomial):
            return False
        e = e2
    s = e.scale
    if group is Group.IDENTITY:
        return e.is_identity()
    kind = group.scalings
    if kind == "any":
        return bool((s != 0).all())
    if kind == "positive":
        return bool((s > 0).all())
    if kind == "sign":
        return bool((s.abs() == 1).all())
    return bool((s == 1).all())


# ----------------------------------------------------------------------------------- random elements
def random_permutation(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def random_scaling(n: int, kind: str, generator: torch.Generator | None = None, sigma: float = 0.3) -> torch.Tensor:
    """A random diagonal of the given kind ('any', 'positive', 'sign', 'one'): magnitudes exp(N(0, sigma^2))
    (well conditioned), signs uniform."""
    if kind == "one":
        return torch.ones(n, dtype=torch.float64)
    sign = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(torch.float64)
    if kind == "sign":
        return sign
    magnitude = torch.exp(torch.randn(n, generator=generator, dtype=torch.float64) * sigma)
    return magnitude if kind == "positive" else sign * magnitude


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Haar-random orthogonal: QR of a Gaussian with the sign of R's diagonal moved into Q."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_element(space_or_group, generator: torch.Generator | None = None, size: int | None = None,
                   sigma: float = 0.3) -> Element:
    """A random element of a space's group (a ChannelSpace, or a Group with ``size``).

    GL: orthogonal x diag(exp(N(0, sigma^2))) x orthogonal (condition number ~ exp(4 sigma));
    O: Haar orthogonal; monomial kinds: random permutation x random diagonal of the allowed kind.
    """
    if isinstance(space_or_group, (Group, str)):
        group = Group.parse(space_or_group)
        if size is None:
            raise ValueError("random_element(group, ...) needs size=")
    else:
        group, size = space_or_group.group, space_or_group.size
    n = int(size)
    if group is Group.GL:
        q1, q2 = random_orthogonal(n, generator), random_orthogonal(n, generator)
        d = torch.exp(torch.randn(n, generator=generator, dtype=torch.float64) * sigma)
        return q1 @ torch.diag(d) @ q2
    if group is Group.O:
        return random_orthogonal(n, generator)
    if group is Group.IDENTITY:
        return Monomial.identity(n)
    return Monomial(random_permutation(n, generator), random_scaling(n, group.scalings, generator, sigma))
