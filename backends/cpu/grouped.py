"""`moe.grouped_weight_grad` on the CPU: out[e] = x[lo:hi]ᵀ · g[lo:hi] for each expert's rows
(lo, hi = offsets[e], offsets[e+1]), the expert-weight gradient of a grouped matmul.

One GEMM per expert with A = the transposed view of x's rows (no copy: the packing reads any
strides) and K = the expert's row count, all run by the grouped driver's machinery (threads.py):
per thread a list of job records, each expert split over the cores, one native call per thread.
An expert without rows gets K = 0, which the driver turns into zeros.
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np

from lmc.errors import ShapeError

from .gemm import compile_gemm
from .jit import HostTarget
from .pool import cpu_threads
from .threads import (
    F32,
    _as_f32,
    _elements,
    _expert_bounds,
    _Layout,
    _unit_columns,
    _via_contiguous,
    _writable_out,
    launch,
    schedule,
)


def grouped_weight_grad(x: np.ndarray, g: np.ndarray, offsets: np.ndarray, *,
                        out: np.ndarray | None = None, threads: int | None = None,
                        target: HostTarget | None = None) -> np.ndarray:
    """x [M, d], g [M, f] (rows sorted by expert, any strides), offsets [E+1] -> [E, d, f]."""
    x, g = _as_f32(x), _as_f32(g)
    if x.ndim != 2 or g.ndim != 2 or x.shape[0] != g.shape[0]:
        raise ShapeError(f"moe.grouped_weight_grad: needs x [M, d] and g [M, f], got "
                         f"{list(x.shape)} and {list(g.shape)}")
    (m, d), f = x.shape, g.shape[1]
    n_experts = np.asarray(offsets).shape[0] - 1
    bounds = _expert_bounds(offsets, n_experts, m)
    out = _writable_out(out, (n_experts, d, f), "moe.grouped_weight_grad")
    if out.size == 0:
        return out
    if not _unit_columns(out):
        return _via_contiguous(out, 0.0, lambda tmp: grouped_weight_grad(
            x, g, offsets, out=tmp, threads=threads, target=target))
    kernel = compile_gemm(None, (), target)
    xt = x.T  # A of every expert: [d, rows], read through strides
    layout = _Layout(_elements(xt.strides), _elements(g.strides), out.strides[1] // F32, False)
    experts = list(pairwise(bounds))
    sizes = [(d, f, hi - lo) for lo, hi in experts]
    plan = _whole_experts(sizes, threads or cpu_threads()) or \
        schedule(sizes, kernel.config, threads or cpu_threads())
    records = [[layout.job(block, sizes[e][2], _ptrs(x, g, out, e, experts[e][0]), (0, 0), [])
                for e, block in share] for share in plan]
    launch(kernel, layout, records, 1.0, 0.0, 0)
    return out


def _whole_experts(sizes: list[tuple[int, int, int]], threads: int,
                   slack: float = 1.15) -> list[list[tuple[int, tuple[int, ...]]]] | None:
    """Whole experts per thread, the largest first onto the least loaded thread, when that
    balances within `slack` of an even split: every expert's output is [d, f], so splitting
    one over the threads would only make each of them pack its xᵀ rows again."""
    loads = [0] * max(1, threads)
    plan: list[list[tuple[int, tuple[int, ...]]]] = [[] for _ in loads]
    for e in sorted(range(len(sizes)), key=lambda e: -sizes[e][2]):
        t = loads.index(min(loads))
        d, f, k = sizes[e]
        plan[t].append((e, (0, d, 0, f)))
        loads[t] += max(k, 1)
    return plan if max(loads) <= slack * sum(loads) / len(loads) else None


def _ptrs(x: np.ndarray, g: np.ndarray, out: np.ndarray, e: int, lo: int):
    """(A, B, C) base addresses of expert e: x's and g's first row of the expert, out[e]."""
    return (x.ctypes.data + lo * x.strides[0], g.ctypes.data + lo * g.strides[0],
            out.ctypes.data + e * out.strides[0])
