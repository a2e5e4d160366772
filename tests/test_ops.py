"""Every op: the reference interpreter against PyTorch on fresh random inputs (tests/op_cases.py),
plus golden values from the seed material and the structural ops (return, kernel.fused)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from op_cases import CASES, SEED, STRUCTURAL, Case, build, fused_module

from lmc.backends.reference.interpreter import IMPL, run_func
from lmc.ir import parse
from lmc.ir.ops import OPS
from lmc.ir.verifier import verify


def _to_torch(x: np.ndarray, f64: bool) -> torch.Tensor:
    if x.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16
        t = torch.from_numpy(x.astype(np.float32)).bfloat16()
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
    return t.double() if f64 and t.is_floating_point() else t


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.double() if t.dtype == torch.bfloat16 else t).numpy()


def check_case(c: Case) -> None:
    inputs = c.make(c.rng())
    inputs = [np.asarray(x) for x in inputs]
    m = build(c, inputs)
    verify(m)
    with np.errstate(divide="ignore", invalid="ignore"):  # cases with -inf rows expect NaN
        got = run_func(m, inputs)
    want = c.ref(*[_to_torch(x, c.f64_ref) for x in inputs])
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    where = f"case {c.id} (LMC_TEST_SEED={SEED})"
    assert len(got) == len(want), where
    for i, (g, w, v) in enumerate(zip(got, want, m.main.outputs)):
        w = _to_numpy(w)
        assert g.dtype == v.dtype.to_numpy(), f"{where}: result {i} is {g.dtype}, typed {v.type}"
        assert g.shape == w.shape, f"{where}: result {i} has shape {g.shape}, torch {w.shape}"
        if v.dtype.is_float:
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64),
                                       rtol=c.rtol, atol=c.atol, equal_nan=True,
                                       err_msg=f"{where}: result {i}")
        else:
            np.testing.assert_array_equal(g, w.astype(g.dtype), err_msg=f"{where}: result {i}")


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_op_matches_torch(c: Case):
    check_case(c)


def test_every_op_has_a_case():
    covered = {c.op for c in CASES}
    missing = sorted(set(OPS) - covered - STRUCTURAL)
    assert not missing, f"ops without a case in tests/op_cases.py: {missing}"


def test_every_op_has_an_interpreter_impl():
    missing = sorted(set(OPS) - set(IMPL) - {"func.return", "kernel.yield"})
    assert not missing, f"ops the reference interpreter cannot run: {missing}"


# ---- golden values from the seed material (seed-digest.md, Appendix C) --------------------------

def _run(text: str, *inputs) -> list[np.ndarray]:
    m = parse(text)
    verify(m)
    return run_func(m, [np.asarray(x) for x in inputs])


def test_golden_softmax():
    (y,) = _run("""func @main(%x: f32[3]) -> (f32[3]) {
  %0 = tensor.softmax %x : f32[3]
  func.return %0
}""", np.float32([2.0, 1.0, 0.1]))
    np.testing.assert_allclose(y, [0.659001, 0.242433, 0.098566], atol=1e-6)


def test_golden_cross_entropy_via_log_softmax():
    text = """func @main(%logits: f32[2,3], %onehot: f32[2,3], %target: i64[2]) -> (f32[], f32[]) {
  %0 = tensor.log_softmax %logits {axis = -1} : f32[2,3]
  %1 = tensor.mul %onehot, %0 : f32[2,3]
  %2 = tensor.sum %1 {axes = [1]} : f32[2]
  %3 = tensor.mean %2 : f32[]
  %4 = tensor.neg %3 : f32[]
  %5 = tensor.cross_entropy %logits, %target : f32[]
  func.return %4, %5
}"""
    loss, ce = _run(text, np.float32([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1]]),
                    np.float32([[1, 0, 0], [0, 1, 0]]), np.int64([0, 1]))
    np.testing.assert_allclose([loss, ce], [0.856930, 0.856930], atol=1e-6)
    np.testing.assert_allclose(np.exp(loss), 2.3559, atol=1e-4)  # perplexity


def test_golden_sinusoidal_position_encoding():
    # PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...), pos 1, d 4.
    text = """func @main() -> (f32[4]) {
  %0 = tensor.iota {start = 0, step = 2} : f32[2]
  %1 = tensor.constant {value = -2.302585092994046} : f32[]
  %2 = tensor.mul %0, %1 : f32[2]
  %3 = tensor.exp %2 : f32[2]
  %4 = tensor.iota {start = 1, step = 1} : f32[1]
  %5 = tensor.mul %4, %3 : f32[2]
  %6 = tensor.sin %5 : f32[2]
  %7 = tensor.cos %5 : f32[2]
  %8 = tensor.reshape %6 : f32[2,1]
  %9 = tensor.reshape %7 : f32[2,1]
  %10 = tensor.concat %8, %9 {axis = 1} : f32[2,2]
  %11 = tensor.reshape %10 : f32[4]
  func.return %11
}"""  # -ln(10000)/d = -2.302585...
    (pe,) = _run(text)
    np.testing.assert_allclose(pe, [0.841471, 0.540302, 0.0099998, 0.99995], atol=1e-6)


def test_golden_mat_vec_and_mat_mat():
    text = """func @mv(%a: f32[2,2], %v: f32[2], %b: f32[3,3], %c: f32[3,2]) -> (f32[2], f32[3,2]) {
  %0 = tensor.matmul %a, %v : f32[2]
  %1 = tensor.matmul %b, %c : f32[3,2]
  func.return %0, %1
}"""
    mv, mm = _run(text, np.float32([[1, 2], [3, 4]]), np.float32([5, 6]),
                  np.arange(1, 10, dtype=np.float32).reshape(3, 3),
                  np.float32([[1, 2], [3, 4], [5, 6]]))
    np.testing.assert_array_equal(mv, [17, 39])
    np.testing.assert_array_equal(mm, [[22, 28], [49, 64], [76, 100]])


# ---- semantics that torch does not pin down -------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_attention_fully_masked_row_gives_zeros():
    # torch's SDPA returns NaN for a row with no key to attend to; lmc defines it as zeros.
    (y,) = _run("""func @main(%q: f32[1,1,2,4], %k: f32[1,1,3,4], %v: f32[1,1,3,4], %m: bool[2,3])
    -> (f32[1,1,2,4]) {
  %0 = tensor.attention %q, %k, %v, %m : f32[1,1,2,4]
  func.return %0
}""", *[np.ones((1, 1, t, 4), np.float32) for t in (2, 3, 3)], np.array([[1, 0, 1], [0, 0, 0]],
                                                                         bool))
    np.testing.assert_array_equal(y[0, 0, 1], 0.0)
    np.testing.assert_allclose(y[0, 0, 0], 1.0)


def test_cross_entropy_all_ignored_mean_is_nan():
    x = torch.randn(3, 5)
    t = torch.full((3,), -100)
    (y,) = _run("""func @main(%x: f32[3,5], %t: i64[3]) -> (f32[]) {
  %0 = tensor.cross_entropy %x, %t : f32[]
  func.return %0
}""", x.numpy(), t.numpy())
    assert np.isnan(y) and torch.isnan(torch.nn.functional.cross_entropy(x, t))


def test_nonzero_binds_its_symbol_for_later_ops():
    x = np.array([[0, 1, 0], [1, 1, 0]], bool)
    out = _run("""func @main(%x: bool[2,3]) -> (i64[n,2], f32[n]) {
  %0 = tensor.nonzero %x : i64[n,2]
  %1 = tensor.iota : f32[n]
  func.return %0, %1
}""", x)
    np.testing.assert_array_equal(out[0], torch.nonzero(torch.from_numpy(x)).numpy())
    np.testing.assert_array_equal(out[1], [0, 1, 2])


def test_symbolic_dims_bound_from_inputs():
    text = """func @main(%x: f32[B,T,16]) -> (f32[B*T,16], i64[T]) {
  %0 = tensor.reshape %x : f32[B*T,16]
  %1 = tensor.iota : i64[T]
  func.return %0, %1
}"""
    for b, t in ((1, 7), (3, 13)):
        x = np.random.default_rng().standard_normal((b, t, 16)).astype(np.float32)
        y, i = _run(text, x)
        np.testing.assert_array_equal(y, x.reshape(b * t, 16))
        np.testing.assert_array_equal(i, np.arange(t))


# ---- structural ops ------------------------------------------------------------------------------

def test_kernel_fused_runs_its_body():
    m = fused_module()
    verify(m)
    rng = np.random.default_rng()
    x, y = rng.standard_normal((7, 13)).astype(np.float32), rng.standard_normal(13).astype(
        np.float32)
    a, b = run_func(m, [x, y])
    tx, ty = torch.from_numpy(x).double(), torch.from_numpy(y).double()
    np.testing.assert_allclose(a, torch.exp(tx + ty).numpy(), rtol=1e-5)
    np.testing.assert_allclose(b, (tx * ty).numpy(), rtol=1e-6)


def test_func_return_of_arguments_and_repeated_values():
    (a, b, c) = _run("""func @main(%x: f32[7], %y: i64[1]) -> (f32[7], i64[1], f32[7]) {
  %0 = tensor.exp %x : f32[7]
  func.return %0, %y, %0
}""", np.zeros(7, np.float32), np.int64([5]))
    np.testing.assert_array_equal(a, np.ones(7))
    np.testing.assert_array_equal(b, [5])
    np.testing.assert_array_equal(c, np.ones(7))
