"""Per-op LLVM IR emitters on one vector of lanes: the table that loop kernels (loops.py) and GEMM
tile epilogues share, with the storage <-> compute conversions and the row-reduction combiners.

Compute types: f32/f16/bf16 compute as float (f16/bf16 are storage formats: widened on load,
rounded on store or by an explicit cast), f64 as double, integers as themselves, bool as i1
(stored as one 0/1 byte). Semantics are the reference interpreter's (numpy's): NaN propagates
through max/min/relu, integer division floors, mod takes the divisor's sign.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

from lmc.errors import LmcError
from lmc.ir.core import Op
from lmc.ir.types import DType

from . import vmath
from .irtext import FunctionWriter
from .jit import HAND_VECTORIZED


class EmitError(LmcError):
    """A body op the CPU code generator cannot express (names the op and why)."""

    def __init__(self, op: Op, why: str):
        where = f" at {op.loc}" if op.loc else ""
        super().__init__(f"CPU backend: cannot compile {op.name}{where}: {why}")


# Transcendental ops: the loop scheduler keeps their row values in scratch rather than
# recomputing them in a later pass, and the launcher counts them as extra work.
COSTLY = frozenset(["tensor.exp", "tensor.log", "tensor.tanh", "tensor.erf", "tensor.sigmoid",
                    "tensor.silu", "tensor.gelu", "tensor.sin", "tensor.cos", "tensor.pow"])
SCALAR = {DType.f64: "double", DType.f32: "float", DType.f16: "float", DType.bf16: "float",
          DType.i64: "i64", DType.i32: "i32", DType.i8: "i8", DType.u8: "i8", DType.bool: "i1"}
STORAGE = {DType.f64: "double", DType.f32: "float", DType.f16: "half", DType.bf16: "i16",
           DType.i64: "i64", DType.i32: "i32", DType.i8: "i8", DType.u8: "i8", DType.bool: "i8"}
UNSIGNED = (DType.u8, DType.bool)
INT_BITS = {"i64": 64, "i32": 32, "i8": 8, "i1": 1}


def scalar_type(dtype: DType) -> str:
    if dtype not in SCALAR:
        raise LmcError(f"CPU backend: dtype {dtype.value} cannot be computed on")
    return SCALAR[dtype]


def vtype(dtype: DType, lanes: int) -> str:
    return f"<{lanes} x {scalar_type(dtype)}>"


def storage_vtype(dtype: DType, lanes: int) -> str:
    return f"<{lanes} x {STORAGE[dtype]}>"


def is_float(dtype: DType) -> bool:
    return scalar_type(dtype) in ("float", "double")


def literal(dtype: DType, value) -> str:
    """`value` as an LLVM scalar constant of `dtype`'s compute type, rounded to `dtype` first
    (an f16 eps is the f16 number nearest to it, as in the interpreter)."""
    ty = scalar_type(dtype)
    if ty == "i1":
        return "true" if bool(value) else "false"
    if ty in ("float", "double"):
        v = float(np.asarray(value, dtype.to_numpy()).astype(np.float64))
        return "0x" + np.float64(v).view(np.uint64).item().to_bytes(8, "big").hex().upper()
    v = int(np.asarray(value).astype(dtype.to_numpy()).astype(np.int64))
    return str(v)


def const(dtype: DType, value, lanes: int) -> str:
    """A splat vector constant (no instruction)."""
    return f"splat ({scalar_type(dtype)} {literal(dtype, value)})"


def splat(w: FunctionWriter, ty: str, x: str, lanes: int) -> str:
    """Broadcast scalar `x` of LLVM type `ty` to all lanes."""
    v = f"<{lanes} x {ty}>"
    one = w.value(f"insertelement {v} poison, {ty} {x}, i64 0")
    return w.value(f"shufflevector {v} {one}, {v} poison, <{lanes} x i32> zeroinitializer")


# ---- storage <-> compute ----------------------------------------------------------------------

def to_compute(w: FunctionWriter, dtype: DType, raw: str, lanes: int) -> str:
    """A loaded storage vector as its compute vector."""
    if dtype is DType.f16:
        return w.value(f"fpext <{lanes} x half> {raw} to <{lanes} x float>")
    if dtype is DType.bf16:  # bf16 is the top half of an f32: widening is exact
        wide = w.value(f"zext <{lanes} x i16> {raw} to <{lanes} x i32>")
        bits = w.value(f"shl <{lanes} x i32> {wide}, splat (i32 16)")
        return w.value(f"bitcast <{lanes} x i32> {bits} to <{lanes} x float>")
    if dtype is DType.bool:
        return w.value(f"icmp ne <{lanes} x i8> {raw}, zeroinitializer")
    return raw


def to_storage(w: FunctionWriter, dtype: DType, x: str, lanes: int) -> str:
    """A compute vector as the vector to store (f16/bf16 rounded to nearest even)."""
    if dtype is DType.f16:
        return w.value(f"fptrunc <{lanes} x float> {x} to <{lanes} x half>")
    if dtype is DType.bf16:
        return w.value(f"trunc <{lanes} x i32> {_bf16_bits(w, x, lanes)} to <{lanes} x i16>")
    if dtype is DType.bool:
        return w.value(f"zext <{lanes} x i1> {x} to <{lanes} x i8>")
    return x


def _bf16_bits(w: FunctionWriter, x: str, lanes: int) -> str:
    """The bf16 bit pattern (in the low 16 bits) nearest to float `x`, NaN kept quiet. Done in
    integers: LLVM lowers a float->bfloat fptrunc to a runtime-library call on CPUs without
    AVX512-BF16, which the JIT cannot resolve."""
    vi = f"<{lanes} x i32>"
    bits = w.value(f"bitcast <{lanes} x float> {x} to {vi}")
    odd = w.value(f"and {vi} {w.value(f'lshr {vi} {bits}, splat (i32 16)')}, splat (i32 1)")
    bias = w.value(f"add {vi} {odd}, splat (i32 32767)")
    rounded = w.value(f"lshr {vi} {w.value(f'add {vi} {bits}, {bias}')}, splat (i32 16)")
    nan = w.value(f"fcmp uno <{lanes} x float> {x}, zeroinitializer")
    quiet = w.value(f"or {vi} {w.value(f'lshr {vi} {bits}, splat (i32 16)')}, splat (i32 64)")
    return w.value(f"select <{lanes} x i1> {nan}, {vi} {quiet}, {vi} {rounded}")


def round_to(w: FunctionWriter, dtype: DType, x: str, lanes: int) -> str:
    """Round a float compute value to f16/bf16 precision and back (an explicit cast does)."""
    if dtype is DType.f16:
        half = w.value(f"fptrunc <{lanes} x float> {x} to <{lanes} x half>")
        return w.value(f"fpext <{lanes} x half> {half} to <{lanes} x float>")
    if dtype is DType.bf16:
        vi = f"<{lanes} x i32>"
        top = w.value(f"shl {vi} {_bf16_bits(w, x, lanes)}, splat (i32 16)")
        return w.value(f"bitcast {vi} {top} to <{lanes} x float>")
    return x


# ---- small helpers over compute vectors -------------------------------------------------------

def _call(w: FunctionWriter, name: str, ret: str, *args: tuple[str, str]) -> str:
    return w.value(f"call {ret} @{name}({', '.join(f'{t} {x}' for t, x in args)})")


def suffix(ty: str) -> str:
    """LLVM's overload suffix of a vector type: <16 x float> -> v16f32."""
    lanes, elem = re.match(r"<(\d+) x (\w+)>", ty).groups()
    return f"v{lanes}" + {"float": "f32", "double": "f64", "half": "f16"}.get(elem, elem)


