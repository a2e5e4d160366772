"""The CPU backend's JIT fp32 GEMM against numpy (float64) on fresh random inputs: odd sizes,
B transposed, bias/ReLU epilogues, strided views, accumulation, both code paths (AVX-512, AVX2),
and small cache blocks so that every blocking loop and edge runs at small sizes. Then tile
epilogues (hand-written LLVM functions), prepacked B, and the grouped (MoE) and batched GEMMs
against the reference interpreter."""
from __future__ import annotations

import threading
import time
from itertools import pairwise

import numpy as np
import pytest

import lmc
from lmc.backends.cpu import GemmConfig, Relu, compile_gemm, host_target, sgemm
from lmc.backends.cpu import pool as cpu_pool
from lmc.backends.cpu import threads as cpu_threads
from lmc.backends.cpu.gemm import TileEpilogue, default_config
from lmc.backends.cpu.jit import HostTarget, JitError
from lmc.backends.cpu.kernels import NARROW_N, GemmLauncher, NarrowMatmul
from lmc.backends.cpu.threads import LowRank, batched_sgemm, grouped_sgemm, prepack_b
from lmc.backends.reference.interpreter import IMPL
from lmc.errors import ShapeError
from lmc.ir.parser import parse

# Tiny blocks: K, M and N each span several KC/MC/NC blocks already at sizes ~100.
SMALL_BLOCKS = GemmConfig(vl=8, mr=6, nv=2, kc=16, mc=12, nc=32)
# The AVX-512 tile (8 x 48 of 16-lane vectors) with tiny blocks: on an AVX2 host LLVM splits each
# 16-lane operation in two, so the AVX-512 path's IR (packing transposes, tile edges) runs here.
WIDE_BLOCKS = GemmConfig(vl=16, mr=8, nv=3, kc=32, mc=16, nc=96)
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
    for config in (SMALL_BLOCKS, WIDE_BLOCKS):
        _check(sgemm(a, b, bias=bias, config=config, threads=2), a, b, seed, bias=bias)
        _check(sgemm(a, b.T.copy(), trans_b=True, config=config), a, b, seed)


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


def test_partition_balances_whole_tiles():
    """512 columns are 10.7 panels of 48: split by N, one thread would run 6 panels and the
    other 5; split by M (64 row panels of 8) both run the same number of whole tiles."""
    cfg = GemmConfig(vl=16, mr=8, nv=3, kc=384, mc=96, nc=4032)
    assert cpu_threads.partition(512, 512, 512, cfg, 2) == ((0, 256, 0, 512), (256, 512, 0, 512))
    # A wide, shallow GEMM still splits N when only that keeps A's packing single per thread...
    wide = cpu_threads.partition(48, 4800, 256, cfg, 2)
    assert [(m0, m1) for m0, m1, *_ in wide] == [(0, 48)] * 2
    # ...and a prepacked B (nothing to duplicate) lets a tall one split M.
    tall = cpu_threads.partition(1024, 4096, 256, cfg, 2, b_packed=True)
    assert [(n0, n1) for *_, n0, n1 in tall] == [(0, 4096)] * 2
    # Four threads, 1024^2: as many whole tiles per block either way, but a 2 x 2 grid packs
    # half of A and half of B per block (4 x 1: a quarter of A and all of B).
    grid = cpu_threads.partition(1024, 1024, 1024, cfg, 4)
    assert len({m0 for m0, *_ in grid}) == len({n0 for *_, n0, _ in grid}) == 2


def test_threads_claim_records_from_one_counter():
    """A launch's threads claim record indices from one counter (gemm.render_jobs): a record
    another thread claimed is not run again, each of the others runs once, and a record may
    replace its C by the thread's own (`cbuf`)."""
    cfg, rng = SMALL_BLOCKS, np.random.default_rng()
    a, b = _rand(rng, 30, 20), _rand(rng, 20, 40)
    layout = cpu_threads._Layout((20, 1), (40, 1), 40, False)
    (apack, bpack), kernel = cpu_threads.pack_buffers(cfg), compile_gemm(cfg)
    for own_c in (False, True):
        out, scratch = np.full((30, 40), np.nan, np.float32), np.zeros((12, 40), np.float32)
        ptrs = (a.ctypes.data, b.ctypes.data, out.ctypes.data)
        jobs = np.array([layout.job(block, 20, ptrs, (0, 0), []) for block in
                         [(0, 12, 0, 40), (12, 24, 0, 40), (24, 30, 0, 40)]], np.int64)
        counter = np.array([1 if not own_c else 2, 0], np.int64)  # taken by another thread
        kernel.run_jobs(len(jobs), jobs.ctypes.data, layout.a_strides, layout.b_strides, 40,
                        1.0, 0.0, apack.ctypes.data, bpack.ctypes.data, False, 0,
                        claim=counter.ctypes.data, cbuf=scratch.ctypes.data if own_c else 0)
        assert counter[0] == len(jobs) + 1  # the last claim found nothing left
        if own_c:  # only the last record ran, into the scratch, at its own row offset
            assert np.isnan(out).all()
            _check(scratch[:6], a[24:], b, 0)
        else:
            assert np.isnan(out[:12]).all()
            _check(out[12:], a[12:], b, 0)


