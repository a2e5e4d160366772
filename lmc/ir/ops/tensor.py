"""The tensor dialect: elementwise math, reductions, views, indexing, constants, matmul.

Semantics follow numpy (broadcasting, `take`, `take_along_axis`) so that the reference
interpreter is a one-liner per op; the PyTorch and ONNX frontends map onto these.
"""
from __future__ import annotations

from lmc.errors import ShapeError, VerificationError
from lmc.ir.core import Op
from lmc.ir.ops import register
from lmc.ir.types import (
    DType,
    TensorType,
    broadcast_shapes,
    canon_dim,
    dim_add,
    dim_floordiv,
    dim_sub,
    dims_equal,
    normalize_axis,
)


def _check(op: Op, cond: bool, message: str) -> None:
    if not cond:
        raise VerificationError(message, op=op)


# ---- elementwise ---------------------------------------------------------------------------

class Unary(Op):
    operands = ("x",)
    float_only = True

    def infer_type(self):
        if self.float_only and not self.x.dtype.is_float:
            raise ShapeError(f"{self.name} needs a float operand, got {self.x.type}")
        return self.x.type


@register
class Neg(Unary):
    name = "tensor.neg"
    float_only = False


@register
class Abs(Unary):
    name = "tensor.abs"
    float_only = False


@register
class Exp(Unary):
    name = "tensor.exp"


@register
class Log(Unary):
    name = "tensor.log"


@register
class Sqrt(Unary):
    name = "tensor.sqrt"


@register
class Rsqrt(Unary):
    name = "tensor.rsqrt"


@register
class Reciprocal(Unary):
    name = "tensor.reciprocal"


@register
class Tanh(Unary):
    name = "tensor.tanh"


@register
class Erf(Unary):
    name = "tensor.erf"


@register
class Sigmoid(Unary):
    name = "tensor.sigmoid"


@register
class Relu(Unary):
    name = "tensor.relu"


@register
class Silu(Unary):
    name = "tensor.silu"


@register
class Sin(Unary):
    name = "tensor.sin"


@register
class Cos(Unary):
    name = "tensor.cos"


@register
class Gelu(Unary):
    name = "tensor.gelu"
    attrs = {"approximate": "none"}

    def verify(self):
        super().verify()
        _check(self, self.approximate in ("none", "tanh"), "approximate must be none or tanh")


@register
class Not(Unary):
    name = "tensor.not"
    float_only = False

    def infer_type(self):
        if self.x.dtype is not DType.bool:
            raise ShapeError(f"tensor.not needs a bool operand, got {self.x.type}")
        return self.x.type


@register
class Barrier(Op):
    """The identity, which no rewrite looks through: `autodiff{checkpoint=...}` recomputes
    forward values from barriers so that CSE does not merge the recomputation back into the
    forward pass (XLA's optimization_barrier). Backends run it as a view; not elementwise, so
    fusion does not absorb it either."""

    name = "tensor.barrier"
    operands = ("x",)

    def infer_type(self):
        return self.x.type


class Binary(Op):
    operands = ("lhs", "rhs")
    result_bool = False

    def infer_type(self):
        a, b = self.lhs.type, self.rhs.type
        if a.dtype != b.dtype:
            raise ShapeError(f"{self.name} operands differ in dtype: {a} and {b}; insert a "
                             "tensor.cast")
        shape = broadcast_shapes(a.shape, b.shape)
        return TensorType(shape, DType.bool if self.result_bool else a.dtype)


def _binary(op_name: str, result_bool: bool = False):
    return type(op_name.split(".")[1].title().replace("_", ""), (Binary,),
                {"name": op_name, "result_bool": result_bool, "__module__": __name__})


# Declared as a table because these differ only in name: the interpreter and backends give each
# its meaning in their own tables.
ARITH = ("tensor.add", "tensor.sub", "tensor.mul", "tensor.div", "tensor.pow",
         "tensor.maximum", "tensor.minimum", "tensor.floordiv", "tensor.mod")
