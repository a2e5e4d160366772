"""Packed, register-blocked fp32 GEMM rendered as LLVM IR text: C = alpha*A@B + beta*C, then an
elementwise epilogue (bias, activation, ...) on the final sum.

Structure is the BLIS/GotoBLAS one. For each NC-column block of B and KC-deep slice of K, B is
packed into NR-column panels (contiguous KC x NR, zero padded); for each MC-row block of A, A is
packed into MR-row panels (KC x MR). The micro-kernel keeps an MR x NR tile of C in vector
registers (MR x NV vectors of VL lanes) and runs one broadcast-FMA per row per vector per k. The B
micro-panel stays in L1 across the MR-row panels of the A block, which stays in L2. Strides are
runtime arguments, so one compile serves every shape and layout: B^T (torch Linear weights,
stored [N, K]) is just B with swapped strides, absorbed by the packing.

Edges (M, N not multiples of MR, NR) are handled by packing zeros and, for a partial tile, running
the same store code on a stack tile copied in and out, so the epilogue is written once.
"""
from __future__ import annotations

import abc
import ctypes
import threading
from dataclasses import dataclass, field

from .irtext import FunctionWriter, fconst, vec
from .jit import HostTarget, default_engine

PTR_ALIGN = 64  # packed buffers are allocated 64-byte aligned (see threads.py)


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
        # 8x48: 24 accumulators + 3 B vectors + a broadcast. Measured on Zen 5 (2 cores):
        # ~same as 12x32 up to 1024^2, 5-8% faster at 2048^2 (fewer A broadcasts per FMA).
        return GemmConfig(vl=16, mr=8, nv=3, kc=384, mc=96, nc=4032, unroll=4)
    # 6x16: 12 accumulators + 2 B vectors + a broadcast = 15 of 16 ymm. KC x NR B micro-panel
    # = 16 KB (half of Zen 3's L1d); MC x KC A block = 120 KB (a quarter of its 512 KB L2).
    return GemmConfig(vl=8, mr=6, nv=2, kc=256, mc=120, nc=4096, unroll=4)


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


# -- packing --


def render_pack_a(cfg: GemmConfig, name: str) -> str:
    """A[mc, kc] (strides rsa, csa) -> MR-row panels, each kc x MR contiguous, rows zero padded."""
    mr = cfg.mr
    w = FunctionWriter(f"internal void @{name}(ptr noalias %a, i64 %rsa, i64 %csa, i64 %mc, "
                       f"i64 %kc, ptr noalias %ap)")
    with w.loop("0", "%mc", mr, "ir") as ir:
        rows = w.smin(str(mr), w.op("sub", "%mc", ir))
        dst = w.gep("%ap", w.op("mul", ir, "%kc"))
        src = w.gep("%a", w.op("mul", ir, "%rsa"))
        with w.if_else(w.value(f"icmp eq i64 {rows}, {mr}")) as otherwise:
            # Full panel: MR row streams read together, one contiguous MR-float write per k.
            row_ptrs = [w.gep(src, w.op("mul", str(i), "%rsa")) for i in range(mr)]
            with w.loop("0", "%kc", 1, "k") as k:
                koff = w.op("mul", k, "%csa")
                out = w.gep(dst, w.op("mul", k, str(mr)))
                for i, row in enumerate(row_ptrs):
                    w.store("float", w.load("float", w.gep(row, koff)), w.gep(out, str(i)))
            otherwise()
            _pack_edge(w, src, "%rsa", "%csa", rows, dst, mr)
    return w.text()


def render_pack_b(cfg: GemmConfig, name: str) -> str:
    """B[kc, nc] (strides rsb, csb) -> NR-column panels, each kc x NR contiguous, zero padded."""
    nr = cfg.nr
    w = FunctionWriter(f"internal void @{name}(ptr noalias %b, i64 %rsb, i64 %csb, i64 %kc, "
                       f"i64 %nc, ptr noalias %bp)")
    unit = w.value("icmp eq i64 %csb, 1")
    with w.loop("0", "%nc", nr, "jr") as jr:
        cols = w.smin(str(nr), w.op("sub", "%nc", jr))
        dst = w.gep("%bp", w.op("mul", jr, "%kc"))
        src = w.gep("%b", w.op("mul", jr, "%csb"))
        full = w.value(f"icmp eq i64 {cols}, {nr}")
        with w.if_else(w.op("and", full, unit, "i1")) as otherwise:
            # Row-major B: each k row of the panel is one contiguous NR-float vector copy.
            with w.loop("0", "%kc", 1, "k") as k:
                row = w.load(vec(nr), w.gep(src, w.op("mul", k, "%rsb")))
                w.store(vec(nr), row, w.gep(dst, w.op("mul", k, str(nr))), PTR_ALIGN)
            otherwise()
            # B^T or strided, or a partial panel: column streams, each contiguous when csb==ldb.
            _pack_edge(w, src, "%csb", "%rsb", cols, dst, nr)
    return w.text()


