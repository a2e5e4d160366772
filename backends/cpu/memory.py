"""The memory plan: kernel outputs live in one arena per call shape, and buffers whose lifetimes
do not overlap share bytes.

Lifetimes are step intervals [first write, last read], where a read through a view (reshape,
permute, slice) counts as a read of the viewed buffer. Sizes depend on symbolic dims, so offsets
are assigned per binding of the symbols (greedy: largest buffer first, lowest offset that does
not overlap a live buffer) and cached; the arena is allocated once per binding and reused by every
call with those sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmc.ir.types import TensorType, eval_shape

ALIGN = 64  # bytes: vector loads of a buffer start on a cache line


@dataclass(frozen=True)
class Buffer:
    """One planned buffer: the value's type and the steps during which it must hold its data."""

    slot: int
    type: TensorType
    start: int
    end: int
    # Stored as `permute(value, perm)` would be, contiguous: when the value is only read
    # through that permute (attention heads merged back, `[B, H, T, d] → [B, T, H, d]`), the
    # reshape after it is a view instead of a copy. The kernel writes through strides.
    perm: tuple[int, ...] | None = None


@dataclass
class Layout:
    """Offsets of every planned buffer for one binding of the symbols, and the arena."""

    offsets: dict[int, int]
    nbytes: int
    unshared_bytes: int
    arena: np.ndarray = field(repr=False)
    _views: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def view(self, buf: Buffer, env: dict[str, int]) -> np.ndarray:
        """The buffer's array in the arena (made once: the layout is per symbol binding, so
        every call with these sizes gets the same bytes)."""
        found = self._views.get(buf.slot)
        if found is not None:
            return found
        dtype = buf.type.dtype.to_numpy()
        shape = eval_shape(buf.type.shape, env)
        count = int(np.prod(shape, dtype=np.int64))
        start = self.offsets[buf.slot]
        flat = self.arena[start:start + count * dtype.itemsize].view(dtype)
        if buf.perm is None:
            view = flat.reshape(shape)
        else:
            stored = flat.reshape([shape[p] for p in buf.perm])
            view = stored.transpose(np.argsort(buf.perm))
        self._views[buf.slot] = view
        return view


def _nbytes(t: TensorType, env: dict[str, int]) -> int:
    n = int(np.prod(eval_shape(t.shape, env), dtype=np.int64)) * t.dtype.to_numpy().itemsize
    return -(-n // ALIGN) * ALIGN


def assign(buffers: list[Buffer], env: dict[str, int]) -> Layout:
    """Greedy interval packing: largest first, at the lowest offset free during its lifetime."""
    sizes = {b.slot: _nbytes(b.type, env) for b in buffers}
    placed: list[tuple[int, int, Buffer]] = []  # (offset, size, buffer)
    offsets: dict[int, int] = {}
    for b in sorted(buffers, key=lambda b: (-sizes[b.slot], b.start)):
        live = sorted((o, s) for o, s, other in placed
                      if other.start <= b.end and b.start <= other.end)
        offset = 0
        for o, s in live:
            if offset + sizes[b.slot] <= o:
                break
            offset = max(offset, o + s)
        offsets[b.slot] = offset
        placed.append((offset, sizes[b.slot], b))
    nbytes = max((o + s for o, s, _ in placed), default=0)
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return Layout(offsets, nbytes, sum(sizes.values()), raw[skip:skip + nbytes])


class MemoryPlan:
    """The planned buffers of one function and their layouts, per symbol binding (LRU of 8)."""

    def __init__(self, buffers: list[Buffer], symbols: list[str]):
        self.buffers = {b.slot: b for b in buffers}
        self.symbols = symbols
        self._layouts: dict[tuple[int, ...], Layout] = {}

    def layout(self, env: dict[str, int]) -> Layout:
        key = tuple(env[s] for s in self.symbols)
        layout = self._layouts.pop(key, None)
        if layout is None:
            layout = assign(list(self.buffers.values()), env)
            if len(self._layouts) >= 8:
                self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = layout
        return layout
