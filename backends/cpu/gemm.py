"""Packed, register-blocked fp32 GEMM rendered as LLVM IR text: C = alpha*A@B + beta*C, then an
elementwise epilogue (bias, activation, ...) on the final sum.

Structure is the BLIS/GotoBLAS one. For each NC-column block of B and KC-deep slice of K, B is
packed into NR-column panels (contiguous KC x NR, zero padded); for each MC-row block of A, A is
packed into MR-row panels (KC x MR). The micro-kernel keeps an MR x NR tile of C in vector
registers (MR x NV vectors of VL lanes) and runs one broadcast-FMA per row per vector per k. The B
micro-panel stays in L1 across the MR-row panels of the A block, which stays in L2. Strides are
runtime arguments, so one compile serves every shape and layout: B^T (torch Linear weights,
stored [N, K]) is just B with swapped strides, absorbed by the packing. A constant B (weights) can
be packed once, full K deep (`b_packed`): the driver then reads its panels in place.

Two epilogue kinds: `EpilogueOp`s act on the accumulator registers before the store (bias,
ReLU); a `TileEpilogue` is an LLVM function (rendered by the fusion code) that the driver calls
on each finished block of C in memory (MC rows x EPILOGUE_COLS columns), with the block's global
row/column, on the last K block.

A low-rank (LoRA) branch scale * (A @ D) @ U rides along: A @ D is computed as r side columns
from the same packed A blocks (no second read of A), and each finished tile gets its rank-r
update, one more micro-kernel call with K = r, before the tile epilogue (`_low_rank_down`).

Edges (M, N not multiples of MR, NR) are handled by packing zeros and, for a partial tile, running
the same store code on a stack tile copied in and out, so the epilogue is written once.
"""
from __future__ import annotations

import abc
import ctypes
import hashlib
import re
import threading
from dataclasses import dataclass, field

from .gemm_pack import PTR_ALIGN, render_pack_a, render_pack_b
from .irtext import FunctionWriter, fconst, vec
from .jit import HAND_VECTORIZED, HostTarget, JitError, default_engine, spin_pause

# The tile epilogue runs once per finished block of MC rows x this many columns (rounded to
# NR): ~120 KB of C, still in L2, whose epilogue operands stream row by row. Once per 6 x 16
# tile it cost 10-25 % of a fused GEMM (each call's operand rows were cold cache misses).
EPILOGUE_COLS = 256
# A job record of the batch entry (`render_jobs`): i64 words, then one pointer per column operand.
JOB_FIELDS = ("m", "n", "k", "a", "b", "c", "row0", "col0", "up", "tbuf")
# A pack record, ahead of the job records of a launch (same width, zero padded): NR-column
# panels of B's columns [c0, c0 + n), read at `b` with strides (rsb, csb), written at `dst`.
PACK_FIELDS = ("b", "rsb", "csb", "k", "n", "dst")
# The tile epilogue's parameters: (c, ldc, row0, col0, mr, nr, args), see `TileEpilogue`.
TILE_EPILOGUE_TYPES = ("ptr", "i64", "i64", "i64", "i64", "i64", "ptr")


