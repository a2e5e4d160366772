"""Neural-network ATen ops: linear algebra, embedding, norms, softmax, attention, losses."""
from __future__ import annotations

import torch

from lmc.frontends.torch.context import Ctx, NotConvertible, converter, torch_dtype
from lmc.ir.core import Value
from lmc.ir.types import DType, TensorType, dims_equal

aten = torch.ops.aten


# ---- linear algebra ----------------------------------------------------------------------------

def _transpose_last(cx: Ctx, w: Value) -> Value:
    perm = tuple(range(w.type.rank - 2)) + (w.type.rank - 1, w.type.rank - 2)
    return cx.op("tensor.permute", w, perm=perm)


@converter(aten.linear.default)
def linear(cx: Ctx, x, w, b=None):
    if b is None:
        return cx.op("tensor.matmul", x, _transpose_last(cx, w))
    return _biased_matmul(cx, b, x, _transpose_last(cx, w))


@converter(aten.matmul.default, aten.mm.default, aten.bmm.default)
def matmul(cx: Ctx, a, b):
    return cx.op("tensor.matmul", a, b)


@converter(aten.addmm.default)
def addmm(cx: Ctx, bias, a, b, beta=1, alpha=1):
    return _biased_matmul(cx, bias, a, b, beta, alpha)


def _biased_matmul(cx: Ctx, bias, a, b, beta=1, alpha=1) -> Value:
    """beta·bias + alpha·(a @ b) as torch computes it: for bf16/f16 operands in f32, rounded
    once at the end (a bf16 matmul rounded, then a bf16 add, was off by up to 1 ulp)."""
    low = a.dtype if a.dtype.is_low_float else None
    if low is not None:
        a, b, bias = (cx.cast(v, DType.f32) for v in (a, b, bias))
    y = cx.op("tensor.matmul", a, b)
    if alpha != 1:
        y = cx.op("tensor.mul", y, cx.const(alpha, y.dtype))
    if beta != 1:
        bias = cx.op("tensor.mul", bias, cx.const(beta, y.dtype))
    y = cx.op("tensor.add", y, bias) if beta != 0 else y
    return cx.cast(y, low) if low is not None else y


@converter(aten.outer.default)
def outer(cx: Ctx, a, b):
    col = cx.reshape(a, (a.shape[0], 1))
    return cx.op("tensor.mul", col, b)


@converter(aten.embedding.default)
def embedding(cx: Ctx, w, idx, padding_idx=-1, scale_grad=False, sparse=False):
    return cx.op("tensor.take", w, idx, axis=0)


# ---- normalization and softmax -------------------------------------------------------------------

@converter(aten.layer_norm.default)
def layer_norm(cx: Ctx, x, shape, w=None, b=None, eps=1e-5, cudnn=True):
    operands = [x] + ([w] if w is not None else []) + ([b] if b is not None else [])
    if w is None and b is not None:
        raise NotConvertible("layer_norm with a bias but no weight")
    return cx.op("tensor.layer_norm", *operands, num_axes=len(shape), eps=float(eps))


@converter(aten.rms_norm.default)
def rms_norm(cx: Ctx, x, shape, w=None, eps=None):
    if eps is None:  # torch's default: the dtype's machine epsilon
        eps = torch.finfo(torch_dtype(x.dtype)).eps
    operands = [x] + ([w] if w is not None else [])
    return cx.op("tensor.rms_norm", *operands, num_axes=len(shape), eps=float(eps))


@converter(aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
           aten._log_softmax.default)
def softmax(cx: Ctx, x, dim, dtype_or_half=None):
    name = "tensor.log_softmax" if "log" in str(cx.node.target) else "tensor.softmax"
    x = cx.cast(x, cx.out_type().dtype)
    return cx.op(name, x, axis=dim)


# ---- attention ---------------------------------------------------------------------------------

@converter(aten.scaled_dot_product_attention.default)
def sdpa(cx: Ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False):
    if dropout_p:
        raise NotConvertible("attention dropout; call model.eval() before importing")
    causal = False
    if is_causal:
        tq, tk = q.shape[-2], k.shape[-2]
        if dims_equal(tq, tk):
            causal = True
        else:
            # torch aligns is_causal top-left (tril(ones(Tq, Tk))); lmc's causal is bottom-right.
            attn_mask = _and_mask(cx, attn_mask, _tril_mask(cx, tq, tk))
    if attn_mask is not None and attn_mask.dtype is not DType.bool:
        attn_mask = cx.cast(attn_mask, q.dtype)
    operands = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    return cx.op("tensor.attention", *operands, causal=causal,
                 scale=None if scale is None else float(scale))


