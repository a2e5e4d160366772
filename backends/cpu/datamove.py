"""Small data-movement kernels of the CPU backend, native code (LLVM IR text via FunctionWriter):
embedding lookup (`tensor.take` on axis 0), MoE routing (a counting sort), gather and combine of
routed rows, and top-k along the last axis.

Each launcher takes numpy arrays with any strides and gives exactly the reference interpreter's
result: the same tie rule as its stable argsort, the same fp32 summation order as its np.add.at.
Bad indices are found in the kernel, which stores the first failing position in a status word
and returns; the launcher raises `IndexRangeError` naming the index.
"""
from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable
from itertools import pairwise

import numpy as np

from lmc.errors import LmcError, ShapeError

from .irtext import FunctionWriter
from .jit import HostTarget, default_engine
from .pool import _thread_scratch, cpu_threads, pool, range_task


class IndexRangeError(LmcError):
    """An index tensor holds a value outside the axis it indexes."""


# A copy is split over the cores only when each thread moves at least this many bytes: the
# hand-off is ~10 us, and the other core reads from a cold cache.
MIN_BYTES_PER_THREAD = 1 << 19
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# The range ABI (as loops.py kernels, threads.range_task): fn(start, end, args, scratch), the
# other parameters i64 words of args.
_RANGE = ctypes.CFUNCTYPE(None, _I64, _I64, _PTR, _PTR)
# Top-k kernels: numpy dtype -> (LLVM type, is float). Unsigned types are left out: the
# interpreter ranks them by -x, which wraps around.
_RANKED = {np.dtype(np.float32): ("float", True), np.dtype(np.float64): ("double", True),
           np.dtype(np.int32): ("i32", False), np.dtype(np.int64): ("i64", False)}
_FLOATS = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_compiled: dict[tuple, tuple[Callable, int]] = {}
_compiled_lock = threading.Lock()


def _kernel(name: str, text: Callable[[], str], target: HostTarget | None,
            argtypes: list | None = None) -> tuple[Callable, int]:
    """(ctypes function, address) of `name` in the module text() renders, compiled once per
    target; a range-ABI kernel unless `argtypes` are given."""
    key = (name, target)
    found = _compiled.get(key)
    if found is not None:
        return found
    with _compiled_lock:
        if key not in _compiled:
            module = default_engine(target).add_ir(name, text())
            address = module.engine.function_address(name)
            fn = module.function(name, None, *argtypes) if argtypes else _RANGE(address)
            _compiled[key] = fn, address
        return _compiled[key]


def _range_writer(name: str, params: tuple[str, ...]) -> FunctionWriter:
    """`void @name(i64 %start, i64 %end, ptr %args, ptr %scratch)` with its parameters loaded
    from the i64 words of args as %name ('*name': a pointer); the last one is '*status'."""
    w = FunctionWriter(f"void @{name}(i64 %start, i64 %end, ptr %args, ptr %scratch)")
    for i, param in enumerate(params):
        bare = param.lstrip("*")
        w.emit(f"%{bare}.a = getelementptr i64, ptr %args, i64 {i}")
        if param.startswith("*"):
            w.emit(f"%{bare}.w = load i64, ptr %{bare}.a, align 8")
            w.emit(f"%{bare} = inttoptr i64 %{bare}.w to ptr")
        else:
            w.emit(f"%{bare} = load i64, ptr %{bare}.a, align 8")
    return w


def _run_ranges(kernel: tuple[Callable, int], parts: list[tuple[int, int]], words: list[int],
                scratch_bytes: int = 0) -> int | None:
    """The kernel on each range, the first here and the others natively on pool workers, with
    args = words + a status word per range; the first bad position any range reports."""
    fn, address = kernel
    status = np.full(len(parts), -1, np.int64)
    args = np.array([[*words, status.ctypes.data + 8 * t] for t in range(len(parts))],
                    np.int64)
    base, row = args.ctypes.data, args.strides[0]
    first = parts[0]

    def here() -> None:
        fn(first[0], first[1], base, _thread_scratch(scratch_bytes) if scratch_bytes else None)

    if len(parts) == 1:
        here()
    else:
        pool().run([here] + [range_task(address, start, end, base + row * t, scratch_bytes)
                             for t, (start, end) in enumerate(parts) if t])
    return _first_bad(status)