def intrinsic(w: FunctionWriter, name: str, ty: str, *xs: str) -> str:
    """`llvm.<name>.<suffix>` applied to vectors of type `ty` (declared by `module_text`)."""
    return _call(w, f"llvm.{name}.{suffix(ty)}", ty, *((ty, x) for x in xs))


def math_call(w: FunctionWriter, fn: str, x: str, dtype: DType, lanes: int) -> str:
    """exp/log/tanh/erf/sigmoid/sin/cos: vmath's inline polynomials for float; double (f64 is
    not a hot type in these models) calls libm per lane."""
    if scalar_type(dtype) == "float":
        return vmath.call(w, fn, x, lanes)
    if fn == "sigmoid":
        e = math_call(w, "exp", w.value(f"fneg {vtype(dtype, lanes)} {x}"), dtype, lanes)
        one = const(dtype, 1.0, lanes)
        return w.value(f"fdiv {vtype(dtype, lanes)} {one}, "
                       f"{w.value(f'fadd {vtype(dtype, lanes)} {one}, {e}')}")
    v = vtype(dtype, lanes)
    out = "poison"
    for i in range(lanes):
        lane = w.value(f"extractelement {v} {x}, i64 {i}")
        y = _call(w, fn, "double", ("double", lane))
        out = w.value(f"insertelement {v} {out}, double {y}, i64 {i}")
    return out


def fmax_nan(w: FunctionWriter, a: str, b: str, ty: str, lanes: int, smaller: bool = False) -> str:
    """max (or min) that returns NaN when either input is NaN, like numpy and torch."""
    pick = w.value(f"fcmp {'olt' if smaller else 'ogt'} {ty} {a}, {b}")
    t = w.value(f"select <{lanes} x i1> {pick}, {ty} {a}, {ty} {b}")  # b when either is NaN
    a_nan = w.value(f"fcmp uno {ty} {a}, zeroinitializer")
    return w.value(f"select <{lanes} x i1> {a_nan}, {ty} {a}, {ty} {t}")


def _fbin(w, opcode: str, a: str, b: str, ty: str) -> str:
    return w.value(f"{opcode} {ty} {a}, {b}")


# ---- reductions (the loop scheduler's row reductions use these) -------------------------------


def reduce_identity(kind: str, dtype: DType, lanes: int) -> str:
    """The value masked-off lanes contribute to a row reduction."""
    ty = scalar_type(dtype)
    if kind == "sum":
        return "zeroinitializer"
    if ty == "i1":
        return const(dtype, kind == "min", lanes)
    if is_float(dtype):
        return const(dtype, -math.inf if kind == "max" else math.inf, lanes)
    info = np.iinfo(dtype.to_numpy())
    return const(dtype, info.min if kind == "max" else info.max, lanes)


