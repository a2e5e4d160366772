"""The memory plan: kernel outputs live in one arena per call shape, and buffers whose lifetimes
do not overlap share bytes.

Lifetimes are step intervals [first write, last read], where a read through a view (reshape,
permute, slice) counts as a read of the viewed buffer. Sizes depend on symbolic dims, so offsets
are assigned per binding of the symbols (greedy: largest buffer first, lowest offset that does
not overlap a live buffer) and cached; the arena is allocated once per binding and reused by every
call with those sizes.

A concat's operand that a kernel computes (through reshapes and permutes) can be *placed*: the
kernel writes straight into its slice of the concat's buffer, and the concat copies nothing
(`Placement`). Whether the views undo into strides is checked per binding; where they do not,
the operand gets its own buffer and the concat copies it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from lmc.ir.core import Op
from lmc.ir.types import Dim, TensorType, eval_shape

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


@dataclass(frozen=True)
class Placement:
    """Buffer `slot` stored inside buffer `into` (a concat's result): its value is the slice
    [offset, offset + width) of `into` on `axis`, seen through the inverse of `views` (the
    reshapes and permutes from the kernel's result to the concat operand, in that order)."""

    slot: int
    into: int
    axis: int
    before: tuple[Dim, ...]  # the widths of the concat operands ahead of this one
    width: Dim
    views: tuple[Op, ...]


@dataclass
class Layout:
    """Offsets of every planned buffer for one binding of the symbols, and the arena."""

    offsets: dict[int, int]
    nbytes: int
    unshared_bytes: int
    arena: np.ndarray = field(repr=False)
    placed: dict[int, tuple[Placement, Buffer]] = field(default_factory=dict)
    _views: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def view(self, buf: Buffer, env: dict[str, int]) -> np.ndarray:
        """The buffer's array in the arena (made once: the layout is per symbol binding, so
        every call with these sizes gets the same bytes)."""
        found = self._views.get(buf.slot)
        if found is not None:
            return found
        if buf.slot in self.placed:
            place, into = self.placed[buf.slot]
            view = placed_view(self.view(into, env), place, buf.type, env)
        else:
            start = self.offsets[buf.slot]
            view = _arrange(self.arena[start:], buf, env)
        self._views[buf.slot] = view
        return view

    def derived(self, slot: int, make, base: np.ndarray) -> np.ndarray:
        """The view `make()` of arena array `base` for result `slot`, made once per layout;
        a result that is a copy (a reshape the strides cannot express) is made every call."""
        found = self._views.get(slot)
        if found is not None:
            return found
        view = make()
        if np.may_share_memory(view, base):
            self._views[slot] = view
        return view


def _arrange(raw: np.ndarray, buf: Buffer, env: dict[str, int]) -> np.ndarray:
    """The buffer's array over bytes `raw` (as long as it needs or longer), or, when `raw` has
    the buffer's dtype already, over its elements."""
    dtype = buf.type.dtype.to_numpy()
    shape = eval_shape(buf.type.shape, env)
    count = int(np.prod(shape, dtype=np.int64))
    flat = raw[:count] if raw.dtype == dtype else raw[:count * dtype.itemsize].view(dtype)
    if buf.perm is None:
        return flat.reshape(shape)
    return flat.reshape([shape[p] for p in buf.perm]).transpose(np.argsort(buf.perm))


def placed_view(into: np.ndarray, place: Placement, t: TensorType,
                env: dict[str, int]) -> np.ndarray | None:
    """The placed buffer's array inside `into`, or None when a reshape would need a copy."""
    *before, width = eval_shape((*place.before, place.width), env)
    offset = sum(before)
    x = into[(slice(None),) * place.axis + (slice(offset, offset + width),)]
    for op in reversed(place.views):
        if op.name == "tensor.permute":
            x = x.transpose(np.argsort(op.perm))
            continue
        try:
            x = np.reshape(x, eval_shape(op.operand_values[0].type.shape, env), copy=False)
        except ValueError:
            return None
    return x if x.shape == eval_shape(t.shape, env) else None


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

    def __init__(self, buffers: list[Buffer], symbols: list[str],
                 placements: list[Placement] = ()):
        self.buffers = {b.slot: b for b in buffers}
        self.symbols = symbols
        self.placements = list(placements)
        self._layouts: dict[tuple[int, ...], Layout] = {}

    def layout(self, env: dict[str, int]) -> Layout:
        key = tuple(env[s] for s in self.symbols)
        layout = self._layouts.pop(key, None)
        if layout is None:
            layout = self._assign(env)
            if len(self._layouts) >= 8:
                self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = layout
        return layout

    def _assign(self, env: dict[str, int]) -> Layout:
        """Offsets for this binding: the placements whose views undo here share their concat's
        buffer, which then lives from the first of their writes to the last of their reads."""
        placed = {p.slot: p for p in self.placements if self._fits(p, env)}
        spans: dict[int, tuple[int, int]] = {}
        for p in placed.values():
            b, into = self.buffers[p.slot], self.buffers[p.into]
            start, end = spans.get(p.into, (into.start, into.end))
            spans[p.into] = (min(start, b.start), max(end, b.end))
        own = [replace(b, start=spans[b.slot][0], end=spans[b.slot][1]) if b.slot in spans
               else b for b in self.buffers.values() if b.slot not in placed]
        layout = assign(own, env)
        layout.placed = {s: (p, self.buffers[p.into]) for s, p in placed.items()}
        return layout

    def _fits(self, p: Placement, env: dict[str, int]) -> bool:
        """Whether the views undo into strides for these sizes, tried on an array that has the
        concat buffer's strides and no memory of its own (nothing reads or writes it)."""
        into = self.buffers[p.into]
        dtype = into.type.dtype.to_numpy()
        count = int(np.prod(eval_shape(into.type.shape, env), dtype=np.int64))
        fake = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), (count,), (dtype.itemsize,))
        return placed_view(_arrange(fake, into, env), p, self.buffers[p.slot].type,
                           env) is not None
