"""Vectorized fp32 exp, log, tanh, erf, sigmoid, sin and cos as LLVM IR text, for any width W.

LLVM's `llvm.exp.*` / `llvm.sin.*` / `llvm.log.*` vector intrinsics lower to one libm call per
lane. These functions are branch-free range reductions plus minimax polynomials that stay in
vector registers. Each is an `internal alwaysinline` function with no memory access, so a module
includes `render(widths)` whole: LLVM inlines the calls and drops the functions nobody calls.

Accuracy against float64 (tests/test_cpu_vmath.py checks every claim over the whole fp32 range):

- exp: rel <= 3e-7 wherever the result is a normal float (x in [-87.33, 88.72]); overflow ->
  inf; results below FLT_MIN (1.2e-38) flush to 0, which saves a second scale factor; nan -> nan.
- log: rel <= 3e-7 for every positive x, subnormals included; log(+-0) = -inf,
  log(x < 0) = nan, log(inf) = inf.
- tanh: abs <= 2e-7 and rel <= 1e-6 for every x, tiny and subnormal x included; odd;
  saturates to exactly +-1.
- sigmoid: abs <= 2e-7; rel <= 1e-6 wherever the result is >= 1e-30; results below
  FLT_MIN flush to 0 (sigmoid(-100) = 0).
- erf: abs <= 5e-7, and rel <= 1e-6 for |x| < 0.875; odd; exactly +-1 for |x| >= 4.
- sin, cos: abs <= 5e-7 (1.2e-7 measured) for |x| < 2^22 pi/2 = 6588397.5, where the
  quotient x * 2/pi still fits the integer trick below. Larger finite |x| gives a value in
  [-1, 1] that is not sin(x); +-inf -> nan.

Coefficients are discrete minimax fits: a linear program over 4000 Chebyshev points, weighted for
relative error except cos (absolute), then rounded to fp32. Every fit error is below 1e-8, so the
error left is the fp32 rounding of the evaluation.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

from lmc.errors import LmcError

from .irtext import FunctionWriter, fconst, vec

FUNCS: tuple[str, ...] = ("exp", "log", "tanh", "erf", "sigmoid", "sin", "cos")

_ATTRS = "alwaysinline nounwind willreturn memory(none)"


class VmathError(LmcError):
    """A kernel generator asked vmath for a function or vector width it does not provide."""


# -- constants --

# Adding 1.5 * 2^23 to |y| < 2^22 rounds y to an integer n and leaves n in the low mantissa
# bits: t - shifter is rint(y) as a float, bits(t) - bits(shifter) is n as an i32, with no fptosi
# (poison for nan).
_SHIFTER = 12582912.0
_SHIFTER_BITS = 0x4B400000
_LOG2E = 1.4426950408889634
# Cody-Waite ln 2 = hi + lo: hi has 9 significant bits, so x - n*hi is exact for |n| <= 128.
_LN2_HI_CW = 0.693359375
_LN2_LO_CW = -2.1219444e-04
# log adds e * ln2 with a final fma (exact product), so the high part can be fl(ln 2).
_LN2_HI = 0.6931472
_LN2_LO = -1.9046542e-09
_FLT_MIN = 1.1754943508222875e-38
_SQRT_HALF_BITS = 0x3F3504F3
_TWO_OVER_PI = 0.6366197723675814
# pi/2 = P1 + P2 + P3 (+ 1e-23): each part is the fp32 rounding of what the previous ones left.
_PIO2 = (1.5707964, -4.371139e-08, -1.7151245e-15)
# Largest |r| the sin/cos polynomials must cover. fl(2/pi) is off by 4e-8 (relative), so at
# |x * 2/pi| ~ 2^22 the quotient can miss the nearest integer by 0.17: |r| <= pi/4 + 0.17 pi/2.
_TRIG_R = 1.06

# Polynomial coefficients, lowest degree first; each comment gives the form and the fit interval.
# e^r = 1 + r (1 + r P(r)),  r in [0, ln2]
_EXP = (0.5000023, 0.16663177, 0.04185558, 0.00786741, 0.0019130936)
# log(1+f) = f + f^2 (-1/2 + f P(f)),  f in [sqrt(1/2) - 1, sqrt(2) - 1]
_LOG = (0.3333333, -0.25000826, 0.20001236, -0.16623144, 0.14201368, -0.13162003, 0.12765428,
        -0.076343894)
# tanh x = x + x^3 P(x^2),  |x| < 0.625
_TANH = (-0.3333328, 0.13331442, -0.053739715, 0.020639088, -0.005704987)
_TANH_SMALL = 0.625
# erf x = x P(x^2) / Q(x^2) for |x| <= 4 (a rational minimax for the absolute error, fitted
# in float64 by reweighted least squares: 1.5e-9 before fp32 rounding); one path for every x
# with no exp: half the instructions of a split at 0.875 with an exp beyond, which made an
# exact GELU epilogue cost 11 % of its GEMM
_ERF_P = (1.1283792, 0.18471028, 0.054332461, 0.0038395103, 0.00038268673, 4.7803928e-06,
          -1.366601e-08)
_ERF_Q = (1.0, 0.49702877, 0.11382617, 0.015453459, 0.0013095678, 6.4007887e-05)
_ERF_SATURATE = 4.0
# sin r = r + r^3 P(r^2),  cos r = 1 + r^2 (-1/2 + r^2 Q(r^2)),  |r| <= _TRIG_R
_SIN = (-0.16666666, 0.008333309, -0.00019834758, 2.687297e-06)
_COS = (0.041666668, -0.0013888858, 2.4794774e-05, -2.6928228e-07)


# -- a straight-line SSA writer for one vector function --


class _Body:
    """SSA lines of one `<W x float>` function: fresh names, splat constants, used intrinsics."""

    def __init__(self, width: int):
        self.width = width
        self.f, self.i, self.b = vec(width), f"<{width} x i32>", f"<{width} x i1>"
        self.lines: list[str] = []
        self.intrinsics: set[str] = set()
        self._n = 0

    def _v(self, expr: str) -> str:
        self._n += 1
        name = f"%v{self._n}"
        self.lines.append(f"  {name} = {expr}")
        return name

    def cf(self, value: float) -> str:
        return f"splat (float {fconst(value)})"

    def ci(self, value: int) -> str:
        return f"splat (i32 {value})"

    def fop(self, op: str, a: str, b: str) -> str:
        return self._v(f"{op} {self.f} {a}, {b}")

    def iop(self, op: str, a: str, b: str) -> str:
        return self._v(f"{op} {self.i} {a}, {b}")

    def fneg(self, a: str) -> str:
        return self._v(f"fneg {self.f} {a}")

    def fcmp(self, pred: str, a: str, b: str) -> str:
        return self._v(f"fcmp {pred} {self.f} {a}, {b}")

    def select(self, cond: str, a: str, b: str, ty: str | None = None) -> str:
        ty = ty or self.f
        return self._v(f"select {self.b} {cond}, {ty} {a}, {ty} {b}")

    def nonzero(self, a: str) -> str:
        return self._v(f"icmp ne {self.i} {a}, zeroinitializer")

    def sitofp(self, a: str) -> str:
        return self._v(f"sitofp {self.i} {a} to {self.f}")

    def as_int(self, a: str) -> str:
        return self._v(f"bitcast {self.f} {a} to {self.i}")

    def as_float(self, a: str) -> str:
        return self._v(f"bitcast {self.i} {a} to {self.f}")

    def intrinsic(self, name: str, *args: str) -> str:
        """Call llvm.<name>.v<W>f32 on float vectors, and record its declaration."""
        fn = f"@llvm.{name}.v{self.width}f32"
        self.intrinsics.add(f"declare {self.f} {fn}({', '.join([self.f] * len(args))})")
        return self._v(f"call {self.f} {fn}({', '.join(f'{self.f} {a}' for a in args)})")

    def fma(self, a: str, b: str, c: str) -> str:
        return self.intrinsic("fma", a, b, c)

    def horner(self, t: str, coeffs: tuple[float, ...]) -> str:
        """coeffs[0] + t (coeffs[1] + t (...)): one fma per coefficient."""
        acc = self.cf(coeffs[-1])
        for c in reversed(coeffs[:-1]):
            acc = self.fma(acc, t, self.cf(c))
        return acc

    def at_most(self, x: str, hi: float) -> str:
        """min(x, hi) that keeps nan: the compare is false for nan (one vminps on x86)."""
        return self.select(self.fcmp("ogt", x, self.cf(hi)), self.cf(hi), x)

    def at_least(self, x: str, lo: float) -> str:
        """max(x, lo) that keeps nan (one vmaxps)."""
        return self.select(self.fcmp("olt", x, self.cf(lo)), self.cf(lo), x)


# -- the functions, written against _Body --


def _pow2(b: _Body, n: str) -> str:
    """2^n for i32 n in [-126, 127] from the biased exponent bits; n = 128 gives +inf, -127 +0."""
    return b.as_float(b.iop("shl", b.iop("add", n, b.ci(127)), b.ci(23)))


def _exp(b: _Body, x: str) -> str:
    """e^x = 2^n e^r, n = floor(x log2e), r in [0, ln2) by Cody-Waite, minimax e^r.

    Flooring, not rounding, keeps every finite result at n <= 127, so 2^n is a single factor
    built from exponent bits: n = 128 (x > ln FLT_MAX) gives inf, and n = -127 gives +0, which
    flushes subnormal results. Clamping x to [-88, 88.8] keeps n in [-127, 128]."""
    x = b.at_least(b.at_most(x, 88.8), -88.0)
    # t = shifter + rint(x log2e - 1/2) = shifter + floor(x log2e), up to one rounding
    t = b.fop("fadd", b.fma(x, b.cf(_LOG2E), b.cf(-0.5)), b.cf(_SHIFTER))
    n = b.fop("fsub", t, b.cf(_SHIFTER))
    r = b.fma(n, b.cf(-_LN2_HI_CW), x)
    r = b.fma(n, b.cf(-_LN2_LO_CW), r)
    p = b.fma(r, b.fma(r, b.horner(r, _EXP), b.cf(1.0)), b.cf(1.0))
    return b.fop("fmul", p, _pow2(b, b.iop("sub", b.as_int(t), b.ci(_SHIFTER_BITS))))


def _log(b: _Body, x: str) -> str:
    """log x = e ln2 + log1p(f), with x = 2^e (1 + f) and 1 + f in [sqrt(1/2), sqrt(2)).

    Subnormal x is scaled by 2^23 first. f = m - 1 is exact, so the result keeps its relative
    accuracy near x = 1."""
    tiny = b.fcmp("olt", x, b.cf(_FLT_MIN))
    xs = b.select(tiny, b.fop("fmul", x, b.cf(2.0 ** 23)), x)
    ix = b.iop("sub", b.as_int(xs), b.ci(_SQRT_HALF_BITS))
    e = b.iop("add", b.iop("ashr", ix, b.ci(23)), b.select(tiny, b.ci(-23), b.ci(0), b.i))
    m = b.as_float(b.iop("add", b.iop("and", ix, b.ci(0x7FFFFF)), b.ci(_SQRT_HALF_BITS)))
    f = b.fop("fsub", m, b.cf(1.0))
    ef = b.sitofp(e)
    h = b.fma(f, b.horner(f, _LOG), b.cf(-0.5))
    y = b.fma(b.fop("fmul", f, f), h, b.fma(ef, b.cf(_LN2_LO), f))
    y = b.fma(ef, b.cf(_LN2_HI), y)
    y = b.select(b.fcmp("oeq", x, b.cf(math.inf)), b.cf(math.inf), y)
    y = b.select(b.fcmp("oeq", x, b.cf(0.0)), b.cf(-math.inf), y)
    return b.select(b.fcmp("ult", x, b.cf(0.0)), b.cf(math.nan), y)  # x < 0 or nan


def _tanh(b: _Body, x: str) -> str:
    """Odd polynomial for |x| < 0.625 (keeps relative accuracy near 0); (1-e)/(1+e) with
    e = exp(-2|x|) beyond, which has no cancellation there and goes to exactly 1."""
    a = b.intrinsic("fabs", x)
    x2 = b.fop("fmul", x, x)
    small = b.fma(b.fop("fmul", x, x2), b.horner(x2, _TANH), x)
    e = _exp(b, b.fop("fmul", a, b.cf(-2.0)))
    large = b.fop("fdiv", b.fop("fsub", b.cf(1.0), e), b.fop("fadd", b.cf(1.0), e))
    y = b.select(b.fcmp("olt", a, b.cf(_TANH_SMALL)), small, large)
    return b.intrinsic("copysign", y, x)  # also tanh(-0) = -0: fma(-0*x2, P, -0) is +0


def _sigmoid(b: _Body, x: str) -> str:
    """e/(1+e) for x < 0 and 1/(1+e) for x >= 0, e = exp(-|x|): neither side overflows."""
    e = _exp(b, b.fneg(b.intrinsic("fabs", x)))
    num = b.select(b.fcmp("olt", x, b.cf(0.0)), e, b.cf(1.0))
    return b.fop("fdiv", num, b.fop("fadd", b.cf(1.0), e))


def _erf(b: _Body, x: str) -> str:
    """x P(x^2) / Q(x^2) on |x| clamped to 4, at most 1, exactly 1 from 4 on; sign copied back
    (also for -0). The clamps keep nan: a nan compares false and passes through."""
    a = b.intrinsic("fabs", x)
    c = b.at_most(a, _ERF_SATURATE)
    t = b.fop("fmul", c, c)
    y = b.fop("fdiv", b.fop("fmul", c, b.horner(t, _ERF_P)), b.horner(t, _ERF_Q))
    y = b.select(b.fcmp("oge", a, b.cf(_ERF_SATURATE)), b.cf(1.0), b.at_most(y, 1.0))
    return b.intrinsic("copysign", y, x)


def _sincos(b: _Body, x: str, cos: bool) -> str:
    """sin or cos via x = q pi/2 + r (3-part Cody-Waite), then +-sin r or +-cos r by q mod 4.

    cos x = sin(x + pi/2) is quadrant q + 1. Out-of-range |x| leaves a large r; it is clamped
    so that the result stays in [-1, 1]."""
    t = b.fma(x, b.cf(_TWO_OVER_PI), b.cf(_SHIFTER))
    q = b.fop("fsub", t, b.cf(_SHIFTER))
    r = x
    for part in _PIO2:  # the first fma is exact: x - q*P1 is a multiple of 2^-23 below 2
        r = b.fma(q, b.cf(-part), r)
    r = b.at_least(b.at_most(r, _TRIG_R), -_TRIG_R)
    qi = b.iop("sub", b.as_int(t), b.ci(_SHIFTER_BITS))
    if cos:
        qi = b.iop("add", qi, b.ci(1))
    r2 = b.fop("fmul", r, r)
    s = b.fma(b.fop("fmul", r, r2), b.horner(r2, _SIN), r)
    c = b.fma(r2, b.fma(r2, b.horner(r2, _COS), b.cf(-0.5)), b.cf(1.0))
    odd = b.nonzero(b.iop("and", qi, b.ci(1)))
    sign = b.iop("shl", b.iop("and", qi, b.ci(2)), b.ci(30))
    y = b.as_float(b.iop("xor", b.as_int(b.select(odd, c, s)), sign))
    if cos:
        return y
    # sin(-0) = -0: the reduction's fmas with -P2, -P3 (positive) turn r = -0 into -0 + +0 = +0.
    return b.select(b.fcmp("oeq", x, b.cf(0.0)), x, y)


_BODIES = {
    "exp": _exp, "log": _log, "tanh": _tanh, "erf": _erf, "sigmoid": _sigmoid,
    "sin": lambda b, x: _sincos(b, x, cos=False), "cos": lambda b, x: _sincos(b, x, cos=True),
}
assert tuple(_BODIES) == FUNCS


# -- public API --


def function_name(fn: str, width: int) -> str:
    """The IR symbol of `fn` at vector width `width`: lmc_<fn>_v<W>f32."""
    _check(fn, width)
    return f"lmc_{fn}_v{width}f32"


def _check(fn: str, width: int) -> None:
    if fn not in _BODIES:
        raise VmathError(f"vmath has no function '{fn}' (it has: {', '.join(FUNCS)})")
    _check_width(width)


def _check_width(width: int) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise VmathError(f"vmath vector width must be a positive integer, got {width!r}")


@lru_cache(maxsize=None)
def _render_one(fn: str, width: int) -> tuple[str, frozenset[str]]:
    """(the `define` text, its intrinsic declarations) of one function at one width."""
    b = _Body(width)
    result = _BODIES[fn](b, "%x")
    v = vec(width)
    text = "\n".join([f"define internal {v} @{function_name(fn, width)}({v} %x) {_ATTRS} {{",
                      *b.lines, f"  ret {v} {result}", "}", ""])
    return text, frozenset(b.intrinsics)


def _widths(widths: Iterable[int]) -> list[int]:
    ws = list(widths)
    for w in ws:
        _check_width(w)
    return sorted(set(ws))


def render(widths: Iterable[int]) -> str:
    """LLVM IR text defining @lmc_<fn>_v<W>f32 for every fn in FUNCS and W in widths.

    Internal, alwaysinline and memory(none), so LLVM inlines the calls and drops unused
    functions. No `declare` lines: the module assembler adds intrinsic_declarations(widths)."""
    return "\n".join(_render_one(fn, w)[0] for w in _widths(widths) for fn in FUNCS)


def intrinsic_declarations(widths: Iterable[int]) -> set[str]:
    """The `declare ...` lines (one string each, no newline) that render(widths) needs."""
    return {d for w in _widths(widths) for fn in FUNCS for d in _render_one(fn, w)[1]}


def call(w: FunctionWriter, fn: str, x: str, width: int) -> str:
    """Emit `call <W x float> @lmc_<fn>_v<W>f32(<W x float> x)` into w; return the SSA name."""
    v = vec(width)
    return w.value(f"call {v} @{function_name(fn, width)}({v} {x})", fn)
