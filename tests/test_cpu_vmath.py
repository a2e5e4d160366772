"""vmath's vectorized exp/log/tanh/erf/sigmoid/sin/cos, JIT-compiled per target and vector width,
against numpy in float64. Inputs are a sweep of 2^20 fp32 bit patterns (every exponent, both signs,
subnormals, +-inf, nans), fresh random inputs and special values. Each function is held to the
accuracy its docstring claims. Also checked: the IR contract (linkage, declarations, inlining,
AVX-512 lowering) and exp's speed against the libm-calling `llvm.exp` intrinsic."""
from __future__ import annotations

import ctypes
import math
import time

import numpy as np
import pytest

from lmc.backends.cpu import default_engine, host_target, vmath
from lmc.backends.cpu.gemm import INTRINSICS as GEMM_INTRINSICS
from lmc.backends.cpu.irtext import FunctionWriter, vec
from lmc.backends.cpu.jit import HostTarget, JitEngine

FLT_MIN, FLT_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
SUBNORMAL_ULP = 2.0 ** -149
TRIG_RANGE = 6.588e6  # vmath's sin/cos accuracy claim: |x| < 2^22 pi/2 = 6588397.5

_TARGETS = [("host", None)]
if host_target().has_avx512:  # otherwise the host already is the AVX2 target
    _TARGETS.append(("avx2", host_target().without_avx512()))
CONFIGS = [(name, target, width) for name, target in _TARGETS for width in (1, 4, 8, 16)]
_SIG = (None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _loop_kernel(fn: str, width: int, name: str, callee: str | None = None) -> str:
    """`void name(ptr x, ptr y, i64 n)`: y[i:i+W] = fn(x[i:i+W]) for i < n in steps of W."""
    w = FunctionWriter(f"void @{name}(ptr %x, ptr %y, i64 %n)")
    v = vec(width)
    with w.loop("0", "%n", width) as i:
        x = w.load(v, w.gep("%x", i))
        y = w.value(f"call {v} @{callee}({v} {x})") if callee else vmath.call(w, fn, x, width)
        w.store(v, y, w.gep("%y", i))
    return w.text()


def _module(width: int, kernels: list[str], widths: tuple[int, ...] | None = None) -> str:
    widths = widths or (width,)
    return "\n".join([*sorted(vmath.intrinsic_declarations(widths)), vmath.render(widths),
                      *kernels])


class Kernels:
    """One compiled module holding a loop kernel per vmath function, at one target and width."""

    def __init__(self, name: str, target: HostTarget | None, width: int):
        self.width = width
        # Exported names are global to an engine: each module needs its own.
        entry = {fn: f"test_vmath_{fn}_{name}_v{width}" for fn in vmath.FUNCS}
        text = _module(width, [_loop_kernel(fn, width, entry[fn]) for fn in vmath.FUNCS])
        module = default_engine(target).add_ir(f"test_vmath_{name}_v{width}", text)
        self.fns = {fn: module.function(entry[fn], *_SIG) for fn in vmath.FUNCS}

    def __call__(self, fn: str, x: np.ndarray) -> np.ndarray:
        n = -(-x.size // self.width) * self.width  # pad to whole vectors
        xp = np.zeros(n, np.float32)
        xp[:x.size] = x
        y = np.empty(n, np.float32)
        self.fns[fn](xp.ctypes.data, y.ctypes.data, n)
        return y[:x.size]


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"{c[0]}-w{c[2]}" for c in CONFIGS])
def kernels(request) -> Kernels:
    return Kernels(*request.param)


# -- inputs and float64 references --


def _sweep() -> np.ndarray:
    """Every 4096th fp32 bit pattern: 2^11 mantissas per exponent and sign, +-0, +-inf, nans."""
    return np.arange(0, 2 ** 32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32)


def _random(rng: np.random.Generator) -> np.ndarray:
    n = 1 << 15
    sign = rng.choice([-1.0, 1.0], n)
    positions = rng.integers(0, 10_000, n)  # RoPE: position x inverse frequency
    inv_freq = 10_000.0 ** -rng.uniform(0, 1, n)
    parts = [rng.uniform(-10, 10, n), rng.standard_normal(n) * 30, rng.uniform(-110, 110, n),
             sign * 10.0 ** rng.uniform(-45, 38.5, n), positions * inv_freq,
             rng.uniform(-TRIG_RANGE, TRIG_RANGE, n)]
    return np.concatenate(parts).astype(np.float32)