def test_prepacked_rows_split_into_claimed_jobs():
    """With B prepacked, a thread's block becomes jobs of <= MC rows of whole MR tiles that
    cover it exactly, for the threads to claim (a slowed core takes fewer)."""
    for cfg in (SMALL_BLOCKS, default_config(HOST)):
        for m0, m1 in [(0, 1), (6, 7), (0, 600), (12, 1000)]:
            chunks = cpu_threads._row_chunks((m0, m1, 0, 48), cfg)
            assert chunks[0][0] == m0 and chunks[-1][1] == m1
            assert all(c[1] == d[0] for c, d in pairwise(chunks))
            assert all(0 < c[1] - c[0] <= cfg.mc and (c[0] - m0) % cfg.mr == 0 for c in chunks)
            assert len(chunks) == -(-(m1 - m0) // cfg.mc)


def test_multithreaded_gemm_packs_b_once_and_replays_current_b(monkeypatch):
    """On several threads an unpacked B is packed once per run (pack records the threads
    claim before the job records, into the launch's own buffer): a replayed launch sees B's new
    values, also after other GEMMs ran; a temporary B is kept alive through the launch."""
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    a, b, out = _rand(rng, 130, 70), _rand(rng, 70, 90), np.empty((130, 90), np.float32)
    with cpu_threads.recording() as calls:
        sgemm(a, b, out=out, threads=2, config=SMALL_BLOCKS)
    _check(out, a, b, seed)
    (run,) = calls
    assert run.npack == 4 and len(run.jobs) > run.npack + 2  # two column ranges per thread
    assert run.claim[1] == run.npack  # every pack record ran, once
    big = _rand(rng, 70, 300)
    _check(sgemm(a, big, threads=2, config=SMALL_BLOCKS), a, big, seed)
    b[:] = _rand(rng, 70, 90)
    run()
    _check(out, a, b, seed)
    _check(sgemm(a, b.T.copy(), trans_b=True, threads=2), a, b, seed)
    _check(sgemm(a, np.zeros((70, 0), np.float32), threads=2), a, np.zeros((70, 0)), seed)
    empty_k = sgemm(a[:, :0], b[:0], threads=2)
    assert (empty_k == 0).all()


def test_the_same_call_again_replays_its_launch(monkeypatch):
    """`sgemm` called again with the same addresses, layouts and scalars runs the launch it
    built last time on this thread: it reads the operands' current values, and anything that
    differs (an output elsewhere, another alpha, a recording) builds a new one."""
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    a, b, out = _rand(rng, 130, 70), _rand(rng, 70, 90), np.empty((130, 90), np.float32)
    sgemm(a, b, out=out, threads=2, config=SMALL_BLOCKS)
    first = cpu_threads._local.last_sgemm[1]
    a[:], b[:] = _rand(rng, 130, 70), _rand(rng, 70, 90)
    sgemm(a, b, out=out, threads=2, config=SMALL_BLOCKS)
    assert cpu_threads._local.last_sgemm[1] is first
    _check(out, a, b, seed)
    sgemm(a, b, out=out, alpha=2.0, threads=2, config=SMALL_BLOCKS)
    assert cpu_threads._local.last_sgemm[1] is not first
    _check(out, a, b, seed, alpha=2.0)
    # the same addresses and strides, fewer columns: another launch
    out[:, 60:] = np.nan
    sgemm(a, b[:, :60], out=out[:, :60], alpha=2.0, threads=2, config=SMALL_BLOCKS)
    _check(out[:, :60], a, b[:, :60], seed, alpha=2.0)
    assert np.isnan(out[:, 60:]).all()
    other = sgemm(a, b.T.copy(), trans_b=True, threads=2, config=SMALL_BLOCKS)
    _check(other, a, b, seed)
    last = cpu_threads._local.last_sgemm[1]
    with cpu_threads.recording() as calls:
        sgemm(a, b.T.copy(), trans_b=True, out=other, threads=2, config=SMALL_BLOCKS)
    assert calls[0] is not last and cpu_threads._local.last_sgemm[1] is last
    _check(other, a, b, seed)


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


# -- tile epilogues: LLVM functions run on each finished tile, with its global position --

HOST = host_target()
# Both code paths where the host runs both; on an AVX2-only host only its own.
TARGETS = [None] + ([HOST.without_avx512()] if HOST.has_avx512 else [])
TARGET_IDS = ["host"] + (["avx2"] if HOST.has_avx512 else [])

# c = 2c + row + 1000*col (global indices): checks the tile offsets and that it runs once. It
# declares an intrinsic the GEMM module declares too, as a rendered epilogue may.
OFFSETS_EPILOGUE = TileEpilogue("epi_offsets", """
declare i64 @llvm.smin.i64(i64, i64)

define internal void @epi_offsets(ptr %c, i64 %ldc, i64 %row0, i64 %col0, i64 %mr, i64 %nr,
                                  ptr %args) {
entry:
  br label %row
row:
  %i = phi i64 [ 0, %entry ], [ %i.next, %row.end ]
  %row.more = icmp slt i64 %i, %mr
  br i1 %row.more, label %col.pre, label %done
col.pre:
  %gi = add i64 %row0, %i
  %line = mul i64 %i, %ldc
  br label %col
col:
  %j = phi i64 [ 0, %col.pre ], [ %j.next, %col ]
  %p = getelementptr inbounds float, ptr %c, i64 %line
  %pj = getelementptr inbounds float, ptr %p, i64 %j
  %x = load float, ptr %pj
  %gj = add i64 %col0, %j
  %gj1000 = mul i64 %gj, 1000
  %idx = add i64 %gi, %gj1000
  %fidx = sitofp i64 %idx to float
  %x2 = fmul float %x, 2.0
  %y = fadd float %x2, %fidx
  store float %y, ptr %pj
  %j.next = add i64 %j, 1
  %last = call i64 @llvm.smin.i64(i64 %j.next, i64 %nr)
  %col.more = icmp slt i64 %last, %nr
  br i1 %col.more, label %col, label %row.end
row.end:
  %i.next = add i64 %i, 1
  br label %row
done:
  ret void
}
""")

# c += r[row, col], r read through args = [pointer, row stride, column stride] (i64 words, in
# elements), the docs/CPU_BACKEND.md layout of an epilogue operand.
RESIDUAL_EPILOGUE = TileEpilogue("epi_residual", """
define internal void @epi_residual(ptr %c, i64 %ldc, i64 %row0, i64 %col0, i64 %mr, i64 %nr,
                                   ptr %args) {
entry:
  %r.word = load i64, ptr %args
  %r = inttoptr i64 %r.word to ptr
  %rs.p = getelementptr i64, ptr %args, i64 1
  %rs = load i64, ptr %rs.p
  %cs.p = getelementptr i64, ptr %args, i64 2
  %cs = load i64, ptr %cs.p
  br label %row
row:
  %i = phi i64 [ 0, %entry ], [ %i.next, %row.end ]
  %row.more = icmp slt i64 %i, %mr
  br i1 %row.more, label %col.pre, label %done
col.pre:
  %gi = add i64 %row0, %i
  %line = mul i64 %i, %ldc
  %rline = mul i64 %gi, %rs
  br label %col
col:
  %j = phi i64 [ 0, %col.pre ], [ %j.next, %col ]
  %at = add i64 %line, %j
  %pc = getelementptr inbounds float, ptr %c, i64 %at
  %x = load float, ptr %pc
  %gj = add i64 %col0, %j
  %rcol = mul i64 %gj, %cs
  %rat = add i64 %rline, %rcol
  %pr = getelementptr inbounds float, ptr %r, i64 %rat
  %res = load float, ptr %pr
  %y = fadd float %x, %res
  store float %y, ptr %pc
  %j.next = add i64 %j, 1
  %col.more = icmp slt i64 %j.next, %nr
  br i1 %col.more, label %col, label %row.end
row.end:
  %i.next = add i64 %i, 1
  br label %row
done:
  ret void
}
""")


def _offsets_ref(shape, row0=0, col0=0):
    m, n = shape
    return (row0 + np.arange(m))[:, None] + 1000.0 * (col0 + np.arange(n))[None, :]


def _operand_args(r: np.ndarray) -> np.ndarray:
    """The epilogue's args words for one float32 operand r [M, N] (any strides, 0 broadcasts)."""
    return np.array([r.ctypes.data, r.strides[0] // 4, r.strides[1] // 4], np.int64)


def _check_close(got, ref, scale, seed):
    err = np.max(np.abs(got - ref) / np.maximum(scale, 1e-30), initial=0.0)
    assert err <= TOL, f"relative error {err:.2e} (seed {seed})"


EPI_SHAPES = [(1, 1, 1), (7, 13, 5), (129, 130, 257), (37, 300, 100), (300, 37, 64), (5, 9, 0)]


@pytest.mark.parametrize("m,n,k", EPI_SHAPES)
@pytest.mark.parametrize("config", [None, SMALL_BLOCKS, WIDE_BLOCKS],
                         ids=["default", "small-blocks", "wide-blocks"])
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_tile_epilogue_sees_global_offsets(monkeypatch, m, n, k, config, target):
    """Inside a sentinel-filled frame: an edge tile writing past its true mr/nr would show."""
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)  # split even tiny ones
    rng, seed = _rng()
    a, b = _rand(rng, m, k), _rand(rng, k, n)
    for threads in (1, 2):
        frame = np.full((m + 4, n + 5), np.nan, np.float32)
        out = frame[2:2 + m, 3:3 + n]
        got = sgemm(a, b, out=out, tile_epilogue=OFFSETS_EPILOGUE, threads=threads,
                    config=config, target=target)
        ab = a.astype(np.float64) @ b
        scale = 2 * np.abs(a.astype(np.float64)) @ np.abs(b) + _offsets_ref((m, n))
        _check_close(got, 2 * ab + _offsets_ref((m, n)), scale, seed)
        frame[2:2 + m, 3:3 + n] = 0
        assert np.isnan(frame).sum() == frame.size - m * n, f"wrote outside out (seed {seed})"


def test_tile_epilogue_caller_offsets_and_accumulate():
    """row0/col0 shift the positions (a caller's sub-block); beta/alpha apply before it."""
    rng, seed = _rng()
    a, b, c0 = _rand(rng, 40, 70), _rand(rng, 70, 33), _rand(rng, 40, 33)
    out = c0.copy()
    sgemm(a, b, out=out, alpha=0.5, beta=-1.0, tile_epilogue=OFFSETS_EPILOGUE, row0=100,
          col0=7, config=SMALL_BLOCKS, threads=2)
    ab = a.astype(np.float64) @ b
    ref = 2 * (0.5 * ab - c0) + _offsets_ref((40, 33), 100, 7)
    scale = np.abs(a.astype(np.float64)) @ np.abs(b) + 2 * np.abs(c0) + np.abs(ref)
    _check_close(out, ref, scale, seed)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 13, 5), (129, 130, 257), (50, 130, 0)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "row-broadcast"])
