"""CPU loop kernels (backends/cpu/loops.py, emit.py) against the reference interpreter on the same
kernel.fused bodies: every elementwise op and dtype, broadcasting, permuted/sliced/stride-0 views,
odd sizes, library and hand-written row reductions, multi-output kernels, long and short rows,
symbolic dims, the GEMM tile epilogue; at both vector widths (16 lanes run as pairs of AVX2
vectors on machines without AVX-512)."""
from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
import pytest

from lmc.backends.cpu import loops
from lmc.backends.cpu.jit import default_engine, host_target
from lmc.backends.cpu.pool import pool as core_pool
from lmc.backends.reference.interpreter import bind_symbols, run_block
from lmc.errors import LmcError, ShapeError
from lmc.ir import DType, TensorType, parse
from lmc.ir.core import Block, Op, Region
from lmc.ir.ops import op_class
from lmc.ir.rewriter import Rewriter


def _widths():
    host = host_target()
    if host.has_avx512:
        return [(host, None), (host.without_avx512(), None)]
    return [(host, None), (host, 16)]


WIDTHS = _widths()
WIDTH_IDS = [f"{loops.default_lanes(t) if n is None else n}lanes" for t, n in WIDTHS]
width = pytest.mark.parametrize("target,lanes", WIDTHS, ids=WIDTH_IDS)


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


def T(dtype: str, *shape) -> TensorType:
    return TensorType(shape, DType(dtype))


def fused(kind: str, arg_types: list[TensorType], build) -> Op:
    """A verified kernel.fused op whose body is `build(rw, *args) -> [yielded values]`."""
    body = Block(arg_types, [f"a{i}" for i in range(len(arg_types))])
    rw = Rewriter(body)
    outs = build(rw, *body.args)
    rw.create("kernel.yield", outs)
    op = op_class("kernel.fused")(Block(arg_types).args, {"kind": kind},
                                  [v.type for v in outs], [Region([body])])
    for o in body.ops:
        o.verify()
    op.verify()
    return op


def run_both(op: Op, inputs, target, lanes, threads=1, outputs=None):
    """(kernel outputs, interpreter outputs) on the same inputs."""
    kernel = loops.compile_loop_kernel(op, target, lanes)
    env = bind_symbols([a.type for a in op.body.args], inputs)
    want = run_block(op.body, [np.asarray(x) for x in inputs], env)
    if outputs is None:
        outputs = [np.full(w.shape, 77, w.dtype) for w in want]
    kernel.run(inputs, outputs, threads=threads)
    return outputs, want


def check(got, want, seed, rtol=1e-5, atol=2e-6, names=None):
    for i, (g, w) in enumerate(zip(got, want)):
        name = names[i] if names else f"output {i}"
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if g.dtype == np.bool_ or g.dtype.kind in "iu":
            np.testing.assert_array_equal(g, w, err_msg=f"{name} (seed {seed})")
        else:
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol,
                                       atol=atol, err_msg=f"{name} (seed {seed})")


# ---- elementwise: every op, every dtype ---------------------------------------------------------

UNARY_X = ["neg", "abs", "exp", "tanh", "erf", "sigmoid", "relu", "silu", "sin", "cos",
           "reciprocal"]
UNARY_P = ["log", "sqrt", "rsqrt"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "floordiv", "mod"]
COMPARE = ["eq", "ne", "lt", "le", "gt", "ge"]
NAN_SAFE = ["relu", "exp", "tanh", "sigmoid", "neg", "abs"]


