"""The VJP table of `autodiff`: one short rule per op, written in the same IR (DESIGN.md §6).

A rule `fn(b, op, grads)` gets the gradients of the op's results (None where a result has none)
and returns one gradient per operand (None: no gradient flows there, e.g. indices). Rules build
IR through `Builder` (lmc/ir/builder.py), a thin builder over the `Rewriter` that knows
broadcasting: every gradient it returns has exactly its operand's type. `tensor.slice` returns
a `SlicePiece` instead of a value, so that the gradients of all the slices of one tensor become
one concat (see autodiff.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmc.errors import UnsupportedOpError
from lmc.ir.builder import Builder
from lmc.ir.core import Op, Value
from lmc.ir.types import (
    DType,
    TensorType,
    broadcast_shapes,
    dim_add,
    dim_mul,
    dim_sub,
    dims_equal,
    normalize_axis,
)

VJP: dict[str, Callable] = {}

# Ops through which no gradient flows: integer results, comparisons, data-dependent indices.
NO_GRAD = {"tensor.eq", "tensor.ne", "tensor.lt", "tensor.le", "tensor.gt", "tensor.ge",
           "tensor.and", "tensor.or", "tensor.not", "tensor.argmax", "tensor.nonzero",
           "tensor.constant", "tensor.iota", "moe.route", "tensor.floordiv"}


def vjp(*names: str):
    def deco(fn):
        for n in names:
            VJP[n] = fn
        return fn
    return deco


@dataclass
class SlicePiece:
    """The gradient of `x[start:end:step]` along `axis`, not yet padded to x's shape."""

    grad: Value
    axis: int
    start: int
    step: int


def _x(op: Op) -> Value:
    return op.operand_values[0]


def unsupported(op: Op, why: str) -> UnsupportedOpError:
    """The error for an op (or a form of it) that autodiff cannot differentiate."""
    return UnsupportedOpError(
        [(f"{op.name} ({why})", str(op.loc))], what="autodiff cannot differentiate",
        advice="Keep these ops off the path from the {param} arguments to the loss, or add "
               "a rule to the VJP table in lmc/passes/vjp.py.")


# ---- elementwise ---------------------------------------------------------------------------

_UNARY: dict[str, Callable[[Builder, Value, Value, Value], Value]] = {
    # (builder, x, y, g) → dx, for y = f(x)
    "tensor.neg": lambda b, x, y, g: b.neg(g),
    "tensor.exp": lambda b, x, y, g: b.mul(g, y),
    "tensor.log": lambda b, x, y, g: b.div(g, x),
    "tensor.sqrt": lambda b, x, y, g: b.div(b.scale(g, 0.5), y),
    "tensor.rsqrt": lambda b, x, y, g: b.mul(b.scale(g, -0.5), b.mul(y, b.mul(y, y))),
    "tensor.reciprocal": lambda b, x, y, g: b.neg(b.mul(g, b.mul(y, y))),
    "tensor.tanh": lambda b, x, y, g: b.mul(g, b.sub(b.scalar(1.0, y), b.mul(y, y))),
    "tensor.erf": lambda b, x, y, g: b.mul(b.scale(g, 2 / math.sqrt(math.pi)),
                                           b.op("tensor.exp", b.neg(b.mul(x, x)))),
    "tensor.sigmoid": lambda b, x, y, g: b.mul(g, b.mul(y, b.sub(b.scalar(1.0, y), y))),
    "tensor.relu": lambda b, x, y, g: b.mask(b.op("tensor.gt", x, b.scalar(0.0, x)), g),
    "tensor.sin": lambda b, x, y, g: b.mul(g, b.op("tensor.cos", x)),
    "tensor.cos": lambda b, x, y, g: b.neg(b.mul(g, b.op("tensor.sin", x))),
    "tensor.abs": lambda b, x, y, g: b.mul(g, _sign(b, x)),
}


