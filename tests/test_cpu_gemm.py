"""The CPU backend's JIT fp32 GEMM against numpy (float64) on fresh random inputs: odd sizes,
B transposed, bias/ReLU epilogues, strided views, accumulation, both code paths (AVX-512, AVX2),
and small cache blocks so that every blocking loop and edge runs at small sizes."""
from __future__ import annotations

import numpy as np
import pytest

from backends.cpu import GemmConfig, Relu, compile_gemm, host_target, sgemm
from backends.cpu import threads as cpu_threads
from lmc.errors import ShapeError

# Tiny blocks: K, M and N each span several KC/MC/NC blocks already at sizes ~100.
SMALL_BLOCKS = GemmConfig(vl=8, mr=6, nv=2, kc=16, mc=12, nc=32)
TOL = 1e-4


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


def _rand(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _check(got, a, b, seed, *, bias=None, c0=None, alpha=1.0, beta=0.0, relu=False):
    """Error relative to |alpha| |A| |B| + |beta C0| + |bias|, so cancellation cannot hide it."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref, scale = alpha * (a64 @ b64), abs(alpha) * (np.abs(a64) @ np.abs(b64))
    if c0 is not None:
        ref, scale = ref + beta * c0, scale + abs(beta * c0)
    if bias is not None:
        ref, scale = ref + bias, scale + np.abs(bias)
    if relu:
        ref = np.maximum(ref, 0)
    err = np.max(np.abs(got - ref) / np.maximum(scale, 1e-30), initial=0.0)
    assert err <= TOL, f"relative error {err:.2e} (seed {seed})"


SHAPES = [(1, 1, 1), (7, 7, 7), (13, 13, 13), (129, 129, 129), (255, 255, 255), (513, 513, 513),
          (1, 300, 17), (300, 1, 17), (600, 40, 300), (5, 33, 1000), (130, 7, 64), (17, 515, 40),
          (96, 64, 1)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_sizes(m, n, k, threads):
    rng, seed = _rng()
    a, b = _rand(rng, m, k), _rand(rng, k, n)
    _check(sgemm(a, b, threads=threads), a, b, seed)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 13, 5), (129, 255, 513), (64, 48, 300)])
def test_transposed_b_and_bias(m, n, k):
    rng, seed = _rng()
    a, wt, bias = _rand(rng, m, k), _rand(rng, n, k), _rand(rng, n)
    _check(sgemm(a, wt, trans_b=True), a, wt.T, seed)
    _check(sgemm(a, wt, trans_b=True, bias=bias), a, wt.T, seed, bias=bias)
    _check(sgemm(a, wt.T, bias=bias), a, wt.T, seed, bias=bias)  # a strided (non-unit col) B


def test_relu_epilogue_after_full_k_sum():
    rng, seed = _rng()
    a, b, bias = _rand(rng, 37, 100), _rand(rng, 100, 45), _rand(rng, 45)
    # Several K blocks: ReLU must apply once, to the final sum, not per K slice.
    got = sgemm(a, b, bias=bias, epilogue=(Relu(),), config=SMALL_BLOCKS)
    _check(got, a, b, seed, bias=bias, relu=True)
    assert (got >= 0).all()


def test_strided_views():
    rng, seed = _rng()
    big_a, big_b = _rand(rng, 300, 200), _rand(rng, 150, 400)
    a, b = big_a[1::2, 3:150:2][:, :70], big_b[::2, 7::3][:70]  # [150, 70] @ [70, 131]
    _check(sgemm(a, b), a, b, seed)
    _check(sgemm(a[::-1], b[:, ::-1]), a[::-1], b[:, ::-1], seed)  # negative strides
    _check(sgemm(np.asfortranarray(a), np.asfortranarray(b)), a, b, seed)
    c = np.zeros((a.shape[0], b.shape[1] * 2), np.float32)[:, ::2]  # out with column stride 2
    _check(sgemm(a, b, out=c), a, b, seed)


@pytest.mark.parametrize("config", [None, SMALL_BLOCKS], ids=["default", "small-blocks"])
def test_accumulate_into_out(config):
    rng, seed = _rng()
    a, b, bias = _rand(rng, 77, 129), _rand(rng, 129, 61), _rand(rng, 61)
    big = _rand(rng, 90, 70)
    c0 = big[5:82, 3:64].copy()
    out = big[5:82, 3:64]  # a view with ldc != N
    got = sgemm(a, b, out=out, alpha=0.5, beta=1.0, bias=bias, config=config)
    assert got is out
    _check(out, a, b, seed, bias=bias, c0=c0, alpha=0.5, beta=1.0)
    before = big.copy()
    sgemm(a, b, out=out, beta=-2.0, config=config)
    _check(out, a, b, seed, c0=before[5:82, 3:64], beta=-2.0)
    outside = np.ones_like(big, bool)
    outside[5:82, 3:64] = False
    np.testing.assert_array_equal(big[outside], before[outside])


def test_beta_zero_ignores_garbage_in_out():
    rng, seed = _rng()
    a, b = _rand(rng, 20, 9), _rand(rng, 9, 35)
    out = np.full((20, 35), np.nan, np.float32)
    _check(sgemm(a, b, out=out), a, b, seed)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (13, 29, 37), (129, 100, 255), (40, 70, 33)])
def test_small_blocks_all_edges(m, n, k):
    rng, seed = _rng()
    a, b, bias = _rand(rng, m, k), _rand(rng, k, n), _rand(rng, n)
    _check(sgemm(a, b, bias=bias, config=SMALL_BLOCKS, threads=2), a, b, seed, bias=bias)
    _check(sgemm(a, b.T.copy(), trans_b=True, config=SMALL_BLOCKS), a, b, seed)


@pytest.mark.parametrize("m,n,k", [(50, 130, 70), (130, 50, 70), (7, 200, 9), (200, 7, 9)])
def test_forced_thread_split(monkeypatch, m, n, k):
    """Split small problems across 2 threads, along N (n >= m) and along M, with edge blocks."""
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    blocks = cpu_threads.partition(m, n, k, SMALL_BLOCKS, 2)
    assert len(blocks) == 2
    rng, seed = _rng()
    a, b, bias = _rand(rng, m, k), _rand(rng, k, n), _rand(rng, n)
    for config in (None, SMALL_BLOCKS):
        _check(sgemm(a, b, bias=bias, threads=2, config=config), a, b, seed, bias=bias)


def test_partition_covers_output_once():
    cfg = SMALL_BLOCKS
    for m, n in [(1000, 3000), (3000, 1000), (6, 5000), (1, 1)]:
        covered = np.zeros((m, n), int)
        for m0, m1, n0, n1 in cpu_threads.partition(m, n, 4096, cfg, 3):
            covered[m0:m1, n0:n1] += 1
            assert (n0 % cfg.nr == 0) and (m0 % cfg.mr == 0)
        assert (covered == 1).all()


@pytest.mark.skipif(not host_target().has_avx512, reason="host already runs the AVX2 path")
@pytest.mark.parametrize("m,n,k", [(7, 13, 5), (129, 255, 513), (33, 17, 64)])
def test_avx2_code_path(m, n, k):
    rng, seed = _rng()
    target = host_target().without_avx512()
    a, b, bias = _rand(rng, m, k), _rand(rng, k, n), _rand(rng, n)
    _check(sgemm(a, b, bias=bias, target=target), a, b, seed, bias=bias)
    assert compile_gemm(target=target).config.vl == 8


def test_k_zero_and_empty():
    out = np.ones((3, 4), np.float32)
    bias = np.arange(4, dtype=np.float32)
    got = sgemm(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), out=out, beta=2.0,
                bias=bias)
    np.testing.assert_array_equal(got, np.broadcast_to(2.0 + bias, (3, 4)))
    assert sgemm(np.zeros((0, 5), np.float32), np.zeros((5, 4), np.float32)).shape == (0, 4)


def test_shape_errors():
    with pytest.raises(ShapeError, match="inner dimensions"):
        sgemm(np.zeros((3, 4), np.float32), np.zeros((5, 6), np.float32))
    with pytest.raises(ShapeError, match="bias"):
        sgemm(np.zeros((3, 4), np.float32), np.zeros((4, 6), np.float32), bias=np.zeros(5))
    with pytest.raises(ShapeError, match="out"):
        sgemm(np.zeros((3, 4), np.float32), np.zeros((4, 6), np.float32),
              out=np.zeros((3, 5), np.float32))


def test_llvm_ir_text_is_kept():
    kernel = compile_gemm()
    assert kernel.entry in kernel.llvm_ir
    assert f"@llvm.fma.v{kernel.config.vl}f32" in kernel.llvm_ir
