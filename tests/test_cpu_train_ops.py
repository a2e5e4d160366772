"""CPU kernels for the ops that backward graphs add (backends/cpu: columns.py, scatter.py,
losses.py, grouped.py, the GEMM on transposed operands) against the reference interpreter, on
fresh random inputs: odd sizes, strided views, duplicates and negative indices, symbolic dims at
two sizes through the fuse pass and the runtime, 1 and 2 threads, 16-lane code on AVX2."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from op_cases import CASES, build

from lmc.backends.cpu import columns, datamove, kernels, losses, scatter
from lmc.backends.cpu.grouped import grouped_weight_grad
from lmc.backends.cpu.jit import host_target
from lmc.backends.cpu.runtime import CpuExecutable
from lmc.backends.cpu.threads import batched_sgemm, sgemm
from lmc.backends.reference.interpreter import IMPL, bind_symbols, run_block, run_func
from lmc.errors import LmcError
from lmc.ir import parse
from lmc.pass_base import parse_pipeline

HOST = host_target()
# (target, lanes): the host's width, and the other one (16 lanes run as AVX2 pairs here)
WIDTHS = [(HOST, None), (HOST.without_avx512(), None) if HOST.has_avx512 else (HOST, 16)]


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """1 or 2 threads, the split forced at any size so that tiny inputs exercise it."""
    monkeypatch.setattr(datamove, "MIN_BYTES_PER_THREAD", 1)
    monkeypatch.setattr(scatter, "MIN_BYTES_PER_THREAD", 1)
    monkeypatch.setattr(columns, "MIN_WORK_PER_THREAD", 1)
    return request.param


def _compiled(text: str) -> tuple:
    """(the text's module after fuse, its CpuExecutable, the module before)."""
    before, module = parse(text), parse(text)
    for p in parse_pipeline("canonicalize,cse,dce,fuse,dce"):
        p.run(module)
    return module, CpuExecutable(module, prepack=False), before


def _random_inputs(rng, module, sizes: dict[str, int]) -> list[np.ndarray]:
    out = []
    for a in module.main.inputs:
        shape = tuple(sizes.get(d, d) for d in a.type.shape)
        if a.type.dtype.is_int:
            out.append(rng.integers(0, 5, shape))
        else:
            out.append(rng.standard_normal(shape).astype(a.type.dtype.to_numpy()))
    return out


def _check_run(text: str, sizes_list: list[dict], make=None, rtol=2e-5, atol=2e-5,
               natives: tuple = ()) -> CpuExecutable:
    """Compile `text`, run it at each size against the interpreter on the unfused module; no
    step falls back to the interpreter."""
    _, ex, before = _compiled(text)
    assert ex.report()["fallback"] == [], ex.report()
    for name in natives:
        assert any(st.kind == "native" and st.op.name == name for st in ex.steps), name
    rng, seed = _rng()
    for sizes in sizes_list:
        inputs = make(rng, sizes) if make else _random_inputs(rng, before, sizes)
        got, want = ex(inputs), run_func(before, inputs)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, sizes)
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{sizes} seed {seed}")
    return ex


# ---- column reductions (columns.py, the fuse pass's column groups) -----------------------------

COLUMNS = """
func @main(%g: f32[B,T,{c}], %xh: f32[B,T,{c}], %w: f32[{c}], %lr: f32[])
    -> (f32[{c}], f32[1,1,{c}], f32[{c}], f32[{c}], f32[{c}], f32[{c}]) {{
  %0 = tensor.mul %g, %xh : f32[B,T,{c}]
  %1 = tensor.sum %0 {{axes = [0, 1]}} : f32[{c}]
  %2 = tensor.mul %1, %lr : f32[{c}]
  %3 = tensor.sub %w, %2 : f32[{c}]
  %4 = tensor.sum %g {{axes = [0, 1], keepdim = true}} : f32[1,1,{c}]
  %5 = tensor.mean %g {{axes = [0, 1]}} : f32[{c}]
  %6 = tensor.max %xh {{axes = [0, 1]}} : f32[{c}]
  %7 = tensor.min %0 {{axes = [1, 0]}} : f32[{c}]
  func.return %3, %4, %5, %6, %7, %1
}}
"""


