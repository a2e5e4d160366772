"""Dual GEMMs on the CPU: fuse's siblings (SwiGLU's silu(x·W1)·(x·W3), dense or per expert) run
as one GEMM over x whose second product never goes to memory. Against the reference interpreter
on fresh random inputs: odd widths (partial epilogue blocks), several N blocks, experts with 0,
1 and 130 rows and rows outside them, both thread counts, and the plain path a trainer's
executable takes (weights given per call: the sibling runs first)."""
from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from test_cpu_gemm import SMALL_BLOCKS, _rand, _rng

import lmc
from lmc.backends.cpu import threads as cpu_threads
from lmc.backends.cpu.gemm import compile_gemm, epilogue_block
from lmc.backends.cpu.jit import default_engine
from lmc.backends.cpu.kernels import INDIRECT_TILE
from lmc.backends.cpu.loops import render_tile_epilogue
from lmc.backends.cpu.runtime import CpuExecutable
from lmc.ir.parser import parse

DENSE = """
func @main(%x: f32[B,N,{K}], %w1: f32[{K},{F}] {{param}}, %w3: f32[{K},{F}] {{param}},
           %b: f32[{F}] {{param}}) -> (f32[B,N,{F}]) {{
  %0 = tensor.matmul %x, %w1 : f32[B,N,{F}]
  %1 = tensor.silu %0 : f32[B,N,{F}]
  %2 = tensor.matmul %x, %w3 : f32[B,N,{F}]
  %3 = tensor.mul %1, %2 : f32[B,N,{F}]
  %4 = tensor.add %3, %b : f32[B,N,{F}]
  func.return %4
}}
"""

GROUPED = """
func @main(%x: f32[M,{K}], %w1: f32[{E},{K},{F}] {{param}}, %w3: f32[{E},{K},{F}] {{param}},
           %off: i64[{E1}]) -> (f32[M,{F}]) {{
  %0 = moe.grouped_matmul %x, %w1, %off : f32[M,{F}]
  %1 = tensor.silu %0 : f32[M,{F}]
  %2 = moe.grouped_matmul %x, %w3, %off : f32[M,{F}]
  %3 = tensor.mul %1, %2 : f32[M,{F}]
  func.return %3
}}
"""


def _compiled(text: str, weights: dict[str, np.ndarray]):
    module = parse(text, weights)
    return (lmc.compile(module, target="cpu", options=lmc.CompileOptions(cache_dir="off")),
            lmc.compile(module, target="ref"))


def _dual_steps(cm) -> list:
    return [st for st in cm.executable.steps
            if getattr(st.fn, "dual_packed", None) is not None]


def _close(got, ref, seed):
    scale = np.abs(ref).max() + 1e-6
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"seed {seed}")


# F: below, at and past one epilogue block's half (128 on both code paths), and past NC / 2
# (4096 / 2 columns: the dual product spans two N blocks).
@pytest.mark.parametrize("k,f", [(1, 1), (13, 37), (40, 128), (33, 129), (16, 300), (8, 2100)])
def test_dense_dual_matches_interpreter(monkeypatch, k, f):
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    weights = {"w1": _rand(rng, k, f), "w3": _rand(rng, k, f), "b": _rand(rng, f)}
    cpu, ref = _compiled(DENSE.format(K=k, F=f), weights)
    assert len(_dual_steps(cpu)) == 1
    for shape in ((1, 1, k), (2, 7, k), (3, 43, k)):
        x = _rand(rng, *shape)
        _close(cpu(x), ref(x), seed)


GROUPS = [[0, 3, 0, 1], [5, 0, 17, 130], [1, 0, 0, 0]]


