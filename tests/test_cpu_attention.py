"""The CPU backend's flash-style attention kernel against the reference interpreter's
tensor.attention on fresh random inputs: odd sequence lengths and head dims, causal with
Tq != Tk, GQA, bool and additive masks broadcast from several shapes, fully masked rows,
permuted views of one QKV projection, batch rank 1 and 2, 1 and 2 threads, both vector widths."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from lmc.backends.cpu import attention as cpu_attention
from lmc.backends.cpu.attention import attention, compile_attention, render_attention_module
from lmc.backends.cpu.jit import HostTarget, JitEngine, host_target
from lmc.backends.reference.interpreter import IMPL
from lmc.errors import ShapeError

HOST = host_target()
WIDE = cpu_attention.AttentionConfig(vl=16, mr=8, nv=2, ch=2)  # the AVX-512 tiling


@pytest.fixture(params=["host", "other-width"])
def target(request, monkeypatch):
    """Both tilings on any host: the host's own, and the other vector width, which is the AVX2
    target on an AVX-512 host and, on an AVX2 host, the 16-lane tiling as IR that LLVM splits
    into ymm pairs (its block edges, masks and causal diagonal run, though zmm code cannot)."""
    if request.param == "host":
        return None
    if HOST.has_avx512:
        return HOST.without_avx512()
    monkeypatch.setattr(cpu_attention, "default_config", lambda target: WIDE)
    return None


TOL = 1e-5


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


def _rand(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _reference(q, k, v, mask=None, causal=False, scale=None):
    """The interpreter's tensor.attention, in float64."""
    op = SimpleNamespace(causal=causal, scale=scale)
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    if mask is not None and mask.dtype != np.bool_:
        mask = mask.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # fully masked rows: 0/0, then 0
        return IMPL["tensor.attention"](op, None, q, k, v, mask)


def _check(q, k, v, seed, mask=None, *, causal=False, scale=None, **kwargs):
    """Error relative to Σ_j p_ij |v_j| (the reference on |v|), so that cancellation in the
    weighted sum cannot hide or fake an error; fully masked rows (size 0) must be exactly 0."""
    got = attention(q, k, v, mask, causal=causal, scale=scale, **kwargs)
    want = _reference(q, k, v, mask, causal, scale)
    size = _reference(q, k, np.abs(v), mask, causal, scale)
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.max(np.abs(got - want) / np.maximum(size, 1e-30), initial=0.0)
    assert err <= TOL, f"relative error {err:.2e} (seed {seed})"
    return got