@pytest.mark.parametrize("c", [2, 7, 129])
def test_leading_axis_reductions_with_prologue_and_epilogue(c):
    sizes = [{"B": 1, "T": 1}, {"B": 3, "T": 37}, {"B": 2, "T": 129}]
    ex = _check_run(COLUMNS.format(c=c), sizes)
    reductions = [st for st in ex.steps if st.kind == "kernel" and st.op.kind == "reduction"]
    assert reductions and all(columns.is_column_body(st.op.body) for st in reductions)
    bodies = [{o.name for o in st.op.body.ops} for st in reductions]
    assert any({"tensor.mul", "tensor.sub", "tensor.sum"} <= b for b in bodies)  # both ends


GQA = """
func @main(%x: f32[B,2,3,T,{d}]) -> (f32[B,2,T,{d}], f32[B,1,3,1,{d}], f32[{d}]) {{
  %0 = tensor.sum %x {{axes = [2]}} : f32[B,2,T,{d}]
  %1 = tensor.exp %x : f32[B,2,3,T,{d}]
  %2 = tensor.sum %1 {{axes = [1, 3], keepdim = true}} : f32[B,1,3,1,{d}]
  %3 = tensor.max %x {{axes = [0, 1, 2, 3]}} : f32[{d}]
  func.return %0, %2, %3
}}
"""


@pytest.mark.parametrize("d", [5, 64])
def test_middle_axis_reductions(d):
    _check_run(GQA.format(d=d), [{"B": 1, "T": 7}, {"B": 2, "T": 33}])


PERMUTED = """
func @main(%x: f32[B,{c},T], %y: f64[T,B,{c}], %i: i64[B,T,{c}])
    -> (f32[{c}], f64[B,{c}], i64[{c}]) {
  %0 = tensor.permute %x {perm = [0, 2, 1]} : f32[B,T,{c}]
  %1 = tensor.sum %0 {axes = [0, 1]} : f32[{c}]
  %2 = tensor.sum %y {axes = [0]} : f64[B,{c}]
  %3 = tensor.max %i {axes = [0, 1]} : i64[{c}]
  func.return %1, %2, %3
}
"""


def test_strided_inputs_f64_and_integers():
    """A view whose last axis is not contiguous (copied first), f64 and integer columns."""
    _check_run(PERMUTED.replace("{c}", "19"), [{"B": 2, "T": 5}, {"B": 3, "T": 130}])


EMPTY = """
func @main(%x: f32[B,T,C]) -> (f32[C], f32[B,T], f32[1,1,C]) {
  %0 = tensor.sum %x {axes = [0, 1]} : f32[C]
  %1 = tensor.sum %x {axes = [2]} : f32[B,T]
  %2 = tensor.mean %x {axes = [0, 1], keepdim = true} : f32[1,1,C]
  func.return %0, %1, %2
}
"""


def test_reductions_over_no_elements():
    """A zero-length reduced axis still gives results: 0 for a sum, NaN for a mean."""
    _check_run(EMPTY, [{"B": 0, "T": 3, "C": 7}, {"B": 2, "T": 3, "C": 0}, {"B": 2, "T": 0,
                                                                             "C": 5}])


def _column_op(c: int):
    text = COLUMNS.format(c=c)
    module, _, _ = _compiled(text)
    return next(op for op in module.main.body.ops if op.name == "kernel.fused" and
                op.kind == "reduction" and any(o.name == "tensor.max" for o in op.body.ops))


