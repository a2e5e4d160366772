"""Loop kernels for `kernel.fused {kind = elementwise | reduction}`, and GEMM tile epilogues.

A body is first rewritten so that softmax, log_softmax, layer_norm and rms_norm become row
reductions (sum/mean/max/min over the trailing axes) and elementwise ops: hand-written and
library forms then share one scheduler. Each value gets an *axis map* (which domain axis each of
its dims runs along), found backwards from the results, and from it a class: `row` (varies along
the reduced/inner axes), `perrow` (one value per row, computed once per row as a splat vector),
or `const`. Reductions are levelled by how many reductions they depend on; a row runs one pass
over its L elements per level (softmax: max, sum of exp, normalize), recomputing cheap row
values in each pass and keeping transcendental ones in per-thread scratch.

The ABI and launcher contract are in docs/CPU_BACKEND.md. Every call takes a fast path (vector
loads, unrolled accumulators, masked tail) when each row operand has inner stride 1, else a
gathered path that is slower but correct for any strides. A GEMM tile epilogue is the same
kind of kernel: its ops become an elementwise loop kernel over the tile, called by a small
function that turns the tile ABI into an args block.
"""
from __future__ import annotations

import ctypes
import hashlib
import threading
from dataclasses import dataclass

from lmc.ir.core import UNKNOWN_LOC, Block, Op, Region, Value
from lmc.ir.ops import op_class
from lmc.ir.printer import Printer
from lmc.ir.rewriter import Rewriter
from lmc.ir.types import (
    DType,
    TensorType,
    dims_equal,
    normalize_axis,
)

from . import emit
from .emit import COSTLY, EMIT, STORAGE, EmitError, vtype
from .irtext import FunctionWriter
from .jit import HostTarget, default_engine
from .launch import LoopKernel

REDUCE_KIND = {"tensor.sum": "sum", "tensor.mean": "sum", "tensor.max": "max",
               "tensor.min": "min"}
UNROLL = 4  # independent accumulators per reduction: hides the add latency
_SIZE = {"float": 4, "double": 8, "i64": 8, "i32": 4, "i8": 1, "i1": 1}


# ---- decomposition of library row ops ----------------------------------------------------------

def _trailing(rank: int, k: int) -> tuple[int, ...]:
    return tuple(range(rank - k, rank))


def _softmax(rw: Rewriter, op: Op) -> Value:
    """The interpreter's _softmax/_log_softmax: a non-finite row max is replaced by 0."""
    x, rank = op.x, op.x.type.rank
    if normalize_axis(op.axis, rank) != rank - 1:
        raise EmitError(op, "only a softmax over the last axis is a row reduction")
    axes = (rank - 1,)
    zero = rw.constant(0.0, TensorType((), x.dtype))
    m = rw.value("tensor.max", x, axes=axes, keepdim=True)
    finite = rw.value("tensor.eq", rw.value("tensor.sub", m, m), zero)
    shifted = rw.value("tensor.sub", x, rw.value("tensor.where", finite, m, zero))
    e = rw.value("tensor.exp", shifted)
    s = rw.value("tensor.sum", e, axes=axes, keepdim=True)
    if op.name == "tensor.log_softmax":
        return rw.value("tensor.sub", shifted, rw.value("tensor.log", s))
    return rw.value("tensor.div", e, s)


def _norm(rw: Rewriter, op: Op) -> Value:
    """layer_norm: mean, then the variance of (x - mean), as the interpreter; rms_norm."""
    x = op.x
    axes = _trailing(x.type.rank, op.num_axes)
    if op.name == "tensor.layer_norm":
        d = rw.value("tensor.sub", x, rw.value("tensor.mean", x, axes=axes, keepdim=True))
    else:
        d = x
    var = rw.value("tensor.mean", rw.value("tensor.mul", d, d), axes=axes, keepdim=True)
    eps = rw.constant(op.eps, TensorType((), x.dtype))
    y = rw.value("tensor.div", d, rw.value("tensor.sqrt", rw.value("tensor.add", var, eps)))
    affine = op.operand_values[1:]
    if affine:
        y = rw.value("tensor.mul", y, affine[0])
    if len(affine) > 1:
        y = rw.value("tensor.add", y, affine[1])
    return y


def _int_mean(rw: Rewriter, op: Op) -> Value:
    """numpy's mean of integers or bools: a float64 mean, cast back (truncating)."""
    wide = rw.value("tensor.cast", op.x, dtype=DType.f64)
    mean = rw.value("tensor.mean", wide, axes=op.axes, keepdim=op.keepdim)
    return rw.value("tensor.cast", mean, dtype=op.x.dtype)