def reduce_combine(w: FunctionWriter, kind: str, dtype: DType, a: str, b: str,
                   lanes: int) -> str:
    """a (+|max|min) b lane by lane; bool sums are `any` (numpy's sum of bools cast to bool)."""
    ty = vtype(dtype, lanes)
    st = scalar_type(dtype)
    if st == "i1":
        return w.value(f"{'and' if kind == 'min' else 'or'} {ty} {a}, {b}")
    if kind == "sum":
        return w.value(f"{'fadd' if is_float(dtype) else 'add'} {ty} {a}, {b}")
    if is_float(dtype):
        return fmax_nan(w, a, b, ty, lanes, smaller=kind == "min")
    sign = "u" if dtype in UNSIGNED else "s"
    return intrinsic(w, f"{sign}{kind}", ty, a, b)


def reduce_lanes(w: FunctionWriter, kind: str, dtype: DType, v: str, lanes: int) -> str:
    """`kind` across the lanes of v by a butterfly of shuffles: every lane ends with the total."""
    ty = vtype(dtype, lanes)
    k = lanes // 2
    while k:
        perm = ", ".join(f"i32 {i ^ k}" for i in range(lanes))
        v = reduce_combine(w, kind, dtype, v, w.value(
            f"shufflevector {ty} {v}, {ty} poison, <{lanes} x i32> <{perm}>"), lanes)
        k //= 2
    return v


# ---- the table --------------------------------------------------------------------------------

EmitFn = Callable[[FunctionWriter, Op, list[str], int], str]
EMIT: dict[str, EmitFn] = {}


def _emits(*names: str):
    def deco(fn: EmitFn) -> EmitFn:
        for n in names:
            EMIT[n] = fn
        return fn
    return deco


def _dt(op: Op, i: int | None = None) -> DType:
    """The result dtype (i None) or operand i's dtype."""
    return (op.result_values[0] if i is None else op.operand_values[i]).dtype


@_emits("tensor.reshape", "tensor.broadcast")
def _identity(w, op, args, lanes):
    return args[0]  # unit-dim reshapes and broadcasts move no data inside a loop kernel


@_emits("tensor.constant")
def _constant(w, op, args, lanes):
    if np.ndim(op.value) != 0:
        raise EmitError(op, "only scalar (splat) constants can be fused; larger ones are "
                            "kernel operands")
    return const(_dt(op), op.value, lanes)


_MATH = {"tensor.exp": "exp", "tensor.log": "log", "tensor.tanh": "tanh", "tensor.erf": "erf",
         "tensor.sigmoid": "sigmoid", "tensor.sin": "sin", "tensor.cos": "cos"}


@_emits(*_MATH)
def _math(w, op, args, lanes):
    return math_call(w, _MATH[op.name], args[0], _dt(op), lanes)


@_emits("tensor.neg", "tensor.abs")
def _neg_abs(w, op, args, lanes):
    """-x and |x| (integers wrap at INT_MIN, as numpy)."""
    dt, ty = _dt(op), vtype(_dt(op), lanes)
    if dt is DType.bool:
        raise EmitError(op, "bool operands are not supported")
    if is_float(dt):
        return w.value(f"fneg {ty} {args[0]}") if op.name == "tensor.neg" else \
            intrinsic(w, "fabs", ty, args[0])
    if op.name == "tensor.neg":
        return w.value(f"sub {ty} zeroinitializer, {args[0]}")
    if dt in UNSIGNED:
        return args[0]
    return _call(w, f"llvm.abs.{suffix(ty)}", ty, (ty, args[0]), ("i1", "false"))


@_emits("tensor.sqrt", "tensor.rsqrt", "tensor.reciprocal")
def _roots(w, op, args, lanes):
    dt, ty = _dt(op), vtype(_dt(op), lanes)
    x = args[0]
    if op.name != "tensor.reciprocal":
        x = intrinsic(w, "sqrt", ty, x)
        if op.name == "tensor.sqrt":
            return x
    return w.value(f"fdiv {ty} {const(dt, 1.0, lanes)}, {x}")  # exact 1/x, not rcp/rsqrt


@_emits("tensor.relu")
def _relu(w, op, args, lanes):
    ty = vtype(_dt(op), lanes)
    keep = w.value(f"fcmp ugt {ty} {args[0]}, zeroinitializer")  # true for NaN: it propagates
    return w.value(f"select <{lanes} x i1> {keep}, {ty} {args[0]}, {ty} zeroinitializer")


@_emits("tensor.silu")
def _silu(w, op, args, lanes):
    s = math_call(w, "sigmoid", args[0], _dt(op), lanes)
    return w.value(f"fmul {vtype(_dt(op), lanes)} {args[0]}, {s}")


@_emits("tensor.gelu")
def _gelu(w, op, args, lanes):
    """0.5 x (1 + erf(x / sqrt 2)), or the tanh form, as the interpreter writes them."""
    dt, ty, x = _dt(op), vtype(_dt(op), lanes), args[0]
    if op.approximate == "tanh":
        x3 = _fbin(w, "fmul", x, _fbin(w, "fmul", x, x, ty), ty)
        inner = _fbin(w, "fadd", x, _fbin(w, "fmul", x3, const(dt, 0.044715, lanes), ty), ty)
        arg = _fbin(w, "fmul", inner, const(dt, math.sqrt(2 / math.pi), lanes), ty)
        t = math_call(w, "tanh", arg, dt, lanes)
    else:
        t = math_call(w, "erf", _fbin(w, "fmul", x, const(dt, math.sqrt(0.5), lanes), ty),
                      dt, lanes)
    half_x = _fbin(w, "fmul", x, const(dt, 0.5, lanes), ty)
    return _fbin(w, "fmul", half_x, _fbin(w, "fadd", t, const(dt, 1.0, lanes), ty), ty)