def _float_body(dt: str, group: int):
    """x, xn (with NaNs), xi (integer-valued), p > 0: [B,1,T]; y, yi (integer-valued): [T];
    c: bool[B,1,T]. Each op is one output; the ops come in 3 groups, one kernel each (LLVM's
    compile time grows faster than linearly with kernel size)."""
    def build(rw, x, xn, xi, p, y, yi, c):
        outs, names = [], []
        s = lambda v: rw.constant(v, T(dt))  # noqa: E731
        ops = [*((n, "tensor." + n, (x,), {}) for n in UNARY_X),
               *((n, "tensor." + n, (p,), {}) for n in UNARY_P),
               ("gelu", "tensor.gelu", (x,), {"approximate": "none"}),
               ("gelu_tanh", "tensor.gelu", (x,), {"approximate": "tanh"}),
               *((f"{n}_nan", "tensor." + n, (xn,), {}) for n in NAN_SAFE),
               *((n, "tensor." + n, (x, y), {}) for n in BINARY),
               ("pow", "tensor.pow", (p, y), {}),
               *((f"pow{e}", "tensor.pow", (p if e % 1 else x, s(e)), {})
                 for e in (2.0, 3.0, 0.5, -1.0, -2.0, -0.5, 0.0, 1.0)),
               ("pow_neg_base", "tensor.pow", (x, yi), {}),
               *((n, "tensor." + n, (xi, yi), {}) for n in COMPARE),
               *((f"{n}_nan", "tensor." + n, (xn, y), {})
                 for n in ("maximum", "minimum", "lt", "ne", "eq")),
               ("where", "tensor.where", (c, x, y), {}),
               ("and", "tensor.and", (x, yi), {}),
               ("or", "tensor.or", (x, yi), {}),
               *((f"cast_{to}", "tensor.cast", (x,), {"dtype": DType(to)})
                 for to in ("i32", "i64", "bool", "f16", "bf16", "f64", "f32") if to != dt)]
        for name, op_name, args, attrs in ops[group * len(ops) // 3:(group + 1) * len(ops) // 3]:
            outs.append(rw.value(op_name, *args, **attrs))
            names.append(name)
        build.names = names
        return outs
    return build


def _float_inputs(rng, dt, b, t):
    npdt = DType(dt).to_numpy()
    x = rng.standard_normal((b, 1, t)) * 2
    xn = x.copy()
    xn.flat[::3] = np.nan
    xi = rng.integers(-3, 4, (b, 1, t)).astype(np.float64)
    p = rng.uniform(0.1, 3.0, (b, 1, t))
    y = rng.standard_normal(t) * 2
    y[np.abs(y) < 0.05] = 0.5  # keep divisors away from 0 (tested separately for ints)
    yi = rng.integers(-3, 4, t).astype(np.float64)
    c = rng.random((b, 1, t)) < 0.5
    return [a.astype(npdt) for a in (x, xn, xi, p, y, yi)] + [c]


FLOAT_TOL = {"f32": (1e-5, 2e-6), "f64": (1e-5, 1e-9), "f16": (1e-2, 1e-2), "bf16": (2e-2, 2e-2)}


@functools.cache
def float_kernel(dt: str, group: int) -> tuple[Op, list[str]]:
    build = _float_body(dt, group)
    types = [T(dt, "B", 1, "T")] * 4 + [T(dt, "T")] * 2 + [T("bool", "B", 1, "T")]
    return fused("elementwise", types, build), build.names


# The op kernels are large (~20 outputs each): f32 runs at both widths, the other dtypes at one
# each, alternating, so that both widths see every storage format.
FLOAT_CASES = [(dt, w, g) for dt, w in [("f32", 0), ("f32", 1), ("f64", 1), ("f16", 0),
                                        ("bf16", 1)] for g in range(3)]


@pytest.mark.parametrize("dt,w,group", FLOAT_CASES,
                         ids=[f"{d}-{WIDTH_IDS[w]}-{g}" for d, w, g in FLOAT_CASES])
def test_float_ops(dt, w, group):
    target, lanes = WIDTHS[w]
    op, names = float_kernel(dt, group)
    rng, seed = _rng()
    rtol, atol = FLOAT_TOL[dt]
    for b, t in [(1, 1), (3, 7), (2, 129)]:
        ins = _float_inputs(rng, dt, b, t)
        with np.errstate(all="ignore"):
            got, want = run_both(op, ins, target, lanes)
        check(got, want, seed, rtol, atol, names)
    # The same kernel on views: permuted, sliced, stride-0 inputs; strided outputs.
    with np.errstate(all="ignore"):
        got, want = run_both(op, strided_views(ins), target, lanes, outputs=[
            strided_like(w) for w in want])
    check(got, want, seed, rtol, atol, names)


def strided_views(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Equal-shaped views of other layouts: transposed copies, every other element of a bigger
    array, and (every third input) a stride-0 broadcast of its first row."""
    out = []
    for i, a in enumerate(arrays):
        if i % 3 == 0:
            out.append(np.ascontiguousarray(a.T).T)
        elif i % 3 == 1:
            big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
            big[..., ::2] = a
            out.append(big[..., ::2])
        else:
            out.append(np.broadcast_to(a[:1], a.shape))
    return out


def strided_like(a: np.ndarray) -> np.ndarray:
    """A preallocated output of a's shape whose last dim has stride 2."""
    big = np.full(a.shape[:-1] + (2 * a.shape[-1],), 77, a.dtype)
    return big[..., ::2]


INT_OPS = ["add", "sub", "mul", "div", "floordiv", "mod", "maximum", "minimum", "pow"] + COMPARE


@functools.cache
def int_kernel(dt: str) -> tuple[Op, list[str]]:
    """a: [B,1,T], b: [T] (zeros included: x // 0 == x % 0 == 0 in numpy), e >= 0: [T]."""
    names = [*INT_OPS, "pow2", "neg", "abs", "where", "and", "or", "cast_f32", "cast_bool",
             "cast_other", "cast_f16"]

    def build(rw, a, b, e, c):
        other = DType("i32" if dt == "i64" else "i64")
        return [*(rw.value(f"tensor.{n}", a, e if n == "pow" else b) for n in INT_OPS),
                rw.value("tensor.pow", a, rw.constant(2, T(dt))), rw.value("tensor.neg", a),
                rw.value("tensor.abs", a), rw.value("tensor.where", c, a, b),
                rw.value("tensor.and", a, b), rw.value("tensor.or", a, b),
                rw.value("tensor.cast", a, dtype=DType.f32),
                rw.value("tensor.cast", a, dtype=DType.bool),
                rw.value("tensor.cast", a, dtype=other),
                rw.value("tensor.cast", a, dtype=DType.f16)]
    types = [T(dt, "B", 1, "T"), T(dt, "T"), T(dt, "T"), T("bool", "B", 1, "T")]
    return fused("elementwise", types, build), names


@pytest.mark.parametrize("dt,w", [("i64", 0), ("i32", 1)],
                         ids=[f"i64-{WIDTH_IDS[0]}", f"i32-{WIDTH_IDS[1]}"])
def test_int_ops(dt, w):
    target, lanes = WIDTHS[w]
    op, names = int_kernel(dt)
    rng, seed = _rng()
    npdt = DType(dt).to_numpy()
    for b, t in [(1, 1), (2, 7), (3, 129)]:
        a = rng.integers(-50, 50, (b, 1, t)).astype(npdt)
        a.flat[0] = np.iinfo(npdt).min  # wraps in neg/abs/mul like numpy
        d = rng.integers(-6, 7, t).astype(npdt)
        e = rng.integers(0, 6, t).astype(npdt)
        c = rng.random((b, 1, t)) < 0.5
        with np.errstate(all="ignore"):
            got, want = run_both(op, [a, d, e, c], target, lanes)
        check(got, want, seed, names=names)
    with np.errstate(all="ignore"):
        got, want = run_both(op, strided_views([a, d, e, c]), target, lanes)
    check(got, want, seed, names=names)


@width
def test_bool_ops(target, lanes):
    names = ["not", "and", "or", "eq", "ne", "lt", "ge", "where", "add", "mul", "maximum",
             "minimum", "cast_f32", "cast_i64", "cast_bool_of_f32"]

    def build(rw, c, d, x):
        return [rw.value("tensor.not", c), *(rw.value(f"tensor.{n}", c, d) for n in names[1:7]),
                rw.value("tensor.where", c, d, rw.value("tensor.not", d)),
                *(rw.value(f"tensor.{n}", c, d) for n in names[8:12]),
                rw.value("tensor.cast", c, dtype=DType.f32),
                rw.value("tensor.cast", c, dtype=DType.i64),
                rw.value("tensor.cast", x, dtype=DType.bool)]
    op = fused("elementwise", [T("bool", "N", "M"), T("bool", "M"), T("f32", "N", "M")], build)
    rng, seed = _rng()
    for n, m in [(1, 1), (3, 7), (5, 33)]:
        x = rng.integers(-1, 2, (n, m)).astype(np.float32)
        x.flat[0] = np.nan  # bool(nan) is True
        ins = [rng.random((n, m)) < 0.5, rng.random(m) < 0.5, x]
        got, want = run_both(op, ins, target, lanes)
        check(got, want, seed, names=names)
    got, want = run_both(op, strided_views(ins), target, lanes)
    check(got, want, seed, names=names)


# ---- row reductions -----------------------------------------------------------------------------

MASKED_SOFTMAX = """func @main(%s: f32[B,4,T,T], %m: bool[T,T]) -> (f32[B,4,T,T]) {
  %0 = kernel.fused %s, %m {kind = "reduction"} : f32[B,4,T,T]  loc("LAYER") {
  ^bb(%arg0: f32[B,4,T,T], %arg1: bool[T,T]):
    %1 = tensor.constant {value = 0.25} : f32[]
    %2 = tensor.constant {value = -inf} : f32[]
    %3 = tensor.mul %arg0, %1 : f32[B,4,T,T]
    %4 = tensor.not %arg1 : bool[T,T]
    %5 = tensor.where %4, %2, %3 : f32[B,4,T,T]
    %6 = tensor.softmax %5 {axis = -1} : f32[B,4,T,T]
    kernel.yield %6
  }
  func.return %0
}
"""


def masked_softmax_op(layer: str = "blocks.0.attn") -> Op:
    return parse(MASKED_SOFTMAX.replace("LAYER", layer)).main.body.ops[0]


@width
def test_masked_softmax(target, lanes):
    """Symbolic B, T: one compile serves every size; a fully masked row is NaN as in the
    interpreter (max replaced by 0, exp(-inf) = 0, 0/0)."""
    op = masked_softmax_op()
    rng, seed = _rng()
    for b, t, threads in [(2, 7, 1), (1, 129, 1), (3, 1, 1), (4, 128, 2)]:
        x = rng.standard_normal((b, 4, t, t)).astype(np.float32) * 3
        mask = np.tril(np.ones((t, t), bool))
        mask[t // 2, :] = False
        with np.errstate(all="ignore"):
            got, want = run_both(op, [x, mask], target, lanes, threads)
        assert np.isnan(got[0][:, :, t // 2]).all()
        check(got, want, seed, atol=1e-7)
    again = masked_softmax_op("blocks.1.attn")  # another layer, same body: no new compile
    assert loops.compile_loop_kernel(again, target, lanes) is \
        loops.compile_loop_kernel(op, target, lanes)


@width
def test_log_softmax_long_and_short_rows(target, lanes):
    op = fused("reduction", [T("f32", "N", "L")],
               lambda rw, x: [rw.value("tensor.log_softmax", x, axis=-1)])
    rng, seed = _rng()
    for n, length in [(3, 4096 + 3), (1000, 1), (257, 2), (5, 129)]:
        x = rng.standard_normal((n, length)).astype(np.float32) * 4
        got, want = run_both(op, [x], target, lanes)
        check(got, want, seed, atol=1e-5)
    # A transposed input and a strided output take the gathered path.
    got, want = run_both(op, [np.ascontiguousarray(x.T).T], target, lanes,
                         outputs=[strided_like(x)])
    check(got, want, seed, atol=1e-5)


def _layer_norm(num_axes: int, affine: bool):
    shape = ("N", "H", "D")
    norm = shape[3 - num_axes:]
    types = [T("f32", *shape)] + ([T("f32", *norm)] * 2 if affine else [])
    return fused("reduction", types, lambda rw, *a: [
        rw.value("tensor.layer_norm", *a, num_axes=num_axes, eps=1e-5)])


@width
@pytest.mark.parametrize("num_axes,affine", [(1, True), (2, False)])
def test_layer_norm(num_axes, affine, target, lanes):
    op = _layer_norm(num_axes, affine)
    rng, seed = _rng()
    for shape in [(2, 3, 129), (1, 1, 1), (4, 5, 16)]:
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        ins = [x] + [rng.standard_normal(shape[3 - num_axes:]).astype(np.float32)
                     for _ in range(2 * affine)]
        got, want = run_both(op, ins, target, lanes)
        check(got, want, seed, atol=1e-5)
    # Reduced dims permuted (num_axes=2: not flattenable, copied) and a strided output.
    x = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
    out = np.empty(x.shape[::-1], np.float32).transpose(2, 1, 0)
    got, want = run_both(op, [x, *ins[1:]], target, lanes, outputs=[out])
    check(got, want, seed, atol=1e-5)


@pytest.mark.parametrize("dt,w", [("f32", 0), ("f32", 1), ("bf16", 0)],
                         ids=[f"f32-{WIDTH_IDS[0]}", f"f32-{WIDTH_IDS[1]}", f"bf16-{WIDTH_IDS[0]}"])
def test_rms_norm(dt, w):
    target, lanes = WIDTHS[w]
    op = fused("reduction", [T(dt, "N", "D"), T(dt, "D")],
               lambda rw, x, g: [rw.value("tensor.rms_norm", x, g, eps=1e-6)])
    rng, seed = _rng()
    rtol, atol = (1e-5, 1e-5) if dt == "f32" else (2e-2, 2e-2)
    npdt = DType(dt).to_numpy()
    for n, d in [(7, 129), (1, 1), (300, 64)]:
        ins = [rng.standard_normal((n, d)).astype(npdt), rng.standard_normal(d).astype(npdt)]
        got, want = run_both(op, ins, target, lanes)
        check(got, want, seed, rtol, atol)


@width
def test_hand_written_norms(target, lanes):
    """x * rsqrt(mean(x*x) + eps) * w and the mean/var LayerNorm as one kernel: reductions
    at two levels (mean(x) and mean(x*x) in pass 1, the variance in pass 2)."""
    def build(rw, x, g):
        eps = rw.constant(1e-5, T("f32"))
        ms = rw.value("tensor.mean", rw.value("tensor.mul", x, x), axes=(-1,), keepdim=True)
        rms = rw.value("tensor.mul", rw.value("tensor.mul", x, rw.value(
            "tensor.rsqrt", rw.value("tensor.add", ms, eps))), g)
        d = rw.value("tensor.sub", x, rw.value("tensor.mean", x, axes=(-1,), keepdim=True))
        var = rw.value("tensor.mean", rw.value("tensor.mul", d, d), axes=(-1,), keepdim=True)
        ln = rw.value("tensor.mul", rw.value("tensor.mul", d, rw.value(
            "tensor.rsqrt", rw.value("tensor.add", var, eps))), g)
        return [rms, ln]
    op = fused("reduction", [T("f32", "B", "T", "D"), T("f32", "D")], build)
    assert loops.Plan(op).n_passes == 3
    rng, seed = _rng()
    for shape in [(2, 3, 100), (1, 1, 4099)]:
        ins = [rng.standard_normal(shape).astype(np.float32) + 0.5,
               rng.standard_normal(shape[-1]).astype(np.float32)]
        got, want = run_both(op, ins, target, lanes)
        check(got, want, seed, atol=1e-5)


@width
def test_reductions_multi_output(target, lanes):
    """sum/mean/max/min with and without keepdim, a row value that uses a reduced one, a
    per-row input and a row result needing no reduction, all results of one kernel; NaN rows
    propagate through max/min."""
    def build(rw, x, w, r):
        ax = {"axes": (-1,)}
        m = rw.value("tensor.max", x, keepdim=True, **ax)
        return [rw.value("tensor.sum", x, keepdim=True, **ax),
                rw.value("tensor.mean", x, keepdim=False, **ax), m,
                rw.value("tensor.min", x, keepdim=False, **ax),
                rw.value("tensor.max", x, keepdim=False, **ax),
                rw.value("tensor.sub", rw.value("tensor.mul", x, r), m),
                rw.value("tensor.sum", rw.value("tensor.mul", x, w), keepdim=False, **ax),
                rw.value("tensor.gt", x, w)]  # a bool row result stored in pass 1
    op = fused("reduction", [T("f32", "B", "T", "D"), T("f32", "D"), T("f32", "B", "T", 1)],
               build)
    rng, seed = _rng()
    for shape in [(2, 3, 37), (1, 1, 1), (3, 2, 4099)]:
        x = rng.standard_normal(shape).astype(np.float32)
        x[0, 0, -1] = np.nan
        ins = [x, rng.standard_normal(shape[-1]).astype(np.float32),
               rng.standard_normal(shape[:2] + (1,)).astype(np.float32)]
        got, want = run_both(op, ins, target, lanes)
        check(got, want, seed, atol=2e-5 * math.sqrt(shape[-1]))
    got, want = run_both(op, strided_views(ins), target, lanes)
    check(got, want, seed, atol=2e-5 * math.sqrt(shape[-1]))


@pytest.mark.parametrize("w", [0, 1], ids=WIDTH_IDS)
def test_int_bool_f64_reductions(w):
    """i32 sum (wrapping)/max/min/mean (truncated); bool max/min/sum (any/all/any); and f64
    sum/mean over two trailing axes."""
    target, lanes = WIDTHS[w]

    def ints(rw, x, b):
        ax = {"axes": (-1,), "keepdim": True}
        return [rw.value(f"tensor.{n}", x, **ax) for n in ("sum", "max", "min", "mean")] + \
            [rw.value(f"tensor.{n}", b, **ax) for n in ("max", "min", "sum")]
    op = fused("reduction", [T("i32", "N", "D"), T("bool", "N", "D")], ints)
    rng, seed = _rng()
    for n, d in [(5, 129), (1, 1), (64, 3)]:
        x = rng.integers(-2**31, 2**31, (n, d), dtype=np.int64).astype(np.int32)
        b = rng.random((n, d)) < (0.02 if n == 64 else 0.5)
        got, want = run_both(op, [x, b], target, lanes)
        check(got, want, seed)

    def f64(rw, x):
        ax = {"axes": (1, 2), "keepdim": False}
        return [rw.value("tensor.sum", x, **ax), rw.value("tensor.mean", x, **ax)]
    op = fused("reduction", [T("f64", "N", "H", "D")], f64)
    for shape in [(3, 5, 7), (2, 1, 1000)]:
        got, want = run_both(op, [rng.standard_normal(shape)], target, lanes)
        check(got, want, seed, atol=1e-12)


@width
def test_scalar_and_unit_domains(target, lanes):
    """Rank-0 kernels, and a domain whose last dim is 1 (every value one per row)."""
    op = fused("elementwise", [T("f32"), T("f32")], lambda rw, x, y: [
        rw.value("tensor.mul", rw.value("tensor.exp", x), y)])
    rng, seed = _rng()
    got, want = run_both(op, [np.float32(rng.standard_normal()), np.asarray(2.5, np.float32)],
                         target, lanes)
    check(got, want, seed)
    op = fused("elementwise", [T("f32", "N", 1), T("f32", 1)], lambda rw, x, y: [
        rw.value("tensor.sub", x, y), rw.value("tensor.lt", x, y)])
    for n in (1, 7, 300):
        ins = [rng.standard_normal((n, 1)).astype(np.float32), np.float32([0.1])]
        got, want = run_both(op, ins, target, lanes)
        check(got, want, seed)


class RecordingPool:
    """Runs jobs like pool.pool(), remembering how many each launch had."""

    def __init__(self):
        self.sizes = []

    def run(self, jobs):
        self.sizes.append(len(jobs))
        core_pool().run(jobs)


def test_threads_split_rows_and_long_rows():
    """Two threads: a reduction split by rows, and an elementwise kernel with fewer rows than
    threads split inside its long row (the jobs' pointers are offset along L)."""
    rng, seed = _rng()
    target, lanes = WIDTHS[0]
    op = fused("elementwise", [T("f32", "N", "L"), T("f32", "L")], lambda rw, x, y: [
        rw.value("tensor.silu", rw.value("tensor.add", x, y))])
    n = 600_001
    x, y = rng.standard_normal((1, n)).astype(np.float32), rng.standard_normal(n).astype(
        np.float32)
    pool = RecordingPool()
    kernel = loops.compile_loop_kernel(op, target, lanes)
    out = np.empty_like(x)
    kernel.run([x, y], [out], threads=2, pool=pool)
    check([out], run_block(op.body, [x, y], {}), seed)
    op = _layer_norm(1, True)
    ins = [rng.standard_normal((128, 8, 512)).astype(np.float32),
           *(rng.standard_normal(512).astype(np.float32) for _ in range(2))]
    kernel = loops.compile_loop_kernel(op, target, lanes)
    out = np.empty_like(ins[0])
    kernel.run(ins, [out], threads=2, pool=pool)
    check([out], run_block(op.body, ins, {}), seed, atol=1e-5)
    assert pool.sizes == [2, 2]


# ---- GEMM tile epilogue -------------------------------------------------------------------------

def _tile_runner(name: str, text: str, target):
    """A callable for the internal tile function: the text plus an exported wrapper."""
    sig = "ptr %c, i64 %ldc, i64 %row0, i64 %col0, i64 %mr, i64 %nr, ptr %args"
    wrapper = (f"define void @{name}_test({sig}) {{\n  call void @{name}(ptr %c, i64 %ldc, "
               "i64 %row0, i64 %col0, i64 %mr, i64 %nr, ptr %args)\n  ret void\n}\n")
    module = default_engine(target).add_ir(name + "_test", text + wrapper)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return module.function(f"{name}_test", None, ptr, i64, i64, i64, i64, i64, ptr)


@width
def test_tile_epilogue(target, lanes):
    """gelu(a@b + bias) + residual, times a per-row scale: the epilogue applied tile by tile
    (6 x 16 tiles with edges) to C = a@b, against the interpreter on the whole body."""
    def build(rw, a, b, bias, res, scale):
        mm = rw.value("tensor.matmul", a, b)
        g = rw.value("tensor.gelu", rw.value("tensor.add", mm, bias), approximate="tanh")
        return [rw.value("tensor.mul", rw.value("tensor.add", g, res), scale)]
    op = fused("matmul", [T("f32", "M", "K"), T("f32", "K", "N"), T("f32", "N"),
                          T("f32", "M", "N"), T("f32", "M", 1)], build)
    anchor = op.body.ops[0]
    name, text, operands = loops.render_tile_epilogue(op, anchor, target, lanes)
    assert operands == op.body.args[2:]
    run = _tile_runner(name, text, target)
    rng, seed = _rng()
    m, n, k = 13, 37, 5
    a, b = (rng.standard_normal(s).astype(np.float32) for s in [(m, k), (k, n)])
    extra = [rng.standard_normal(s).astype(np.float32) for s in [(n,), (m, n), (m, 1)]]
    want = run_block(op.body, [a, b, *extra], {})[0]
    for residual in (extra[1], np.ascontiguousarray(extra[1].T).T):  # then the gathered path
        views = [np.broadcast_to(x, (m, n)) for x in (extra[0], residual, extra[2])]
        args = np.array([w for v in views for w in (v.ctypes.data, v.strides[0] // 4,
                                                   v.strides[1] // 4)], np.int64)
        c = a @ b
        for r0 in range(0, m, 6):
            for c0 in range(0, n, 16):
                run(c[r0:, c0:].ctypes.data, n, r0, c0, min(6, m - r0), min(16, n - c0),
                    args.ctypes.data)
        check([c], [want], seed, atol=1e-5)


# ---- errors -------------------------------------------------------------------------------------

def test_errors_name_the_op():
    with pytest.raises(LmcError, match=r"tensor\.sum.*same trailing axes"):
        loops.Plan(fused("reduction", [T("f32", "N", "D")], lambda rw, x: [
            rw.value("tensor.sum", x, axes=(0,), keepdim=True)]))
    with pytest.raises(LmcError, match=r"tensor\.matmul.*neither elementwise"):
        loops.Plan(fused("elementwise", [T("f32", 4, 4)], lambda rw, x: [
            rw.value("tensor.matmul", x, x)]))
    with pytest.raises(LmcError, match="not a loop kernel"):
        loops.Plan(fused("matmul", [T("f32", 4, 4)], lambda rw, x: [
            rw.value("tensor.matmul", x, x)]))
    with pytest.raises(LmcError, match="only scalar"):
        loops.compile_loop_kernel(fused("elementwise", [T("f32", 2)], lambda rw, x: [
            rw.value("tensor.add", x, rw.constant([1.0, 2.0], T("f32", 2)))]))
    op = fused("elementwise", [T("f32", "N")], lambda rw, x: [rw.value("tensor.exp", x)])
    kernel = loops.compile_loop_kernel(op)
    with pytest.raises(ShapeError, match="does not match"):
        kernel.run([np.zeros(3, np.float32)], [np.zeros(4, np.float32)])
    with pytest.raises(ShapeError, match="does not match"):
        kernel.run([np.zeros(3, np.float64)], [np.zeros(3, np.float32)])
