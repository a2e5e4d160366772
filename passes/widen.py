"""widen-lowp: bf16/f16 matmuls, attention and grouped matmuls compute in f32.

    %y = tensor.matmul %a, %b : bf16[M,N]
  ⇒
    %a32 = tensor.cast %a {dtype = f32}   %b32 = tensor.cast %b {dtype = f32}
    %y32 = tensor.matmul %a32, %b32 : f32[M,N]
    %y   = tensor.cast %y32 {dtype = bf16}

Storage stays bf16/f16; the sums accumulate in f32 and round once to the storage type, as
torch's CPU kernels do. The native backends then need f32 GEMM and attention kernels only.
The widening cast of an operand seen through views (a Linear's `permute(W)`, attention's q/k/v
slices of one projection) is taken of the viewed value, once, and the views are rebuilt in f32:
the three slices of a qkv projection share one cast, and a weight's cast reads the weight
itself (the cpu runtime computes it once per executable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmc.ir.core import Func, Module, Op, Value
from lmc.ir.rewriter import Rewriter
from lmc.ir.types import DType
from lmc.pass_base import Pass, register_pass
from lmc.passes.dce import eliminate_dead_ops

WIDENED = frozenset(["tensor.matmul", "tensor.attention", "moe.grouped_matmul",
                     "moe.grouped_weight_grad"])
# Views whose f32 form is the same view of the f32 value (a cast commutes with them).
# tensor.barrier is left alone: it is there to keep what precedes it apart.
CAST_THROUGH = frozenset(["tensor.reshape", "tensor.permute", "tensor.slice",
                          "tensor.broadcast"])


def needs_widening(op: Op) -> bool:
    return op.name in WIDENED and any(v.dtype.is_low_float for v in op.operand_values)


@dataclass
class _Widener:
    """Rewrites one function; `wide` maps a low-precision value to its f32 copy, so that every
    value is cast once however many ops read it."""

    func: Func
    wide: dict[Value, Value]

    def widen(self, op: Op) -> None:
        rw = Rewriter(op.parent, op)
        operands = [self.f32(rw, v) if v.dtype.is_low_float else v
                    for v in op.operand_values]
        wide_op = rw.create(op.name, operands, dict(op.attributes), None, op.loc)
        back = [rw.value("tensor.cast", r, dtype=old.dtype, loc=op.loc)
                for r, old in zip(wide_op.result_values, op.result_values)]
        rw.replace_op(op, back)

    def f32(self, rw: Rewriter, v: Value) -> Value:
        if v not in self.wide:
            view = v.op
            if view is not None and view.name in CAST_THROUGH:
                src = self.f32(rw, view.operand_values[0])
                self.wide[v] = rw.value(view.name, src, result_type=v.type.with_dtype(
                    DType.f32), loc=view.loc, **view.attributes)
            else:
                self.wide[v] = rw.value("tensor.cast", v, dtype=DType.f32, loc=_loc(v, rw))
        return self.wide[v]


def _loc(v: Value, rw: Rewriter):
    """A cast sits where its value comes from (an argument's cast: at its first reader)."""
    return v.op.loc if v.op is not None else rw.before.loc


def widen_func(func: Func) -> int:
    widener = _Widener(func, {})
    todo = [op for op in func.body.ops if needs_widening(op)]
    for op in todo:
        widener.widen(op)
    if todo:
        eliminate_dead_ops(func.body)  # the bf16 views the f32 ones replaced
    return len(todo)


@register_pass
@dataclass(frozen=True)
class WidenLowp(Pass):
    """bf16/f16 matmul, attention, grouped matmul (and its weight gradient) → f32 compute
    between casts: f32 accumulation, rounded once to the storage type."""

    name = "widen-lowp"

    def run(self, module: Module) -> dict[str, Any]:
        return {"widened": sum(widen_func(f) for f in module.funcs.values())}