def epilogue_block(cfg: GemmConfig) -> int:
    """The width of the C blocks the tile epilogue sees: EPILOGUE_COLS (at most NC) rounded to
    whole NR panels. Blocks start at multiples of it (the N blocks are multiples of it too),
    which a dual GEMM's column layout relies on (`threads.pack_dual`)."""
    return cfg.nr * max(1, min(EPILOGUE_COLS, cfg.nc) // cfg.nr)


@dataclass(frozen=True)
class GemmConfig:
    """Register tile MR x (NV*VL), cache blocks KC/MC/NC, and the text-level K unroll."""

    vl: int = 8
    mr: int = 6
    nv: int = 2
    kc: int = 256
    mc: int = 120
    nc: int = 4096
    unroll: int = 4

    @property
    def nr(self) -> int:
        return self.nv * self.vl

    def __post_init__(self) -> None:
        # Packed buffers are sized by MC/NC, so they must hold whole panels.
        assert self.mc % self.mr == 0 and self.nc % self.nr == 0, self

    @property
    def tag(self) -> str:
        return f"v{self.vl}m{self.mr}n{self.nr}k{self.kc}c{self.mc}x{self.nc}u{self.unroll}"


def default_config(target: HostTarget) -> GemmConfig:
    """Tile shapes that fill the vector register file: 32 zmm with AVX-512, 16 ymm with AVX2."""
    if target.has_avx512:
        # 8x32: 16 accumulators + 2 B vectors + a broadcast. NR = 32 divides the widths models
        # have (64-wide heads, 256, 768, ...): 8x48 computed 96 columns for a head's 64 and 288
        # for 256. Measured on Zen 4 (2 cores): as fast as 8x48 on 512^2..2048^2 and the
        # forward passes, 1.4x on the attention backward's [128, 128] x [128, 64] batches,
        # 5 % on the tiny GPT's train step. (On Zen 5, 8x48 was 5-8 % faster at 2048^2.)
        # KC = 512 covers the K = 512 of d = 512 models in one pass over C (KC = 384 made it
        # 384 + a 128-deep pass that reloads C and repacks A): on a Sapphire Rapids-class VM
        # the MoE layer 3.5 % and the GPT block 2 % faster (in-process A/B, alternating), large
        # squares alike; on Zen 4 the MoE layer measured the same.
        return GemmConfig(vl=16, mr=8, nv=2, kc=512, mc=96, nc=4096, unroll=4)
    # 6x16: 12 accumulators + 2 B vectors + a broadcast = 15 of 16 ymm. KC = 1024 (a 64 KB B
    # micro-panel, streamed from L2; MC x KC A block = 192 KB of the 512 KB L2) covers the
    # K = 512..1024 of the models in one pass over C. In-process A/B on 2 threads: KC = 512,
    # MC = 72 beat KC = 256, MC = 120 by 5-10 % on a Zen 2 VM; KC = 1024, MC = 48 beat that by
    # 2-5 % on a Zen 3 VM (512^2..2048^2, K = 1024 and 2048 model shapes; K = 256 and 512 the
    # same), the models within +-2 %. NC 1024..4096 measured the same.
    return GemmConfig(vl=8, mr=6, nv=2, kc=1024, mc=48, nc=2048, unroll=4)


# -- epilogues: elementwise ops on each finished output vector, emitted into the store path --


@dataclass(frozen=True)
class EpilogueOp(abc.ABC):
    """One elementwise step on an output vector `x`. `column_operands` extra float pointers (one
    value per output column, e.g. a bias) become kernel arguments; the fusion pass adds subclasses.
    """

    column_operands: int = field(default=0, init=False)

    @property
    def tag(self) -> str:
        return type(self).__name__.lower()

    @abc.abstractmethod
    def emit(self, w: FunctionWriter, x: str, width: int, operands: list[str]) -> str:
        """IR computing the new value of `x`; `operands` point at this vector's columns."""


@dataclass(frozen=True)
class ColumnBias(EpilogueOp):
    """x + bias[col] (Linear's bias)."""

    column_operands: int = field(default=1, init=False)

    def emit(self, w, x, width, operands):
        bias = w.load(vec(width), operands[0])
        return w.value(f"fadd {vec(width)} {x}, {bias}")


@dataclass(frozen=True)
class Relu(EpilogueOp):
    """max(x, 0); NaN propagates like torch.relu."""

    def emit(self, w, x, width, operands):
        v = vec(width)
        positive = w.value(f"fcmp ugt {v} {x}, zeroinitializer")  # true for NaN too
        return w.value(f"select <{width} x i1> {positive}, {v} {x}, {v} zeroinitializer")


def _n_column_operands(epilogue: tuple[EpilogueOp, ...]) -> int:
    return sum(op.column_operands for op in epilogue)


@dataclass(frozen=True)
class TileEpilogue:
    """An elementwise tail run on each finished C block in memory, as an LLVM function (rendered by
    the fusion code, docs/CPU_BACKEND.md). Its text is put into the GEMM module so LLVM can inline
    it: `define internal void @NAME(ptr %c, i64 %ldc, i64 %row0, i64 %col0, i64 %mr, i64 %nr,
    ptr %args)` updates C[row0:row0+mr, col0:col0+nr] (row stride ldc) in place. The module
    is compiled without LLVM's loop vectorizer: vector code runs at speed, scalar loops stay
    scalar."""

    name: str
    llvm_ir: str

    def __post_init__(self) -> None:
        # LLVM accepts a call whose type differs from the callee's (opaque pointers), so the
        # ABI is checked here rather than found as a crash.
        found = re.search(rf"define\s+(?:internal\s+)?void\s+@{re.escape(self.name)}\s*"
                          r"\(([^)]*)\)", self.llvm_ir)
        if found is None:
            raise JitError(f"tile epilogue text does not define 'void @{self.name}(...)'")
        types = tuple(p.split()[0] for p in found.group(1).split(",") if p.strip())
        if types != TILE_EPILOGUE_TYPES:
            raise JitError(f"tile epilogue @{self.name} takes ({', '.join(types)}), not the "
                           f"tile ABI ({', '.join(TILE_EPILOGUE_TYPES)})")

    @property
    def tag(self) -> str:
        """Names the compiled module: equal texts share one, different texts never collide."""
        return "te" + hashlib.sha1(self.llvm_ir.encode()).hexdigest()[:12]


# -- micro-kernel --


def render_microkernel(cfg: GemmConfig, name: str, epilogue: tuple[EpilogueOp, ...]) -> str:
    """MR x NR tile: acc = Ap^T Bp over kc, then C = alpha*acc + (first ? beta : 1)*C, and on the
    last K slice the register epilogues. `mr`/`nr` < MR/NR marks an edge tile. `pf`: memory
    to start fetching into L2 meanwhile, one 64-byte line per unrolled step (`_panels`).
    `k2` > 0: a second product added before the store, acc = alpha*acc + Ap2^T Bp2 over k2 (a
    LoRA branch's rank-r update of the finished tile, its scale already in Ap2), then stored
    with alpha 1: the tile goes to C once, not once per product."""
    cols = "".join(f", ptr %colop{i}" for i in range(_n_column_operands(epilogue)))
    w = FunctionWriter(
        f"internal void @{name}(i64 %kc, ptr noalias align {PTR_ALIGN} %ap, "
        f"ptr noalias align {PTR_ALIGN} %bp, ptr noalias %c, i64 %ldc, i64 %mr, i64 %nr, "
        f"i1 %first, i1 %last, float %alpha, float %beta, ptr %pf, i64 %k2, "
        f"ptr noalias align {PTR_ALIGN} %ap2, ptr noalias align {PTR_ALIGN} %bp2{cols})")
    _prefetch_c(w, cfg)
    v = vec(cfg.vl)
    accs = [[w.slot(v, "zeroinitializer", f"acc{i}_{j}") for j in range(cfg.nv)]
            for i in range(cfg.mr)]
    main = w.op("and", "%kc", str(-cfg.unroll))
    assert 16 % cfg.unroll == 0, cfg  # one 16-float line per unrolled step
    with w.loop("0", main, cfg.unroll, "k") as k:
        # No `inbounds`: the line may lie past the packed panels; a prefetch never faults.
        line = w.value(f"getelementptr float, ptr %pf, i64 {w.op('mul', k, str(16 // cfg.unroll))}",
                       "p")
        w.emit(f"call void @llvm.prefetch.p0(ptr {line}, i32 0, i32 2, i32 1)")
        for u in range(cfg.unroll):
            _rank1_update(w, cfg, accs, w.op("add", k, str(u)))
    with w.loop(main, "%kc", 1, "kt") as k:
        _rank1_update(w, cfg, accs, k)
    second = w.value("icmp sgt i64 %k2, 0")
    with w.if_(second, "second.scale"):
        alpha = w.splat("%alpha", cfg.vl)
        _update_slots(w, accs, v, lambda i, j, x: w.value(f"fmul {v} {x}, {alpha}"))
    with w.loop("0", "%k2", 1, "k2") as k:
        _rank1_update(w, cfg, accs, k, "%ap2", "%bp2")
    _store_tile(w, cfg, accs, epilogue, w.value(f"select i1 {second}, float {fconst(1.0)}, "
                                                f"float %alpha"))
    return w.text()


def _prefetch_c(w: FunctionWriter, cfg: GemmConfig) -> None:
    """Start fetching the C tile (for writing) before the K loop: C is touched only after it, and
    an M x N output larger than L2 would otherwise stall every tile store on L3/DRAM."""
    offsets = sorted(set(range(0, cfg.nr, 64 // 4)) | {cfg.nr - 1})  # every 64-byte line
    for i in range(cfg.mr):
        # No `inbounds`: rows past an edge tile's mr may lie outside C; a prefetch never faults.
        row = w.value(f"getelementptr float, ptr %c, i64 {w.op('mul', str(i), '%ldc')}", "p")
        for off in offsets:
            line = w.value(f"getelementptr float, ptr {row}, i64 {off}", "p")
            w.emit(f"call void @llvm.prefetch.p0(ptr {line}, i32 1, i32 3, i32 1)")


def _rank1_update(w: FunctionWriter, cfg: GemmConfig, accs, k: str, ap: str = "%ap",
                  bp: str = "%bp") -> None:
    """acc[i][j] += Ap[k, i] * Bp[k, j*VL:(j+1)*VL] for the whole register tile."""
    v = vec(cfg.vl)
    b_row = w.gep(bp, w.op("mul", k, str(cfg.nr)))
    bs = [w.load(v, w.gep(b_row, str(j * cfg.vl)), PTR_ALIGN) for j in range(cfg.nv)]
    a_col = w.gep(ap, w.op("mul", k, str(cfg.mr)))
    for i in range(cfg.mr):
        a = w.splat(w.load("float", w.gep(a_col, str(i))), cfg.vl)
        for j in range(cfg.nv):
            acc = w.load(v, accs[i][j], PTR_ALIGN)
            w.store(v, w.fma(a, bs[j], acc, cfg.vl), accs[i][j], PTR_ALIGN)


def _store_tile(w: FunctionWriter, cfg: GemmConfig, accs, epilogue, alpha: str) -> None:
    """Combine the tile with C and store. A partial tile goes through a stack copy of its C block
    (and of its column operands) so that one vector code path serves both cases."""
    vl, nr, v = cfg.vl, cfg.nr, vec(cfg.vl)
    n_cols = _n_column_operands(epilogue)
    tmp = w.slot(f"[{cfg.mr * nr} x float]", hint="ctile")
    tmp_cols = [w.slot(f"[{nr} x float]", hint="coltile") for _ in range(n_cols)]
    full = w.op("and", w.value(f"icmp eq i64 %mr, {cfg.mr}"), w.value(f"icmp eq i64 %nr, {nr}"),
                "i1")
    beta_zero = w.value("fcmp oeq float %beta, 0.0")
    need_c = w.value(f"xor i1 {w.op('and', '%first', beta_zero, 'i1')}, true")
    with w.if_(w.value(f"xor i1 {full}, true"), "edge.in"):
        with w.if_(need_c):
            _copy_block(w, "%c", "%ldc", tmp, str(nr), "%mr", "%nr")
        with w.if_("%last"):
            for i, dst in enumerate(tmp_cols):
                _copy_block(w, f"%colop{i}", "0", dst, "0", "1", "%nr")
    cdst = w.value(f"select i1 {full}, ptr %c, ptr {tmp}")
    ldd = w.value(f"select i1 {full}, i64 %ldc, i64 {nr}")
    col_ptrs = [w.value(f"select i1 {full}, ptr %colop{i}, ptr {t}")
                for i, t in enumerate(tmp_cols)]
    scale = w.value(f"select i1 %first, float %beta, float {fconst(1.0)}")
    alpha, scale_v = w.splat(alpha, vl), w.splat(scale, vl)
    tile_ptrs = [[w.gep(cdst, w.op("add", w.op("mul", str(i), ldd), str(j * vl)))
                  for j in range(cfg.nv)] for i in range(cfg.mr)]
    _update_slots(w, accs, v, lambda i, j, x: w.value(f"fmul {v} {x}, {alpha}"))
    with w.if_(need_c, "c.in"):
        _update_slots(w, accs, v, lambda i, j, x: w.fma(
            w.load(v, tile_ptrs[i][j]), scale_v, x, vl))
    if epilogue:
        with w.if_("%last", "epilogue"):
            _update_slots(w, accs, v, lambda i, j, x: _apply_epilogue(
                w, epilogue, x, vl, [w.gep(p, str(j * vl)) for p in col_ptrs]))
    for i in range(cfg.mr):
        for j in range(cfg.nv):
            w.store(v, w.load(v, accs[i][j], PTR_ALIGN), tile_ptrs[i][j])
    with w.if_(w.value(f"xor i1 {full}, true"), "edge.out"):
        _copy_block(w, tmp, str(nr), "%c", "%ldc", "%mr", "%nr")


def _update_slots(w: FunctionWriter, accs, v: str, fn) -> None:
    for i, row in enumerate(accs):
        for j, slot in enumerate(row):
            w.store(v, fn(i, j, w.load(v, slot, PTR_ALIGN)), slot, PTR_ALIGN)


def _apply_epilogue(w, epilogue, x: str, vl: int, col_ptrs: list[str]) -> str:
    taken = 0
    for op in epilogue:
        x = op.emit(w, x, vl, col_ptrs[taken:taken + op.column_operands])
        taken += op.column_operands
    return x


def _copy_block(w: FunctionWriter, src: str, lds: str, dst: str, ldd: str, rows: str,
                cols: str) -> None:
    """dst[i*ldd + j] = src[i*lds + j] for i < rows, j < cols (edge tiles only: not hot)."""
    with w.loop("0", rows, 1, "ci") as i:
        s_row, d_row = w.gep(src, w.op("mul", i, lds)), w.gep(dst, w.op("mul", i, ldd))
        with w.loop("0", cols, 1, "cj") as j:
            w.store("float", w.load("float", w.gep(s_row, j)), w.gep(d_row, j))


# -- driver: the five loops around the micro-kernel --

DRIVER_ARGS = ("i64 %M, i64 %N, i64 %K, ptr %A, i64 %rsa, i64 %csa, ptr %B, i64 %rsb, i64 %csb, "
               "ptr %C, i64 %ldc, float %alpha, float %beta, ptr %apack, ptr %bpack, "
               "i64 %b_packed, ptr %epi_args, i64 %row0, i64 %col0, "
               "ptr %side, i64 %rank, float %up_alpha, ptr %up, ptr %tbuf")


def render_driver(cfg: GemmConfig, name: str, names: dict[str, str], n_cols: int,
                  tile_epilogue: TileEpilogue | None = None) -> str:
    """`name(DRIVER_ARGS, colops...)`: C[M, N] of one call; (row0, col0) is its global offset
    for the tile epilogue. `b_packed` != 0: B is already packed full K deep (see `prepack_b`).
    `rank` > 0: a low-rank branch C += up_alpha * (A @ side) @ up in the same pass over A
    (`_low_rank_down`); `side` [K, rank] and `up` [rank, N] are packed like a prepacked B."""
    cols = "".join(f", ptr %colop{i}" for i in range(n_cols))
    w = FunctionWriter(f"void @{name}({DRIVER_ARGS}{cols})")
    kstep, mstep = _even_step(w, "%K", cfg.kc, 1), _even_step(w, "%M", cfg.mc, cfg.mr)
    # With a tile epilogue, N blocks are whole epilogue blocks, so every block it sees starts
    # at a multiple of its width (and they stay within NC: the packed-B buffer's width).
    unit = epilogue_block(cfg) if tile_epilogue else cfg.nr
    nstep = _even_step(w, "%N", cfg.nc // unit * unit, unit)
    # K == 0 still makes one pass with kc = 0: C = beta*C and the epilogues run exactly once.
    kend = w.value("call i64 @llvm.smax.i64(i64 %K, i64 1)")
    packed = w.value("icmp ne i64 %b_packed, 0")
    low_rank = w.value("icmp sgt i64 %rank, 0")
    with w.loop("0", "%N", nstep, "jc") as jc:
        nc = w.smin(nstep, w.op("sub", "%N", jc))
        with w.loop("0", kend, kstep, "pc") as pc:
            kc = w.smin(kstep, w.op("sub", "%K", pc))
            first = w.value(f"icmp eq i64 {pc}, 0")
            last = w.value(f"icmp sge i64 {w.op('add', pc, kc)}, %K")
            with w.if_(w.value(f"xor i1 {packed}, true"), "pack.b"):
                b_src = w.gep("%B", w.op("add", w.op("mul", pc, "%rsb"),
                                         w.op("mul", jc, "%csb")))
                w.emit(f"call void @{names['pack_b']}(ptr {b_src}, i64 %rsb, i64 %csb, "
                       f"i64 {kc}, i64 {nc}, ptr %bpack)")
            # Panel jr (a multiple of NR) starts at bbase + jr * pstride floats.
            packed_base = w.gep("%B", w.op("add", w.op("mul", jc, "%K"),
                                           w.op("mul", pc, str(cfg.nr))))
            bbase = w.value(f"select i1 {packed}, ptr {packed_base}, ptr %bpack")
            pstride = w.value(f"select i1 {packed}, i64 %K, i64 {kc}")
            lr_last = w.op("and", low_rank, last, "i1")
            with w.loop("0", "%M", mstep, "ic") as ic:
                mc = w.smin(mstep, w.op("sub", "%M", ic))
                a_src = w.gep("%A", w.op("add", w.op("mul", ic, "%rsa"), w.op("mul", pc, "%csa")))
                w.emit(f"call void @{names['pack_a']}(ptr {a_src}, i64 %rsa, i64 %csa, "
                       f"i64 {mc}, i64 {kc}, ptr %apack)")
                block = (ic, jc, mc, nc, kc, first, last, bbase, pstride, lr_last)
                with w.if_(w.op("and", low_rank, w.value(f"icmp eq i64 {jc}, 0"), "i1"),
                           "low.rank"):
                    _low_rank_down(w, cfg, names, n_cols, block, pc)
                with w.if_(lr_last, "low.rank.pack"):  # T's rows are final: panels for tiles
                    ldt = _side_ld(w, cfg)
                    rows = w.gep("%tbuf", w.op("mul", ic, ldt))
                    w.emit(f"call void @{names['pack_a']}(ptr {rows}, i64 {ldt}, i64 1, "
                           f"i64 {mc}, i64 %rank, ptr {_t_panels(w, cfg)})")
                _macro_kernel(w, cfg, names["ukernel"], n_cols, block, tile_epilogue)
    return w.text()


def _side_ld(w: FunctionWriter, cfg: GemmConfig) -> str:
    """Row stride of the low-rank intermediate T [M, rank] in %tbuf: rank rounded up to NR."""
    return w.op("mul", w.op("sdiv", w.op("add", "%rank", str(cfg.nr - 1)), str(cfg.nr)),
                str(cfg.nr))


def _t_panels(w: FunctionWriter, cfg: GemmConfig) -> str:
    """Where the MR-row panels of T's current rows go: after T, on a 64-byte boundary."""
    t_floats = w.op("mul", "%M", _side_ld(w, cfg))
    aligned = w.op("and", w.op("add", t_floats, str(PTR_ALIGN // 4 - 1)), str(-(PTR_ALIGN // 4)))
    return w.gep("%tbuf", aligned)


def _low_rank_down(w: FunctionWriter, cfg: GemmConfig, names: dict[str, str], n_cols: int,
                   block, pc: str) -> None:
    """T[rows] (+)= up_alpha * A block @ side, from the packed A block the main tiles use:
    LoRA's x·Aᵀ costs no second read of x, and its scale none either (the tiles add T @ up
    with alpha 1). T accumulates over the K blocks like C (`first`); it is made
    in the first column block, and every column block's last K block packs its final rows as
    MR panels for the tiles' rank-r update."""
    ic, _, mc, _, kc, first = block[:6]
    ldt = _side_ld(w, cfg)
    with w.loop("0", "%rank", cfg.nr, "sp") as sp:
        nr = w.smin(str(cfg.nr), w.op("sub", "%rank", sp))
        bp = w.gep("%side", w.op("add", w.op("mul", sp, "%K"), w.op("mul", pc, str(cfg.nr))))
        with w.loop("0", mc, cfg.mr, "sr") as ir:
            mr = w.smin(str(cfg.mr), w.op("sub", mc, ir))
            t = w.gep("%tbuf", w.op("add", w.op("mul", w.op("add", ic, ir), ldt), sp))
            ap = w.gep("%apack", w.op("mul", ir, kc))
            w.emit(f"call void @{names['ukernel']}(i64 {kc}, ptr {ap}, "
                   f"ptr {bp}, ptr {t}, i64 {ldt}, i64 {mr}, i64 {nr}, i1 {first}, i1 false, "
                   f"float %up_alpha, float {fconst(0.0)}, ptr {bp}, i64 0, ptr null, ptr null"
                   + ", ptr null" * n_cols + ")")


def _even_step(w: FunctionWriter, total: str, block: int, unit: int) -> str:
    """The block size that splits `total` into as few blocks of <= `block` as possible, all of
    about equal size (a multiple of `unit`): M = 512 in 120-row blocks would leave a thin 32."""
    ceil_blocks = w.op("sdiv", w.op("add", total, str(block - 1)), str(block))
    blocks = w.value(f"call i64 @llvm.smax.i64(i64 {ceil_blocks}, i64 1)")
    step = w.op("sdiv", w.op("add", total, w.op("sub", blocks, "1")), blocks)
    step = w.op("mul", w.op("sdiv", w.op("add", step, str(unit - 1)), str(unit)), str(unit))
    return w.value(f"call i64 @llvm.smax.i64(i64 {step}, i64 {unit})")


def _macro_kernel(w: FunctionWriter, cfg: GemmConfig, ukernel: str, n_cols: int, block,
                  tile_epilogue: TileEpilogue | None) -> None:
    """jr over NR panels of packed B (kept in L1), ir over MR panels of packed A (in L2); on the
    last K block, the tile epilogue on each finished mc x EPILOGUE_COLS block."""
    ic, jc, mc, nc, last = block[0], block[1], block[2], block[3], block[6]
    if tile_epilogue is None:
        _panels(w, cfg, ukernel, n_cols, block, "0", nc)
        return
    step = epilogue_block(cfg)
    with w.loop("0", nc, step, "jb") as jb:
        end = w.smin(w.op("add", jb, str(step)), nc)
        _panels(w, cfg, ukernel, n_cols, block, jb, end)
        with w.if_(last, "tile.epilogue"):
            col = w.op("add", jc, jb)
            c = w.gep("%C", w.op("add", w.op("mul", ic, "%ldc"), col))
            w.emit(f"call void @{tile_epilogue.name}(ptr {c}, i64 %ldc, "
                   f"i64 {w.op('add', '%row0', ic)}, i64 {w.op('add', '%col0', col)}, "
                   f"i64 {mc}, i64 {w.op('sub', end, jb)}, ptr %epi_args)")


def _panels(w: FunctionWriter, cfg: GemmConfig, ukernel: str, n_cols: int, block, j0: str,
            j1: str) -> None:
    """The micro-kernel on every MR x NR tile of columns [j0, j1) of the mc x nc block; with a
    low-rank branch, on the last K block each tile gets its rank-r update T[rows] @ up[:, cols]
    (T holds up_alpha * A @ side) in the same call, before its store and epilogues."""
    ic, jc, mc, nc, kc, first, last, bbase, pstride, lr_last = block
    t_panels = _t_panels(w, cfg)
    rank = w.value(f"select i1 {lr_last}, i64 %rank, i64 0")  # the tiles' second product
    share = w.op("mul", w.op("sdiv", kc, str(cfg.unroll)), "16")  # next-panel floats per call
    with w.loop(j0, j1, cfg.nr, "jr") as jr:
        nr = w.smin(str(cfg.nr), w.op("sub", nc, jr))
        col = w.op("add", jc, jr)
        bp = w.gep(bbase, w.op("mul", jr, pstride))
        # While the MR panels of A run against this B panel (in L1 after the first), each call
        # fetches its share of the next panel into L2 (kc / unroll lines of 16 floats), so
        # that panel's first pass does not wait on DRAM: prepacked weights of a model come
        # from memory (a MoE layer's grouped GEMMs ran ~20 % slower with their weights cold).
        next_bp = w.value(f"getelementptr float, ptr {bp}, i64 "
                          f"{w.op('mul', str(cfg.nr), pstride)}", "p")
        up = w.gep("%up", w.op("mul", col, "%rank"))
        col_args = "".join(f", ptr {w.gep(f'%colop{i}', col)}" for i in range(n_cols))
        with w.loop("0", mc, cfg.mr, "ir") as ir:
            mr = w.smin(str(cfg.mr), w.op("sub", mc, ir))
            ap = w.gep("%apack", w.op("mul", ir, kc))
            row = w.op("add", ic, ir)
            c = w.gep("%C", w.op("add", w.op("mul", row, "%ldc"), col))
            tile = f"ptr {c}, i64 %ldc, i64 {mr}, i64 {nr}"
            pf = w.value(f"getelementptr float, ptr {next_bp}, i64 "
                         f"{w.op('mul', w.op('sdiv', ir, str(cfg.mr)), share)}", "p")
            tp = w.gep(t_panels, w.op("mul", ir, "%rank"))
            w.emit(f"call void @{ukernel}(i64 {kc}, ptr {ap}, ptr {bp}, {tile}, i1 {first}, "
                   f"i1 {last}, float %alpha, float %beta, ptr {pf}, i64 {rank}, ptr {tp}, "
                   f"ptr {up}{col_args})")


JOBS_ARGS = ("i64 %njobs, i64 %npack, ptr %jobs, i64 %rsa, i64 %csa, i64 %rsb, i64 %csb, i64 %ldc, "
             "float %alpha, float %beta, ptr %apack, ptr %bpack, i64 %b_packed, ptr %epi_args, "
             "ptr %side, i64 %rank, float %up_alpha, ptr %claim, ptr %cbuf")


def render_jobs(name: str, names: dict[str, str], n_cols: int) -> str:
    """`name(JOBS_ARGS)`: the driver on records (JOB_FIELDS + column operand pointers, i64
    words) with shared strides: one native call runs a thread's share of a GEMM launch, instead
    of one Python call per matrix. The thread claims record indices from the i64 counter at
    `claim` (atomically) until one is >= `njobs`: with a counter of its own it runs a static
    list; with one counter shared by every thread of a launch, a core that a neighbour slows
    down takes fewer records. The first `npack` records are PACK_FIELDS: B packed on every
    core, in the same hand-off as the multiply (a pool dispatch of its own cost 5-10 % of a
    512^2 GEMM); `claim[1]` counts the finished ones, and a thread waits for all of them before
    its first job record. `cbuf`, unless null, replaces every record's C (a per-thread scratch C
    that the tile epilogue consumes, `threads.dual_sgemm`)."""
    width = len(JOB_FIELDS) + n_cols
    w = FunctionWriter(f"void @{name}({JOBS_ARGS})")
    cond, body, done = w.label("claim.cond"), w.label("claim.body"), w.label("claim.end")
    own_c = w.value("icmp eq ptr %cbuf, null")
    packed = w.gep("%claim", "1", "i64")
    w.emit(f"br label %{cond}")
    w.block(cond)
    job = w.value("atomicrmw add ptr %claim, i64 1 monotonic, align 8", "job")
    w.emit(f"br i1 {w.value(f'icmp slt i64 {job}, %njobs')}, label %{body}, label %{done}")
    w.block(body)
    rec = w.gep("%jobs", w.op("mul", job, str(width)), "i64")
    words = [w.load("i64", w.gep(rec, str(i), "i64"), 8) for i in range(width)]
    with w.if_else(w.value(f"icmp slt i64 {job}, %npack"), "pack") as otherwise:
        b, rsb, csb, k, n, dst = words[:len(PACK_FIELDS)]
        b, dst = (w.value(f"inttoptr i64 {x} to ptr") for x in (b, dst))
        w.emit(f"call void @{names['pack_b']}(ptr {b}, i64 {rsb}, i64 {csb}, i64 {k}, "
               f"i64 {n}, ptr {dst})")
        w.emit(f"atomicrmw add ptr {packed}, i64 1 release, align 8")
        otherwise()
        _wait_for(w, packed, "%npack")
        m, n, k, a, b, c, row0, col0, up, tbuf = words[:len(JOB_FIELDS)]
        a, b, c, up, tbuf, *cols = (w.value(f"inttoptr i64 {x} to ptr")
                                    for x in [a, b, c, up, tbuf, *words[len(JOB_FIELDS):]])
        c = w.value(f"select i1 {own_c}, ptr {c}, ptr %cbuf")
        w.emit(f"call void @{names['entry']}(i64 {m}, i64 {n}, i64 {k}, ptr {a}, i64 %rsa, "
               f"i64 %csa, ptr {b}, i64 %rsb, i64 %csb, ptr {c}, i64 %ldc, float %alpha, "
               f"float %beta, ptr %apack, ptr %bpack, i64 %b_packed, ptr %epi_args, "
               f"i64 {row0}, i64 {col0}, ptr %side, i64 %rank, float %up_alpha, ptr {up}, "
               f"ptr {tbuf}" + "".join(f", ptr {p}" for p in cols) + ")")
    w.emit(f"br label %{cond}")
    w.block(done)
    return w.text()


def _wait_for(w: FunctionWriter, counter: str, target: str) -> None:
    """Spin until the i64 at `counter` reaches `target` (acquire: what the other threads wrote
    before they counted is visible after)."""
    poll, pause, ready = w.label("wait.poll"), w.label("wait.pause"), w.label("wait.ready")
    w.emit(f"br label %{poll}")
    w.block(poll)
    now = w.value(f"load atomic i64, ptr {counter} acquire, align 8")
    w.emit(f"br i1 {w.value(f'icmp sge i64 {now}, {target}')}, label %{ready}, label %{pause}")
    w.block(pause)
    w.emit(spin_pause()[1])
    w.emit(f"br label %{poll}")
    w.block(ready)


# A pool worker's native task: `void @task(ptr %args, ptr %scratch)`, args = i64 words
# (TASK_FIELDS; alpha, beta and up_alpha as the bits of a double), scratch = the worker's own memory
# (>= task_scratch_bytes), holding its packed panels. It runs without the GIL (threads.py).
TASK_FIELDS = ("njobs", "npack", "jobs", "rsa", "csa", "rsb", "csb", "ldc", "alpha", "beta",
               "b_packed", "epi_args", "side", "rank", "up_alpha", "claim", "cbuf")


def task_scratch_bytes(cfg: GemmConfig) -> int:
    """Packed A then packed B, the B block 64-byte aligned."""
    return _a_pack_bytes(cfg) + 4 * cfg.kc * cfg.nc


def _a_pack_bytes(cfg: GemmConfig) -> int:
    return -(-4 * cfg.mc * cfg.kc // PTR_ALIGN) * PTR_ALIGN


def render_task(cfg: GemmConfig, name: str, jobs: str) -> str:
    """`name(args, scratch)`: the jobs entry with its arguments read from memory."""
    w = FunctionWriter(f"void @{name}(ptr %args, ptr align {PTR_ALIGN} %scratch)")
    words = {f: w.load("i64", w.gep("%args", str(i), "i64"), 8) for i, f in enumerate(TASK_FIELDS)}
    scalars = {f: w.value(f"fptrunc double {w.value(f'bitcast i64 {words[f]} to double')} to "
                          f"float") for f in ("alpha", "beta", "up_alpha")}
    ptrs = {f: w.value(f"inttoptr i64 {words[f]} to ptr")
            for f in ("jobs", "epi_args", "side", "claim", "cbuf")}
    bpack = w.gep("%scratch", str(_a_pack_bytes(cfg)), "i8")
    w.emit(f"call void @{jobs}(i64 {words['njobs']}, i64 {words['npack']}, "
           f"ptr {ptrs['jobs']}, i64 {words['rsa']}, "
           f"i64 {words['csa']}, i64 {words['rsb']}, i64 {words['csb']}, i64 {words['ldc']}, "
           f"float {scalars['alpha']}, float {scalars['beta']}, ptr %scratch, ptr {bpack}, "
           f"i64 {words['b_packed']}, ptr {ptrs['epi_args']}, ptr {ptrs['side']}, "
           f"i64 {words['rank']}, float {scalars['up_alpha']}, ptr {ptrs['claim']}, "
           f"ptr {ptrs['cbuf']})")
    return w.text()


INTRINSICS = """declare i64 @llvm.smin.i64(i64, i64)
declare i64 @llvm.smax.i64(i64, i64)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare <{vl} x float> @llvm.fma.v{vl}f32(<{vl} x float>, <{vl} x float>, <{vl} x float>)
"""


def _link_text(parts: list[str]) -> str:
    """Join IR texts keeping the first `declare` of each function: a tile epilogue's text may
    declare intrinsics the GEMM declares too, and LLVM rejects a second declaration."""
    seen: set[str] = set()
    lines = []
    for line in "\n".join(parts).splitlines():
        declared = re.match(r"\s*declare\b[^@]*@([-\w$.]+)\s*\(", line)
        if declared:
            if declared.group(1) in seen:
                continue
            seen.add(declared.group(1))
        lines.append(line)
    return "\n".join(lines) + "\n"


def module_names(cfg: GemmConfig, epilogue: tuple[EpilogueOp, ...] = (),
                 tile_epilogue: TileEpilogue | None = None) -> dict[str, str]:
    """The functions of one GEMM module; exported ones are unique per (config, epilogues)."""
    suffix = cfg.tag + "".join("_" + op.tag for op in epilogue)
    if tile_epilogue is not None:
        suffix += "_" + tile_epilogue.tag
    names = {k: f"lmc_gemm_{k}_{suffix}" for k in ("pack_a", "pack_b", "ukernel")}
    return names | {"entry": f"lmc_sgemm_{suffix}", "jobs": f"lmc_sgemm_jobs_{suffix}",
                    "task": f"lmc_sgemm_task_{suffix}"}


def render_gemm_module(cfg: GemmConfig, epilogue: tuple[EpilogueOp, ...] = (),
                       tile_epilogue: TileEpilogue | None = None) -> tuple[str, str]:
    """(entry function name, LLVM IR text) of a complete GEMM module for this config/epilogue."""
    names = module_names(cfg, epilogue, tile_epilogue)
    n_cols = _n_column_operands(epilogue)
    # Vector code written out (as attention and emit.module_text's kernels are): LLVM's
    # vectorizers and unroller would only add compile time (1.5 s -> 0.5 s, the same speed).
    parts = [HAND_VECTORIZED,
             f"; lmc fp32 GEMM {cfg}, epilogue {[op.tag for op in epilogue]}, tile epilogue "
             f"{tile_epilogue.name if tile_epilogue else None}",
             INTRINSICS.format(vl=cfg.vl) + spin_pause()[0],
             render_pack_a(cfg, names["pack_a"]), render_pack_b(cfg, names["pack_b"]),
             render_microkernel(cfg, names["ukernel"], epilogue),
             render_driver(cfg, names["entry"], names, n_cols, tile_epilogue),
             render_jobs(names["jobs"], names, n_cols),
             render_task(cfg, names["task"], names["jobs"])]
    if tile_epilogue is not None:
        parts.append(tile_epilogue.llvm_ir)
    return names["entry"], _link_text(parts)


# -- compiled kernel --

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_DRIVER_TYPES = [_I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _F32, _F32,
                 _PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _F32, _PTR, _PTR]
_JOBS_TYPES = [_I64, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _F32, _F32, _PTR, _PTR, _I64, _PTR,
               _PTR, _I64, _F32, _PTR, _PTR]


@dataclass
class GemmKernel:
    """A compiled GEMM: call it on raw pointers/strides (in elements) for one slice of the work."""

    config: GemmConfig
    epilogue: tuple[EpilogueOp, ...]
    tile_epilogue: TileEpilogue | None
    entry: str
    llvm_ir: str
    fn: object = field(repr=False)
    jobs_fn: object = field(repr=False)
    pack_b_fn: object = field(repr=False)
    task_address: int = 0  # the native task entry (TASK_FIELDS), for pool workers

    @property
    def n_column_operands(self) -> int:
        return _n_column_operands(self.epilogue)

    def __call__(self, m, n, k, a, rsa, csa, b, rsb, csb, c, ldc, alpha, beta, apack, bpack,
                 *cols, b_packed: bool = False, epi_args: int = 0, row0: int = 0,
                 col0: int = 0) -> None:
        self.fn(m, n, k, a, rsa, csa, b, rsb, csb, c, ldc, alpha, beta, apack, bpack,
                int(b_packed), epi_args, row0, col0, 0, 0, 0.0, 0, 0, *cols)

    def run_jobs(self, njobs: int, jobs: int, a_strides: tuple[int, int],
                 b_strides: tuple[int, int], ldc: int, alpha: float, beta: float, apack: int,
                 bpack: int, b_packed: bool, epi_args: int,
                 low_rank: tuple[int, int, float] = (0, 0, 0.0), claim: int = 0,
                 cbuf: int = 0, npack: int = 0) -> None:
        """The driver on the `njobs` records (the first `npack` PACK_FIELDS, then JOB_FIELDS +
        column operands) at address `jobs` whose indices this thread claims from the i64
        counters at `claim` (`render_jobs`; zeroed counters of the call's own when 0);
        `low_rank` = (side panels address, rank, up_alpha), rank 0 for none; `cbuf`: a C for
        every record, or 0."""
        counter = None if claim else (ctypes.c_int64 * 2)()  # kept alive through the call
        claim = claim or ctypes.addressof(counter)
        self.jobs_fn(njobs, npack, jobs, *a_strides, *b_strides, ldc, alpha, beta, apack, bpack,
                     int(b_packed), epi_args, *low_rank, claim, cbuf)


_kernels: dict[tuple, GemmKernel] = {}
_kernels_lock = threading.Lock()


def compile_gemm(cfg: GemmConfig | None = None, epilogue: tuple[EpilogueOp, ...] = (),
                 target: HostTarget | None = None,
                 tile_epilogue: TileEpilogue | None = None) -> GemmKernel:
    """The GEMM kernel for (config, epilogues, target), compiled once per process (~0.5 s)."""
    requested = (cfg, epilogue, target, tile_epilogue)
    kernel = _kernels.get(requested)  # the per-call path: one dict lookup, no lock
    if kernel is not None:
        return kernel
    engine = default_engine(target)
    cfg = cfg or default_config(engine.target)
    key = (cfg, epilogue, target, tile_epilogue)
    with _kernels_lock:
        if key not in _kernels:
            entry, text = render_gemm_module(cfg, epilogue, tile_epilogue)
            names = module_names(cfg, epilogue, tile_epilogue)
            module = engine.add_ir(entry, text)
            cols = [_PTR] * _n_column_operands(epilogue)
            _kernels[key] = GemmKernel(
                cfg, epilogue, tile_epilogue, entry, text,
                module.function(entry, None, *_DRIVER_TYPES, *cols),
                module.function(names["jobs"], None, *_JOBS_TYPES),
                module.function(names["pack_b"], None, _PTR, _I64, _I64, _I64, _I64, _PTR),
                engine.function_address(names["task"]))
        _kernels[requested] = _kernels[key]
        return _kernels[key]