def _sign(b: Builder, x: Value) -> Value:
    zero = b.scalar(0.0, x)
    pos = b.where(b.op("tensor.gt", x, zero), b.scalar(1.0, x), zero)
    return b.where(b.op("tensor.lt", x, zero), b.scalar(-1.0, x), pos)


@vjp(*_UNARY)
def _unary(b: Builder, op: Op, gs):
    return [_UNARY[op.name](b, _x(op), op.result, gs[0])]


@vjp("tensor.silu")
def _silu(b, op, gs):
    x, g = _x(op), gs[0]
    s = b.op("tensor.sigmoid", x)
    one = b.scalar(1.0, x)
    return [b.mul(g, b.mul(s, b.add(one, b.mul(x, b.sub(one, s)))))]


@vjp("tensor.gelu")
def _gelu(b, op, gs):
    x, g = _x(op), gs[0]
    one = b.scalar(1.0, x)
    if op.approximate == "tanh":
        k, c = math.sqrt(2 / math.pi), 0.044715
        x2 = b.mul(x, x)
        t = b.op("tensor.tanh", b.scale(b.mul(x, b.add(one, b.scale(x2, c))), k))
        dt = b.mul(b.sub(one, b.mul(t, t)), b.scale(b.add(one, b.scale(x2, 3 * c)), k))
        d = b.add(b.scale(b.add(one, t), 0.5), b.mul(b.scale(x, 0.5), dt))
        return [b.mul(g, d)]
    cdf = b.scale(b.add(one, b.op("tensor.erf", b.scale(x, 1 / math.sqrt(2)))), 0.5)
    pdf = b.scale(b.op("tensor.exp", b.scale(b.mul(x, x), -0.5)), 1 / math.sqrt(2 * math.pi))
    return [b.mul(g, b.add(cdf, b.mul(x, pdf)))]


@vjp("tensor.add")
def _add(b, op, gs):
    return [b.sum_to(gs[0], v.type) for v in op.operand_values]


@vjp("tensor.sub")
def _sub(b, op, gs):
    lhs, rhs = op.operand_values
    return [b.sum_to(gs[0], lhs.type), b.sum_to(b.neg(gs[0]), rhs.type)]


@vjp("tensor.mul")
def _mul(b, op, gs):
    lhs, rhs = op.operand_values
    return [b.sum_to(b.mul(gs[0], rhs), lhs.type), b.sum_to(b.mul(gs[0], lhs), rhs.type)]


@vjp("tensor.div")
def _div(b, op, gs):
    lhs, rhs = op.operand_values
    if not lhs.dtype.is_float:
        return [None, None]
    dl = b.div(gs[0], rhs)
    return [b.sum_to(dl, lhs.type), b.sum_to(b.neg(b.mul(dl, op.result)), rhs.type)]


@vjp("tensor.pow")
def _pow(b, op, gs):
    # As torch: no gradient where the exponent is 0 (d/da) or the base is 0 (d/db).
    a, e, g = *op.operand_values, gs[0]
    zero = b.scalar(0.0, a)
    da = b.mul(b.mul(g, e), b.op("tensor.pow", a, b.sub(e, b.scalar(1.0, e))))
    da = b.where(b.op("tensor.eq", e, zero), zero, da)
    de = b.mul(g, b.mul(op.result, b.op("tensor.log", a)))
    de = b.where(b.op("tensor.eq", a, zero), zero, de)
    return [b.sum_to(da, a.type), b.sum_to(de, e.type)]


@vjp("tensor.maximum", "tensor.minimum")
def _extremum(b, op, gs):
    # As torch: the larger (smaller) operand takes the gradient; a tie splits it in half.
    a, c, g = *op.operand_values, gs[0]
    wins = b.op("tensor.gt" if op.name == "tensor.maximum" else "tensor.lt", a, c)
    half = b.scale(g, 0.5)
    ga = b.where(wins, g, b.mask(b.op("tensor.eq", a, c), half))
    return [b.sum_to(ga, a.type), b.sum_to(b.sub(g, ga), c.type)]


