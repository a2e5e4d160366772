"""Canonicalization: constant folding, algebraic identities and view cancellation, as
`(pattern, fn)` rules applied by the greedy driver to a fixed point, then dead-code removal.

Every rule keeps the root's result type exactly: where an identity would change the shape (the
other operand broadcast `x`), the rule emits a `tensor.broadcast` or declines. New ops take the
root op's location (the Rewriter's default), so source locations survive canonicalization.
The rule table is at the bottom of the file.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmc.backends.reference.interpreter import IMPL
from lmc.errors import LmcError
from lmc.ir.core import Module, Op, Value
from lmc.ir.ops.tensor import Constant
from lmc.ir.rewriter import P, Rewriter, RuleSet, apply_rules, splat_value
from lmc.ir.types import DType, TensorType, broadcast_shapes, normalize_axis
from lmc.pass_base import Pass, register_pass
from lmc.passes.dce import eliminate_dead_ops

# Folding evaluates ops in numpy at compile time; bound the work so that a broadcast of a splat
# to a huge shape is not materialized just to learn that it is still a splat.
MAX_FOLD_ELEMENTS = 1 << 16


def as_type(rw: Rewriter, v: Value, t: TensorType) -> Value | None:
    """`v` as a value of type `t`: itself, a broadcast of it, or None when neither fits."""
    if v.type == t:
        return v
    if v.dtype != t.dtype:
        return None
    try:
        if broadcast_shapes(v.shape, t.shape) != t.shape:
            return None
    except LmcError:
        return None
    return rw.value("tensor.broadcast", v, result_type=t)


# ---- constant folding ------------------------------------------------------------------------

def _numel(t: TensorType) -> int:
    return int(np.prod(t.shape)) if t.is_static else -1


def _foldable(op: Op) -> bool:
    if (op.name == "tensor.constant" or not op.pure or op.regions or op.name not in IMPL
            or not op.operand_values):
        return False
    if not all(v.op is not None and v.op.name == "tensor.constant" for v in op.operand_values):
        return False
    types = [v.type for v in op.operand_values] + [v.type for v in op.result_values]
    return all(0 <= _numel(t) <= MAX_FOLD_ELEMENTS and t.dtype is not DType.i4 for t in types)


def _python_scalar(x: np.generic, dtype: DType):
    if dtype is DType.bool:
        return bool(x)
    return int(x) if dtype.is_int else float(x)


def constant_attr(arr: np.ndarray, dtype: DType):
    """The `value` attribute for `arr`: a scalar when it is a splat, else nested tuples, or None
    when it is too large to print inline."""
    flat = arr.reshape(-1)
    if flat.size == 0:
        return _python_scalar(np.zeros((), arr.dtype)[()], dtype)
    first = flat[0]
    same = flat == first
    if dtype.is_float:
        same |= np.isnan(flat.astype(np.float64)) & bool(np.isnan(float(first)))
    if same.all():
        return _python_scalar(first, dtype)
    if flat.size > Constant.MAX_INLINE:
        return None
    wide = arr.astype(np.float64 if dtype.is_float else (bool if dtype is DType.bool else np.int64))
    return _tuples(wide.tolist())


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def fold_constants(rw: Rewriter, root: Value):
    """An op whose operands are all constants becomes constants (evaluated by the interpreter)."""
    op = root.op
    if op is None or not _foldable(op):
        return None
    env: dict[str, int] = {}
    args = [IMPL["tensor.constant"](v.op, env) for v in op.operand_values]
    try:
        with np.errstate(all="ignore"):  # inf/nan results are folded as they would run
            out = IMPL[op.name](op, env, *args)
    except (LmcError, ValueError, IndexError, TypeError, ArithmeticError):
        return None  # e.g. an out-of-range take: leave it to fail at run time, as written
    outs = out if isinstance(out, tuple) else (out,)
    values = []
    for res, arr in zip(op.result_values, outs):
        attr = constant_attr(np.asarray(arr), res.dtype)
        if attr is None:
            return None
        values.append(attr)
    return [rw.constant(v, res.type) for v, res in zip(values, op.result_values)]


# ---- algebraic identities --------------------------------------------------------------------

def keep_lhs(rw: Rewriter, x: Value, root: Value):
    """x + 0, x - 0, x * 1, x / 1, pow(x, 1) → x (broadcast if the constant widened it)."""
    return as_type(rw, x, root.type)


def keep_rhs(rw: Rewriter, x: Value, root: Value):
    """0 + x, 1 * x → x."""
    return as_type(rw, x, root.type)


def mul_by_zero(rw: Rewriter, x: Value, root: Value):
    """x * 0 → 0 for integers and bools only: for floats inf * 0 and nan * 0 are nan."""
    if root.dtype.is_float:
        return None
    return rw.constant(False if root.dtype is DType.bool else 0, root.type)


def double_neg(rw: Rewriter, x: Value, root: Value):
    """neg(neg(x)) → x."""
    return as_type(rw, x, root.type)


def square_to_mul(rw: Rewriter, x: Value, root: Value):
    """pow(x, 2) → x * x: a multiply is cheaper and exact where pow is a library call."""
    return as_type(rw, rw.value("tensor.mul", x, x), root.type)


def same_branches(rw: Rewriter, c: Value, x: Value, root: Value):
    """where(c, x, x) → x."""
    return as_type(rw, x, root.type)


def where_of_constant(rw: Rewriter, c: Value, a: Value, b: Value, root: Value):
    """where(true, a, b) → a; where(false, a, b) → b (a splat condition only)."""
    cond = splat_value(c)
    if cond is None:
        return None
    return as_type(rw, a if cond else b, root.type)


def cast_to_same(rw: Rewriter, x: Value, root: Value):
    """cast(x) to x's own dtype → x."""
    return x if x.type == root.type else None


