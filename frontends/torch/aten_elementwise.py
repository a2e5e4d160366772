"""Elementwise ATen ops: math, comparisons, logic, where/masked_fill, casts.

lmc binary ops need equal dtypes: each converter computes torch's promoted dtype
(`cx.promote`) and casts its operands to it; Python scalars become rank-0 splat constants.
"""
from __future__ import annotations

import torch

from lmc.frontends.torch.context import Ctx, NotConvertible, converter
from lmc.ir.types import DType

aten = torch.ops.aten

UNARY = {
    aten.neg.default: "tensor.neg", aten.abs.default: "tensor.abs",
    aten.exp.default: "tensor.exp", aten.log.default: "tensor.log",
    aten.sqrt.default: "tensor.sqrt", aten.rsqrt.default: "tensor.rsqrt",
    aten.reciprocal.default: "tensor.reciprocal", aten.tanh.default: "tensor.tanh",
    aten.erf.default: "tensor.erf", aten.sigmoid.default: "tensor.sigmoid",
    aten.relu.default: "tensor.relu", aten.silu.default: "tensor.silu",
    aten.sin.default: "tensor.sin", aten.cos.default: "tensor.cos",
}


def _unary(name):
    def convert(cx: Ctx, x):
        return cx.op(name, cx.cast(x, cx.out_type().dtype))
    return convert


for _t, _n in UNARY.items():
    converter(_t)(_unary(_n))


@converter(aten.gelu.default)
def gelu(cx: Ctx, x, approximate="none"):
    return cx.op("tensor.gelu", x, approximate=approximate)


@converter(aten.logical_not.default, aten.bitwise_not.default)
def logical_not(cx: Ctx, x):
    if cx.out_type().dtype is not DType.bool:
        raise NotConvertible("bitwise not of integers")
    return cx.op("tensor.not", cx.cast(x, DType.bool))


# ---- binary ----------------------------------------------------------------------------------

ARITH = {
    "tensor.add": (aten.add.Tensor, aten.add.Scalar),
    "tensor.sub": (aten.sub.Tensor, aten.sub.Scalar),
    "tensor.mul": (aten.mul.Tensor, aten.mul.Scalar),
    "tensor.maximum": (aten.maximum.default,), "tensor.minimum": (aten.minimum.default,),
    "tensor.mod": (aten.remainder.Tensor, aten.remainder.Scalar),
}
COMPARE = {
    "tensor.eq": (aten.eq.Tensor, aten.eq.Scalar), "tensor.ne": (aten.ne.Tensor, aten.ne.Scalar),
    "tensor.lt": (aten.lt.Tensor, aten.lt.Scalar), "tensor.le": (aten.le.Tensor, aten.le.Scalar),
    "tensor.gt": (aten.gt.Tensor, aten.gt.Scalar), "tensor.ge": (aten.ge.Tensor, aten.ge.Scalar),
}
LOGICAL = {
    "tensor.and": (aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor),
    "tensor.or": (aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor),
    "tensor.ne": (aten.logical_xor.default, aten.bitwise_xor.Tensor, aten.__xor__.Tensor),
}


def binary(cx: Ctx, name: str, a, b, dtype: DType | None = None):
    """`name` on a and b after promoting both (Values or scalars) to one dtype."""
    dtype = dtype or cx.promote(a, b)
    return cx.op(name, cx.value(a, dtype), cx.value(b, dtype))


def _arith(name):
    def convert(cx: Ctx, a, b, alpha=1):
        if alpha != 1:  # add/sub(a, b, alpha): a + alpha * b
            b = binary(cx, "tensor.mul", b, alpha)
        return binary(cx, name, a, b, cx.out_type().dtype)
    return convert


def _compare(name):
    return lambda cx, a, b: binary(cx, name, a, b)


def _logical(name):
    def convert(cx: Ctx, a, b):
        if cx.out_type().dtype is not DType.bool:
            raise NotConvertible("bitwise ops on integers")
        return cx.op(name, cx.value(a, DType.bool), cx.value(b, DType.bool))
    return convert


for _n, _ts in ARITH.items():
    converter(*_ts)(_arith(_n))
for _n, _ts in COMPARE.items():
    converter(*_ts)(_compare(_n))
for _n, _ts in LOGICAL.items():
    converter(*_ts)(_logical(_n))


@converter(aten.rsub.Scalar, aten.rsub.Tensor)
def rsub(cx: Ctx, a, b, alpha=1):
    return _arith("tensor.sub")(cx, b, a if alpha == 1 else binary(cx, "tensor.mul", a, alpha))


@converter(aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode)
def div(cx: Ctx, a, b, rounding_mode=None):
    dtype = cx.out_type().dtype
    if rounding_mode is None:
        return binary(cx, "tensor.div", a, b, dtype)
    if rounding_mode == "floor":
        return binary(cx, "tensor.floordiv", a, b, dtype)
    # trunc: floor of |a/b| with the sign of a/b (lmc has no trunc op).
    a, b = cx.value(a, dtype), cx.value(b, dtype)
    q = cx.op("tensor.floordiv", cx.op("tensor.abs", a), cx.op("tensor.abs", b))
    zero = cx.const(0, dtype)
    neg = cx.op("tensor.ne", cx.op("tensor.lt", a, zero), cx.op("tensor.lt", b, zero))
    return cx.op("tensor.where", neg, cx.op("tensor.neg", q), q)


@converter(aten.floor_divide.default, aten.floor_divide.Scalar)
def floor_divide(cx: Ctx, a, b):
    return binary(cx, "tensor.floordiv", a, b, cx.out_type().dtype)


@converter(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar)
def pow_(cx: Ctx, a, b):
    return binary(cx, "tensor.pow", a, b, cx.out_type().dtype)


@converter(aten.square.default)
def square(cx: Ctx, x):
    return binary(cx, "tensor.mul", x, x, cx.out_type().dtype)


@converter(aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default,
           aten.clamp_max.default)
def clamp(cx: Ctx, x, lo=None, hi=None):
    if cx.node.target is aten.clamp_max.default:
        lo, hi = None, lo
    dtype = cx.out_type().dtype
    y = cx.cast(x, dtype)
    if lo is not None:
        y = cx.op("tensor.maximum", y, cx.value(lo, dtype))
    if hi is not None:
        y = cx.op("tensor.minimum", y, cx.value(hi, dtype))
    return y


# ---- selection and casts ---------------------------------------------------------------------

@converter(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def where(cx: Ctx, cond, a, b):
    dtype = cx.out_type().dtype
    return cx.op("tensor.where", cx.cast(cond, DType.bool), cx.value(a, dtype), cx.value(b, dtype))


@converter(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(cx: Ctx, x, mask, value):
    dtype = cx.out_type().dtype
    return cx.op("tensor.where", cx.cast(mask, DType.bool), cx.value(value, dtype),
                 cx.cast(x, dtype))


@converter(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
           aten.to.other, aten.type_as.default)
def to(cx: Ctx, x, *args, **kwargs):
    return cx.cast(x, cx.out_type().dtype)
