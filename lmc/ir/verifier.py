"""The verifier: def-before-use, use lists consistent, types agree, each op's own `verify()`."""
from __future__ import annotations

from lmc.errors import LmcError, VerificationError
from lmc.ir.core import Block, Func, Module


def verify(m: Module, pass_name: str | None = None) -> None:
    """Raise VerificationError naming the op, its location and (if given) the pass."""
    for f in m.funcs.values():
        try:
            _verify_func(f, m)
        except VerificationError as exc:
            if pass_name and exc.pass_name is None:
                raise VerificationError(str(exc), exc.op, pass_name) from None
            raise


def _verify_func(f: Func, m: Module) -> None:
    names = [a.name for a in f.body.args]
    dupes = sorted({n for n in names if n and names.count(n) > 1})
    if dupes:  # weights are found by argument name: a duplicate would silently share one array
        raise VerificationError(f"@{f.name}: argument name(s) {dupes} are used twice")
    for a, kind in zip(f.body.args, f.arg_kinds):
        if kind != "input":
            arr = m.params.get(a.name)
            if arr is None:
                raise VerificationError(f"@{f.name}: {kind} %{a.name} has no array in the module "
                                        "(give the weights: a safetensors file beside the .lmc "
                                        "file, or `lmc opt --weights FILE`)")
            if tuple(arr.shape) != a.type.shape:
                raise VerificationError(f"@{f.name}: {kind} %{a.name} is declared {a.type} but "
                                        f"its array has shape {list(arr.shape)}")
    _verify_block(f.body, top_level=True)
    term = f.body.terminator
    if term is None or term.name != "func.return":
        raise VerificationError(f"function @{f.name} must end in func.return")


def _verify_block(block: Block, top_level: bool) -> None:
    defined = set(map(id, block.args))
    for i, op in enumerate(block.ops):
        if op.parent is not block:
            raise VerificationError("op's parent link is wrong", op=op)
        for k, v in enumerate(op.operand_values):
            if id(v) not in defined:
                raise VerificationError(f"operand #{k} ({v.type}) is used before it is defined "
                                        "or comes from outside this block", op=op)
            if (op, k) not in v.uses:
                raise VerificationError(f"use list of operand #{k} misses this op", op=op)
        is_last = i == len(block.ops) - 1
        if op.name in ("func.return", "kernel.yield") and not is_last:
            raise VerificationError("terminator in the middle of a block", op=op)
        try:
            op.verify()
        except VerificationError:
            raise
        except (LmcError, TypeError, ValueError) as exc:  # e.g. an attribute of the wrong type
            raise VerificationError(str(exc), op=op) from None
        for r in op.regions:
            for b in r.blocks:
                _verify_block(b, top_level=False)
        defined.update(map(id, op.result_values))
    _check_uses_point_to_live_ops(block)


def _check_uses_point_to_live_ops(block: Block) -> None:
    for v in [*block.args, *(r for op in block.ops for r in op.result_values)]:
        for user, k in v.uses:
            if user.parent is None or k >= len(user.operand_values) or \
                    user.operand_values[k] is not v:
                raise VerificationError(f"a value of type {v.type} lists a stale use by "
                                        f"{user.name}", op=user)


def is_valid(m: Module) -> bool:
    try:
        verify(m)
        return True
    except VerificationError:
        return False


__all__ = ["is_valid", "verify"]
