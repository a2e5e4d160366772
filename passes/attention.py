"""raise-attention: attention written out by hand becomes one `tensor.attention` op.

    s = q @ kᵀ  [· c | / c]  [where(mask, s, -inf) | where(¬mask, -inf, s) | + additive]
    p = softmax(s, axis=-1);  y = p @ v          ⇒   y = tensor.attention q, k, v[, mask]

so that `fuse` can give it the tiled kernel that never materializes the T×T scores. A boolean
mask that is a top-left [T, T] slice of a lower-triangular `{buffer}` (the GPT `self.mask`) is
recognized from the buffer's data and becomes `{causal = true}` with no mask operand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmc.errors import LmcError
from lmc.ir.core import Func, Module, Op, Value
from lmc.ir.rewriter import Rewriter, splat_value
from lmc.ir.types import DType, dims_equal
from lmc.pass_base import Pass, register_pass
from lmc.passes.dce import eliminate_dead_ops


def _def(v: Value, *names: str) -> Op | None:
    op = v.op
    return op if op is not None and op.name in names else None


@dataclass
class _Scores:
    """What was peeled off the scores before the softmax."""

    qk: Op                   # the q @ kᵀ matmul
    scale: float = 1.0
    keep: Value | None = None     # boolean mask, True = keep
    additive: Value | None = None  # float mask added to the scores


def _peel_mask(s: Value, out: _Scores) -> Value:
    where = _def(s, "tensor.where")
    if where is not None and len(where.result.uses) == 1:
        c, a, b = where.operand_values
        if splat_value(b) == -math.inf:
            out.keep = c
            return a
        if splat_value(a) == -math.inf:
            neg = _def(c, "tensor.not")
            out.keep = neg.x if neg is not None else None
            if out.keep is not None:
                return b
    add = _def(s, "tensor.add")
    if add is not None and len(add.result.uses) == 1:
        for scores, mask in ((add.lhs, add.rhs), (add.rhs, add.lhs)):
            if _def(scores, "tensor.matmul", "tensor.mul", "tensor.div") is not None and \
                    _def(mask, "tensor.matmul") is None:
                out.additive = mask
                return scores
    return s


def _is_one_element(v: Value) -> bool:
    return v.type.is_static and all(d == 1 for d in v.type.shape)


def _peel_scale(s: Value, out: _Scores) -> Value:
    op = _def(s, "tensor.mul", "tensor.div")
    if op is None or len(op.result.uses) != 1:
        return s
    c = splat_value(op.rhs)
    if c is None or not _is_one_element(op.rhs):
        return s
    out.scale = float(c) if op.name == "tensor.mul" else 1.0 / float(c)
    return op.lhs


def match_scores(s: Value) -> _Scores | None:
    """The parts of `scale·(q@kᵀ) + mask` (in any of the usual orders), or None."""
    out = _Scores(qk=None)  # type: ignore[arg-type]
    s = _peel_scale(_peel_mask(_peel_scale(s, out), out), out)
    qk = _def(s, "tensor.matmul")
    if qk is None or len(qk.result.uses) != 1:
        return None
    out.qk = qk
    return out


def _is_tril_slice(keep: Value, module: Module, tq, tk) -> bool:
    """keep = buffer[:Tq][:, :Tk] with buffer lower-triangular ones, and Tq == Tk."""
    if not dims_equal(tq, tk):
        return False
    v, axes = keep, set()
    while (op := _def(v, "tensor.slice")) is not None:
        if op.start != 0 or op.step != 1:
            return False
        axes.add(op.axis % 2)
        v = op.x
    arr = module.params.get(v.name) if v.op is None else None
    if arr is None or arr.ndim != 2 or arr.dtype != np.bool_ or arr.shape[0] != arr.shape[1]:
        return False
    return bool((arr == np.tril(np.ones(arr.shape, bool))).all())


def _transposed(rw: Rewriter, kt: Value) -> Value:
    """kᵀ → k by swapping the last two dims (canonicalize merges it with kᵀ's own permute)."""
    perm = list(range(kt.type.rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return rw.value("tensor.permute", kt, perm=tuple(perm))


def raise_one(pv: Op, module: Module) -> bool:
    """Replace `softmax(scores) @ v` rooted at matmul `pv` by tensor.attention; True if done."""
    sm = _def(pv.lhs, "tensor.softmax")
    if sm is None or len(sm.result.uses) != 1 or sm.axis not in (-1, sm.x.type.rank - 1):
        return False
    parts = match_scores(sm.x)
    if parts is None:
        return False
    q, kt, v = parts.qk.lhs, parts.qk.rhs, pv.rhs
    rank = q.type.rank
    if rank < 3 or kt.type.rank != rank or v.type.rank != rank or not q.dtype.is_float:
        return False
    if not all(dims_equal(a, b) for a, b in zip(q.shape[:-2], kt.shape[:-2])) or \
            not all(dims_equal(a, b) for a, b in zip(q.shape[:-2], v.shape[:-2])):
        return False
    rw = Rewriter(pv.parent, pv)
    mask, causal = parts.keep if parts.keep is not None else parts.additive, False
    if parts.keep is not None and _is_tril_slice(parts.keep, module, q.shape[-2],
                                                  kt.shape[-1]):
        mask, causal = None, True
    if mask is not None and mask.dtype is not DType.bool and mask.dtype != q.dtype:
        return False
    k = _transposed(rw, kt)
    operands = [q, k, v] + ([mask] if mask is not None else [])
    try:
        att = rw.value("tensor.attention", *operands, causal=causal, scale=parts.scale,
                       loc=pv.loc)
    except LmcError:  # shapes that only matmul broadcasting made fit
        att = None
    if att is None or att.type != pv.result.type:
        for op in reversed(rw.created):
            rw.erase_op(op)
        return False
    rw.replace_all_uses(pv.result, att)
    return True


@register_pass
@dataclass(frozen=True)
class RaiseAttention(Pass):
    """Hand-written softmax(q kᵀ·c + mask) v → tensor.attention (causal from a tril buffer)."""

    name = "raise-attention"

    def run(self, module: Module) -> dict[str, Any]:
        raised = 0
        for f in module.funcs.values():
            raised += _raise_func(f, module)
        return {"raised": raised}


def _raise_func(f: Func, module: Module) -> int:
    raised = 0
    for op in list(f.body.ops):
        if op.parent is not None and op.name == "tensor.matmul" and raise_one(op, module):
            raised += 1
    if raised:
        eliminate_dead_ops(f.body)
    return raised
