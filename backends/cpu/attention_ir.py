"""The LLVM IR of the flash-attention kernel (attention.py compiles and launches it): the
entry function over (batch·head, q-block) items, its two micro-kernels (S = Q·Kᵀ and O += P·V)
and the Kᵀ / V packing routines, with the args-block layout they share with the launcher.
"""
from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass, replace

from lmc.errors import ShapeError

from . import vmath
from .irtext import FunctionWriter, fconst, transpose, vec
from .jit import HAND_VECTORIZED, HostTarget

MASK_KINDS = ("none", "bool", "additive")
F32 = 4
NEG_INF = fconst(-math.inf)

# args block word indices: Tq, Tk, n_qblocks, n_dims, causal, scale come first
SCALE = 5
PTRS = 6  # q, k, v, mask, out
STRIDES = 11  # (row, col) per operand, same order
DIMS = 21
DIM_WORDS = 6  # size + one stride per operand
N_OPERANDS = 5
UNROLL_K = 4  # head-dim steps per iteration of the S micro-kernel's loop


@dataclass(frozen=True)
class AttentionConfig:
    """Vector width VL, q-block rows MR, key block NB = nv·VL, and the O-tile chunk of the P·V
    update in vectors (MR × ch accumulators)."""

    vl: int = 16
    mr: int = 8
    nv: int = 2
    ch: int = 2

    def __post_init__(self) -> None:
        # The row rescale factors exp(m_old − m_new) are computed as one vector of MR lanes.
        assert 1 <= self.mr <= self.vl, self

    @property
    def nb(self) -> int:
        return self.nv * self.vl

    @property
    def tag(self) -> str:
        return f"v{self.vl}m{self.mr}n{self.nb}c{self.ch}"


@functools.lru_cache(maxsize=16)
def default_config(target: HostTarget) -> AttentionConfig:
    """Tiles sized to the register file: the S tile (MR × nv) and the O chunk (MR × ch)."""
    if target.has_avx512:
        return AttentionConfig(vl=16, mr=8, nv=2, ch=2)  # 16 of 32 zmm per tile
    # 4 x 24 (12 of 16 ymm per tile) against 6 x 16, in-process A/B on a Zen 3 VM: causal
    # T = 128..512 5-9 % faster (128 rows are 32 whole q-blocks, the O tile is loaded and
    # rescaled once per 24 keys instead of 16), full T = 128 within 4 %, and the entry module
    # compiles in 0.19 s instead of 0.28 (on a cold compile's critical path).
    return AttentionConfig(vl=8, mr=4, nv=3, ch=3)


def one_row_config(cfg: AttentionConfig) -> AttentionConfig:
    """The 1-row q-block tiling: same key block (the Kᵀ panels are shared), one wide O chunk
    so that a single row still has several independent FMA chains."""
    return replace(cfg, mr=1, ch=4 * cfg.ch)


