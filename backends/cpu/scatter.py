"""Native kernels for the indexing ops of backward graphs: `tensor.index_add` on axis 0 (the
embedding gradient), `tensor.scatter` and `tensor.gather` on the last axis (top-k and
cross-entropy gradients). LLVM IR text via FunctionWriter, the range ABI of datamove.py.

Results equal the reference interpreter's bit for bit: a duplicate index accumulates in index
order, as np.add.at does, because every thread runs all the indices for its own slice of the
data (columns for index_add, rows for scatter), so no two threads touch one element. Negative
indices count from the end, as numpy's; others out of range raise `IndexRangeError` naming the
position.
"""
from __future__ import annotations

import math

import numpy as np

from lmc.errors import ShapeError

from .datamove import (
    _FLOATS,
    MIN_BYTES_PER_THREAD,
    IndexRangeError,
    _fail,
    _indices,
    _kernel,
    _matrix,
    _position,
    _range_writer,
    _ranges,
    _run_ranges,
    _strides,
)
from .irtext import FunctionWriter
from .jit import HostTarget
from .pool import cpu_threads

# Columns of an index_add slice per thread are whole cache lines (64 bytes of f32), so two
# threads never write one line.
LINE = 16


def _wrapped_index(w: FunctionWriter, ptr: str, size: str, position: str) -> str:
    """idx at ptr, plus `size` if negative; fails the kernel at `position` if outside."""
    raw = w.load("i64", ptr, 8)
    v = w.value(f"select i1 {w.value(f'icmp slt i64 {raw}, 0')}, i64 "
                f"{w.op('add', raw, size)}, i64 {raw}")
    bad = w.op("or", w.value(f"icmp slt i64 {v}, 0"), w.value(f"icmp sge i64 {v}, {size}"), "i1")
    with w.if_(bad, "bad"):
        _fail(w, position)
    return v


def _copy_span(w: FunctionWriter, ty: str, src: str, stride: str, dst: str, start: str,
               end: str) -> None:
    """dst[c] = src[c * stride] for c in [start, end) (dst contiguous): vectorizable copies
    when the source is contiguous, and fills when it is a broadcast (a zeros constant)."""
    with w.if_else(w.value(f"icmp eq i64 {stride}, 1"), "unit") as otherwise:
        with w.loop(start, end, 1, "cu") as c:
            w.store(ty, w.load(ty, w.gep(src, c, ty)), w.gep(dst, c, ty))
        otherwise()
        with w.if_else(w.value(f"icmp eq i64 {stride}, 0"), "splat") as strided:
            value = w.load(ty, src)
            with w.loop(start, end, 1, "cz") as c:
                w.store(ty, value, w.gep(dst, c, ty))
            strided()
            with w.loop(start, end, 1, "cs") as c:
                w.store(ty, w.load(ty, w.gep(src, w.op("mul", c, stride), ty)),
                        w.gep(dst, c, ty))


# -- tensor.index_add on axis 0 --


def _render_index_add(name: str, ty: str) -> str:
    """Columns [start, end) of out [V, d] (contiguous) = x, then out[idx[i]] += src[i] for
    every i in order."""
    w = _range_writer(name, ("*x", "rsx", "csx", "v", "*idx", "n", "*src", "rss", "css", "*out",
                             "d", "*status"))
    with w.loop("0", "%v", 1, "row") as r:
        _copy_span(w, ty, w.gep("%x", w.op("mul", r, "%rsx"), ty), "%csx",
                   w.gep("%out", w.op("mul", r, "%d"), ty), "%start", "%end")
    with w.loop("0", "%n", 1, "i") as i:
        v = _wrapped_index(w, w.gep("%idx", i, "i64"), "%v", i)
        dst = w.gep("%out", w.op("mul", v, "%d"), ty)
        src = w.gep("%src", w.op("mul", i, "%rss"), ty)
        with w.if_else(w.value("icmp eq i64 %css, 1"), "unit") as otherwise:
            _add_span(w, ty, src, "1", dst)
            otherwise()
            _add_span(w, ty, src, "%css", dst)
    return w.text()


def _add_span(w: FunctionWriter, ty: str, src: str, stride: str, dst: str) -> None:
    with w.loop("%start", "%end", 1, "c") as c:
        at = w.gep(dst, c, ty)
        val = w.load(ty, w.gep(src, w.op("mul", c, stride), ty))
        w.store(ty, w.value(f"fadd {ty} {w.load(ty, at)}, {val}"), at)


