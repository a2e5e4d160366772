"""The launcher of loop kernels (loops.py): numpy operands of any strides → the i64 args block
of the ABI in docs/CPU_BACKEND.md, dims merged where every operand allows, rows split over the
cores. Kept apart from the code generator: this is the per-call path, that the compile path."""
from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import as_strided

from lmc.errors import ShapeError
from lmc.ir.types import eval_dim

from .emit import COSTLY
from .pool import F32, CorePool, cpu_threads, range_task, thread_buffer
from .pool import pool as core_pool

if TYPE_CHECKING:
    from .loops import Operand, Plan

# Work (elements x (passes + transcendental ops)) per thread below which a second core costs
# more than it saves: waking a worker takes 10-100 us here, a pass ~0.1-0.3 ns per element.
# Measured: LayerNorm 512x512 (786K) is faster on one core, softmax 4096x128 (2M) on two.
MIN_WORK_PER_THREAD = 1 << 19


def _scratch(nbytes: int) -> int:
    """This thread's scratch for a loop kernel run here, as an address (0 for none)."""
    return thread_buffer(-(-nbytes // F32), "loops").ctypes.data if nbytes else 0


def _collapse(sizes, strides) -> int | None:
    """The one stride that walks the row-major flattening of these dims, or None."""
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    for (_, s0), (n1, s1) in pairwise(dims):
        if s0 != s1 * n1:
            return None
    return dims[-1][1] if dims else 1


def _merge(sizes, strides: list[list[int]], keep_last: bool):
    """Drop size-1 dims and merge neighbours every operand walks as one (numpy's coalescing).
    With keep_last the last dim (L) is never dropped, though it may absorb outer dims."""
    dims = [(n, [s[d] for s in strides]) for d, n in enumerate(sizes)
            if n != 1 or (keep_last and d == len(sizes) - 1)]
    merged: list[tuple[int, list[int]]] = []
    for n, ss in dims:
        if merged and all(ps == s * n for ps, s in zip(merged[-1][1], ss)):
            merged[-1] = (merged[-1][0] * n, ss)
        else:
            merged.append((n, ss))
    return [n for n, _ in merged], [[ss[j] for _, ss in merged] for j in range(len(strides))]


def _eval_shape(shape, env: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else env[d] if d in env else eval_dim(d, env)
                 for d in shape)


@dataclass
class _Layout:
    """How one combination of operand shapes and strides launches; cached per kernel, since
    a model calls each kernel with the same layouts again and again."""

    words: list[int]  # the i64 args block, base pointers left 0
    rows: int
    L: int
    inner: list[int]
    # (operand, view shape, view byte strides, output?): operands copied to C order first
    copies: list[tuple[int, tuple, tuple, bool]] = field(default_factory=list)
    _blocks: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)

    def block(self) -> tuple[np.ndarray, int]:
        """This thread's args block for the layout and its address (made once: reading an
        array's address costs microseconds)."""
        key = threading.get_ident()
        if key not in self._blocks:
            words = np.array(self.words, np.int64)
            self._blocks[key] = (words, words.ctypes.data)
        return self._blocks[key]


@dataclass
class LoopKernel:
    """A compiled loop kernel; `run` launches it on numpy arrays of any strides."""

    plan: Plan
    name: str
    llvm_ir: str
    lanes: int
    fn: object = field(repr=False)

    def __post_init__(self) -> None:
        """What every launch needs, precomputed: small kernels are launch-bound."""
        self._address = ctypes.cast(self.fn, ctypes.c_void_p).value
        p = self.plan
        self._dtypes = [o.value.dtype.to_numpy() for o in p.operands]
        self._shapes = [o.value.shape for o in p.operands]
        seen: set[str] = set()
        self._bind = []  # (operand, dim, symbol): the first operand dim of each plain symbol
        for j, shape in enumerate(self._shapes):
            for d, dim in enumerate(shape):
                if isinstance(dim, str) and dim.isidentifier() and dim not in seen:
                    seen.add(dim)
                    self._bind.append((j, d, dim))
        self._n_in, self._n_out = len(p.block.args), len(p.term.operand_values)
        r = p.outer_rank
        self._ptr_words = [r + 1 + j * (r + 2) for j in range(len(p.operands))]
        self._scratch_bytes = p.scratch_bytes
        self._work = max(1, p.n_passes) + sum(v.op is not None and v.op.name in COSTLY
                                              for vs in p.compute.values() for v in vs)
        self._layouts: dict[tuple, _Layout | None] = {}

    def run(self, inputs: list[np.ndarray], outputs: list[np.ndarray],
            threads: int | None = None, pool: CorePool | None = None,
            env: dict[str, int] | None = None) -> None:
        """outputs[...] = the body on inputs. Inputs may be any views (stride-0 broadcasts
        included); outputs are preallocated arrays of the result shapes. `env` binds symbols
        that no operand has as a plain dim (a kernel seeing only `2*T` needs T)."""
        if len(inputs) != self._n_in or len(outputs) != self._n_out:
            raise ShapeError(f"loop kernel takes {self._n_in} inputs and {self._n_out} outputs, "
                             f"got {len(inputs)} and {len(outputs)}")
        arrays = [x if isinstance(x, np.ndarray) else np.asarray(x) for x in inputs]
        arrays += outputs
        key = tuple((a.shape, a.strides, a.dtype) for a in arrays)
        if key not in self._layouts:
            if len(self._layouts) > 256:
                self._layouts.clear()
            self._layouts[key] = self._layout(arrays, env or {})
        lay = self._layouts[key]
        if lay is None:  # an empty domain: a reduction over no elements still has results
            empty_domain(self.plan.block, arrays[:self._n_in], outputs, env)
            return
        back = []
        for j, shape, strides, output in lay.copies:
            view = as_strided(arrays[j], shape, strides)
            arrays[j] = np.empty(shape, view.dtype) if output else np.ascontiguousarray(view)
            if output:
                back.append((view, arrays[j]))
        words, address = lay.block()
        for j, a in enumerate(arrays):
            words[self._ptr_words[j]] = a.ctypes.data
        work = lay.rows * max(lay.L, 1) * self._work
        n = max(1, min(threads or _cores(), work // MIN_WORK_PER_THREAD))
        if n == 1:
            self._call(address, 0, lay.rows, lay.L)
        else:
            (pool or core_pool()).run(self._jobs(lay, words, address, arrays, n))
        for dst, tmp in back:
            dst[...] = tmp

    def _layout(self, arrays: list[np.ndarray], env: dict[str, int]) -> _Layout | None:
        """Check the operands against the body's types; derive the launch layout."""
        env = {**env, **{name: arrays[j].shape[d] for j, d, name in self._bind
                         if d < arrays[j].ndim}}
        try:
            domain = _eval_shape(self.plan.domain, env)
            bad = [j for j, a in enumerate(arrays) if a.dtype != self._dtypes[j] or
                   a.shape != _eval_shape(self._shapes[j], env)]
        except ShapeError:
            bad = [0]
        if bad:
            j = bad[0]
            raise ShapeError(f"loop kernel operand {j}: {arrays[j].dtype}{list(arrays[j].shape)}"
                             f" does not match {self.plan.operands[j].value.type} (symbols "
                             f"{env})")
        if 0 in domain:
            return None
        copies, strides = [], []
        for j, (o, a) in enumerate(zip(self.plan.operands, arrays)):
            if o.live and any(st % a.itemsize for st in a.strides):
                if o.output:
                    raise ShapeError("loop kernel outputs need element-aligned strides")
                copies.append((j, a.shape, a.strides, False))
                a = np.lib.stride_tricks.as_strided(a, a.shape, _c_strides(a.shape, a.itemsize))
            strides.append(_domain_strides(o, a, domain))
        return self._collapse_rows(arrays, strides, domain, copies)

    def _collapse_rows(self, arrays, strides, domain, copies) -> _Layout:
        """Trailing reduced dims -> L (copying an operand whose layout cannot be flattened);
        elementwise: merge every dim the operands allow, so contiguous data is one long row."""
        p, r = self.plan, self.plan.outer_rank
        if p.reduces or p.k == 0:
            inner = []
            for j, o in enumerate(p.operands):
                s = _collapse(domain[r:], strides[j][r:]) if o.live and o.inner else 0
                if s is None:  # a C-order copy over [its outer dims, all reduced dims]
                    shape = tuple(n if d >= r or strides[j][d] else 1 for d, n in enumerate(domain))
                    copies.append((j, shape, tuple(st * arrays[j].itemsize for st in strides[j]),
                                   o.output))
                    c = _c_strides(shape, 1)
                    strides[j] = [c[d] if shape[d] != 1 else 0 for d in range(len(domain))]
                    s = _collapse(domain[r:], strides[j][r:])
                inner.append(s)
            outer, outer_strides = _merge(domain[:r], [st[:r] for st in strides], False)
            L = math.prod(domain[r:])
        else:
            sizes, merged = _merge(domain, strides, True)
            outer, outer_strides, L = sizes[:-1], [st[:-1] for st in merged], sizes[-1]
            inner = [st[-1] for st in merged]
        if L <= 1:
            inner = [1 if o.inner else st for o, st in zip(p.operands, inner)]
        pad = r - len(outer)
        outer = [1] * pad + outer
        words = list(outer) + [L]
        for st, i in zip(outer_strides, inner):
            words += [0, *([0] * pad + st), i]
        return _Layout(words, math.prod(outer), L, inner, copies)

    def _jobs(self, lay: _Layout, words: np.ndarray, address: int, arrays, n: int) -> list:
        """Row ranges, one per thread; an elementwise kernel with fewer rows than threads
        splits its long rows instead."""
        rows, L, lanes = lay.rows, lay.L, self.lanes
        if n > 1 and rows < n and not self.plan.reduces and n * lanes <= L:
            chunk = -(-L // n // lanes) * lanes
            jobs = []
            for l0 in range(0, L, chunk):
                part = words.copy()
                part[self.plan.outer_rank] = min(chunk, L - l0)
                for j, (a, i) in enumerate(zip(arrays, lay.inner)):
                    part[self._ptr_words[j]] += l0 * i * a.itemsize
                jobs.append(self._job(part.ctypes.data, 0, rows, min(chunk, L - l0), part))
            return jobs
        n = min(n, rows)
        bounds = [rows * t // n for t in range(n + 1)]
        return [self._job(address, bounds[t], bounds[t + 1], L, words) for t in range(n)]

    def _job(self, address: int, start: int, end: int, L: int, keep: np.ndarray):
        """A native job (a pool worker starts it in ~13 us, a Python job in ~90 us); `keep` is
        the args block at `address`, alive until the job has run."""
        nbytes = self._scratch_bytes * (-(-L // self.lanes) * self.lanes)
        return range_task(self._address, start, end, address, nbytes, keep)

    def _call(self, address: int, start: int, end: int, L: int) -> None:
        """Run rows [start, end) here, in the calling thread."""
        self.fn(start, end, address, _scratch(self._scratch_bytes * (-(-L // self.lanes)
                                                                     * self.lanes)))


def empty_domain(block, inputs: list[np.ndarray], outputs: list[np.ndarray],
                 env: dict[str, int] | None) -> None:
    """Outputs of a kernel whose domain has no elements: those that are not empty themselves
    (a sum over a zero-length axis is 0) are the interpreter's."""
    if all(o.size == 0 for o in outputs):
        return
    from lmc.backends.reference.interpreter import bind_symbols, run_block
    env = {**bind_symbols([a.type for a in block.args], inputs), **(env or {})}
    for out, value in zip(outputs, run_block(block, inputs, env)):
        out[...] = value


_core_count: list[int] = []


def _cores() -> int:
    if not _core_count:
        _core_count.append(cpu_threads())
    return _core_count[0]


def _c_strides(shape, itemsize: int) -> tuple[int, ...]:
    """C-order strides (in units of itemsize) of shape."""
    out, acc = [], itemsize
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def _domain_strides(o: Operand, a: np.ndarray, domain) -> list[int]:
    """Element strides of operand `a` along each domain axis (0 where it is broadcast)."""
    strides = [0] * len(domain)
    if o.live:
        for d, ax in enumerate(o.amap):
            if ax is not None and a.shape[d] != 1:
                strides[ax] = a.strides[d] // a.itemsize
    return strides


