"""Analyses over a function that no pass needs to change IR: live memory over the op order.

`peak_live_bytes` is the memory a straight-line run of the function needs for its intermediate
values at given sizes, each value freed after its last reader (views alias their source, so they
keep the source alive instead of costing bytes). Arguments and returned values are not counted:
they exist before and after the call whatever the schedule (a train step's new weights and
optimizer state). It is what `autodiff{checkpoint=...}` trades compute for, measured the same
way on every target.
"""
from __future__ import annotations

from lmc.ir.core import Func, Value
from lmc.ir.types import eval_shape

# Ops whose result is a view of their operand (no data of its own; the cpu runtime runs them
# as numpy views).
VIEWS = frozenset(["tensor.reshape", "tensor.permute", "tensor.slice", "tensor.broadcast",
                   "tensor.barrier"])


def peak_live_bytes(func: Func, env: dict[str, int]) -> dict[str, int]:
    """{"peak_bytes": the most bytes live at once, "total_bytes": all intermediates summed}."""
    ops = [op for op in func.body.ops if op.name != "func.return"]
    root: dict[Value, Value] = {}
    for op in ops:
        if op.name in VIEWS:
            src = op.operand_values[0]
            root[op.result] = root.get(src, src)
    last: dict[Value, int] = {}
    for i, op in enumerate(ops):
        for v in op.operand_values:
            last[root.get(v, v)] = i
    returned = {root.get(v, v) for v in func.outputs}
    live = peak = total = 0
    frees: dict[int, int] = {}
    for i, op in enumerate(ops):
        if op.name not in VIEWS:
            for v in op.result_values:
                if v in returned:
                    continue
                n = _nbytes(v, env)
                live, total = live + n, total + n
                end = last.get(v, i)
                frees[end] = frees.get(end, 0) + n
        peak = max(peak, live)
        live -= frees.pop(i, 0)
    return {"peak_bytes": peak, "total_bytes": total}


def _nbytes(v: Value, env: dict[str, int]) -> int:
    n = 1
    for d in eval_shape(v.type.shape, env):
        n *= d
    return int(n * v.dtype.itemsize)