def _column_ranges(d: int, nbytes: int, threads: int | None) -> list[tuple[int, int]]:
    """[0, d) in whole cache lines, one range per thread that the bytes moved pay for."""
    lines = -(-d // LINE)
    parts = max(1, min(threads or cpu_threads(), nbytes // MIN_BYTES_PER_THREAD, lines))
    return [(min(d, LINE * (lines * t // parts)), min(d, LINE * (lines * (t + 1) // parts)))
            for t in range(parts)]


def index_add(x: np.ndarray, idx: np.ndarray, src: np.ndarray, *, threads: int | None = None,
              target: HostTarget | None = None) -> np.ndarray:
    """tensor.index_add on axis 0: out = x.copy(); out[idx[i]] += src[i] in order (x [V, ...]
    of f32/f64, idx 1-D [N], src broadcast to [N, ...]): bit-identical to np.add.at."""
    x, idx, src = np.asarray(x), _indices(idx, "tensor.index_add"), np.asarray(src)
    if x.ndim == 0 or idx.ndim != 1 or x.dtype not in _FLOATS or src.dtype != x.dtype:
        raise ShapeError(f"tensor.index_add: needs float x [V, ...], indices [N] and src of x's "
                         f"dtype; got {x.dtype}{list(x.shape)}, {list(idx.shape)}, {src.dtype}")
    n, rest = idx.shape[0], x.shape[1:]
    try:
        src = np.broadcast_to(src, (n, *rest))
    except ValueError:
        raise ShapeError(f"tensor.index_add: src {list(src.shape)} does not fit [{n}, "
                         f"{', '.join(map(str, rest))}]") from None
    v, d = x.shape[0], math.prod(rest)
    out = np.empty(x.shape, x.dtype)
    if out.size == 0:
        return out
    x2, src2 = _matrix(x, v, d), _matrix(src, n, d)
    flat = np.ascontiguousarray(idx, dtype=np.int64)
    ty = _FLOATS[x.dtype]
    name = f"lmc_sc_index_add_{ty}"
    kernel = _kernel(name, lambda: _render_index_add(name, ty), target)
    # The adds are the part worth splitting: a second thread pays only for large ones (a
    # 1024 x 256 gradient into a 4096-row table runs 0.24 ms on one core, 0.4-1.5 ms on two).
    parts = _column_ranges(d, src.nbytes // 4, threads)
    bad = _run_ranges(kernel, parts, [x2.ctypes.data, *_strides(x2), v, flat.ctypes.data, n,
                                      src2.ctypes.data, *_strides(src2), out.ctypes.data, d])
    if bad is not None:
        raise IndexRangeError(f"tensor.index_add: index {flat[bad]} at position {bad} is out "
                              f"of range for axis 0 of size {v}")
    return out


# -- tensor.scatter / tensor.gather on the last axis --


def _render_scatter(name: str, ty: str, add: bool) -> str:
    """Rows [start, end): out[r] = x[r], then out[r, idx[r, j]] (+)= src[r, j] in j order."""
    w = _range_writer(name, ("*x", "rsx", "csx", "c", "*idx", "rsi", "csi", "k", "*src", "rss",
                             "css", "*out", "*status"))
    with w.loop("%start", "%end", 1, "r") as r:
        dst = w.gep("%out", w.op("mul", r, "%c"), ty)
        _copy_span(w, ty, w.gep("%x", w.op("mul", r, "%rsx"), ty), "%csx", dst, "0", "%c")
        with w.loop("0", "%k", 1, "j") as j:
            at = w.op("add", w.op("mul", r, "%rsi"), w.op("mul", j, "%csi"))
            v = _wrapped_index(w, w.gep("%idx", at, "i64"), "%c", w.op("add", w.op(
                "mul", r, "%k"), j))
            val = w.load(ty, w.gep("%src", w.op("add", w.op("mul", r, "%rss"),
                                                w.op("mul", j, "%css")), ty))
            ptr = w.gep(dst, v, ty)
            if add:
                val = w.value(f"fadd {ty} {w.load(ty, ptr)}, {val}")
            w.store(ty, val, ptr)
    return w.text()


def _render_gather(name: str, ty: str) -> str:
    """Rows [start, end): out[r, j] = x[r, idx[r, j]] (out [R, k] contiguous)."""
    w = _range_writer(name, ("*x", "rsx", "csx", "c", "*idx", "rsi", "csi", "k", "*out",
                             "*status"))
    with w.loop("%start", "%end", 1, "r") as r, w.loop("0", "%k", 1, "j") as j:
        at = w.op("add", w.op("mul", r, "%rsi"), w.op("mul", j, "%csi"))
        pos = w.op("add", w.op("mul", r, "%k"), j)
        v = _wrapped_index(w, w.gep("%idx", at, "i64"), "%c", pos)
        src = w.op("add", w.op("mul", r, "%rsx"), w.op("mul", v, "%csx"))
        w.store(ty, w.load(ty, w.gep("%x", src, ty)), w.gep("%out", pos, ty))
    return w.text()


def _last_axis(x: np.ndarray, idx: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """x and idx as 2-D [rows, last] views (idx as int64); their leading shapes must agree."""
    if x.ndim == 0 or idx.ndim != x.ndim or idx.shape[:-1] != x.shape[:-1]:
        raise ShapeError(f"{what}: the native kernel needs indices with x's leading shape, got "
                         f"{list(idx.shape)} for {list(x.shape)}")
    rows = math.prod(x.shape[:-1])
    return _matrix(x, rows, x.shape[-1]), _matrix(idx.astype(np.int64, copy=False), rows,
                                                  idx.shape[-1])


def scatter_last(x: np.ndarray, idx: np.ndarray, src: np.ndarray, reduce: str = "none", *,
                 threads: int | None = None, target: HostTarget | None = None) -> np.ndarray:
    """tensor.scatter on the last axis (idx with x's leading shape, src at least idx's size
    along every axis): out = x.copy(); out[..., idx[..., j]] (+)= src[..., j] in order."""
    x, idx, src = np.asarray(x), _indices(idx, "tensor.scatter"), np.asarray(src)
    if x.dtype not in _FLOATS or src.dtype != x.dtype or src.ndim != x.ndim or \
            any(s < i for s, i in zip(src.shape, idx.shape)):
        raise ShapeError(f"tensor.scatter: needs float x and src of x's dtype covering the "
                         f"indices; got {x.dtype}, {src.dtype}{list(src.shape)}, "
                         f"{list(idx.shape)}")
    x2, idx2 = _last_axis(x, idx, "tensor.scatter")
    src2 = _matrix(src[tuple(slice(0, s) for s in idx.shape)], *idx2.shape)
    out = np.empty(x.shape, x.dtype)
    if out.size == 0:
        return out
    ty = _FLOATS[x.dtype]
    name = f"lmc_sc_scatter_{'add' if reduce == 'add' else 'set'}_{ty}"
    kernel = _kernel(name, lambda: _render_scatter(name, ty, reduce == "add"), target)
    rows, c = x2.shape
    bad = _run_ranges(kernel, _ranges(rows, 2 * x.nbytes, threads),
                      [x2.ctypes.data, *_strides(x2), c, idx2.ctypes.data, *_strides(idx2),
                       idx2.shape[1], src2.ctypes.data, *_strides(src2), out.ctypes.data])
    if bad is not None:
        raise IndexRangeError(f"tensor.scatter: index {idx2.reshape(-1)[bad]} at position "
                              f"{_position(bad, idx.shape)} is out of range for the last axis "
                              f"of size {c}")
    return out


def gather_last(x: np.ndarray, idx: np.ndarray, *, threads: int | None = None,
                target: HostTarget | None = None) -> np.ndarray:
    """tensor.gather on the last axis (idx with x's leading shape): take_along_axis."""
    x, idx = np.asarray(x), _indices(idx, "tensor.gather")
    if x.itemsize not in (1, 2, 4, 8):
        raise ShapeError(f"tensor.gather: no native kernel for {x.dtype}")
    x2, idx2 = _last_axis(x, idx, "tensor.gather")
    out = np.empty(idx.shape, x.dtype)
    if out.size == 0:
        return out
    if x2.shape[1] == 0:
        raise IndexRangeError("tensor.gather: indices into an empty last axis")
    ty = f"i{8 * x.itemsize}"
    name = f"lmc_sc_gather_{ty}"
    kernel = _kernel(name, lambda: _render_gather(name, ty), target)
    rows, c = x2.shape
    bad = _run_ranges(kernel, _ranges(rows, 2 * out.nbytes, threads),
                      [x2.ctypes.data, *_strides(x2), c, idx2.ctypes.data, *_strides(idx2),
                       idx2.shape[1], out.ctypes.data])
    if bad is not None:
        raise IndexRangeError(f"tensor.gather: index {idx2.reshape(-1)[bad]} at position "
                              f"{_position(bad, idx.shape)} is out of range for the last axis "
                              f"of size {c}")
    return out