@_emits("tensor.not")
def _not(w, op, args, lanes):
    return w.value(f"xor <{lanes} x i1> {args[0]}, splat (i1 true)")


_FLOAT_ARITH = {"tensor.add": "fadd", "tensor.sub": "fsub", "tensor.mul": "fmul",
                "tensor.div": "fdiv"}
_INT_ARITH = {"tensor.add": "add", "tensor.sub": "sub", "tensor.mul": "mul"}
_BOOL_ARITH = {"tensor.add": "or", "tensor.mul": "and", "tensor.maximum": "or",
               "tensor.minimum": "and"}


@_emits("tensor.add", "tensor.sub", "tensor.mul", "tensor.div", "tensor.maximum",
        "tensor.minimum")
def _arith(w, op, args, lanes):
    """+ - * / max min; bools: add = or, mul = and (numpy); integer / floors."""
    dt, ty = _dt(op), vtype(_dt(op), lanes)
    a, b = args
    if dt is DType.bool:
        if op.name not in _BOOL_ARITH:
            raise EmitError(op, "numpy does not define this on bools")
        return _fbin(w, _BOOL_ARITH[op.name], a, b, ty)
    if op.name in ("tensor.maximum", "tensor.minimum"):
        smaller = op.name == "tensor.minimum"
        if is_float(dt):
            return fmax_nan(w, a, b, ty, lanes, smaller)
        sign = "u" if dt in UNSIGNED else "s"
        return intrinsic(w, f"{sign}{'min' if smaller else 'max'}", ty, a, b)
    if is_float(dt):
        return _fbin(w, _FLOAT_ARITH[op.name], a, b, ty)
    if op.name == "tensor.div":
        return _int_divmod(w, dt, a, b, lanes, want_mod=False)
    return _fbin(w, _INT_ARITH[op.name], a, b, ty)


@_emits("tensor.floordiv", "tensor.mod")
def _floordiv_mod(w, op, args, lanes):
    dt = _dt(op)
    if dt is DType.bool:
        raise EmitError(op, "bool operands are not supported")
    want_mod = op.name == "tensor.mod"
    if is_float(dt):
        return _float_divmod(w, dt, *args, lanes, want_mod)
    return _int_divmod(w, dt, *args, lanes, want_mod)


def _int_divmod(w, dt: DType, a: str, b: str, lanes: int, want_mod: bool) -> str:
    """numpy floor division / mod of integers: the quotient rounds down, the remainder has the
    divisor's sign, x // 0 == x % 0 == 0. Divisors 0 and -1 never reach the hardware divide
    (undefined behaviour in LLVM for 0, and for INT_MIN / -1)."""
    ty, m = vtype(dt, lanes), f"<{lanes} x i1>"
    zero = w.value(f"icmp eq {ty} {b}, zeroinitializer")
    if dt in UNSIGNED:
        safe = w.value(f"select {m} {zero}, {ty} splat (i8 1), {ty} {b}")
        r = w.value(f"{'urem' if want_mod else 'udiv'} {ty} {a}, {safe}")
        return w.value(f"select {m} {zero}, {ty} zeroinitializer, {ty} {r}")
    minus1 = w.value(f"icmp eq {ty} {b}, {const(dt, -1, lanes)}")
    special = w.value(f"or {m} {zero}, {minus1}")
    safe = w.value(f"select {m} {special}, {ty} {const(dt, 1, lanes)}, {ty} {b}")
    rem = w.value(f"srem {ty} {a}, {safe}")
    inexact = w.value(f"icmp ne {ty} {rem}, zeroinitializer")
    signs = w.value(f"icmp slt {ty} {w.value(f'xor {ty} {rem}, {safe}')}, zeroinitializer")
    fix = w.value(f"and {m} {inexact}, {signs}")
    if want_mod:
        r = w.value(f"select {m} {fix}, {ty} {w.value(f'add {ty} {rem}, {safe}')}, {ty} {rem}")
        return w.value(f"select {m} {special}, {ty} zeroinitializer, {ty} {r}")
    q = w.value(f"sdiv {ty} {a}, {safe}")
    q = w.value(f"sub {ty} {q}, {w.value(f'zext {m} {fix} to {ty}')}")
    q = w.value(f"select {m} {minus1}, {ty} {w.value(f'sub {ty} zeroinitializer, {a}')}, "
                f"{ty} {q}")
    return w.value(f"select {m} {zero}, {ty} zeroinitializer, {ty} {q}")