def test_tile_epilogue_reads_operand_through_args(monkeypatch, m, n, k, layout):
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    a, b, bias = _rand(rng, m, k), _rand(rng, k, n), _rand(rng, n)
    r = {"contiguous": lambda: _rand(rng, m, n), "transposed": lambda: _rand(rng, n, m).T,
         "row-broadcast": lambda: np.broadcast_to(_rand(rng, n), (m, n))}[layout]()
    args = _operand_args(r)
    for config, threads in [(None, 2), (SMALL_BLOCKS, 1), (SMALL_BLOCKS, 2)]:
        got = sgemm(a, b, bias=bias, epilogue=(Relu(),), tile_epilogue=RESIDUAL_EPILOGUE,
                    epi_args=args, threads=threads, config=config)
        ab = a.astype(np.float64) @ b
        ref = np.maximum(ab + bias, 0) + r  # in-register ops first, then the tile epilogue
        scale = np.abs(a.astype(np.float64)) @ np.abs(b) + np.abs(bias) + np.abs(r)
        _check_close(got, ref, scale, seed)


def test_tile_epilogue_with_strided_out_and_errors():
    rng, seed = _rng()
    a, b = _rand(rng, 9, 20), _rand(rng, 20, 11)
    out = np.zeros((9, 22), np.float32)[:, ::2]  # non-unit column stride: via a temporary
    sgemm(a, b, out=out, tile_epilogue=OFFSETS_EPILOGUE)
    _check_close(out, 2 * (a.astype(np.float64) @ b) + _offsets_ref((9, 11)),
                 np.abs(a) @ np.abs(b) * 2 + _offsets_ref((9, 11)), seed)
    with pytest.raises(JitError, match="does not define"):
        TileEpilogue("missing", "define internal void @other(ptr %c) {\n  ret void\n}\n")
    with pytest.raises(JitError, match="not the tile ABI"):
        TileEpilogue("epi_bad", "define internal void @epi_bad(ptr %c) {\n  ret void\n}\n")
    bad = OFFSETS_EPILOGUE.llvm_ir.replace("%x2 = fmul float %x, 2.0", "%x2 = fmul float %x, 2")
    with pytest.raises(JitError, match="LLVM rejected"):
        sgemm(a, b, tile_epilogue=TileEpilogue("epi_offsets", bad))