def _pack_edge(w: FunctionWriter, src: str, lane_stride: str, k_stride: str, lanes: str,
               dst: str, width: int) -> None:
    """dst[k*width + l] = src[l*lane_stride + k*k_stride] for l < lanes, else 0."""
    with w.loop("0", str(width), 1, "l") as lane:
        out = w.gep(dst, lane)
        with w.if_else(w.value(f"icmp slt i64 {lane}, {lanes}")) as otherwise:
            line = w.gep(src, w.op("mul", lane, lane_stride))
            with w.loop("0", "%kc", 1, "k") as k:
                val = w.load("float", w.gep(line, w.op("mul", k, k_stride)))
                w.store("float", val, w.gep(out, w.op("mul", k, str(width))))
            otherwise()
            with w.loop("0", "%kc", 1, "k") as k:
                w.store("float", "0.0", w.gep(out, w.op("mul", k, str(width))))


# -- micro-kernel --


def render_microkernel(cfg: GemmConfig, name: str, epilogue: tuple[EpilogueOp, ...]) -> str:
    """MR x NR tile: acc = Ap^T Bp over kc, then C = alpha*acc + (first ? beta : 1)*C, and on the
    last K slice the epilogue. `mr`/`nr` < MR/NR marks an edge tile."""
    cols = "".join(f", ptr %col{i}" for i in range(_n_column_operands(epilogue)))
    w = FunctionWriter(
        f"internal void @{name}(i64 %kc, ptr noalias align {PTR_ALIGN} %ap, "
        f"ptr noalias align {PTR_ALIGN} %bp, ptr noalias %c, i64 %ldc, i64 %mr, i64 %nr, "
        f"i1 %first, i1 %last, float %alpha, float %beta{cols})")
    v = vec(cfg.vl)
    accs = [[w.slot(v, "zeroinitializer", f"acc{i}_{j}") for j in range(cfg.nv)]
            for i in range(cfg.mr)]
    main = w.op("and", "%kc", str(-cfg.unroll))
    with w.loop("0", main, cfg.unroll, "k") as k:
        for u in range(cfg.unroll):
            _rank1_update(w, cfg, accs, w.op("add", k, str(u)))
    with w.loop(main, "%kc", 1, "kt") as k:
        _rank1_update(w, cfg, accs, k)
    _store_tile(w, cfg, accs, epilogue)
    return w.text()


def _rank1_update(w: FunctionWriter, cfg: GemmConfig, accs, k: str) -> None:
    """acc[i][j] += Ap[k, i] * Bp[k, j*VL:(j+1)*VL] for the whole register tile."""
    v = vec(cfg.vl)
    b_row = w.gep("%bp", w.op("mul", k, str(cfg.nr)))
    bs = [w.load(v, w.gep(b_row, str(j * cfg.vl)), PTR_ALIGN) for j in range(cfg.nv)]
    a_col = w.gep("%ap", w.op("mul", k, str(cfg.mr)))
    for i in range(cfg.mr):
        a = w.splat(w.load("float", w.gep(a_col, str(i))), cfg.vl)
        for j in range(cfg.nv):
            acc = w.load(v, accs[i][j], PTR_ALIGN)
            w.store(v, w.fma(a, bs[j], acc, cfg.vl), accs[i][j], PTR_ALIGN)


def _store_tile(w: FunctionWriter, cfg: GemmConfig, accs, epilogue) -> None:
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
                _copy_block(w, f"%col{i}", "0", dst, "0", "1", "%nr")
    cdst = w.value(f"select i1 {full}, ptr %c, ptr {tmp}")
    ldd = w.value(f"select i1 {full}, i64 %ldc, i64 {nr}")
    col_ptrs = [w.value(f"select i1 {full}, ptr %col{i}, ptr {t}") for i, t in enumerate(tmp_cols)]
    scale = w.value(f"select i1 %first, float %beta, float {fconst(1.0)}")
    alpha, scale_v = w.splat("%alpha", vl), w.splat(scale, vl)
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


def render_driver(cfg: GemmConfig, name: str, names: dict[str, str], n_cols: int) -> str:
    """`name(M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, alpha, beta, apack, bpack, cols...)`."""
    cols = "".join(f", ptr %col{i}" for i in range(n_cols))
    w = FunctionWriter(
        f"void @{name}(i64 %M, i64 %N, i64 %K, ptr %A, i64 %rsa, i64 %csa, ptr %B, i64 %rsb, "
        f"i64 %csb, ptr %C, i64 %ldc, float %alpha, float %beta, ptr %apack, ptr %bpack{cols})")
    with w.loop("0", "%N", cfg.nc, "jc") as jc:
        nc = w.smin(str(cfg.nc), w.op("sub", "%N", jc))
        with w.loop("0", "%K", cfg.kc, "pc") as pc:
            kc = w.smin(str(cfg.kc), w.op("sub", "%K", pc))
            first = w.value(f"icmp eq i64 {pc}, 0")
            last = w.value(f"icmp sge i64 {w.op('add', pc, kc)}, %K")
            b_src = w.gep("%B", w.op("add", w.op("mul", pc, "%rsb"), w.op("mul", jc, "%csb")))
            w.emit(f"call void @{names['pack_b']}(ptr {b_src}, i64 %rsb, i64 %csb, i64 {kc}, "
                   f"i64 {nc}, ptr %bpack)")
            with w.loop("0", "%M", cfg.mc, "ic") as ic:
                mc = w.smin(str(cfg.mc), w.op("sub", "%M", ic))
                a_src = w.gep("%A", w.op("add", w.op("mul", ic, "%rsa"), w.op("mul", pc, "%csa")))
                w.emit(f"call void @{names['pack_a']}(ptr {a_src}, i64 %rsa, i64 %csa, "
                       f"i64 {mc}, i64 {kc}, ptr %apack)")
                _macro_kernel(w, cfg, names["ukernel"], n_cols, (ic, jc, mc, nc, kc, first, last))
    return w.text()