def _fmod(w, dt: DType, a: str, b: str, lanes: int) -> str:
    """C fmod. float: a - trunc(a/b)*b in double, exact while |a/b| < 2^24 (every quotient and
    product fits 53 bits); double: LLVM's frem (libm fmod; f64 is not a hot type)."""
    ty = vtype(dt, lanes)
    if scalar_type(dt) == "double":
        return w.value(f"frem {ty} {a}, {b}")
    vd = f"<{lanes} x double>"
    da, db = (w.value(f"fpext {ty} {x} to {vd}") for x in (a, b))
    q = intrinsic(w, "trunc", vd, w.value(f"fdiv {vd} {da}, {db}"))
    r = w.value(f"fsub {vd} {da}, {w.value(f'fmul {vd} {q}, {db}')}")
    r = w.value(f"fptrunc {vd} {r} to {ty}")
    inf = const(dt, math.inf, lanes)
    b_inf = w.value(f"fcmp oeq {ty} {intrinsic(w, 'fabs', ty, b)}, {inf}")
    a_fin = w.value(f"fcmp one {ty} {intrinsic(w, 'fabs', ty, a)}, {inf}")
    keep_a = w.value(f"and <{lanes} x i1> {b_inf}, {a_fin}")  # fmod(a, ±inf) == a
    return w.value(f"select <{lanes} x i1> {keep_a}, {ty} {a}, {ty} {r}")


def _float_divmod(w, dt: DType, a: str, b: str, lanes: int, want_mod: bool) -> str:
    """numpy's npy_divmod: mod = fmod(a, b) moved to the divisor's sign; floordiv =
    (a - mod) / b rounded to the integer it is; x // 0 is a / 0 (inf or nan)."""
    ty, m = vtype(dt, lanes), f"<{lanes} x i1>"
    mod = _fmod(w, dt, a, b, lanes)
    div = _fbin(w, "fdiv", _fbin(w, "fsub", a, mod, ty), b, ty)
    nonzero = w.value(f"fcmp une {ty} {mod}, zeroinitializer")
    b_neg = w.value(f"fcmp olt {ty} {b}, zeroinitializer")
    mod_neg = w.value(f"fcmp olt {ty} {mod}, zeroinitializer")
    fix = w.value(f"and {m} {nonzero}, {w.value(f'xor {m} {b_neg}, {mod_neg}')}")
    if want_mod:
        return w.value(f"select {m} {fix}, {ty} {_fbin(w, 'fadd', mod, b, ty)}, {ty} {mod}")
    one = const(dt, 1.0, lanes)
    div = w.value(f"select {m} {fix}, {ty} {_fbin(w, 'fsub', div, one, ty)}, {ty} {div}")
    fl = intrinsic(w, "floor", ty, div)
    up = w.value(f"fcmp ogt {ty} {_fbin(w, 'fsub', div, fl, ty)}, {const(dt, 0.5, lanes)}")
    fl = w.value(f"select {m} {up}, {ty} {_fbin(w, 'fadd', fl, one, ty)}, {ty} {fl}")
    b_zero = w.value(f"fcmp oeq {ty} {b}, zeroinitializer")
    return w.value(f"select {m} {b_zero}, {ty} {_fbin(w, 'fdiv', a, b, ty)}, {ty} {fl}")


@_emits("tensor.pow")
def _pow(w, op, args, lanes):
    """x ** y: constant exponents as multiplies/sqrt/divide, else the general forms."""
    dt = _dt(op)
    a, b = args
    if dt is DType.bool:
        raise EmitError(op, "bool operands are not supported")
    exponent = _scalar_constant(op.operand_values[1])
    if exponent is not None:
        special = _pow_constant(w, dt, a, exponent, lanes)
        if special is not None:
            return special
    if not is_float(dt):
        return _int_pow(w, dt, a, b, lanes)
    return _float_pow(w, dt, a, b, lanes)


def _scalar_constant(v) -> float | None:
    op = v.op
    if op is not None and op.name == "tensor.constant" and np.ndim(op.value) == 0:
        return float(op.value)
    return None


def _pow_constant(w, dt: DType, a: str, e: float, lanes: int) -> str | None:
    """x**e for the exponents models use (2, 3, 0.5, -1, ...) as multiplies, sqrt, divide."""
    ty = vtype(dt, lanes)
    f = is_float(dt)
    mul = "fmul" if f else "mul"
    if e == 0:
        return const(dt, 1, lanes)
    if e == 1:
        return a
    if e in (2, 3):
        sq = _fbin(w, mul, a, a, ty)
        return sq if e == 2 else _fbin(w, mul, sq, a, ty)
    if not f:
        return None
    one = const(dt, 1.0, lanes)
    if e == 0.5:
        return intrinsic(w, "sqrt", ty, a)
    if e == -1:
        return _fbin(w, "fdiv", one, a, ty)
    if e == -2:
        return _fbin(w, "fdiv", one, _fbin(w, "fmul", a, a, ty), ty)
    if e == -0.5:
        return _fbin(w, "fdiv", one, intrinsic(w, "sqrt", ty, a), ty)
    return None