LIBRARY = {"tensor.softmax": _softmax, "tensor.log_softmax": _softmax,
           "tensor.layer_norm": _norm, "tensor.rms_norm": _norm, "tensor.mean": _int_mean}


def decompose(body: Block) -> Block:
    """A copy of `body` with the library row ops written as primitive row reductions."""
    block = body.clone()
    for op in list(block.ops):
        if op.name in LIBRARY and (op.name != "tensor.mean" or not op.x.dtype.is_float):
            new = LIBRARY[op.name](Rewriter(block, before=op), op)
            op.result.replace_all_uses_with(new)
            op.drop_operands()
            block.remove(op)
    return block


# ---- the plan: domain, axis maps, classes, passes -----------------------------------------------

@dataclass
class Operand:
    """One operand of the ABI: a body argument or a result, with its axis map."""

    value: Value
    amap: tuple[int | None, ...]
    inner: bool  # varies along L (else one value per row, read once and splatted)
    output: bool
    live: bool = True  # a body argument no result depends on is never read


def _right_aligned(shape, target: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """Axis map of an operand broadcast (numpy rules) into a value with axis map `target`."""
    off = len(target) - len(shape)
    return tuple(None if d == 1 else target[off + j] for j, d in enumerate(shape))


def _dim_eq(a, b) -> bool:
    """dims_equal without sympy where it cannot matter: a symbol never equals an int."""
    return a == b or (isinstance(a, str) and isinstance(b, str) and dims_equal(a, b))


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_dim_eq(x, y) for x, y in zip(a, b))


def _broadcasts_to(shape, target) -> bool:
    off = len(target) - len(shape)
    return off >= 0 and all(d == 1 or _dim_eq(d, target[off + j]) for j, d in enumerate(shape))


