"""Column reductions: `kernel.fused {kind = reduction}` bodies whose reductions keep the last
axis — bias and LayerNorm-weight gradients (sum over [B, T] of f32[B, T, C], of a fused product
like g * xhat), GQA's sum over the group axis of [B, Hkv, G, T, D]. The trailing-axis scheduler
(loops.py) cannot run them: its rows are the reduced elements, here the reduced elements are a
column of the data.

The kernel walks work items (a kept outer index × a chunk of UNROLL vectors along the last
axis); each item keeps one accumulator vector per reduction and chunk vector, loops over every
reduced index (one nested loop per reduced axis), computes the elementwise prologue there and
accumulates, then runs the epilogue (ops on the reduced values: an optimizer update, a scale) on
the finished vectors and stores. Lanes are columns, so a tail needs masked loads and stores but
no horizontal reduction, and items split over the cores without changing any sum's order.

ABI (the range ABI of docs/CPU_BACKEND.md): `void @NAME(i64 %start, i64 %end, ptr %args, ptr
%scratch)` runs items [start, end); args = the r domain sizes, then per operand (body arguments,
then results) its base pointer and r element strides, 0 along broadcast axes. Operands that vary
along the last axis must have unit stride there (the launcher copies those that do not).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from lmc.errors import ShapeError
from lmc.ir.core import Block, Op, Value
from lmc.ir.types import normalize_axis

from . import emit
from .emit import EMIT, STORAGE, EmitError, vtype
from .irtext import FunctionWriter
from .jit import HostTarget, default_engine
from .launch import MIN_WORK_PER_THREAD, _cores, _eval_shape, empty_domain
from .loops import (
    REDUCE_KIND,
    _right_aligned,
    _same_shape,
    axis_maps,
    canonical_text,
    decompose,
)
from .loops import default_lanes as _default_lanes
from .pool import pool as core_pool
from .pool import range_task

UNROLL = 4  # vectors per work item: independent accumulators, and 4 x 32 B of each row read


def reduction_axes(op: Op) -> tuple[int, ...]:
    """The normalized, sorted axes a tensor.sum/mean/max/min reduces."""
    rank = op.x.type.rank
    return tuple(sorted(normalize_axis(a, rank) for a in op.axes)) if op.axes else \
        tuple(range(rank))


def is_column_body(body: Block) -> bool:
    """Do the body's reductions keep the last axis (so loops.py cannot schedule them)?"""
    reds = [o for o in body.ops if o.name in REDUCE_KIND]
    return bool(reds) and all(o.x.type.rank - 1 not in reduction_axes(o) for o in reds)


@dataclass
class ColumnOperand:
    value: Value
    amap: tuple[int | None, ...]  # the domain axis of each of its dims (None: broadcast)
    output: bool
    vector: bool  # varies along the last axis: vector loads/stores, else one splatted scalar
    live: bool = True