def _macro_kernel(w: FunctionWriter, cfg: GemmConfig, ukernel: str, n_cols: int, block) -> None:
    """jr over NR panels of packed B (kept in L1), ir over MR panels of packed A (in L2)."""
    ic, jc, mc, nc, kc, first, last = block
    with w.loop("0", nc, cfg.nr, "jr") as jr:
        nr = w.smin(str(cfg.nr), w.op("sub", nc, jr))
        col = w.op("add", jc, jr)
        bp = w.gep("%bpack", w.op("mul", jr, kc))
        col_args = "".join(f", ptr {w.gep(f'%col{i}', col)}" for i in range(n_cols))
        with w.loop("0", mc, cfg.mr, "ir") as ir:
            mr = w.smin(str(cfg.mr), w.op("sub", mc, ir))
            ap = w.gep("%apack", w.op("mul", ir, kc))
            c = w.gep("%C", w.op("add", w.op("mul", w.op("add", ic, ir), "%ldc"), col))
            w.emit(f"call void @{ukernel}(i64 {kc}, ptr {ap}, ptr {bp}, ptr {c}, i64 %ldc, "
                   f"i64 {mr}, i64 {nr}, i1 {first}, i1 {last}, float %alpha, float %beta"
                   f"{col_args})")


INTRINSICS = """declare i64 @llvm.smin.i64(i64, i64)
declare <{vl} x float> @llvm.fma.v{vl}f32(<{vl} x float>, <{vl} x float>, <{vl} x float>)
"""


def render_gemm_module(cfg: GemmConfig, epilogue: tuple[EpilogueOp, ...] = ()) -> tuple[str, str]:
    """(entry function name, LLVM IR text) of a complete GEMM module for this config/epilogue."""
    suffix = cfg.tag + "".join("_" + op.tag for op in epilogue)
    names = {k: f"lmc_gemm_{k}_{suffix}" for k in ("pack_a", "pack_b", "ukernel")}
    entry = f"lmc_sgemm_{suffix}"
    parts = [f"; lmc fp32 GEMM {cfg}, epilogue {[op.tag for op in epilogue]}",
             INTRINSICS.format(vl=cfg.vl),
             render_pack_a(cfg, names["pack_a"]), render_pack_b(cfg, names["pack_b"]),
             render_microkernel(cfg, names["ukernel"], epilogue),
             render_driver(cfg, entry, names, _n_column_operands(epilogue))]
    return entry, "\n".join(parts)


# -- compiled kernel --


@dataclass
class GemmKernel:
    """A compiled GEMM: call it on raw pointers/strides (in elements) for one slice of the work."""

    config: GemmConfig
    epilogue: tuple[EpilogueOp, ...]
    entry: str
    llvm_ir: str
    fn: object = field(repr=False)

    @property
    def n_column_operands(self) -> int:
        return _n_column_operands(self.epilogue)

    def __call__(self, m, n, k, a, rsa, csa, b, rsb, csb, c, ldc, alpha, beta, apack, bpack,
                 *cols) -> None:
        self.fn(m, n, k, a, rsa, csa, b, rsb, csb, c, ldc, alpha, beta, apack, bpack, *cols)


_kernels: dict[tuple, GemmKernel] = {}
_kernels_lock = threading.Lock()


def compile_gemm(cfg: GemmConfig | None = None, epilogue: tuple[EpilogueOp, ...] = (),
                 target: HostTarget | None = None) -> GemmKernel:
    """The GEMM kernel for (config, epilogue, target), compiled once per process (~0.5 s)."""
    engine = default_engine(target)
    cfg = cfg or default_config(engine.target)
    key = (cfg, epilogue, target)
    with _kernels_lock:
        if key not in _kernels:
            entry, text = render_gemm_module(cfg, epilogue)
            module = engine.add_ir(entry, text)
            i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
            argtypes = [i64, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, f32, f32, ptr,
                        ptr] + [ptr] * _n_column_operands(epilogue)
            fn = module.function(entry, None, *argtypes)
            _kernels[key] = GemmKernel(cfg, epilogue, entry, text, fn)
        return _kernels[key]