def _broadcast(shapes) -> tuple:
    """numpy broadcasting of (possibly symbolic) shapes, or None if they do not broadcast."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        big = [d for d in dims if d != 1]
        if any(not _dim_eq(d, big[0]) for d in big):
            return None
        out.append(big[0] if big else 1)
    return tuple(out)


class Plan:
    """The schedule of one kernel body; compile-time only (shapes may be symbolic)."""

    def __init__(self, op: Op):
        """Raises EmitError (naming the op) for bodies a loop kernel cannot run."""
        if op.kind not in ("elementwise", "reduction"):
            raise EmitError(op, f"kind '{op.kind}' is not a loop kernel")
        self.block = decompose(op.body)
        self.term = self.block.terminator
        self.ops = [o for o in self.block.ops if o is not self.term]
        self._find_domain()
        self._axis_maps()
        self._classify()
        self._schedule()

    def _find_domain(self) -> None:
        """The iteration domain: the reductions' input shape (they must agree on it and on the
        k trailing axes they reduce), else the results' broadcast shape with k = 1 (L is the
        last dim)."""
        reds = [o for o in self.ops if o.name in REDUCE_KIND]
        self.reduces = bool(reds)
        if not reds:
            self.domain = _broadcast([v.shape for v in self.term.operand_values])
            if self.domain is None:
                raise EmitError(self.term, "the results of an elementwise kernel must broadcast "
                                           "to one shape")
            self.rank = len(self.domain)
            self.k = min(self.rank, 1)
            return
        self.domain = reds[0].x.shape
        self.rank = rank = len(self.domain)
        self.k = None
        for r in reds:
            axes = {normalize_axis(a, rank) for a in r.axes} if r.axes else set(range(rank))
            k = len(axes)
            if not _same_shape(r.x.shape, self.domain) or axes != set(_trailing(rank, k)) or \
                    self.k not in (None, k):
                raise EmitError(r, "the reductions of one kernel must reduce the same trailing "
                                   f"axes of one shape {list(self.domain)}")
            self.k = k

    @property
    def outer_rank(self) -> int:
        return self.rank - self.k

    def _result_map(self, v: Value) -> tuple[int | None, ...]:
        outer = tuple(range(self.outer_rank))
        if self.reduces and _same_shape(v.shape, self.domain[:self.outer_rank]):
            return _right_aligned(v.shape, outer)
        if not _broadcasts_to(v.shape, self.domain):
            raise EmitError(self.term, f"result {v.type} has neither the domain shape "
                                       f"{list(self.domain)} nor the reduced shape")
        return _right_aligned(v.shape, tuple(range(self.rank)))

    def _axis_maps(self) -> None:
        """Backwards from the results: every live value's axis map; dead ops are dropped."""
        identity = tuple(range(self.rank))

        def reduced(op: Op, res: tuple) -> tuple:
            full = tuple(range(self.outer_rank)) + (None,) * (self.k * op.keepdim)
            if res != _right_aligned(op.result.shape, full):
                raise EmitError(op, "a reduced value is broadcast along a row axis")
            return identity

        self.amap = axis_maps(self.term, self.ops, self._result_map, reduced, "row")
        self.ops = [o for o in self.ops if o.result in self.amap]

    def is_inner(self, v: Value) -> bool:
        return any(a is not None and a >= self.outer_rank for a in self.amap[v])

    def _classify(self) -> None:
        """Class and reduction level of every live value; the ABI operands."""
        self.cls: dict[Value, str] = {}
        self.level: dict[Value, int] = {}
        for a in self.block.args:
            if a in self.amap:
                self.cls[a] = "row" if self.is_inner(a) else "perrow"
                self.level[a] = 0
        for op in self.ops:
            v, ins = op.result, op.operand_values
            if op.name in REDUCE_KIND:
                self.cls[v], self.level[v] = "perrow", self.level[op.x] + 1
                continue
            self.level[v] = max((self.level[x] for x in ins), default=0)
            if self.is_inner(v):
                self.cls[v] = "row"
            else:
                self.cls[v] = "const" if all(self.cls[x] == "const" for x in ins) else "perrow"
        self.operands = [Operand(a, self.amap.get(a, ()), a in self.amap and self.is_inner(a),
                                 False, a in self.amap) for a in self.block.args]
        self.operands += [Operand(v, self.amap[v], self.is_inner(v), True)
                          for v in self.term.operand_values]
        # x / per-row y is x * (1/y) with the reciprocal taken once per row.
        self.recip = {o.operand_values[1] for o in self.ops if o.name == "tensor.div" and
                      emit.is_float(o.result.dtype) and self.cls[o.result] == "row" and
                      self.cls[o.operand_values[1]] != "row"}

    def _schedule(self) -> None:
        """Passes over each row, what each computes, reduces, stores and keeps in scratch."""
        reds = [o for o in self.ops if o.name in REDUCE_KIND]
        store_pass = {i: self.level[o.value] + 1 for i, o in enumerate(self.operands)
                      if o.output and o.inner}
        self.n_passes = max([self.level[r.result] for r in reds] + list(store_pass.values()),
                            default=0)
        passes = range(1, self.n_passes + 1)
        self.reds = {p: [r for r in reds if self.level[r.result] == p] for p in passes}
        self.stores = {p: [i for i, q in store_pass.items() if q == p] for p in passes}
        roots = {p: [r.x for r in self.reds[p]] +
                 [self.operands[i].value for i in self.stores[p]] for p in passes}
        cached: dict[Value, int] = {}
        for p in passes:
            computed, _ = self._cone(roots[p], {v for v, q in cached.items() if q < p})
            for v in reversed(computed):
                if v.op is None or v.op.name not in COSTLY:
                    continue
                if any(v in self._cone(roots[q], {u for u, s in cached.items() if s < q})[0]
                       for q in range(p + 1, self.n_passes + 1)):
                    cached[v] = p
        self.cached = list(cached)
        self.cache_pass = cached
        self.compute, self.cache_loads = {}, {}
        for p in passes:
            self.compute[p], self.cache_loads[p] = self._cone(
                roots[p], {v for v, q in cached.items() if q < p})
        self.perrow = {lv: [v for v in [*self.block.args, *(o.result for o in self.ops)]
                            if self.cls.get(v) == "perrow" and self.level[v] == lv]
                       for lv in range(self.n_passes + 1)}

    def _cone(self, roots: list[Value], stop: set[Value]) -> tuple[list[Value], list[Value]]:
        """Row values a pass computes for `roots` (in block order), and the scratch values it
        reads instead of recomputing."""
        seen: set[Value] = set()
        leaves: list[Value] = []
        stack = [v for v in roots if self.cls[v] == "row"]
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if v in stop:
                leaves.append(v)
            elif v.op is not None:
                stack += [x for x in v.op.operand_values if self.cls[x] == "row"]
        order = [*self.block.args, *(o.result for o in self.ops)]
        computed = [v for v in order if v in seen and v not in stop]
        return computed, [v for v in order if v in leaves]

    @property
    def scratch_bytes(self) -> int:
        """Scratch bytes per (padded) row element."""
        return sum(_SIZE[emit.scalar_type(v.dtype)] for v in self.cached)