@vjp("tensor.mod")
def _mod(b, op, gs):
    a, c, g = *op.operand_values, gs[0]
    if not a.dtype.is_float:
        return [None, None]
    q = b.op("tensor.floordiv", a, c)
    return [b.sum_to(g, a.type), b.sum_to(b.neg(b.mul(g, q)), c.type)]


@vjp("tensor.where")
def _where(b, op, gs):
    cond, lhs, rhs = op.operand_values
    zero = b.scalar(0.0, gs[0])
    return [None, b.sum_to(b.where(cond, gs[0], zero), lhs.type),
            b.sum_to(b.where(cond, zero, gs[0]), rhs.type)]


@vjp("tensor.cast")
def _cast(b, op, gs):
    x = _x(op)
    return [b.cast(gs[0], x.dtype) if x.dtype.is_float and op.dtype.is_float else None]


@vjp("tensor.barrier")
def _barrier(b, op, gs):
    return [gs[0]]


# ---- reductions ----------------------------------------------------------------------------

@vjp("tensor.sum")
def _sum(b, op, gs):
    x = _x(op)
    return [b.unreduce(gs[0], x.type, op.axes, op.keepdim)]


@vjp("tensor.mean")
def _mean(b, op, gs):
    x = _x(op)
    g = b.div(gs[0], b.count(x.type, op.axes))
    return [b.unreduce(g, x.type, op.axes, op.keepdim)]


@vjp("tensor.max", "tensor.min")
def _max(b, op, gs):
    # As torch's amax/amin: ties share the gradient evenly.
    x = _x(op)
    y = b.unreduce(op.result, x.type, op.axes, op.keepdim)
    hit = b.cast(b.op("tensor.eq", x, y), x.dtype)
    axes = op.axes or tuple(range(x.type.rank))
    share = b.div(b.unreduce(gs[0], x.type, op.axes, op.keepdim),
                  b.broadcast(b.sum(hit, axes, keepdim=True), x.shape))
    return [b.mul(share, hit)]


@vjp("tensor.cumsum")
def _cumsum(b, op, gs):
    # d/dx_i of Σ_j g_j·cumsum_j = Σ_{j ≥ i} g_j = total − cumsum(g)_i + g_i
    g = gs[0]
    total = b.sum(g, [op.axis], keepdim=True)
    return [b.add(b.sub(total, b.op("tensor.cumsum", g, axis=op.axis)), g)]


@vjp("tensor.topk")
def _topk(b, op, gs):
    x = _x(op)
    g, idx = gs[0], op.result_values[1]
    if g is None:
        return [None]
    return [b.op("tensor.scatter", b.zeros(x.type), idx, g, axis=op.axis, reduce="add")]


# ---- linear algebra ------------------------------------------------------------------------

@vjp("tensor.matmul")
def _matmul(b, op, gs):
    """numpy.matmul's VJP: 1-D operands are promoted to matrices first; a 2-D weight under
    batched activations gets its gradient as one GEMM over the flattened rows (not a batch of
    products summed afterwards)."""
    a, w = op.operand_values
    a2 = b.reshape(a, (1, a.shape[0])) if a.type.rank == 1 else a
    w2 = b.reshape(w, (w.shape[0], 1)) if w.type.rank == 1 else w
    g2 = b.reshape(gs[0], broadcast_shapes(a2.shape[:-2], w2.shape[:-2]) +
                   (a2.shape[-2], w2.shape[-1]))
    da = b.sum_to(b.op("tensor.matmul", g2, b.transpose(w2)), a2.type)
    if w2.type.rank == 2 and a2.type.rank > 2:
        rows = dim_mul(*a2.shape[:-1])
        dw = b.op("tensor.matmul", b.transpose(b.reshape(a2, (rows, a2.shape[-1]))),
                  b.reshape(g2, (rows, g2.shape[-1])))
    else:
        dw = b.sum_to(b.op("tensor.matmul", b.transpose(a2), g2), w2.type)
    return [b.reshape(da, a.shape), b.reshape(dw, w.shape)]