def _specials() -> np.ndarray:
    base = [0.0, 1.4e-45, 1e-40, FLT_MIN, 1e-30, 1e-10, 1e-5, 0.5, 0.625, 0.875, 1.0, 2.0, 4.0,
            math.pi / 4, math.pi / 2, math.pi, 10.0, 20.0, 44.0, 87.3, 87.33654, 88.0, 88.7,
            88.72283, 88.72284, 89.0, 100.0, 103.97, 104.0, 200.0, 1e4, 6.5e6, 6.6e6, 1e10,
            1e30, FLT_MAX, math.inf, math.nan]
    x = np.array(base, np.float32)
    with np.errstate(over="ignore"):
        near = np.concatenate([np.nextafter(x, np.float32(0)),
                               np.nextafter(x, np.float32(np.inf))])
    x = np.concatenate([x, near])
    return np.concatenate([x, -x])


@pytest.fixture(scope="module")
def rng_seed():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


@pytest.fixture(scope="module")
def inputs(rng_seed):
    rng, seed = rng_seed
    return {"sweep": _sweep(), f"random(seed {seed})": _random(rng), "specials": _specials()}


def _erf64(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf
        return erf(x)
    except ImportError:
        return np.vectorize(math.erf, otypes=[np.float64])(x)


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


REFERENCE = {"exp": np.exp, "log": np.log, "tanh": np.tanh, "erf": _erf64,
             "sigmoid": _sigmoid64, "sin": np.sin, "cos": np.cos}
_ref_cache: dict[tuple[str, str], np.ndarray] = {}


def _reference(fn: str, label: str, x: np.ndarray) -> np.ndarray:
    if (fn, label) not in _ref_cache:
        with np.errstate(all="ignore"):
            _ref_cache[fn, label] = REFERENCE[fn](x.astype(np.float64))
    return _ref_cache[fn, label]


# -- per-function accuracy specifications --


class Case:
    """One function's results on one input set; `within` fails with the worst offender."""

    def __init__(self, fn: str, label: str, x: np.ndarray, got: np.ndarray, ref: np.ndarray):
        self.fn, self.label, self.x, self.ref = fn, label, x, ref
        self.got = got.astype(np.float64)
        with np.errstate(all="ignore"):
            self.abs = np.abs(self.got - ref)
            self.rel = np.where(self.abs == 0, 0.0, self.abs / np.abs(ref))
        # The fp32 grid below FLT_MIN is coarser than any relative bound: a subnormal result
        # within one subnormal ulp counts as exact.
        self.rel[(np.abs(ref) < FLT_MIN) & (self.abs <= SUBNORMAL_ULP)] = 0.0
        self.finite = np.isfinite(x)

    def within(self, what: str, err: np.ndarray, mask: np.ndarray, tol: float) -> None:
        bad = mask & ~(err <= tol)  # nan errors count as failures
        if bad.any():
            i = int(np.flatnonzero(bad)[np.argmax(np.nan_to_num(err[bad], nan=np.inf))])
            xi = self.x[i]
            pytest.fail(f"{self.fn} {what} {err[i]:.3e} > {tol:.1e} on {self.label} "
                        f"({bad.sum()} inputs): x = {xi!r} ({xi.view(np.uint32):#010x}), "
                        f"got {self.got[i]!r}, want {self.ref[i]!r}")

    def equal(self, what: str, mask: np.ndarray, want) -> None:
        with np.errstate(invalid="ignore"):  # casting the sweep's signalling nans
            want = np.broadcast_to(np.asarray(want, np.float64), self.x.shape)
            ok = (self.got == want) | (np.isnan(self.got) & np.isnan(want))
        self.within(what, np.where(ok, 0.0, np.inf), mask, 0.0)

    def nan_in_nan_out(self) -> None:
        self.equal("nan", np.isnan(self.x), np.nan)

    def sign_of_zero_kept(self) -> None:
        zero = self.x == 0
        self.within("sign of zero", (np.signbit(self.got) != np.signbit(self.x)) * 1.0, zero, 0)


def check_exp(c: Case) -> None:
    normal = (c.ref >= FLT_MIN) & (c.ref <= FLT_MAX)  # includes the brief's [-87.3, 88.7]
    c.within("rel error (normal results)", c.rel, normal, 3e-7)
    c.within("abs error (results below FLT_MIN flush)", c.abs, c.ref < FLT_MIN, FLT_MIN)
    c.equal("flush to 0", c.x <= -87.35, 0.0)
    c.equal("overflow", c.ref > FLT_MAX * (1 + 2.0 ** -24), np.inf)
    c.equal("exp(-inf)", c.x == -np.inf, 0.0)
    c.nan_in_nan_out()


def check_log(c: Case) -> None:
    c.within("rel error", c.rel, c.finite & (c.x > 0), 3e-7)
    c.equal("log(+-0)", c.x == 0, -np.inf)
    c.equal("log(x < 0)", c.x < 0, np.nan)
    c.equal("log(inf)", c.x == np.inf, np.inf)
    c.nan_in_nan_out()


def check_tanh(c: Case) -> None:
    c.within("abs error", c.abs, c.finite, 2e-7)
    c.within("rel error", c.rel, c.finite & (c.x != 0), 1e-6)
    c.within("|tanh| <= 1", np.abs(c.got), c.finite, 1.0)
    c.equal("saturation (|x| >= 9.1)", np.abs(c.x) >= 9.1, np.sign(c.x))
    c.sign_of_zero_kept()
    c.nan_in_nan_out()


def check_sigmoid(c: Case) -> None:
    c.within("abs error", c.abs, c.finite, 2e-7)
    c.within("rel error (result >= 1e-30)", c.rel, c.finite & (c.ref >= 1e-30), 1e-6)
    c.within("sigmoid <= 1", c.got, c.finite, 1.0)
    c.within("sigmoid >= 0", -c.got, c.finite, 0.0)
    c.equal("sigmoid(inf)", c.x == np.inf, 1.0)
    c.equal("sigmoid(-inf)", c.x == -np.inf, 0.0)
    c.nan_in_nan_out()


def check_erf(c: Case) -> None:
    c.within("abs error", c.abs, c.finite, 5e-7)
    c.within("rel error (|x| < 0.875)", c.rel, (np.abs(c.x) < 0.875) & (c.x != 0), 1e-6)
    c.equal("saturation (|x| >= 4)", np.abs(c.x) >= 4, np.sign(c.x))
    c.sign_of_zero_kept()
    c.nan_in_nan_out()


def check_sin(c: Case) -> None:
    c.within(f"abs error (|x| <= {TRIG_RANGE:.1e})", c.abs, np.abs(c.x) <= TRIG_RANGE, 5e-7)
    c.within("|result| <= 1 (any finite x)", np.abs(c.got), c.finite, 1.0)
    c.equal("+-inf", np.isinf(c.x), np.nan)
    c.nan_in_nan_out()


def check_cos(c: Case) -> None:
    check_sin(c)
    c.equal("cos(+-0)", c.x == 0, 1.0)


CHECKS = {"exp": check_exp, "log": check_log, "tanh": check_tanh, "sigmoid": check_sigmoid,
          "erf": check_erf, "sin": lambda c: (check_sin(c), c.sign_of_zero_kept()),
          "cos": check_cos}


@pytest.mark.parametrize("fn", vmath.FUNCS)
def test_accuracy(kernels, inputs, fn):
    for label, x in inputs.items():
        CHECKS[fn](Case(fn, label, x, kernels(fn, x), _reference(fn, label, x)))


@pytest.mark.parametrize("fn", ["tanh", "erf", "sin"])
def test_odd_functions_are_exactly_odd(kernels, fn):
    x = _sweep()
    x = x[np.isfinite(x) & (np.abs(x) <= TRIG_RANGE)]
    np.testing.assert_array_equal(kernels(fn, -x), -kernels(fn, x))


def test_values_named_in_the_spec(kernels):
    x = np.array([1e-5, -1e-5, -100.0, 100.0, 1e4], np.float32)
    assert abs(kernels("tanh", x)[0] / np.tanh(1e-5) - 1) < 1e-6
    sig = kernels("sigmoid", x)
    assert 0 <= sig[2] <= 4e-44 and sig[3] == 1.0
    assert abs(kernels("sin", x)[4] - np.sin(1e4)) <= 5e-7


# -- the IR contract --


@pytest.mark.parametrize("width", [1, 4, 8, 16])
def test_render_defines_every_function_once(width):
    text = vmath.render([width, width])
    v = vec(width)
    for fn in vmath.FUNCS:
        head = f"define internal {v} @lmc_{fn}_v{width}f32({v} %x) alwaysinline"
        assert text.count(head) == 1, fn
        assert vmath.function_name(fn, width) == f"lmc_{fn}_v{width}f32"
    assert "declare" not in text and "load" not in text and "store" not in text
    decls = vmath.intrinsic_declarations([width])
    used = {tok.split("(")[0] for tok in text.split() if tok.startswith("@llvm.")}
    declared = {d.split("@")[1].split("(")[0] for d in decls}
    assert used == {"@" + d for d in declared}
    assert all(d.startswith("declare ") and "\n" not in d for d in decls)


def test_declarations_union_with_other_parts():
    """The fma line is gemm's line verbatim, so a module assembler's set union dedupes it."""
    for width in (8, 16):
        gemm = {line for line in GEMM_INTRINSICS.format(vl=width).splitlines() if line}
        assert gemm & vmath.intrinsic_declarations([width]) == {
            f"declare {vec(width)} @llvm.fma.v{width}f32({vec(width)}, {vec(width)}, {vec(width)})"}
    both = vmath.intrinsic_declarations([8, 16])
    assert both == vmath.intrinsic_declarations([8]) | vmath.intrinsic_declarations([16])


def test_calls_are_inlined_and_unused_functions_dropped():
    text = _module(8, [_loop_kernel("exp", 8, "test_vmath_only_exp")], widths=(4, 8))
    optimized = default_engine().add_ir("test_vmath_inlining", text).optimized_ir
    assert "@lmc_" not in optimized
    calls = [line for line in optimized.splitlines() if " call " in line]
    assert all("@llvm." in line for line in calls), calls


def test_avx512_lowering_has_no_calls():
    """Compile-only (runs nowhere): 16-wide code for an AVX-512 CPU stays in zmm registers."""
    features = host_target().features + ",+avx512f,+avx512dq,+avx512vl,+avx512bw"
    engine = JitEngine(target=HostTarget("znver4", features))
    kernels = [_loop_kernel(fn, 16, f"run_{fn}") for fn in vmath.FUNCS]
    asm = engine.assembly(_module(16, kernels))
    code = [line for line in asm.splitlines() if line.startswith("\t") and
            not line.startswith("\t.")]
    assert not [line for line in code if "call" in line or ("jmp" in line and ".L" not in line)]
    assert sum("zmm" in line for line in code) > 100


def test_bad_names_and_widths_are_clear_errors():
    w = FunctionWriter("void @f()")
    with pytest.raises(vmath.VmathError, match=r"no function 'expm1' \(it has: exp, log"):
        vmath.call(w, "expm1", "%x", 8)
    for width in (0, -8, 8.0, True):
        with pytest.raises(vmath.VmathError, match="positive integer"):
            vmath.render([width])


# -- speed --


def _ns_per_element(fns: list, x: np.ndarray, y: np.ndarray, rounds: int = 7) -> list[float]:
    """Best-of-rounds time per element of each kernel, interleaved so that load from other
    processes hits all of them alike."""
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn(x.ctypes.data, y.ctypes.data, x.size)
            best[i] = min(best[i], time.perf_counter() - start)
    return [b / x.size * 1e9 for b in best]


def test_exp_is_much_faster_than_llvm_exp_intrinsic(rng_seed):
    """llvm.exp.v<W>f32 lowers to one expf call per lane. The goal is >= 5x; measured on the
    2-core AVX2 dev machine (1M floats): vmath 0.35-0.5 ns/elt, llvm.exp 2.4-4.0, ratio 5-15x
    and near 5 only while other processes load the machine. Asserting 3x still catches exp
    falling back to libm or losing its vectors (ratio ~1), without flaking on a busy runner."""
    width = 16 if host_target().has_avx512 else 8
    v = vec(width)
    libm = f"llvm.exp.v{width}f32"
    names = ("test_vmath_speed_fast", "test_vmath_speed_libm")
    text = _module(width, [f"declare {v} @{libm}({v})", _loop_kernel("exp", width, names[0]),
                           _loop_kernel("exp", width, names[1], callee=libm)])
    module = default_engine().add_ir("test_vmath_speed", text)
    fast, slow = (module.function(name, *_SIG) for name in names)
    rng, _ = rng_seed
    x = rng.uniform(-80, 80, 1 << 20).astype(np.float32)
    y = np.empty_like(x)
    t_fast, t_slow = _ns_per_element([fast, slow], x, y)
    np.testing.assert_allclose(y, np.exp(x.astype(np.float64)), rtol=1e-5)  # libm ran last
    assert t_slow >= 3 * t_fast, f"vmath exp {t_fast:.2f} ns/elt, llvm.exp {t_slow:.2f} ns/elt"
