"""Errors qlfx raises. Each says what went wrong and what to do about it."""
from __future__ import annotations


class QlfxError(Exception):
    """Base class of every error qlfx raises on purpose."""


class UsageError(QlfxError, ValueError):
    """Bad input from the user: a model, an input, an option. The CLI exits 2 on these."""


class TraceError(UsageError):
    """The model could not be captured into the IR (torch.export failed on it)."""


class UnknownPassError(UsageError, KeyError):
    """A pass name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedOpsError(UsageError):
    """Ops a later stage (an emitter, an analysis) cannot handle, all listed at once."""

    def __init__(self, what: str, sites: list[str], advice: str):
        self.sites = list(sites)
        lines = "\n".join(f"  - {s}" for s in self.sites)
        super().__init__(f"{what}: {len(self.sites)} unsupported op(s):\n{lines}\n{advice}")


class EquivalenceError(QlfxError):
    """A pass changed what the graph computes beyond its tolerance. The CLI exits 1 on these.

    Attributes: ``pass_name``; ``check`` (the EquivalenceCheck); ``divergence`` (first diverging node,
    or None); ``last_good`` (the GraphModule before the pass); ``report`` (the report up to here).
    """

    def __init__(self, pass_name, check, divergence, last_good, report=None):
        self.pass_name = pass_name
        self.check = check
        self.divergence = divergence
        self.last_good = last_good
        self.report = report
        where = f"\n  first diverging node: {divergence}" if divergence is not None else ""
        if pass_name == "trace":
            QlfxError.__init__(
                self, f"the traced graph does not compute what the model computes: {check.summary()}\n"
                      f"  the captured graph differs from the model: the forward may depend on state or "
                      f"randomness the capture froze (a counter, a cache, dropout in eval...); please report it")
            return
        super().__init__(
            f"pass '{pass_name}' broke equivalence: {check.summary()}{where}\n"
            f"  the graph before '{pass_name}' is kept as .last_good; rerun without this pass, or "
            f"with --bisect to find the rewrite site"
        )


class PassError(QlfxError):
    """A pass raised, or left a graph that is not well formed. The CLI exits 3 on these.

    Attributes: ``pass_name``; ``node`` (the name of the node the pass was working on, or None);
    ``error`` (the exception); ``last_good`` (the GraphModule before the pass); ``report``.
    """

    def __init__(self, pass_name, error, node=None, last_good=None, report=None, stage="raised"):
        self.pass_name = pass_name
        self.error = error
        self.node = node
        self.last_good = last_good
        self.report = report
        where = f" while working on node {node}" if node else ""
        said = str(error).strip().splitlines()[0] if str(error).strip() else ""
        super().__init__(
            f"pass '{pass_name}' {stage}{where}: {type(error).__name__}: {said}\n"
            f"  this is a bug in '{pass_name}', not in your model; the graph before it is kept as .last_good. "
            f"Rerun without this pass (or with --bisect) and please report it with the model."
        )