# `wider[d]`: dtypes that hold every value of `d` exactly. Casting through one of them first
# changes nothing, so cast(cast(x: d → wide) → out) = cast(x → out).
_EXACT = {
    DType.bool: {DType.u8, DType.i8, DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32,
                 DType.f64},
    DType.u8: {DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32, DType.f64},
    DType.i8: {DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32, DType.f64},
    DType.i32: {DType.i64, DType.f64},
    DType.f16: {DType.f32, DType.f64},
    DType.bf16: {DType.f32, DType.f64},
    DType.f32: {DType.f64},
}


def double_cast(rw: Rewriter, x: Value, mid: Value, root: Value):
    """cast(cast(x → wide) → out) → cast(x → out) when the first cast is exact (widening)."""
    if mid.dtype not in _EXACT.get(x.dtype, ()):
        return None
    if x.dtype is root.dtype:
        return x
    return rw.value("tensor.cast", x, dtype=root.dtype)


# ---- views: reshape, permute, broadcast, slice, concat ---------------------------------------

def reshape_noop(rw: Rewriter, x: Value, root: Value):
    """A reshape (or broadcast) to the operand's own type → the operand."""
    return x if x.type == root.type else None


def reshape_of_reshape(rw: Rewriter, x: Value, root: Value):
    """reshape(reshape(x)) → one reshape of x (or x itself when the types agree)."""
    if x.type == root.type:
        return x
    return rw.value("tensor.reshape", x, result_type=root.type)


def broadcast_of_broadcast(rw: Rewriter, x: Value, root: Value):
    """broadcast(broadcast(x)) → one broadcast: broadcasting composes."""
    return as_type(rw, x, root.type)


def identity_permute(rw: Rewriter, x: Value, root: Value):
    """permute(x, [0, 1, ..., n-1]) → x."""
    return x if tuple(root.op.perm) == tuple(range(x.type.rank)) else None


def permute_of_permute(rw: Rewriter, x: Value, inner: Value, root: Value):
    """permute(permute(x, p), q) → permute(x, p∘q): out dim j is x dim p[q[j]]."""
    p, q = inner.op.perm, root.op.perm
    composed = tuple(p[j] for j in q)
    if composed == tuple(range(len(composed))):
        return x
    return rw.value("tensor.permute", x, perm=composed)


def transposed_matmul(rw: Rewriter, a: Value, b: Value, mm: Value, root: Value):
    """permute(a @ b) swapping the last two axes → bᵀ @ aᵀ: the product is written in the
    layout its readers want (a weight gradient dW = (xᵀ·g)ᵀ becomes gᵀ·x), and the operand
    transposes are views the GEMM packs for free."""
    r = root.type.rank
    swap = tuple(range(r - 2)) + (r - 1, r - 2)
    if r < 2 or tuple(root.op.perm) != swap or a.type.rank < 2 or b.type.rank < 2 or \
            len(mm.uses) != 1:
        return None
    return rw.value("tensor.matmul", _swap_last(rw, b), _swap_last(rw, a))


def _swap_last(rw: Rewriter, v: Value) -> Value:
    r = v.type.rank
    return rw.value("tensor.permute", v, perm=tuple(range(r - 2)) + (r - 1, r - 2))


