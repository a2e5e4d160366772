"""Errors raised by lmc. Each names what went wrong, where (op, pass, source location) and what
to do, so a user never has to read a traceback from deep inside the compiler."""
from __future__ import annotations


class LmcError(Exception):
    """Base class of every error lmc raises on purpose."""


class ParseError(LmcError):
    """Malformed IR text; carries the 1-based line and column."""

    def __init__(self, message: str, line: int, column: int, source: str = "<text>"):
        self.line, self.column, self.source = line, column, source
        super().__init__(f"{source}:{line}:{column}: {message}")


class VerificationError(LmcError):
    """The IR breaks an invariant (def-before-use, types, an op's own rules)."""

    def __init__(self, message: str, op=None, pass_name: str | None = None):
        self.op, self.pass_name = op, pass_name
        where = []
        if op is not None:
            where.append(f"in op '{op.name}'" + (f" at {op.loc}" if op.loc else ""))
        if pass_name == "import":
            where.append("in the input IR")
        elif pass_name:
            where.append(f"after pass '{pass_name}'")
        prefix = (" ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ShapeError(LmcError):
    """Shapes or dtypes of an op's operands do not fit together."""


class UnsupportedOpError(LmcError):
    """A frontend met ops it cannot convert; lists every one found, with source locations."""

    def __init__(self, items: list[tuple[str, str]], frontend: str = "torch", *,
                 what: str | None = None, advice: str | None = None):
        # `what`/`advice` let a pass (autodiff) say what failed instead of a frontend.
        self.items = items  # (op name, location text)
        lines = [f"  - {name}  at {where}" for name, where in items]
        names = sorted({name for name, _ in items})
        what = what or f"the {frontend} frontend cannot convert"
        advice = advice or ("Rewrite these parts of the model with supported ops, or add a "
                            f"converter in lmc/frontends/{frontend}/ (see docs/NOTES.md).")
        super().__init__(
            f"{what} {len(items)} op(s) ({len(names)} distinct: {', '.join(names)}):\n" +
            "\n".join(lines) + "\n" + advice)


class InputError(LmcError):
    """Inputs handed to a compiled model do not match its signature."""


class NumericsError(LmcError):
    """check_numerics found the first pass whose outputs drift from the imported module."""

    def __init__(self, message: str, pass_name: str):
        self.pass_name = pass_name
        super().__init__(message)


class PipelineError(LmcError):
    """A pass pipeline string or pass option is malformed or names an unknown pass."""


class ArtifactError(LmcError):
    """A saved artifact is corrupt, tampered with, or does not fit this lmc / this machine."""