@pytest.mark.parametrize("counts", GROUPS, ids=[str(c) for c in GROUPS])
@pytest.mark.parametrize("f", [7, 129, 300])
def test_grouped_dual_matches_interpreter(monkeypatch, counts, f):
    """Rows before the first expert's and after the last's (offsets inside [0, M]) are zeros
    through the epilogue, as in the plain grouped matmul."""
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    rng, seed = _rng()
    k, experts = 24, len(counts)
    weights = {"w1": _rand(rng, experts, k, f), "w3": _rand(rng, experts, k, f)}
    cpu, ref = _compiled(GROUPED.format(K=k, F=f, E=experts, E1=experts + 1), weights)
    assert len(_dual_steps(cpu)) == 1
    for lead, tail in ((0, 0), (2, 5)):
        offsets = lead + np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        x = _rand(rng, int(offsets[-1]) + tail, k)
        _close(cpu(x, offsets), ref(x, offsets), seed)


SMALL_DUAL = """func @main(%x: f32[70,37], %w1: f32[3,37,45], %w3: f32[3,37,45],
           %o: i64[4]) -> (f32[70,45]) {
  %0 = kernel.fused %x, %w1, %o, %w3 {kind = "grouped_matmul"} : f32[70,45] {
  ^bb(%a0: f32[70,37], %a1: f32[3,37,45], %a2: i64[4], %a3: f32[3,37,45]):
    %1 = moe.grouped_matmul %a0, %a1, %a2 : f32[70,45]
    %2 = moe.grouped_matmul %a0, %a3, %a2 : f32[70,45]
    %3 = tensor.mul %1, %2 : f32[70,45]
    kernel.yield %3
  }
  func.return %0
}"""


def test_dual_with_small_blocks_spans_every_block_edge(monkeypatch):
    """Tiny cache blocks (NC = 32: the epilogue block is 32 wide, 16 per GEMM): many N, K and
    M blocks; each job one MC-row block of the per-thread scratch."""
    monkeypatch.setattr(cpu_threads, "MIN_MACS_PER_THREAD_PER_LANE", 1)
    assert epilogue_block(SMALL_BLOCKS) == 32
    rng, seed = _rng()
    x, w1, w3 = _rand(rng, 70, 37), _rand(rng, 3, 37, 45), _rand(rng, 3, 37, 45)
    offsets = np.array([1, 20, 20, 66], np.int64)
    ref = np.zeros((70, 45), np.float64)
    for e, (lo, hi) in enumerate(pairwise(offsets)):
        a, b = x[lo:hi] @ w1[e].astype(np.float64), x[lo:hi] @ w3[e].astype(np.float64)
        ref[lo:hi] = a * b
    kernel = compile_gemm(SMALL_BLOCKS, (), None, INDIRECT_TILE)
    packed = cpu_threads.pack_dual(w1, w3, epilogue_block(SMALL_BLOCKS) // 2, kernel)
    op = parse(SMALL_DUAL).main.body.ops[0]
    ops = op.body.ops
    name, text, reads = render_tile_epilogue(op, ops[0], exported=True, sibling=ops[1])
    assert reads == []
    engine = default_engine()
    engine.add_ir(name, text)
    for threads in (1, 2):
        out = np.full((70, 45), np.nan, np.float32)
        args = np.array([engine.function_address(name), out.ctypes.data, 45, 1], np.int64)
        cpu_threads.dual_sgemm(x, packed, offsets, out=out, tile_epilogue=INDIRECT_TILE,
                               epi_args=args.ctypes.data, threads=threads)
        _close(out, ref, seed)


def test_plain_path_when_weights_come_per_call():
    """A trainer's executable does not prepack (the weights change every step): the sibling
    GEMM runs first and the epilogue reads its result, with the same numbers."""
    rng, seed = _rng()
    k, f = 20, 150
    weights = {"w1": _rand(rng, k, f), "w3": _rand(rng, k, f), "b": _rand(rng, f)}
    cpu, ref = _compiled(DENSE.format(K=k, F=f), weights)
    plain = CpuExecutable(cpu.module, prepack=False)
    assert not [st for st in plain.steps if getattr(st.fn, "dual_packed", None) is not None]
    x = _rand(rng, 2, 9, k)
    (got,) = plain([x, *(weights[n] for n in ("w1", "w3", "b"))])  # the function's arguments
    _close(got, ref(x), seed)
