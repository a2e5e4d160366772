"""The converter table and the context each converter builds IR through.

A converter is `fn(cx, *args, **kwargs)`: the ATen node's arguments with every fx Node replaced
by what it converted to (an lmc `Value`, a symbolic dim for SymInt nodes, a tuple for multi-result
ops). It returns a Value, a tuple of Values, or None (dropped nodes such as runtime asserts).
Result types come from the node's `meta["val"]` (`cx.out_type()`), not from re-deriving torch's
shape rules.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy
import torch

from lmc.errors import LmcError
from lmc.ir.core import Location, Value
from lmc.ir.rewriter import Rewriter
from lmc.ir.types import Dim, DType, TensorType, canon_dim

CONVERTERS: dict[Any, Callable] = {}

_DTYPES = {torch.float32: DType.f32, torch.float64: DType.f64, torch.float16: DType.f16,
           torch.bfloat16: DType.bf16, torch.int64: DType.i64, torch.int32: DType.i32,
           torch.int8: DType.i8, torch.uint8: DType.u8, torch.bool: DType.bool}
_TORCH = {v: k for k, v in _DTYPES.items()}


class NotConvertible(LmcError):
    """A converter met a variant of its op it does not handle (reported with all others)."""


def converter(*targets):
    """Register `fn` for ATen overloads (or any fx call_function target)."""
    def deco(fn):
        for t in targets:
            CONVERTERS[t] = fn
        return fn
    return deco


def lmc_dtype(dt: torch.dtype) -> DType:
    if dt not in _DTYPES:
        raise NotConvertible(f"dtype {dt} has no lmc equivalent")
    return _DTYPES[dt]


def torch_dtype(dt: DType) -> torch.dtype:
    return _TORCH[dt]


class Ctx:
    """Build IR for the node being converted: location, types, constants, casts."""

    def __init__(self, rw: Rewriter, symbols: dict[str, str]):
        self.rw = rw
        self.symbols = symbols  # torch symbol name (s77) -> user Dim name (T)
        self.node: torch.fx.Node | None = None
        self.loc = Location()
        self.graph_module = None  # the fx graph being converted (subgraphs of no_grad blocks)
        self.failed: list[tuple[str, str]] = []

    # -- types ----------------------------------------------------------------------------------

    def dim(self, d) -> Dim:
        """A torch size (int, SymInt or sympy expr) as an lmc dim with the user's names."""
        if isinstance(d, torch.SymInt):
            d = d.node.expr
        if isinstance(d, sympy.Expr):
            from torch.utils._sympy.functions import FloorDiv
            d = d.replace(FloorDiv, lambda a, b: sympy.floor(a / b))
            sub = {s: sympy.Symbol(self.symbols.get(s.name, s.name)) for s in d.free_symbols}
            return canon_dim(str(d.xreplace(sub)))
        return canon_dim(int(d))

    def ttype(self, fake) -> TensorType:
        return TensorType(tuple(self.dim(d) for d in fake.shape), lmc_dtype(fake.dtype))

    def out_type(self, i: int | None = None) -> TensorType:
        val = self.node.meta["val"]
        return self.ttype(val if i is None else val[i])

    # -- building -------------------------------------------------------------------------------

    def op(self, name: str, *operands: Value, type: TensorType | None = None, **attrs) -> Value:
        return self.rw.value(name, *operands, result_type=type, loc=self.loc, **attrs)

    def ops(self, name: str, *operands: Value, **attrs) -> tuple[Value, ...]:
        return tuple(self.rw.create(name, operands, attrs, None, self.loc).result_values)

    def const(self, value, dtype: DType, shape=()) -> Value:
        value = bool(value) if dtype is DType.bool else (
            float(value) if dtype.is_float else int(value))
        return self.op("tensor.constant", type=TensorType(tuple(shape), dtype), value=value)

    def size(self, d: Dim, dtype: DType) -> Value:
        """A dim as rank-0 tensor data; a symbolic one is counted at run time (the sum of a
        splat of ones), as lmc has no shape-of op."""
        if isinstance(d, int):
            return self.const(d, dtype)
        return self.op("tensor.sum", self.const(1, dtype, (d,)), axes=(0,), keepdim=False)

    def cast(self, v: Value, dtype: DType) -> Value:
        return v if v.dtype == dtype else self.op("tensor.cast", v, dtype=dtype)

    def reshape(self, v: Value, t: TensorType | tuple) -> Value:
        t = t if isinstance(t, TensorType) else v.type.with_shape(t)
        return v if v.type == t else self.op("tensor.reshape", v, type=t)

    def value(self, x, dtype: DType) -> Value:
        """A Value (cast to dtype) or a Python scalar as a rank-0 splat constant."""
        if isinstance(x, Value):
            return self.cast(x, dtype)
        if isinstance(x, (str, sympy.Expr)):
            raise NotConvertible(f"a symbolic size ({x}) used as tensor data")
        return self.const(x, dtype)

    def promote(self, *xs) -> DType:
        """torch's type promotion over Values and Python scalars (rank-0 tensors and scalars
        only decide the category, as in torch)."""
        ps = [torch.empty((1,) * x.type.rank, dtype=torch_dtype(x.dtype))
              if isinstance(x, Value) else x for x in xs if x is not None]
        acc = ps[0] if isinstance(ps[0], torch.Tensor) else torch.tensor(ps[0])
        for p in ps[1:]:
            shape = (1,) if acc.dim() or (isinstance(p, torch.Tensor) and p.dim()) else ()
            acc = torch.empty(shape, dtype=torch.result_type(acc, p))
        return lmc_dtype(acc.dtype)
