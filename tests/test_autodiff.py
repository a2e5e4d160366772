"""Every gradient rule of `autodiff` (passes/vjp.py), one op at a time: against torch.autograd
(fp32, ≤ 1e-4 relative) and against central finite differences in float64.

Each case of tests/op_cases.py whose op has a VJP becomes `loss = Σ sum(out_i · r_i)` over its
float results (r_i fresh random inputs), differentiated by `autodiff{inputs=true}` and run by the
reference interpreter. Inputs come from the case's maker, moved away from the points where the
op is not differentiable (relu/abs at 0, ties of max/min/topk, jumps of mod): the explicit tie
tests below pin lmc's convention there (torch's). The whole-model tests are in
test_autodiff_models.py.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from op_cases import CASES, SEED, STRUCTURAL, Case, build, fused_module

from lmc.backends.reference.interpreter import run_func
from lmc.errors import PipelineError, UnsupportedOpError
from lmc.ir import parse
from lmc.ir.core import Module
from lmc.ir.ops import OPS
from lmc.ir.rewriter import Rewriter
from lmc.ir.verifier import verify
from lmc.pass_manager import PassManager
from lmc.passes.autodiff import CHECKPOINT_POLICIES
from lmc.passes.vjp import NO_GRAD, VJP

PIPELINE = "autodiff{inputs=true},canonicalize,cse,dce"
LOW_PRECISION = ("float16", "bfloat16")


# ---- harness -----------------------------------------------------------------------------------

def is_float(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" or x.dtype.name == "bfloat16"


def attach_weighted_loss(m: Module) -> int:
    """Replace @main's results by `Σ sum(out_i · r_i)` over its float results, each r_i a new
    input appended after the others; returns how many r inputs were added."""
    f = m.main
    ret = f.return_op
    outs = [v for v in f.outputs if v.dtype.is_float]
    assert outs, "no float result to differentiate"
    rw = Rewriter(f.body, ret)
    loss = None
    for i, out in enumerate(outs):
        r = f.add_arg(out.type, f"r{i}")
        term = rw.value("tensor.sum", rw.value("tensor.mul", out, r))
        loss = term if loss is None else rw.value("tensor.add", loss, term)
    rw.erase_op(ret)
    Rewriter(f.body).create("func.return", [loss])
    return len(outs)


def draw_weights(c: Case, xs: list[np.ndarray], rng) -> list[np.ndarray]:
    """Random r arrays shaped like the case's float results at these inputs; zero where a
    result is ±inf (log_softmax of -inf), so that the loss stays finite."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        outs = [y for y in run_func(build(c, xs), xs) if is_float(y)]
    return [np.where(np.isfinite(y), rng.standard_normal(y.shape), 0.0).astype(y.dtype)
            for y in outs]