AVX512 = HostTarget("znver4", ",".join(sorted(
    set(HOST.features.split(",")) - {f"-{f}" for f in ("avx512f", "avx512bw", "avx512dq",
                                                        "avx512vl")}
    | {"+avx512f", "+avx512bw", "+avx512dq", "+avx512vl"})))


def test_avx512_module_with_tile_epilogue_compiles():
    """The AVX-512 path (8x32 tile) renders valid IR with a tile epilogue; it runs only where
    the host has AVX-512 (then TARGETS covers it), so here it is compiled but not called."""
    kernel = compile_gemm(default_config(AVX512), (Relu(),), AVX512, RESIDUAL_EPILOGUE)
    assert kernel.config.vl == 16 and "call void @epi_residual" in kernel.llvm_ir


# -- prepacked B --


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 13, 5), (129, 130, 257), (32, 515, 40)])
@pytest.mark.parametrize("config", [None, SMALL_BLOCKS, WIDE_BLOCKS],
                         ids=["default", "small-blocks", "wide-blocks"])
def test_prepacked_b(monkeypatch, m, n, k, config):
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    monkeypatch.setattr(cpu_threads, "PACK_BYTES_PER_THREAD", 1)  # pack on every core
    rng, seed = _rng()
    a, w, bias = _rand(rng, m, k), _rand(rng, n, k), _rand(rng, n)
    packed = prepack_b(w, trans_b=True, config=config)
    assert packed.config == (config or compile_gemm().config)
    for threads in (1, 2):
        _check(sgemm(a, packed, bias=bias, threads=threads), a, w.T, seed, bias=bias)
    _check(sgemm(a, prepack_b(w.T[:, ::-1], config=config))[:, ::-1], a, w.T, seed)
    if config is not None:
        with pytest.raises(ShapeError, match="packed for"):
            sgemm(a, packed, config=GemmConfig(vl=8, mr=6, nv=2, kc=32, mc=12, nc=32))