@pytest.mark.parametrize("target,lanes", WIDTHS, ids=["host", "other-width"])
def test_column_kernel_threads_and_widths(threads, target, lanes):
    op = _column_op(45)
    kernel = columns.compile_column_kernel(op, target, lanes)
    rng, seed = _rng()
    for b, t in [(1, 3), (4, 17)]:
        inputs = [_f32(rng, b, t, 45) if len(a.type.shape) == 3 else _f32(rng, *a.type.shape)
                  for a in op.body.args]
        want = run_block(op.body, inputs, bind_symbols([a.type for a in op.body.args], inputs))
        got = [np.full(w.shape, 77, w.dtype) for w in want]
        kernel.run(inputs, got, threads=threads)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")


def test_a_reduced_value_broadcast_back_is_not_a_column_kernel():
    """The fuse pass never builds it; a hand-made one runs in the interpreter, visibly."""
    text = """
func @main(%x: f32[5,7]) -> (f32[5,7]) {
  %0 = kernel.fused %x {kind = "reduction"} : f32[5,7] {
  ^bb(%a: f32[5,7]):
    %1 = tensor.sum %a {axes = [0], keepdim = true} : f32[1,7]
    %2 = tensor.sub %a, %1 : f32[5,7]
    kernel.yield %2
  }
  func.return %0
}
"""
    module = parse(text)
    assert kernels.build_kernel(module.main.body.ops[0], None, None) is None
    ex = CpuExecutable(module)
    assert len(ex.report()["fallback"]) == 1
    x = np.random.default_rng().standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_allclose(ex([x])[0], x - x.sum(0, keepdims=True), rtol=1e-5, atol=1e-6)


# ---- index_add, scatter, gather (scatter.py) ---------------------------------------------------


def _same(got, ref, seed):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape)
    np.testing.assert_array_equal(got, ref, err_msg=f"seed {seed}")


def _index_add_ref(x, idx, src):
    return IMPL["tensor.index_add"](SimpleNamespace(axis=0), {}, x, idx, src)


@pytest.mark.parametrize("v,n,rest", [(1, 1, (1,)), (7, 20, (33,)), (129, 300, (7,)),
                                      (5, 0, (3,)), (6, 11, (2, 3)), (3, 4, ())])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_index_add_accumulates_duplicates_like_add_at(threads, v, n, rest, dtype):
    rng, seed = _rng()
    x = rng.standard_normal((v, *rest)).astype(dtype)
    idx = rng.integers(-v, v, n)  # negative ones count from the end; n > v repeats rows
    src = rng.standard_normal((n, *rest)).astype(dtype)
    _same(scatter.index_add(x, idx, src, threads=threads), _index_add_ref(x, idx, src), seed)


def test_index_add_views_broadcast_src_and_bad_index(threads):
    rng, seed = _rng()
    big = _f32(rng, 40, 50)
    idx = rng.integers(0, 13, 30)
    for x in (big[:13, ::2], big.T[:13, :20], np.broadcast_to(big[0], (13, 50))):
        for src in (_f32(rng, 30, x.shape[1]), _f32(rng, x.shape[1]),
                    _f32(rng, x.shape[1], 30).T):
            _same(scatter.index_add(x, idx, src, threads=threads),
                  _index_add_ref(x, idx, src), seed)
    with pytest.raises(datamove.IndexRangeError, match=r"index 13 at position 2 .* size 13"):
        scatter.index_add(big[:13], np.array([0, 1, 13]), big[:3])
    with pytest.raises(LmcError, match="index -14"):
        scatter.index_add(big[:13], np.array([-14]), big[:1])


def _scatter_ref(x, idx, src, reduce):
    return IMPL["tensor.scatter"](SimpleNamespace(axis=-1, reduce=reduce), {}, x, idx, src)


def _gather_ref(x, idx):
    return IMPL["tensor.gather"](SimpleNamespace(axis=-1), {}, x, idx)


@pytest.mark.parametrize("lead,c,k", [((1,), 1, 1), ((7,), 33, 3), ((129,), 7, 1),
                                      ((2, 3), 17, 5), ((4,), 9, 0)])
