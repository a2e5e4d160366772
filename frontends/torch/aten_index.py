"""Creation, reduction and indexing ATen ops: constants, iota, tril/triu, sums and maxima,
topk, gather/scatter, advanced indexing and the data-dependent nonzero/where.

The MoE dispatch loop (`torch.where(topi == e)`, `x[tok]`, `w[e]`, `p[tok, slot]`,
`index_add_`) is converted to the exact IR the `raise-moe` pass matches (docs/NOTES.md).
"""
from __future__ import annotations

import torch

from lmc.frontends.torch.aten_views import select_axis, slice_axis
from lmc.frontends.torch.context import Ctx, NotConvertible, converter
from lmc.ir.core import Value
from lmc.ir.types import DType, TensorType, dim_mul, normalize_axis

aten = torch.ops.aten


# ---- creation --------------------------------------------------------------------------------

def _splat(cx: Ctx, value) -> Value:
    return cx.const(value, cx.out_type().dtype, cx.out_type().shape)


@converter(aten.full.default, aten.full_like.default, aten.new_full.default)
def full(cx: Ctx, x, *args, **kwargs):
    value = args[0] if cx.node.target is not aten.full.default else (args[0] if args else
                                                                     kwargs["fill_value"])
    return _splat(cx, value)


@converter(aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default,
           aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default)
def zeros(cx: Ctx, *args, **kwargs):
    return _splat(cx, 0)  # empty() is unspecified memory: zeros are as good as anything


@converter(aten.ones.default, aten.ones_like.default, aten.new_ones.default)
def ones(cx: Ctx, *args, **kwargs):
    return _splat(cx, 1)


@converter(aten.scalar_tensor.default)
def scalar_tensor(cx: Ctx, value, **kwargs):
    return _splat(cx, value)


@converter(aten.arange.default, aten.arange.start, aten.arange.start_step)
def arange(cx: Ctx, *args, **kwargs):
    nums = [a for a in args if not isinstance(a, torch.dtype)]
    start, step = (nums[0] if len(nums) > 1 else 0), (nums[2] if len(nums) > 2 else 1)
    if not all(isinstance(v, (int, float)) for v in (start, step)):
        raise NotConvertible("arange with a symbolic start or step")
    out = cx.out_type()
    if out.dtype.is_int:
        start, step = int(start), int(step)
    return cx.op("tensor.iota", type=out, start=start, step=step)


@converter(aten.tril.default, aten.triu.default)
def tril(cx: Ctx, x, diagonal=0):
    rows, cols = x.shape[-2], x.shape[-1]
    r = cx.reshape(cx.op("tensor.iota", type=TensorType((rows,), DType.i64)), (rows, 1))
    c = cx.op("tensor.iota", type=TensorType((cols,), DType.i64))
    diff = cx.op("tensor.sub", c, r)  # col - row
    cmp = "tensor.le" if cx.node.target is aten.tril.default else "tensor.ge"
    keep = cx.op(cmp, diff, cx.const(diagonal, DType.i64))
    return cx.op("tensor.where", keep, x, cx.const(0, x.dtype))


# ---- reductions ------------------------------------------------------------------------------

def _axes(x: Value, dims) -> tuple[int, ...]:
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return ()
    dims = [dims] if isinstance(dims, int) else dims
    return tuple(sorted(normalize_axis(d, x.type.rank) for d in dims))


def _reduce(name):
    def convert(cx: Ctx, x, dims=None, keepdim=False, dtype=None):
        x = cx.cast(x, cx.out_type().dtype)
        return cx.op(name, x, axes=_axes(x, dims), keepdim=bool(keepdim))
    return convert


converter(aten.sum.dim_IntList, aten.sum.default)(_reduce("tensor.sum"))
converter(aten.mean.dim, aten.mean.default)(_reduce("tensor.mean"))
converter(aten.amax.default, aten.max.default)(_reduce("tensor.max"))
converter(aten.amin.default, aten.min.default)(_reduce("tensor.min"))


@converter(aten.max.dim, aten.min.dim)
def max_dim(cx: Ctx, x, dim, keepdim=False):
    if cx.node.target is aten.min.dim:
        raise NotConvertible("min.dim (no argmin op)")
    values = cx.op("tensor.max", x, axes=_axes(x, dim), keepdim=bool(keepdim))
    return values, cx.op("tensor.argmax", x, axis=dim, keepdim=bool(keepdim))


@converter(aten.argmax.default)
def argmax(cx: Ctx, x, dim=None, keepdim=False):
    if dim is None:
        x, dim = cx.reshape(x, (x.type.numel(),)), 0
    return cx.reshape(cx.op("tensor.argmax", x, axis=dim, keepdim=bool(keepdim)),
                      cx.out_type())


