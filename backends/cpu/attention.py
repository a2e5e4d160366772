"""Flash-style fp32 attention, softmax(q kᵀ · scale + mask) v, as one LLVM kernel that never
materializes the T×T score matrix.

Work items are (batch·head, q-block of MR rows); the launcher splits them over the cores. Per
item the kernel walks key blocks of NB keys: S = (scale·Q)·Kᵀ by a register-blocked micro-kernel
(a broadcast q[i, d] times NB/VL vectors of a packed Kᵀ panel), mask, online softmax (running
row max m and sum l; O is rescaled by exp(m_old − m_new)), then O += P·V by a second
micro-kernel (a broadcast p[i, j] times V row vectors; O lives in a stack tile). Key blocks above
the causal diagonal are never visited. Per (batch, kv head), Kᵀ (as D×NB panels) and V (as
contiguous rows) are packed into per-thread scratch, lazily, as far as this thread's q-blocks
reach; the q rows are copied, scaled, into a stack tile. Every operand is addressed through
per-dim strides in the args block, so the runtime's permuted, sliced and stride-0 broadcast
views go in as they are, never copied. A q-block with a single row (decode) runs 1-row
micro-kernels instead of computing that row MR times.

Args block (i64 words, strides in elements; a bool mask's element is one byte):
  Tq, Tk, n_qblocks, n_dims, causal, scale (fp32 bits in the low half),
  q, k, v, mask, out (addresses), then the (row, head-dim) strides of q, k, v, mask (i, j),
  out, then per outer dim (outermost first): size, and its stride in q, k, v, mask, out.
Grouped-query attention is an outer dim of size Hq/Hkv with k/v stride 0.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from lmc.errors import ShapeError

from .attention_ir import (
    F32,
    N_OPERANDS,
    AttentionConfig,
    _rup,
    default_config,
    render_attention_module,
)
from .jit import HostTarget, default_engine
from .pool import cpu_threads, pool, range_task, thread_buffer

# Below this many multiply-adds per thread per vector lane, waking the second core costs more
# than it saves (~100 us, see pool.py): half of GEMM's threshold, as attention runs at about
# half of GEMM's rate per core, so that is the same ~150 us of work per thread.
MIN_MACS_PER_THREAD_PER_LANE = 1 << 19


@dataclass
class AttentionKernel:
    """A compiled attention kernel: `fn(start, end, args, scratch)` runs items [start, end)."""

    config: AttentionConfig
    head_dim: int
    value_dim: int
    mask_kind: str
    entry: str
    modules: tuple[str, ...]  # LLVM IR texts, in load order
    fn: object = field(repr=False)

    @property
    def llvm_ir(self) -> str:
        return "\n".join(self.modules)

    def scratch_floats(self, tk: int) -> int:
        """Per-thread scratch: Kᵀ panels, then packed V rows."""
        tkp = _rup(tk, self.config.nb)
        return tkp * (self.head_dim + _rup(self.value_dim, self.config.vl))


_kernels: dict[tuple, AttentionKernel] = {}
_kernels_lock = threading.Lock()


def compile_attention(head_dim: int, value_dim: int, mask_kind: str,
                      target: HostTarget | None = None) -> AttentionKernel:
    """The kernel for (D, Dv, mask kind, target), compiled once per process and cached; D and Dv
    are compile-time constants so the head-dim loops unroll."""
    if head_dim < 0 or value_dim < 1:
        raise ShapeError(f"attention needs head_dim >= 0 and value_dim >= 1, got {head_dim}, "
                         f"{value_dim}")
    engine = default_engine(target)
    cfg = default_config(engine.target)
    key = (head_dim, value_dim, mask_kind, target, cfg)
    if key in _kernels:  # the per-call path: no lock once compiled
        return _kernels[key]
    # Compiled outside the lock: a kernel being compiled must not block lookups of compiled
    # ones (the engine dedups a text that two threads compile at once).
    entry, texts = render_attention_module(cfg, head_dim, value_dim, mask_kind)
    *_, module = engine.add_irs([(f"{entry}_kernels", texts[0]), (entry, texts[1])])
    fn = module.function(entry, None, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_void_p)
    with _kernels_lock:
        return _kernels.setdefault(key, AttentionKernel(cfg, head_dim, value_dim, mask_kind,
                                                        entry, texts, fn))


# -- launcher --


def _scratch(floats: int) -> np.ndarray:
    """This thread's scratch for an attention range run here."""
    return thread_buffer(floats, "attention")