def axis_maps(term: Op, ops: list[Op], result_map, reduced, kind: str,
              check=None) -> dict[Value, tuple]:
    """Backwards from a kernel body's results (`result_map(v)`), the axis map of every live
    value: which kernel axis each of its dims runs along (None: broadcast). `reduced(op, res)`
    gives a reduction's operand map (and may refuse); `check(v, map, op)` may refuse a map."""
    amap: dict[Value, tuple] = {}

    def assign(v: Value, m: tuple, op: Op) -> None:
        old = amap.setdefault(v, m)
        # A size-1 dim read as broadcast by one user and along a size-1 kernel axis by another
        # (a batch of 1 in LayerNorm's mean and in x − mean) is the same element either way.
        if old != m and not all(a == b or d == 1 for d, a, b in zip(v.shape, old, m)):
            raise EmitError(op, f"operand {v.type} is broadcast along two different axis "
                                "sets in one kernel")
        if check is not None:
            check(v, m, op)

    for v in term.operand_values:
        assign(v, result_map(v), term)
    for op in reversed(ops):
        if op.result not in amap:
            continue
        res = amap[op.result]
        if op.name in REDUCE_KIND:
            assign(op.x, reduced(op, res), op)
        elif op.name == "tensor.reshape":
            assign(op.x, _reshape_map(op, res), op)
        elif op.name in EMIT:
            for v in op.operand_values:
                assign(v, _right_aligned(v.shape, res), op)
        else:
            raise EmitError(op, f"is neither elementwise nor a {kind} reduction")
    return amap


def _reshape_map(op: Op, res: tuple) -> tuple:
    """A reshape that only adds or removes size-1 dims: its non-1 dims map in order."""
    src = [j for j, d in enumerate(op.x.shape) if d != 1]
    dst = [j for j, d in enumerate(op.result.shape) if d != 1]
    if len(src) != len(dst) or not all(_dim_eq(op.x.shape[a], op.result.shape[b])
                                       for a, b in zip(src, dst)):
        raise EmitError(op, "only reshapes that add or remove size-1 dims can be fused")
    out: list[int | None] = [None] * len(op.x.shape)
    for a, b in zip(src, dst):
        out[a] = res[b]
    return tuple(out)


def _emit_op(w: FunctionWriter, op: Op, vals: dict, lanes: int) -> str:
    """EMIT for `op`, except x / y with a precomputed per-row reciprocal of y."""
    ins = op.operand_values
    if op.name == "tensor.div" and ("recip", ins[1]) in vals:
        return w.value(f"fmul {vtype(op.result.dtype, lanes)} {vals[ins[0]]}, "
                       f"{vals[('recip', ins[1])]}")
    try:
        fn = EMIT[op.name]
    except KeyError:
        raise EmitError(op, "has no CPU emitter") from None
    return fn(w, op, [vals[x] for x in ins], lanes)


# ---- loop kernel code generation ---------------------------------------------------------------

@dataclass
class _At:
    """Where a vector step is: element i, the tail mask (None: a full vector), the path."""

    i: str
    mask: str | None
    fast: bool
    clamp_all: bool = False  # the step stores a 1- or 2-byte result through clamped lanes
    index: str | None = None  # the clamped lane index vector, made on first use

    def clamped(self, itemsize: int) -> bool:
        """Read/write through clamped lanes rather than a mask? Off the fast path always; in
        its tail for narrow elements (x86 masks only 4- and 8-byte ones), and for everything
        when a narrow result is stored: the lanes it rewrites must see the last element."""
        return not self.fast or (self.mask is not None and (self.clamp_all or itemsize < 4))