def test_scatter_and_gather_on_the_last_axis(threads, lead, c, k):
    rng, seed = _rng()
    x = _f32(rng, *lead, c)
    idx = rng.integers(-c, c, (*lead, k))  # repeats within a row when k > 1 and c small
    src = _f32(rng, *lead, k + 2)  # larger than the indices: only idx's share is read
    _same(scatter.scatter_last(x, idx, src, "add", threads=threads),
          _scatter_ref(x, idx, src, "add"), seed)
    unique = np.stack([rng.permutation(c)[:min(k, c)] for _ in range(int(np.prod(lead)))])
    unique = unique.reshape(*lead, -1)
    _same(scatter.scatter_last(x, unique, src, "none", threads=threads),
          _scatter_ref(x, unique, src, "none"), seed)
    for arr in (x, x.astype(np.int64), x > 0, x.astype(np.float16)):
        _same(scatter.gather_last(arr, idx, threads=threads), _gather_ref(arr, idx), seed)
    xt = _f32(rng, c, *lead[::-1]).T  # a transposed view
    _same(scatter.gather_last(xt, idx), _gather_ref(xt, idx), seed)


def test_scatter_and_gather_bad_index():
    x = np.zeros((3, 5), np.float32)
    with pytest.raises(datamove.IndexRangeError, match=r"index 5 at position \(2, 1\)"):
        scatter.scatter_last(x, np.array([[0, 1], [2, 3], [4, 5]]), np.ones((3, 2), np.float32),
                             "add")
    with pytest.raises(datamove.IndexRangeError, match=r"index -6 at position \(0, 0\)"):
        scatter.gather_last(x, np.array([[-6], [0], [0]]))


INDEXING = """
func @main(%x: f32[N,11], %i: i64[N,1], %s: f32[N,1], %e: f32[V,6], %ids: i64[M],
           %g: f32[M,6], %small: i64[2,1]) -> (f32[N,11], f32[N,1], f32[V,6], f32[N,11]) {
  %0 = tensor.scatter %x, %i, %s {axis = 1, reduce = "add"} : f32[N,11]
  %1 = tensor.gather %x, %i {axis = -1} : f32[N,1]
  %2 = tensor.index_add %e, %ids, %g {axis = 0} : f32[V,6]
  %3 = tensor.scatter %x, %small, %s {axis = 1} : f32[N,11]
  func.return %0, %1, %2, %3
}
"""


def test_indexing_ops_in_a_compiled_function():
    """Symbolic sizes at two values; a scatter whose indices have fewer rows than x takes the
    interpreter's path inside the same native step."""
    def make(rng, sizes):
        n, v, m = sizes["N"], sizes["V"], sizes["M"]
        return [_f32(rng, n, 11), rng.integers(-11, 11, (n, 1)), _f32(rng, n, 1),
                _f32(rng, v, 6), rng.integers(0, v, m), _f32(rng, m, 6),
                rng.integers(0, 11, (2, 1))]
    _check_run(INDEXING, [{"N": 3, "V": 3, "M": 7}, {"N": 129, "V": 40, "M": 1000}], make,
               rtol=0, atol=0, natives=("tensor.scatter", "tensor.gather", "tensor.index_add"))


# ---- cross-entropy (losses.py) -----------------------------------------------------------------

@pytest.mark.parametrize("n,c,extra", [(1, 1, ()), (7, 13, ()), (129, 4097, ()), (3, 7, (5,))])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_rows(threads, n, c, extra, eps):
    rng, seed = _rng()
    logits = (rng.standard_normal((n, c, *extra)) * 4).astype(np.float32)
    target = rng.integers(-c, c, (n, *extra))
    target.reshape(-1)[::3] = -100
    for reduction in ("mean", "sum", "none"):
        op = SimpleNamespace(ignore_index=-100, label_smoothing=eps, reduction=reduction)
        want = IMPL["tensor.cross_entropy"](op, {}, logits, target)
        got = losses.cross_entropy(logits, target, label_smoothing=eps, reduction=reduction,
                                   threads=threads)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=3e-6, atol=3e-6, err_msg=f"seed {seed}")


