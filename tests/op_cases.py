"""One table of cases per op: operands, attributes and the PyTorch expression that means the same.

Each case becomes a one-op function (arguments = the op's operands) built through the `Rewriter`;
`test_ops.py` runs it with the reference interpreter and compares with PyTorch, `test_ir.py`
round-trips its text. Inputs are drawn from a fresh seed each run (odd sizes: 1, 7, 13, ...);
the seed is in every failure message and `LMC_TEST_SEED` replays it.

A new op in `lmc.ir.ops.OPS` must get a case here: `test_every_op_has_a_case` fails otherwise.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ml_dtypes import bfloat16 as _BF16

from lmc.ir.core import Block, Func, Location, Module, Region
from lmc.ir.parser import Parser
from lmc.ir.rewriter import Rewriter
from lmc.ir.types import DType, TensorType

SEED = int(os.environ.get("LMC_TEST_SEED") or secrets.randbits(32))

# Ops whose meaning is tested on their own (regions and terminators), not by a one-op case.
STRUCTURAL = {"func.return", "kernel.yield", "kernel.fused"}


@dataclass
class Case:
    """`make(rng)` draws the operands; `ref(*torch tensors)` is the PyTorch meaning. Float
    operands reach `ref` as float64 (exact reference) unless `f64_ref` is False."""

    id: str
    op: str
    make: Callable[[np.random.Generator], list[np.ndarray]]
    ref: Callable[..., Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    result_types: list[str] | None = None  # declared ops; text like "f32[B*T,16]"
    arg_types: list[str] | None = None  # override the operand types (symbolic dims)
    rtol: float = 1e-5
    atol: float = 1e-6
    f64_ref: bool = True

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([SEED, sum(map(ord, self.id)), len(self.id)])


CASES: list[Case] = []


def case(id: str, op: str, make, ref, **kw) -> None:
    assert all(c.id != id for c in CASES), id
    CASES.append(Case(id, op, make, ref, **kw))


def ty(text: str) -> TensorType:
    return Parser(text).type()


def build(c: Case, inputs: list[np.ndarray]) -> Module:
    """A module whose @main takes the operands, applies `c.op` once and returns its results."""
    f = Func("main")
    types = [ty(t) for t in c.arg_types] if c.arg_types else [
        TensorType(x.shape, DType.from_numpy(x.dtype)) for x in inputs]
    args = [f.add_arg(t, f"a{i}") for i, t in enumerate(types)]
    rw = Rewriter(f.body)
    results = [ty(t) for t in c.result_types] if c.result_types else None
    op = rw.create(c.op, args, dict(c.attrs), results,
                   loc=Location(f"cases.{c.id}", "tests/op_cases.py", 1 + len(CASES)))
    rw.create("func.return", op.result_values, loc=Location())
    m = Module()
    m.add_func(f)
    return m


def fused_module() -> Module:
    """@main(x: f32[7,13], y: f32[13]) = kernel.fused { exp(x + y), x * y } built by hand."""
    x_t, y_t = TensorType((7, 13), DType.f32), TensorType((13,), DType.f32)
    body = Block([x_t, y_t], ["bx", "by"])
    rw = Rewriter(body)
    s = rw.value("tensor.add", *body.args)
    e = rw.value("tensor.exp", s)
    p = rw.value("tensor.mul", *body.args)
    rw.create("kernel.yield", [e, p])
    f = Func("main")
    x, y = f.add_arg(x_t, "x"), f.add_arg(y_t, "y")
    top = Rewriter(f.body)
    fused = top.create("kernel.fused", [x, y], {"kind": "elementwise"}, [x_t, x_t],
                       loc=Location("blocks.0.mlp", "model.py", 42))
    fused.regions.append(Region([body]))
    fused.regions[0].parent = fused
    top.create("func.return", fused.result_values)
    m = Module()
    m.add_func(f)
    return m


# ---- input makers --------------------------------------------------------------------------

def randn(*shape, scale=1.0):
    return lambda rng: [(rng.standard_normal(shape) * scale).astype(np.float32)]


def uniform(lo, hi, *shape):
    return lambda rng: [rng.uniform(lo, hi, shape).astype(np.float32)]


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def small_ints(rng, *shape, lo=-3, hi=4, dtype=np.float32):
    """Integer-valued numbers, so that comparisons and argmax meet ties."""
    return rng.integers(lo, hi, shape).astype(dtype)


def ints(rng, hi, *shape, dtype=np.int64):
    return rng.integers(0, hi, shape).astype(dtype)


def perm_rows(rng, n, *shape):
    """Indices without repeats along axis 0 (plain scatter is then deterministic)."""
    cols = [rng.permutation(n)[:shape[0]] for _ in range(int(np.prod(shape[1:], dtype=int)))]
    return np.stack(cols, axis=1).reshape(shape).astype(np.int64)


# ---- elementwise ---------------------------------------------------------------------------

UNARY = {
    "neg": (torch.neg, randn(7, 13)),
    "abs": (torch.abs, randn(13)),
    "exp": (torch.exp, randn(7, 13)),
    "log": (torch.log, uniform(0.01, 10.0, 7, 13)),
    "sqrt": (torch.sqrt, uniform(0.0, 10.0, 13, 7)),
    "rsqrt": (torch.rsqrt, uniform(0.01, 10.0, 13)),
    "reciprocal": (torch.reciprocal, lambda rng: [np.where(
        (x := f32(rng, 7, 13)) >= 0, x + 0.1, x - 0.1).astype(np.float32)]),
    "tanh": (torch.tanh, randn(7, 13, scale=3.0)),
    "erf": (torch.erf, randn(1, 7, 13, scale=2.0)),
    "sigmoid": (torch.sigmoid, lambda rng: [np.concatenate(
        [f32(rng, 13, scale=4.0), np.float32([-100.0, 100.0, -88.0, 0.0])])]),
    "relu": (torch.relu, randn(7, 1, 13)),
    "silu": (F.silu, randn(13, 7, scale=4.0)),
    "sin": (torch.sin, randn(7, 13, scale=3.0)),
    "cos": (torch.cos, randn(7, 13, scale=3.0)),
}
for _name, (_fn, _make) in UNARY.items():
    case(_name, f"tensor.{_name}", _make, _fn)

case("abs_i32", "tensor.abs", lambda rng: [small_ints(rng, 13, dtype=np.int32)], torch.abs)
case("barrier", "tensor.barrier", randn(7, 13), lambda x: x)
case("neg_i64", "tensor.neg", lambda rng: [small_ints(rng, 7, dtype=np.int64)], torch.neg)
case("gelu", "tensor.gelu", randn(7, 13, scale=3.0), F.gelu)
case("gelu_tanh", "tensor.gelu", randn(13, 7, scale=3.0),
     lambda x: F.gelu(x, approximate="tanh"), attrs={"approximate": "tanh"})
case("not", "tensor.not", lambda rng: [rng.random((7, 13)) < 0.5], torch.logical_not)

BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": torch.maximum, "minimum": torch.minimum,
}
for _name, _fn in BINARY.items():
    case(_name, f"tensor.{_name}", lambda rng: [f32(rng, 7, 13), f32(rng, 7, 13)], _fn)
# numpy broadcasting: [7,1,13] with [13], [1,5,1] and a rank-0 scalar
case("add_bcast", "tensor.add", lambda rng: [f32(rng, 7, 1, 13), f32(rng, 5, 1)], torch.add)
case("mul_scalar", "tensor.mul", lambda rng: [f32(rng), f32(rng, 7, 13)], torch.mul)
case("sub_bcast", "tensor.sub", lambda rng: [f32(rng, 13), f32(rng, 1, 7, 1)], torch.sub)
case("div_bcast", "tensor.div", lambda rng: [f32(rng, 7, 13), uniform(0.5, 2, 7, 1)(rng)[0]],
     torch.div)
case("pow", "tensor.pow", lambda rng: [uniform(0.1, 3.0, 7, 13)(rng)[0],
                                       uniform(-2.0, 2.0, 13)(rng)[0]], torch.pow)
case("add_i64", "tensor.add", lambda rng: [ints(rng, 100, 7, 13), ints(rng, 100, 13)], torch.add)
# Integer tensor.div floors (numpy `//`); only non-negative operands are pinned here.
case("div_i64", "tensor.div", lambda rng: [ints(rng, 100, 13), ints(rng, 9, 13) + 1],
     lambda a, b: torch.div(a, b, rounding_mode="floor"))
case("floordiv", "tensor.floordiv",
     lambda rng: [f32(rng, 7, 13, scale=5.0), uniform(0.5, 3.0, 13)(rng)[0]], torch.floor_divide)
case("floordiv_i32", "tensor.floordiv",
     lambda rng: [small_ints(rng, 13, lo=-20, hi=20, dtype=np.int32),
                  np.int32([-3, -2, -1, 1, 2, 3, 5, -7, 4, 6, -5, 9, 1])], torch.floor_divide)
case("mod", "tensor.mod", lambda rng: [f32(rng, 7, 13, scale=5.0),
                                       uniform(0.5, 3.0, 7, 13)(rng)[0] * np.float32(
                                           rng.choice([-1, 1], (7, 13)))], torch.remainder)
case("mod_i64", "tensor.mod",
     lambda rng: [small_ints(rng, 13, lo=-20, hi=20, dtype=np.int64),
                  np.int64([-3, -2, -1, 1, 2, 3, 5, -7, 4, 6, -5, 9, 1])], torch.remainder)
for _name, _fn in {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le,
                   "gt": torch.gt, "ge": torch.ge}.items():
    case(_name, f"tensor.{_name}", lambda rng: [small_ints(rng, 7, 1), small_ints(rng, 13)], _fn)
case("lt_i32", "tensor.lt", lambda rng: [small_ints(rng, 7, 13, dtype=np.int32),
                                         small_ints(rng, 7, 13, dtype=np.int32)], torch.lt)
case("and", "tensor.and", lambda rng: [rng.random((7, 13)) < 0.5, rng.random(13) < 0.5],
     torch.logical_and)
case("or", "tensor.or", lambda rng: [rng.random((7, 1)) < 0.5, rng.random((1, 13)) < 0.5],
     torch.logical_or)
case("where", "tensor.where", lambda rng: [rng.random((7, 13)) < 0.5, f32(rng, 7, 13),
                                           f32(rng, 13)], torch.where)
case("where_bcast", "tensor.where", lambda rng: [rng.random((1, 13)) < 0.5, f32(rng, 7, 1),
                                                 f32(rng)], torch.where)

CASTS = [("f32", "i32", torch.int32), ("f32", "i64", torch.int64), ("f32", "bool", torch.bool),
         ("i64", "f32", torch.float32), ("bool", "f32", torch.float32),
         ("f32", "f16", torch.float16), ("f32", "f64", torch.float64),
         ("i64", "i32", torch.int32), ("f32", "bf16", torch.bfloat16)]


def _cast_input(src):
    def make(rng):
        x = f32(rng, 7, 13, scale=5.0)
        x[0, :4] = [0.0, -0.0, 2.5, -2.5]
        return [x.astype({"f32": np.float32, "i64": np.int64, "bool": np.bool_}[src])
                if src != "bool" else x > 0]
    return make


for _src, _dst, _tdt in CASTS:
    case(f"cast_{_src}_{_dst}", "tensor.cast", _cast_input(_src),
         lambda x, _tdt=_tdt: x.to(_tdt), attrs={"dtype": DType(_dst)}, f64_ref=False)

# ---- reductions ----------------------------------------------------------------------------

REDUCE = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin}
for _name, _fn in REDUCE.items():
    case(f"{_name}_all", f"tensor.{_name}", randn(7, 13), _fn)
    case(f"{_name}_axes", f"tensor.{_name}", randn(7, 5, 13),
         lambda x, _fn=_fn: _fn(x, dim=(0, -1), keepdim=True),
         attrs={"axes": (0, -1), "keepdim": True})
    case(f"{_name}_axis1", f"tensor.{_name}", randn(1, 13, 7),
         lambda x, _fn=_fn: _fn(x, dim=1), attrs={"axes": (1,)})
case("sum_i64", "tensor.sum", lambda rng: [ints(rng, 50, 7, 13)],
     lambda x: torch.sum(x, dim=1), attrs={"axes": (1,)})
case("argmax", "tensor.argmax", lambda rng: [small_ints(rng, 7, 13)],
     lambda x: torch.argmax(x, dim=-1))
case("argmax_keep", "tensor.argmax", lambda rng: [small_ints(rng, 7, 13, 5)],
     lambda x: torch.argmax(x, dim=1, keepdim=True), attrs={"axis": 1, "keepdim": True})
case("cumsum", "tensor.cumsum", randn(7, 13), lambda x: torch.cumsum(x, -1), atol=1e-5)
case("cumsum_axis0", "tensor.cumsum", randn(13, 7), lambda x: torch.cumsum(x, 0),
     attrs={"axis": 0}, atol=1e-5)
case("cumsum_i64", "tensor.cumsum", lambda rng: [ints(rng, 9, 1, 13)],
     lambda x: torch.cumsum(x, 1), attrs={"axis": 1})
case("topk", "tensor.topk", randn(7, 13), lambda x: tuple(torch.topk(x, 3)), attrs={"k": 3})
case("topk_smallest_axis0", "tensor.topk", randn(13, 7),
     lambda x: tuple(torch.topk(x, 5, dim=0, largest=False)),
     attrs={"k": 5, "axis": 0, "largest": False})
case("topk_all", "tensor.topk", randn(1, 7), lambda x: tuple(torch.topk(x, 7)), attrs={"k": 7})

# ---- linear algebra ------------------------------------------------------------------------

case("matmul", "tensor.matmul", lambda rng: [f32(rng, 7, 13), f32(rng, 13, 5)], torch.matmul)
case("matmul_batched", "tensor.matmul",
     lambda rng: [f32(rng, 3, 1, 7, 13), f32(rng, 5, 13, 1)], torch.matmul)
case("matmul_vec", "tensor.matmul", lambda rng: [f32(rng, 7, 13), f32(rng, 13)], torch.matmul)
case("matmul_vecmat", "tensor.matmul", lambda rng: [f32(rng, 13), f32(rng, 2, 13, 7)],
     torch.matmul)
case("matmul_dot", "tensor.matmul", lambda rng: [f32(rng, 13), f32(rng, 13)], torch.matmul)
case("matmul_sym", "tensor.matmul", lambda rng: [f32(rng, 3, 7, 13), f32(rng, 13, 5)],
     torch.matmul, arg_types=["f32[B,T,13]", "f32[13,5]"])

# ---- views and data movement ---------------------------------------------------------------

case("reshape", "tensor.reshape", randn(7, 13), lambda x: x.reshape(13, 7),
     result_types=["f32[13,7]"])
case("reshape_sym", "tensor.reshape", randn(2, 3, 16), lambda x: x.reshape(6, 16),
     arg_types=["f32[B,T,16]"], result_types=["f32[B*T,16]"])
case("reshape_scalar", "tensor.reshape", randn(1, 1), lambda x: x.reshape(()),
     result_types=["f32[]"])
case("broadcast", "tensor.broadcast", randn(7, 1), lambda x: x.expand(3, 7, 13),
     result_types=["f32[3,7,13]"])
case("permute", "tensor.permute", randn(7, 1, 13), lambda x: x.permute(2, 0, 1),
     attrs={"perm": (2, 0, 1)})
case("slice", "tensor.slice", randn(13, 7), lambda x: x[2:11:3],
     attrs={"start": 2, "end": 11, "step": 3})
case("slice_open", "tensor.slice", randn(7, 13), lambda x: x[:, 5:],
     attrs={"axis": -1, "start": 5})
case("slice_clamped", "tensor.slice", randn(7, 13), lambda x: x[:, 4:100:2],
     attrs={"axis": 1, "start": 4, "end": 100, "step": 2})
case("slice_negative", "tensor.slice", randn(13, 7), lambda x: x[-5:-1],
     attrs={"start": -5, "end": -1})
case("slice_sym_end", "tensor.slice", randn(2, 13), lambda x: x[:, 1:],
     arg_types=["f32[B,T]"], attrs={"axis": 1, "start": 1, "end": "T"})
case("concat", "tensor.concat", lambda rng: [f32(rng, 7, 1), f32(rng, 7, 13), f32(rng, 7, 5)],
     lambda *xs: torch.cat(xs, -1), attrs={"axis": -1})
case("concat_one", "tensor.concat", randn(7, 13), lambda x: torch.cat([x]))

# ---- indexing ------------------------------------------------------------------------------

case("take_embedding", "tensor.take", lambda rng: [f32(rng, 13, 7), ints(rng, 13, 3, 5)],
     lambda w, i: F.embedding(i, w))
case("take_index_select", "tensor.take", lambda rng: [f32(rng, 7, 13), ints(rng, 13, 11)],
     lambda x, i: torch.index_select(x, 1, i), attrs={"axis": 1})
case("take_i32_idx", "tensor.take",
     lambda rng: [f32(rng, 13, 7), ints(rng, 13, 5, dtype=np.int32)],
     lambda x, i: x[i.long()])
case("take_scalar_idx", "tensor.take", lambda rng: [f32(rng, 7, 13), np.int64(3)],
     lambda x, i: x[:, 3], attrs={"axis": -1})
case("gather", "tensor.gather", lambda rng: [f32(rng, 7, 13), ints(rng, 13, 7, 5)],
     lambda x, i: torch.gather(x, 1, i), attrs={"axis": 1})
case("gather_axis0", "tensor.gather", lambda rng: [f32(rng, 7, 13), ints(rng, 7, 11, 13)],
     lambda x, i: torch.gather(x, 0, i))
case("scatter", "tensor.scatter",
     lambda rng: [f32(rng, 13, 7), perm_rows(rng, 13, 5, 7), f32(rng, 5, 7)],
     lambda x, i, s: torch.scatter(x, 0, i, s))
case("scatter_small_src", "tensor.scatter",
     lambda rng: [f32(rng, 7, 13), perm_rows(rng, 13, 4, 7).T.copy(), f32(rng, 9, 5)],
     lambda x, i, s: torch.scatter(x, 1, i, s), attrs={"axis": 1})
case("scatter_add", "tensor.scatter",
     lambda rng: [f32(rng, 7, 13), ints(rng, 7, 11, 13), f32(rng, 11, 13)],
     lambda x, i, s: torch.scatter_add(x, 0, i, s), attrs={"reduce": "add"})
case("index_add", "tensor.index_add",
     lambda rng: [f32(rng, 7, 13), ints(rng, 7, 11), f32(rng, 11, 13)],
     lambda x, i, s: torch.index_add(x, 0, i, s))
case("index_add_axis1", "tensor.index_add",
     lambda rng: [f32(rng, 5, 13, 2), ints(rng, 13, 7), f32(rng, 5, 7, 2)],
     lambda x, i, s: torch.index_add(x, 1, i, s), attrs={"axis": 1})
case("nonzero", "tensor.nonzero", lambda rng: [rng.random((7, 13)) < 0.3], torch.nonzero,
     result_types=["i64[n,2]"])
case("nonzero_f32", "tensor.nonzero", lambda rng: [small_ints(rng, 13, lo=-1, hi=2)],
     torch.nonzero, result_types=["i64[n,1]"])

# ---- constants -----------------------------------------------------------------------------

case("constant_splat", "tensor.constant", lambda rng: [], lambda: torch.full((7, 13), -1.5),
     attrs={"value": -1.5}, result_types=["f32[7,13]"])
case("constant_scalar_i64", "tensor.constant", lambda rng: [],
     lambda: torch.tensor(42, dtype=torch.int64), attrs={"value": 42}, result_types=["i64[]"])
case("constant_list", "tensor.constant", lambda rng: [],
     lambda: torch.tensor([[1.0, 2.5, -3.0], [0.0, 1e-05, 7.0]]),
     attrs={"value": ((1.0, 2.5, -3.0), (0.0, 1e-05, 7.0))}, result_types=["f32[2,3]"])
case("constant_bool", "tensor.constant", lambda rng: [],
     lambda: torch.tensor([True, False, True]), attrs={"value": (True, False, True)},
     result_types=["bool[3]"])
case("iota", "tensor.iota", lambda rng: [], lambda: torch.arange(13), result_types=["i64[13]"])
case("iota_f32_step", "tensor.iota", lambda rng: [],
     lambda: torch.arange(7, dtype=torch.float64) * -0.5 + 2.0,
     attrs={"start": 2.0, "step": -0.5}, result_types=["f32[7]"])
case("iota_i32_start", "tensor.iota", lambda rng: [],
     lambda: torch.arange(-3, 36, 3, dtype=torch.int32), attrs={"start": -3, "step": 3},
     result_types=["i32[13]"])

# ---- nn ------------------------------------------------------------------------------------


def _with_neg_inf(rng):
    x = f32(rng, 7, 13, scale=3.0)
    x[0, [1, 4]] = -np.inf
    x[2, :12] = -np.inf  # a row with one finite entry
    x[3] = -np.inf  # all masked: NaN, as in torch
    return [x]


case("softmax", "tensor.softmax", _with_neg_inf, lambda x: torch.softmax(x, -1))
case("softmax_axis0", "tensor.softmax", randn(13, 1, 7, scale=10.0),
     lambda x: torch.softmax(x, 0), attrs={"axis": 0})
case("log_softmax", "tensor.log_softmax", _with_neg_inf, lambda x: torch.log_softmax(x, -1))
case("log_softmax_axis1", "tensor.log_softmax", randn(7, 13, 5, scale=30.0),
     lambda x: torch.log_softmax(x, 1), attrs={"axis": 1}, atol=1e-5)


def _norm_inputs(*shape, n, affine):
    def make(rng):
        x = f32(rng, *shape, scale=2.0) + 3.0
        return [x] + [f32(rng, *shape[len(shape) - n:]) for _ in range(affine)]
    return make


case("layer_norm", "tensor.layer_norm", _norm_inputs(7, 13, n=1, affine=2),
     lambda x, w, b: F.layer_norm(x, (13,), w, b, 1e-5))
case("layer_norm_plain", "tensor.layer_norm", _norm_inputs(13, 7, n=1, affine=0),
     lambda x: F.layer_norm(x, (7,), eps=1e-5))
case("layer_norm_weight_only", "tensor.layer_norm", _norm_inputs(1, 13, n=1, affine=1),
     lambda x, w: F.layer_norm(x, (13,), w, eps=1e-3), attrs={"eps": 1e-3})
case("layer_norm_2axes", "tensor.layer_norm", _norm_inputs(3, 7, 5, n=2, affine=2),
     lambda x, w, b: F.layer_norm(x, (7, 5), w, b, 1e-5), attrs={"num_axes": 2})
case("rms_norm", "tensor.rms_norm", _norm_inputs(7, 13, n=1, affine=1),
     lambda x, w: F.rms_norm(x, (13,), w, 1e-6))
case("rms_norm_plain", "tensor.rms_norm", _norm_inputs(13, 7, n=1, affine=0),
     lambda x: F.rms_norm(x, (7,), eps=1e-5), attrs={"eps": 1e-5})
case("rms_norm_2axes", "tensor.rms_norm", _norm_inputs(2, 7, 5, n=2, affine=1),
     lambda x, w: F.rms_norm(x, (7, 5), w, 1e-6), attrs={"num_axes": 2})


def _qkv(b, hq, hk, tq, tk, d, dv=None, mask=None):
    def make(rng):
        out = [f32(rng, b, hq, tq, d), f32(rng, b, hk, tk, d), f32(rng, b, hk, tk, dv or d)]
        if mask == "bool":
            m = rng.random((b, 1, tq, tk)) < 0.7
            m[..., 0] = True  # no fully masked row (torch gives NaN there, lmc gives 0)
            out.append(m)
        elif mask == "float":
            out.append(f32(rng, tq, tk))
        return out
    return make


def _sdpa(causal=False, scale=None, gqa=False):
    def ref(q, k, v, mask=None):
        tq, tk = q.shape[-2], k.shape[-2]
        if causal:  # lmc aligns the causal mask bottom-right: keep j <= i + (Tk - Tq)
            keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
            mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool else
                                              mask.masked_fill(~keep, float("-inf")))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=gqa)
    return ref


case("attention", "tensor.attention", _qkv(2, 3, 3, 7, 7, 16), _sdpa())
case("attention_causal", "tensor.attention", _qkv(1, 2, 2, 13, 13, 8), _sdpa(causal=True),
     attrs={"causal": True})
case("attention_causal_tq_lt_tk", "tensor.attention", _qkv(2, 2, 2, 5, 13, 8),
     _sdpa(causal=True), attrs={"causal": True})
case("attention_tq1", "tensor.attention", _qkv(1, 4, 4, 1, 7, 16), _sdpa(causal=True),
     attrs={"causal": True})
case("attention_bool_mask", "tensor.attention", _qkv(2, 2, 2, 7, 13, 8, mask="bool"), _sdpa())
case("attention_float_mask", "tensor.attention", _qkv(1, 3, 3, 7, 13, 8, mask="float"),
     _sdpa(scale=0.3), attrs={"scale": 0.3})
case("attention_gqa", "tensor.attention", _qkv(2, 6, 2, 7, 7, 8, dv=5), _sdpa(gqa=True))
case("attention_gqa_causal_mask", "tensor.attention", _qkv(1, 4, 1, 7, 13, 8, mask="bool"),
     _sdpa(causal=True, gqa=True), attrs={"causal": True})
case("attention_3d", "tensor.attention",
     lambda rng: [f32(rng, 3, 7, 8), f32(rng, 3, 13, 8), f32(rng, 3, 13, 8)], _sdpa())


def _ce_inputs(n, c, *extra, ignore=None):
    def make(rng):
        logits = f32(rng, n, c, *extra, scale=2.0)
        target = ints(rng, c, n, *extra)
        if ignore is not None:
            target.reshape(-1)[::3] = ignore
        return [logits, target]
    return make


def _ce(**kw):
    return lambda logits, target: F.cross_entropy(logits, target, **kw)


case("cross_entropy", "tensor.cross_entropy", _ce_inputs(13, 7), _ce())
case("cross_entropy_sum", "tensor.cross_entropy", _ce_inputs(7, 13), _ce(reduction="sum"),
     attrs={"reduction": "sum"}, atol=1e-5)
case("cross_entropy_none", "tensor.cross_entropy", _ce_inputs(7, 13), _ce(reduction="none"),
     attrs={"reduction": "none"})
case("cross_entropy_ignore", "tensor.cross_entropy", _ce_inputs(13, 7, ignore=-100), _ce())
case("cross_entropy_ignore_custom", "tensor.cross_entropy", _ce_inputs(13, 5, ignore=2),
     _ce(ignore_index=2, reduction="none"), attrs={"ignore_index": 2, "reduction": "none"})
case("cross_entropy_smoothing", "tensor.cross_entropy", _ce_inputs(13, 7, ignore=-100),
     _ce(label_smoothing=0.1), attrs={"label_smoothing": 0.1})
case("cross_entropy_smoothing_none", "tensor.cross_entropy", _ce_inputs(7, 5, ignore=-100),
     _ce(label_smoothing=0.2, reduction="none"),
     attrs={"label_smoothing": 0.2, "reduction": "none"})
case("cross_entropy_spatial", "tensor.cross_entropy", _ce_inputs(2, 7, 13, ignore=-100),
     _ce(label_smoothing=0.05), attrs={"label_smoothing": 0.05})
case("cross_entropy_i32_target", "tensor.cross_entropy",
     lambda rng: [f32(rng, 7, 5), ints(rng, 5, 7, dtype=np.int32)],
     lambda lg, t: F.cross_entropy(lg, t.long()))

# ---- moe -----------------------------------------------------------------------------------
# The torch references are plain loops over tokens and experts.

N_TOK, K, E, D, FF = 13, 2, 5, 7, 3


def _topk_idx(rng, n=N_TOK, k=K, e=E):
    return np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int64)


def _route_ref(idx, e=E):
    flat = idx.reshape(-1)
    perm = torch.argsort(flat, stable=True)
    counts = torch.tensor([int((flat == i).sum()) for i in range(e)])
    return perm, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])


def _grouped_ref(x, w, offsets):
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype)
    for e in range(w.shape[0]):
        for m in range(int(offsets[e]), int(offsets[e + 1])):
            out[m] = x[m] @ w[e]
    return out


def _grouped_wgrad_ref(x, g, offsets):
    out = torch.zeros(len(offsets) - 1, x.shape[1], g.shape[1], dtype=x.dtype)
    for e in range(len(offsets) - 1):
        for m in range(int(offsets[e]), int(offsets[e + 1])):
            out[e] += torch.outer(x[m], g[m])
    return out


def _combine_ref(y, perm, weights):
    n, k = weights.shape
    out = torch.zeros(n, y.shape[1], dtype=y.dtype)
    for m in range(perm.shape[0]):
        slot = int(perm[m])
        out[slot // k] += weights[slot // k, slot % k] * y[m]
    return out


def _sorted_slots(rng):
    idx = _topk_idx(rng)
    perm, offsets = _route_ref(torch.from_numpy(idx))
    return idx, perm.numpy(), offsets.numpy()


case("moe_route", "moe.route", lambda rng: [_topk_idx(rng)], _route_ref,
     attrs={"num_experts": E})
case("moe_route_unused_expert", "moe.route",
     lambda rng: [rng.choice([0, 2, 6], (7, 1)).astype(np.int64)],
     lambda i: _route_ref(i, 7), attrs={"num_experts": 7})
case("moe_gather", "moe.gather",
     lambda rng: [f32(rng, N_TOK, D), _sorted_slots(rng)[1]],
     lambda x, perm: torch.stack([x[int(p) // K] for p in perm]), attrs={"k": K})
case("moe_grouped_matmul", "moe.grouped_matmul",
     lambda rng: [f32(rng, N_TOK * K, D), f32(rng, E, D, FF), _sorted_slots(rng)[2]],
     _grouped_ref)
case("moe_grouped_weight_grad", "moe.grouped_weight_grad",
     lambda rng: [f32(rng, N_TOK * K, D), f32(rng, N_TOK * K, FF), _sorted_slots(rng)[2]],
     _grouped_wgrad_ref)
case("moe_combine", "moe.combine",
     lambda rng: [f32(rng, N_TOK * K, D), _sorted_slots(rng)[1],
                  rng.random((N_TOK, K)).astype(np.float32)], _combine_ref)

# ---- symbolic operand types and low precision -----------------------------------------------
# f16/bf16 are compared with the float64 reference at their own precision (rtol ~ 2 ulp).

case("attention_sym", "tensor.attention", _qkv(2, 4, 2, 7, 7, 8), _sdpa(causal=True, gqa=True),
     arg_types=["f32[B,4,T,8]", "f32[B,2,T,8]", "f32[B,2,T,8]"], attrs={"causal": True})
case("concat_sym", "tensor.concat", lambda rng: [f32(rng, 2, 7), f32(rng, 2, 5)],
     lambda a, b: torch.cat([a, b], 1), arg_types=["f32[B,T]", "f32[B,S]"], attrs={"axis": 1})
case("slice_sym_step", "tensor.slice", randn(13, 3), lambda x: x[1::2],
     arg_types=["f32[T,3]"], attrs={"start": 1, "step": 2})
case("slice_negative_start", "tensor.slice", randn(7, 13), lambda x: x[:, -3:],
     attrs={"axis": 1, "start": -3})
case("slice_negative_end_sym", "tensor.slice", randn(13, 3), lambda x: x[2:-1],
     arg_types=["f32[T,3]"], attrs={"start": 2, "end": -1})
case("take_negative_idx", "tensor.take",
     lambda rng: [f32(rng, 13, 7), rng.integers(-13, 13, (5,)).astype(np.int64)],
     lambda x, i: x[i])
case("mean_sym", "tensor.mean", randn(3, 13, 7), lambda x: x.mean((0, 1)),
     arg_types=["f32[B,T,7]"], attrs={"axes": (0, 1)})
case("exp_f16", "tensor.exp", lambda rng: [f32(rng, 7, 13).astype(np.float16)], torch.exp,
     rtol=2e-3, atol=1e-3)
case("add_bf16", "tensor.add",
     lambda rng: [f32(rng, 7, 13).astype(_BF16), f32(rng, 13).astype(_BF16)], torch.add,
     rtol=1.6e-2, atol=1e-2)
case("softmax_f16", "tensor.softmax", lambda rng: [f32(rng, 7, 13, scale=3).astype(np.float16)],
     lambda x: torch.softmax(x, -1), rtol=2e-3, atol=1e-3)
case("gelu_f64", "tensor.gelu", lambda rng: [f32(rng, 13).astype(np.float64)], F.gelu,
     rtol=1e-12, atol=1e-14)
case("layer_norm_f16", "tensor.layer_norm",
     lambda rng: [f32(rng, 7, 13).astype(np.float16), f32(rng, 13).astype(np.float16),
                  f32(rng, 13).astype(np.float16)],
     lambda x, w, b: F.layer_norm(x, (13,), w, b, 1e-5), rtol=1e-2, atol=1e-2)