def _float_pow(w, dt: DType, a: str, b: str, lanes: int) -> str:
    """numpy power for floats: exp(b*log|a|) with the sign of a negative base raised to an
    integer, NaN for a non-integer power of a negative base, and pow(x, 0) == pow(1, y) == 1."""
    ty, m = vtype(dt, lanes), f"<{lanes} x i1>"
    mag = math_call(w, "exp", _fbin(w, "fmul", b, math_call(
        w, "log", intrinsic(w, "fabs", ty, a), dt, lanes), ty), dt, lanes)
    b_int = w.value(f"fcmp oeq {ty} {intrinsic(w, 'floor', ty, b)}, {b}")
    half = intrinsic(w, "floor", ty, _fbin(w, "fmul", b, const(dt, 0.5, lanes), ty))
    b_even = w.value(f"fcmp oeq {ty} {_fbin(w, 'fadd', half, half, ty)}, {b}")
    signed = w.value(f"select {m} {b_even}, {ty} {mag}, {ty} {w.value(f'fneg {ty} {mag}')}")
    neg_result = w.value(f"select {m} {b_int}, {ty} {signed}, {ty} {const(dt, math.nan, lanes)}")
    a_neg = w.value(f"fcmp olt {ty} {a}, zeroinitializer")
    r = w.value(f"select {m} {a_neg}, {ty} {neg_result}, {ty} {mag}")
    one = const(dt, 1.0, lanes)
    trivial = w.value(f"or {m} {w.value(f'fcmp oeq {ty} {b}, zeroinitializer')}, "
                      f"{w.value(f'fcmp oeq {ty} {a}, {one}')}")
    return w.value(f"select {m} {trivial}, {ty} {one}, {ty} {r}")


def _int_pow(w, dt: DType, a: str, b: str, lanes: int) -> str:
    """Integer power by squaring (wrapping, like numpy), looping while any lane has exponent
    bits left. Negative exponents (an error in numpy) give 1/a**|b| truncated: 0 unless
    |a| == 1."""
    ty, m = vtype(dt, lanes), f"<{lanes} x i1>"
    one = const(dt, 1, lanes)
    neg = w.value(f"icmp slt {ty} {b}, zeroinitializer") if dt not in UNSIGNED else None
    e0 = b if neg is None else w.value(f"select {m} {neg}, {ty} zeroinitializer, {ty} {b}")
    res, base, e = w.slot(ty, one, "pow"), w.slot(ty, a, "base"), w.slot(ty, e0, "exp")
    cond, body, done = w.label("pow.cond"), w.label("pow.body"), w.label("pow.end")
    w.emit(f"br label %{cond}")
    w.block(cond)
    left = w.value(f"icmp ne {ty} {w.load(ty, e)}, zeroinitializer")
    w.emit(f"br i1 {_call(w, f'llvm.vector.reduce.or.v{lanes}i1', 'i1', (m, left))}, "
           f"label %{body}, label %{done}")
    w.block(body)
    ev, bv, rv = w.load(ty, e), w.load(ty, base), w.load(ty, res)
    bit = w.value(f"icmp ne {ty} {w.value(f'and {ty} {ev}, {one}')}, zeroinitializer")
    w.store(ty, w.value(f"select {m} {bit}, {ty} {w.value(f'mul {ty} {rv}, {bv}')}, {ty} {rv}"),
            res)
    w.store(ty, w.value(f"mul {ty} {bv}, {bv}"), base)
    w.store(ty, w.value(f"lshr {ty} {ev}, {one}"), e)
    w.emit(f"br label %{cond}")
    w.block(done)
    result = w.load(ty, res)
    if neg is None:
        return result
    minus = const(dt, -1, lanes)
    is_one = w.value(f"icmp eq {ty} {a}, {one}")
    is_minus_one = w.value(f"icmp eq {ty} {a}, {minus}")
    odd = w.value(f"icmp ne {ty} {w.value(f'and {ty} {b}, {one}')}, zeroinitializer")
    sign = w.value(f"select {m} {odd}, {ty} {minus}, {ty} {one}")
    inv = w.value(f"select {m} {is_one}, {ty} {one}, {ty} zeroinitializer")
    inv = w.value(f"select {m} {is_minus_one}, {ty} {sign}, {ty} {inv}")
    return w.value(f"select {m} {neg}, {ty} {inv}, {ty} {result}")


_FCMP = {"tensor.eq": "oeq", "tensor.ne": "une", "tensor.lt": "olt", "tensor.le": "ole",
         "tensor.gt": "ogt", "tensor.ge": "oge"}
_ICMP = {"tensor.eq": "eq", "tensor.ne": "ne", "tensor.lt": "slt", "tensor.le": "sle",
         "tensor.gt": "sgt", "tensor.ge": "sge"}


@_emits(*_FCMP)
def _compare(w, op, args, lanes):
    """Ordered float compares (false with NaN) except ne (true); u8/bool compare unsigned."""
    dt = _dt(op, 0)
    ty = vtype(dt, lanes)
    if is_float(dt):
        return w.value(f"fcmp {_FCMP[op.name]} {ty} {args[0]}, {args[1]}")
    pred = _ICMP[op.name]
    if dt in UNSIGNED:
        pred = pred.replace("s", "u") if pred not in ("eq", "ne") else pred
    return w.value(f"icmp {pred} {ty} {args[0]}, {args[1]}")


def truthy(w: FunctionWriter, dt: DType, x: str, lanes: int) -> str:
    """x != 0 as i1 lanes (NaN is true, as bool(nan) is)."""
    if dt is DType.bool:
        return x
    ty = vtype(dt, lanes)
    return w.value(f"{'fcmp une' if is_float(dt) else 'icmp ne'} {ty} {x}, zeroinitializer")


