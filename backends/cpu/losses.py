"""`tensor.cross_entropy` forward as a native row kernel: per row of logits, the max, the sum of
exp(x - max) and (label smoothing) the sum of x - max in two vectorized passes, the log-sum-exp,
the target's log-probability, written as one nll value per row; the reduction over rows (mean
over the valid rows, sum, none) then runs in numpy exactly as the interpreter's does.

Numerics follow the interpreter's `_log_softmax`: a non-finite row max is replaced by 0, and the
target's log-probability is (x[t] - max) - log(sum), rounded in that order. Targets equal to
`ignore_index` give 0; other negative targets count from the end (numpy indexing); targets
outside the classes raise `IndexRangeError` naming the row.
"""
from __future__ import annotations

import numpy as np

from lmc.errors import ShapeError
from lmc.ir.types import DType

from . import emit
from .datamove import IndexRangeError, _fail, _kernel, _range_writer, _ranges, _run_ranges
from .irtext import FunctionWriter
from .jit import HostTarget, default_engine
from .loops import default_lanes

_F32 = DType.f32


def _hreduce(w: FunctionWriter, kind: str, v: str, n: int) -> str:
    """Lane-wise `kind` across an f32 vector, as a scalar."""
    v = emit.reduce_lanes(w, kind, _F32, v, n)
    return w.value(f"extractelement {emit.vtype(_F32, n)} {v}, i64 0")


def _row_pass(w: FunctionWriter, row: str, n: int, reds: dict[str, str], body) -> dict[str, str]:
    """One sweep over the C elements of a row: body(x, mask) -> {name: vector to combine} for
    each reduction named in `reds` (name -> kind); the tail vector is masked (masked-off lanes
    read 0 and contribute the identity). Returns the scalar results."""
    vt = emit.vtype(_F32, n)
    accs = {k: w.slot(vt, emit.reduce_identity(kind, _F32, n), "acc") for k, kind in reds.items()}

    def step(i: str, mask: str | None) -> None:
        x = emit.vload(w, _F32, w.gep(row, i), n, mask)
        for k, v in body(x).items():
            if mask is not None:
                v = w.value(f"select <{n} x i1> {mask}, {vt} {v}, {vt} "
                            f"{emit.reduce_identity(reds[k], _F32, n)}")
            old = w.load(vt, accs[k])
            w.store(vt, emit.reduce_combine(w, reds[k], _F32, old, v, n), accs[k])

    full = w.op("and", "%c", str(-n))
    with w.loop("0", full, n, "v") as i:
        step(i, None)
    with w.if_(w.value(f"icmp slt i64 {full}, %c"), "tail"):
        step(full, emit.lane_mask(w, w.op("sub", "%c", full), n))
    return {k: _hreduce(w, kind, w.load(vt, accs[k]), n) for k, kind in reds.items()}


def _render(name: str, n: int, smoothing: float) -> str:
    """Rows [start, end) of x [N, C] (unit column stride) -> nll[r]."""
    w = _range_writer(name, ("*x", "rsx", "c", "*t", "ignore", "*nll", "*status"))
    vt = emit.vtype(_F32, n)
    with w.loop("%start", "%end", 1, "r") as r:
        row = w.gep("%x", w.op("mul", r, "%rsx"))
        m = _row_pass(w, row, n, {"max": "max"}, lambda x: {"max": x})["max"]
        finite = w.value(f"fcmp oeq float {w.value(f'fsub float {m}, {m}')}, 0.0")
        m = w.value(f"select i1 {finite}, float {m}, float 0.0")
        mv = emit.splat(w, "float", m, n)

        def second(x: str) -> dict[str, str]:
            shifted = w.value(f"fsub {vt} {x}, {mv}")
            out = {"sum": emit.math_call(w, "exp", shifted, _F32, n)}
            if smoothing:
                out["shifted"] = shifted
            return out
        sums = _row_pass(w, row, n, {"sum": "sum", **({"shifted": "sum"} if smoothing else {})},
                         second)
        logs = emit.math_call(w, "log", emit.splat(w, "float", sums["sum"], n), _F32, n)
        log_sum = w.value(f"extractelement {vt} {logs}, i64 0")
        out = w.gep("%nll", r)
        target = w.load("i64", w.gep("%t", r, "i64"), 8)
        w.store("float", "0.0", out)
        with w.if_(w.value(f"icmp ne i64 {target}, %ignore"), "valid"):
            v = w.value(f"select i1 {w.value(f'icmp slt i64 {target}, 0')}, i64 "
                        f"{w.op('add', target, '%c')}, i64 {target}")
            bad = w.op("or", w.value(f"icmp slt i64 {v}, 0"), w.value(f"icmp sge i64 {v}, %c"),
                       "i1")
            with w.if_(bad, "bad"):
                _fail(w, r)
            picked = w.load("float", w.gep(row, v))
            lsm = w.value(f"fsub float {w.value(f'fsub float {picked}, {m}')}, {log_sum}")
            nll = w.value(f"fneg float {lsm}")
            if smoothing:
                nll = _smoothed(w, nll, sums["shifted"], log_sum, smoothing)
            w.store("float", nll, out)
    return w.text()