class ColumnPlan:
    """Domain, reduced axes, axis maps and the two cones (loop and epilogue) of one body."""

    def __init__(self, op: Op):
        self.block = decompose(op.body)
        self.term = self.block.terminator
        self.ops = [o for o in self.block.ops if o is not self.term]
        reds = [o for o in self.ops if o.name in REDUCE_KIND]
        if not reds:
            raise EmitError(op, "a column reduction kernel needs a reduction")
        self.domain = reds[0].x.shape
        self.rank = r = len(self.domain)
        self.axes = reduction_axes(reds[0])
        for red in reds:
            if not _same_shape(red.x.shape, self.domain) or reduction_axes(red) != self.axes:
                raise EmitError(red, f"the reductions of one kernel must reduce axes "
                                     f"{list(self.axes)} of one shape {list(self.domain)}")
        if r - 1 in self.axes or self.domain[-1] == 1:
            raise EmitError(reds[0], "a column reduction keeps a last axis longer than 1")
        self.kept = tuple(a for a in range(r) if a not in self.axes)
        self.reds = reds
        self._post()
        self._axis_maps()
        self.operands = [self._operand(a, False) for a in self.block.args]
        self.operands += [self._operand(v, True) for v in self.term.operand_values]
        self.loop_values = self._cone([r.x for r in reds] + self._outputs(post=False))
        self.epilogue_values = self._cone(self._outputs(post=True), stop=set(self.post_reds))

    def _post(self) -> None:
        """`post`: values computed from a reduction's result (the epilogue)."""
        self.post: set[Value] = set()
        for o in self.ops:
            if o.name in REDUCE_KIND or any(v in self.post for v in o.operand_values):
                self.post.add(o.result)
        self.post_reds = [r.result for r in self.reds]

    def _result_map(self, v: Value) -> tuple:
        r = self.rank
        if v not in self.post:
            if len(v.shape) > r:
                raise EmitError(self.term, f"result {v.type} is larger than the domain")
            return _right_aligned(v.shape, tuple(range(r)))
        if len(v.shape) == r:  # keepdim form: size 1 along the reduced axes
            if any(v.shape[a] != 1 for a in self.axes):
                raise EmitError(self.term, f"result {v.type} applies a reduced value back to "
                                           "the data (a column kernel reads it once)")
            return _right_aligned(v.shape, tuple(None if a in self.axes else a
                                                 for a in range(r)))
        return _right_aligned(v.shape, self.kept)

    def _axis_maps(self) -> None:
        """Backwards from the results, as loops.Plan; reduced values never span reduced axes."""
        identity = tuple(range(self.rank))

        def no_reduced_axes(v: Value, m: tuple, op: Op) -> None:
            if v in self.post and any(a in self.axes for a in m if a is not None):
                raise EmitError(op, "a reduced value is broadcast back along a reduced axis "
                                    "(a column kernel reads each element once)")

        self.amap = axis_maps(self.term, self.ops, self._result_map,
                              lambda op, res: _right_aligned(op.x.shape, identity), "column",
                              no_reduced_axes)

    def _operand(self, v: Value, output: bool) -> ColumnOperand:
        m = self.amap.get(v, ())
        return ColumnOperand(v, m, output, self.rank - 1 in m, v in self.amap)

    def _outputs(self, post: bool) -> list[Value]:
        return [v for v in self.term.operand_values if (v in self.post) == post]

    def _cone(self, roots: list[Value], stop: set[Value] = frozenset()) -> list[Value]:
        """Every op result `roots` need (in block order), not looking through `stop`."""
        need: set[Value] = set()
        stack = list(roots)
        while stack:
            v = stack.pop()
            if v in need:
                continue
            need.add(v)
            if v.op is not None and v not in stop:
                stack += v.op.operand_values
        return [o.result for o in self.ops if o.result in need and o.result not in stop]


# ---- code generation ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Vector:
    """One vector of an item: its first column (an element offset from the item's) and the
    lanes that are in the row (None: all)."""

    column: str
    mask: str | None = None