# ---- views and data movement ---------------------------------------------------------------

@vjp("tensor.reshape")
def _reshape(b, op, gs):
    return [b.reshape(gs[0], _x(op).shape)]


@vjp("tensor.broadcast")
def _broadcast(b, op, gs):
    return [b.sum_to(gs[0], _x(op).type)]


@vjp("tensor.permute")
def _permute(b, op, gs):
    inverse = [0] * len(op.perm)
    for i, p in enumerate(op.perm):
        inverse[p] = i
    return [b.permute(gs[0], inverse)]


@vjp("tensor.slice")
def _slice(b, op, gs):
    x = _x(op)
    ax = normalize_axis(op.axis, x.type.rank)
    start, size = op.start, x.shape[ax]
    if isinstance(start, int) and start < 0 and not isinstance(size, int):
        # x[..., -k:] of a symbolic dim (the last token): its offset is symbolic, so it
        # cannot join the static concat of slice pieces; pad it with zeros on its own.
        if op.step != 1:
            raise unsupported(op, f"gradient of a step-{op.step} slice starting at {start} "
                                  f"of a dim of size {size}")
        return [_pad_dense(b, gs[0], x.type, ax, dim_add(size, start))]
    if start < 0:
        start = max(start + size, 0)
    return [SlicePiece(gs[0], ax, start, op.step)]


def _pad_dense(b: Builder, g: Value, t: TensorType, ax: int, before) -> Value:
    """g placed at offset `before` along `ax` of zeros of type t (a concat with zero gaps)."""
    after = dim_sub(t.shape[ax], dim_add(before, g.shape[ax]))
    parts = [g]
    if not dims_equal(before, 0):
        parts.insert(0, b.zeros(_resized(t, ax, before)))
    if not dims_equal(after, 0):
        parts.append(b.zeros(_resized(t, ax, after)))
    return g if len(parts) == 1 else b.op("tensor.concat", *parts, axis=ax)


def _resized(t: TensorType, ax: int, n) -> TensorType:
    return t.with_shape(t.shape[:ax] + (n,) + t.shape[ax + 1:])


def _dim_sum(dims) -> int | str:
    total = 0
    for d in dims:
        total = dim_add(total, d)
    return total


@vjp("tensor.concat")
def _concat(b, op, gs):
    """Each operand's part of dOut: a slice from the front when the sizes before it are
    static, from the back when those after it are (the slice bounds are ints), else a take
    at run-time offsets (two symbolic sizes, as in concat(past[T], new[S]))."""
    ax = normalize_axis(op.axis, op.result.type.rank)
    sizes = [v.shape[ax] for v in op.operand_values]
    out = []
    for i, size in enumerate(sizes):
        before, after = _dim_sum(sizes[:i]), _dim_sum(sizes[i + 1:])
        if isinstance(before, int):
            out.append(_slice_of(b, gs[0], ax, before, _end(before, size, after)))
        elif isinstance(after, int) and isinstance(size, int):
            out.append(_slice_of(b, gs[0], ax, -(after + size), -after if after else None))
        else:
            out.append(_take_range(b, gs[0], ax, sizes[:i], size))
    return out


def _end(before: int, size, after):
    """The end bound of a part starting at the static offset `before`."""
    if isinstance(size, int):
        return before + size
    if after == 0:
        return None
    return -after if isinstance(after, int) else dim_add(before, size)


def _slice_of(b: Builder, g: Value, ax: int, start: int, end) -> Value:
    return b.op("tensor.slice", g, axis=ax, start=start, end=end, step=1)