COMPARE = ("tensor.eq", "tensor.ne", "tensor.lt", "tensor.le", "tensor.gt", "tensor.ge")
LOGICAL = ("tensor.and", "tensor.or")
for _n in ARITH + LOGICAL:
    register(_binary(_n))
for _n in COMPARE:
    register(_binary(_n, result_bool=True))


@register
class Where(Op):
    name = "tensor.where"
    operands = ("cond", "lhs", "rhs")

    def infer_type(self):
        if self.cond.dtype is not DType.bool:
            raise ShapeError(f"tensor.where condition must be bool, got {self.cond.type}")
        if self.lhs.dtype != self.rhs.dtype:
            raise ShapeError(f"tensor.where branches differ in dtype: {self.lhs.type} and "
                             f"{self.rhs.type}")
        shape = broadcast_shapes(self.cond.shape, self.lhs.shape, self.rhs.shape)
        return TensorType(shape, self.lhs.dtype)


@register
class Cast(Op):
    name = "tensor.cast"
    operands = ("x",)
    attrs = {"dtype": None}

    def infer_type(self):
        if not isinstance(self.dtype, DType):
            raise ShapeError("tensor.cast needs a dtype attribute")
        return self.x.type.with_dtype(self.dtype)


# ---- reductions ----------------------------------------------------------------------------

def _reduced_shape(shape, axes, keepdim):
    normalized = [normalize_axis(a, len(shape)) for a in axes]
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"reduction axes {list(axes)} name a dim twice")
    axes = set(normalized)
    return tuple((1 if keepdim else None) if i in axes else d
                 for i, d in enumerate(shape) if keepdim or i not in axes)


class Reduce(Op):
    operands = ("x",)
    attrs = {"axes": (), "keepdim": False}

    def infer_type(self):
        axes = self.axes if self.axes else tuple(range(self.x.type.rank))
        return self.x.type.with_shape(_reduced_shape(self.x.shape, axes, self.keepdim))


@register
class Sum(Reduce):
    name = "tensor.sum"


@register
class Mean(Reduce):
    name = "tensor.mean"


@register
class ReduceMax(Reduce):
    name = "tensor.max"


@register
class ReduceMin(Reduce):
    name = "tensor.min"


@register
class ArgMax(Op):
    name = "tensor.argmax"
    operands = ("x",)
    attrs = {"axis": -1, "keepdim": False}

    def infer_type(self):
        return TensorType(_reduced_shape(self.x.shape, [self.axis], self.keepdim), DType.i64)


@register
class CumSum(Op):
    name = "tensor.cumsum"
    operands = ("x",)
    attrs = {"axis": -1}

    def infer_type(self):
        normalize_axis(self.axis, self.x.type.rank)
        return self.x.type


@register
class TopK(Op):
    name = "tensor.topk"
    operands = ("x",)
    attrs = {"k": 1, "axis": -1, "largest": True}
    results = 2

    def infer_type(self):
        ax = normalize_axis(self.axis, self.x.type.rank)
        shape = list(self.x.shape)
        if isinstance(shape[ax], int) and not 0 <= self.k <= shape[ax]:
            raise ShapeError(f"tensor.topk k = {self.k} is out of range for a dim of {shape[ax]}")
        shape[ax] = self.k
        return self.x.type.with_shape(shape), TensorType(tuple(shape), DType.i64)


# ---- linear algebra ------------------------------------------------------------------------

@register
class MatMul(Op):
    """numpy.matmul: batched over leading dims with broadcasting; 1-D operands allowed."""

    name = "tensor.matmul"
    operands = ("lhs", "rhs")

    def infer_type(self):
        a, b = self.lhs.type, self.rhs.type
        if a.dtype != b.dtype:
            raise ShapeError(f"tensor.matmul operands differ in dtype: {a} and {b}")
        if a.rank == 0 or b.rank == 0:
            raise ShapeError("tensor.matmul needs operands of rank >= 1")
        sa = a.shape if a.rank > 1 else (1,) + a.shape
        sb = b.shape if b.rank > 1 else b.shape + (1,)
        if not dims_equal(sa[-1], sb[-2]):
            raise ShapeError(f"tensor.matmul contraction dims differ: {a} @ {b}")
        batch = broadcast_shapes(sa[:-2], sb[:-2])
        shape = batch + (sa[-2],) * (a.rank > 1) + (sb[-1],) * (b.rank > 1)
        return TensorType(shape, a.dtype)


