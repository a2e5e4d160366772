"""A small writer of LLVM IR function text: fresh SSA names, counted loops, ifs, vector helpers.

Loop counters and accumulators live in `alloca` slots; the O3 pipeline (SROA/mem2reg) turns them
into phis, so the text stays readable and straight-line while the machine code is register-only.
"""
from __future__ import annotations

import struct
from contextlib import contextmanager


def vec(width: int) -> str:
    return f"<{width} x float>"


def fconst(value: float) -> str:
    """An fp32 constant LLVM accepts: fp32 values written as the hex of their double."""
    as_f32 = struct.unpack("<f", struct.pack("<f", value))[0]
    return f"0x{struct.unpack('<Q', struct.pack('<d', as_f32))[0]:016X}"


def transpose(w: FunctionWriter, rows: list[str], t: int) -> list[str]:
    """t x t transpose of t vectors by block swaps: at block size b, rows i and i+b exchange
    their off-diagonal b-wide halves; each mask maps to one or two x86 shuffles."""
    v, b = vec(t), 1
    rows = list(rows)
    while b < t:
        for i in (i for i in range(t) if not i & b):
            lo = [p if not p & b else t + p - b for p in range(t)]
            hi = [p + b if not p & b else t + p for p in range(t)]
            pair = rows[i], rows[i + b]
            rows[i], rows[i + b] = (w.value(f"shufflevector {v} {pair[0]}, {v} {pair[1]}, "
                                            f"<{t} x i32> <{', '.join(f'i32 {x}' for x in m)}>")
                                    for m in (lo, hi))
        b *= 2
    return rows


class FunctionWriter:
    """Accumulates the text of one `define`; allocas go to the entry block so SROA promotes them."""

    def __init__(self, signature: str):
        self.signature = signature
        self._allocas: list[str] = []
        self._body: list[str] = []
        self._n = 0

    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"%{hint}{self._n}"

    def label(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def emit(self, line: str) -> None:
        self._body.append("  " + line)

    def value(self, expr: str, hint: str = "t") -> str:
        name = self.fresh(hint)
        self.emit(f"{name} = {expr}")
        return name

    def block(self, name: str) -> None:
        self._body.append(f"{name}:")

    def slot(self, ty: str, init: str | None = None, hint: str = "v") -> str:
        """A mutable local (alloca in entry); stored with `init` here if given."""
        ptr = self.fresh(hint + ".p")
        self._allocas.append(f"  {ptr} = alloca {ty}, align 64")
        if init is not None:
            self.emit(f"store {ty} {init}, ptr {ptr}")
        return ptr

    # -- integer and pointer arithmetic (i64 indices, float elements) --
    def op(self, name: str, a: str, b: str, ty: str = "i64") -> str:
        return self.value(f"{name} {ty} {a}, {b}")

    def smin(self, a: str, b: str) -> str:
        return self.value(f"call i64 @llvm.smin.i64(i64 {a}, i64 {b})")

    def gep(self, ptr: str, index: str, elem: str = "float") -> str:
        return self.value(f"getelementptr inbounds {elem}, ptr {ptr}, i64 {index}", "p")

    def load(self, ty: str, ptr: str, align: int = 4) -> str:
        return self.value(f"load {ty}, ptr {ptr}, align {align}")

    def store(self, ty: str, val: str, ptr: str, align: int = 4) -> None:
        self.emit(f"store {ty} {val}, ptr {ptr}, align {align}")

    def splat(self, scalar: str, width: int) -> str:
        v = vec(width)
        one = self.value(f"insertelement {v} poison, float {scalar}, i64 0")
        return self.value(f"shufflevector {v} {one}, {v} poison, <{width} x i32> zeroinitializer")

    def fma(self, a: str, b: str, c: str, width: int) -> str:
        v = vec(width)
        return self.value(f"call {v} @llvm.fma.v{width}f32({v} {a}, {v} {b}, {v} {c})")

    # -- control flow --
    @contextmanager
    def loop(self, start: str, end: str, step: str | int = 1, hint: str = "i"):
        """for (iv = start; iv < end; iv += step): yields the induction value."""
        slot = self.slot("i64", start, hint)
        cond, body, done = self.label(hint + ".cond"), self.label(hint + ".body"), \
            self.label(hint + ".end")
        self.emit(f"br label %{cond}")
        self.block(cond)
        iv = self.load("i64", slot, 8)
        more = self.value(f"icmp slt i64 {iv}, {end}")
        self.emit(f"br i1 {more}, label %{body}, label %{done}")
        self.block(body)
        yield iv
        nxt = self.op("add", iv, str(step))
        self.store("i64", nxt, slot, 8)
        self.emit(f"br label %{cond}")
        self.block(done)

    @contextmanager
    def if_(self, cond: str, hint: str = "if"):
        then, done = self.label(hint + ".then"), self.label(hint + ".end")
        self.emit(f"br i1 {cond}, label %{then}, label %{done}")
        self.block(then)
        yield
        self.emit(f"br label %{done}")
        self.block(done)

    @contextmanager
    def if_else(self, cond: str, hint: str = "if"):
        """`with w.if_else(c) as otherwise:` then-code; `otherwise()`; else-code."""
        then, other, done = (self.label(hint + s) for s in (".then", ".else", ".end"))
        self.emit(f"br i1 {cond}, label %{then}, label %{other}")
        self.block(then)
        switched: list[bool] = []

        def otherwise() -> None:
            self.emit(f"br label %{done}")
            self.block(other)
            switched.append(True)

        yield otherwise
        if not switched:
            otherwise()
        self.emit(f"br label %{done}")
        self.block(done)

    def text(self) -> str:
        return "\n".join([f"define {self.signature} {{", "entry:", *self._allocas,
                          *self._body, "  ret void", "}", ""])
