"""The reference interpreter: runs any lmc module with numpy. It is the oracle of every test.

`IMPL` maps op name → fn(op, env, *operand arrays) returning an array (or a tuple for
multi-result ops). `env` binds symbolic dims to their run-time sizes (from the input shapes,
and from data-dependent ops as they run).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from lmc.errors import InputError, LmcError
from lmc.ir.core import Func, Module, Op
from lmc.ir.types import TensorType, dim_expr, eval_shape

IMPL: dict[str, Callable] = {}


def impl(*names: str):
    def deco(fn):
        for n in names:
            IMPL[n] = fn
        return fn
    return deco


def _out_dtype(op: Op, i: int = 0) -> np.dtype:
    return op.result_values[i].dtype.to_numpy()


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf  # exact where scipy is present
        return erf(x)
    except ImportError:
        return np.vectorize(math.erf, otypes=[x.dtype])(x) if x.size else x.copy()


def _gelu(x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi).astype(x.dtype) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / np.sqrt(2).astype(x.dtype)))


def _sigmoid(x):
    # Split by sign so that neither branch overflows exp.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


_UNARY = {
    "tensor.neg": np.negative, "tensor.abs": np.abs, "tensor.exp": np.exp, "tensor.log": np.log,
    "tensor.sqrt": np.sqrt, "tensor.rsqrt": lambda x: 1 / np.sqrt(x),
    "tensor.reciprocal": lambda x: 1 / x, "tensor.tanh": np.tanh, "tensor.erf": _erf,
    "tensor.sigmoid": _sigmoid, "tensor.relu": lambda x: np.maximum(x, 0).astype(x.dtype),
    "tensor.silu": lambda x: x * _sigmoid(x), "tensor.sin": np.sin, "tensor.cos": np.cos,
    "tensor.not": np.logical_not, "tensor.barrier": lambda x: x,
}
_BINARY = {
    "tensor.add": np.add, "tensor.sub": np.subtract, "tensor.mul": np.multiply,
    "tensor.div": lambda a, b: np.floor_divide(a, b) if a.dtype.kind in "iu" else a / b,
    "tensor.pow": np.power, "tensor.maximum": np.maximum, "tensor.minimum": np.minimum,
    "tensor.floordiv": np.floor_divide, "tensor.mod": np.mod,
    "tensor.eq": np.equal, "tensor.ne": np.not_equal, "tensor.lt": np.less,
    "tensor.le": np.less_equal, "tensor.gt": np.greater, "tensor.ge": np.greater_equal,
    "tensor.and": np.logical_and, "tensor.or": np.logical_or,
}


def _unary(fn):
    return lambda op, env, x: np.asarray(fn(x)).astype(_out_dtype(op), copy=False)


def _binary(fn):
    return lambda op, env, a, b: np.asarray(fn(a, b)).astype(_out_dtype(op), copy=False)


for _n, _f in _UNARY.items():
    IMPL[_n] = _unary(_f)
for _n, _f in _BINARY.items():
    IMPL[_n] = _binary(_f)


@impl("tensor.gelu")
def _gelu_op(op, env, x):
    return _gelu(x, op.approximate).astype(x.dtype)


@impl("tensor.where")
def _where(op, env, c, a, b):
    return np.where(c, a, b).astype(_out_dtype(op))


@impl("tensor.cast")
def _cast(op, env, x):
    if op.dtype.is_int and x.dtype.kind == "f":
        x = np.trunc(x)  # torch truncates toward zero; numpy's astype does too, but explicitly
    return x.astype(op.dtype.to_numpy())


def _axes(op, x):
    return tuple(op.axes) if op.axes else tuple(range(x.ndim))


@impl("tensor.sum")
def _sum(op, env, x):
    return np.sum(x, axis=_axes(op, x), keepdims=op.keepdim).astype(_out_dtype(op))


@impl("tensor.mean")
def _mean(op, env, x):
    return np.mean(x, axis=_axes(op, x), keepdims=op.keepdim).astype(_out_dtype(op))


@impl("tensor.max")
def _max(op, env, x):
    return np.max(x, axis=_axes(op, x), keepdims=op.keepdim)


@impl("tensor.min")
def _min(op, env, x):
    return np.min(x, axis=_axes(op, x), keepdims=op.keepdim)


@impl("tensor.argmax")
def _argmax(op, env, x):
    return np.argmax(x, axis=op.axis, keepdims=op.keepdim).astype(np.int64)


@impl("tensor.cumsum")
def _cumsum(op, env, x):
    return np.cumsum(x, axis=op.axis).astype(x.dtype)


@impl("tensor.topk")
def _topk(op, env, x):
    key = -x if op.largest else x
    # Stable sort so that ties keep the lower index first, as torch does on CPU.
    idx = np.argsort(key, axis=op.axis, kind="stable")
    idx = np.take(idx, np.arange(op.k), axis=op.axis)
    return np.take_along_axis(x, idx, axis=op.axis), idx.astype(np.int64)


@impl("tensor.matmul")
def _matmul(op, env, a, b):
    return np.matmul(a, b).astype(_out_dtype(op))


@impl("tensor.reshape")
def _reshape(op, env, x):
    return x.reshape(eval_shape(op.result.type.shape, env))


@impl("tensor.broadcast")
def _broadcast(op, env, x):
    return np.broadcast_to(x, eval_shape(op.result.type.shape, env))


@impl("tensor.permute")
def _permute(op, env, x):
    return np.transpose(x, op.perm)


@impl("tensor.slice")
def _slice(op, env, x):
    end = op.end
    if isinstance(end, str):
        end = eval_shape((end,), env)[0]
    index = [slice(None)] * x.ndim
    index[op.axis] = slice(op.start, end, op.step)
    return x[tuple(index)]


@impl("tensor.concat")
def _concat(op, env, *xs):
    return np.concatenate(xs, axis=op.axis)


@impl("tensor.take")
def _take(op, env, x, idx):
    n = x.shape[op.axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise LmcError(f"{op.name} at {op.loc}: index out of range for size {n}")
    return np.take(x, idx, axis=op.axis)


@impl("tensor.gather")
def _gather(op, env, x, idx):
    return np.take_along_axis(x, idx, axis=op.axis)


@impl("tensor.scatter")
def _scatter(op, env, x, idx, src):
    out = x.copy()
    ax = op.axis % x.ndim
    grid = list(np.indices(idx.shape, sparse=True))
    grid[ax] = idx
    src = src[tuple(slice(0, s) for s in idx.shape)]
    if op.reduce == "add":
        np.add.at(out, tuple(grid), src)
    else:
        out[tuple(grid)] = src
    return out


@impl("tensor.index_add")
def _index_add(op, env, x, idx, src):
    out = x.copy()
    index = [slice(None)] * x.ndim
    index[op.axis] = idx
    np.add.at(out, tuple(index), src)
    return out


@impl("tensor.nonzero")
def _nonzero(op, env, x):
    coords = np.stack(np.nonzero(x), axis=1).astype(np.int64) if x.ndim else \
        np.zeros((int(bool(x)), 0), np.int64)
    sym = op.result.type.shape[0]
    if isinstance(sym, str) and dim_expr(sym).is_Symbol:
        env[sym] = coords.shape[0]  # bind the data-dependent size for later ops
    return coords


@impl("tensor.constant")
def _constant(op, env, *_):
    t = op.result.type
    return np.broadcast_to(np.asarray(op.value, t.dtype.to_numpy()),
                           eval_shape(t.shape, env)).copy()


@impl("tensor.iota")
def _iota(op, env, *_):
    t = op.result.type
    n = eval_shape(t.shape, env)[0]
    return (op.start + op.step * np.arange(n)).astype(t.dtype.to_numpy())


# ---- nn ----------------------------------------------------------------------------------------

def _f32(x: np.ndarray) -> np.ndarray:
    """bf16/f16 as f32 (other dtypes as they are): what low-precision sums accumulate in."""
    return x.astype(np.float32) if x.dtype.name in ("float16", "bfloat16") else x


def _softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


# Row ops on bf16/f16 compute in f32 and round once (`_f32`), as torch's CPU kernels do:
# numpy would round every intermediate (a bf16 mean of squares is off by ~1 %).

@impl("tensor.softmax")
def _softmax_op(op, env, x):
    return _softmax(_f32(x), op.axis).astype(x.dtype)


@impl("tensor.log_softmax")
def _log_softmax_op(op, env, x):
    return _log_softmax(_f32(x), op.axis).astype(x.dtype)


@impl("tensor.layer_norm")
def _layer_norm(op, env, x, w=None, b=None):
    dtype, x = x.dtype, _f32(x)
    axes = tuple(range(x.ndim - op.num_axes, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.asarray(op.eps, x.dtype))
    y = y * _f32(w) if w is not None else y
    return (y + _f32(b) if b is not None else y).astype(dtype)


@impl("tensor.rms_norm")
def _rms_norm(op, env, x, w=None):
    dtype, x = x.dtype, _f32(x)
    axes = tuple(range(x.ndim - op.num_axes, x.ndim))
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + np.asarray(op.eps, x.dtype))
    return (y * _f32(w) if w is not None else y).astype(dtype)


@impl("tensor.attention")
def _attention(op, env, q, k, v, mask=None):
    # bf16/f16 attention computes in f32 and rounds once, as torch's CPU kernels do (numpy's
    # f16 matmul rounds the scores, the softmax would run in f16 and p·v round again)
    dtype = q.dtype
    q, k, v = _f32(q), _f32(k), _f32(v)
    mask = _f32(mask) if mask is not None else None
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk:  # grouped-query attention: each kv head serves hq/hk query heads
        k = np.repeat(k, hq // hk, axis=-3)
        v = np.repeat(v, hq // hk, axis=-3)
    scale = op.scale if op.scale is not None else 1 / math.sqrt(q.shape[-1])
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * np.asarray(scale, q.dtype)
    tq, tk = q.shape[-2], k.shape[-2]
    if op.causal:
        keep = np.tril(np.ones((tq, tk), bool), k=tk - tq)
        s = np.where(keep, s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == np.bool_ else s + mask
    p = _softmax(s, -1)
    # Fully masked rows give zeros (torch gives NaN); a NaN in the inputs still propagates.
    p = np.where(np.all(s == -np.inf, axis=-1, keepdims=True), 0, p)
    return np.matmul(p, v).astype(dtype)


@impl("tensor.cross_entropy")
def _cross_entropy(op, env, logits, target):
    lsm = _log_softmax(logits, 1)
    c = logits.shape[1]
    valid = target != op.ignore_index
    safe = np.where(valid, target, 0)
    nll = -np.take_along_axis(lsm, np.expand_dims(safe, 1), axis=1).squeeze(1)
    eps = op.label_smoothing
    if eps:
        nll = (1 - eps) * nll - eps / c * lsm.sum(axis=1)
    nll = np.where(valid, nll, 0)
    if op.reduction == "none":
        return nll.astype(logits.dtype)
    if op.reduction == "sum":
        return np.asarray(nll.sum(), logits.dtype)
    return np.asarray(nll.sum() / max(valid.sum(), 1), logits.dtype) if valid.any() else \
        np.asarray(np.nan, logits.dtype)


# ---- moe -----------------------------------------------------------------------------------------

@impl("moe.route")
def _route(op, env, idx):
    flat = idx.reshape(-1)
    perm = np.argsort(flat, kind="stable").astype(np.int64)
    counts = np.bincount(flat, minlength=op.num_experts)[:op.num_experts]
    return perm, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


@impl("moe.gather")
def _moe_gather(op, env, x, perm):
    return x[perm // op.k]


@impl("moe.grouped_matmul")
def _grouped_matmul(op, env, x, w, offsets):
    out = np.zeros((x.shape[0], w.shape[2]), x.dtype)
    for e in range(w.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:  # only the rows routed to expert e are computed
            out[lo:hi] = x[lo:hi] @ w[e]
    return out


@impl("moe.grouped_weight_grad")
def _grouped_weight_grad(op, env, x, g, offsets):
    out = np.zeros((offsets.shape[0] - 1, x.shape[1], g.shape[1]), x.dtype)
    for e in range(out.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            out[e] = x[lo:hi].T @ g[lo:hi]
    return out


@impl("moe.combine")
def _combine(op, env, y, perm, weights):
    n, k = weights.shape
    out = np.zeros((n, y.shape[1]), y.dtype)
    np.add.at(out, perm // k, y * weights.reshape(-1)[perm][:, None])
    return out


# ---- kernel --------------------------------------------------------------------------------------

@impl("kernel.fused")
def _fused(op, env, *args):
    results = run_block(op.body, list(args), env)
    return tuple(results) if len(results) > 1 else results[0]


# ---- driver --------------------------------------------------------------------------------------

def bind_symbols(types: list[TensorType], arrays: list[np.ndarray]) -> dict[str, int]:
    """Bind each plain-symbol dim of the input types to the size of the given arrays."""
    env: dict[str, int] = {}
    for t, a in zip(types, arrays):
        for d, n in zip(t.shape, a.shape):
            if isinstance(d, str) and d.isidentifier():
                env.setdefault(d, int(n))
    return env


def run_block(block, args: list[np.ndarray], env: dict[str, int]) -> list[np.ndarray]:
    vals = {id(a): x for a, x in zip(block.args, args)}
    for op in block.ops:
        if op.name in ("func.return", "kernel.yield"):
            return [vals[id(v)] for v in op.operand_values]
        fn = IMPL.get(op.name)
        if fn is None:
            raise LmcError(f"the reference interpreter has no implementation of '{op.name}' "
                           f"(at {op.loc})")
        try:
            out = fn(op, env, *[vals[id(v)] for v in op.operand_values])
        except LmcError:
            raise
        except Exception as exc:  # numpy's message, but named by op and source location
            raise LmcError(f"{op.name} at {op.loc} failed in the reference interpreter: "
                           f"{type(exc).__name__}: {exc}") from exc
        outs = out if isinstance(out, tuple) else (out,)
        for v, x in zip(op.result_values, outs):
            vals[id(v)] = np.asarray(x)
    raise LmcError("block has no terminator")


def run_func(module: Module, inputs: list[np.ndarray], func: Func | None = None,
             params: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run `func` (default: the main function) on the given input arrays."""
    f = func or module.main
    params = module.params if params is None else params
    formal = f.inputs
    if len(inputs) != len(formal):
        raise InputError(f"@{f.name} takes {len(formal)} input(s), got {len(inputs)}")
    env = bind_symbols([a.type for a in formal], inputs)
    it = iter(inputs)
    args = [next(it) if kind == "input" else params[a.name]
            for a, kind in zip(f.body.args, f.arg_kinds)]
    return run_block(f.body, args, env)