def _elem_strides(x: np.ndarray) -> list[int]:
    size = x.itemsize
    return [s // size for s in x.strides]


def _outer_dims(views: list[np.ndarray | None], hkv: int, group: int) -> list[list[int]]:
    """[size, stride in q, k, v, mask, out] per outer dim (batch dims, kv head, group), with
    size-1 dims dropped and dims that are one linear range in every operand merged."""
    nb = views[0].ndim - 3
    strides = []
    for x, per_group in zip(views, (True, False, False, True, True)):
        if x is None:
            strides.append([0] * (nb + 2))
            continue
        s = _elem_strides(x)
        head = s[nb]
        strides.append([*s[:nb], head * group if per_group else head, head if per_group else 0])
    dims: list[list[int]] = []
    for t, size in enumerate([*views[0].shape[:nb], hkv, group]):
        if size == 1:
            continue
        row = [size, *(s[t] for s in strides)]
        if dims and all(dims[-1][o] == row[o] * size for o in range(1, N_OPERANDS + 1)):
            dims[-1] = [dims[-1][0] * size, *row[1:]]
        else:
            dims.append(row)
    return dims


def _args_block(views, dims, tq: int, tk: int, nqb: int, causal: bool,
                scale: float) -> np.ndarray:
    """The kernel's i64 args words (layout in the module docstring)."""
    scale_bits = int(np.float32(scale).view(np.uint32))
    words = [tq, tk, nqb, len(dims), int(causal), scale_bits]
    words += [0 if x is None else x.ctypes.data for x in views]
    for x in views:
        words += [0, 0] if x is None else _elem_strides(x)[-2:]
    for row in dims:
        words += row
    return np.array(words, np.int64)


def _partition(n_bh: int, tq: int, tk: int, causal: bool, cfg: AttentionConfig, macs_per_key: int,
               threads: int) -> list[tuple[int, int]]:
    """Contiguous item ranges of about equal work (causal q-blocks differ in key count)."""
    return _split(n_bh, tq, tk, causal, cfg, macs_per_key, threads, MIN_MACS_PER_THREAD_PER_LANE)


@functools.lru_cache(maxsize=512)
def _split(n_bh: int, tq: int, tk: int, causal: bool, cfg: AttentionConfig, macs_per_key: int,
           threads: int, min_macs: int) -> list[tuple[int, int]]:
    """_partition, cached: a pure function of sizes, and numpy calls cost ~µs each per call."""
    nqb = -(-tq // cfg.mr)
    i0 = np.arange(nqb) * cfg.mr
    rows = np.minimum(cfg.mr, tq - i0)
    keys = np.clip(i0 + rows + tk - tq, 0, tk) if causal else np.full(nqb, tk)
    macs = int((rows * keys).sum()) * n_bh * macs_per_key
    threads = max(1, min(threads, n_bh * nqb, macs // (min_macs * cfg.vl)))
    if threads == 1:
        return [(0, n_bh * nqb)]
    cost = -(-keys // cfg.nb) + 1  # key blocks, plus the q-block's own set-up and store
    prefix = np.concatenate([[0], np.cumsum(cost)])
    per_head = int(prefix[-1])
    cuts = [0]
    for t in range(1, threads):
        target = per_head * n_bh * t / threads
        bh = min(int(target // per_head), n_bh - 1)
        qb = int(np.searchsorted(prefix, target - bh * per_head))
        cuts.append(max(cuts[-1], min(bh * nqb + qb, n_bh * nqb)))
    cuts.append(n_bh * nqb)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _f32_view(x, name: str) -> np.ndarray:
    """x itself when it is float32 with element-multiple strides (always, for numpy views)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ShapeError(f"attention: {name} must be float32, got {x.dtype}")
    if any(s % F32 for s in x.strides):  # not addressable in elements: the one copy we make
        x = np.ascontiguousarray(x)
    return x


def _check_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    """The rules of tensor.attention's verifier, for direct callers."""
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ShapeError(f"attention needs q, k, v of one rank >= 3, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    hq, hkv = q.shape[-3], k.shape[-3]
    if (hkv == 0 or hq % hkv or q.shape[-1] != k.shape[-1] or k.shape[-3:-1] != v.shape[-3:-1]):
        raise ShapeError(f"attention operand shapes do not fit: q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")


def _mask_view(mask, scores: tuple[int, ...]) -> tuple[str, np.ndarray | None]:
    """(mask kind, the mask as a broadcast view of the full score shape)."""
    if mask is None:
        return "none", None
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        kind = "bool"
    elif mask.dtype == np.float32:
        kind, mask = "additive", _f32_view(mask, "mask")
    else:
        raise ShapeError(f"attention mask must be bool or float32, got {mask.dtype}")
    try:
        return kind, np.broadcast_to(mask, scores)
    except ValueError:
        raise ShapeError(f"attention mask {mask.shape} does not broadcast to scores "
                         f"{scores}") from None


def attention(q, k, v, mask=None, *, causal: bool = False, scale: float | None = None,
              out: np.ndarray | None = None, threads: int | None = None,
              target: HostTarget | None = None) -> np.ndarray:
    """softmax(q kᵀ · scale + mask) v for fp32 q[..., Hq, Tq, D], k/v[..., Hkv, Tk, D/Dv] of any
    strides (read in place); `mask` bool (True = keep) or additive, broadcast to the scores;
    `out` preallocated (any strides) or None. `target` overrides the host CPU (tests)."""
    q, k, v = _f32_view(q, "q"), _f32_view(k, "k"), _f32_view(v, "v")
    _check_shapes(q, k, v)
    (hq, tq, d), (hkv, tk), dv = q.shape[-3:], k.shape[-3:-1], v.shape[-1]
    try:
        if k.shape[:-3] != q.shape[:-3]:
            k = np.broadcast_to(k, q.shape[:-3] + k.shape[-3:])
        if v.shape[:-3] != q.shape[:-3]:
            v = np.broadcast_to(v, q.shape[:-3] + v.shape[-3:])
    except ValueError:
        raise ShapeError(f"attention: k {k.shape} / v {v.shape} batch dims do not broadcast to "
                         f"q {q.shape}") from None
    kind, m = _mask_view(mask, q.shape[:-1] + (tk,))
    shape = q.shape[:-1] + (dv,)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ShapeError(f"attention: out must be float32 {shape}, got {out.dtype} {out.shape}")
    if out.size == 0:
        return out
    if scale is None:
        if d == 0:
            raise ShapeError("attention: head dim 0 has no default scale 1/sqrt(D)")
        scale = 1.0 / math.sqrt(d)
    if any(s % F32 for s in out.strides):
        out[...] = attention(q, k, v, m, causal=causal, scale=scale, threads=threads,
                             target=target)
        return out
    if tk == 0:
        out[...] = 0.0
        return out
    _launch(compile_attention(d, dv, kind, target), [q, k, v, m, out], (hkv, hq // hkv),
            (tq, tk), causal, scale, threads)
    return out


def _launch(kernel: AttentionKernel, views, heads: tuple[int, int], t: tuple[int, int],
            causal: bool, scale: float, threads: int | None) -> None:
    """Split the (batch·head, q-block) items over the cores and run the kernel on each range."""
    cfg, (tq, tk) = kernel.config, t
    if max(tq, tk) >= 1 << 31:
        raise ShapeError(f"attention: sequence lengths {tq}, {tk} exceed the kernel's i32 keys")
    dims = _outer_dims(views, *heads)
    n_bh = math.prod(row[0] for row in dims)
    nqb = -(-tq // cfg.mr)
    args = _args_block(views, dims, tq, tk, nqb, causal, scale)
    floats = kernel.scratch_floats(tk)
    ranges = _partition(n_bh, tq, tk, causal, cfg, kernel.head_dim + kernel.value_dim,
                        threads or cpu_threads())
    args_ptr = args.ctypes.data

    def work(lo: int, hi: int) -> None:
        kernel.fn(lo, hi, args_ptr, _scratch(floats).ctypes.data)

    if len(ranges) == 1:
        work(*ranges[0])
    else:  # native hand-offs: a worker starts in ~13 us instead of ~90 us for a Python job
        address = ctypes.cast(kernel.fn, ctypes.c_void_p).value
        pool().run([range_task(address, lo, hi, args_ptr, F32 * floats, args)
                    for lo, hi in ranges])