class _LoopWriter:
    """Renders `void @NAME(i64 %start, i64 %end, ptr %args, ptr %scratch)` for a Plan."""

    def __init__(self, plan: Plan, name: str, lanes: int, linkage: str = ""):
        self.p, self.n = plan, lanes
        self.w = FunctionWriter(f"{linkage} void @{name}(i64 %start, i64 %end, ptr %args, "
                                "ptr %scratch)".strip())

    def render(self) -> str:
        """Constants once, then the row loop twice: the fast path when every row operand has
        inner stride 1, else the gathered one."""
        w, p = self.w, self.p
        self._read_args()
        consts: dict = {}
        for op in p.ops:
            if p.cls[op.result] == "const":
                consts[op.result] = _emit_op(w, op, consts, self.n)
                self._recip(op.result, consts)
        unit = [w.value(f"icmp eq i64 {self.inner[j]}, 1")
                for j, o in enumerate(p.operands) if o.live and o.inner]
        fast = "true"
        for c in unit:
            fast = w.op("and", fast, c, "i1")
        with w.if_else(fast, "fast") as otherwise:
            self._rows(consts, True)
            otherwise()
            self._rows(consts, False)
        return w.text()

    def _word(self, i: int, ty: str = "i64") -> str:
        return self.w.load(ty, self.w.gep("%args", str(i), "i64"), 8)

    def _read_args(self) -> None:
        """Sizes, L, each live operand's base/strides; scratch slots (rows padded to lanes)."""
        w, p, r = self.w, self.p, self.p.outer_rank
        self.sizes = [self._word(d) for d in range(r)]
        self.L = self._word(r)
        self.last = w.op("sub", self.L, "1")
        self.base, self.strides, self.inner = [], [], []
        for j, o in enumerate(p.operands):
            at = r + 1 + j * (r + 2)
            w.emit(f"; operand {j}: {'result' if o.output else 'argument'} {o.value.type}, "
                   f"{'row' if o.inner else 'per-row'}{'' if o.live else ', unused'}")
            self.base.append(self._word(at, "ptr") if o.live else None)
            self.strides.append([self._word(at + 1 + d) for d in range(r)] if o.live else None)
            self.inner.append(self._word(at + r + 1) if o.live else None)
        padded = w.op("and", w.op("add", self.L, str(self.n - 1)), str(-self.n))
        self.slots, offset = {}, 0
        for v in p.cached:
            self.slots[v] = w.gep("%scratch", w.op("mul", str(offset), padded), "i8")
            offset += _SIZE[emit.scalar_type(v.dtype)]

    def _recip(self, v: Value, vals: dict) -> None:
        """1/v next to v when a row value is divided by it (one divide per row, not per x)."""
        if v in self.p.recip:
            ty = vtype(v.dtype, self.n)
            vals[("recip", v)] = self.w.value(
                f"fdiv {ty} {emit.const(v.dtype, 1.0, self.n)}, {vals[v]}")

    def _rows(self, consts: dict, fast: bool) -> None:
        """Rows start..end: per-row values, then each pass and what its reductions unlock."""
        with self.w.loop("%start", "%end", 1, "row") as r:
            offs = self._offsets(r)
            env = dict(consts)
            self._per_row(0, env, offs)
            for q in range(1, self.p.n_passes + 1):
                self._pass(q, env, offs, fast)
                self._per_row(q, env, offs)

    def _offsets(self, r: str) -> list[str | None]:
        """Each operand's element offset of row r (r unravelled over the outer sizes)."""
        w, rank = self.w, self.p.outer_rank
        idx, rest = [None] * rank, r
        for d in reversed(range(rank)):
            if d == 0:
                idx[d] = rest
            else:
                idx[d] = w.op("urem", rest, self.sizes[d])
                rest = w.op("udiv", rest, self.sizes[d])
        offs = []
        for j, o in enumerate(self.p.operands):
            off = "0"
            for d in range(rank if o.live else 0):
                off = w.op("add", off, w.op("mul", idx[d], self.strides[j][d]))
            offs.append(off if o.live else None)
        return offs

    def _per_row(self, level: int, env: dict, offs: list) -> None:
        """Per-row values whose reductions are done; then the per-row results to store."""
        w, p, n = self.w, self.p, self.n
        for v in p.perrow[level]:
            if v.op is None:
                j = v.index
                env[v] = emit.splat_load(w, v.dtype, w.gep(self.base[j], offs[j], STORAGE[v.dtype]),
                                     n)
            elif v.op.name not in REDUCE_KIND:  # reductions were set by their pass
                env[v] = _emit_op(w, v.op, env, n)
            self._recip(v, env)
        for j, o in enumerate(p.operands):
            if o.output and not o.inner and p.level[o.value] == level:
                dt = o.value.dtype
                emit.scalar_store(w, dt, env[o.value], w.gep(self.base[j], offs[j], STORAGE[dt]), n)

    def _pass(self, q: int, env: dict, offs: list, fast: bool) -> None:
        """One sweep over the row: main loop (unrolled when it reduces), then a masked tail."""
        w, n, reds = self.w, self.n, self.p.reds[q]
        w.emit(f"; pass {q} ({'fast' if fast else 'gathered'}): reduce "
               f"{[r.name for r in reds]}, store operands {self.p.stores[q]}")
        copies = UNROLL if fast and reds else 1
        accs = {r: [w.slot(vtype(r.x.dtype, n), emit.reduce_identity(
            REDUCE_KIND[r.name], r.x.dtype, n), "acc") for _ in range(copies)] for r in reds}

        def step(i: str, mask: str | None, u: int) -> None:
            self._step(q, env, offs, i, mask, accs, u, fast)
        if fast:
            full, start = w.op("and", self.L, str(-n)), "0"
            if copies > 1:
                start = w.op("and", self.L, str(-n * copies))
                with w.loop("0", start, n * copies, "u") as i:
                    for u in range(copies):
                        step(w.op("add", i, str(u * n)), None, u)
            with w.loop(start, full, n, "v") as i:
                step(i, None, 0)
            with w.if_(w.value(f"icmp slt i64 {full}, {self.L}"), "tail"):
                step(full, emit.lane_mask(w, w.op("sub", self.L, full), n), 0)
        else:
            with w.loop("0", self.L, n, "g") as i:
                step(i, emit.lane_mask(w, w.op("sub", self.L, i), n), 0)
        for r in reds:
            env[r.result] = self._finish(r, accs[r])

    def _step(self, q, env, offs, i, mask, accs, u, fast) -> None:
        """One vector of the row at element i: compute, keep in scratch, reduce, store."""
        w, p, n = self.w, self.p, self.n
        narrow = any(p.operands[j].value.dtype.itemsize < 4 for j in p.stores[q])
        at = _At(i, mask, fast, narrow)
        vals = dict(env)
        for v in p.cache_loads[q]:
            vals[v] = self._scratch_load(v, at)
        for v in p.compute[q]:
            vals[v] = self._load(v.index, offs, at) if v.op is None else \
                _emit_op(w, v.op, vals, n)
            if p.cache_pass.get(v) == q:
                w.store(vtype(v.dtype, n), vals[v], w.gep(self.slots[v], i, emit.scalar_type(
                    v.dtype)), _SIZE[emit.scalar_type(v.dtype)])
        for r in p.reds[q]:
            kind, dt, x = REDUCE_KIND[r.name], r.x.dtype, vals[r.x]
            if mask is not None:
                x = w.value(f"select <{n} x i1> {mask}, {vtype(dt, n)} {x}, {vtype(dt, n)} "
                            f"{emit.reduce_identity(kind, dt, n)}")
            acc = accs[r][u]
            w.store(vtype(dt, n), emit.reduce_combine(w, kind, dt, w.load(vtype(dt, n), acc),
                                                      x, n), acc)
        for j in p.stores[q]:
            self._store(j, vals[p.operands[j].value], offs, at)

    def _scratch_load(self, v: Value, at: _At) -> str:
        """A scratch row value kept by an earlier pass (rows are padded to whole vectors)."""
        w, ty = self.w, emit.scalar_type(v.dtype)
        if at.fast and at.clamp_all and at.mask is not None:
            ptrs = w.value(f"getelementptr {ty}, ptr {self.slots[v]}, <{self.n} x i64> "
                           f"{self._index(at)}")
            return w.value(f"call {vtype(v.dtype, self.n)} @llvm.masked.gather."
                           f"{emit.suffix(vtype(v.dtype, self.n))}.v{self.n}p0(<{self.n} x ptr> "
                           f"align {_SIZE[ty]} {ptrs}, <{self.n} x i1> splat (i1 true), "
                           f"{vtype(v.dtype, self.n)} zeroinitializer)")
        return w.load(vtype(v.dtype, self.n), w.gep(self.slots[v], at.i, ty), _SIZE[ty])

    def _index(self, at: _At) -> str:
        if at.index is None:
            at.index = emit.clamped_index(self.w, at.i, self.last, self.n)
        return at.index

    def _element(self, j: int, offs: list, at: _At) -> tuple[str, str | None]:
        """(pointer to element i of operand j's row, or None; the lane pointers otherwise)."""
        w, dt = self.w, self.p.operands[j].value.dtype
        if not at.clamped(dt.itemsize):
            return w.gep(self.base[j], w.op("add", offs[j], at.i), STORAGE[dt]), None
        stride = "1" if at.fast else self.inner[j]
        return None, emit.lane_ptrs(w, dt, self.base[j], offs[j], self._index(at), stride, self.n)

    def _load(self, j: int, offs: list, at: _At) -> str:
        dt = self.p.operands[j].value.dtype
        ptr, lanes = self._element(j, offs, at)
        if ptr is not None:
            return emit.vload(self.w, dt, ptr, self.n, at.mask)
        return emit.vgather(self.w, dt, lanes, self.n)

    def _store(self, j: int, x: str, offs: list, at: _At) -> None:
        dt = self.p.operands[j].value.dtype
        ptr, lanes = self._element(j, offs, at)
        if ptr is not None:
            emit.vstore(self.w, dt, x, ptr, self.n, at.mask)
        else:
            emit.vscatter(self.w, dt, x, lanes, self.n)

    def _finish(self, r: Op, accs: list[str]) -> str:
        """Combine the accumulators, reduce across lanes (butterfly: every lane ends with the
        total), divide a mean by L."""
        w, n, kind, dt = self.w, self.n, REDUCE_KIND[r.name], r.x.dtype
        vt = vtype(dt, n)
        v = w.load(vt, accs[0])
        for a in accs[1:]:
            v = emit.reduce_combine(w, kind, dt, v, w.load(vt, a), n)
        v = emit.reduce_lanes(w, kind, dt, v, n)
        if r.name != "tensor.mean":
            return v
        count = emit.splat(w, emit.scalar_type(dt), w.value(
            f"sitofp i64 {self.L} to {emit.scalar_type(dt)}"), n)
        return w.value(f"fdiv {vt} {v}, {count}")  # (means of integers were made f64 ones)