def _take_range(b: Builder, g: Value, ax: int, before: list, size) -> Value:
    """g[Σbefore : Σbefore + size] along ax: indices iota + Σbefore, the offset computed at
    run time as a sum of ones (the IR has no shape-of op)."""
    idx = b.op("tensor.iota", type=TensorType((size,), DType.i64))
    ones = b.full(1, TensorType((_dim_sum(before),), DType.i64))
    return b.op("tensor.take", g, b.add(idx, b.sum(ones, [0])), axis=ax)


@vjp("tensor.take")
def _take(b, op, gs):
    x, idx = op.operand_values
    ax = normalize_axis(op.axis, x.type.rank)
    n = dim_mul(*idx.shape) if idx.shape else 1
    flat_idx = b.reshape(idx, (n,))
    g = b.reshape(gs[0], x.shape[:ax] + (n,) + x.shape[ax + 1:])
    return [b.op("tensor.index_add", b.zeros(x.type), flat_idx, g, axis=ax), None]


@vjp("tensor.gather")
def _gather(b, op, gs):
    x, idx = op.operand_values
    return [b.op("tensor.scatter", b.zeros(x.type), idx, gs[0], axis=op.axis, reduce="add"),
            None]


@vjp("tensor.scatter")
def _scatter(b, op, gs):
    # Only src[:idx.shape] is scattered (as torch); the rest of src gets zeros.
    _, idx, src = op.operand_values
    g = gs[0]
    dsrc = b.op("tensor.gather", g, idx, axis=op.axis)
    for ax, n in enumerate(src.shape):
        if not dims_equal(n, idx.shape[ax]):
            dsrc = _pad_dense(b, dsrc, _resized(dsrc.type, ax, n), ax, 0)
    dx = g if op.reduce == "add" else b.op("tensor.scatter", g, idx, b.zeros(
        idx.type.with_dtype(g.dtype)), axis=op.axis, reduce="none")
    return [dx, None, dsrc]


@vjp("tensor.index_add")
def _index_add(b, op, gs):
    idx = op.operand_values[1]
    return [gs[0], None, b.op("tensor.take", gs[0], idx, axis=op.axis)]


# ---- nn ------------------------------------------------------------------------------------

@vjp("tensor.softmax")
def _softmax(b, op, gs):
    y, g = op.result, gs[0]
    return [b.mul(y, b.sub(g, b.sum(b.mul(g, y), [op.axis], keepdim=True)))]


@vjp("tensor.log_softmax")
def _log_softmax(b, op, gs):
    y, g = op.result, gs[0]
    return [b.sub(g, b.mul(b.op("tensor.exp", y), b.sum(g, [op.axis], keepdim=True)))]


def _norm_axes(op: Op) -> tuple[list[int], list[int]]:
    r = _x(op).type.rank
    return list(range(r - op.num_axes, r)), list(range(r - op.num_axes))


@vjp("tensor.layer_norm")
def _layer_norm(b, op, gs):
    x, w, bias = (list(op.operand_values) + [None, None])[:3]
    g = gs[0]
    axes, lead = _norm_axes(op)
    xc = b.sub(x, b.mean(x, axes, keepdim=True))
    rstd = b.op("tensor.rsqrt", b.add(b.mean(b.mul(xc, xc), axes, keepdim=True),
                                      b.scalar(op.eps, x)))
    xhat = b.mul(xc, rstd)
    gw = b.mul(g, w) if w is not None else g
    inner = b.sub(b.sub(gw, b.mean(gw, axes, keepdim=True)),
                  b.mul(xhat, b.mean(b.mul(gw, xhat), axes, keepdim=True)))
    out = [b.mul(rstd, inner)]
    if w is not None:
        out.append(b.sum(b.mul(g, xhat), lead))
    if bias is not None:
        out.append(b.sum(g, lead))
    return out


