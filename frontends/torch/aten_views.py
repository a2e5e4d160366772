"""View and data-movement ATen ops: reshape family, permute family, expand, slicing, cat/stack.

Views become value semantics: every reshape-like op is `tensor.reshape` to the node's result
type; identity ops (clone, contiguous, eval-mode dropout) return their operand.
"""
from __future__ import annotations

import operator
import sys

import torch

from lmc.frontends.torch.context import Ctx, NotConvertible, converter
from lmc.ir.core import Value
from lmc.ir.types import normalize_axis

aten = torch.ops.aten


@converter(operator.getitem)
def getitem(cx: Ctx, seq, i):
    return seq[i]


@converter(aten.clone.default, aten.contiguous.default, aten.alias.default,
           aten.detach.default, aten.lift_fresh_copy.default, aten.lift_fresh.default)
def identity(cx: Ctx, x, *args, **kwargs):
    return x


@converter(aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
def dropout(cx: Ctx, x, p, train):
    if train and p > 0:
        raise NotConvertible("dropout in training mode; call model.eval() before importing")
    return x


@converter(aten.view.default, aten.reshape.default, aten._unsafe_view.default,
           aten.flatten.using_ints, aten.unflatten.int, aten.unsqueeze.default,
           aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.view_as.default,
           aten.reshape_as.default)
def reshape(cx: Ctx, x, *args, **kwargs):
    return cx.reshape(x, cx.out_type())


@converter(aten.permute.default)
def permute(cx: Ctx, x, dims):
    perm = tuple(normalize_axis(d, x.type.rank) for d in dims)
    return x if perm == tuple(range(len(perm))) else cx.op("tensor.permute", x, perm=perm)


@converter(aten.transpose.int, aten.swapaxes.default)
def transpose(cx: Ctx, x, a, b):
    perm = list(range(x.type.rank))
    a, b = normalize_axis(a, len(perm)), normalize_axis(b, len(perm))
    perm[a], perm[b] = perm[b], perm[a]
    return permute(cx, x, perm)


@converter(aten.t.default, aten.numpy_T.default)
def t(cx: Ctx, x):
    return permute(cx, x, list(reversed(range(x.type.rank))))


@converter(aten.expand.default, aten.expand_as.default, aten.broadcast_to.default)
def expand(cx: Ctx, x, *args, **kwargs):
    out = cx.out_type()
    return x if x.type == out else cx.op("tensor.broadcast", x, type=out)


@converter(aten.broadcast_tensors.default)
def broadcast_tensors(cx: Ctx, xs):
    outs = [cx.out_type(i) for i in range(len(xs))]
    return [x if x.type == t else cx.op("tensor.broadcast", x, type=t) for x, t in zip(xs, outs)]


# ---- slicing ---------------------------------------------------------------------------------

def slice_axis(cx: Ctx, x: Value, axis: int, start, end, step: int = 1) -> Value:
    """x[start:end:step] along axis; `end` may be a symbolic dim."""
    size = x.shape[axis]
    start = 0 if start is None else start
    if not isinstance(start, int):
        raise NotConvertible(f"slice with a symbolic start ({start})")
    if end is None or (isinstance(end, int) and (end >= sys.maxsize // 2 or (
            isinstance(size, int) and end >= size))) or end == size:
        end = None
    if start == 0 and end is None and step == 1:
        return x
    return cx.op("tensor.slice", x, axis=axis, start=start, end=end, step=step)


@converter(aten.slice.Tensor)
def slice_(cx: Ctx, x, dim=0, start=None, end=None, step=1):
    return slice_axis(cx, x, normalize_axis(dim, x.type.rank), start, end, step)


def select_axis(cx: Ctx, x: Value, axis: int, i) -> Value:
    """x[..., i, ...]: a one-element slice, then a reshape dropping the axis."""
    size = x.shape[axis]
    if isinstance(i, int) and i < 0 and isinstance(size, int):
        i += size
    y = cx.op("tensor.slice", x, axis=axis, start=i, end=None if i == -1 else i + 1, step=1)
    return cx.reshape(y, x.shape[:axis] + x.shape[axis + 1:])


@converter(aten.select.int)
def select(cx: Ctx, x, dim, index):
    return select_axis(cx, x, normalize_axis(dim, x.type.rank), index)


@converter(aten.narrow.default)
def narrow(cx: Ctx, x, dim, start, length):
    return slice_axis(cx, x, normalize_axis(dim, x.type.rank), start, start + length)


@converter(aten.split.Tensor, aten.split_with_sizes.default, aten.split.sizes)
def split(cx: Ctx, x, sizes, dim=0):
    axis = normalize_axis(dim, x.type.rank)
    n = len(cx.node.meta["val"])
    if isinstance(sizes, int):
        sizes = [sizes] * n
    outs, start = [], 0
    for k, s in enumerate(sizes[:n]):
        end = None if k == n - 1 else start + s
        outs.append(slice_axis(cx, x, axis, start, end))
        start = start + s if isinstance(s, int) else None
    return tuple(outs)


@converter(aten.chunk.default)
def chunk(cx: Ctx, x, chunks, dim=0):
    axis = normalize_axis(dim, x.type.rank)
    sizes = [cx.dim(v.shape[axis]) for v in cx.node.meta["val"]]
    return split(cx, x, sizes, axis)


@converter(aten.unbind.int)
def unbind(cx: Ctx, x, dim=0):
    axis = normalize_axis(dim, x.type.rank)
    return tuple(select_axis(cx, x, axis, i) for i in range(len(cx.node.meta["val"])))


@converter(aten.cat.default, aten.concat.default)
def cat(cx: Ctx, xs, dim=0):
    dtype = cx.out_type().dtype
    xs = [cx.cast(x, dtype) for x in xs if not (x.type.rank == 1 and x.shape[0] == 0)]
    if len(xs) == 1:
        return xs[0]
    return cx.op("tensor.concat", *xs, axis=normalize_axis(dim, xs[0].type.rank))


@converter(aten.stack.default)
def stack(cx: Ctx, xs, dim=0):
    axis = normalize_axis(dim, xs[0].type.rank + 1)
    dtype = cx.out_type().dtype
    parts = [cx.reshape(cx.cast(x, dtype), x.shape[:axis] + (1,) + x.shape[axis:]) for x in xs]
    return parts[0] if len(parts) == 1 else cx.op("tensor.concat", *parts, axis=axis)


@converter(aten.repeat_interleave.self_int)
def repeat_interleave(cx: Ctx, x, repeats, dim=None, output_size=None):
    """Each element `repeats` times along dim: insert an axis, broadcast it, merge it."""
    if dim is None:
        x, dim = cx.reshape(x, (x.type.numel(),)), 0
    axis = normalize_axis(dim, x.type.rank)
    s = x.shape
    y = cx.reshape(x, s[:axis + 1] + (1,) + s[axis + 1:])
    y = cx.op("tensor.broadcast", y, type=y.type.with_shape(s[:axis + 1] + (repeats,) +
                                                             s[axis + 1:]))
    return cx.reshape(y, cx.out_type())