# ---- compile -----------------------------------------------------------------------------------

def canonical_text(op: Op) -> str:
    """The body as text without locations or argument names: the compile cache key, so that
    identical kernels of different layers compile once."""
    body = op.body.clone()
    for i, a in enumerate(body.args):
        a.name = f"a{i}"
    for o in body.ops:
        o.loc = UNKNOWN_LOC
    return f"{op.kind}\n" + "\n".join(Printer().block(body, ""))


def default_lanes(target: HostTarget) -> int:
    """Vector lanes of loop kernels: one zmm (16 floats) with AVX-512, else one ymm."""
    return 16 if target.has_avx512 else 8


_kernels: dict[tuple, LoopKernel] = {}
_kernels_lock = threading.Lock()


def compile_loop_kernel(op: Op, target: HostTarget | None = None,
                        lanes: int | None = None) -> LoopKernel:
    """The native kernel of a `kernel.fused` {elementwise, reduction} op, compiled once per
    process for each distinct body. `lanes` overrides the target's vector width (tests run the
    16-lane code on AVX2 machines with it)."""
    engine = default_engine(target)
    lanes = lanes or default_lanes(engine.target)
    text = canonical_text(op)
    key = (text, target, lanes)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    # Compiled outside the lock: a kernel being compiled must not block lookups of compiled
    # ones (the engine dedups a text that two threads compile at once).
    plan = Plan(op)
    name = f"lmc_loop_{hashlib.sha1(f'{text}|{lanes}'.encode()).hexdigest()[:16]}"
    ir = emit.module_text([f"; {op.kind} kernel, {lanes} lanes\n; " +
                           text.replace("\n", "\n; "),
                           _LoopWriter(plan, name, lanes).render()], {lanes})
    module = engine.add_ir(name, ir)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = module.function(name, None, i64, i64, ptr, ptr)
    with _kernels_lock:
        return _kernels.setdefault(key, LoopKernel(plan, name, ir, lanes, fn))


