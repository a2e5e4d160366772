"""Packing for the GEMM (gemm.py): A blocks into MR-row panels and B blocks into NR-column
panels, KC deep and zero padded, as LLVM IR text. A constant B is packed once, full K deep,
by the same function (`threads.prepack_b`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .irtext import FunctionWriter, transpose, vec

if TYPE_CHECKING:
    from .gemm import GemmConfig

PTR_ALIGN = 64  # packed buffers are allocated 64-byte aligned (see threads.py)


def render_pack_a(cfg: GemmConfig, name: str) -> str:
    """A[mc, kc] (strides rsa, csa) -> MR-row panels, each kc x MR contiguous, rows zero padded."""
    mr = cfg.mr
    w = FunctionWriter(f"internal void @{name}(ptr noalias %a, i64 %rsa, i64 %csa, i64 %mc, "
                       f"i64 %kc, ptr noalias %ap)")
    vector = cfg.vl // 2 <= mr <= cfg.vl  # each output vector spans <= 2 transposed k rows
    with w.loop("0", "%mc", mr, "ir") as ir:
        rows = w.smin(str(mr), w.op("sub", "%mc", ir))
        dst = w.gep("%ap", w.op("mul", ir, "%kc"))
        src = w.gep("%a", w.op("mul", ir, "%rsa"))
        full = w.value(f"icmp eq i64 {rows}, {mr}")
        with w.if_else(w.op("and", full, w.value("icmp eq i64 %rsa, 1"), "i1"), "cm") as other:
            # Column-major A (a transposed view: the lhs of a backward graph's weight
            # gradient): the MR rows of one k are contiguous, one MR-float copy per k.
            mv = f"<{mr} x float>"
            with w.loop("0", "%kc", 1, "kt") as k:
                row = w.load(mv, w.gep(src, w.op("mul", k, "%csa")))
                w.store(mv, row, w.gep(dst, w.op("mul", k, str(mr))))
            other()
            with w.if_else(full) as otherwise:
                _pack_a_rows(w, cfg, src, dst, vector)
                otherwise()
                _pack_edge(w, src, "%rsa", "%csa", rows, dst, mr)
    return w.text()


def _pack_a_rows(w: FunctionWriter, cfg: GemmConfig, src: str, dst: str, vector: bool) -> None:
    """A full panel of MR row streams."""
    mr = cfg.mr
    row_ptrs = [w.gep(src, w.op("mul", str(i), "%rsa")) for i in range(mr)]
    k_tail = "0"
    if vector:
        # Row-major A (the usual case): VL k-values of the MR rows per step, transposed
        # in registers, instead of MR scalar copies per k (~2 cycles per element).
        k_tail = w.value(f"select i1 {w.value('icmp eq i64 %csa, 1')}, "
                         f"i64 {w.op('and', '%kc', str(-cfg.vl))}, i64 0")
        _pack_a_vectors(w, cfg, row_ptrs, dst, k_tail)
    # Other strides: MR row streams read together, one contiguous MR-float write per k.
    with w.loop(k_tail, "%kc", 1, "k") as k:
        koff = w.op("mul", k, "%csa")
        out = w.gep(dst, w.op("mul", k, str(mr)))
        for i, row in enumerate(row_ptrs):
            w.store("float", w.load("float", w.gep(row, koff)), w.gep(out, str(i)))


def _pack_a_vectors(w: FunctionWriter, cfg: GemmConfig, row_ptrs: list[str], dst: str,
                    k_end: str) -> None:
    """dst[k*MR + i] = row_i[k] for k < k_end (a multiple of VL; rows contiguous along k).
    The MR x VL block, padded to VL x VL with poison rows, is transposed into VL k-rows of MR
    valid lanes; output vector v of the contiguous block takes its lanes from two of them."""
    t, mr, v = cfg.vl, cfg.mr, vec(cfg.vl)
    with w.loop("0", k_end, t, "ka") as k:
        loaded = [w.load(v, w.gep(row, k)) for row in row_ptrs] + ["poison"] * (t - mr)
        k_rows = transpose(w, loaded, t) + ["poison"]
        out = w.gep(dst, w.op("mul", k, str(mr)))
        for j in range(mr):  # MR output vectors of VL lanes: flat f = kk*MR + i
            first = j * t // mr
            mask = [(f // mr - first) * t + f % mr for f in range(j * t, (j + 1) * t)]
            lanes = ", ".join(f"i32 {x}" for x in mask)
            packed = w.value(f"shufflevector {v} {k_rows[first]}, {v} {k_rows[first + 1]}, "
                             f"<{t} x i32> <{lanes}>")
            w.store(v, packed, w.gep(out, str(j * t)))


def render_pack_b(cfg: GemmConfig, name: str) -> str:
    """B[kc, nc] (strides rsb, csb) -> NR-column panels, each kc x NR contiguous, zero padded.
    Exported: `prepack_b` calls it once with kc = K for constant weights."""
    nr = cfg.nr
    w = FunctionWriter(f"void @{name}(ptr noalias %b, i64 %rsb, i64 %csb, i64 %kc, "
                       f"i64 %nc, ptr noalias %bp)")
    unit = w.value("icmp eq i64 %csb, 1")
    unit_k = w.value("icmp eq i64 %rsb, 1")
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
            with w.if_else(w.op("and", full, unit_k, "i1")) as strided:
                # B^T (torch Linear weights [N, K]): VL x VL blocks transposed in registers,
                # ~4x fewer instructions than one scalar copy per element.
                k_tail = _pack_transposed(w, cfg, src, dst)
                _pack_edge(w, src, "%csb", "1", cols, dst, nr, k_tail)
                strided()
                # Strided, or a partial panel: column streams.
                _pack_edge(w, src, "%csb", "%rsb", cols, dst, nr)
    return w.text()


def _pack_transposed(w: FunctionWriter, cfg: GemmConfig, src: str, dst: str) -> str:
    """A full panel whose columns are contiguous along k, for k below kc rounded down to VL:
    per VL-column group, VL column vectors -> VL k-row vectors. Returns where the k tail
    starts."""
    t, v = cfg.vl, vec(cfg.vl)
    k_main = w.op("and", "%kc", str(-t))
    with w.loop("0", k_main, t, "kv") as k:
        for g in range(cfg.nv):
            cols = [w.load(v, w.gep(src, w.op("add", w.op("mul", str(g * t + lane), "%csb"), k)))
                    for lane in range(t)]
            for kk, row in enumerate(transpose(w, cols, t)):
                at = w.op("add", w.op("mul", w.op("add", k, str(kk)), str(cfg.nr)), str(g * t))
                w.store(v, row, w.gep(dst, at), 4 * t)
    return k_main


def _pack_edge(w: FunctionWriter, src: str, lane_stride: str, k_stride: str, lanes: str,
               dst: str, width: int, k0: str = "0") -> None:
    """dst[k*width + l] = src[l*lane_stride + k*k_stride] for l < lanes (else 0), k0 <= k < kc."""
    with w.loop("0", str(width), 1, "l") as lane:
        out = w.gep(dst, lane)
        with w.if_else(w.value(f"icmp slt i64 {lane}, {lanes}")) as otherwise:
            line = w.gep(src, w.op("mul", lane, lane_stride))
            with w.loop(k0, "%kc", 1, "k") as k:
                val = w.load("float", w.gep(line, w.op("mul", k, k_stride)))
                w.store("float", val, w.gep(out, w.op("mul", k, str(width))))
            otherwise()
            with w.loop(k0, "%kc", 1, "k") as k:
                w.store("float", "0.0", w.gep(out, w.op("mul", k, str(width))))