def _tril_mask(cx: Ctx, rows, cols) -> Value:
    r = cx.op("tensor.iota", type=TensorType((rows,), DType.i64))
    c = cx.op("tensor.iota", type=TensorType((cols,), DType.i64))
    return cx.op("tensor.le", c, cx.reshape(r, (rows, 1)))


def _and_mask(cx: Ctx, mask, keep: Value) -> Value:
    if mask is None:
        return keep
    if mask.dtype is DType.bool:
        return cx.op("tensor.and", mask, keep)
    return cx.op("tensor.where", keep, mask, cx.const(float("-inf"), mask.dtype))


# ---- losses ------------------------------------------------------------------------------------

_REDUCTION = {0: "none", 1: "mean", 2: "sum"}


@converter(aten.cross_entropy_loss.default)
def cross_entropy(cx: Ctx, logits, target, weight=None, reduction=1, ignore_index=-100,
                  label_smoothing=0.0):
    if weight is not None:
        raise NotConvertible("cross_entropy with class weights")
    if logits.type.rank == target.type.rank:
        raise NotConvertible("cross_entropy with class-probability targets")
    return cx.op("tensor.cross_entropy", logits, target, ignore_index=int(ignore_index),
                 label_smoothing=float(label_smoothing), reduction=_REDUCTION[reduction])


@converter(aten.nll_loss.default, aten.nll_loss_nd.default, aten.nll_loss_forward.default)
def nll_loss(cx: Ctx, logp, target, weight=None, reduction=1, ignore_index=-100):
    # nll(log_softmax(z)) == cross_entropy(z): fold the pair into one op.
    src = logp.op
    if weight is not None or src is None or src.name != "tensor.log_softmax" or \
            src.axis % logp.type.rank != min(1, logp.type.rank - 1):
        raise NotConvertible("nll_loss that does not follow log_softmax over the class axis")
    loss = cx.op("tensor.cross_entropy", src.x, target, ignore_index=int(ignore_index),
                 reduction=_REDUCTION[reduction])
    if cx.node.target is aten.nll_loss_forward.default:
        return loss, None  # (output, total_weight); total_weight is rarely used
    return loss


def _reduce_loss(cx: Ctx, elementwise: Value, reduction: int) -> Value:
    if _REDUCTION[reduction] == "none":
        return elementwise
    name = "tensor.mean" if _REDUCTION[reduction] == "mean" else "tensor.sum"
    return cx.op(name, elementwise, axes=tuple(range(elementwise.type.rank)))


@converter(aten.mse_loss.default)
def mse_loss(cx: Ctx, x, target, reduction=1):
    d = cx.op("tensor.sub", x, target)
    return _reduce_loss(cx, cx.op("tensor.mul", d, d), reduction)


@converter(aten.l1_loss.default)
def l1_loss(cx: Ctx, x, target, reduction=1):
    return _reduce_loss(cx, cx.op("tensor.abs", cx.op("tensor.sub", x, target)), reduction)


@converter(aten.kl_div.default)
def kl_div(cx: Ctx, logq, p, reduction=1, log_target=False):
    """torch's kl_div(input = log q, target = p): Σ p·(log p − log q), with 0·log 0 = 0.
    `reduction="batchmean"` reaches ATen as sum then a division by the batch size."""
    if log_target:
        pointwise = cx.op("tensor.mul", cx.op("tensor.exp", p), cx.op("tensor.sub", p, logq))
    else:
        zero = cx.const(0.0, p.dtype)
        logp = cx.op("tensor.log", cx.op("tensor.where", cx.op("tensor.gt", p, zero), p,
                                         cx.const(1.0, p.dtype)))
        pointwise = cx.op("tensor.mul", p, cx.op("tensor.sub", logp, logq))
    return _reduce_loss(cx, pointwise, reduction)


@converter(aten.binary_cross_entropy_with_logits.default)
def bce_with_logits(cx: Ctx, z, y, weight=None, pos_weight=None, reduction=1):
    """max(z, 0) − z·y + log(1 + exp(−|z|)): the stable form, as torch computes it."""
    if weight is not None or pos_weight is not None:
        raise NotConvertible("binary_cross_entropy_with_logits with weight or pos_weight")
    zero, one = cx.const(0.0, z.dtype), cx.const(1.0, z.dtype)
    softplus = cx.op("tensor.log", cx.op("tensor.add", one, cx.op(
        "tensor.exp", cx.op("tensor.neg", cx.op("tensor.abs", z)))))
    loss = cx.op("tensor.add", cx.op("tensor.sub", cx.op("tensor.maximum", z, zero),
                                     cx.op("tensor.mul", z, y)), softplus)
    return _reduce_loss(cx, loss, reduction)