# ---- GEMM tile epilogues -----------------------------------------------------------------------

def _epilogue_ops(op: Op, anchor: Op, sibling: Op | None = None
                  ) -> tuple[list[Op], list[Value], list[Value]]:
    """The ops the results are computed by from the anchor's (and a dual GEMM's sibling's;
    in body order, the constants they read included; also ops on other inputs only, e.g. a
    gelu'(h) the epilogue multiplies by), the values they read from outside (body arguments,
    in first-use order) and the results: the first is written back into C, the others to
    outputs of their own."""
    body = op.body
    results = list(body.terminator.operand_values)
    gemms = {anchor, sibling} - {None}
    needed, stack, from_anchor = set(), list(results), False
    while stack:  # the results' producers, up to the GEMMs and the body arguments
        v = stack.pop()
        from_anchor |= v.op is anchor
        if v in needed or v.op is None or v.op in gemms:
            continue
        needed.add(v)
        stack += v.op.operand_values
    ops = [o for o in body.ops if o not in gemms and any(r in needed for r in o.result_values)]
    made = {g.result for g in gemms} | {r for o in ops for r in o.result_values}
    reads = list(dict.fromkeys(v for o in ops for v in o.operand_values if v not in made))
    shape = anchor.result.type.shape
    if not from_anchor or any(r.dtype.value != "f32" or not _same_shape(r.type.shape, shape)
                              for r in results):
        raise EmitError(op, "the tile epilogue results must be f32 values of the matmul's "
                            f"shape computed from it, got {[str(r.type) for r in results]}")
    return ops, reads, results


