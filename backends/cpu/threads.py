"""Multi-core GEMM: a persistent thread pool; each thread runs the JIT kernel on its own block of
C with its own packed-panel buffers. The kernel is a ctypes CFUNCTYPE, which releases the GIL, so
the Python threads really run in parallel.
"""
from __future__ import annotations

import ctypes
import os
import queue
import threading
from concurrent.futures import Future

import numpy as np

from lmc.errors import ShapeError

from .gemm import ColumnBias, EpilogueOp, GemmConfig, GemmKernel, compile_gemm
from .jit import HostTarget

# Waking a worker on the other core costs ~10-100 us on this VM, and the second core starts with
# cold caches, so each thread needs ~100+ us of work: at 256^3 (16M MACs) 2 threads measured 140
# GFLOP/s against 185 for one with AVX-512. Scaled by vector width (AVX2 does half per second).
MIN_MACS_PER_THREAD_PER_LANE = 1 << 20
F32 = 4  # bytes

_local = threading.local()


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


try:
    _sched_getcpu = ctypes.CDLL(None).sched_getcpu
except (OSError, AttributeError):  # not glibc/Linux: no preference of core
    _sched_getcpu = None


def _current_cpu() -> int:
    return _sched_getcpu() if _sched_getcpu else -1


class CorePool:
    """One worker thread pinned to each core, each with its own queue. The caller runs the first
    job itself and hands the others to workers on *other* cores: an unpinned worker woken by the
    caller lands on the caller's core (wake-affine) and time-slices with it for the ~100 us the
    scheduler takes to migrate it, and a shared queue let one worker take both jobs."""

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        self._queues = [queue.SimpleQueue() for _ in self.cpus]
        for cpu, jobs in zip(self.cpus, self._queues):
            threading.Thread(target=self._serve, args=(cpu, jobs), daemon=True,
                             name=f"lmc-cpu{cpu}").start()

    @staticmethod
    def _serve(cpu: int, jobs: queue.SimpleQueue) -> None:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpu})
        while True:
            fn, future = jobs.get()
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def run(self, jobs: list) -> None:
        """Run the callables in `jobs` in parallel (the first in this thread); re-raise errors."""
        here = _current_cpu()
        others = [q for cpu, q in zip(self.cpus, self._queues) if cpu != here] or self._queues
        futures = []
        for i, fn in enumerate(jobs[1:]):
            futures.append(Future())
            others[i % len(others)].put((fn, futures[-1]))
        jobs[0]()
        for future in futures:
            future.result()


_pool: CorePool | None = None
_pool_lock = threading.Lock()


def pool() -> CorePool:
    """The process-wide pool (created on first use; daemon threads live until exit)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = CorePool()
    return _pool


def _forget_pool_after_fork() -> None:
    global _pool
    _pool = None  # the child has no worker threads; start new ones on first use


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _aligned(n: int, align: int = 64) -> np.ndarray:
    raw = np.empty(n + align // F32, np.float32)
    skip = (-raw.ctypes.data % align) // F32
    return raw[skip:skip + n]


def pack_buffers(cfg: GemmConfig) -> tuple[np.ndarray, np.ndarray]:
    """This thread's packed A (MC x KC) and B (KC x NC) buffers; allocated once per config."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    if cfg not in cache:
        cache[cfg] = (_aligned(cfg.mc * cfg.kc), _aligned(cfg.kc * cfg.nc))
    return cache[cfg]