@converter(aten.var.correction, aten.var.dim)
def var(cx: Ctx, x, dims=None, *args, correction=None, keepdim=False, unbiased=None):
    if cx.node.target is aten.var.dim:  # var.dim(x, dims, unbiased, keepdim)
        unbiased = args[0] if args else True
        keepdim = args[1] if len(args) > 1 else keepdim
        correction = 1 if unbiased else 0
    correction = 1 if correction is None else correction
    axes = _axes(x, dims) or tuple(range(x.type.rank))
    mu = cx.op("tensor.mean", x, axes=axes, keepdim=True)
    d = cx.op("tensor.sub", x, mu)
    ss = cx.op("tensor.sum", cx.op("tensor.mul", d, d), axes=axes, keepdim=bool(keepdim))
    n = dim_mul(*[x.shape[a] for a in axes])
    if not isinstance(n, int):  # symbolic count: sum ones over the same axes
        ones = cx.const(1, x.dtype, x.shape)
        count = cx.op("tensor.sum", ones, axes=axes, keepdim=bool(keepdim))
        return cx.op("tensor.div", ss, cx.op("tensor.sub", count, cx.const(correction, x.dtype)))
    return cx.op("tensor.div", ss, cx.const(max(n - correction, 0), x.dtype))


@converter(aten.cumsum.default)
def cumsum(cx: Ctx, x, dim, dtype=None):
    return cx.op("tensor.cumsum", cx.cast(x, cx.out_type().dtype), axis=dim)


@converter(aten.topk.default)
def topk(cx: Ctx, x, k, dim=-1, largest=True, sorted=True):
    return cx.ops("tensor.topk", x, k=int(k), axis=dim, largest=bool(largest))


# ---- indexing --------------------------------------------------------------------------------

@converter(aten.gather.default)
def gather(cx: Ctx, x, dim, index, sparse_grad=False):
    return cx.op("tensor.gather", x, index, axis=dim)


@converter(aten.scatter.src, aten.scatter.value, aten.scatter_add.default)
def scatter(cx: Ctx, x, dim, index, src):
    if not isinstance(src, Value):
        src = cx.const(src, x.dtype, index.shape)
    reduce = "add" if cx.node.target is aten.scatter_add.default else "none"
    return cx.op("tensor.scatter", x, index, cx.cast(src, x.dtype), axis=dim, reduce=reduce)


@converter(aten.index_select.default)
def index_select(cx: Ctx, x, dim, index):
    return cx.op("tensor.take", x, index, axis=dim)


@converter(aten.index_add.default, aten.index_add_.default)
def index_add(cx: Ctx, x, dim, index, src, alpha=1):
    if alpha != 1:
        src = cx.op("tensor.mul", src, cx.const(alpha, src.dtype))
    return cx.op("tensor.index_add", x, index, cx.cast(src, x.dtype), axis=dim)


@converter(aten.index.Tensor)
def index(cx: Ctx, x, indices):
    """x[i0, i1, ...] (advanced indexing) on leading dims, or one index tensor on any axis."""
    used = [k for k, i in enumerate(indices) if i is not None]
    if any(indices[k].dtype is DType.bool for k in used):
        if len(used) != 1 or indices[used[0]].type.rank != 1:
            raise NotConvertible("boolean mask indexing other than one 1-D mask")
        indices = list(indices)
        indices[used[0]] = _flat_nonzero(cx, indices[used[0]])
    if len(used) == 1:
        return cx.op("tensor.take", x, indices[used[0]], axis=used[0])
    if used != list(range(len(used))):
        raise NotConvertible("advanced indexing with several index tensors not on leading dims")
    # Several index tensors: one flat index into x reshaped to [d0*d1*..., rest].
    flat = cx.cast(indices[0], DType.i64)
    for k in used[1:]:
        flat = cx.op("tensor.add", cx.op("tensor.mul", flat, cx.size(x.shape[k], DType.i64)),
                     cx.cast(indices[k], DType.i64))
    n = len(used)
    xs = cx.reshape(x, (dim_mul(*x.shape[:n]),) + x.shape[n:])
    return cx.op("tensor.take", xs, flat, axis=0)


def _flat_nonzero(cx: Ctx, mask: Value) -> Value:
    coords = _nonzero(cx, mask, cx.node.meta["val"].shape[0])
    return select_axis(cx, coords, 1, 0)


def _nonzero(cx: Ctx, x: Value, count) -> Value:
    t = TensorType((cx.dim(count), x.type.rank), DType.i64)
    return cx.op("tensor.nonzero", cx.cast(x, DType.bool), type=t)


@converter(aten.nonzero.default)
def nonzero(cx: Ctx, x):
    return cx.reshape(_nonzero(cx, x, cx.node.meta["val"].shape[0]), cx.out_type())


@converter(aten.where.default)
def where_coords(cx: Ctx, cond):
    """torch.where(cond): one i64[u0] coordinate vector per dim of cond."""
    coords = _nonzero(cx, cond, cx.node.meta["val"][0].shape[0])
    return tuple(select_axis(cx, coords, 1, i) for i in range(cond.type.rank))


@converter(aten.diff.default)
def diff(cx: Ctx, x, n=1, dim=-1, prepend=None, append=None):
    """x[1:] - x[:-1] along dim, n times (HF builds position ids from attention masks so)."""
    axis = normalize_axis(dim, x.type.rank)
    parts = [p for p in (prepend, x, append) if p is not None]
    if len(parts) > 1:
        x = cx.op("tensor.concat", *[cx.cast(p, x.dtype) for p in parts], axis=axis)
    for _ in range(n):
        x = cx.op("tensor.sub", slice_axis(cx, x, axis, 1, None), slice_axis(cx, x, axis, 0, -1))
    return cx.cast(x, cx.out_type().dtype)
