"""`Builder`: a thin IR builder over the `Rewriter` for passes that emit arithmetic — the
VJP rules of `autodiff` and the updates of `optimizer-step` — with numpy broadcasting in mind."""
from __future__ import annotations

from lmc.ir.core import Location, Value
from lmc.ir.rewriter import Rewriter
from lmc.ir.types import DType, TensorType, dim_mul, dims_equal, normalize_axis


class Builder:
    """Builds IR before a rewriter's insertion point: arithmetic, constants, views and the
    broadcasting helpers gradients need (`sum_to` undoes broadcasting). Every op gets `loc`."""

    def __init__(self, rw: Rewriter):
        self.rw = rw
        self.loc = Location()

    def op(self, name: str, *operands: Value, type: TensorType | None = None, **attrs) -> Value:
        return self.rw.value(name, *operands, result_type=type, loc=self.loc, **attrs)

    # -- arithmetic (operands broadcast as numpy does) ----------------------------------------

    def add(self, a, b):
        return self.op("tensor.add", a, b)

    def sub(self, a, b):
        return self.op("tensor.sub", a, b)

    def mul(self, a, b):
        return self.op("tensor.mul", a, b)

    def div(self, a, b):
        return self.op("tensor.div", a, b)

    def neg(self, a):
        return self.op("tensor.neg", a)

    def scalar(self, value: float, like: Value) -> Value:
        """A 0-d constant in `like`'s dtype (broadcasts against it)."""
        return self.rw.constant(float(value), TensorType((), like.dtype), loc=self.loc)

    def full(self, value: float, type: TensorType) -> Value:
        return self.rw.constant(value, type, loc=self.loc)

    def scale(self, a: Value, c: float) -> Value:
        return self.mul(a, self.scalar(c, a))

    def where(self, cond, a, b):
        return self.op("tensor.where", cond, a, b)

    def mask(self, cond: Value, g: Value) -> Value:
        """g where cond holds, else 0."""
        return self.where(cond, g, self.scalar(0.0, g))

    def cast(self, v: Value, dtype: DType) -> Value:
        return v if v.dtype is dtype else self.op("tensor.cast", v, dtype=dtype)

    # -- shapes ---------------------------------------------------------------------------

    def reshape(self, v: Value, shape) -> Value:
        shape = tuple(shape)
        if len(shape) == v.type.rank and all(dims_equal(a, b) for a, b in zip(shape, v.shape)):
            return v
        return self.op("tensor.reshape", v, type=v.type.with_shape(shape))

    def broadcast(self, v: Value, shape) -> Value:
        shape = tuple(shape)
        if v.shape == shape:
            return v
        return self.op("tensor.broadcast", v, type=v.type.with_shape(shape))

    def permute(self, v: Value, perm) -> Value:
        return v if list(perm) == list(range(v.type.rank)) else self.op(
            "tensor.permute", v, perm=tuple(perm))

    def transpose(self, v: Value) -> Value:
        """Swap the last two axes."""
        r = v.type.rank
        return self.permute(v, [*range(r - 2), r - 1, r - 2])

    def sum(self, v: Value, axes, keepdim: bool = False) -> Value:
        axes = tuple(axes)
        return self.op("tensor.sum", v, axes=axes, keepdim=keepdim) if axes else v

    def mean(self, v: Value, axes, keepdim: bool = False) -> Value:
        return self.op("tensor.mean", v, axes=tuple(axes), keepdim=keepdim)

    def sum_to(self, g: Value, t: TensorType) -> Value:
        """Undo broadcasting: sum `g` over the axes that broadcasting added or stretched, so
        that the result has type `t` (the operand's)."""
        lead = g.type.rank - t.rank
        stretched = [lead + i for i, d in enumerate(t.shape) if d == 1 and g.shape[lead + i] != 1]
        out = self.sum(g, list(range(lead)) + stretched, keepdim=bool(stretched))
        return self.cast(self.reshape(out, t.shape), t.dtype)

    def unreduce(self, g: Value, x: TensorType, axes, keepdim: bool) -> Value:
        """Broadcast the gradient of a reduction of `x` over `axes` back to x's shape."""
        axes = {normalize_axis(a, x.rank) for a in (axes or range(x.rank))}
        if not keepdim:
            g = self.reshape(g, [1 if i in axes else d for i, d in enumerate(x.shape)])
        return self.broadcast(g, x.shape)

    def count(self, x: TensorType, axes) -> Value:
        """The number of elements over `axes` of `x`, as a scalar of x's dtype (symbolic dims
        give a sum of ones, which the backend computes from the run-time sizes)."""
        dims = [x.shape[normalize_axis(a, x.rank)] for a in (axes or range(x.rank))]
        n = dim_mul(*dims) if dims else 1
        if isinstance(n, int):
            return self.full(float(n), TensorType((), x.dtype))
        return self.sum(self.full(1.0, TensorType(tuple(dims), x.dtype)), range(len(dims)))

    def zeros(self, t: TensorType) -> Value:
        return self.full(0.0, t)
