"""The CPU backend's native data-movement kernels (backends/cpu/datamove.py) against the
reference interpreter's implementations, bit for bit, on fresh random inputs: odd sizes, strided
and broadcast views, ties and NaNs for top-k, repeated rows for combine, bad indices, both
threads counts, and the AVX2 code path where the host has AVX-512."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lmc.backends.cpu import datamove as dm
from lmc.backends.cpu import host_target
from lmc.backends.reference.interpreter import IMPL
from lmc.errors import LmcError, ShapeError

HOST = host_target()
TARGETS = [None] + ([HOST.without_avx512()] if HOST.has_avx512 else [])
TARGET_IDS = ["host"] + (["avx2"] if HOST.has_avx512 else [])


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


def _same(got, ref, seed):
    """Equal values, dtypes and shapes, NaN where NaN (bit-exact for floats)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape, seed)
    np.testing.assert_array_equal(got, ref, err_msg=f"seed {seed}")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """1 or 2 threads, the split forced at any size so that tiny inputs exercise it."""
    monkeypatch.setattr(dm, "MIN_BYTES_PER_THREAD", 1)
    return request.param


# -- tensor.take on axis 0 --


def _take_ref(x, idx):
    return IMPL["tensor.take"](SimpleNamespace(axis=0, name="tensor.take", loc=None), {}, x, idx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.float16, np.int8, bool])
@pytest.mark.parametrize("v,d", [(1, 1), (7, 33), (129, 7), (5, 0)])
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_take_rows(threads, dtype, v, d, target):
    rng, seed = _rng()
    x = (rng.standard_normal((v, d)) * 10).astype(dtype)
    for shape in [(), (5,), (3, 4), (0,), (2, 0, 3)]:
        idx = rng.integers(-v, v, shape)
        _same(dm.take_rows(x, idx, threads=threads, target=target), _take_ref(x, idx), seed)


def test_take_rows_views_and_out(threads):
    rng, seed = _rng()
    big = rng.standard_normal((40, 30)).astype(np.float32)
    idx = rng.integers(-13, 13, (4, 9))
    for x in (big[::3, 1::2], big.T[:13], big[::-3, :5], np.broadcast_to(big[0], (13, 30)),
              big[:26].reshape(13, 2, 30)[:, :, ::7]):
        _same(dm.take_rows(x, idx, threads=threads), _take_ref(x, idx), seed)
    x = big[:13]
    frame = np.full((4, 9, 35), np.nan, np.float32)
    out = frame[:, :, 2:32]  # rows of out are strided too
    assert dm.take_rows(x, idx, out=out, threads=threads) is out
    _same(out, _take_ref(x, idx), seed)
    assert np.isnan(frame[:, :, :2]).all() and np.isnan(frame[:, :, 32:]).all()
    out_t = np.empty((30, 9, 4), np.float32).transpose(2, 1, 0)  # no 2-D view: a temporary
    _same(dm.take_rows(x, idx, out=out_t), _take_ref(x, idx), seed)
    x1 = rng.standard_normal(17).astype(np.float32)  # 1-D x: gathers scalars
    _same(dm.take_rows(x1, idx), _take_ref(x1, idx), seed)


def test_take_rows_bad_index_is_named():
    x = np.zeros((6, 4), np.float32)
    with pytest.raises(dm.IndexRangeError, match=r"index 6 at position \(1, 2\).*size 6"):
        dm.take_rows(x, np.array([[0, 1, 2], [3, -6, 6]]))
    with pytest.raises(LmcError, match="index -7"):
        dm.take_rows(x, np.array([-7]))
    with pytest.raises(ShapeError, match="integers"):
        dm.take_rows(x, np.array([0.0]))
    with pytest.raises(ShapeError, match="out must be"):
        dm.take_rows(x, np.array([0]), out=np.zeros((1, 5), np.float32))


# -- moe.route / moe.gather / moe.combine --


def _route_ref(idx, experts):
    return IMPL["moe.route"](SimpleNamespace(num_experts=experts), {}, idx)


@pytest.mark.parametrize("n,k,experts", [(1, 1, 1), (7, 2, 8), (129, 3, 13), (0, 2, 4),
                                         (300, 2, 8)])
def test_moe_route_is_a_stable_counting_sort(n, k, experts):
    rng, seed = _rng()
    for topk_idx in (rng.integers(0, experts, (n, k)), np.full((n, k), experts - 1),
                     rng.integers(0, experts, (k, n)).T):  # skewed, then a transposed view
        perm, offsets = dm.moe_route(topk_idx, experts)
        ref_perm, ref_offsets = _route_ref(topk_idx, experts)
        _same(perm, ref_perm, seed)
        _same(offsets, ref_offsets, seed)


def test_moe_route_bad_expert():
    with pytest.raises(dm.IndexRangeError, match=r"expert index 8 at position \(1, 0\)"):
        dm.moe_route(np.array([[0, 1], [8, 2]]), 8)
    with pytest.raises(dm.IndexRangeError, match="expert index -1"):
        dm.moe_route(np.array([[-1]]), 8)