def test_cross_entropy_edges():
    op = SimpleNamespace(ignore_index=-100, label_smoothing=0.0, reduction="none")
    logits = np.array([[1.0, np.nan, 2.0], [-np.inf, -np.inf, -np.inf], [1e30, 1e30, 0.0],
                       [3.0, -np.inf, 1.0]], np.float32)
    target = np.array([0, 1, 2, 1])
    want = IMPL["tensor.cross_entropy"](op, {}, logits, target)
    got = losses.cross_entropy(logits, target, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-6)  # NaN, NaN, 1e30, inf at the same places
    all_ignored = losses.cross_entropy(logits, np.full(4, -100))
    assert np.isnan(all_ignored) and all_ignored.dtype == np.float32
    with pytest.raises(datamove.IndexRangeError, match="target 3 of row 1"):
        losses.cross_entropy(logits, np.array([0, 3, 0, 0]))


CE = """
func @main(%logits: f32[N,37], %t: i64[N]) -> (f32[], f32[N]) {
  %0 = tensor.cross_entropy %logits, %t {label_smoothing = 0.05} : f32[]
  %1 = tensor.cross_entropy %logits, %t {ignore_index = 3, reduction = "none"} : f32[N]
  func.return %0, %1
}
"""


def test_cross_entropy_in_a_compiled_function():
    def make(rng, sizes):
        return [_f32(rng, sizes["N"], 37), rng.integers(0, 37, sizes["N"])]
    _check_run(CE, [{"N": 1}, {"N": 300}], make, rtol=3e-6, atol=3e-6,
               natives=("tensor.cross_entropy",))


# ---- the MoE weight gradient (grouped.py) ------------------------------------------------------

@pytest.mark.parametrize("m,d,f,e", [(1, 1, 1, 1), (7, 5, 3, 4), (129, 33, 17, 8), (0, 4, 6, 3)])
def test_grouped_weight_grad(threads, m, d, f, e):
    rng, seed = _rng()
    x, g = _f32(rng, m, d), _f32(rng, m, f)
    cuts = np.sort(rng.integers(0, m + 1, e + 1))  # empty experts; rows outside are unused
    ref = IMPL["moe.grouped_weight_grad"](None, {}, x, g, cuts)
    for xv, gv in ((x, g), (np.asfortranarray(x), g), (x, np.asfortranarray(g))):
        got = grouped_weight_grad(xv, gv, cuts, threads=threads)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


# ---- every op case the native kernels cover, through the runtime -------------------------------

NATIVE_CASES = [c for c in CASES if c.op in ("tensor.cross_entropy", "tensor.index_add",
                                             "tensor.scatter", "tensor.gather",
                                             "moe.grouped_weight_grad")]


@pytest.mark.parametrize("c", NATIVE_CASES, ids=[c.id for c in NATIVE_CASES])
def test_op_cases_on_the_cpu_runtime(c):
    inputs = c.make(c.rng())
    module = build(c, inputs)
    got, want = CpuExecutable(module)(inputs), run_func(module, inputs)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=3e-6, atol=3e-6, err_msg=c.id)


# ---- matmuls on transposed operands, as backward graphs make them ------------------------------

MATMULS = """
func @main(%x: f32[B,T,24], %g: f32[B,T,40], %w: f32[40,24], %p: f32[B,3,T,T],
           %q: f32[B,3,T,8]) -> (f32[24,40], f32[B,T,24], f32[B,3,T,8]) {
  %0 = tensor.reshape %x : f32[B*T,24]
  %1 = tensor.permute %0 {perm = [1, 0]} : f32[24,B*T]
  %2 = tensor.reshape %g : f32[B*T,40]
  %3 = tensor.matmul %1, %2 : f32[24,40]
  %4 = tensor.matmul %g, %w : f32[B,T,24]
  %5 = tensor.permute %p {perm = [0, 1, 3, 2]} : f32[B,3,T,T]
  %6 = tensor.matmul %5, %q : f32[B,3,T,8]
  func.return %3, %4, %6
}
"""


