"""Multi-core GEMM launchers: 2-D (`sgemm`), grouped for mixture-of-experts (`grouped_sgemm`),
batched (`batched_sgemm`), dual (`dual_sgemm`: two GEMMs on the same rows as one), and
`prepack_b` / `pack_dual` for constant weights.

A launch is a list of independent job records (a block of C of one matrix each, see
gemm.JOB_FIELDS). Each thread of the core pool (pool.py) runs one native call that claims
records from the launch's shared counter until none is left, with its own packed-panel buffers:
the caller's call through ctypes (which releases the GIL), the workers' as native tasks
(`NativeTask`), so the threads really run in parallel, and a core slowed by a neighbour on a
shared machine takes fewer records instead of holding up the launch.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from itertools import pairwise, product

import numpy as np

from lmc.errors import ShapeError

from .gemm import (
    JOB_FIELDS,
    TASK_FIELDS,
    ColumnBias,
    EpilogueOp,
    GemmConfig,
    GemmKernel,
    TileEpilogue,
    compile_gemm,
    task_scratch_bytes,
)
from .jit import HostTarget
from .pool import F32, NativeTask, _aligned, cpu_threads, pool, thread_buffer

# A native hand-off to a polling worker costs ~10 us, but the second core starts with cold
# caches: with AVX2, 2 threads measured 1.24x one at 8M MACs, 0.96x at 4M (a futex wake-up, the
# pool's old hand-off, cost 10-400 us and needed 16M). Scaled by vector width.
MIN_MACS_PER_THREAD_PER_LANE = 1 << 19
PACK_BYTES_PER_THREAD = 1 << 20  # a weight is packed on several cores from this size per core

_local = threading.local()


def pack_buffers(cfg: GemmConfig) -> tuple[np.ndarray, np.ndarray]:
    """This thread's packed A (MC x KC) and B (KC x NC) buffers; allocated once per config."""
    return _thread_buffers(cfg)[0]