def _routing(rng, n, k, experts):
    topk_idx = np.stack([rng.permutation(experts)[:k] for _ in range(n)]).reshape(n, k)
    return _route_ref(topk_idx, experts)[0]


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (7, 33, 2), (129, 17, 3)])
def test_moe_gather(threads, n, d, k):
    rng, seed = _rng()
    perm = _routing(rng, n, k, 5)
    big = rng.standard_normal((2 * n, d + 3)).astype(np.float32)
    for x in (big[:n, :d], big[::2, 3:], big[:n, :d].T.copy().T):
        ref = IMPL["moe.gather"](SimpleNamespace(k=k), {}, x, perm)
        _same(dm.moe_gather(x, perm, k, threads=threads), ref, seed)
    with pytest.raises(dm.IndexRangeError, match=rf"perm\[0\] = {n * k} is outside"):
        dm.moe_gather(big[:n], np.array([n * k]), k)


def _combine_ref(y, perm, weights):
    return IMPL["moe.combine"](None, {}, y, perm, weights)


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (7, 33, 2), (129, 17, 3), (40, 130, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_moe_combine_matches_add_at_bitwise(threads, n, d, k, dtype, target):
    """Bit-identical: per output row the k products are summed in perm order."""
    rng, seed = _rng()
    perm = _routing(rng, n, k, 6)
    y = (rng.standard_normal((n * k, d)) * 100).astype(dtype)
    weights = rng.random((n, k)).astype(dtype)
    _same(dm.moe_combine(y, perm, weights, threads=threads, target=target),
          _combine_ref(y, perm, weights), seed)
    # Strided views, and a perm with repeats (rows hit more than k times, in order).
    y_t, w_t = np.asfortranarray(y)[:, ::-1], weights.T.copy().T
    repeats = rng.integers(0, n * k, n * k)
    _same(dm.moe_combine(y_t, repeats, w_t, threads=threads, target=target),
          _combine_ref(y_t, repeats, w_t), seed)


def test_moe_combine_errors_and_strided_out():
    rng, seed = _rng()
    y, weights = rng.standard_normal((6, 5)).astype(np.float32), np.ones((3, 2), np.float32)
    perm = np.array([5, 4, 3, 2, 1, 0])
    out = np.zeros((5, 3), np.float32).T  # column stride 3 rows: written through its strides
    assert dm.moe_combine(y, perm, weights, out=out) is out
    _same(out, _combine_ref(y, perm, weights), seed)
    with pytest.raises(dm.IndexRangeError, match=r"perm\[2\] = 6 is outside \[0, 6\)"):
        dm.moe_combine(y, np.array([0, 1, 6, 2, 3, 4]), weights)
    with pytest.raises(ShapeError, match="share a float dtype"):
        dm.moe_combine(y, perm, weights.astype(np.float64))


# -- tensor.topk on the last axis --


def _topk_ref(x, k, largest):
    op = SimpleNamespace(k=k, largest=largest, axis=-1)
    return IMPL["tensor.topk"](op, {}, x)


def _tricky(rng, shape, dtype):
    """Few distinct values (many ties), and for floats NaN, +-inf and -0.0 among them."""
    x = rng.integers(-3, 4, shape).astype(dtype)
    if np.dtype(dtype).kind == "f":
        specials = np.array([np.nan, np.inf, -np.inf, -0.0], dtype)
        mask = rng.random(shape) < 0.15
        x[mask] = rng.choice(specials, mask.sum())
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 129), (2, 3, 1000)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_matches_stable_sort(threads, dtype, shape, largest):
    rng, seed = _rng()
    n = shape[-1]
    for x in (rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
              else rng.integers(-1000, 1000, shape).astype(dtype), _tricky(rng, shape, dtype)):
        for k in sorted({1, min(2, n), min(8, n), n}):
            values, indices = dm.topk(x, k, largest, threads=threads)
            ref_values, ref_indices = _topk_ref(x, k, largest)
            _same(values, ref_values, seed)
            _same(indices, ref_indices, seed)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_topk_views_and_router_shape(threads, target):
    rng, seed = _rng()
    logits = rng.standard_normal((8, 517)).astype(np.float32)  # [experts, tokens], transposed
    for x, k in ((logits.T, 2), (logits[:, ::3], 5), (np.broadcast_to(logits[0], (4, 517)), 9)):
        for got, ref in zip(dm.topk(x, k, threads=threads, target=target), _topk_ref(x, k, True)):
            _same(got, ref, seed)
    values, indices = dm.topk(logits, 0)
    assert values.shape == indices.shape == (8, 0)
    with pytest.raises(ShapeError, match="k=4"):
        dm.topk(np.zeros((2, 3), np.float32), 4)
    with pytest.raises(ShapeError, match="no native kernel"):
        dm.topk(np.zeros((2, 3), np.uint8), 1)