def _qkv_views(rng, batch: tuple[int, ...], t: int, hq: int, hkv: int, d: int, dv: int):
    """q, k, v as permuted [..., H, T, D] views of one [..., T, (Hq + Hkv) D + Hkv Dv] array, the
    layout the runtime hands over from a fused QKV projection."""
    width = hq * d + hkv * d + hkv * dv
    x = _rand(rng, *batch, t, width)
    perm = (*range(len(batch)), len(batch) + 1, len(batch), len(batch) + 2)
    cuts = [0, hq * d, hq * d + hkv * d, width]
    parts = []
    for (a, b), h in zip(itertools.pairwise(cuts), (hq, hkv, hkv)):
        parts.append(x[..., a:b].reshape(*batch, t, h, (b - a) // h).transpose(perm))
    return parts


@pytest.mark.parametrize("tq,tk", [(1, 1), (7, 7), (129, 129), (1, 129), (7, 129), (129, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_sizes(target, tq, tk, causal):
    rng, seed = _rng()
    q, k, v = _rand(rng, 2, 3, tq, 64), _rand(rng, 2, 3, tk, 64), _rand(rng, 2, 3, tk, 64)
    _check(q, k, v, seed, causal=causal, target=target)


@pytest.mark.parametrize("d,dv", [(64, 24), (24, 72), (16, 1), (3, 129), (128, 128)])
def test_head_dims(target, d, dv):
    rng, seed = _rng()
    q, k, v = _rand(rng, 1, 2, 37, d), _rand(rng, 1, 2, 45, d), _rand(rng, 1, 2, 45, dv)
    _check(q, k, v, seed, causal=True, target=target)
    _check(q, k, v, seed, scale=0.3, target=target)


@pytest.mark.parametrize("threads", [1, 2])
def test_gqa_on_qkv_projection_views(monkeypatch, target, threads):
    monkeypatch.setattr(cpu_attention, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    q, k, v = _qkv_views(rng, (2,), 33, 8, 2, 24, 16)
    assert not q.flags.c_contiguous and q.strides[-1] == 4
    _check(q, k, v, seed, causal=True, threads=threads, target=target)
    q, k, v = _qkv_views(rng, (2, 3), 20, 4, 4, 16, 16)  # batch rank 2, no GQA
    _check(q, k, v, seed, threads=threads, target=target)
    q, k, v = _qkv_views(rng, (3,), 14, 6, 1, 16, 24)  # multi-query: one kv head
    _check(q, k, v, seed, causal=True, threads=threads, target=target)


@pytest.mark.parametrize("shape", ["tq_tk", "b_1_1_tk", "b_h_tq_tk", "tk_strided"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks(target, shape, kind):
    rng, seed = _rng()
    b, h, tq, tk = 2, 4, 19, 37
    q, k, v = _rand(rng, b, h, tq, 24), _rand(rng, b, 2, tk, 24), _rand(rng, b, 2, tk, 40)
    full = {"tq_tk": (tq, tk), "b_1_1_tk": (b, 1, 1, tk), "b_h_tq_tk": (b, h, tq, tk),
            "tk_strided": (b, h, tq, 2 * tk)}[shape]
    keep = rng.random(full) < 0.7
    if shape == "tk_strided":  # a view with key stride 2: the gathered-mask path
        keep = keep[..., ::2]
    mask = keep if kind == "bool" else np.where(keep, _rand(rng, *keep.shape), -np.inf)
    mask = mask.astype(np.float32) if kind == "additive" else mask
    _check(q, k, v, seed, mask, target=target)
    _check(q, k, v, seed, mask, causal=True, target=target)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_are_zero(target, kind):
    rng, seed = _rng()
    q, k, v = _rand(rng, 2, 2, 9, 16), _rand(rng, 2, 2, 40, 16), _rand(rng, 2, 2, 40, 16)
    keep = rng.random((2, 1, 9, 40)) < 0.5
    keep[0, :, 3] = False
    keep[1, :, :, :33] = False  # rows whose first key blocks are all masked, then some keys
    mask = keep if kind == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
    got = _check(q, k, v, seed, mask, target=target)
    assert (got[0, :, 3] == 0).all()
    # Tq > Tk with causal: the first Tq - Tk rows see no key at all.
    got = _check(_rand(rng, 1, 2, 20, 16), k[:1, :, :7], v[:1, :, :7], seed, causal=True,
                 target=target)
    assert (got[:, :, :13] == 0).all()


def test_strided_inputs_and_out(target):
    rng, seed = _rng()
    q = _rand(rng, 3, 2, 30, 50)[::2, :, 1::2, 5:29]  # [2, 2, 15, 24], every stride odd
    k = np.asfortranarray(_rand(rng, 2, 2, 23, 24))  # head dim not unit-stride
    v = _rand(rng, 2, 2, 23, 64)[..., ::2]  # [2, 2, 23, 32], head dim stride 2
    out = np.full((2, 2, 15, 64), np.nan, np.float32)[..., ::2]  # strided out
    got = _check(q, k, v, seed, causal=True, out=out, target=target)
    assert got is out
    kb = np.broadcast_to(_rand(rng, 1, 1, 23, 24), (2, 2, 23, 24))  # stride-0 batch and head
    _check(q, kb, v, seed, target=target)
    # Negative strides everywhere: reversed batch, heads, time and head dims.
    _check(q[::-1, ::-1, ::-1, ::-1], k[::-1, :, ::-1, ::-1], v[:, ::-1, ::-1, ::-1], seed,
           causal=True, target=target)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_split_covers_every_item(monkeypatch, threads):
    monkeypatch.setattr(cpu_attention, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    cfg = compile_attention(16, 16, "none").config
    for n_bh, tq, tk, causal in [(1, 129, 129, True), (5, 7, 300, False), (3, 1, 1, True),
                                 (2, 200, 50, True)]:
        ranges = cpu_attention._partition(n_bh, tq, tk, causal, cfg, 32, threads)
        items = n_bh * -(-tq // cfg.mr)
        assert ranges[0][0] == 0 and ranges[-1][1] == items
        assert all(a < b for a, b in ranges)
        assert all(r[1] == s[0] for r, s in itertools.pairwise(ranges))
        assert len(ranges) == min(threads, items)
    rng, seed = _rng()
    q, k, v = _rand(rng, 1, 1, 129, 16), _rand(rng, 1, 1, 129, 16), _rand(rng, 1, 1, 129, 16)
    _check(q, k, v, seed, causal=True, threads=threads)


def test_causal_split_balances_work(monkeypatch):
    monkeypatch.setattr(cpu_attention, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    cfg = compile_attention(16, 16, "none").config
    (_, b), (c, d) = cpu_attention._partition(1, 1024, 1024, True, cfg, 32, 2)
    # Later q-blocks see more keys, so the first thread gets well over half of the blocks.
    assert b == c and 0.65 < b / d < 0.75


def test_nan_reaches_the_rows_it_touches(target):
    """A NaN in q or k makes the rows whose scores it enters NaN, as in torch; the others match
    the reference. (The interpreter's nan_to_num, meant for fully masked rows, turns such rows
    into zeros instead.)"""
    rng, seed = _rng()
    q, k, v = _rand(rng, 1, 2, 9, 16), _rand(rng, 1, 2, 9, 16), _rand(rng, 1, 2, 9, 16)
    q[0, 0, 3, 5] = np.nan
    k[0, 1, 4, 2] = np.nan  # causal: reaches rows 4.. of head 1
    got = attention(q, k, v, causal=True, target=target)
    hit = np.zeros(got.shape, bool)
    hit[0, 0, 3], hit[0, 1, 4:] = True, True
    np.testing.assert_array_equal(np.isnan(got), hit)
    want = _reference(q, k, v, causal=True)
    np.testing.assert_allclose(got[~hit], want[~hit], rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")


def test_empty_and_zero_keys():
    q = np.ones((2, 3, 0, 8), np.float32)
    assert attention(q, np.ones((2, 3, 5, 8), np.float32),
                     np.ones((2, 3, 5, 4), np.float32)).shape == (2, 3, 0, 4)
    got = attention(np.ones((1, 2, 3, 8), np.float32), np.ones((1, 2, 0, 8), np.float32),
                    np.ones((1, 2, 0, 4), np.float32))
    assert got.shape == (1, 2, 3, 4) and (got == 0).all()


def test_shape_errors():
    q, k = np.zeros((1, 4, 5, 8), np.float32), np.zeros((1, 3, 5, 8), np.float32)
    with pytest.raises(ShapeError, match="do not fit"):
        attention(q, k, k)  # 3 kv heads do not divide 4 query heads
    with pytest.raises(ShapeError, match="float32"):
        attention(q.astype(np.float64), q, q)
    with pytest.raises(ShapeError, match="broadcast"):
        attention(q, q, q, np.ones((3, 5), bool))
    with pytest.raises(ShapeError, match="bool or float32"):
        attention(q, q, q, np.ones((5, 5), np.int32))
    with pytest.raises(ShapeError, match="out"):
        attention(q, q, q, out=np.zeros((1, 4, 5, 7), np.float32))
    with pytest.raises(ShapeError, match="mask kind"):
        compile_attention(8, 8, "float")


def test_kernel_text_uses_vmath_and_is_cached():
    kernel = compile_attention(24, 40, "additive")
    vl = kernel.config.vl
    assert compile_attention(24, 40, "additive") is kernel
    assert f"@lmc_exp_v{vl}f32" in kernel.llvm_ir and "@llvm.exp." not in kernel.llvm_ir
    assert kernel.entry in kernel.llvm_ir


def test_avx512_code_generates():
    """The AVX-512 kernel compiles to zmm code even on a host that cannot run it."""
    feats = ",".join(f"+{f[1:]}" if f[1:] in ("avx512f", "avx512vl", "avx512bw", "avx512dq")
                     else f for f in HOST.features.split(","))
    target = HostTarget("znver4", feats)
    cfg = cpu_attention.default_config(target)
    assert cfg.vl == 16
    _, texts = render_attention_module(cfg, 64, 72, "bool")
    asm = "".join(JitEngine(target=target).assembly(text) for text in texts)
    assert "zmm" in asm and "vfmadd" in asm


def test_default_scale_is_inverse_sqrt_head_dim():
    rng, seed = _rng()
    q, k, v = _rand(rng, 1, 1, 5, 16), _rand(rng, 1, 1, 6, 16), _rand(rng, 1, 1, 6, 16)
    got = attention(q, k, v)
    np.testing.assert_allclose(got, attention(q, k, v, scale=1 / math.sqrt(16)), rtol=1e-6,
                               err_msg=f"seed {seed}")
    assert not np.allclose(got, attention(q, k, v, scale=1.0), rtol=1e-3)
