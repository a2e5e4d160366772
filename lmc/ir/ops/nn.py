"""Neural-network ops kept whole because backends have better kernels for them than for their
decomposition: softmax, normalizations, attention, cross-entropy."""
from __future__ import annotations

from lmc.errors import ShapeError
from lmc.ir.core import Op
from lmc.ir.ops import register
from lmc.ir.types import DType, TensorType, broadcast_shapes, dims_equal, normalize_axis


class AxisOp(Op):
    operands = ("x",)
    attrs = {"axis": -1}

    def infer_type(self):
        if not self.x.dtype.is_float:
            raise ShapeError(f"{self.name} needs a float operand, got {self.x.type}")
        normalize_axis(self.axis, self.x.type.rank)
        return self.x.type


@register
class Softmax(AxisOp):
    name = "tensor.softmax"


@register
class LogSoftmax(AxisOp):
    name = "tensor.log_softmax"


class Norm(Op):
    """Normalizes over the last `num_axes` dims; weight (and bias) have those dims' shape."""

    def infer_type(self):
        x = self.x.type
        if not x.dtype.is_float or not 1 <= self.num_axes <= x.rank:
            raise ShapeError(f"{self.name}: bad operand {x} or num_axes {self.num_axes}")
        norm_shape = x.shape[x.rank - self.num_axes:]
        for v in self.operand_values[1:]:
            if v.dtype != x.dtype or len(v.shape) != len(norm_shape) or not all(
                    dims_equal(a, b) for a, b in zip(v.shape, norm_shape)):
                raise ShapeError(f"{self.name}: affine operand {v.type} does not fit {x}")
        return x


@register
class LayerNorm(Norm):
    name = "tensor.layer_norm"
    operands = ("x", "weight?", "bias?")
    attrs = {"num_axes": 1, "eps": 1e-5}


@register
class RmsNorm(Norm):
    name = "tensor.rms_norm"
    operands = ("x", "weight?")
    attrs = {"num_axes": 1, "eps": 1e-6}


@register
class Attention(Op):
    """softmax(q kᵀ · scale + mask) v over q[..., Hq, Tq, D], k/v[..., Hkv, Tk, D(v)].

    Grouped-query attention when Hkv divides Hq. `mask` is additive (float) or boolean (True =
    keep), broadcast to [..., Hq, Tq, Tk]. `causal` masks j > i + (Tk - Tq). `scale` None means
    1/sqrt(D).
    """

    name = "tensor.attention"
    operands = ("q", "k", "v", "mask?")
    attrs = {"causal": False, "scale": None}

    def infer_type(self):
        q, k, v = self.q.type, self.k.type, self.v.type
        if q.rank < 3 or k.rank != q.rank or v.rank != q.rank:
            raise ShapeError(f"tensor.attention needs q, k, v of one rank >= 3, got {q}, {k}, {v}")
        if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_float:
            raise ShapeError(f"tensor.attention needs float q, k, v of one dtype: {q}, {k}, {v}")
        hq, hk = q.shape[-3], k.shape[-3]
        gqa_ok = dims_equal(hq, hk) or (isinstance(hq, int) and isinstance(hk, int)
                                        and hq % hk == 0)
        if not (gqa_ok and dims_equal(q.shape[-1], k.shape[-1]) and dims_equal(
                k.shape[-2], v.shape[-2]) and dims_equal(k.shape[-3], v.shape[-3])):
            raise ShapeError(f"tensor.attention operand shapes do not fit: {q}, {k}, {v}")
        out = q.shape[:-1] + (v.shape[-1],)
        if self.mask is not None:
            m = self.mask.type
            if m.dtype is not DType.bool and m.dtype != q.dtype:
                raise ShapeError(f"attention mask must be bool or {q.dtype.value}, got {m}")
            scores = q.shape[:-1] + (k.shape[-2],)
            if broadcast_shapes(m.shape, scores) != scores:
                raise ShapeError(f"attention mask {m} does not broadcast to scores {scores}")
        return TensorType(out, q.dtype)


@register
class CrossEntropy(Op):
    """Cross-entropy from logits [N, C] (or [N, C, ...]) and integer targets [N] (or [N, ...])."""

    name = "tensor.cross_entropy"
    operands = ("logits", "target")
    attrs = {"ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean"}

    def infer_type(self):
        lg, tg = self.logits.type, self.target.type
        if not tg.dtype.is_int or tg.rank != lg.rank - 1:
            raise ShapeError(f"cross_entropy targets {tg} do not fit logits {lg}")
        if self.reduction not in ("mean", "sum", "none"):
            raise ShapeError(f"reduction '{self.reduction}' is not mean, sum or none")
        if self.reduction == "none":
            return TensorType(tg.shape, lg.dtype)
        return TensorType((), lg.dtype)
