"""Tensor types: a dtype and a shape whose dims are ints or symbolic expressions (`B`, `B*T`).

Symbolic dims are first class so that one compiled model serves many batch sizes and sequence
lengths. A symbolic dim is kept as its canonical text (sympy's printing), which makes types
hashable, printable and comparable by string; arithmetic on dims goes through sympy.
"""
from __future__ import annotations

import enum
import functools
import math
import re
from dataclasses import dataclass

import numpy as np
import sympy

from lmc.errors import ShapeError

Dim = int | str


class DType(enum.Enum):
    f64 = "f64"
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    i64 = "i64"
    i32 = "i32"
    i8 = "i8"
    u8 = "u8"
    i4 = "i4"  # packed two per byte; carried by quantized tensors, never computed on directly
    bool = "bool"

    @property
    def is_float(self) -> bool:
        return self in (DType.f64, DType.f32, DType.f16, DType.bf16)

    @property
    def is_low_float(self) -> bool:
        """bf16 / f16: stored narrow, summed in f32 (torch's CPU kernels and lmc's alike)."""
        return self in (DType.f16, DType.bf16)

    @property
    def is_int(self) -> bool:
        return self in (DType.i64, DType.i32, DType.i8, DType.u8, DType.i4)

    @property
    def itemsize(self) -> float:
        return _ITEMSIZE[self]

    def to_numpy(self) -> np.dtype:
        if self is DType.bf16:
            import ml_dtypes  # numpy has no bfloat16; ml_dtypes is the standard extension

            return np.dtype(ml_dtypes.bfloat16)
        if self is DType.i4:
            return np.dtype(np.int8)
        return np.dtype(_NUMPY[self])

    @staticmethod
    def from_numpy(dt) -> DType:
        dt = np.dtype(dt)
        if dt.name == "bfloat16":
            return DType.bf16
        for k, v in _NUMPY.items():
            if np.dtype(v) == dt:
                return k
        raise ShapeError(f"numpy dtype {dt} has no lmc dtype")


_NUMPY = {DType.f64: np.float64, DType.f32: np.float32, DType.f16: np.float16,
          DType.i64: np.int64, DType.i32: np.int32, DType.i8: np.int8, DType.u8: np.uint8,
          DType.bool: np.bool_}
_ITEMSIZE = {DType.f64: 8, DType.f32: 4, DType.f16: 2, DType.bf16: 2, DType.i64: 8,
             DType.i32: 4, DType.i8: 1, DType.u8: 1, DType.i4: 0.5, DType.bool: 1}


# ---- symbolic dims ---------------------------------------------------------------------------

_FUNCS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Max": sympy.Max, "Min": sympy.Min,
          "Mod": sympy.Mod}


@functools.lru_cache(maxsize=4096)
def _expr(d: str) -> sympy.Expr:
    # Every identifier is a plain symbol: sympy would otherwise read E, I, N, S as constants.
    names = {n: _FUNCS.get(n) or sympy.Symbol(n) for n in re.findall(r"[A-Za-z_]\w*", d)}
    try:
        return sympy.parse_expr(d, local_dict=names, evaluate=True)
    except Exception as exc:  # sympy raises many kinds for bad text
        raise ShapeError(f"malformed symbolic dim '{d}'") from exc


@functools.lru_cache(maxsize=4096)
def _canon_expr(e: sympy.Expr) -> Dim:
    e = sympy.simplify(e) if not e.is_Symbol else e
    if e.is_Integer:
        return int(e)
    if e.is_number:
        raise ShapeError(f"dim expression evaluates to non-integer {e}")
    return str(e).replace(" ", "")