@vjp("tensor.rms_norm")
def _rms_norm(b, op, gs):
    x, w = (list(op.operand_values) + [None])[:2]
    g = gs[0]
    axes, lead = _norm_axes(op)
    r = b.op("tensor.rsqrt", b.add(b.mean(b.mul(x, x), axes, keepdim=True), b.scalar(op.eps, x)))
    gw = b.mul(g, w) if w is not None else g
    dx = b.sub(b.mul(r, gw), b.mul(b.mul(x, b.mul(r, b.mul(r, r))),
                                   b.mean(b.mul(gw, x), axes, keepdim=True)))
    return [dx] + ([b.sum(b.mul(g, b.mul(x, r)), lead)] if w is not None else [])


@vjp("tensor.attention")
def _attention(b, op, gs):
    """Recomputes the probabilities P (the forward kernel keeps none), then the textbook
    dV = Pᵀ·dO, dS = P ⊙ (dO·Vᵀ − rowsum(dO·Vᵀ ⊙ P)), dQ = dS·K·c, dK = dSᵀ·Q·c."""
    q, k, v = op.operand_values[:3]
    mask = op.operand_values[3] if len(op.operand_values) > 3 else None
    g = gs[0]
    hq, hk = q.shape[-3], k.shape[-3]
    group = 1 if dims_equal(hq, hk) else hq // hk
    kr, vr = (_repeat_heads(b, t, group) for t in (k, v))
    d = q.shape[-1]
    if op.scale is None and not isinstance(d, int):
        raise unsupported(op, "gradient with a symbolic head dim and no scale")
    c = op.scale if op.scale is not None else 1 / math.sqrt(d)
    s = b.scale(b.op("tensor.matmul", q, b.transpose(kr)), c)
    if op.causal:
        s = b.where(_causal_keep(b, op, q, k), s, b.scalar(-math.inf, s))
    if mask is not None:
        s = b.where(mask, s, b.scalar(-math.inf, s)) if mask.dtype is DType.bool else \
            b.add(s, mask)
    p = b.op("tensor.softmax", s, axis=-1)
    dv = b.op("tensor.matmul", b.transpose(p), g)
    dp = b.op("tensor.matmul", g, b.transpose(vr))
    ds = b.mul(p, b.sub(dp, b.sum(b.mul(dp, p), [-1], keepdim=True)))
    dq = b.scale(b.op("tensor.matmul", ds, kr), c)
    dk = b.scale(b.op("tensor.matmul", b.transpose(ds), q), c)
    out = [dq, _sum_heads(b, dk, k, group), _sum_heads(b, dv, v, group)]
    if mask is not None:
        out.append(b.sum_to(ds, mask.type) if mask.dtype.is_float else None)
    return out


def _repeat_heads(b: Builder, t: Value, group: int) -> Value:
    if group == 1:
        return t
    *lead, h, n, d = t.shape
    grouped = b.broadcast(b.reshape(t, (*lead, h, 1, n, d)), (*lead, h, group, n, d))
    return b.reshape(grouped, (*lead, h * group, n, d))


def _sum_heads(b: Builder, g: Value, t: Value, group: int) -> Value:
    if group == 1:
        return g
    *lead, h, n, d = t.shape
    return b.sum(b.reshape(g, (*lead, h, group, n, d)), [len(lead) + 1])


def _causal_keep(b: Builder, op: Op, q: Value, k: Value) -> Value:
    """keep[i, j] = j ≤ i + (Tk − Tq), as tensor.attention's causal flag means."""
    tq, tk = q.shape[-2], k.shape[-2]
    if dims_equal(tq, tk):
        offset = 0
    elif isinstance(tq, int) and isinstance(tk, int):
        offset = tk - tq
    else:
        raise unsupported(op, "causal gradient with symbolic Tq ≠ Tk")
    i = b.op("tensor.iota", type=TensorType((tq,), DType.i64), start=offset)
    j = b.op("tensor.iota", type=TensorType((tk,), DType.i64))
    return b.op("tensor.le", b.reshape(j, (1, tk)), b.reshape(i, (tq, 1)))