# -- the low-rank (LoRA) branch: x @ down as extra columns of the same pass over x --


@pytest.mark.parametrize("m,n,k,r", [(1, 1, 1, 1), (7, 29, 33, 3), (129, 40, 300, 17),
                                     (300, 700, 64, 40), (64, 5000, 100, 8), (13, 515, 7, 16)])
@pytest.mark.parametrize("config", [None, SMALL_BLOCKS, WIDE_BLOCKS],
                         ids=["default", "small-blocks", "wide-blocks"])
def test_low_rank_branch(monkeypatch, m, n, k, r, config):
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    x, w, bias = _rand(rng, m, k), _rand(rng, k, n), _rand(rng, n)
    down, up, scale = _rand(rng, r, k), _rand(rng, n, r), float(rng.uniform(-2, 2))
    branch = LowRank(prepack_b(down, trans_b=True, config=config),
                     prepack_b(up, trans_b=True, config=config), scale)
    # As one GEMM of x by [w | down] then [up·s] on the rows: the same bound on the error.
    cat = np.concatenate([x, scale * (x.astype(np.float64) @ down.T)], axis=1)
    wide = np.concatenate([w, up.T], axis=0)
    for b in (w, prepack_b(w, config=config)):
        for threads in (1, 2):
            got = sgemm(x, b, bias=bias, low_rank=branch, threads=threads, config=config)
            _check(got, cat, wide, seed, bias=bias)


def test_low_rank_branch_with_accumulation_and_errors():
    rng, seed = _rng()
    x, w, c0 = _rand(rng, 50, 70), _rand(rng, 70, 90), _rand(rng, 50, 90)
    down, up = _rand(rng, 4, 70), _rand(rng, 90, 4)
    branch = LowRank(prepack_b(down, trans_b=True), prepack_b(up, trans_b=True), 0.5)
    out = c0.copy()
    sgemm(x, w, out=out, beta=1.0, alpha=2.0, low_rank=branch)
    cat = np.concatenate([2.0 * x, 0.5 * (x.astype(np.float64) @ down.T)], axis=1)
    _check(out, cat, np.concatenate([w, up.T]), seed, c0=c0, beta=1.0)
    strided = np.zeros((50, 180), np.float32)[:, ::2]  # a non-unit column stride: via a copy
    sgemm(x, w, out=strided, low_rank=branch)
    plain = np.concatenate([x, 0.5 * (x.astype(np.float64) @ down.T)], axis=1)
    _check(strided, plain, np.concatenate([w, up.T]), seed)
    with pytest.raises(ShapeError, match="register epilogues"):
        sgemm(x, w, epilogue=(Relu(),), low_rank=branch)
    with pytest.raises(ShapeError, match="does not fit"):
        sgemm(x[:, :60], w[:60], low_rank=branch)


