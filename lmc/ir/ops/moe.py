"""Mixture-of-experts ops: route → gather → grouped matmul → combine.

All shapes are static in the number of routed slots M = N·k, so the graph has no data-dependent
sizes, and each expert's matmul touches only the rows routed to it:

    %perm, %offsets = moe.route %topk_idx {num_experts = E}   # slots sorted by expert
    %xs = moe.gather %x, %perm {k = 2}                          # x[perm // k]
    %h  = moe.grouped_matmul %xs, %w1, %offsets                 # rows of expert e times w1[e]
    %y  = moe.combine %h2, %perm, %topk_weight                  # out[perm//k] += w.flat[perm]·h2
"""
from __future__ import annotations

from lmc.errors import ShapeError
from lmc.ir.core import Op
from lmc.ir.ops import register
from lmc.ir.types import DType, TensorType, dim_mul, dims_equal


@register
class Route(Op):
    name = "moe.route"
    operands = ("indices",)
    attrs = {"num_experts": 1}
    results = 2

    def infer_type(self):
        t = self.indices.type
        if t.rank != 2 or not t.dtype.is_int:
            raise ShapeError(f"moe.route needs integer top-k indices [N, k], got {t}")
        m = dim_mul(*t.shape)
        return TensorType((m,), DType.i64), TensorType((self.num_experts + 1,), DType.i64)


@register
class Gather(Op):
    name = "moe.gather"
    operands = ("x", "perm")
    attrs = {"k": 1}

    def infer_type(self):
        x, p = self.x.type, self.perm.type
        if x.rank != 2 or p.rank != 1:
            raise ShapeError(f"moe.gather needs x [N, d] and perm [M], got {x}, {p}")
        return x.with_shape((p.shape[0], x.shape[1]))


@register
class GroupedMatMul(Op):
    name = "moe.grouped_matmul"
    operands = ("x", "weight", "offsets")

    def infer_type(self):
        x, w = self.x.type, self.weight.type
        if x.rank != 2 or w.rank != 3 or not dims_equal(x.shape[1], w.shape[1]) or \
                x.dtype != w.dtype:
            raise ShapeError(f"moe.grouped_matmul needs x [M, d] and w [E, d, f], got {x}, {w}")
        return x.with_shape((x.shape[0], w.shape[2]))


@register
class GroupedWeightGrad(Op):
    """The weight gradient of `moe.grouped_matmul`: out[e] = x[rows of e]ᵀ · g[rows of e].

    Its own op because no dense form computes only the routed rows: it is what autodiff emits
    for the expert weights, and backends give it a grouped kernel.
    """

    name = "moe.grouped_weight_grad"
    operands = ("x", "grad", "offsets")

    def infer_type(self):
        x, g, o = self.x.type, self.grad.type, self.offsets.type
        if x.rank != 2 or g.rank != 2 or o.rank != 1 or not isinstance(o.shape[0], int) or \
                not dims_equal(x.shape[0], g.shape[0]) or x.dtype != g.dtype:
            raise ShapeError(f"moe.grouped_weight_grad needs x [M, d], grad [M, f] and static "
                             f"offsets [E+1], got {x}, {g}, {o}")
        return x.with_shape((o.shape[0] - 1, x.shape[1], g.shape[1]))


@register
class Combine(Op):
    name = "moe.combine"
    operands = ("y", "perm", "weights")

    def infer_type(self):
        y, p, w = self.y.type, self.perm.type, self.weights.type
        if y.rank != 2 or w.rank != 2 or not dims_equal(p.shape[0], dim_mul(*w.shape)):
            raise ShapeError(f"moe.combine needs y [M, d], perm [M], weights [N, k]: {y}, {p}, "
                             f"{w}")
        return y.with_shape((w.shape[0], y.shape[1]))