class _ColumnWriter:
    """Renders the item loop of a ColumnPlan at `lanes` lanes."""

    def __init__(self, plan: ColumnPlan, name: str, lanes: int):
        self.p, self.n = plan, lanes
        self.w = FunctionWriter(f"void @{name}(i64 %start, i64 %end, ptr %args, ptr %scratch)")

    def render(self) -> str:
        w, p = self.w, self.p
        r = p.rank
        self.sizes = [self._word(d) for d in range(r)]
        self.base, self.strides = [], []
        for j, o in enumerate(p.operands):
            at = r + j * (r + 1)
            w.emit(f"; operand {j}: {'result' if o.output else 'argument'} {o.value.type}, "
                   f"{'vector' if o.vector else 'splat'}{'' if o.live else ', unused'}")
            self.base.append(self._word(at, "ptr") if o.live else None)
            self.strides.append([self._word(at + 1 + d) for d in range(r)] if o.live else None)
        chunk = self.n * UNROLL
        self.L = self.sizes[r - 1]
        chunks = w.op("udiv", w.op("add", self.L, str(chunk - 1)), str(chunk))
        with w.loop("%start", "%end", 1, "item") as item:
            outer, c = w.op("udiv", item, chunks), w.op("urem", item, chunks)
            col0 = w.op("mul", c, str(chunk))
            offs = self._item_offsets(outer, col0)
            left = w.op("sub", self.L, col0)
            with w.if_else(w.value(f"icmp sge i64 {left}, {chunk}"), "full") as otherwise:
                self._item(offs, [_Vector(str(u * self.n)) for u in range(UNROLL)])
                otherwise()
                # The row's last chunk: one masked vector at a time, as many as it has.
                count = w.op("udiv", w.op("add", left, str(self.n - 1)), str(self.n))
                with w.loop("0", count, 1, "tail") as v:
                    at = w.op("mul", v, str(self.n))
                    mask = emit.lane_mask(w, w.op("sub", left, at), self.n)
                    self._item(offs, [_Vector(at, mask)])
        return w.text()

    def _word(self, i: int, ty: str = "i64") -> str:
        return self.w.load(ty, self.w.gep("%args", str(i), "i64"), 8)

    def _item_offsets(self, outer: str, col0: str) -> list[str | None]:
        """Each operand's element offset at (kept outer index, column col0, reduced index 0)."""
        w, p = self.w, self.p
        idx, rest = {}, outer
        kept_outer = p.kept[:-1]
        for k, a in enumerate(reversed(kept_outer)):
            last = k == len(kept_outer) - 1
            idx[a] = rest if last else w.op("urem", rest, self.sizes[a])
            if not last:
                rest = w.op("udiv", rest, self.sizes[a])
        idx[p.rank - 1] = col0
        offs = []
        for j, o in enumerate(p.operands):
            off = "0"
            for a, i in idx.items() if o.live else ():
                off = w.op("add", off, w.op("mul", i, self.strides[j][a]))
            offs.append(off if o.live else None)
        return offs

    def _item(self, offs: list, vecs: list[_Vector]) -> None:
        """Accumulate `vecs` (columns of the item) over every reduced index, then the epilogue
        and the stores."""
        w, p, n = self.w, self.p, self.n
        accs = {red: [w.slot(vtype(red.x.dtype, n), emit.reduce_identity(
            REDUCE_KIND[red.name], red.x.dtype, n), "acc") for _ in vecs] for red in p.reds}
        self._reduced_loops(list(p.axes), list(offs), lambda at: self._accumulate(
            at, vecs, accs))
        count = None
        for u, vec in enumerate(vecs):
            env: dict[Value, str] = {}
            for red in p.reds:
                v = w.load(vtype(red.x.dtype, n), accs[red][u])
                if red.name == "tensor.mean":
                    count = count or self._count(red.x.dtype)
                    v = w.value(f"fdiv {vtype(red.x.dtype, n)} {v}, {count}")
                env[red.result] = v
            self._compute(p.epilogue_values, env, offs, vec)
            self._store_outputs(True, env, offs, vec)

    def _count(self, dt) -> str:
        """The number of reduced elements, as a splat of the mean's float type."""
        count = "1"
        for a in self.p.axes:
            count = self.w.op("mul", count, self.sizes[a])
        ty = emit.scalar_type(dt)
        return emit.splat(self.w, ty, self.w.value(f"sitofp i64 {count} to {ty}"), self.n)

    def _reduced_loops(self, axes: list[int], offs: list, body) -> None:
        """One loop per reduced axis, outermost first, each stepping the operand offsets."""
        if not axes:
            body(offs)
            return
        w, a = self.w, axes[0]
        with w.loop("0", self.sizes[a], 1, f"r{a}") as i:
            inner = [None if off is None else w.op("add", off, w.op("mul", i, self.strides[j][a]))
                     for j, off in enumerate(offs)]
            self._reduced_loops(axes[1:], inner, body)

    def _accumulate(self, offs: list, vecs: list[_Vector], accs: dict) -> None:
        w, p, n = self.w, self.p, self.n
        for u, vec in enumerate(vecs):
            env: dict[Value, str] = {}
            self._compute(p.loop_values, env, offs, vec)
            for red in p.reds:
                dt, acc = red.x.dtype, accs[red][u]
                x = self._value(red.x, env, offs, vec)
                old = w.load(vtype(dt, n), acc)
                w.store(vtype(dt, n), emit.reduce_combine(w, REDUCE_KIND[red.name], dt, old, x,
                                                          n), acc)
            self._store_outputs(False, env, offs, vec)

    def _compute(self, values: list[Value], env: dict, offs: list, vec: _Vector) -> None:
        for v in values:
            ins = [self._value(x, env, offs, vec) for x in v.op.operand_values]
            try:
                fn = EMIT[v.op.name]
            except KeyError:
                raise EmitError(v.op, "has no CPU emitter") from None
            env[v] = fn(self.w, v.op, ins, self.n)

    def _value(self, v: Value, env: dict, offs: list, vec: _Vector) -> str:
        """An op result from env, or a body argument loaded at the vector."""
        if v not in env:
            env[v] = self._load(v.index, offs, vec)
        return env[v]

    def _pointer(self, j: int, offs: list, vec: _Vector) -> str:
        o = self.p.operands[j]
        off = self.w.op("add", offs[j], vec.column) if o.vector else offs[j]
        return self.w.gep(self.base[j], off, STORAGE[o.value.dtype])

    def _load(self, j: int, offs: list, vec: _Vector) -> str:
        o = self.p.operands[j]
        ptr = self._pointer(j, offs, vec)
        if o.vector:
            return emit.vload(self.w, o.value.dtype, ptr, self.n, vec.mask)
        return emit.splat_load(self.w, o.value.dtype, ptr, self.n)

    def _store_outputs(self, post: bool, env: dict, offs: list, vec: _Vector) -> None:
        first = len(self.p.block.args)
        for k, v in enumerate(self.p.term.operand_values):
            if (v in self.p.post) == post:
                x = self._value(v, env, offs, vec)
                emit.vstore(self.w, v.dtype, x, self._pointer(first + k, offs, vec), self.n,
                            vec.mask)