def test_matmuls_read_transposed_views_without_copies():
    ex = _check_run(MATMULS, [{"B": 1, "T": 1}, {"B": 2, "T": 37}], rtol=1e-4, atol=1e-4)
    kinds = [(st.kind, st.op.name) for st in ex.steps]
    assert ("view", "tensor.permute") in kinds  # the transposes stay views ...
    assert not any(st.kind == "kernel" and st.op.kind == "elementwise" for st in ex.steps)


SCALED = """
func @main(%q: f32[B,3,T,8], %k: f32[B,3,8,T], %m: bool[T,T], %p: f32[B,3,T,8])
    -> (f32[B,3,T,T], f32[B,3,T,T]) {
  %0 = tensor.constant {value = 0.35355339059327373} : f32[]
  %1 = tensor.constant {value = -1e30} : f32[]
  %2 = tensor.matmul %q, %k : f32[B,3,T,T]
  %3 = tensor.mul %2, %0 : f32[B,3,T,T]
  %4 = tensor.where %m, %3, %1 : f32[B,3,T,T]
  %5 = tensor.matmul %p, %k : f32[B,3,T,T]
  %6 = tensor.mul %0, %5 : f32[B,3,T,T]
  func.return %4, %6
}
"""


def test_batched_matmul_scale_becomes_alpha():
    """Attention's (q·kᵀ)·scale: the scale is the batched GEMM's alpha (bit-exact), the mask
    the only in-place epilogue left."""
    def make(rng, sizes):
        b, t = sizes["B"], sizes["T"]
        return [_f32(rng, b, 3, t, 8), _f32(rng, b, 3, 8, t), rng.random((t, t)) > 0.3,
                _f32(rng, b, 3, t, 8)]
    ex = _check_run(SCALED, [{"B": 1, "T": 5}, {"B": 2, "T": 33}], make, rtol=1e-5, atol=1e-5)
    launchers = [st.fn for st in ex.steps if st.kind == "kernel" and st.op.kind == "matmul"]
    assert [(fn.alpha, fn.in_place is None) for fn in launchers] == \
        [(pytest.approx(0.35355339), False), (pytest.approx(0.35355339), True)]


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 1030, 13), (257, 129, 31), (6, 300, 16)])
def test_gemm_packs_column_major_lhs(m, k, n):
    """The weight gradient's lhs is xᵀ: a column-major A, packed by contiguous MR-row copies."""
    rng, seed = _rng()
    a, b = _f32(rng, k, m).T, _f32(rng, k, n)
    want = a.astype(np.float64) @ b
    np.testing.assert_allclose(sgemm(a, b), want, rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}")
    pa = _f32(rng, 3, k, m).transpose(0, 2, 1)
    np.testing.assert_allclose(batched_sgemm(pa, b), pa.astype(np.float64) @ b, rtol=1e-4,
                               atol=1e-4, err_msg=f"seed {seed}")


# ---- epilogue operands computed in the GEMM epilogue (fuse pulls their producers) ----------------

GELU_GRAD = """
func @main(%g: f32[N,{n}], %w: f32[{k},{n}], %h: f32[N,{k}], %h3: f32[B,T,{k}],
           %g3: f32[B,T,{n}]) -> (f32[N,{k}], f32[N,{k}], f32[B,T,{k}]) {{
  %0 = tensor.permute %w {{perm = [1, 0]}} : f32[{n},{k}]
  %1 = tensor.matmul %g, %0 : f32[N,{k}]
  %c = tensor.constant {{value = 0.7071067811865476}} : f32[]
  %2 = tensor.mul %h, %c : f32[N,{k}]
  %3 = tensor.erf %2 : f32[N,{k}]
  %4 = tensor.neg %h : f32[N,{k}]
  %5 = tensor.mul %4, %h : f32[N,{k}]
  %6 = tensor.exp %5 : f32[N,{k}]
  %7 = tensor.mul %h, %6 : f32[N,{k}]
  %8 = tensor.add %3, %7 : f32[N,{k}]
  %9 = tensor.mul %1, %8 : f32[N,{k}]
  %10 = tensor.exp %h : f32[N,{k}]
  %11 = tensor.matmul %g3, %0 : f32[B,T,{k}]
  %12 = tensor.tanh %h3 : f32[B,T,{k}]
  %13 = tensor.mul %12, %11 : f32[B,T,{k}]
  func.return %9, %10, %13
}}
"""