def _smoothed(w: FunctionWriter, nll: str, shifted_sum: str, log_sum: str, eps: float) -> str:
    """(1 - eps) * nll - eps / C * sum(log_softmax), sum(lsm) = sum(x - max) - C * log(sum)."""
    c = w.value("sitofp i64 %c to float")
    lsm_sum = w.value(f"fsub float {shifted_sum}, {w.value(f'fmul float {c}, {log_sum}')}")
    keep = w.value(f"fmul float {emit.literal(_F32, 1 - eps)}, {nll}")
    share = w.value(f"fdiv float {emit.literal(_F32, eps)}, {c}")
    return w.value(f"fsub float {keep}, {w.value(f'fmul float {share}, {lsm_sum}')}")


def cross_entropy(logits: np.ndarray, target: np.ndarray, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean",
                  threads: int | None = None, target_cpu: HostTarget | None = None
                  ) -> np.ndarray:
    """tensor.cross_entropy of f32 logits [N, C, ...] and integer targets [N, ...]."""
    logits, target = np.asarray(logits), np.asarray(target)
    if logits.dtype != np.float32 or target.dtype.kind not in "iu" or \
            target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ShapeError(f"tensor.cross_entropy: needs f32 logits [N, C, ...] and integer "
                         f"targets [N, ...]; got {logits.dtype}{list(logits.shape)}, "
                         f"{target.dtype}{list(target.shape)}")
    c = logits.shape[1]
    rows = np.moveaxis(logits, 1, -1).reshape(-1, c)  # a view for [N, C]; spatial: a copy
    if rows.strides[1] != 4 or rows.strides[0] % 4:
        rows = np.ascontiguousarray(rows)
    flat = np.ascontiguousarray(target, dtype=np.int64).reshape(-1)
    nll = np.empty(flat.size, np.float32)
    if flat.size:
        if c == 0:
            raise IndexRangeError("tensor.cross_entropy: logits have no classes")
        lanes = default_lanes(default_engine(target_cpu).target)
        eps = float(label_smoothing)
        name = f"lmc_ce_v{lanes}_" + (np.float64(eps).tobytes().hex() if eps else "plain")
        kernel = _kernel(name, lambda: emit.module_text([_render(name, lanes, eps)], {lanes}),
                         target_cpu)
        bad = _run_ranges(kernel, _ranges(flat.size, rows.nbytes * 8, threads),
                          [rows.ctypes.data, rows.strides[0] // 4, c, flat.ctypes.data,
                           int(ignore_index), nll.ctypes.data])
        if bad is not None:
            raise IndexRangeError(f"tensor.cross_entropy: target {flat[bad]} of row {bad} is "
                                  f"outside the {c} classes")
    return _reduce(nll.reshape(target.shape), target != ignore_index, reduction)


def _reduce(nll: np.ndarray, valid: np.ndarray, reduction: str) -> np.ndarray:
    """The interpreter's reduction of the per-row losses, on the same float32 values."""
    if reduction == "none":
        return nll
    if reduction == "sum":
        return np.asarray(nll.sum(), np.float32)
    return np.asarray(nll.sum() / max(valid.sum(), 1), np.float32) if valid.any() else \
        np.asarray(np.nan, np.float32)