@vjp("tensor.cross_entropy")
def _cross_entropy(b, op, gs):
    """d/dlogits = (softmax − (1−ε)·onehot − ε/C) · valid, scaled as the reduction was."""
    logits, target = op.operand_values
    g = gs[0]
    c = logits.shape[1]
    rank = logits.type.rank
    valid = b.op("tensor.ne", target, b.rw.constant(op.ignore_index, TensorType((), target.dtype),
                                                     loc=b.loc))
    safe = b.where(valid, target, b.rw.constant(0, TensorType((), target.dtype), loc=b.loc))
    cls = b.reshape(b.op("tensor.iota", type=TensorType((c,), target.dtype)),
                    (1, c) + (1,) * (rank - 2))
    onehot = b.cast(b.op("tensor.eq", cls, _unsqueeze1(b, safe)), logits.dtype)
    eps = op.label_smoothing
    d = b.sub(b.op("tensor.softmax", logits, axis=1), b.scale(onehot, 1 - eps))
    if eps:
        d = b.sub(d, b.scalar(eps / c, d))
    weight = b.cast(valid, logits.dtype)
    if op.reduction == "mean":
        g = b.div(g, b.sum(weight, range(target.type.rank)))
    weight = b.mul(weight, g)
    return [b.mul(d, _unsqueeze1(b, weight)), None]


def _unsqueeze1(b: Builder, v: Value) -> Value:
    return b.reshape(v, v.shape[:1] + (1,) + v.shape[1:])


# ---- moe -----------------------------------------------------------------------------------

@vjp("moe.gather")
def _moe_gather(b, op, gs):
    x, perm = op.operand_values
    rows = b.op("tensor.floordiv", perm, b.rw.constant(op.k, TensorType((), perm.dtype),
                                                       loc=b.loc))
    return [b.op("tensor.index_add", b.zeros(x.type), rows, gs[0], axis=0), None]


@vjp("moe.grouped_matmul")
def _grouped_matmul(b, op, gs):
    x, w, offsets = op.operand_values
    g = gs[0]
    dx = b.op("moe.grouped_matmul", g, b.permute(w, [0, 2, 1]), offsets)
    return [dx, b.op("moe.grouped_weight_grad", x, g, offsets), None]


@vjp("moe.grouped_weight_grad")
def _grouped_weight_grad(b, op, gs):
    x, g, offsets = op.operand_values
    dout = gs[0]
    return [b.op("moe.grouped_matmul", g, b.permute(dout, [0, 2, 1]), offsets),
            b.op("moe.grouped_matmul", x, dout, offsets), None]


@vjp("moe.combine")
def _combine(b, op, gs):
    """out[perm[m] // k] += w.flat[perm[m]] · y[m]: y's gradient gathers dOut rows and scales
    them; the routing weights' gradient is the per-slot dot product, put back in slot order."""
    y, perm, weights = op.operand_values
    n, k = weights.shape
    m = perm.shape[0]
    rows = b.op("moe.gather", gs[0], perm, k=k)
    wflat = b.op("tensor.take", b.reshape(weights, (m,)), perm, axis=0)
    dy = b.mul(rows, b.reshape(wflat, (m, 1)))
    dots = b.sum(b.mul(rows, y), [1])
    dw = b.op("tensor.index_add", b.zeros(TensorType((m,), weights.dtype)), perm, dots, axis=0)
    return [dy, None, b.reshape(dw, (n, k))]


def operand_grads(b: Builder, op: Op, grads: Sequence[Value | None]) -> list:
    """The gradients of `op`'s operands given those of its results (the table's entry)."""
    rule = VJP.get(op.name)
    if rule is None:
        raise unsupported(op, "no gradient rule")
    b.loc = op.loc
    out = list(rule(b, op, grads))
    return out + [None] * (len(op.operand_values) - len(out))