@pytest.mark.parametrize("n,k", [(1, 1), (7, 13), (33, 129)])
def test_gemm_epilogue_computes_its_operands(n, k):
    """gelu'-like producers of an epilogue operand run inside the matmul kernel (2-D and
    batched-x layouts), one kernel per GEMM, at two sizes, against the interpreter."""
    ex = _check_run(GELU_GRAD.format(n=n, k=k), [{"N": 5, "B": 2, "T": 3},
                                                 {"N": 130, "B": 3, "T": 17}], rtol=1e-4,
                    atol=1e-5)
    kernels = [st.op for st in ex.steps if st.op.name == "kernel.fused"]
    assert sorted(op.kind for op in kernels) == ["elementwise", "matmul", "matmul"], kernels
    assert any(o.name == "tensor.erf" for op in kernels if op.kind == "matmul"
               for o in op.body.ops)


# A weight-gradient GEMM and the AdamW update of its weight (g read twice: g² and g − m), a
# forward GEMM whose h is kept for the backward next to gelu(h), and a batched GEMM whose
# scaled scores are a result next to their exp: each one matmul kernel with several results.
MULTI_OUT = """
func @main(%x: f32[N,{d}], %dy: f32[N,{f}], %w: f32[{d},{f}], %m: f32[{d},{f}],
           %v: f32[{d},{f}], %wf: f32[{f},{d}], %q: f32[B,H,T,{d}], %kt: f32[B,H,{d},T])
    -> (f32[{d},{f}], f32[{d},{f}], f32[{d},{f}], f32[N,{f}], f32[N,{f}], f32[B,H,T,T],
        f32[B,H,T,T]) {{
  %0 = tensor.constant {{value = 0.9}} : f32[]
  %1 = tensor.constant {{value = 0.1}} : f32[]
  %2 = tensor.constant {{value = 0.001}} : f32[]
  %3 = tensor.constant {{value = 1e-08}} : f32[]
  %xt = tensor.permute %x {{perm = [1, 0]}} : f32[{d},N]
  %g = tensor.matmul %xt, %dy : f32[{d},{f}]
  %4 = tensor.mul %m, %0 : f32[{d},{f}]
  %5 = tensor.mul %g, %1 : f32[{d},{f}]
  %m2 = tensor.add %4, %5 : f32[{d},{f}]
  %6 = tensor.mul %g, %g : f32[{d},{f}]
  %7 = tensor.mul %v, %0 : f32[{d},{f}]
  %8 = tensor.mul %6, %1 : f32[{d},{f}]
  %v2 = tensor.add %7, %8 : f32[{d},{f}]
  %9 = tensor.sqrt %v2 : f32[{d},{f}]
  %10 = tensor.add %9, %3 : f32[{d},{f}]
  %11 = tensor.div %m2, %10 : f32[{d},{f}]
  %12 = tensor.mul %11, %2 : f32[{d},{f}]
  %w2 = tensor.sub %w, %12 : f32[{d},{f}]
  %wft = tensor.permute %wf {{perm = [1, 0]}} : f32[{d},{f}]
  %h = tensor.matmul %x, %wft : f32[N,{f}]
  %gh = tensor.gelu %h {{approximate = "none"}} : f32[N,{f}]
  %s = tensor.matmul %q, %kt : f32[B,H,T,T]
  %13 = tensor.constant {{value = 0.125}} : f32[]
  %ss = tensor.mul %s, %13 : f32[B,H,T,T]
  %e = tensor.exp %ss : f32[B,H,T,T]
  func.return %w2, %m2, %v2, %h, %gh, %ss, %e
}}
"""