def partition(m: int, n: int, k: int, cfg: GemmConfig, threads: int) -> list[tuple[int, ...]]:
    """Blocks (m0, m1, n0, n1) of C, one per thread. Splitting N duplicates the packing of A in
    every thread and splitting M that of B, so split the dimension that duplicates less."""
    threads = max(1, min(threads, (m * n * k) // (MIN_MACS_PER_THREAD_PER_LANE * cfg.vl)))
    split_n = n >= m
    size, step = (n, cfg.nr) if split_n else (m, cfg.mr)
    tiles = -(-size // step)
    threads = min(threads, tiles)
    bounds = [min(size, (tiles * t // threads) * step) for t in range(threads + 1)]
    if split_n:
        return [(0, m, bounds[t], bounds[t + 1]) for t in range(threads)]
    return [(bounds[t], bounds[t + 1], 0, n) for t in range(threads)]


def _as_f32(x: np.ndarray) -> np.ndarray:
    """Float32 with element-multiple strides (the kernel takes strides in elements)."""
    x = np.asarray(x)
    if x.dtype != np.float32 or any(s % F32 for s in x.strides):
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x


def sgemm(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None, trans_b: bool = False,
          bias: np.ndarray | None = None, alpha: float = 1.0, beta: float = 0.0,
          epilogue: tuple[EpilogueOp, ...] = (), threads: int | None = None,
          config: GemmConfig | None = None, target: HostTarget | None = None) -> np.ndarray:
    """out = epilogue(alpha * a @ op(b) + beta * out + bias), fp32; op(b) = b.T if trans_b.

    a: [M, K]; b: [K, N] (or [N, K] with trans_b, as torch Linear weights). Any strides. `beta`
    only applies when `out` is given (beta=1 accumulates into it). `target` overrides the host
    CPU (tests and benchmarks use it to run the AVX2 code path on an AVX-512 machine)."""
    a, b = _as_f32(a), _as_f32(b)
    if a.ndim != 2 or b.ndim != 2:
        raise ShapeError(f"sgemm takes 2-D operands, got {a.shape} and {b.shape}")
    m, k = a.shape
    n, kb = b.shape if trans_b else b.shape[::-1]
    if kb != k:
        raise ShapeError(f"sgemm: inner dimensions differ: a {a.shape}, b {b.shape}, "
                         f"trans_b={trans_b}")
    if out is None:
        out, beta = np.empty((m, n), np.float32), 0.0
    elif out.shape != (m, n) or out.dtype != np.float32:
        raise ShapeError(f"sgemm: out must be float32 {(m, n)}, got {out.dtype} {out.shape}")
    cols = _column_operands(bias, n, epilogue)
    if bias is not None:
        epilogue = (ColumnBias(),) + tuple(epilogue)
    if m == 0 or n == 0:
        return out
    if k == 0 or out.strides[1] != F32 or out.strides[0] % F32:
        return _fallback(a, b, out, trans_b, bias, alpha, beta, epilogue,
                         {"threads": threads, "config": config, "target": target})
    kernel = compile_gemm(config, tuple(epilogue), target)
    rsb, csb = b.strides[::-1] if trans_b else b.strides
    run_blocks(kernel, a, (rsb // F32, csb // F32), b, out, cols, alpha, beta,
               threads or cpu_threads())
    return out


def _column_operands(bias, n: int, epilogue) -> list[np.ndarray]:
    cols = [] if bias is None else [np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)]
    if cols and cols[0].shape != (n,):
        raise ShapeError(f"sgemm: bias must have {n} elements, got {cols[0].shape}")
    if any(op.column_operands for op in epilogue):
        raise ShapeError("sgemm: epilogue ops with column operands are added by the backend")
    return cols


def run_blocks(kernel: GemmKernel, a: np.ndarray, b_strides: tuple[int, int], b: np.ndarray,
               out: np.ndarray, cols: list[np.ndarray], alpha: float, beta: float,
               threads: int) -> None:
    """Run `kernel` on per-thread blocks of `out`, the first in the calling thread."""
    (m, k), n = a.shape, out.shape[1]
    rsa, csa = (s // F32 for s in a.strides)
    rsb, csb = b_strides
    ldc = out.strides[0] // F32
    pa, pb, pc = a.ctypes.data, b.ctypes.data, out.ctypes.data
    pcols = [c.ctypes.data for c in cols]

    def work(block: tuple[int, ...]) -> None:
        m0, m1, n0, n1 = block
        apack, bpack = pack_buffers(kernel.config)
        kernel(m1 - m0, n1 - n0, k, pa + F32 * m0 * rsa, rsa, csa, pb + F32 * n0 * csb, rsb, csb,
               pc + F32 * (m0 * ldc + n0), ldc, alpha, beta, apack.ctypes.data,
               bpack.ctypes.data, *(p + F32 * n0 for p in pcols))

    blocks = partition(m, n, k, kernel.config, threads)
    if len(blocks) == 1:
        work(blocks[0])
    else:
        pool().run([lambda block=block: work(block) for block in blocks])


def _fallback(a, b, out, trans_b, bias, alpha, beta, epilogue, options: dict) -> np.ndarray:
    """K == 0 or an output with non-unit column stride: compute into a contiguous temporary."""
    tmp = np.ascontiguousarray(out) if beta != 0.0 else np.zeros(out.shape, np.float32)
    if a.shape[1] == 0:
        tmp *= np.float32(beta)
        if bias is not None:
            tmp += bias
        for op in epilogue:
            if not isinstance(op, ColumnBias):
                raise ShapeError(f"sgemm: K == 0 with epilogue {op.tag} is not supported")
    else:
        sgemm(a, b, out=tmp, trans_b=trans_b, bias=bias, alpha=alpha, beta=beta,
              epilogue=tuple(op for op in epilogue if not isinstance(op, ColumnBias)),
              **options)
    out[...] = tmp
    return out
