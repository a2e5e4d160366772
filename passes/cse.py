"""Common-subexpression elimination of pure ops.

Two ops compute the same thing when they have the same name, the same operand values, the same
attributes and the same result types, and no regions (a region's body is not compared). In a
straight-line block one forward sweep suffices: once an op is replaced, its users' keys already
name the surviving value.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from lmc.ir.core import Block, Module, Op
from lmc.pass_base import Pass, register_pass


def cse_key(op: Op) -> Hashable | None:
    """The identity of what `op` computes, or None when it must not be merged."""
    if not op.pure or op.regions or not op.result_values:
        return None
    # repr, not the values themselves: attributes may hold floats (nan != nan) and nested lists.
    attrs = repr(sorted(op.attributes.items()))
    return (op.name, tuple(id(v) for v in op.operand_values), attrs,
            tuple(v.type for v in op.result_values))


def eliminate_common(block: Block) -> int:
    """Merge duplicate pure ops in `block` (and, separately, in each nested body)."""
    seen: dict[Hashable, Op] = {}
    eliminated = 0
    for op in list(block.ops):
        for region in op.regions:
            for inner in region.blocks:
                eliminated += eliminate_common(inner)
        key = cse_key(op)
        if key is None:
            continue
        first = seen.setdefault(key, op)
        if first is op:
            continue
        for old, new in zip(op.result_values, first.result_values):
            old.replace_all_uses_with(new)
        op.drop_operands()
        block.remove(op)
        eliminated += 1
    return eliminated


@register_pass
@dataclass(frozen=True)
class CSE(Pass):
    """Replace each pure op that recomputes an earlier one by that earlier op's results."""

    name = "cse"

    def run(self, module: Module) -> dict[str, Any]:
        return {"eliminated": sum(eliminate_common(f.body) for f in module.funcs.values())}