# -- grouped (MoE) GEMM, against the reference interpreter --


def _grouped_ref(x, w, offsets):
    return IMPL["moe.grouped_matmul"](None, {}, x.astype(np.float64), w.astype(np.float64),
                                      offsets)


def _grouped_scale(x, w, offsets):
    return _grouped_ref(np.abs(x), np.abs(w), offsets)


def _expert_offsets(rng, counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


GROUPS = [[1], [0, 3, 0, 1], [5, 0, 17, 130, 2], [200, 1, 0]]


@pytest.mark.parametrize("counts", GROUPS, ids=[str(c) for c in GROUPS])
@pytest.mark.parametrize("d,f", [(1, 1), (13, 7), (40, 129)])
@pytest.mark.parametrize("w_layout", ["contiguous", "transposed", "packed"])
def test_grouped_matches_interpreter(monkeypatch, counts, d, f, w_layout):
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    monkeypatch.setattr(cpu_threads, "PACK_BYTES_PER_THREAD", 1)  # experts packed in parts
    rng, seed = _rng()
    offsets = _expert_offsets(rng, counts)
    x, w = _rand(rng, int(offsets[-1]), d), _rand(rng, len(counts), d, f)
    w_arg = {"contiguous": w, "transposed": np.ascontiguousarray(w.transpose(0, 2, 1))
             .transpose(0, 2, 1), "packed": prepack_b(w, config=SMALL_BLOCKS)}[w_layout]
    for threads in (1, 2):
        got = grouped_sgemm(x, w_arg, offsets, threads=threads)
        _check_close(got, _grouped_ref(x, w, offsets), _grouped_scale(x, w, offsets), seed)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_grouped_tile_epilogue_global_rows(monkeypatch, target):
    """Rows before offsets[0] and after offsets[E] are 0 and still get the epilogue."""
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    offsets = np.array([3, 10, 10, 41, 42], np.int64)
    x, w = _rand(rng, 50, 33), _rand(rng, 4, 33, 57)
    ref = 2 * _grouped_ref(x, w, offsets) + _offsets_ref((50, 57))
    scale = 2 * _grouped_scale(x, w, offsets) + _offsets_ref((50, 57))
    for threads in (1, 2):
        frame = np.full((52, 60), np.nan, np.float32)
        got = grouped_sgemm(x, w, offsets, out=frame[1:51, 2:59], threads=threads,
                            tile_epilogue=OFFSETS_EPILOGUE, target=target)
        _check_close(got, ref, scale, seed)
        assert np.isnan(frame).sum() == frame.size - 50 * 57
    residual = _rand(rng, 50, 57)
    got = grouped_sgemm(x, w, offsets, tile_epilogue=RESIDUAL_EPILOGUE, target=target,
                        epi_args=_operand_args(residual))
    _check_close(got, _grouped_ref(x, w, offsets) + residual,
                 _grouped_scale(x, w, offsets) + np.abs(residual), seed)


def test_grouped_keeps_both_threads_busy():
    """A skewed routing (one expert takes almost all rows) still splits across the threads."""
    cfg = default_config(HOST)
    sizes = [(500, 1536, 512), (3, 1536, 512), (1, 1536, 512)]
    plan = cpu_threads.schedule(sizes, cfg, 2)
    assert len(plan) == 2
    for share in plan:
        work = sum((m1 - m0) * (n1 - n0) for i, (m0, m1, n0, n1) in share)
        assert 0.4 < work / sum(m * n for m, n, _ in sizes) < 0.6
    covered = {i: np.zeros((m, n), int) for i, (m, n, _) in enumerate(sizes)}
    for share in plan:
        for i, (m0, m1, n0, n1) in share:
            covered[i][m0:m1, n0:n1] += 1
    assert all((c == 1).all() for c in covered.values())


def test_grouped_errors_and_strided_out():
    rng, seed = _rng()
    x, w = _rand(rng, 6, 4), _rand(rng, 2, 4, 5)
    out = np.zeros((6, 10), np.float32)[:, ::2]
    offsets = np.array([0, 2, 6])
    grouped_sgemm(x, w, offsets, out=out)
    _check_close(out, _grouped_ref(x, w, offsets), _grouped_scale(x, w, offsets), seed)
    for bad in ([0, 4, 2], [0, 2, 7], [-1, 2, 6], [0, 6]):
        with pytest.raises(ShapeError, match="offsets"):
            grouped_sgemm(x, w, np.array(bad))
    with pytest.raises(ShapeError, match="does not fit"):
        grouped_sgemm(_rand(rng, 6, 3), w, offsets)


# -- batched GEMM, numpy.matmul semantics --


def _check_matmul(got, a, b, seed):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = np.matmul(a64, b64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    _check_close(got, ref, np.matmul(np.abs(a64), np.abs(b64)), seed)


BATCHED = [((2, 3, 17, 9), (2, 3, 9, 17)), ((1, 7, 5), (3, 5, 1)), ((2, 1, 5, 7), (3, 7, 4)),
           ((7,), (2, 7, 4)), ((3, 5, 7), (7,)), ((4, 9, 7), (7, 5)), ((5, 3, 0), (5, 0, 6)),
           ((0, 3, 4), (4, 5)), ((3, 129, 33), (3, 33, 65))]


@pytest.mark.parametrize("a_shape,b_shape", BATCHED, ids=[f"{a}@{b}" for a, b in BATCHED])
def test_batched_matches_numpy(monkeypatch, a_shape, b_shape):
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    a, b = _rand(rng, *a_shape), _rand(rng, *b_shape)
    for threads in (1, 2):
        _check_matmul(batched_sgemm(a, b, threads=threads), a, b, seed)
    if b.ndim >= 2:
        bt = np.ascontiguousarray(np.swapaxes(b, -1, -2))
        _check_matmul(batched_sgemm(a, bt, trans_b=True), a, b, seed)


def test_batched_strided_views_and_folding(monkeypatch):
    rng, seed = _rng()
    q = _rand(rng, 2, 11, 3, 8)  # [B, T, H, D] permuted to [B, H, T, D]: not foldable
    k = _rand(rng, 2, 11, 3, 8)
    qh, kh = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)
    out = np.full((2, 3, 11, 13), np.nan, np.float32)[..., :11]
    got = batched_sgemm(qh, kh, out=out, threads=2)
    assert got is out
    _check_matmul(out, qh, kh, seed)
    _check_matmul(batched_sgemm(qh, k.transpose(0, 2, 1, 3), trans_b=True), qh, kh, seed)
    calls = []
    real = cpu_threads.sgemm
    monkeypatch.setattr(cpu_threads, "sgemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, w = _rand(rng, 4, 5, 16), _rand(rng, 16, 9)
    _check_matmul(batched_sgemm(x, w), x, w, seed)
    xs, wb = x[:, :, :8], np.broadcast_to(w[:8], (4, 8, 9))  # rows still collapse: ldA = 16
    _check_matmul(batched_sgemm(xs, wb), xs, wb, seed)
    assert len(calls) == 2  # both fold into one [20, 16 | 8] @ [16 | 8, 9] GEMM
    _check_matmul(batched_sgemm(x.transpose(1, 0, 2), w), x.transpose(1, 0, 2), w, seed)
    assert len(calls) == 2  # [5, 4, 16] permuted: rows do not collapse, runs as a batch


def test_batched_errors():
    with pytest.raises(ShapeError, match="cannot multiply"):
        batched_sgemm(np.zeros((2, 3, 4), np.float32), np.zeros((3, 4, 5), np.float32))
    with pytest.raises(ShapeError, match="cannot multiply"):
        batched_sgemm(np.zeros((3, 4), np.float32), np.zeros((5, 6), np.float32))
    with pytest.raises(ShapeError, match="out"):
        batched_sgemm(np.zeros((2, 3, 4), np.float32), np.zeros((4, 5), np.float32),
                      out=np.zeros((2, 3, 6), np.float32))


# -- the core pool: Python and native jobs, errors, sleeping and nested use --


_FILL_IR = """define void @lmc_test_fill(i64 %start, i64 %end, ptr %a, ptr %scratch) {
entry:
  br label %loop
loop:
  %i = phi i64 [ %start, %entry ], [ %next, %loop ]
  %p = getelementptr i64, ptr %a, i64 %i
  %v = mul i64 %i, 3
  store i64 %v, ptr %p, align 8
  %next = add i64 %i, 1
  %more = icmp slt i64 %next, %end
  br i1 %more, label %loop, label %done
done:
  ret void
}
"""


def _fill_kernel() -> int:
    from lmc.backends.cpu.jit import default_engine
    engine = default_engine()
    if "lmc_test_fill" not in engine.modules:
        engine.add_ir("lmc_test_fill", _FILL_IR)
    return engine.function_address("lmc_test_fill")


@pytest.mark.parametrize("wait_spin_us", [cpu_pool.WAIT_SPIN_US, 0], ids=["spin", "sleep"])
def test_pool_python_and_native_jobs(monkeypatch, wait_spin_us):
    """Native range tasks and Python jobs, more jobs than cores (extras run in the caller);
    with no spin budget the caller sleeps and the worker has to wake it."""
    monkeypatch.setattr(cpu_pool, "WAIT_SPIN_US", wait_spin_us)
    fill, pool = _fill_kernel(), cpu_pool.pool()
    for _ in range(3):
        out = np.zeros(4000, np.int64)
        seen = []
        jobs = [lambda seen=seen: seen.append("caller")]
        jobs += [cpu_pool.range_task(fill, 1000 * i, 1000 * (i + 1), out.ctypes.data)
                 for i in range(3)]
        jobs.append(lambda seen=seen: seen.append("python"))
        pool.run(jobs)
        np.testing.assert_array_equal(out[:3000], 3 * np.arange(3000))
        assert sorted(seen) == ["caller", "python"]
        time.sleep(0.002)  # past the worker's spin budget: the next post must wake it
    # A worker job that outlasts the caller's: the caller's wait times out (at once when
    # wait_spin_us is 0) and it sleeps until the worker, Python or native, wakes it.
    slow = []
    pool.run([lambda: None, lambda: (time.sleep(0.01), slow.append(1))])
    big = np.zeros(1 << 23, np.int64)
    pool.run([lambda: None, cpu_pool.range_task(fill, 0, big.size, big.ctypes.data)])
    assert slow == [1] and big[-1] == 3 * (big.size - 1)


def test_pool_reraises_and_recovers():
    pool = cpu_pool.pool()

    def fail():
        raise ValueError("from a worker")

    with pytest.raises(ValueError, match="from a worker"):
        pool.run([lambda: None, fail])
    rng, seed = _rng()
    a, b = _rand(rng, 300, 200), _rand(rng, 200, 300)
    _check(sgemm(a, b, threads=2), a, b, seed)  # still usable


def test_pool_nested_and_concurrent_calls():
    """A job calling the pool, and Python threads sharing it, run inline, not deadlock."""
    rng, seed = _rng()
    a, b = _rand(rng, 300, 200), _rand(rng, 200, 300)
    got = {}

    def gemm(name):
        got[name] = sgemm(a, b, threads=2)

    cpu_pool.pool().run([lambda: gemm("outer"), lambda: gemm("nested")])
    threads = [threading.Thread(target=gemm, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == ["nested", "outer", "t0", "t1", "t2"]
    for out in got.values():
        _check(out, a, b, seed)


# -- a narrow matmul (N <= kernels.NARROW_N) runs as a row-dot reduction kernel --

NARROW = """func @main(%x: f32[B,T,{K}], %w: f32[{N},{K}] {{param}}) -> (f32[B,T,{N}]) {{
  %0 = tensor.permute %w {{perm = [1, 0]}} : f32[{K},{N}]
  %1 = tensor.matmul %x, %0 : f32[B,T,{N}]
  func.return %1
}}"""


@pytest.mark.parametrize("k,n", [(1, 1), (7, 3), (129, 8), (512, 8), (33, 9)])
def test_narrow_matmul_matches_interpreter(k, n):
    """N = 9 is past the limit: the GEMM path, for comparison on the same shapes."""
    rng, seed = _rng()
    module = parse(NARROW.format(K=k, N=n), {"w": _rand(rng, n, k)})
    cpu = lmc.compile(module, target="cpu", options=lmc.CompileOptions(cache_dir="off"))
    ref = lmc.compile(module, target="ref")
    (step,) = [st for st in cpu.executable.steps if st.kind == "kernel"]
    assert isinstance(step.fn, NarrowMatmul if n <= NARROW_N else GemmLauncher)
    for shape in ((1, 1, k), (2, 7, k), (3, 130, k)):
        x = _rand(rng, *shape)
        got, want = cpu(x), ref(x)
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.sqrt(k),
                                   err_msg=f"seed {seed}")
