"""Types and symbolic dims: canonical forms, arithmetic, evaluation and broadcasting."""
from __future__ import annotations

import numpy as np
import pytest
import sympy

from lmc.errors import ShapeError
from lmc.ir.types import (
    DType,
    TensorType,
    broadcast_shapes,
    canon_dim,
    dim_add,
    dim_div,
    dim_floordiv,
    dim_mul,
    dim_sub,
    dim_symbols,
    dims_equal,
    eval_dim,
    eval_shape,
    normalize_axis,
)

# sympy reads these as constants (E = e, I = sqrt(-1), N = evalf, S = singleton registry)
SYMPY_CONSTANTS = ["E", "I", "N", "S", "Q", "O", "pi", "gamma", "beta", "zeta"]


@pytest.mark.parametrize("given, canon", [
    (7, 7), (np.int64(7), 7), ("7", 7), (" 13 ", 13), ("-3", -3), ("B", "B"), (" T ", "T"),
    ("B*T", "B*T"), ("T*B", "B*T"), ("T * B", "B*T"), ("2*B/2", "B"), ("B*T/T", "B"),
    ("B-B", 0), ("B+0", "B"), ("Q+1-1", "Q"), ("floor(T/2)", "floor(T/2)"),
    ("Max(B,T)", "Max(B,T)"), ("T+1", "T+1"), ("1+T", "T+1"), (sympy.Symbol("B") * 2, "2*B"),
    (sympy.Integer(5), 5),
])
def test_canon_dim(given, canon):
    got = canon_dim(given)
    assert got == canon and type(got) is type(canon)


@pytest.mark.parametrize("name", SYMPY_CONSTANTS)
def test_sympy_constant_names_stay_symbols(name):
    assert canon_dim(name) == name
    assert canon_dim(f"{name}*2") == f"2*{name}"
    assert dim_mul(name, 3) == f"3*{name}"
    assert dim_div(dim_mul(name, "T"), "T") == name
    assert dims_equal(dim_add(name, name), f"2*{name}")
    assert not dims_equal(name, "T")
    assert dim_symbols(f"{name}*T+1") == {name, "T"}
    assert eval_dim(f"{name}*T+1", {name: 3, "T": 5}) == 16
    assert eval_dim(name, {name: 11}) == 11


def test_sympy_constant_names_in_types_and_text():
    from lmc.ir import parse, print_module
    t = TensorType(("E", "I*N", "S"), DType.f32)
    assert str(t) == "f32[E,I*N,S]" and t.symbols() == {"E", "I", "N", "S"}
    assert t.numel() == "E*I*N*S"
    text = """func @main(%x: f32[E,I,N,S]) -> (f32[E*I*N*S]) {
  %0 = tensor.reshape %x : f32[E*I*N*S]
  func.return %0
}
"""
    assert print_module(parse(text)) == text


@pytest.mark.parametrize("bad", [True, np.bool_(False), 1.5, None, "B+", "(B", "1.5", "B/2*0+1.5"])
def test_canon_dim_rejects(bad):
    with pytest.raises(ShapeError):
        canon_dim(bad)


def test_dim_arithmetic():
    assert dim_mul(2, 3, 7) == 42 and dim_mul() == 1
    assert dim_mul("B", 7, "T") == "7*B*T"
    assert dim_mul("B", 1) == "B"
    assert dim_add("B", 0) == "B" and dim_add(2, 3) == 5 and dim_add("T", 1) == "T+1"
    assert dim_sub("B", "B") == 0 and dim_sub("T+1", 1) == "T" and dim_sub(5, 7) == -2
    assert dim_div(42, 6) == 7 and dim_div("B*T", "T") == "B" and dim_div("2*B", 2) == "B"
    assert dim_div("6*B*T", "3*B") == "2*T"
    for a, b in ((7, 2), (7, 0)):
        with pytest.raises(ShapeError):
            dim_div(a, b)