def _fail(w: FunctionWriter, position: str) -> None:
    """Store `position` in *%status and return (the rest of the block is unreachable)."""
    w.store("i64", position, "%status", 8)
    _return(w)


def _return(w: FunctionWriter) -> None:
    w.emit("ret void")
    w.block(w.label("dead"))


def _ranges(n: int, nbytes: int, threads: int | None) -> list[tuple[int, int]]:
    """[0, n) in one contiguous range per thread that the bytes moved pay for."""
    parts = max(1, min(threads or cpu_threads(), nbytes // MIN_BYTES_PER_THREAD, n))
    return list(pairwise(n * t // parts for t in range(parts + 1)))


def _position(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _first_bad(status: np.ndarray) -> int | None:
    bad = [v for v in status.tolist() if v >= 0]  # one word per thread: cheaper than numpy
    return min(bad) if bad else None


def _strides(x: np.ndarray) -> tuple[int, ...] | None:
    """Strides in elements, or None when some stride is not a whole number of elements."""
    if any(s % x.itemsize for s in x.strides):
        return None
    return tuple(s // x.itemsize for s in x.strides)


def _matrix(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """x as a 2-D [rows, cols] view with element strides (a copy only when none exists)."""
    if x.flags.c_contiguous:
        return x.reshape(rows, cols)
    try:
        view = np.reshape(x, (rows, cols), copy=False)
    except ValueError:
        view = np.ascontiguousarray(x).reshape(rows, cols)
    return view if _strides(view) is not None else np.ascontiguousarray(view)


def _indices(idx, what: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise ShapeError(f"{what}: indices must be integers, got {idx.dtype}")
    return idx


def _result(out: np.ndarray | None, shape: tuple[int, ...], dtype, what: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != shape or out.dtype != dtype:
        raise ShapeError(f"{what}: out must be {np.dtype(dtype)} {shape}, got {out.dtype} "
                         f"{out.shape}")
    return out


# -- row copies: tensor.take (axis 0) and moe.gather --


ROWS_PARAMS = ("*idx", "istride", "div", "wrap", "*x", "rows", "rsx", "csx", "*out", "rso",
               "cso", "d", "size", "*status")


def _render_rows(name: str, ty: str) -> str:
    """out[i] = x[v / div] for i in [start, end), v = idx[i] (+ rows*div if negative and
    `wrap`); v outside [0, rows*div) fails. Unit-stride rows are one memcpy each."""
    w = _range_writer(name, ROWS_PARAMS)
    limit = w.op("mul", "%rows", "%div")
    unit = w.op("and", w.value("icmp eq i64 %csx, 1"), w.value("icmp eq i64 %cso, 1"), "i1")
    nbytes = w.op("mul", "%d", "%size")
    wrap = w.value("icmp ne i64 %wrap, 0")
    with w.loop("%start", "%end", 1, "i") as i:
        raw = w.load("i64", w.gep("%idx", w.op("mul", i, "%istride"), "i64"), 8)
        negative = w.op("and", w.value(f"icmp slt i64 {raw}, 0"), wrap, "i1")
        v = w.value(f"select i1 {negative}, i64 {w.op('add', raw, limit)}, i64 {raw}")
        bad = w.op("or", w.value(f"icmp slt i64 {v}, 0"), w.value(f"icmp sge i64 {v}, {limit}"),
                   "i1")
        with w.if_(bad, "bad"):
            _fail(w, i)
        src = w.gep("%x", w.op("mul", w.op("udiv", v, "%div"), "%rsx"), ty)
        dst = w.gep("%out", w.op("mul", i, "%rso"), ty)
        with w.if_else(unit, "unit") as otherwise:
            w.emit(f"call void @llvm.memcpy.p0.p0.i64(ptr {dst}, ptr {src}, i64 {nbytes}, "
                   f"i1 false)")
            otherwise()
            with w.loop("0", "%d", 1, "j") as j:
                val = w.load(ty, w.gep(src, w.op("mul", j, "%csx"), ty), 1)
                w.store(ty, val, w.gep(dst, w.op("mul", j, "%cso"), ty), 1)
    return "declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)\n\n" + w.text()


def _copy_rows(x: np.ndarray, idx: np.ndarray, div: int, wrap: bool, out: np.ndarray,
               threads: int | None, target: HostTarget | None) -> int | None:
    """out[i] = x[row(idx[i])] on the cores; the first bad position in idx, or None."""
    if x.itemsize not in (1, 2, 4, 8):
        raise ShapeError(f"no row-copy kernel for {x.dtype} ({x.itemsize}-byte elements)")
    d = math.prod(x.shape[1:])
    flat = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    x2, out2 = _matrix(x, x.shape[0], d), _matrix(out, flat.size, d)
    if out2.size and not np.may_share_memory(out2, out):  # out has no 2-D view: a temporary
        bad = _copy_rows(x, idx, div, wrap, out2, threads, target)
        out[...] = out2.reshape(out.shape)
        return bad
    ty = f"i{8 * x.itemsize}"
    name = f"lmc_dm_rows_{ty}"
    kernel = _kernel(name, lambda: _render_rows(name, ty), target)
    parts = _ranges(flat.size, flat.size * d * x.itemsize, threads)
    return _run_ranges(kernel, parts, [flat.ctypes.data, 1, div, int(wrap), x2.ctypes.data,
                                       x2.shape[0], *_strides(x2), out2.ctypes.data,
                                       *_strides(out2), d, x.itemsize])


def take_rows(x: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None, *,
              threads: int | None = None, target: HostTarget | None = None) -> np.ndarray:
    """tensor.take on axis 0 (embedding lookup): x [V, ...] (any dtype of <= 8 bytes), idx of
    any shape -> out [*idx.shape, ...]. Negative indices count from the end, as in numpy."""
    x, idx = np.asarray(x), _indices(idx, "tensor.take")
    if x.ndim == 0:
        raise ShapeError("tensor.take: x must have an axis 0")
    out = _result(out, idx.shape + x.shape[1:], x.dtype, "tensor.take")
    bad = _copy_rows(x, idx, 1, True, out, threads, target)
    if bad is not None:
        raise IndexRangeError(f"tensor.take: index {idx.reshape(-1)[bad]} at position "
                              f"{_position(bad, idx.shape)} is out of range for axis 0 "
                              f"of size {x.shape[0]}")
    return out


def moe_gather(x: np.ndarray, perm: np.ndarray, k: int, *, out: np.ndarray | None = None,
               threads: int | None = None, target: HostTarget | None = None) -> np.ndarray:
    """moe.gather: x [N, d], perm [M] (flat token*k + slot positions) -> x[perm // k]."""
    x, perm = np.asarray(x), _indices(perm, "moe.gather")
    if x.ndim != 2 or perm.ndim != 1 or k < 1:
        raise ShapeError(f"moe.gather: needs x [N, d], perm [M], k >= 1; got {x.shape}, "
                         f"{perm.shape}, k={k}")
    out = _result(out, (perm.size, x.shape[1]), x.dtype, "moe.gather")
    bad = _copy_rows(x, perm, k, False, out, threads, target)
    if bad is not None:
        raise IndexRangeError(f"moe.gather: perm[{bad}] = {perm[bad]} is outside [0, "
                              f"{x.shape[0] * k}) for {x.shape[0]} tokens x k={k}")
    return out


# -- moe.route: counting sort of the chosen experts --


def _render_route(name: str) -> str:
    """offsets = exclusive prefix sum of expert counts; perm = positions stably by expert."""
    w = FunctionWriter(f"void @{name}(i64 %total, ptr %idx, i64 %experts, ptr %perm, "
                       f"ptr %offsets, ptr %cursor, ptr %status)")
    with w.loop("0", w.op("add", "%experts", "1"), 1, "e") as e:
        w.store("i64", "0", w.gep("%offsets", e, "i64"), 8)
    with w.loop("0", "%total", 1, "i") as i:
        e = w.load("i64", w.gep("%idx", i, "i64"), 8)
        bad = w.op("or", w.value(f"icmp slt i64 {e}, 0"),
                   w.value(f"icmp sge i64 {e}, %experts"), "i1")
        with w.if_(bad, "bad"):
            _fail(w, i)
        count = w.gep("%offsets", w.op("add", e, "1"), "i64")
        w.store("i64", w.op("add", w.load("i64", count, 8), "1"), count, 8)
    with w.loop("0", "%experts", 1, "s") as e:
        start = w.load("i64", w.gep("%offsets", e, "i64"), 8)
        w.store("i64", start, w.gep("%cursor", e, "i64"), 8)
        nxt = w.gep("%offsets", w.op("add", e, "1"), "i64")
        w.store("i64", w.op("add", w.load("i64", nxt, 8), start), nxt, 8)
    with w.loop("0", "%total", 1, "p") as i:
        cur = w.gep("%cursor", w.load("i64", w.gep("%idx", i, "i64"), 8), "i64")
        at = w.load("i64", cur, 8)
        w.store("i64", i, w.gep("%perm", at, "i64"), 8)
        w.store("i64", w.op("add", at, "1"), cur, 8)
    return w.text()


def moe_route(topk_idx: np.ndarray, num_experts: int, *,
              target: HostTarget | None = None) -> tuple[np.ndarray, np.ndarray]:
    """moe.route: topk_idx [N, k] expert choices -> (perm [N*k], offsets [E+1]): the flat
    positions stably sorted by expert (argsort kind="stable"), and each expert's rows."""
    idx = _indices(topk_idx, "moe.route")
    flat = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    perm, offsets = np.empty(flat.size, np.int64), np.empty(num_experts + 1, np.int64)
    cursor, status = np.empty(max(num_experts, 1), np.int64), np.full(1, -1, np.int64)
    name = "lmc_dm_route"
    fn, _ = _kernel(name, lambda: _render_route(name), target,
                    [_I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR])
    fn(flat.size, flat.ctypes.data, num_experts, perm.ctypes.data, offsets.ctypes.data,
       cursor.ctypes.data, status.ctypes.data)
    bad = _first_bad(status)
    if bad is not None:
        raise IndexRangeError(f"moe.route: expert index {flat[bad]} at position "
                              f"{_position(bad, idx.shape)} is outside [0, {num_experts})")
    return perm, offsets


# -- moe.combine: weighted scatter-add of the expert outputs back to tokens --


def _render_combine(name: str, ty: str) -> str:
    """Rows [start, end) of out = sum over j in perm order of y[j] * w.flat[perm[j]] where
    perm[j] / k is the row: every thread scans all of perm, so the order is np.add.at's."""
    w = _range_writer(name, ("m", "*perm", "k", "nk", "*y", "rsy", "csy", "*w", "rsw", "csw",
                             "*out", "rso", "cso", "d", "*status"))
    with w.loop("%start", "%end", 1, "z") as r:
        row = w.gep("%out", w.op("mul", r, "%rso"), ty)
        with w.loop("0", "%d", 1, "zc") as c:
            w.store(ty, "0.0", w.gep(row, w.op("mul", c, "%cso"), ty))
    unit = w.op("and", w.value("icmp eq i64 %csy, 1"), w.value("icmp eq i64 %cso, 1"), "i1")
    with w.loop("0", "%m", 1, "j") as j:
        p = w.load("i64", w.gep("%perm", j, "i64"), 8)
        bad = w.op("or", w.value(f"icmp slt i64 {p}, 0"), w.value(f"icmp sge i64 {p}, %nk"),
                   "i1")
        with w.if_(bad, "bad"):
            _fail(w, j)
        r, slot = w.op("udiv", p, "%k"), w.op("urem", p, "%k")
        mine = w.op("and", w.value(f"icmp sge i64 {r}, %start"),
                    w.value(f"icmp slt i64 {r}, %end"), "i1")
        with w.if_(mine, "mine"):
            at = w.op("add", w.op("mul", r, "%rsw"), w.op("mul", slot, "%csw"))
            weight = w.load(ty, w.gep("%w", at, ty))
            y_row = w.gep("%y", w.op("mul", j, "%rsy"), ty)
            out_row = w.gep("%out", w.op("mul", r, "%rso"), ty)
            with w.if_else(unit, "unit") as otherwise:
                _axpy(w, ty, weight, y_row, "1", out_row, "1")  # vectorized by LLVM
                otherwise()
                _axpy(w, ty, weight, y_row, "%csy", out_row, "%cso")
    return w.text()


def _axpy(w: FunctionWriter, ty: str, a: str, x: str, incx: str, y: str, incy: str) -> None:
    """y += x * a over d elements: a rounded product, then the add (no FMA), as numpy does."""
    with w.loop("0", "%d", 1, "c") as c:
        dst = w.gep(y, w.op("mul", c, incy), ty)
        prod = w.value(f"fmul {ty} {w.load(ty, w.gep(x, w.op('mul', c, incx), ty))}, {a}")
        w.store(ty, w.value(f"fadd {ty} {w.load(ty, dst)}, {prod}"), dst)


def moe_combine(y: np.ndarray, perm: np.ndarray, weights: np.ndarray, *,
                out: np.ndarray | None = None, threads: int | None = None,
                target: HostTarget | None = None) -> np.ndarray:
    """moe.combine: out [N, d] = 0, then out[perm[j] // k] += y[j] * weights.flat[perm[j]] for
    j in order (y [M, d], weights [N, k], same float dtype): bit-identical to np.add.at."""
    y, perm, weights = np.asarray(y), _indices(perm, "moe.combine"), np.asarray(weights)
    if y.ndim != 2 or perm.shape != (y.shape[0],) or weights.ndim != 2:
        raise ShapeError(f"moe.combine: needs y [M, d], perm [M], weights [N, k]; got "
                         f"{y.shape}, {perm.shape}, {weights.shape}")
    if y.dtype not in _FLOATS or weights.dtype != y.dtype:
        raise ShapeError(f"moe.combine: y and weights must share a float dtype, got {y.dtype} "
                         f"and {weights.dtype}")
    (n, k), d = weights.shape, y.shape[1]
    out = _result(out, (n, d), y.dtype, "moe.combine")
    work = out if _strides(out) is not None else np.empty_like(out)
    y, weights = (a if _strides(a) is not None else np.ascontiguousarray(a) for a in (y, weights))
    flat = np.ascontiguousarray(perm, dtype=np.int64)
    ty = _FLOATS[y.dtype]
    name = f"lmc_dm_combine_{ty}"
    kernel = _kernel(name, lambda: _render_combine(name, ty), target)
    bad = _run_ranges(kernel, _ranges(n, y.nbytes, threads),
                      [flat.size, flat.ctypes.data, k, n * k, y.ctypes.data, *_strides(y),
                       weights.ctypes.data, *_strides(weights), work.ctypes.data,
                       *_strides(work), d])
    if bad is not None:
        raise IndexRangeError(f"moe.combine: perm[{bad}] = {flat[bad]} is outside [0, {n * k})")
    if work is not out:
        out[...] = work
    return out


# -- top-k along the last axis: a k-element heap per row --


def _better(w: FunctionWriter, ty: str, is_float: bool, largest: bool, a, b) -> str:
    """i1: element a = (value, index) ranks before b, as in a stable argsort of -x (largest) or
    x: larger (smaller) values first, equal values by lower index, NaN after everything."""
    (av, ai), (bv, bi) = a, b
    lower = w.value(f"icmp slt i64 {ai}, {bi}")
    if is_float:
        strict = w.value(f"fcmp {'ogt' if largest else 'olt'} {ty} {av}, {bv}")
        equal = w.value(f"fcmp oeq {ty} {av}, {bv}")
    else:
        strict = w.value(f"icmp {'sgt' if largest else 'slt'} {ty} {av}, {bv}")
        equal = w.value(f"icmp eq {ty} {av}, {bv}")
    ordered = w.op("or", strict, w.op("and", equal, lower, "i1"), "i1")
    if not is_float:
        return ordered
    a_nan, b_nan = (w.value(f"fcmp uno {ty} {v}, {v}") for v in (av, bv))
    a_real = w.value(f"xor i1 {a_nan}, true")
    nan_case = w.op("and", b_nan, w.op("or", a_real, lower, "i1"), "i1")
    return w.value(f"select i1 {w.op('or', a_nan, b_nan, 'i1')}, i1 {nan_case}, i1 {ordered}")


def _render_sift(name: str, ty: str, better: Callable) -> str:
    """Sift heap[start] down: the heap keeps the worst kept element at the root (every parent
    ranks after its children), so a candidate is compared with the root only."""
    w = FunctionWriter(f"internal void @{name}(ptr %hv, ptr %hi, i64 %size, i64 %start)")
    pos_slot = w.slot("i64", "%start", "pos")

    def at(i: str) -> tuple[str, str]:
        return w.load(ty, w.gep("%hv", i, ty)), w.load("i64", w.gep("%hi", i, "i64"), 8)

    with w.loop("0", "%size", 1, "depth"):  # at most log2(size) rounds; each may return
        pos = w.load("i64", pos_slot, 8)
        left = w.op("add", w.op("mul", pos, "2"), "1")
        with w.if_(w.value(f"icmp sge i64 {left}, %size"), "leaf"):
            _return(w)
        right = w.op("add", left, "1")
        has_right = w.value(f"icmp slt i64 {right}, %size")
        right = w.value(f"select i1 {has_right}, i64 {right}, i64 {left}")
        lv, rv = at(left), at(right)
        take_right = w.op("and", has_right, better(w, lv, rv), "i1")  # the worse child
        child = w.value(f"select i1 {take_right}, i64 {right}, i64 {left}")
        cv = (w.value(f"select i1 {take_right}, {ty} {rv[0]}, {ty} {lv[0]}"),
              w.value(f"select i1 {take_right}, i64 {rv[1]}, i64 {lv[1]}"))
        pv = at(pos)
        with w.if_(w.value(f"xor i1 {better(w, pv, cv)}, true"), "settled"):
            _return(w)
        for dst, (val, idx) in ((pos, cv), (child, pv)):
            w.store(ty, val, w.gep("%hv", dst, ty))
            w.store("i64", idx, w.gep("%hi", dst, "i64"), 8)
        w.store("i64", child, pos_slot, 8)
    return w.text()


def _render_topk(name: str, ty: str, is_float: bool, largest: bool) -> str:
    """Rows [start, end): heapify the first k, keep any later element that ranks before the root,
    then pop worst-first into the back of the output row (best first, like the sort)."""
    sift = name + "_sift"

    def better(w: FunctionWriter, a, b) -> str:
        return _better(w, ty, is_float, largest, a, b)

    w = _range_writer(name, ("*x", "rsx", "csx", "n", "k", "*vals", "*inds", "rso", "hoff",
                             "*status"))
    # The heap lives in the scratch memory: k values, then k indices at byte offset hoff.
    w.emit("%hv = getelementptr i8, ptr %scratch, i64 0")
    w.emit("%hi = getelementptr i8, ptr %scratch, i64 %hoff")

    def call_sift(size: str, start: str) -> None:
        w.emit(f"call void @{sift}(ptr %hv, ptr %hi, i64 {size}, i64 {start})")

    with w.loop("%start", "%end", 1, "r") as r:
        row = w.gep("%x", w.op("mul", r, "%rsx"), ty)
        with w.loop("0", "%k", 1, "fill") as i:
            w.store(ty, w.load(ty, w.gep(row, w.op("mul", i, "%csx"), ty)), w.gep("%hv", i, ty))
            w.store("i64", i, w.gep("%hi", i, "i64"), 8)
        half = w.op("sdiv", "%k", "2")
        with w.loop("0", half, 1, "heapify") as s:
            call_sift("%k", w.op("sub", w.op("sub", half, "1"), s))
        with w.loop("%k", "%n", 1, "scan") as i:
            v = w.load(ty, w.gep(row, w.op("mul", i, "%csx"), ty))
            root = (w.load(ty, "%hv"), w.load("i64", "%hi", 8))
            with w.if_(better(w, (v, i), root), "keep"):
                w.store(ty, v, "%hv")
                w.store("i64", i, "%hi", 8)
                call_sift("%k", "0")
        v_row = w.gep("%vals", w.op("mul", r, "%rso"), ty)
        i_row = w.gep("%inds", w.op("mul", r, "%rso"), "i64")
        with w.loop("0", "%k", 1, "pop") as s:
            t = w.op("sub", w.op("sub", "%k", "1"), s)
            w.store(ty, w.load(ty, "%hv"), w.gep(v_row, t, ty))
            w.store("i64", w.load("i64", "%hi", 8), w.gep(i_row, t, "i64"), 8)
            w.store(ty, w.load(ty, w.gep("%hv", t, ty)), "%hv")
            w.store("i64", w.load("i64", w.gep("%hi", t, "i64"), 8), "%hi", 8)
            call_sift(t, "0")
    return _render_sift(sift, ty, better) + "\n" + w.text()


def topk(x: np.ndarray, k: int, largest: bool = True, *, threads: int | None = None,
         target: HostTarget | None = None) -> tuple[np.ndarray, np.ndarray]:
    """tensor.topk on the last axis: (values, int64 indices) [..., k], best first; ties keep the
    lower index first and NaN ranks last, as the interpreter's stable argsort. O(n log k)."""
    x = np.asarray(x)
    if x.ndim == 0 or not 0 <= k <= x.shape[-1]:
        raise ShapeError(f"tensor.topk: k={k} must be within the last axis of {x.shape}")
    if x.dtype not in _RANKED:
        raise ShapeError(f"tensor.topk: no native kernel for {x.dtype}")
    shape = x.shape[:-1] + (k,)
    values, indices = np.empty(shape, x.dtype), np.empty(shape, np.int64)
    if values.size == 0:
        return values, indices
    n = x.shape[-1]
    x2 = _matrix(x, values.size // k, n)
    ty, is_float = _RANKED[x.dtype]
    name = f"lmc_dm_topk_{ty}_{'largest' if largest else 'smallest'}"
    kernel = _kernel(name, lambda: _render_topk(name, ty, is_float, largest), target)
    rows = values.size // k
    hoff = -(-k * x.itemsize // 8) * 8
    _run_ranges(kernel, _ranges(rows, rows * n * x.itemsize, threads),
                [x2.ctypes.data, *_strides(x2), n, k, values.ctypes.data, indices.ctypes.data, k,
                 hoff], scratch_bytes=hoff + 8 * k)
    return values, indices
