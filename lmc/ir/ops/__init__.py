"""The op registry: every op class, keyed by its `dialect.name`.

What an op *means* to a transformation lives in that transformation's own table (the
interpreter's IMPL, autodiff's VJP, each backend's lowering); op classes only say how to type
and verify themselves.
"""
from __future__ import annotations

from lmc.errors import VerificationError
from lmc.ir.core import Op

OPS: dict[str, type[Op]] = {}


def register(cls: type[Op]) -> type[Op]:
    if not cls.name or cls.name in OPS:
        raise ValueError(f"op class {cls.__name__} has no name or a duplicate one: {cls.name}")
    OPS[cls.name] = cls
    return cls


def op_class(name: str) -> type[Op]:
    try:
        return OPS[name]
    except KeyError:
        raise VerificationError(f"unknown op '{name}'") from None


from lmc.ir.ops import func, kernel, moe, nn, tensor  # noqa: E402,F401  (fills OPS)