# ---- views and data movement ---------------------------------------------------------------

@register
class Reshape(Op):
    name = "tensor.reshape"
    operands = ("x",)
    declared = True

    def verify(self):
        super().verify()
        out = self.result.type
        _check(self, out.dtype == self.x.dtype, "reshape may not change the dtype")
        _check(self, dims_equal(out.numel(), self.x.type.numel()),
               f"reshape from {self.x.type} to {out} changes the element count")


@register
class Broadcast(Op):
    """Broadcast (torch `expand`) to the declared result shape."""

    name = "tensor.broadcast"
    operands = ("x",)
    declared = True

    def verify(self):
        super().verify()
        out = self.result.type
        _check(self, out.dtype == self.x.dtype, "broadcast may not change the dtype")
        try:
            ok = broadcast_shapes(self.x.shape, out.shape) == out.shape
        except ShapeError:
            ok = False
        _check(self, ok, f"{self.x.type} does not broadcast to {out}")


@register
class Permute(Op):
    name = "tensor.permute"
    operands = ("x",)
    attrs = {"perm": ()}

    def infer_type(self):
        perm = tuple(self.perm)
        if sorted(perm) != list(range(self.x.type.rank)):
            raise ShapeError(f"perm {list(perm)} is not a permutation of rank {self.x.type.rank}")
        return self.x.type.with_shape(self.x.shape[p] for p in perm)


@register
class Slice(Op):
    """x[start:end:step] along one axis; `end` may be a symbolic dim (as text) and is clamped."""

    name = "tensor.slice"
    operands = ("x",)
    attrs = {"axis": 0, "start": 0, "end": None, "step": 1}

    def infer_type(self):
        ax = normalize_axis(self.axis, self.x.type.rank)
        size = self.x.shape[ax]
        start, end, step = self.start, self.end, self.step
        if step < 1:
            raise ShapeError("tensor.slice needs step >= 1")
        end = size if end is None else canon_dim(end)
        # Negative bounds count from the end, as in Python: x[-3:], x[2:-1].
        if isinstance(start, int) and start < 0:
            start = max(start + size, 0) if isinstance(size, int) else dim_add(size, start)
        if isinstance(end, int) and end < 0:
            end = max(end + size, 0) if isinstance(size, int) else dim_add(size, end)
        if isinstance(size, int) and isinstance(end, int):
            end = min(end, size)
        if isinstance(start, int) and isinstance(size, int):
            start = min(start, size)
        length = dim_floordiv(dim_add(dim_sub(end, start), step - 1), step)
        if isinstance(length, int):
            length = max(length, 0)
        shape = list(self.x.shape)
        shape[ax] = length
        return self.x.type.with_shape(shape)


@register
class Concat(Op):
    name = "tensor.concat"
    operands = ("*inputs",)
    attrs = {"axis": 0}

    def infer_type(self):
        ins = [v.type for v in self.operand_values]
        if not ins:
            raise ShapeError("tensor.concat needs at least one operand")
        ax = normalize_axis(self.axis, ins[0].rank)
        total = 0
        for t in ins:
            ok = t.rank == ins[0].rank and t.dtype == ins[0].dtype and all(
                dims_equal(a, b) for i, (a, b) in enumerate(zip(t.shape, ins[0].shape))
                if i != ax)
            if not ok:
                raise ShapeError(f"tensor.concat operands {t} and {ins[0]} do not fit on axis "
                                 f"{ax}")
            total = dim_add(total, t.shape[ax])
        shape = list(ins[0].shape)
        shape[ax] = total
        return ins[0].with_shape(shape)