def full_slice(rw: Rewriter, x: Value, root: Value):
    """A slice from 0 with step 1 whose result has the operand's type covers the axis → x."""
    op = root.op
    return x if op.start == 0 and op.step == 1 and x.type == root.type else None


def take_of_iota(rw: Rewriter, x: Value, idx: Value, root: Value):
    """take(x, iota(n, start, step)) along an axis → slice(x, start, last + 1, step), a view:
    a learned position embedding's `pos(arange(T))` reads no indices and copies no rows. Only
    where every index is statically in range: take fails on an out-of-range index, a slice
    would clamp it."""
    op = idx.op
    ax = normalize_axis(root.op.axis, x.type.rank)
    size, n = x.shape[ax], idx.shape[0]
    if not (isinstance(size, int) and isinstance(n, int) and n >= 1) or \
            not all(isinstance(a, int) for a in (op.start, op.step)) or \
            op.start < 0 or op.step < 1:
        return None
    last = op.start + (n - 1) * op.step
    if last >= size:
        return None
    return rw.value("tensor.slice", x, axis=ax, start=op.start, end=last + 1, step=op.step)


def single_concat(rw: Rewriter, x: Value, root: Value):
    """concat of one operand → that operand."""
    return x if x.type == root.type else None


# ---- the rule table --------------------------------------------------------------------------

x, c = P.var("x"), P.const(name="c")
RULES = RuleSet([
    (P("tensor.add", x, P.const(0)), keep_lhs),
    (P("tensor.add", P.const(0), x), keep_rhs),
    (P("tensor.sub", x, P.const(0)), keep_lhs),
    (P("tensor.mul", x, P.const(1)), keep_lhs),
    (P("tensor.mul", P.const(1), x), keep_rhs),
    (P("tensor.mul", x, P.const(0)), mul_by_zero),
    (P("tensor.mul", P.const(0), x), mul_by_zero),
    (P("tensor.div", x, P.const(1)), keep_lhs),
    (P("tensor.pow", x, P.const(1)), keep_lhs),
    (P("tensor.pow", x, P.const(2)), square_to_mul),
    (P("tensor.neg", P("tensor.neg", x)), double_neg),
    (P("tensor.where", P.var("c"), x, x), same_branches),
    (P("tensor.where", c, P.var("a"), P.var("b")), where_of_constant),
    (P("tensor.cast", P("tensor.cast", x, name="mid")), double_cast),
    (P("tensor.cast", x), cast_to_same),
    (P("tensor.reshape", P("tensor.reshape", x)), reshape_of_reshape),
    (P("tensor.reshape", x), reshape_noop),
    (P("tensor.broadcast", P("tensor.broadcast", x)), broadcast_of_broadcast),
    (P("tensor.broadcast", x), reshape_noop),
    (P("tensor.permute", P("tensor.permute", x, name="inner")), permute_of_permute),
    (P("tensor.permute", x), identity_permute),
    (P("tensor.permute", P("tensor.matmul", P.var("a"), P.var("b"), name="mm")),
     transposed_matmul),
    (P("tensor.slice", x), full_slice),
    (P("tensor.concat", x), single_concat),
    (P("tensor.take", x, P("tensor.iota", name="idx")), take_of_iota),
    (P(None), fold_constants),
])
del x, c


def _counted(fn: Callable, stats: dict[str, int], key: str) -> Callable:
    """`fn`, counting the rewrites it makes; a result of another type is refused as a bug guard."""
    @functools.wraps(fn)
    def run(rw: Rewriter, root: Value, **caps):
        out = fn(rw, root=root, **caps)
        if out is None:
            return None
        outs = out if isinstance(out, list) else [out]
        if [v.type for v in outs] != [v.type for v in root.op.result_values][:len(outs)]:
            return None
        stats[key] += 1
        return out
    return run


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Fold constants, apply algebraic identities, cancel views; then remove dead ops."""

    name = "canonicalize"

    def run(self, module: Module) -> dict[str, Any]:
        stats = {"folded": 0, "rewrites": 0}
        rules = RuleSet([(pat, _counted(fn, stats, "folded" if fn is fold_constants
                                        else "rewrites")) for pat, fn in RULES.rules])
        eliminated = 0
        for f in module.funcs.values():
            apply_rules(f, rules)
            eliminated += eliminate_dead_ops(f.body)
        return {**stats, "eliminated": eliminated}