# ---- compile and launch ------------------------------------------------------------------------

_kernels: dict[tuple, ColumnKernel] = {}
_kernels_lock = threading.Lock()


def compile_column_kernel(op: Op, target: HostTarget | None = None,
                          lanes: int | None = None) -> ColumnKernel:
    """The native column-reduction kernel of a `kernel.fused {reduction}` op (EmitError for a
    body it cannot run), compiled once per process for each distinct body."""
    engine = default_engine(target)
    lanes = lanes or _default_lanes(engine.target)
    text = canonical_text(op)
    key = (text, target, lanes)
    if key in _kernels:
        return _kernels[key]
    plan = ColumnPlan(op)
    name = f"lmc_cols_{hashlib.sha1(f'{text}|{lanes}'.encode()).hexdigest()[:16]}"
    body = _ColumnWriter(plan, name, lanes).render()
    ir = emit.module_text([f"; column reduction kernel, {lanes} lanes\n; " +
                           text.replace("\n", "\n; "), body], {lanes})
    module = engine.add_ir(name, ir)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = module.function(name, None, i64, i64, ptr, ptr)
    with _kernels_lock:
        return _kernels.setdefault(key, ColumnKernel(plan, name, ir, lanes, fn))


@dataclass
class _Launch:
    """One layout of operands: the args block (pointers patched per call), items, copies."""

    words: np.ndarray
    items: int
    work: int
    copies: list[int]  # operands copied to C order first (non-unit stride along the last axis)