# ---- indexing ------------------------------------------------------------------------------

@register
class Take(Op):
    """numpy.take: index one axis with an integer tensor of any shape (embedding lookup,
    index_select, x[idx])."""

    name = "tensor.take"
    operands = ("x", "indices")
    attrs = {"axis": 0}

    def infer_type(self):
        if not self.indices.dtype.is_int:
            raise ShapeError(f"tensor.take indices must be integers, got {self.indices.type}")
        ax = normalize_axis(self.axis, self.x.type.rank)
        s = self.x.shape
        return self.x.type.with_shape(s[:ax] + self.indices.shape + s[ax + 1:])


@register
class Gather(Op):
    """numpy.take_along_axis / torch.gather: indices have the rank of x."""

    name = "tensor.gather"
    operands = ("x", "indices")
    attrs = {"axis": 0}

    def infer_type(self):
        if self.indices.type.rank != self.x.type.rank or not self.indices.dtype.is_int:
            raise ShapeError(f"tensor.gather needs integer indices of x's rank, got "
                             f"{self.indices.type} for {self.x.type}")
        normalize_axis(self.axis, self.x.type.rank)
        return self.x.type.with_shape(self.indices.shape)


@register
class Scatter(Op):
    """torch.scatter: out = x; out[..., idx[i], ...] = src[i] along `axis` (`reduce` = none|add)."""

    name = "tensor.scatter"
    operands = ("x", "indices", "src")
    attrs = {"axis": 0, "reduce": "none"}

    def infer_type(self):
        if self.indices.type.rank != self.x.type.rank or self.src.dtype != self.x.dtype:
            raise ShapeError(f"tensor.scatter operands do not fit: {self.x.type}, "
                             f"{self.indices.type}, {self.src.type}")
        return self.x.type


@register
class IndexAdd(Op):
    """torch.index_add: out = x; out[idx[i]] += src[i] along `axis` (1-D indices)."""

    name = "tensor.index_add"
    operands = ("x", "indices", "src")
    attrs = {"axis": 0}

    def infer_type(self):
        if self.indices.type.rank != 1 or self.src.dtype != self.x.dtype:
            raise ShapeError(f"tensor.index_add needs 1-D indices and src of x's dtype, got "
                             f"{self.indices.type}, {self.src.type}")
        return self.x.type


@register
class NonZero(Op):
    """Coordinates of the true elements: i64[n, rank] where n is data-dependent (a fresh
    symbol, declared in the result type)."""

    name = "tensor.nonzero"
    operands = ("x",)
    declared = True

    def verify(self):
        super().verify()
        out = self.result.type
        _check(self, out.dtype is DType.i64 and out.rank == 2 and out.shape[1] == self.x.type.rank,
               f"result must be i64[n,{self.x.type.rank}], got {out}")


# ---- constants -----------------------------------------------------------------------------

@register
class Constant(Op):
    """A constant: `value` is a scalar splatted over the declared shape, or a nested list of at
    most MAX_INLINE elements. Larger constants are buffers of the function, not inline text."""

    name = "tensor.constant"
    attrs = {"value": 0.0}
    declared = True
    MAX_INLINE = 64

    def verify(self):
        super().verify()
        import numpy as np

        value = np.asarray(self.value)
        out = self.result.type
        _check(self, value.size <= self.MAX_INLINE, "inline constants hold at most "
               f"{self.MAX_INLINE} elements; make larger ones a buffer argument")
        if value.ndim:
            _check(self, tuple(value.shape) == out.shape,
                   f"value shape {list(value.shape)} differs from the result type {out}")


@register
class Iota(Op):
    """start + step * i for i in range(n), n the declared (possibly symbolic) length."""

    name = "tensor.iota"
    attrs = {"start": 0, "step": 1}
    declared = True

    def verify(self):
        super().verify()
        _check(self, self.result.type.rank == 1, "tensor.iota produces a 1-D tensor")