def render_tile_epilogue(op: Op, anchor: Op, target: HostTarget | None = None,
                         lanes: int | None = None, exported: bool = False,
                         sibling: Op | None = None) -> tuple[str, str, list[Value]]:
    """(name, module text, operand values) of the tile function `void @NAME(ptr %c, i64 %ldc,
    i64 %row0, i64 %col0, i64 %mr, i64 %nr, ptr %args)` for a matmul kernel's epilogue (ABI in
    docs/CPU_BACKEND.md; `c` points at C[row0, col0]). The epilogue is compiled as an
    elementwise loop kernel over the mr x nr tile (the anchor value is its first operand, read
    from C; the kernel's first result is written back there, further results to their own
    outputs, whose (pointer, row stride, column stride) follow the operands' in `args`), which
    the tile function calls with an args block it builds. The text brings its own declarations
    and vmath functions. `exported`: the tile function is public, for a module of its own
    called through a pointer, instead of internal (inlined into the GEMM module that includes
    the text).

    `sibling`: a second GEMM of the body on the same rows, computed by the same (dual) GEMM
    (`threads.dual_sgemm`): each block of C then holds the anchor's columns in its first half
    and the sibling's in its second, and `col0` / `nr` count C's columns, twice the result's.
    The epilogue reads both halves and writes the first result to the first output in `args`
    (after the operands) instead of back into C, at result column col0 / 2."""
    lanes = lanes or default_lanes(default_engine(target).target)
    ops, reads, results = _epilogue_ops(op, anchor, sibling)
    if anchor.result.type.rank < 2:
        raise EmitError(op, "a tile epilogue maps a 2-D (or batched) matmul result onto itself")
    values = [anchor.result, *([sibling.result] if sibling else []), *reads]
    body = Block([v.type for v in values])
    mapping = dict(zip(values, body.args))
    for o in ops:
        body.append(o.clone([mapping[v] for v in o.operand_values], mapping))
    body.append(op_class("kernel.yield")([mapping[r] for r in results]))
    kernel = op_class("kernel.fused")(Block([v.type for v in values]).args,
                                      {"kind": "elementwise"}, [r.type for r in results],
                                      [Region([body])])
    key = canonical_text(kernel) + f"|tile|{lanes}" + ("|dual" if sibling else "")
    name = f"lmc_tile_epi_{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    text = _tile_texts.get((name, exported))
    if text is None:
        plan = Plan(kernel)
        rows = _LoopWriter(plan, name + "_rows", lanes, "internal").render()
        wrapper = _tile_wrapper(name, plan, reads, len(results) - 1,
                                "" if exported else "internal ", sibling is not None)
        text = _tile_texts.setdefault((name, exported),
                                      emit.module_text([rows, wrapper], {lanes}))
    return name, text, reads


# Rendered tile epilogue modules by (name, exported): the name hashes the body's canonical text,
# which decides the module text. A warm compile (a cache hit) rebuilds each GEMM's epilogue to
# find its object code, and rendering it is ~3 ms of Python per GEMM.
_tile_texts: dict[tuple[str, bool], str] = {}


def _tile_wrapper(name: str, plan: Plan, reads: list[Value], extra_results: int,
                  linkage: str, dual: bool = False) -> str:
    """The tile function: the loop kernel's args block for rows 0..mr of the tile, all row
    strides on the last outer axis, then one call (LLVM inlines it). `dual`: C's block holds
    two operands side by side (see `render_tile_epilogue`)."""
    r = plan.outer_rank
    n_words = r + 1 + (len(reads) + 2 + dual + extra_results) * (r + 2)
    w = FunctionWriter(f"{linkage}void @{name}(ptr %c, i64 %ldc, i64 %row0, i64 %col0, "
                       "i64 %mr, i64 %nr, ptr %args)")
    block = w.slot(f"[{n_words} x i64]", hint="words")
    cols, col0 = (w.op("lshr", "%nr", "1"), w.op("lshr", "%col0", "1")) if dual else \
        ("%nr", "%col0")
    words = ["1"] * (r - 1) + ["%mr", cols]
    c = w.value("ptrtoint ptr %c to i64")

    def passed(k: int, dtype: DType) -> tuple[str, str, str]:
        """The k-th (pointer, row stride, column stride) of `args`, moved to the tile."""
        ptr, rs, cs = (w.load("ptr" if f == 0 else "i64", w.gep("%args", str(3 * k + f), "i64"),
                              8) for f in range(3))
        start = w.op("add", w.op("mul", "%row0", rs), w.op("mul", col0, cs))
        return w.value(f"ptrtoint ptr {w.gep(ptr, start, STORAGE[dtype])} to i64"), rs, cs

    operands = [(c, "%ldc", "1")]
    if dual:  # the sibling's half of the block, right after the anchor's
        operands.append((w.op("add", c, w.op("mul", cols, "4")), "%ldc", "1"))
    operands += [passed(k, v.dtype) for k, v in enumerate(reads)]
    outputs = [passed(len(reads), DType.f32)] if dual else [(c, "%ldc", "1")]
    outputs += [passed(len(reads) + dual + k, DType.f32) for k in range(extra_results)]
    for base, rs, cs in [*operands, *outputs]:
        words += [base, *(["0"] * (r - 1)), rs, cs]
    for i, word in enumerate(words):
        w.store("i64", word, w.gep(block, str(i), "i64"), 8)
    w.emit(f"call void @{name}_rows(i64 0, i64 %mr, ptr {block}, ptr null)")
    return w.text()