def canon_dim(d) -> Dim:
    """Canonical form of a dim: int, or sympy's text of the expression without spaces."""
    if isinstance(d, (bool, np.bool_)):
        raise ShapeError(f"dim {d!r} is a bool, not a size")
    if isinstance(d, (int, np.integer)):
        return int(d)
    if isinstance(d, sympy.Expr):
        return _canon_expr(d)
    if isinstance(d, str):
        d = d.strip()
        if d.lstrip("-").isdigit():
            return int(d)
        if d.isidentifier():
            return d
        return _canon_expr(_expr(d))
    raise ShapeError(f"dim {d!r} is neither an int nor a symbol expression")


def dim_expr(d: Dim) -> sympy.Expr:
    return sympy.Integer(d) if isinstance(d, int) else _expr(d)


def dim_mul(*dims: Dim) -> Dim:
    if all(isinstance(d, int) for d in dims):
        return math.prod(dims)  # type: ignore[arg-type]
    return canon_dim(sympy.Mul(*[dim_expr(d) for d in dims]))


def dim_add(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    return canon_dim(dim_expr(a) + dim_expr(b))


def dim_sub(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    return canon_dim(dim_expr(a) - dim_expr(b))


def dim_div(a: Dim, b: Dim) -> Dim:
    """Exact division (reshape splits a dim); raises if it is not exact for static dims."""
    if isinstance(a, int) and isinstance(b, int):
        if b == 0 or a % b:
            raise ShapeError(f"{a} is not divisible by {b}")
        return a // b
    q = sympy.simplify(dim_expr(a) / dim_expr(b))
    return canon_dim(q)


def dim_floordiv(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    q = sympy.simplify(dim_expr(a) / dim_expr(b))
    # Exact when q is a polynomial with integer coefficients (B*T/T, 2*B); (B+1)/2 is not.
    if q.is_Integer or (q.free_symbols and q.is_polynomial() and all(
            c.is_integer for c in sympy.Poly(q, *sorted(q.free_symbols, key=str)).coeffs())):
        return canon_dim(q)
    return canon_dim(sympy.floor(q))


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, int) or isinstance(b, int):
        # A canonical expression that is a constant is an int already: no sympy needed.
        return canon_dim(a) == canon_dim(b)
    return a == b or sympy.simplify(dim_expr(a) - dim_expr(b)) == 0


def dim_symbols(d: Dim) -> set[str]:
    return set() if isinstance(d, int) else {s.name for s in dim_expr(d).free_symbols}


@functools.lru_cache(maxsize=4096)
def _dim_fn(d: str):
    e = dim_expr(d)
    names = sorted(s.name for s in e.free_symbols)
    return names, sympy.lambdify([sympy.Symbol(n) for n in names], e, modules="math")


def eval_dim(d: Dim, env: dict[str, int]) -> int:
    """Value of a dim once its symbols are bound (at run time, from the input shapes)."""
    if isinstance(d, int):
        return d
    if d in env:
        return env[d]
    names, fn = _dim_fn(d)
    try:
        return int(fn(*[env[n] for n in names]))
    except KeyError as exc:
        raise ShapeError(f"symbol {exc.args[0]} of dim '{d}' is not bound") from None


def eval_shape(shape: tuple[Dim, ...], env: dict[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, env) for d in shape)


# ---- tensor type -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: DType

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(canon_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        return dim_mul(*self.shape) if self.shape else 1

    def with_shape(self, shape) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(self.shape, dtype)

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for d in self.shape:
            out |= dim_symbols(d)
        return out

    def __str__(self) -> str:
        return f"{self.dtype.value}[{','.join(str(d) for d in self.shape)}]"


def normalize_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise ShapeError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy broadcasting over possibly symbolic dims."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        out.append(_broadcast_dim(dims, shapes))
    return tuple(out)


def _broadcast_dim(dims: list[Dim], shapes) -> Dim:
    result: Dim = 1
    for d in dims:
        if d == 1 or dims_equal(d, result):
            continue
        if result == 1:
            result = d
        else:
            raise ShapeError(f"shapes {' and '.join(_fmt(s) for s in shapes)} do not broadcast")
    return result


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
