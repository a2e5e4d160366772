"""Analyses over a function that no pass needs to change IR: live memory over the op order,
the GEMM work of a kernel (`kernel_flops`, for profiles), and which GEMMs are siblings.

`peak_live_bytes` is the memory a straight-line run of the function needs for its intermediate
values at given sizes, each value freed after its last reader (views alias their source, so they
keep the source alive instead of costing bytes). Arguments and returned values are not counted:
they exist before and after the call whatever the schedule (a train step's new weights and
optimizer state). It is what `autodiff{checkpoint=...}` trades compute for, measured the same
way on every target.
"""
from __future__ import annotations

from math import prod

from lmc.ir.core import Func, Op, Value
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


def same_rows_gemms(a: Op, b: Op) -> bool:
    """Two GEMMs of one kind that one dual GEMM can compute: the same rows (lhs and, for a
    grouped matmul, routing) and weights of one shape (fuse's siblings)."""
    return a.name == b.name and a.operand_values[0] is b.operand_values[0] and \
        a.operand_values[2:] == b.operand_values[2:] and a.result.type == b.result.type and \
        a.operand_values[1].type == b.operand_values[1].type


def kernel_flops(op: Op, env: dict[str, int]) -> float:
    """Floating-point operations of the GEMM-like work in `op` (a matmul, an attention, a
    grouped matmul or its weight gradient, alone or inside a kernel.fused body) at these
    sizes: 2 per multiply-add, the elementwise rest not counted. 0 for anything else."""
    ops = op.body.ops if op.name == "kernel.fused" else [op]
    return float(sum(_gemm_flops(o, env) for o in ops))


def _gemm_flops(op: Op, env: dict[str, int]) -> int:
    def shape(v: Value) -> list[int]:
        return eval_shape(v.type.shape, env)

    if op.name in ("tensor.matmul", "moe.grouped_matmul"):
        return 2 * prod(shape(op.result)) * shape(op.operand_values[0])[-1]
    if op.name == "moe.grouped_weight_grad":  # out[e] = x[rows]ᵀ · g[rows]: K = all rows
        x, g = (shape(v) for v in op.operand_values[:2])
        return 2 * x[0] * x[1] * g[1]
    if op.name == "tensor.attention":  # q·kᵀ and p·v (a causal mask's skipped half counted)
        q, k, v = (shape(x) for x in op.operand_values[:3])
        return 2 * prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    return 0