def from_bool(w: FunctionWriter, dt: DType, x: str, lanes: int) -> str:
    """i1 lanes as 0/1 of `dt`."""
    if dt is DType.bool:
        return x
    conv = "uitofp" if is_float(dt) else "zext"
    return w.value(f"{conv} <{lanes} x i1> {x} to {vtype(dt, lanes)}")


@_emits("tensor.and", "tensor.or")
def _logical(w, op, args, lanes):
    a, b = (truthy(w, _dt(op, i), x, lanes) for i, x in enumerate(args))
    r = w.value(f"{op.name.split('.')[1]} <{lanes} x i1> {a}, {b}")
    return from_bool(w, _dt(op), r, lanes)


@_emits("tensor.where")
def _where(w, op, args, lanes):
    ty = vtype(_dt(op), lanes)
    return w.value(f"select <{lanes} x i1> {args[0]}, {ty} {args[1]}, {ty} {args[2]}")


@_emits("tensor.cast")
def _cast(w, op, args, lanes):
    return cast(w, _dt(op, 0), _dt(op), args[0], lanes)


def _to_float_round_odd(w: FunctionWriter, x: str, lanes: int) -> str:
    """double -> float rounded to odd (truncate, then set the last bit if inexact), so that a
    second rounding to f16/bf16 is the correct single rounding of the double. (LLVM lowers a
    direct double->half fptrunc to a runtime-library call the JIT cannot resolve.)"""
    vd, vf, vi, m = (f"<{lanes} x {t}>" for t in ("double", "float", "i32", "i1"))
    f = w.value(f"fptrunc {vd} {x} to {vf}")
    back = w.value(f"fpext {vf} {f} to {vd}")
    inexact = w.value(f"fcmp one {vd} {back}, {x}")
    away = w.value(f"fcmp ogt {vd} {intrinsic(w, 'fabs', vd, back)}, "
                   f"{intrinsic(w, 'fabs', vd, x)}")
    bits = w.value(f"bitcast {vf} {f} to {vi}")
    toward_zero = w.value(f"sub {vi} {bits}, {w.value(f'zext {m} {away} to {vi}')}")
    odd = w.value(f"or {vi} {toward_zero}, {w.value(f'zext {m} {inexact} to {vi}')}")
    return w.value(f"bitcast {vi} {odd} to {vf}")


def cast(w: FunctionWriter, src: DType, dst: DType, x: str, lanes: int) -> str:
    """numpy astype between compute values: float->int truncates (saturating, no poison),
    to f16/bf16 rounds, to bool tests != 0."""
    s, d = scalar_type(src), scalar_type(dst)
    sv, dv = vtype(src, lanes), vtype(dst, lanes)
    if dst is DType.bool:
        return truthy(w, src, x, lanes)
    if is_float(src) and is_float(dst):
        if s != d:
            if s == "double" and dst in (DType.f16, DType.bf16):
                x = _to_float_round_odd(w, x, lanes)
            else:
                x = w.value(f"{'fpext' if d == 'double' else 'fptrunc'} {sv} {x} to {dv}")
        return round_to(w, dst, x, lanes) if dst != src else x
    if is_float(dst):  # int or bool -> float
        conv = "uitofp" if src in UNSIGNED else "sitofp"
        return round_to(w, dst, w.value(f"{conv} {sv} {x} to {dv}"), lanes)
    if is_float(src):  # float -> int: truncate toward zero through i64, then wrap
        wide = _call(w, f"llvm.fptosi.sat.v{lanes}i64.{suffix(sv)}", f"<{lanes} x i64>",
                     (sv, x))
        return wide if d == "i64" else w.value(f"trunc <{lanes} x i64> {wide} to {dv}")
    if INT_BITS[s] == INT_BITS[d]:
        return x
    if INT_BITS[s] > INT_BITS[d]:
        return w.value(f"trunc {sv} {x} to {dv}")
    return w.value(f"{'zext' if src in UNSIGNED else 'sext'} {sv} {x} to {dv}")


# ---- vector memory access ----------------------------------------------------------------------

def lane_ids(lanes: int) -> str:
    return "<" + ", ".join(f"i64 {i}" for i in range(lanes)) + ">"


def align(dt) -> int:
    return int(dt.itemsize)


def vload(w: FunctionWriter, dt, ptr: str, lanes: int, mask: str | None = None) -> str:
    """`lanes` contiguous elements at `ptr` as a compute vector (masked-off lanes read 0;
    masks only for 4- and 8-byte elements, which x86 masks natively)."""
    st, a = storage_vtype(dt, lanes), align(dt)
    if mask is None:
        raw = w.load(st, ptr, a)
    else:
        raw = w.value(f"call {st} @llvm.masked.load.{suffix(st)}.p0(ptr align {a} {ptr}, "
                      f"<{lanes} x i1> {mask}, {st} zeroinitializer)")
    return to_compute(w, dt, raw, lanes)


def vgather(w: FunctionWriter, dt, ptrs: str, lanes: int) -> str:
    """One element per lane from `ptrs` (all lanes valid: see `clamped_index`)."""
    st, a = storage_vtype(dt, lanes), align(dt)
    raw = w.value(f"call {st} @llvm.masked.gather.{suffix(st)}.v{lanes}p0(<{lanes} x ptr> "
                  f"align {a} {ptrs}, <{lanes} x i1> splat (i1 true), {st} zeroinitializer)")
    return to_compute(w, dt, raw, lanes)


