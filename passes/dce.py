"""Dead-code elimination: pure ops whose results nobody uses, and optionally weights nobody reads.

Terminators (`func.return`, `kernel.yield`) are impure, so they are never removed. Unused function
*inputs* stay: they are the caller's signature. Unused `{param}`/`{buffer}` arguments are not part
of the signature the user calls with, so by default they go, with their arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmc.ir.core import Block, Func, Module, Op
from lmc.pass_base import Pass, register_pass


def _is_dead(op: Op) -> bool:
    return op.pure and not any(v.uses for v in op.result_values)


def _erase(op: Op) -> None:
    op.drop_operands()
    op.parent.remove(op)


def eliminate_dead_ops(block: Block) -> int:
    """Remove dead pure ops from `block` and the blocks nested in it; returns how many.

    One backward sweep removes whole dead chains in a straight-line block (users come after
    their operands); the outer loop only repeats when a nested body changed.
    """
    removed = 0
    while True:
        before = removed
        for op in reversed(list(block.ops)):
            if _is_dead(op):
                _erase(op)
                removed += 1
                continue
            for region in op.regions:
                for inner in region.blocks:
                    removed += eliminate_dead_ops(inner)
        if removed == before:
            return removed


def drop_unused_weights(module: Module, func: Func) -> list[str]:
    """Remove `func`'s param/buffer arguments without uses; returns their names."""
    dead = [a for a in func.weights if not a.uses]
    for a in dead:
        func.remove_arg(a)
    return [a.name for a in dead]


def prune_params(module: Module, names: list[str]) -> None:
    """Drop the arrays of `names` that no function of `module` takes any more."""
    # Functions may share a weight by name (forward and train_step): drop an array only when no
    # function still takes it.
    still_used = {a.name for f in module.funcs.values() for a in f.weights}
    for n in names:
        if n not in still_used:
            module.params.pop(n, None)


@register_pass
@dataclass(frozen=True)
class DCE(Pass):
    """Remove pure ops whose results are unused, to a fixed point."""

    name = "dce"
    drop_unused_weights: bool = True

    def run(self, module: Module) -> dict[str, Any]:
        eliminated, dropped = 0, []
        for f in module.funcs.values():
            eliminated += eliminate_dead_ops(f.body)
            if self.drop_unused_weights:
                dropped += drop_unused_weights(module, f)
        prune_params(module, dropped)
        report: dict[str, Any] = {"eliminated": eliminated}
        if dropped:
            report["dropped_weights"] = sorted(set(dropped))
        return report