def _rup(x: int, m: int) -> int:
    return -(-x // m) * m


class _Writer:
    """Renders the attention entry function for one (config, D, Dv, mask kind)."""

    def __init__(self, cfg: AttentionConfig, d: int, dv: int, kind: str, names: dict[str, str]):
        self.cfg, self.d, self.dv, self.kind, self.names = cfg, d, dv, kind, names
        self.dvp = _rup(dv, cfg.vl)
        self.w = FunctionWriter(
            f"void @{names['entry']}(i64 %start, i64 %end, ptr %args, ptr %scratch)")
        self.v = vec(cfg.vl)

    def one_row(self) -> _Writer:
        """This writer (same function text) rendering q-blocks of one row with the 1-row
        micro-kernels."""
        row = copy.copy(self)
        row.cfg = one_row_config(self.cfg)
        row.names = {**self.names, "scores": self.names["scores1"], "pv": self.names["pv1"]}
        return row

    # -- small helpers --
    def arg(self, index: int | str) -> str:
        return self.w.load("i64", self.w.gep("%args", str(index), "i64"), 8)

    def ptr(self, base: str, offset: str, elem: str = "float") -> str:
        return self.w.gep(base, offset, elem)

    def smax(self, a: str, b: str) -> str:
        return self.w.value(f"call i64 @llvm.smax.i64(i64 {a}, i64 {b})")

    def select(self, cond: str, ty: str, a: str, b: str) -> str:
        return self.w.value(f"select i1 {cond}, {ty} {a}, {ty} {b}")

    def exp(self, x: str) -> str:
        return vmath.call(self.w, "exp", x, self.cfg.vl)

    def render(self) -> str:
        """The entry function: args words loaded once, then the loop over items [start, end)."""
        w = self.w
        p = {name: self.arg(i) for i, name in enumerate(("tq", "tk", "nqb", "ndims", "causal"))}
        p["scale"] = w.load("float", w.gep("%args", str(SCALE), "i64"))
        for i, name in enumerate(("q", "k", "v", "m", "o")):
            p[name] = w.value(f"inttoptr i64 {self.arg(PTRS + i)} to ptr")
            p[name + "t"], p[name + "d"] = self.arg(STRIDES + 2 * i), self.arg(STRIDES + 2 * i + 1)
        p["is_causal"] = w.value(f"icmp ne i64 {p['causal']}, 0")
        p["off"] = w.op("sub", p["tk"], p["tq"])
        nb = str(self.cfg.nb)
        p["tkp"] = w.op("mul", w.op("udiv", w.op("add", p["tk"], str(self.cfg.nb - 1)), nb), nb)
        p["vp"] = self.ptr("%scratch", w.op("mul", p["tkp"], str(self.d)))
        state = {"key": w.slot("i64", "-1", "packkey"), "vkey": w.slot("i64", "-1", "packvkey"),
                 "upto": w.slot("i64", "0", "packed")}
        with w.loop("%start", "%end", 1, "item") as item:
            self.item(p, state, item)
        return w.text()

    def offsets(self, p: dict, bh: str) -> list[str]:
        """Element offsets of (batch·head) index `bh` in q, k, v, mask, out."""
        w = self.w
        rem = w.slot("i64", bh, "rem")
        offs = [w.slot("i64", "0", f"off{i}") for i in range(N_OPERANDS)]
        with w.loop("0", p["ndims"], 1, "dim") as t:
            dim = w.op("sub", w.op("sub", p["ndims"], "1"), t)
            base = w.op("add", str(DIMS), w.op("mul", dim, str(DIM_WORDS)))
            size = self.arg(base)
            r = w.load("i64", rem, 8)
            idx = w.op("urem", r, size)
            w.store("i64", w.op("udiv", r, size), rem, 8)
            for o, slot in enumerate(offs):
                stride = self.arg(w.op("add", base, str(o + 1)))
                w.store("i64", w.op("add", w.load("i64", slot, 8), w.op("mul", idx, stride)),
                        slot, 8)
        return [w.load("i64", slot, 8) for slot in offs]

    def item(self, p: dict, state: dict, item: str) -> None:
        """One (batch·head, q-block) item: offsets, Kᵀ packing as needed, the q-block."""
        w, mr_c = self.w, str(self.cfg.mr)
        bh = w.op("udiv", item, p["nqb"])
        qb = w.op("sub", item, w.op("mul", bh, p["nqb"]))
        qo, ko, vo, mo, oo = self.offsets(p, bh)
        i0 = w.op("mul", qb, mr_c)
        mr = w.smin(mr_c, w.op("sub", p["tq"], i0))
        last = w.op("add", w.op("add", i0, mr), p["off"])  # keys < this reach some row
        kend = self.select(p["is_causal"], "i64", self.smax("0", w.smin(p["tk"], last)), p["tk"])
        first = w.op("add", w.op("add", i0, p["off"]), "1")  # keys < this reach every row
        flim = self.select(p["is_causal"], "i64", self.smax("0", w.smin(p["tk"], first)),
                           p["tk"])
        kbase, vbase = self.ptr(p["k"], ko), self.ptr(p["v"], vo)
        self.ensure_packed(p, state, (ko, vo), (kbase, vbase), kend)
        blk = {"i0": i0, "mr": mr, "kend": kend, "flim": flim, "q": self.ptr(p["q"], qo),
               "m": self.ptr(p["m"], mo, "i8" if self.kind == "bool" else "float"),
               "o": self.ptr(p["o"], oo)}
        # A lone row (decode, or Tq % MR == 1) has its own tiling: MR rows would compute the
        # same row MR times.
        with w.if_else(w.value(f"icmp eq i64 {mr}, 1"), "onerow") as otherwise:
            self.one_row().qblock(p, dict(blk))
            otherwise()
            self.qblock(p, dict(blk))

    def ensure_packed(self, p: dict, state: dict, offs, bases, kend: str) -> None:
        """Pack Kᵀ and V up to the key block holding kend − 1; a new (batch, kv head) starts
        over (GQA's query heads of one kv head reuse the packing)."""
        w, nb = self.w, str(self.cfg.nb)
        ko, vo = offs
        same = w.op("and", w.value(f"icmp eq i64 {ko}, {w.load('i64', state['key'], 8)}"),
                    w.value(f"icmp eq i64 {vo}, {w.load('i64', state['vkey'], 8)}"), "i1")
        with w.if_(w.value(f"xor i1 {same}, true"), "newhead"):
            w.store("i64", ko, state["key"], 8)
            w.store("i64", vo, state["vkey"], 8)
            w.store("i64", "0", state["upto"], 8)
        upto = w.load("i64", state["upto"], 8)
        need = w.smin(p["tk"], w.op("mul", w.op("udiv", w.op("add", kend, str(self.cfg.nb - 1)),
                                                nb), nb))
        with w.if_(w.value(f"icmp sgt i64 {need}, {upto}"), "pack"):
            w.emit(f"call void @{self.names['pack_k']}(ptr {bases[0]}, i64 {p['kt']}, "
                   f"i64 {p['kd']}, i64 {upto}, i64 {need}, i64 {p['tk']}, ptr %scratch)")
            w.emit(f"call void @{self.names['pack_v']}(ptr {bases[1]}, i64 {p['vt']}, "
                   f"i64 {p['vd']}, i64 {upto}, i64 {need}, ptr {p['vp']})")
            w.store("i64", need, state["upto"], 8)

    def qblock(self, p: dict, blk: dict) -> None:
        """MR query rows against key blocks [0, kend): online softmax, then O / l to out."""
        w, cfg = self.w, self.cfg
        rows = [w.smin(w.op("add", blk["i0"], str(i)), w.op("sub", p["tq"], "1"))
                for i in range(cfg.mr)]  # rows past Tq repeat the last one; never stored
        blk["rows"] = rows
        blk["qtile"] = self.q_tile(p, blk)
        lims = []
        for r in rows:
            lim = self.smax("0", w.smin(p["tk"], w.op("add", w.op("add", r, p["off"]), "1")))
            lim = self.select(p["is_causal"], "i64", lim, p["tk"])
            lims.append(self.splat_i32(w.value(f"trunc i64 {lim} to i32")))
        blk["lims"] = lims
        o_tile = w.slot(f"[{cfg.mr * self.dvp} x float]", hint="otile")
        w.emit(f"call void @llvm.memset.p0.i64(ptr align 64 {o_tile}, i8 0, "
               f"i64 {cfg.mr * self.dvp * F32}, i1 false)")
        blk["otile"] = o_tile
        blk["ptile"] = w.slot(f"[{cfg.mr * cfg.nb} x float]", hint="ptile")
        blk["stile"] = w.slot(f"[{cfg.mr * cfg.nb} x float]", hint="stile")
        blk["alpha"] = w.slot(f"[{cfg.mr} x float]", hint="alpha")
        elem = "i8" if self.kind == "bool" else "float"
        blk["mtile"] = w.slot(f"[{cfg.mr * cfg.nb} x {elem}]", hint="mtile")
        blk["mx"] = [w.slot("float", NEG_INF, f"m{i}") for i in range(cfg.mr)]
        blk["l"] = [w.slot(self.v, "zeroinitializer", f"l{i}") for i in range(cfg.mr)]
        with w.loop("0", blk["kend"], cfg.nb, "kb") as j0:
            s_slots = self.scores(blk, j0)
            self.apply_masks(p, blk, j0, s_slots)
            alphas = self.softmax(blk, s_slots)
            self.pv(p, blk, j0, alphas)
        self.store_out(p, blk)

    def splat_i32(self, value: str) -> str:
        w, n = self.w, self.cfg.vl
        one = w.value(f"insertelement <{n} x i32> poison, i32 {value}, i64 0")
        return w.value(f"shufflevector <{n} x i32> {one}, <{n} x i32> poison, "
                       f"<{n} x i32> zeroinitializer")

    def q_tile(self, p: dict, blk: dict) -> str:
        """The MR q rows times scale, copied to a stack tile [MR][D]: the S micro-kernel then
        broadcasts from constant offsets (row pointers would be hoisted and spilled)."""
        w, cfg, d, v, n = self.w, self.cfg, self.d, self.v, self.cfg.vl
        # + n: a row's last (partial) vector is stored whole, its zero lanes running into the
        # next row, which overwrites them, or, after the last row, into this slack.
        tile = w.slot(f"[{cfg.mr * max(d, 1) + n} x float]", hint="qtile")
        unit = w.value(f"icmp eq i64 {p['qd']}, 1")
        scale_v = w.splat(p["scale"], n)
        rows = [self.ptr(blk["q"], w.op("mul", r, p["qt"])) for r in blk["rows"]]
        with w.if_else(unit, "qcopy") as otherwise:
            ahead = w.op("mul", p["qt"], str(cfg.mr))  # the next q-block's rows
            for src in rows:
                _prefetch_row(w, src, ahead, d)
            for i, src in enumerate(rows):
                for c in range(0, d, n):
                    x = _load_vec(w, src, c, d, n)
                    w.store(self.v, w.value(f"fmul {v} {x}, {scale_v}"),
                            self.ptr(tile, str(i * d + c)), 4)
            otherwise()
            for i, src in enumerate(rows):
                with w.loop("0", str(d), 1, "qd") as k:
                    val = w.load("float", self.ptr(src, w.op("mul", k, p["qd"])))
                    w.store("float", w.value(f"fmul float {val}, {p['scale']}"),
                            self.ptr(tile, w.op("add", k, str(i * d))))
        return tile

    def scores(self, blk: dict, j0: str) -> list[list[str]]:
        """S tile (MR × NB) of this key block, by the scores micro-kernel; returns its slots."""
        w, cfg, v = self.w, self.cfg, self.v
        panel = self.ptr("%scratch", w.op("mul", j0, str(self.d)))
        w.emit(f"call void @{self.names['scores']}(ptr {blk['qtile']}, ptr {panel}, "
               f"ptr {blk['stile']})")
        return [[w.slot(v, w.load(v, self.ptr(blk["stile"], str(i * cfg.nb + j * cfg.vl)), 64),
                        f"s{i}_{j}") for j in range(cfg.nv)] for i in range(cfg.mr)]

    def apply_masks(self, p: dict, blk: dict, j0: str, s_slots) -> None:
        """-inf where j >= Tk, above the causal diagonal, or masked out; + an additive mask.
        Blocks wholly inside every row's allowed keys skip this when there is no mask."""
        w, cfg, v = self.w, self.cfg, self.v
        if self.kind == "none":
            cond = w.value(f"icmp sgt i64 {w.op('add', j0, str(cfg.nb))}, {blk['flim']}")
        else:
            cond = "true"
        with w.if_(cond, "masked"):
            mrows = self.mask_rows(p, blk, j0) if self.kind != "none" else None
            j32 = w.value(f"trunc i64 {j0} to i32")
            iota = "<" + ", ".join(f"i32 {x}" for x in range(cfg.vl)) + ">"
            for j in range(cfg.nv):
                base = self.splat_i32(w.op("add", j32, str(j * cfg.vl), "i32"))
                jv = w.value(f"add <{cfg.vl} x i32> {base}, {iota}")
                for i in range(cfg.mr):
                    keep = w.value(f"icmp slt <{cfg.vl} x i32> {jv}, {blk['lims'][i]}")
                    s = w.load(v, s_slots[i][j], 64)
                    if mrows is not None:
                        s, keep = self.mask_vector(mrows[i], j, s, keep)
                    neg = w.splat(NEG_INF, cfg.vl)
                    w.store(v, w.value(f"select <{cfg.vl} x i1> {keep}, {v} {s}, {v} {neg}"),
                            s_slots[i][j], 64)

    def mask_vector(self, row: str, j: int, s: str, keep: str) -> tuple[str, str]:
        """(S, keep) after mask vector j of a row: a bool mask narrows keep, a float one adds."""
        w, n = self.w, self.cfg.vl
        if self.kind == "bool":
            bits = w.load(f"<{n} x i8>", self.ptr(row, str(j * n), "i8"), 1)
            on = w.value(f"icmp ne <{n} x i8> {bits}, zeroinitializer")
            return s, w.value(f"and <{n} x i1> {keep}, {on}")
        add = w.load(self.v, self.ptr(row, str(j * n)))
        return w.value(f"fadd {self.v} {s}, {add}"), keep

    def mask_rows(self, p: dict, blk: dict, j0: str) -> list[str]:
        """Per-row pointers to NB mask values at key j0: the mask itself when its key stride is 1
        and the block is whole, else a stack tile gathered through the strides."""
        w, cfg = self.w, self.cfg
        elem = "i8" if self.kind == "bool" else "float"
        whole = w.value(f"icmp sle i64 {w.op('add', j0, str(cfg.nb))}, {p['tk']}")
        direct = w.op("and", whole, w.value(f"icmp eq i64 {p['md']}, 1"), "i1")
        srcs = [self.ptr(blk["m"], w.op("add", w.op("mul", r, p["mt"]), w.op("mul", j0, p["md"])),
                         elem) for r in blk["rows"]]
        with w.if_(w.value(f"xor i1 {direct}, true"), "mgather"):
            n = w.smin(str(cfg.nb), w.op("sub", p["tk"], j0))
            for i, src in enumerate(srcs):
                with w.loop("0", n, 1, "mj") as jj:
                    val = w.load(elem, self.ptr(src, w.op("mul", jj, p["md"]), elem), 1)
                    dst = self.ptr(blk["mtile"], w.op("add", jj, str(i * cfg.nb)), elem)
                    w.store(elem, val, dst, 1)
        return [self.select(direct, "ptr", src, self.ptr(blk["mtile"], str(i * cfg.nb), elem))
                for i, src in enumerate(srcs)]

    def softmax(self, blk: dict, s_slots) -> list[str]:
        """Online softmax step: new row maxima, P = exp(S − m) to the P tile, l updated;
        returns the per-row rescale factors exp(m_old − m_new) for O."""
        w, cfg, v, n = self.w, self.cfg, self.v, self.cfg.vl
        diffs, sums = [], []
        for i in range(cfg.mr):
            s = [w.load(v, slot, 64) for slot in s_slots[i]]
            m_old = w.load("float", blk["mx"][i])
            m_new = self.maximum("float", m_old, self.row_max(s))
            w.store("float", m_new, blk["mx"][i])
            # A row with no key yet keeps m = -inf: subtract 0 instead (no inf - inf = NaN).
            m_use = self.select(w.value(f"fcmp oeq float {m_new}, {NEG_INF}"), "float", "0.0",
                                m_new)
            diffs.append(w.value(f"fsub float {m_old}, {m_use}"))
            ms = w.splat(m_use, n)
            neg = w.splat(NEG_INF, n)
            total = None
            for j, x in enumerate(s):
                # Masked keys get exactly 0: vmath promises subnormal results only to 2 ulps,
                # and a tiny nonzero l would make a fully masked row an average of V, not 0.
                e = self.exp(w.value(f"fsub {v} {x}, {ms}"))
                masked = w.value(f"fcmp oeq {v} {x}, {neg}")
                e = w.value(f"select <{n} x i1> {masked}, {v} zeroinitializer, {v} {e}")
                w.store(v, e, self.ptr(blk["ptile"], str(i * cfg.nb + j * n)), 64)
                total = e if total is None else w.value(f"fadd {v} {total}, {e}")
            sums.append(total)
        dv = "zeroinitializer"
        for i, x in enumerate(diffs):
            dv = w.value(f"insertelement {v} {dv}, float {x}, i64 {i}")
        alpha_v = self.exp(dv)
        alphas = []
        for i in range(cfg.mr):
            a = w.value(f"extractelement {v} {alpha_v}, i64 {i}")
            l_new = w.fma(w.load(v, blk["l"][i], 64), w.splat(a, n), sums[i], n)
            w.store(v, l_new, blk["l"][i], 64)
            alphas.append(a)
        return alphas

    def maximum(self, ty: str, a: str, b: str) -> str:
        """a > b ? a : b, x86 max semantics: a NaN in S still reaches P (and so the output),
        where llvm.maxnum would drop it and nnan would make it poison."""
        gt = self.w.value(f"fcmp ogt {ty} {a}, {b}")
        return self.w.value(f"select {'i1' if ty == 'float' else f'<{self.cfg.vl} x i1>'} "
                            f"{gt}, {ty} {a}, {ty} {b}")

    def row_max(self, s: list[str]) -> str:
        """The max over a row's NB scores: elementwise over its vectors, then a shuffle tree."""
        w, v, n = self.w, self.v, self.cfg.vl
        top = s[0]
        for x in s[1:]:
            top = self.maximum(v, top, x)
        half = n // 2
        while half:
            mask = ", ".join(f"i32 {(x + half) % n}" for x in range(n))
            top = self.maximum(v, top, w.value(f"shufflevector {v} {top}, {v} poison, "
                                           f"<{n} x i32> <{mask}>"))
            half //= 2
        return w.value(f"extractelement {v} {top}, i64 0")

    def pv(self, p: dict, blk: dict, j0: str, alphas: list[str]) -> None:
        """O = alpha · O + P V over this block's keys, by the P·V micro-kernel."""
        w = self.w
        nbv = w.smin(str(self.cfg.nb), w.op("sub", blk["kend"], j0))
        for i, a in enumerate(alphas):
            w.store("float", a, self.ptr(blk["alpha"], str(i)))
        vrow = self.ptr(p["vp"], w.op("mul", j0, str(self.dvp)))
        w.emit(f"call void @{self.names['pv']}(ptr {blk['otile']}, ptr {blk['ptile']}, "
               f"ptr {vrow}, i64 {nbv}, ptr {blk['alpha']})")

    def store_out(self, p: dict, blk: dict) -> None:
        """out[i] = O[i] / l[i] for the block's real rows; fully masked rows (l = 0) get 0."""
        w, cfg, v, n = self.w, self.cfg, self.v, self.cfg.vl
        unit = w.value(f"icmp eq i64 {p['od']}, 1")
        for i in range(cfg.mr):
            with w.if_(w.value(f"icmp slt i64 {i}, {blk['mr']}"), "row"):
                total = w.value(f"call reassoc float @llvm.vector.reduce.fadd.v{n}f32("
                                f"float -0.0, {v} {w.load(v, blk['l'][i], 64)})")
                inv = self.select(w.value(f"fcmp ogt float {total}, 0.0"), "float",
                                  w.value(f"fdiv float 1.0, {total}"), "0.0")
                orow = self.ptr(blk["o"], w.op("mul", w.op("add", blk["i0"], str(i)), p["ot"]))
                src = self.ptr(blk["otile"], str(i * self.dvp))
                with w.if_else(unit, "ovec") as otherwise:
                    self.store_row_vectors(src, orow, w.splat(inv, n))
                    otherwise()
                    with w.loop("0", str(self.dv), 1, "od") as k:
                        x = w.value(f"fmul float {w.load('float', self.ptr(src, k))}, {inv}")
                        w.store("float", x, self.ptr(orow, w.op("mul", k, p["od"])))

    def store_row_vectors(self, src: str, dst: str, inv: str) -> None:
        """One O row times 1/l to a unit-stride out row; the tail is a masked store."""
        w, n = self.w, self.cfg.vl
        for c in range(self.dvp // n):
            x = w.value(f"fmul {self.v} {w.load(self.v, self.ptr(src, str(c * n)), 64)}, {inv}")
            at = self.ptr(dst, str(c * n))
            if self.dv - c * n >= n:
                w.store(self.v, x, at)
            else:
                w.emit(f"call void @llvm.masked.store.v{n}f32.p0({self.v} {x}, ptr {at}, "
                       f"i32 4, {_lanes(self.dv - c * n, n)})")


def render_scores(cfg: AttentionConfig, d: int, name: str) -> str:
    """S[MR][NB] = Q[MR][D] · panel[D][NB]: broadcast q[i, k] × NB/VL panel vectors, a loop over
    the head dim unrolled `UNROLL_K` deep. Fully unrolled, D = 64 was a 3 400-line function and
    the attention module took 0.65 s to compile, now 0.37 s, at the same speed. Its own
    (noinline) function so no q broadcast is hoisted into a spill."""
    v, n = vec(cfg.vl), cfg.vl
    w = FunctionWriter(f"internal void @{name}(ptr noalias %q, ptr noalias align 64 %k, "
                       f"ptr noalias align 64 %s) noinline")
    # Fewer than 8 accumulators cannot hide the FMA latency: split the head dim into `ways`
    # interleaved partial sums, added at the end.
    ways = max(1, 8 // (cfg.mr * cfg.nv))
    acc = [[[w.slot(v, "zeroinitializer", "acc") for _ in range(cfg.nv)] for _ in range(cfg.mr)]
           for _ in range(ways)]
    step = ways * max(1, UNROLL_K // ways)

    def rank1(k: str, part) -> None:
        kv = [w.load(v, w.gep("%k", w.op("add", w.op("mul", k, str(cfg.nb)), str(j * n))), 64)
              for j in range(cfg.nv)]
        for i in range(cfg.mr):
            qs = w.splat(w.load("float", w.gep("%q", w.op("add", k, str(i * d)))), n)
            for j in range(cfg.nv):
                w.store(v, w.fma(qs, kv[j], w.load(v, part[i][j], 64), n), part[i][j], 64)

    main = d - d % step
    with w.loop("0", str(main), step, "k") as k:
        for u in range(step):
            rank1(w.op("add", k, str(u)), acc[u % ways])
    for k in range(main, d):  # the tail, unrolled: D is a compile-time constant
        rank1(str(k), acc[k % ways])
    for i in range(cfg.mr):
        for j in range(cfg.nv):
            x = w.load(v, acc[0][i][j], 64)
            for part in acc[1:]:
                x = w.value(f"fadd {v} {x}, {w.load(v, part[i][j], 64)}")
            w.store(v, x, w.gep("%s", str(i * cfg.nb + j * n)), 64)
    return w.text()


def _load_vec(w: FunctionWriter, ptr: str, first: int, length: int, n: int) -> str:
    """n floats at ptr[first:], a masked load (no read past) where fewer than n remain."""
    at = w.gep(ptr, str(first))
    if length - first >= n:
        return w.load(vec(n), at)
    return w.value(f"call {vec(n)} @llvm.masked.load.v{n}f32.p0(ptr {at}, i32 4, "
                   f"{_lanes(length - first, n)}, {vec(n)} zeroinitializer)")


def _lanes(count: int, n: int) -> str:
    """The <n x i1> constant with the first `count` lanes on."""
    return f"<{n} x i1> <" + ", ".join("i1 1" if x < count else "i1 0" for x in range(n)) + ">"


def render_pv(cfg: AttentionConfig, dv: int, name: str) -> str:
    """O[i] = alpha[i] · O[i] + Σ_{j<n} P[i][j] · V[j] for the MR rows of the O tile (DvP wide),
    in chunks of `ch` vectors: MR × ch accumulators, a broadcast p[i, j] × V row vectors."""
    v, n = vec(cfg.vl), cfg.vl
    dvp = _rup(dv, n)
    w = FunctionWriter(f"internal void @{name}(ptr noalias align 64 %o, ptr noalias align 64 %p, "
                       f"ptr noalias align 64 %v, i64 %n, ptr noalias %alpha) noinline")
    alphas = [w.splat(w.load("float", w.gep("%alpha", str(i))), n) for i in range(cfg.mr)]
    for c0 in range(0, dvp // n, cfg.ch):
        chunk = range(c0, min(c0 + cfg.ch, dvp // n))
        optr = {(i, c): w.gep("%o", str(i * dvp + c * n)) for i in range(cfg.mr) for c in chunk}
        acc = {key: w.slot(v, w.value(f"fmul {v} {w.load(v, at, 64)}, {alphas[key[0]]}"), "o")
               for key, at in optr.items()}
        with w.loop("0", "%n", 1, "j") as j:
            vrow = w.gep("%v", w.op("mul", j, str(dvp)))
            vv = {c: w.load(v, w.gep(vrow, str(c * n)), 64) for c in chunk}
            for i in range(cfg.mr):
                ps = w.splat(w.load("float", w.gep("%p", w.op("add", j, str(i * cfg.nb)))), n)
                for c in chunk:
                    w.store(v, w.fma(ps, vv[c], w.load(v, acc[i, c], 64), n), acc[i, c], 64)
        for key, at in optr.items():
            w.store(v, w.load(v, acc[key], 64), at, 64)
    return w.text()


def _prefetch_row(w: FunctionWriter, row: str, ahead: str, d: int) -> None:
    """Prefetch the unit-stride row of d floats `ahead` elements past `row`: every 64-byte
    line of it, wherever it starts. The rows of q, k and v in a fused QKV output sit
    kilobytes apart, a stride the hardware prefetchers may not follow across pages (Zen 5,
    in-model A/B alternating: the attention steps 4 % faster). No `inbounds`: the row may lie
    past the operand; a prefetch never faults."""
    at = w.value(f"getelementptr float, ptr {row}, i64 {ahead}")
    for c in sorted({*range(0, d, 16), max(d - 1, 0)}):
        line = w.value(f"getelementptr float, ptr {at}, i64 {c}")
        w.emit(f"call void @llvm.prefetch.p0(ptr {line}, i32 0, i32 3, i32 1)")


def render_pack_k(cfg: AttentionConfig, d: int, name: str) -> str:
    """Keys [js, je) of K (strides st, sd; js a multiple of NB) -> Kᵀ panels of D×NB in `kt`.
    With a unit-stride head dim, VL keys × VL dims at a time go through an in-register
    transpose; the rest key by key. Keys Tk..NB-padding are zeroed once je reaches Tk, so
    padded lanes hold no stale NaN or denormal. `noinline` (as `render_pack_v`): one call per
    key block costs nothing, and inlined, its transposes made the attention module's O3 and
    codegen ~10 % slower."""
    nb, n = cfg.nb, cfg.vl
    w = FunctionWriter(f"internal void @{name}(ptr noalias %k, i64 %st, i64 %sd, i64 %js, "
                       f"i64 %je, i64 %tk, ptr noalias %kt) noinline")

    def dst_of(j: str) -> str:
        blk = w.op("udiv", j, str(nb))
        lane = w.op("sub", j, w.op("mul", blk, str(nb)))
        return w.gep("%kt", w.op("add", w.op("mul", blk, str(d * nb)), lane))

    unit = w.value("icmp eq i64 %sd, 1")
    whole = w.op("add", "%js", w.op("mul", w.op("udiv", w.op("sub", "%je", "%js"), str(n)),
                                    str(n)))
    with w.if_(unit, "vector"), w.loop("%js", whole, n, "jv") as j:
        srcs, dst = [w.gep("%k", w.op("mul", w.op("add", j, str(r)), "%st")) for r in range(n)], \
            dst_of(j)
        ahead = w.op("mul", "%st", str(nb))  # the next block's rows: the next pack reads them
        for src in srcs:
            _prefetch_row(w, src, ahead, d)
        # One VL x VL transpose per step of a loop, not D / VL of them written out: the same
        # speed (packing is memory-bound), and a third of the cold attention build's LLVM time.
        with w.loop("0", str(d - d % n), n, "dv") as d0:
            rows = [w.load(vec(n), w.gep(src, d0)) for src in srcs]
            for c, col in enumerate(transpose(w, rows, n)):
                w.store(vec(n), col, w.gep(dst, w.op("mul", w.op("add", d0, str(c)), str(nb))))
        for k in range(d - d % n, d):
            for r, src in enumerate(srcs):
                w.store("float", w.load("float", w.gep(src, str(k))), w.gep(dst, str(k * nb + r)))
    with w.loop(w.value(f"select i1 {unit}, i64 {whole}, i64 %js"), "%je", 1, "j") as j:
        src, dst = w.gep("%k", w.op("mul", j, "%st")), dst_of(j)
        with w.loop("0", str(d), 1, "d") as k:
            val = w.load("float", w.gep(src, w.op("mul", k, "%sd")))
            w.store("float", val, w.gep(dst, w.op("mul", k, str(nb))))
    with w.if_(w.value("icmp eq i64 %je, %tk"), "pad"):
        padded = w.op("mul", w.op("udiv", w.op("add", "%tk", str(nb - 1)), str(nb)), str(nb))
        with w.loop("%tk", padded, 1, "jp") as j:
            dst = dst_of(j)
            with w.loop("0", str(d), 1, "dp") as k:
                w.store("float", "0.0", w.gep(dst, w.op("mul", k, str(nb))))
    return w.text()


def render_pack_v(cfg: AttentionConfig, dv: int, name: str) -> str:
    """Rows [js, je) of V (strides st, sd) -> contiguous rows of DvP floats (zero tail) in `vp`:
    V rows read in place sit at the QKV row stride, which maps them onto few cache sets."""
    n, v = cfg.vl, vec(cfg.vl)
    dvp = _rup(dv, n)
    w = FunctionWriter(f"internal void @{name}(ptr noalias %v, i64 %st, i64 %sd, i64 %js, "
                       f"i64 %je, ptr noalias align 64 %vp) noinline")
    with w.if_else(w.value("icmp eq i64 %sd, 1"), "unit") as otherwise:
        with w.loop("%js", "%je", 1, "j") as j:
            src, dst = w.gep("%v", w.op("mul", j, "%st")), w.gep("%vp", w.op("mul", j, str(dvp)))
            _prefetch_row(w, src, w.op("mul", "%st", str(cfg.nb)), dv)
            for c in range(0, dvp, n):
                w.store(v, _load_vec(w, src, c, dv, n), w.gep(dst, str(c)), 64)
        otherwise()
        with w.loop("%js", "%je", 1, "js") as j:
            src, dst = w.gep("%v", w.op("mul", j, "%st")), w.gep("%vp", w.op("mul", j, str(dvp)))
            with w.loop("0", str(dv), 1, "d") as k:
                val = w.load("float", w.gep(src, w.op("mul", k, "%sd")))
                w.store("float", val, w.gep(dst, k))
            for k in range(dv, dvp):
                w.store("float", "0.0", w.gep(dst, str(k)))
    return w.text()


def _intrinsics(vl: int) -> set[str]:
    """The declarations of the LLVM intrinsics the attention functions call."""
    v = vec(vl)
    return {
        "declare i64 @llvm.smin.i64(i64, i64)",
        "declare i64 @llvm.smax.i64(i64, i64)",
        f"declare {v} @llvm.fma.v{vl}f32({v}, {v}, {v})",
        f"declare float @llvm.vector.reduce.fadd.v{vl}f32(float, {v})",
        f"declare {v} @llvm.masked.load.v{vl}f32.p0(ptr, i32, <{vl} x i1>, {v})",
        f"declare void @llvm.masked.store.v{vl}f32.p0({v}, ptr, i32, <{vl} x i1>)",
        "declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)",
        "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)",
    }


def render_attention_module(cfg: AttentionConfig, d: int, dv: int,
                            kind: str) -> tuple[str, tuple[str, str]]:
    """(entry function name, (the micro-kernels' module, the entry's module)) for these
    constants: two modules of about equal compile time (~0.15 s each on Zen 2, 0.33 s as one),
    which a cold build compiles side by side (`JitEngine.add_irs`); the entry's declares the
    micro-kernels (packing, scores, P·V), which the other module exports."""
    if kind not in MASK_KINDS:
        raise ShapeError(f"attention mask kind must be one of {MASK_KINDS}, got {kind!r}")
    suffix = f"d{d}_dv{dv}_{kind}_{cfg.tag}"
    names = {part: f"lmc_attention_{part}_{suffix}"
             for part in ("pack_k", "pack_v", "scores", "pv", "scores1", "pv1")}
    names["entry"] = f"lmc_attention_{suffix}"
    row = one_row_config(cfg)
    decls = sorted(_intrinsics(cfg.vl) | vmath.intrinsic_declarations([cfg.vl]))
    head = [HAND_VECTORIZED, f"; lmc flash attention D={d} Dv={dv} mask={kind} {cfg}", *decls,
            ""]
    micro = [render_pack_k(cfg, d, names["pack_k"]), render_pack_v(cfg, dv, names["pack_v"]),
             render_scores(cfg, d, names["scores"]), render_pv(cfg, dv, names["pv"]),
             render_scores(row, d, names["scores1"]), render_pv(row, dv, names["pv1"])]
    exported = [text.replace("define internal ", "define ", 1) for text in micro]
    kernels = "\n".join([*head, *exported])
    entry = "\n".join([*head, *map(_declaration, exported), "", vmath.render([cfg.vl]),
                       _Writer(cfg, d, dv, kind, names).render()])
    return names["entry"], (kernels, entry)


def _declaration(define: str) -> str:
    """`declare` of the function that the text `define`s (parameter types only)."""
    ret, name, params = re.match(r"define (\S+) (@[\w.]+)\((.*?)\)", define).groups()
    types = [p.split()[0] for p in params.split(",")]
    return f"declare {ret} {name}({', '.join(types)})"