def lmc_grads(c: Case, xs: list[np.ndarray], rs: list[np.ndarray]) -> list[np.ndarray]:
    """The gradients autodiff computes for the float operands of the case, in operand order."""
    m = build(c, xs)
    attach_weighted_loss(m)
    PassManager.from_pipeline(PIPELINE).run(m)
    verify(m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        outs = run_func(m, xs + rs)
    grads = outs[1:1 + sum(map(is_float, xs))]
    for g, x in zip(grads, [x for x in xs if is_float(x)]):
        assert g.shape == x.shape and g.dtype == x.dtype, (c.id, g.shape, g.dtype, x.shape)
    return grads


def lmc_loss(c: Case, xs: list[np.ndarray], rs: list[np.ndarray]) -> float:
    """The loss from the forward op alone; entries with r = 0 (±inf results) are left out."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        outs = [y for y in run_func(build(c, xs), xs) if is_float(y)]
        return sum(float(np.sum(np.where(r == 0, 0.0, y * r))) for y, r in zip(outs, rs))


def _to_torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype.name == "bfloat16":
        x = x.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.double().requires_grad_() if t.is_floating_point() else t


# torch's own backward rejects a scatter src larger than the index: slice src first.
GRAD_REF = {"scatter_small_src": lambda x, i, s: torch.scatter(
    x, 1, i, s[:i.shape[0], :i.shape[1]])}


def torch_grads(c: Case, xs: list[np.ndarray], rs: list[np.ndarray]) -> list[np.ndarray]:
    """torch.autograd's gradients of the same loss on the case's reference, in float64."""
    ts = [_to_torch(x) for x in xs]
    out = GRAD_REF.get(c.id, c.ref)(*ts)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if o.is_floating_point()]
    loss = sum((o.double() * torch.from_numpy(r.astype(np.float64))).sum()
               for o, r in zip(outs, rs))
    wrt = [t for t in ts if t.is_floating_point()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [np.zeros(t.shape) if g is None else g.numpy() for t, g in zip(wrt, grads)]


def assert_grads_close(got, want, where: str, rtol: float, atol_frac: float) -> None:
    """Elementwise `rtol`, plus an absolute slack of `atol_frac` · max|grad| of the tensor for
    the entries that cancel to (nearly) zero."""
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
        g = g.astype(np.float64)
        atol = atol_frac * float(np.max(np.abs(w), initial=0.0)) + 1e-12
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol,
                                   err_msg=f"{where}: gradient of float operand {i}")


# ---- inputs away from non-differentiable points ------------------------------------------------

def _away_from_zero(x):
    return np.where(x >= 0, x + 0.1, x - 0.1).astype(x.dtype)


def _distinct(x):
    """Same ordering, but neighbours at least 0.05 apart: no ties for max/min/topk."""
    flat = x.reshape(-1)
    ranks = np.argsort(np.argsort(flat, kind="stable"), kind="stable")
    return ((ranks - flat.size / 2) * 0.05).reshape(x.shape).astype(x.dtype)


def _apart(a, b):
    """b moved so that no pair of (broadcast) entries of a, b is within 0.05 of a tie."""
    close = np.abs(a - b) < 0.05
    return a, np.where(close, b + 0.1, b).astype(b.dtype)


def _off_jumps(a, c):
    """a moved so that a / c is not near an integer (where floor(a / c) jumps)."""
    frac = a / c - np.floor(a / c)
    near = (frac < 0.05) | (frac > 0.95)
    return np.where(near, a + 0.1 * c, a).astype(a.dtype), c


SMOOTHING = {
    "tensor.relu": lambda x: [_away_from_zero(x)],
    "tensor.abs": lambda x: [_away_from_zero(x)],
    "tensor.max": lambda x: [_distinct(x)],
    "tensor.min": lambda x: [_distinct(x)],
    "tensor.topk": lambda x: [_distinct(x)],
    "tensor.maximum": lambda a, b: list(_apart(a, b)),
    "tensor.minimum": lambda a, b: list(_apart(a, b)),
    "tensor.mod": lambda a, c: list(_off_jumps(a, c)),
    "tensor.div": lambda a, c: [a, _away_from_zero(c)],  # finite differences need |c| ≫ h
}


def smooth_inputs(c: Case) -> list[np.ndarray]:
    xs = [np.asarray(x) for x in c.make(c.rng())]
    if c.op in SMOOTHING:
        xs = SMOOTHING[c.op](*xs)
    for x in xs:  # a row of -inf alone is NaN forward (as torch); give it finite scores
        if is_float(x) and x.ndim:
            x[np.all(np.isneginf(x), axis=-1)] = 0.5
    return xs


def _has_float_result(c: Case) -> bool:
    if c.op == "tensor.cast":
        return c.attrs["dtype"].is_float
    return c.op not in NO_GRAD


GRAD_CASES = [c for c in CASES if c.op in VJP and _has_float_result(c)
              and any(is_float(np.asarray(x)) for x in c.make(c.rng()))]

# Known bugs of the reverse walk (passes/autodiff.py), not of a rule: strict, so that the fix
# shows up as an XPASS failure and the mark gets removed.
WALK_BUGS: dict[str, str] = {}  # case id → why the walk gets it wrong (xfail, strict)


def params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=WALK_BUGS[
        c.id])] if c.id in WALK_BUGS else []) for c in cases]


# ---- 1. every rule against torch.autograd (fp32) -----------------------------------------------

@pytest.mark.parametrize("c", params(GRAD_CASES))
def test_gradient_matches_torch(c: Case):
    xs = smooth_inputs(c)
    rs = draw_weights(c, xs, np.random.default_rng([SEED, 7]))
    low = any(x.dtype.name in LOW_PRECISION for x in xs + rs)
    rtol, atol = (3e-2, 1e-2) if low else (1e-4, 1e-5)
    assert_grads_close(lmc_grads(c, xs, rs), torch_grads(c, xs, rs),
                       f"case {c.id} (LMC_TEST_SEED={SEED})", rtol, atol)


# ---- 2. every rule against finite differences (float64) ----------------------------------------

def as_f64(c: Case) -> Case:
    """The case with every float operand and type in float64."""
    def to64(text):
        for name in ("bf16", "f16", "f32"):
            text = text.replace(name + "[", "f64[")
        return text

    def make(rng):
        return [x.astype(np.float64) if is_float(np.asarray(x)) else x for x in c.make(rng)]
    return dataclasses.replace(
        c, make=make, arg_types=c.arg_types and [to64(t) for t in c.arg_types],
        result_types=c.result_types and [to64(t) for t in c.result_types])


# Casts to another float type round through it; only f32 → f64 stays exact in float64.
FD_CASES = [as_f64(c) for c in GRAD_CASES
            if c.op != "tensor.cast" or c.attrs["dtype"].name == "f64"]


@pytest.mark.parametrize("c", params(FD_CASES))
def test_gradient_matches_finite_differences(c: Case):
    """⟨grad, v⟩ against (L(x + hv) − L(x − hv)) / 2h for two random directions v."""
    xs = smooth_inputs(c)
    rng = np.random.default_rng([SEED, 11])
    rs = draw_weights(c, xs, rng)
    grads = lmc_grads(c, xs, rs)
    where = f"case {c.id} in float64 (LMC_TEST_SEED={SEED})"
    assert_grads_close(grads, torch_grads(c, xs, rs), where, 1e-9, 1e-10)
    h = 1e-6
    for _ in range(2):
        vs = [np.where(np.isfinite(x), rng.standard_normal(x.shape), 0.0) if is_float(x)
              else None for x in xs]
        plus, minus = ([x if v is None else x + s * v for x, v in zip(xs, vs)] for s in (h, -h))
        fd = (lmc_loss(c, plus, rs) - lmc_loss(c, minus, rs)) / (2 * h)
        terms = [g * v for g, v in zip(grads, [v for v in vs if v is not None])]
        dot = sum(float(np.sum(t)) for t in terms)
        scale = sum(float(np.sum(np.abs(t))) for t in terms)
        assert abs(fd - dot) <= 1e-6 * scale + 1e-9, f"{where}: finite difference {fd}, " \
                                                     f"autodiff {dot}"


# ---- 3. coverage -------------------------------------------------------------------------------

def test_every_op_has_a_rule_or_is_declared_without_gradient():
    missing = sorted(set(OPS) - set(VJP) - NO_GRAD - STRUCTURAL)
    assert not missing, f"ops with neither a VJP rule nor a NO_GRAD entry: {missing}"
    assert not set(VJP) & NO_GRAD


def test_every_rule_is_exercised_by_a_case():
    untested = sorted(set(VJP) - {c.op for c in GRAD_CASES})
    assert not untested, f"VJP rules without a gradient case in op_cases.py: {untested}"


def test_kernel_fused_is_inlined_and_differentiated():
    m = fused_module()  # kernel.fused { exp(x + y), x * y }
    attach_weighted_loss(m)
    PassManager.from_pipeline(PIPELINE).run(m)
    assert "kernel.fused" not in m.op_counts()
    rng = np.random.default_rng([SEED, 3])
    x, y = rng.standard_normal((7, 13)), rng.standard_normal(13)
    r0, r1 = rng.standard_normal((7, 13)), rng.standard_normal((7, 13))
    x, y, r0, r1 = (a.astype(np.float32) for a in (x, y, r0, r1))
    _, dx, dy, *_ = run_func(m, [x, y, r0, r1])
    tx, ty = (torch.from_numpy(a).double().requires_grad_() for a in (x, y))
    loss = (torch.exp(tx + ty) * torch.from_numpy(r0)).sum() + (tx * ty * torch.from_numpy(
        r1)).sum()
    want = torch.autograd.grad(loss, [tx, ty])
    assert_grads_close([dx, dy], [w.numpy() for w in want], "kernel.fused", 1e-4, 1e-5)


# ---- 4. the special cases the per-op table does not pin down -----------------------------------

def grads_of(text: str, *inputs, pipeline: str = PIPELINE) -> list[np.ndarray]:
    """Parse `text` (output 0 = the loss), differentiate, run; returns the input gradients."""
    m = parse(text)
    PassManager.from_pipeline(pipeline).run(m)
    outs = run_func(m, [np.asarray(x) for x in inputs])
    return outs[m.meta["autodiff"]["num_outputs"]:]


def _t(x):
    return torch.from_numpy(np.asarray(x)).double().requires_grad_()


def test_maximum_minimum_ties_split_the_gradient_as_torch():
    a = np.float32([1.0, 2.0, 3.0, -1.0, 0.5])
    b = np.float32([1.0, 1.0, 4.0, -1.0, 0.5])
    r = np.float32([1.0, 2.0, 3.0, 4.0, 5.0])
    for name, fn in (("maximum", torch.maximum), ("minimum", torch.minimum)):
        got = grads_of(f"""func @main(%a: f32[5], %b: f32[5], %r: f32[5]) -> (f32[]) {{
  %0 = tensor.{name} %a, %b : f32[5]
  %1 = tensor.mul %0, %r : f32[5]
  %2 = tensor.sum %1 : f32[]
  func.return %2
}}""", a, b, r)[:2]
        ta, tb = _t(a), _t(b)
        want = torch.autograd.grad((fn(ta, tb) * _t(r)).sum(), [ta, tb])
        np.testing.assert_allclose(got[0], want[0].numpy(), err_msg=name)
        np.testing.assert_allclose(got[1], want[1].numpy(), err_msg=name)


@pytest.mark.parametrize("name,fn", [("max", torch.amax), ("min", torch.amin)])
def test_max_min_reduction_ties_share_the_gradient_as_torch(name, fn):
    x = np.float32([[3.0, 1.0, 3.0, 3.0], [-2.0, -2.0, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    r = np.float32([1.5, -2.0, 3.0])
    got = grads_of(f"""func @main(%x: f32[3,4], %r: f32[3]) -> (f32[]) {{
  %0 = tensor.{name} %x {{axes = [1]}} : f32[3]
  %1 = tensor.mul %0, %r : f32[3]
  %2 = tensor.sum %1 : f32[]
  func.return %2
}}""", x, r)[0]
    tx = _t(x)
    (want,) = torch.autograd.grad((fn(tx, dim=1) * _t(r)).sum(), [tx])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


QKV_SPLIT = """func @main(%x: f32[3,12], %r: f32[3,4]) -> (f32[]) {
  %0 = tensor.slice %x {axis = 1, start = 0, end = 4} : f32[3,4]
  %1 = tensor.slice %x {axis = 1, start = 4, end = 8} : f32[3,4]
  %2 = tensor.slice %x {axis = 1, start = -4} : f32[3,4]
  %3 = tensor.mul %0, %1 : f32[3,4]
  %4 = tensor.sub %3, %2 : f32[3,4]
  %5 = tensor.mul %4, %r : f32[3,4]
  %6 = tensor.sum %5 : f32[]
  func.return %6
}"""


def _split_inputs(seed):
    rng = np.random.default_rng([SEED, seed])
    return rng.standard_normal((3, 12)).astype(np.float32), rng.standard_normal(
        (3, 4)).astype(np.float32)


def test_unit_slices_of_one_tensor_become_one_concat():
    """The q/k/v split (the last slice with a negative start): one concat, no scatter."""
    m = parse(QKV_SPLIT)
    PassManager.from_pipeline(PIPELINE).run(m)
    counts = m.op_counts()
    assert counts.get("tensor.concat") == 1 and "tensor.scatter" not in counts, counts
    x, r = _split_inputs(5)
    tx = _t(x)
    loss = ((tx[:, 0:4] * tx[:, 4:8] - tx[:, -4:]) * _t(r)).sum()
    (want,) = torch.autograd.grad(loss, [tx])
    assert_grads_close([run_func(m, [x, r])[1]], [want.numpy()], "q/k/v split", 1e-5, 1e-6)


def test_overlapping_and_strided_slices_sum_their_gradients():
    text = QKV_SPLIT.replace("%6 = tensor.sum %5 : f32[]", """\
%7 = tensor.slice %x {axis = 1, start = 1, end = 9, step = 2} : f32[3,4]
  %8 = tensor.slice %x {axis = 1, start = 2, end = 6} : f32[3,4]
  %9 = tensor.mul %5, %7 : f32[3,4]
  %10 = tensor.mul %9, %8 : f32[3,4]
  %6 = tensor.sum %10 : f32[]""")
    m = parse(text)
    PassManager.from_pipeline(PIPELINE).run(m)
    x, r = _split_inputs(6)
    tx = _t(x)
    loss = ((tx[:, 0:4] * tx[:, 4:8] - tx[:, -4:]) * _t(r) * tx[:, 1:9:2] * tx[:, 2:6]).sum()
    (want,) = torch.autograd.grad(loss, [tx])
    assert_grads_close([run_func(m, [x, r])[1]], [want.numpy()], "slices", 1e-5, 1e-6)


@pytest.mark.parametrize("start,end", [(-1, None), (-3, None), (-3, -1)])
def test_slices_from_the_back_of_a_symbolic_dim(start, end):
    """x[:, -1] (the last token) and x[:, -3:-1] of f32[B,T,5], at two lengths."""
    attrs = f"axis = 1, start = {start}" + ("" if end is None else f", end = {end}")
    size = (-start if end is None else end - start)
    text = f"""func @main(%x: f32[B,T,5], %r: f32[B,{size},5]) -> (f32[]) {{
  %0 = tensor.slice %x {{{attrs}}} : f32[B,{size},5]
  %1 = tensor.mul %0, %r : f32[B,{size},5]
  %2 = tensor.sum %1 : f32[]
  func.return %2
}}"""
    m = parse(text)
    PassManager.from_pipeline(PIPELINE).run(m)
    rng = np.random.default_rng([SEED, 8])
    for b, t in ((2, 4), (3, 9)):
        x = rng.standard_normal((b, t, 5)).astype(np.float32)
        r = rng.standard_normal((b, size, 5)).astype(np.float32)
        want = np.zeros_like(x)
        want[:, start:end] = r
        np.testing.assert_array_equal(run_func(m, [x, r])[1], want)


def test_mean_over_symbolic_dims_at_two_sizes():
    text = """func @main(%x: f32[B,T,7], %r: f32[7]) -> (f32[]) {
  %0 = tensor.mean %x {axes = [0, 1]} : f32[7]
  %1 = tensor.mul %0, %r : f32[7]
  %2 = tensor.sum %1 : f32[]
  func.return %2
}"""
    m = parse(text)
    PassManager.from_pipeline(PIPELINE).run(m)
    rng = np.random.default_rng([SEED, 9])
    r = rng.standard_normal(7).astype(np.float32)
    for b, t in ((2, 3), (5, 11)):
        x = rng.standard_normal((b, t, 7)).astype(np.float32)
        dx = run_func(m, [x, r])[1]
        np.testing.assert_allclose(dx, np.broadcast_to(r / (b * t), x.shape), rtol=1e-6)


def test_attention_mask_gradient_on_the_additive_mask():
    """An additive float mask is an input like any other: it gets dS summed to its shape."""
    c = next(c for c in CASES if c.id == "attention_float_mask")
    xs = smooth_inputs(c)
    rs = draw_weights(c, xs, np.random.default_rng([SEED, 13]))
    got, want = lmc_grads(c, xs, rs), torch_grads(c, xs, rs)
    assert len(got) == 4 and got[3].shape == xs[3].shape
    assert_grads_close(got[3:], want[3:], "attention mask", 1e-4, 1e-5)


# ---- 5. errors ---------------------------------------------------------------------------------

ONE_SIN = """func @main(%x: f32[7] {param}) -> (f32[]) {
  %0 = tensor.sin %x : f32[7]  loc("blocks.0.act" "model.py":12)
  %1 = tensor.sum %0 : f32[]
  func.return %1
}"""


def test_an_op_without_a_rule_is_named_with_its_location(monkeypatch):
    monkeypatch.delitem(VJP, "tensor.sin")
    with pytest.raises(UnsupportedOpError) as e:
        PassManager.from_pipeline("autodiff").run(parse(ONE_SIN, {"x": np.ones(7, np.float32)}))
    text = str(e.value)
    assert "tensor.sin" in text and "blocks.0.act" in text and "model.py" in text, text
    assert "gradient" in text, text


@pytest.mark.parametrize("ret,why", [("f32[7]", "f32[7]"), ("i64[]", "i64[]")])
def test_a_non_scalar_or_integer_output_0_is_a_pipeline_error(ret, why):
    body = "%0 = tensor.exp %x : f32[7]" if ret == "f32[7]" else \
        "%0 = tensor.argmax %x : i64[]"
    text = f"""func @main(%x: f32[7], %w: f32[7] {{param}}) -> ({ret}) {{
  {body}
  func.return %0
}}"""
    m = parse(text, {"w": np.zeros(7, np.float32)})
    with pytest.raises(PipelineError, match=r"float scalar loss.*" + re.escape(why)):
        PassManager.from_pipeline("autodiff").run(m)


def test_an_unknown_checkpoint_policy_is_a_pipeline_error():
    with pytest.raises(PipelineError, match=", ".join(CHECKPOINT_POLICIES)):
        PassManager.from_pipeline("autodiff{checkpoint=some}").run(
            parse(ONE_SIN, {"x": np.ones(7, np.float32)}))


def test_a_param_that_does_not_reach_the_loss_gets_zeros():
    text = """func @main(%x: f32[3], %w: f32[3] {param}, %u: f32[2,3] {param}) -> (f32[]) {
  %0 = tensor.mul %x, %w : f32[3]
  %1 = tensor.sum %0 : f32[]
  func.return %1
}"""
    m = parse(text, {"w": np.ones(3, np.float32), "u": np.ones((2, 3), np.float32)})
    PassManager.from_pipeline("autodiff,canonicalize,cse,dce").run(m)
    x = np.float32([1.0, -2.0, 0.5])
    loss, dw, du = run_func(m, [x])
    assert m.meta["autodiff"] == {"num_outputs": 1, "params": ["w", "u"], "unreached": ["u"]}
    np.testing.assert_array_equal(dw, x)
    np.testing.assert_array_equal(du, np.zeros((2, 3), np.float32))
    assert math.isclose(float(loss), float(x.sum()))