def test_dim_floordiv():
    assert dim_floordiv(7, 2) == 3 and dim_floordiv(-7, 2) == -4
    assert dim_floordiv("B*T", "T") == "B" and dim_floordiv("2*T", 2) == "T"
    assert dim_floordiv("T", 2) == "floor(T/2)"
    # (T+1)//2 is not exact: it must stay a floor, else the dim is T/2+1/2 (not an integer)
    q = dim_floordiv("T+1", 2)
    assert q.startswith("floor(") and all(eval_dim(q, {"T": t}) == (t + 1) // 2
                                          for t in range(1, 14))
    q = dim_floordiv("B+2*T", 2)
    assert all(eval_dim(q, {"B": b, "T": 3}) == (b + 6) // 2 for b in range(9)), q


def test_dims_equal():
    assert dims_equal(3, 3) and not dims_equal(3, 4)
    assert dims_equal("B*T", "T*B") and dims_equal("B*(T+1)", "B*T+B")
    assert dims_equal("2*B/2", "B") and not dims_equal("B", "T") and not dims_equal("B", 1)
    assert dims_equal(3, "3")


def test_eval_dim():
    env = {"B": 2, "T": 7}
    assert eval_dim(5, {}) == 5 and eval_dim("B", env) == 2
    assert eval_dim("B*T", env) == 14 and eval_dim("floor(T/2)", env) == 3
    assert eval_dim("Max(B,T)+Mod(T,4)", env) == 10
    assert eval_shape(("B", "B*T", 16), env) == (2, 14, 16)
    with pytest.raises(ShapeError, match="symbol T"):
        eval_dim("B*T", {"B": 1})


def test_broadcast_shapes():
    assert broadcast_shapes() == ()
    assert broadcast_shapes((7, 1, 13), (5, 1)) == (7, 5, 13)
    assert broadcast_shapes((), (7, 13)) == (7, 13)
    assert broadcast_shapes(("B", 1), (1, "T")) == ("B", "T")
    assert broadcast_shapes(("B*T",), ("T*B",)) == ("B*T",)
    assert broadcast_shapes((1,), ("B",), (1, 1)) == (1, "B")
    for a, b in (((7,), (13,)), (("B",), ("T",)), ((2, "B"), (3, 1)), ((7,), ("B",))):
        with pytest.raises(ShapeError, match="do not broadcast"):
            broadcast_shapes(a, b)


def test_tensor_type():
    t = TensorType(("B", "T*B", 16), DType.bf16)
    assert t.shape == ("B", "B*T", 16) and t.rank == 3 and not t.is_static
    assert str(t) == "bf16[B,B*T,16]" and t.numel() == "16*B**2*T"
    assert t == TensorType(("B", "B*T", 16), DType.bf16) and hash(t) == hash(
        TensorType(["B", "B*T", 16], DType.bf16))
    assert t.with_dtype(DType.f32).dtype is DType.f32 and t.with_shape([4]).shape == (4,)
    s = TensorType((), DType.bool)
    assert s.is_static and s.numel() == 1 and str(s) == "bool[]"
    with pytest.raises(AttributeError):
        t.dtype = DType.f32  # frozen


def test_dtypes():
    assert DType.f32.is_float and DType.bf16.is_float and not DType.i32.is_float
    assert DType.u8.is_int and DType.i4.is_int and not DType.bool.is_int
    assert DType.i4.itemsize == 0.5 and DType.bf16.itemsize == 2
    for d in DType:
        if d is not DType.i4:
            assert DType.from_numpy(d.to_numpy()) is d
    with pytest.raises(ShapeError):
        DType.from_numpy(np.complex64)


def test_normalize_axis():
    assert normalize_axis(-1, 3) == 2 and normalize_axis(0, 1) == 0 and normalize_axis(0, 0) == 0
    for axis, rank in ((3, 3), (-4, 3)):
        with pytest.raises(ShapeError):
            normalize_axis(axis, rank)