@dataclass
class ColumnKernel:
    plan: ColumnPlan
    name: str
    llvm_ir: str
    lanes: int
    fn: object = field(repr=False)

    def __post_init__(self) -> None:
        self._address = ctypes.cast(self.fn, ctypes.c_void_p).value
        self._layouts: dict[tuple, _Launch | None] = {}
        self._lock = threading.Lock()

    def run(self, inputs: list[np.ndarray], outputs: list[np.ndarray],
            threads: int | None = None, env: dict[str, int] | None = None) -> None:
        """outputs[...] = the body on inputs (any strides; outputs preallocated)."""
        p = self.plan
        arrays = [np.asarray(x) for x in inputs] + list(outputs)
        if len(arrays) != len(p.operands):
            raise ShapeError(f"column kernel takes {len(p.operands)} operands, got "
                             f"{len(arrays)}")
        key = tuple((a.shape, a.strides, a.dtype) for a in arrays)
        if key not in self._layouts:
            if len(self._layouts) > 256:
                self._layouts.clear()
            self._layouts[key] = self._layout(arrays, env or {})
        lay = self._layouts[key]
        if lay is None:
            empty_domain(p.block, arrays[:len(p.block.args)], list(outputs), env)
            return
        back = []
        for j in lay.copies:
            tmp = np.ascontiguousarray(arrays[j])
            if p.operands[j].output:
                back.append((arrays[j], tmp))
            arrays[j] = tmp
        with self._lock:  # the args block is shared by the calls of this layout
            words = lay.words
            r = p.rank
            for j, a in enumerate(arrays):
                words[r + j * (r + 1)] = a.ctypes.data
            n = max(1, min(threads or _cores(), lay.items, lay.work // MIN_WORK_PER_THREAD))
            if n == 1:
                self.fn(0, lay.items, words.ctypes.data, None)
            else:
                bounds = [lay.items * t // n for t in range(n + 1)]
                address = words.ctypes.data
                core_pool().run([range_task(self._address, bounds[t], bounds[t + 1], address,
                                            0, words) for t in range(n)])
        for dst, tmp in back:
            dst[...] = tmp

    def _layout(self, arrays: list[np.ndarray], env: dict[str, int]) -> _Launch | None:
        p = self.plan
        env = dict(env)
        for o, a in zip(p.operands, arrays):
            for d, dim in enumerate(o.value.shape):
                if isinstance(dim, str) and dim.isidentifier() and d < a.ndim:
                    env.setdefault(dim, a.shape[d])
        domain = _eval_shape(p.domain, env)
        for j, (o, a) in enumerate(zip(p.operands, arrays)):
            if a.dtype != o.value.dtype.to_numpy() or \
                    a.shape != _eval_shape(o.value.shape, env):
                raise ShapeError(f"column kernel operand {j}: {a.dtype}{list(a.shape)} does "
                                 f"not match {o.value.type} (symbols {env})")
        if 0 in domain:
            return None
        r = p.rank
        words, copies = list(domain), []
        for j, (o, a) in enumerate(zip(p.operands, arrays)):
            strides = _domain_strides(o, a, r)
            if o.live and o.vector and strides[r - 1] != 1 and domain[r - 1] > 1:
                copies.append(j)
                strides = _domain_strides(o, np.empty(a.shape, a.dtype), r)
            words += [0, *strides]
        outer = math.prod(domain[a] for a in p.kept[:-1])
        items = outer * -(-domain[-1] // (self.lanes * UNROLL))
        return _Launch(np.array(words, np.int64), items, math.prod(domain), copies)

    def llvm_modules(self) -> list[str]:
        return [self.llvm_ir]


def _domain_strides(o: ColumnOperand, a: np.ndarray, rank: int) -> list[int]:
    strides = [0] * rank
    if o.live:
        for d, ax in enumerate(o.amap):
            if ax is not None and a.shape[d] != 1:
                strides[ax] = a.strides[d] // a.itemsize
    return strides