def _thread_buffers(cfg: GemmConfig) -> tuple[tuple[np.ndarray, np.ndarray], tuple[int, int]]:
    """(buffers, their addresses): `.ctypes.data` costs ~2 us, so the addresses are kept."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    if cfg not in cache:
        buffers = (_aligned(cfg.mc * cfg.kc), _aligned(cfg.kc * cfg.nc))
        cache[cfg] = buffers, tuple(b.ctypes.data for b in buffers)
    return cache[cfg]


def partition(m: int, n: int, k: int, cfg: GemmConfig, threads: int,
              b_packed: bool = False) -> tuple[tuple[int, ...], ...]:
    """Blocks (m0, m1, n0, n1) of C, one per thread, as many threads as the work pays for."""
    return split_block(m, n, k, cfg, _useful_threads(m * n * k, cfg, threads), b_packed)


def _useful_threads(macs: int, cfg: GemmConfig, threads: int) -> int:
    return max(1, min(threads, macs // (MIN_MACS_PER_THREAD_PER_LANE * cfg.vl)))


# Packing one element costs about as much as this many multiply-adds (a vector load + store per
# VL elements, against 2 FMAs of VL lanes per cycle); `split_block` weighs duplicated packing
# against uneven compute with it.
PACK_MACS = 4


def _tile_bounds(size: int, step: int, parts: int) -> list[int]:
    """[0, size) cut into `parts` ranges of whole `step` tiles (the last one may be partial)."""
    tiles = -(-size // step)
    return [min(size, (tiles * t // parts) * step) for t in range(parts + 1)]


@functools.lru_cache(maxsize=4096)  # a model's GEMMs have a few shapes; a call costs ~10 us
def split_block(m: int, n: int, k: int, cfg: GemmConfig, threads: int,
                b_packed: bool = False) -> tuple[tuple[int, ...], ...]:
    """C split into <= `threads` blocks (m0, m1, n0, n1) on tile boundaries: of the grids
    tm x tn <= threads, the one whose slowest block costs least. A block computes whole MR x NR
    tiles (a partial tile costs a full one: 512 columns are 10.7 panels of 48, split 5 / 6), and
    packs its rows of A and its columns of B (none when B is prepacked); splitting N duplicates
    the packing of A in every block, splitting M that of B."""
    def blocks(rows: list[int], cols: list[int]) -> tuple[tuple[int, ...], ...]:
        return tuple((r0, r1, c0, c1) for (r0, r1), (c0, c1) in product(pairwise(rows),
                                                                         pairwise(cols)))

    def cost(block: tuple[int, ...]) -> int:
        r, c = block[1] - block[0], block[3] - block[2]
        compute = -(-r // cfg.mr) * cfg.mr * -(-c // cfg.nr) * cfg.nr * k
        return compute + PACK_MACS * k * (r + (0 if b_packed else c))

    m_tiles, n_tiles = -(-m // cfg.mr), -(-n // cfg.nr)
    grids = [blocks(_tile_bounds(m, cfg.mr, tm), _tile_bounds(n, cfg.nr, tn))
             for tm in range(1, min(threads, m_tiles) + 1)
             for tn in range(1, min(threads // tm, n_tiles) + 1)]
    return min(grids, key=lambda grid: max(map(cost, grid)))


def schedule(sizes: list[tuple[int, int, int]], cfg: GemmConfig, threads: int,
             uniform: bool = False) -> list[list[tuple[int, tuple[int, ...]]]]:
    """Per thread, the (matrix index, block of its C) to run, for several GEMMs of (m, n, k).
    Equal matrices (`uniform`, a batch) go whole, in contiguous runs, to the threads, and only
    the remainder is split; unequal ones (experts) are each split across all threads, so both
    cores stay busy however the rows fall (an expert's B is packed once in total either way)."""
    threads = _useful_threads(sum(m * n * k for m, n, k in sizes), cfg, threads)
    plan: list[list[tuple[int, tuple[int, ...]]]] = [[] for _ in range(threads)]
    whole = len(sizes) - len(sizes) % threads if uniform else 0
    for i in range(whole):
        m, n, _ = sizes[i]
        plan[i * threads // whole].append((i, (0, m, 0, n)))
    for i in range(whole, len(sizes)):
        m, n, _ = sizes[i]
        for t, block in enumerate(split_block(m, n, sizes[i][2], cfg, threads)):
            plan[t].append((i, block))
    return plan


# -- one GEMM call's operands, as the native job records see them --


@dataclass(frozen=True)
class PackedB:
    """B packed once into the kernel's NR-column panels, full K deep, for `config`: weights are
    constant, so the runtime packs them at load and each call skips the packing (which costs as
    much as the multiply at small M). `data` is [*batch, panels * K * NR] (experts: batch = E)."""

    data: np.ndarray = field(repr=False)
    k: int
    n: int
    config: GemmConfig

    @property
    def batch(self) -> tuple[int, ...]:
        return self.data.shape[:-1]


@dataclass(frozen=True)
class _Layout:
    """Element strides shared by every matrix of a launch, and how B is given."""

    a_strides: tuple[int, int]
    b_strides: tuple[int, int]  # (row, col) of B [K, N]; unused when b_packed
    ldc: int
    b_packed: bool

    def job(self, block: tuple[int, ...], k: int, ptrs: tuple[int, int, int],
            origin: tuple[int, int], cols: list[int], low_rank: tuple[int, int, int] = (0, 0, 0)
            ) -> list[int]:
        """The record (JOB_FIELDS + column operands) of C block (m0, m1, n0, n1) of one matrix
        with base addresses `ptrs` (A, B, C) at global (row, col) `origin`; `low_rank` = (the
        packed up-projection's address, the rank, this job's T buffer) or zeros."""
        m0, m1, n0, n1 = block
        pa, pb, pc = ptrs
        up, rank, tbuf = low_rank
        b_off = n0 * k if self.b_packed else n0 * self.b_strides[1]
        return [m1 - m0, n1 - n0, k, pa + F32 * m0 * self.a_strides[0], pb + F32 * b_off,
                pc + F32 * (m0 * self.ldc + n0), origin[0] + m0, origin[1] + n0,
                up + F32 * n0 * rank if up else 0, tbuf, *(p + F32 * n0 for p in cols)]


def _elements(strides: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // F32 for s in strides)


def launch(kernel: GemmKernel, layout: _Layout, plan: list[list[list[int]]], alpha: float,
           beta: float, epi_args: int, low_rank: tuple[int, int, float] = (0, 0, 0.0),
           keep: tuple = (), cbufs: list[int] | None = None, threads: int | None = None,
           packs: list[list[int]] = ()) -> _Launch:
    """Run the job records of `plan` (per thread, its planned share) on as many threads as the
    plan has non-empty shares (or `threads`, at most one per record), the first in this
    thread. The threads claim records from one counter, in the shares' round-robin order
    (`_round_robin`): each starts on its own share, and a core that a neighbour slows down (a
    shared VM) takes fewer records instead of holding up the launch. Every record must be
    independent of the others: they run in any order, on any thread. `low_rank`: (packed side
    columns' address, rank, up_alpha) of a LoRA branch, or zeros. `keep`: buffers of this
    launch's own that the records point into (a LoRA branch's T). `cbufs`: per thread, a C
    replacing every record's (`dual_sgemm`'s scratch), or None. `packs`: PACK_FIELDS records
    the threads claim first, each run (`sgemm`'s packing of B; the job records wait for them).
    Inside `recording()`, the prepared call is also handed to the recorder (for replay)."""
    shares = [records for records in plan if len(records)]
    jobs = _round_robin(shares)
    if len(packs) and len(jobs):
        width = jobs.shape[1]
        jobs = np.concatenate([np.array([p + [0] * (width - len(p)) for p in packs], np.int64),
                               jobs])
    run = _Launch(kernel, layout, jobs, min(threads or len(shares), len(jobs)), alpha, beta,
                  epi_args, low_rank, keep, cbufs, len(packs) if len(jobs) else 0)
    calls = getattr(_local, "recorded", None)
    if calls is not None:
        calls.append(run)
    run()
    return run


def _round_robin(shares: list) -> np.ndarray:
    """The records of every share as one [n, record] array: the first of each share, then the
    second of each, ..."""
    if not shares:
        return np.zeros((0, len(JOB_FIELDS)), np.int64)
    rows = [np.asarray(share, np.int64).reshape(len(share), -1) for share in shares]
    if len(rows) == 1:
        return np.ascontiguousarray(rows[0])
    position = np.concatenate([np.arange(len(r)) for r in rows])
    return np.ascontiguousarray(np.concatenate(rows)[np.argsort(position, kind="stable")])


class _Launch:
    """One GEMM launch with its job records built: calling it runs them again, the same jobs
    over the same addresses (a launcher replays it while its operands are at the same addresses
    with the same layouts)."""

    def __init__(self, kernel: GemmKernel, layout: _Layout, jobs: np.ndarray, threads: int,
                 alpha: float, beta: float, epi_args: int, low_rank: tuple[int, int, float],
                 keep: tuple = (), cbufs: list[int] | None = None, npack: int = 0):
        self.kernel, self.layout, self.keep, self.jobs = kernel, layout, keep, jobs
        self.npack = npack
        self.alpha, self.beta, self.epi_args, self.low_rank = alpha, beta, epi_args, low_rank
        self.cbufs = cbufs or [0] * threads
        # The shared counters (records claimed, packs done), on a line of their own.
        self.claim = _aligned(16).view(np.int64)
        # addresses, once (`.ctypes.data` costs ~2.5 us)
        self._at = {"jobs": jobs.ctypes.data, "claim": self.claim.ctypes.data}
        self.tasks = [self._task(t) for t in range(1, threads)]

    def __call__(self) -> None:
        if not len(self.jobs):
            return
        self.claim[:2] = 0
        if not self.tasks:
            self._work()
            return
        pool().run([self._work, *self.tasks])

    def _work(self) -> None:
        """Thread 0's claims, in this thread, with this thread's pack buffers."""
        layout = self.layout
        _, (apack, bpack) = _thread_buffers(self.kernel.config)
        self.kernel.run_jobs(len(self.jobs), self._at["jobs"], layout.a_strides,
                             layout.b_strides, layout.ldc, self.alpha, self.beta, apack, bpack,
                             layout.b_packed, self.epi_args, self.low_rank, self._at["claim"],
                             self.cbufs[0], self.npack)

    def _task(self, thread: int) -> NativeTask:
        """Thread `thread`'s claims, for a worker to run natively (no Python, no GIL between
        the jobs)."""
        layout, (side, rank, up_alpha) = self.layout, self.low_rank
        args = np.array([len(self.jobs), self.npack, self._at["jobs"], *layout.a_strides,
                         *layout.b_strides, layout.ldc, 0, 0, int(layout.b_packed),
                         self.epi_args, side, rank, 0, self._at["claim"], self.cbufs[thread]],
                        np.int64)
        for f, value in (("alpha", self.alpha), ("beta", self.beta), ("up_alpha", up_alpha)):
            args[TASK_FIELDS.index(f):TASK_FIELDS.index(f) + 1].view(np.float64)[:] = value
        return NativeTask(self.kernel.task_address, args.ctypes.data,
                          task_scratch_bytes(self.kernel.config), (self.jobs, self.claim, args))


@contextlib.contextmanager
def recording():
    """Collect the GEMM launches made inside (this thread) into the yielded list."""
    outer = getattr(_local, "recorded", None)
    calls = _local.recorded = []
    try:
        yield calls
    finally:
        _local.recorded = outer


def note_copy() -> None:
    """An operand of the launch being prepared was copied: a replay of it would read the copy's
    old values, so the recorder is told (a None among its launches) not to keep it."""
    calls = getattr(_local, "recorded", None)
    if calls is not None:
        calls.append(None)


def _as_f32(x: np.ndarray) -> np.ndarray:
    """Float32 with element-multiple strides (the kernel takes strides in elements)."""
    x = np.asarray(x)
    if x.dtype != np.float32 or any(s % F32 for s in x.strides):
        x = np.ascontiguousarray(x, dtype=np.float32)
        note_copy()
    return x


def _address(args: int | np.ndarray | None) -> int:
    """The tile epilogue's `args` pointer: an address, or an array holding the words."""
    if isinstance(args, np.ndarray):
        return args.ctypes.data
    return int(args or 0)


def _writable_out(out: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32:
        raise ShapeError(f"{what}: out must be float32 {shape}, got {out.dtype} {out.shape}")
    return out


def _unit_columns(out: np.ndarray) -> bool:
    return out.strides[-1] == F32 and all(s % F32 == 0 for s in out.strides)


def _via_contiguous(out: np.ndarray, beta: float, run) -> np.ndarray:
    """An output with non-unit column stride: `run` computes into a contiguous temporary."""
    tmp = np.ascontiguousarray(out) if beta != 0.0 else np.empty(out.shape, np.float32)
    note_copy()
    run(tmp)
    out[...] = tmp
    return out


# -- 2-D GEMM --


def sgemm(a: np.ndarray, b: np.ndarray | PackedB, *, out: np.ndarray | None = None,
          trans_b: bool = False, bias: np.ndarray | None = None, alpha: float = 1.0,
          beta: float = 0.0, epilogue: tuple[EpilogueOp, ...] = (),
          tile_epilogue: TileEpilogue | None = None, epi_args: int | np.ndarray = 0,
          row0: int = 0, col0: int = 0, threads: int | None = None,
          config: GemmConfig | None = None, target: HostTarget | None = None,
          low_rank: LowRank | None = None) -> np.ndarray:
    """out = epilogue(alpha * a @ op(b) + beta * out + bias), fp32; op(b) = b.T if trans_b.

    a: [M, K]; b: [K, N] (or [N, K] with trans_b, as torch Linear weights) with any strides, or
    a `PackedB`. `beta` only applies when `out` is given (beta=1 accumulates into it). A
    `tile_epilogue` then runs on each finished tile, reading `epi_args`, at tile positions
    offset by (row0, col0) (for a caller computing one block of a larger output). `low_rank`
    adds a LoRA branch scale * (a @ down) @ up to every tile before the tile epilogue, in the
    same pass over a. `target` overrides the host CPU (tests and benchmarks use it to run the
    AVX2 code path here)."""
    a = _as_f32(a)
    if a.ndim != 2:
        raise ShapeError(f"sgemm takes 2-D operands, got a {a.shape}")
    m, k = a.shape
    b, (kb, n), b_strides, config = _b_operand(b, trans_b, config)
    if kb != k:
        raise ShapeError(f"sgemm: inner dimensions differ: a {a.shape}, b {(kb, n)} (after "
                         f"trans_b={trans_b})")
    if out is None:
        out, beta = np.empty((m, n), np.float32), 0.0
    out = _writable_out(out, (m, n), "sgemm")
    cols = _column_operands(bias, n, epilogue)
    if m == 0 or n == 0:
        return out
    if not _unit_columns(out):
        return _via_contiguous(out, beta, lambda tmp: sgemm(
            a, b, out=tmp, bias=bias, alpha=alpha, beta=beta, epilogue=epilogue,
            tile_epilogue=tile_epilogue, epi_args=epi_args, row0=row0, col0=col0,
            threads=threads, config=config, target=target, low_rank=low_rank))
    if bias is not None:
        epilogue = (ColumnBias(),) + tuple(epilogue)
    kernel = compile_gemm(config, tuple(epilogue), target, tile_epilogue)
    threads = threads or cpu_threads()
    at = {"a": a.ctypes.data, "b": _data(b).ctypes.data, "out": out.ctypes.data,
          "cols": tuple(c.ctypes.data for c in cols), "epi": _address(epi_args)}
    # The same call again (addresses, layouts, scalars) runs the launch built last time on
    # this thread: building it costs ~0.12 ms of Python, 7 % of a 512^2 GEMM on 2 threads.
    # Like `GemmLauncher`'s replays, nothing of the caller's is held between calls.
    key = None if low_rank is not None or _recording() else (
        id(kernel), threads, at["a"], a.shape, a.strides, at["b"], b_strides,
        isinstance(b, PackedB), at["out"], out.shape, out.strides, at["cols"], alpha, beta,
        at["epi"], row0, col0)
    last = getattr(_local, "last_sgemm", None)
    if key is not None and last is not None and last[0] == key:
        last[1]()
        return out
    run = _sgemm_launch(kernel, threads, a, b, b_strides, out, at, (alpha, beta),
                        (row0, col0), low_rank, epilogue)
    if key is not None:
        _local.last_sgemm = (key, run)
    return out


def _recording() -> bool:
    return getattr(_local, "recorded", None) is not None


def _sgemm_launch(kernel: GemmKernel, threads: int, a: np.ndarray, b, b_strides, out, at: dict,
                  scalars: tuple[float, float], origin: tuple[int, int],
                  low_rank: LowRank | None, epilogue) -> _Launch:
    """Build and run `sgemm`'s launch (addresses `at`); returns it."""
    (m, k), n, cfg = a.shape, out.shape[1], kernel.config
    b_packed = isinstance(b, PackedB)
    blocks, packs, keep = partition(m, n, k, cfg, threads, b_packed), [], ()
    if len(blocks) > 1 and not b_packed:
        # B packed once, on all cores, then the prepacked driver: every thread packing its own
        # block of B measured 1.2-1.4x slower at 512^2-2048^2 on 2 threads (Zen 1), and the
        # rows of a prepacked GEMM split into jobs the threads claim (`_row_chunks`). The
        # panels are packed at every run (a replay reads B's current values).
        packed = PackedB(_panels_buffer(_panel_floats(k, n, cfg)), k, n, cfg)
        packs, keep = _pack_records(at["b"], b_strides, packed, threads), (packed.data,)
        at, b_strides, b_packed = {**at, "b": packed.data.ctypes.data}, (0, 0), True
        blocks = partition(m, n, k, cfg, threads, True)
    layout = _Layout(_elements(a.strides), b_strides, out.strides[0] // F32, b_packed)
    shares = [_row_chunks(block, cfg) if b_packed and len(blocks) > 1 else [block]
              for block in blocks]
    branch = _low_rank_jobs(low_rank, [c for share in shares for c in share], (k, n), kernel,
                            epilogue)
    per_chunk = iter(branch.jobs)
    ptrs = (at["a"], at["b"], at["out"])
    plan = [[layout.job(chunk, k, ptrs, origin, at["cols"], next(per_chunk)) for chunk in share]
            for share in shares]
    return launch(kernel, layout, plan, *scalars, at["epi"], branch.shared,
                  (*branch.buffers, *keep), packs=packs)


def _panels_buffer(floats: int) -> np.ndarray:
    """Memory for a launch's packed B: its own if the launch is recorded (a replay may run
    while this thread launches others, or on another thread), else this thread's, kept and
    grown. A fresh buffer per call cost ~0.2 ms of page faults at 512^2 (a 1 MB allocation
    comes from mmap: 1.99 vs 1.66 ms for the replayed launch, 2 threads, znver2)."""
    return _aligned(floats) if _recording() else thread_buffer(floats, "panels")


def _pack_records(src: int, b_strides: tuple[int, int], packed: PackedB,
                  threads: int) -> list[list[int]]:
    """PACK_FIELDS records packing B [K, N] (at address `src`, element strides `b_strides`)
    into `packed`: two column ranges per thread on panel boundaries, so a core that starts
    late takes fewer."""
    k, n, nr = packed.k, packed.n, packed.config.nr
    rsb, csb = b_strides
    cuts = _tile_bounds(n, nr, min(2 * threads, -(-n // nr)))
    dst = packed.data.ctypes.data
    return [[src + F32 * c0 * csb, rsb, csb, k, c1 - c0, dst + F32 * c0 * k]
            for c0, c1 in pairwise(cuts) if c1 > c0]


def _row_chunks(block: tuple[int, ...], cfg: GemmConfig) -> list[tuple[int, ...]]:
    """A thread's block of C (B prepacked) as jobs of at most MC rows of whole MR tiles, for
    the threads to claim: each MC-row block of A is packed once either way, so finer jobs only
    balance the cores."""
    m0, m1, n0, n1 = block
    parts = -(-(m1 - m0) // cfg.mc)
    return [(m0 + r0, m0 + r1, n0, n1)
            for r0, r1 in pairwise(_tile_bounds(m1 - m0, cfg.mr, parts))]


@dataclass(frozen=True)
class LowRank:
    """A LoRA branch scale * (x @ down) @ up fused into a GEMM: `down` [K, r] and `up` [r, N]
    packed for the GEMM's config (`prepack_b`). The GEMM computes x @ down as r extra columns
    of its pass over x and adds the rank-r product to each finished tile (gemm.py)."""

    down: PackedB
    up: PackedB
    scale: float

    @property
    def rank(self) -> int:
        return self.down.n


@dataclass
class _LowRankJobs:
    jobs: list[tuple[int, int, int]]  # per C block: (up address, rank, T buffer address)
    shared: tuple[int, int, float]    # (down address, rank, scale)
    buffers: list[np.ndarray] = field(default_factory=list)


def _low_rank_jobs(branch: LowRank | None, blocks, kn: tuple[int, int], kernel: GemmKernel,
                   epilogue) -> _LowRankJobs:
    """Each C block's T buffer (its rows of x @ down, then the MR panels of one row block)."""
    if branch is None:
        return _LowRankJobs([(0, 0, 0)] * len(blocks), (0, 0, 0.0))
    cfg, r = kernel.config, branch.rank
    if (branch.down.k, branch.up.k, branch.up.n) != (kn[0], r, kn[1]) or \
            {branch.down.config, branch.up.config} != {cfg}:
        raise ShapeError(f"sgemm: a low-rank branch [{branch.down.k}, {r}] x [{branch.up.k}, "
                         f"{branch.up.n}] packed for {branch.down.config.tag} does not fit "
                         f"K, N = {kn} of a {cfg.tag} GEMM")
    if any(not isinstance(op, ColumnBias) for op in epilogue):
        # Register epilogues run before the rank-r update; only a bias add commutes with it.
        raise ShapeError("sgemm: a low-rank branch takes a bias or a tile epilogue, not "
                         f"register epilogues {[op.tag for op in epilogue]}")
    ldt = -(-r // cfg.nr) * cfg.nr
    buffers = [_aligned(-(-(m1 - m0) * ldt // 16) * 16 + cfg.mc * r) for m0, m1, *_ in blocks]
    up = branch.up.data.ctypes.data
    return _LowRankJobs([(up, r, t.ctypes.data) for t in buffers],
                        (branch.down.data.ctypes.data, r, branch.scale), buffers)


def _b_operand(b, trans_b: bool, config: GemmConfig | None):
    """(b, (K, N), element strides of B [K, N], config) for an array or a 2-D PackedB."""
    if isinstance(b, PackedB):
        if b.batch:
            raise ShapeError(f"sgemm: B is a batch {b.batch} of packed matrices")
        return b, (b.k, b.n), (0, 0), _packed_config(b, config)
    b = _as_f32(b)
    if b.ndim != 2:
        raise ShapeError(f"sgemm takes 2-D operands, got b {b.shape}")
    if trans_b:
        b = b.T
    return b, b.shape, _elements(b.strides), config


def _packed_config(b: PackedB, config: GemmConfig | None) -> GemmConfig:
    if config is not None and config != b.config:
        raise ShapeError(f"B was packed for {b.config.tag}, not for {config.tag}")
    return b.config


def _data(b: np.ndarray | PackedB) -> np.ndarray:
    return b.data if isinstance(b, PackedB) else b


def _column_operands(bias, n: int, epilogue) -> list[np.ndarray]:
    cols = [] if bias is None else [np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)]
    if cols and cols[0].shape != (n,):
        raise ShapeError(f"sgemm: bias must have {n} elements, got {cols[0].shape}")
    if any(op.column_operands for op in epilogue):
        raise ShapeError("sgemm: epilogue ops with column operands are added by the backend")
    return cols


def _panel_floats(k: int, n: int, cfg: GemmConfig) -> int:
    """Floats of one [K, N] matrix packed as whole NR-column panels, K deep."""
    return -(-n // cfg.nr) * cfg.nr * k


def prepack_b(b: np.ndarray, trans_b: bool = False, config: GemmConfig | None = None,
              target: HostTarget | None = None, kernel: GemmKernel | None = None,
              out: np.ndarray | None = None) -> PackedB:
    """B [K, N] ([N, K] with trans_b), or a stack [E, K, N] of expert weights, packed once into
    the panels of `config`'s kernel (default: the target's) for `sgemm` / `grouped_sgemm`.
    `kernel`: a compiled GEMM of that config to pack with (saves compiling a plain one).
    `out`: a 64-byte aligned float32 buffer of exactly the packed size to pack into."""
    b = _as_f32(b)
    if b.ndim not in (2, 3):
        raise ShapeError(f"prepack_b takes [K, N] or [E, K, N], got {b.shape}")
    if trans_b:
        b = np.swapaxes(b, -1, -2)
    kernel = kernel or compile_gemm(config, (), target)
    cfg = kernel.config
    *batch, k, n = b.shape
    panels = _panel_floats(k, n, cfg)
    size = int(np.prod(batch, dtype=np.int64)) * panels
    if out is not None and out.size != size:
        raise ShapeError(f"prepack_b: out holds {out.size} floats, the panels {size}")
    data = (_aligned(size) if out is None else out).reshape(*batch, panels)
    rsb, csb = _elements(b.strides[-2:])
    # Column ranges on panel boundaries, packed on all cores: a weight read across its rows
    # (torch's [N, K] layout) packs at ~0.5 GB/s per core, the GPT block's 12 MB in ~20 ms.
    parts = max(1, min(cpu_threads(), -(-n // cfg.nr), data.nbytes // PACK_BYTES_PER_THREAD))
    cuts = _tile_bounds(n, cfg.nr, parts)

    def pack(c0: int, c1: int) -> None:
        for index in np.ndindex(*batch):
            kernel.pack_b_fn(b[index].ctypes.data + F32 * c0 * csb, rsb, csb, k, c1 - c0,
                             data[index].ctypes.data + F32 * c0 * k)

    jobs = [functools.partial(pack, c0, c1) for c0, c1 in pairwise(cuts) if c1 > c0]
    if len(jobs) > 1:
        pool().run(jobs)
    elif jobs and data.size:  # here: a small weight does not start the pool
        jobs[0]()
    return PackedB(data, k, n, cfg)


# -- grouped (mixture-of-experts) and batched GEMM --


def grouped_sgemm(x: np.ndarray, w: np.ndarray | PackedB, offsets: np.ndarray, *,
                  out: np.ndarray | None = None, tile_epilogue: TileEpilogue | None = None,
                  epi_args: int | np.ndarray = 0, threads: int | None = None,
                  target: HostTarget | None = None) -> np.ndarray:
    """moe.grouped_matmul: x [M, d] rows sorted by expert, w [E, d, f] (any strides, or
    prepacked), offsets [E+1]: out[lo:hi] = x[lo:hi] @ w[e] for lo, hi = offsets[e:e+2], then
    the tile epilogue at global rows. Rows outside offsets[0]:offsets[E] are 0 (+ epilogue).
    One native call per thread runs its share of every expert (`schedule`)."""
    x = _as_f32(x)
    if x.ndim != 2:
        raise ShapeError(f"grouped_sgemm: x must be [M, d], got {x.shape}")
    if isinstance(w, PackedB):
        if len(w.batch) != 1:
            raise ShapeError(f"grouped_sgemm: packed w must be a stack [E], got {w.batch}")
        (n_experts,), d, f, config = w.batch, w.k, w.n, w.config
        w_ptr, w_step, b_strides = w.data.ctypes.data, w.data.strides[0], (0, 0)
    else:
        w = _as_f32(w)
        if w.ndim != 3:
            raise ShapeError(f"grouped_sgemm: w must be [E, d, f], got {w.shape}")
        (n_experts, d, f), config = w.shape, None
        w_ptr, w_step, b_strides = w.ctypes.data, w.strides[0], _elements(w.strides[1:])
    m = x.shape[0]
    if x.shape[1] != d:
        raise ShapeError(f"grouped_sgemm: x {x.shape} does not fit w [{n_experts}, {d}, {f}]")
    bounds = _expert_bounds(offsets, n_experts, m)
    out = _writable_out(out, (m, f), "grouped_sgemm")
    if m == 0 or f == 0:
        return out
    if not _unit_columns(out):
        return _via_contiguous(out, 0.0, lambda tmp: grouped_sgemm(
            x, w, offsets, out=tmp, tile_epilogue=tile_epilogue, epi_args=epi_args,
            threads=threads, target=target))
    kernel = compile_gemm(config, (), target, tile_epilogue)
    layout = _Layout(_elements(x.strides), b_strides, out.strides[0] // F32,
                     isinstance(w, PackedB))
    pieces = _pieces(bounds, m)
    sizes = [(hi - lo, f, 0 if e is None else d) for lo, hi, e in pieces]
    plan = schedule(sizes, kernel.config, threads or cpu_threads())
    records = [[layout.job(block, sizes[i][2], _piece_ptrs(x, out, pieces[i], w_ptr, w_step),
                           (pieces[i][0], 0), []) for i, block in share] for share in plan]
    launch(kernel, layout, records, 1.0, 0.0, _address(epi_args))
    return out


def pack_dual(wa: np.ndarray, wb: np.ndarray, half: int, kernel: GemmKernel) -> PackedB:
    """Weights Wa, Wb (each [K, N], any strides, or a stack [E, K, N]) of two GEMMs on
    the same rows, packed as one B of 2N columns for `dual_sgemm`: blocks of `half` columns of
    Wa and Wb alternate, so each tile-epilogue block of C (2·half wide, `gemm.epilogue_block`)
    holds a column range of both products side by side, and SwiGLU's silu(x·W1)·(x·W3) is
    one pass over x whose x·W3 never goes to memory."""
    wa, wb = _as_f32(wa), _as_f32(wb)
    if wa.shape != wb.shape:
        raise ShapeError(f"pack_dual: the two weights differ in shape: {wa.shape} vs {wb.shape}")
    n = wa.shape[-1]
    both = np.empty((*wa.shape[:-1], 2 * n), np.float32)
    for c0 in range(0, n, half):
        c1 = min(n, c0 + half)
        both[..., 2 * c0:c0 + c1] = wa[..., c0:c1]
        both[..., c0 + c1:2 * c1] = wb[..., c0:c1]
    return prepack_b(both if both.ndim == 3 else both[None], kernel=kernel)


def dual_sgemm(x: np.ndarray, w: PackedB, offsets: np.ndarray | None, *, out: np.ndarray,
               tile_epilogue: TileEpilogue, epi_args: int | np.ndarray,
               threads: int | None = None, target: HostTarget | None = None) -> np.ndarray:
    """Two GEMMs on the rows of x [M, K] as one (`pack_dual`'s w, a stack [E] of experts with
    `offsets` [E+1] as in `grouped_sgemm`, or [1] for a plain matmul with offsets None): each
    finished block of the [rows, 2N] product goes to the tile epilogue (rendered with its
    `sibling`), which writes its result into out [M, N]. The product lives only in a per-thread
    scratch of MC rows (`cbufs`): every job is one block of at most MC rows, computed, then
    consumed in L2, on whichever thread claims it."""
    x = _as_f32(x)
    (n_experts,), d, width = w.batch, w.k, w.n
    m = x.shape[0]
    if x.ndim != 2 or x.shape[1] != d or out.shape != (m, width // 2):
        raise ShapeError(f"dual_sgemm: x {x.shape} and out {out.shape} do not fit the packed "
                         f"weights [{n_experts}, {d}, 2 x {width // 2}]")
    bounds = [0, m] if offsets is None else _expert_bounds(offsets, n_experts, m)
    if m == 0 or width == 0:
        return out
    kernel = compile_gemm(w.config, (), target, tile_epilogue)
    cfg = kernel.config
    ldc = -(-width // 16) * 16  # scratch rows on 64-byte boundaries
    threads = _useful_threads(m * width * d, cfg, threads or cpu_threads())
    scratch = _scratch_slots(threads, cfg.mc * ldc)
    layout = _Layout(_elements(x.strides), (0, 0), ldc, True)
    jobs = []
    for lo, hi, e in _pieces(bounds, m):
        # Jobs of at most MC rows, at least `threads` per piece: the threads claim them.
        parts = max(min(threads, -(-(hi - lo) // cfg.mr)), -(-(hi - lo) // cfg.mc))
        for r0, r1 in pairwise(_tile_bounds(hi - lo, cfg.mr, parts)):
            ptrs = (x.ctypes.data + (lo + r0) * x.strides[0],
                    w.data.ctypes.data + (e or 0) * w.data.strides[0], 0)
            jobs.append(layout.job((0, r1 - r0, 0, width), 0 if e is None else d, ptrs,
                                   (lo + r0, 0), []))
    # Each thread's C is its own scratch (the records' C is replaced).
    launch(kernel, layout, [jobs], 1.0, 0.0, _address(epi_args), cbufs=scratch, threads=threads)
    return out


def _pieces(bounds: list[int], m: int) -> list[tuple[int, int, int | None]]:
    """(lo, hi, expert) row ranges of a grouped GEMM; rows outside bounds[0]:bounds[-1] get
    expert None: they run with K = 0, i.e. zeros through the epilogue."""
    pieces = [(lo, hi, e) for e, (lo, hi) in enumerate(pairwise(bounds)) if hi > lo]
    pieces += [(0, bounds[0], None), (bounds[-1], m, None)]
    return [p for p in pieces if p[1] > p[0]]


def _scratch_slots(n: int, floats: int) -> list[int]:
    """Addresses of n scratch buffers of >= `floats` floats, kept by the calling thread (one per
    thread of a launch, which its threads fill at the same time)."""
    slots = getattr(_local, "dual_scratch", None)
    if slots is None or len(slots) < n or slots[0].size < floats:
        slots = _local.dual_scratch = [_aligned(floats) for _ in range(n)]
    return [b.ctypes.data for b in slots[:n]]


def _expert_bounds(offsets, n_experts: int, m: int) -> list[int]:
    """offsets as Python ints, checked: E+1 non-decreasing row offsets within [0, M]."""
    offsets = np.asarray(offsets)
    if offsets.shape != (n_experts + 1,) or offsets.dtype.kind not in "iu":
        raise ShapeError(f"grouped_sgemm: offsets must be {n_experts + 1} integers, got "
                         f"{offsets.dtype} {offsets.shape}")
    bounds = [int(o) for o in offsets]
    if bounds[0] < 0 or bounds[-1] > m or any(lo > hi for lo, hi in pairwise(bounds)):
        raise ShapeError(f"grouped_sgemm: offsets must rise from >= 0 to <= {m} rows, got "
                         f"{bounds}")
    return bounds


def _piece_ptrs(x: np.ndarray, out: np.ndarray, piece, w_ptr: int, w_step: int):
    lo, _, e = piece
    return (x.ctypes.data + lo * x.strides[0], w_ptr + (e or 0) * w_step,
            out.ctypes.data + lo * out.strides[0])


def batched_sgemm(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None,
                  trans_b: bool = False, alpha: float = 1.0, threads: int | None = None,
                  target: HostTarget | None = None) -> np.ndarray:
    """alpha * numpy.matmul (fp32) over broadcast leading batch dims, any strides; op(b) swaps
    b's last two axes if trans_b. Folds the batch into M when B is shared and the layouts allow
    (one big GEMM), else one native call per thread runs its share of the batch."""
    a, b = _as_f32(a), _as_f32(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"batched_sgemm: operands must have >= 1 dims, got {a.shape}, {b.shape}")
    if trans_b and b.ndim >= 2:
        b = np.swapaxes(b, -1, -2)
    a2, b2 = (a[None] if a.ndim == 1 else a), (b[:, None] if b.ndim == 1 else b)
    (m, k), (kb, n) = a2.shape[-2:], b2.shape[-2:]
    try:
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        batch = None
    if kb != k or batch is None:
        raise ShapeError(f"batched_sgemm: cannot multiply {a.shape} by {b.shape} "
                         f"(trans_b={trans_b})")
    shape = batch + (m, n)
    squeeze = tuple(i for i, one_d in ((-2, a.ndim == 1), (-1, b.ndim == 1)) if one_d)
    out = _writable_out(out, tuple(s for i, s in enumerate(shape) if i - len(shape)
                                   not in squeeze), "batched_sgemm")
    full = np.expand_dims(out, squeeze) if squeeze else out
    if full.size == 0:
        return out
    if not _unit_columns(full):
        return _via_contiguous(out, 0.0, lambda tmp: batched_sgemm(
            a, b, out=tmp, alpha=alpha, threads=threads, target=target))
    a2, b2 = np.broadcast_to(a2, batch + (m, k)), np.broadcast_to(b2, batch + (k, n))
    if _fold(a2, b2, full, alpha, threads, target):
        return out
    kernel = compile_gemm(None, (), target)
    layout = _Layout(_elements(a2.strides[-2:]), _elements(b2.strides[-2:]),
                     full.strides[-2] // F32, False)
    key = (kernel.config, threads or cpu_threads(), batch, m, n, k, a2.strides, b2.strides,
           full.strides)
    if key not in _batch_plans:  # the records at base addresses 0, made once per layout
        offsets = [_batch_offsets(arr, batch) for arr in (a2, b2, full)]
        plan = schedule([(m, n, k)] * len(offsets[0]), kernel.config, key[1], uniform=True)
        _batch_plans[key] = [np.array([layout.job(block, k, tuple(int(o[i]) for o in offsets),
                                                  (0, 0), []) for i, block in share],
                                      np.int64).reshape(-1, len(JOB_FIELDS)) for share in plan]
        if len(_batch_plans) > 256:
            _batch_plans.pop(next(iter(_batch_plans)))
    bases = np.zeros(len(JOB_FIELDS), np.int64)
    bases[3:6] = a2.ctypes.data, b2.ctypes.data, full.ctypes.data  # the a, b, c fields
    launch(kernel, layout, [share + bases for share in _batch_plans[key]], alpha, 0.0, 0)
    return out


_batch_plans: dict[tuple, list[np.ndarray]] = {}  # per layout: per thread, its job records


def _fold(a: np.ndarray, b: np.ndarray, out: np.ndarray, alpha: float, threads,
          target) -> bool:
    """a [..., M, K] @ shared b as one [(...)*M, K] GEMM, when a and out collapse without a
    copy and every batch stride of b is 0 (a broadcast weight). True when done."""
    if any(s for s in b.strides[:-2]):
        return False
    try:
        a2 = np.reshape(a, (-1, a.shape[-1]), copy=False)
        out2 = np.reshape(out, (-1, out.shape[-1]), copy=False)
    except ValueError:  # the layout needs a copy: run the batch instead
        return False
    sgemm(a2, b[(0,) * (b.ndim - 2)], out=out2, alpha=alpha, threads=threads, target=target)
    return True


def _batch_offsets(x: np.ndarray, batch: tuple[int, ...]) -> np.ndarray:
    """Byte offset of each batch item of x (row-major over `batch`), as int64 [prod(batch)]."""
    offsets = np.zeros(batch, np.int64)
    for axis, (size, stride) in enumerate(zip(batch, x.strides)):
        shape = [1] * len(batch)
        shape[axis] = size
        offsets = offsets + (np.arange(size, dtype=np.int64) * stride).reshape(shape)
    return offsets.reshape(-1)