@pytest.mark.parametrize("d,f", [(1, 1), (7, 13), (40, 129)])
def test_matmul_kernels_with_several_results(d, f):
    """Each GEMM computes every value of its shape read from it, writing those used outside
    (2-D tile epilogue, batched in-place epilogue), at two sizes, against the interpreter.
    v is a second moment, v >= 0.1: near 0, m / (sqrt(v) + eps) turns the GEMM's last-bit
    rounding (its summation order is not numpy's) into a difference of 1e-3 (1 seed in ~30)."""
    def make(rng, sizes):
        n, b, h, t = (sizes[k] for k in "NBHT")
        shapes = [(n, d), (n, f), (d, f), (d, f), (d, f), (f, d), (b, h, t, d), (b, h, d, t)]
        x, dy, w, m, v, wf, q, kt = (_f32(rng, *s) for s in shapes)
        return [x, dy, w, m, np.abs(v) + np.float32(0.1), wf, q, kt]
    ex = _check_run(MULTI_OUT.format(d=d, f=f), [{"N": 5, "B": 1, "H": 2, "T": 3},
                                                 {"N": 131, "B": 2, "H": 3, "T": 17}],
                    make, rtol=1e-4, atol=1e-5)
    kernels = [st.op for st in ex.steps if st.op.name == "kernel.fused"]
    assert [(op.kind, len(op.result_values)) for op in kernels] == \
        [("matmul", 3), ("matmul", 2), ("matmul", 2)], kernels


GROUPED_MULTI = """
func @main(%x: f32[M,{d}], %w: f32[3,{d},{f}], %off: i64[4]) -> (f32[M,{f}], f32[M,{f}]) {{
  %0 = moe.grouped_matmul %x, %w, %off : f32[M,{f}]
  %1 = tensor.silu %0 : f32[M,{f}]
  func.return %0, %1
}}
"""


@pytest.mark.parametrize("d,f", [(1, 1), (13, 7), (40, 129)])
def test_grouped_matmul_kernel_with_two_results(d, f):
    """The expert GEMM's raw result and its SiLU from one grouped kernel; experts may be empty."""
    def make(rng, sizes):
        m = sizes["M"]
        cuts = np.sort(rng.integers(0, m + 1, 2))
        return [_f32(rng, m, d), _f32(rng, 3, d, f), np.array([0, *cuts, m], np.int64)]
    ex = _check_run(GROUPED_MULTI.format(d=d, f=f), [{"M": 6}, {"M": 131}], make, rtol=1e-4,
                    atol=1e-5)
    kernels = [st.op for st in ex.steps if st.op.name == "kernel.fused"]
    assert [(op.kind, len(op.result_values)) for op in kernels] == [("grouped_matmul", 2)]


UNIT_BATCH = """
func @main(%x: f32[1,T,{c}], %g: f32[{c}]) -> (f32[1,T,1], f32[1,T,{c}], f32[{c}]) {{
  %m = tensor.mean %x {{axes = [2], keepdim = true}} : f32[1,T,1]
  %d = tensor.sub %x, %m : f32[1,T,{c}]
  %y = tensor.mul %d, %g : f32[1,T,{c}]
  %s = tensor.sum %y {{axes = [0, 1]}} : f32[{c}]
  func.return %m, %y, %s
}}
"""


@pytest.mark.parametrize("c", [3, 16, 37])
def test_a_unit_batch_dim_read_by_a_reduction_and_broadcast(c):
    """x [1, T, C] is read by the row mean (along the size-1 batch axis) and by x − mean (where
    the size-1 dim broadcasts): one kernel, not an error (a batch of one in LayerNorm)."""
    _check_run(UNIT_BATCH.format(c=c), [{"T": 1}, {"T": 5}, {"T": 33}])