def vstore(w: FunctionWriter, dt, x: str, ptr: str, lanes: int, mask: str | None = None) -> None:
    st, a = storage_vtype(dt, lanes), align(dt)
    raw = to_storage(w, dt, x, lanes)
    if mask is None:
        w.store(st, raw, ptr, a)
    else:
        w.emit(f"call void @llvm.masked.store.{suffix(st)}.p0({st} {raw}, ptr align {a} "
               f"{ptr}, <{lanes} x i1> {mask})")


def vscatter(w: FunctionWriter, dt, x: str, ptrs: str, lanes: int) -> None:
    """Store lane l at ptrs[l]; clamped lanes repeat the last element and its (equal) value."""
    st, a = storage_vtype(dt, lanes), align(dt)
    raw = to_storage(w, dt, x, lanes)
    w.emit(f"call void @llvm.masked.scatter.{suffix(st)}.v{lanes}p0({st} {raw}, "
           f"<{lanes} x ptr> align {a} {ptrs}, <{lanes} x i1> splat (i1 true))")


def clamped_index(w: FunctionWriter, i: str, last: str, lanes: int) -> str:
    """Element index min(i + lane, last) per lane. Tails and strided rows use it instead of
    masks: every lane then reads a valid element, and a lane past the end recomputes and
    rewrites the last element with the same value, so no load or store needs a branch."""
    vi = f"<{lanes} x i64>"
    idx = w.value(f"add {vi} {splat(w, 'i64', i, lanes)}, {lane_ids(lanes)}")
    return intrinsic(w, "smin", vi, idx, splat(w, "i64", last, lanes))


def lane_ptrs(w: FunctionWriter, dt, base: str, first: str, index: str, stride: str,
               lanes: int) -> str:
    """Pointers base + first + index[lane] * stride (elements)."""
    vi = f"<{lanes} x i64>"
    steps = w.value(f"mul {vi} {index}, {splat(w, 'i64', stride, lanes)}")
    idx = w.value(f"add {vi} {splat(w, 'i64', first, lanes)}, {steps}")
    return w.value(f"getelementptr {STORAGE[dt]}, ptr {base}, {vi} {idx}")


def splat_load(w: FunctionWriter, dt, ptr: str, lanes: int) -> str:
    raw = w.load(STORAGE[dt], ptr, align(dt))
    return to_compute(w, dt, splat(w, STORAGE[dt], raw, lanes), lanes)


def scalar_store(w: FunctionWriter, dt, x: str, ptr: str, lanes: int) -> None:
    raw = to_storage(w, dt, x, lanes)
    lane0 = w.value(f"extractelement {storage_vtype(dt, lanes)} {raw}, i64 0")
    w.store(STORAGE[dt], lane0, ptr, align(dt))


def lane_mask(w: FunctionWriter, remaining: str, lanes: int) -> str:
    """Lanes [0, remaining) on."""
    return w.value(f"icmp slt <{lanes} x i64> {lane_ids(lanes)}, "
                   f"{splat(w, 'i64', remaining, lanes)}")


# ---- module assembly --------------------------------------------------------------------------

_CALL = re.compile(r"\bcall\s+(?P<ret>void|<[^>]*>|\S+)\s+@(?P<name>[-\w.$]+)\((?P<args>.*)\)")
_DEFINED = re.compile(r"^\s*(?:define|declare)\b[^@]*@([-\w.$]+)\s*\(", re.M)


def _split_args(text: str) -> list[str]:
    """A call's argument list split at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def _arg_type(arg: str) -> str:
    if arg.startswith("<"):
        return arg[:arg.index(">") + 1]
    return arg.split()[0]


def declarations(text: str) -> list[str]:
    """`declare` lines for every function `text` calls but neither defines nor declares
    (LLVM intrinsics, libm): derived from the call sites, so emitters never list them."""
    known = set(_DEFINED.findall(text))
    decls: dict[str, str] = {}
    for m in _CALL.finditer(text):
        name = m.group("name")
        if name in known or name in decls:
            continue
        types = ", ".join(_arg_type(a) for a in _split_args(m.group("args")))
        decls[name] = f"declare {m.group('ret')} @{name}({types})"
    return list(decls.values())


def module_text(parts: list[str], widths: set[int]) -> str:
    """A complete module: `parts` (function definitions), vmath's functions for `widths`, and
    one declaration per external function they call. The emitters write vector code (the
    gathered paths too), so it is compiled as hand-vectorized: LLVM's vectorizers measured no
    faster and cost ~30 % of the module's compile time."""
    body = "\n".join([*parts, vmath.render(sorted(widths))])
    given = set(_DEFINED.findall(body))
    extra = [d for d in sorted(vmath.intrinsic_declarations(sorted(widths)))
             if _DEFINED.search(d) and _DEFINED.search(d).group(1) not in given]
    for d in extra:
        given.add(_DEFINED.search(d).group(1))
    text = "\n".join([*extra, body])
    return "\n".join([HAND_VECTORIZED, *declarations(text), text]) + "\n"
