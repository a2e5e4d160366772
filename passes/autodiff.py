"""`autodiff`: reverse-mode differentiation as a pass (DESIGN.md §6).

`@main(inputs, params, buffers) -> (loss, extra...)` becomes
`-> (loss, extra..., dloss/dparam for each {param} argument in argument order)`: the backward ops
are appended to the same function, built from the VJP table (passes/vjp.py), so that the
ordinary pipeline fuses and compiles forward and backward together. A reverse walk over the
ops sums gradients on fan-out; buffers (frozen parameters), inputs and integer tensors get none.

`checkpoint` trades compute for memory: instead of keeping a forward activation alive until the
backward reads it, the backward recomputes it from values kept anyway, behind `tensor.barrier`s
(so that CSE does not fold the recomputation back into the forward pass):
    none   keep every activation the backward reads
    cheap  recompute elementwise ops, normalizations, softmax and views; keep matmul, attention
           and reduction results (the usual "selective" checkpointing)
    blocks recompute everything inside each repeated block (a module path like `blocks.3`),
           keeping only the values that pass from one block to the next
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmc.errors import PipelineError
from lmc.ir.builder import Builder
from lmc.ir.core import Func, Module, Op, Value
from lmc.ir.rewriter import Rewriter
from lmc.ir.types import DType, TensorType, dim_add, dim_sub, dims_equal
from lmc.pass_base import Pass, register_pass
from lmc.passes.fuse import ELEMENTWISE
from lmc.passes.vjp import NO_GRAD, SlicePiece, operand_grads

CHEAP = frozenset(["tensor.softmax", "tensor.log_softmax", "tensor.layer_norm",
                   "tensor.rms_norm", "tensor.reshape", "tensor.permute", "tensor.broadcast",
                   "tensor.slice", "tensor.concat", "tensor.where", "tensor.cast", "tensor.gelu",
                   "tensor.constant", "tensor.iota"])
# Never recomputed: data-dependent sizes and side-effect-free ops whose results name new
# symbols must run once.
NEVER_RECOMPUTE = frozenset(["tensor.nonzero", "func.return"])
CHECKPOINT_POLICIES = ("none", "cheap", "blocks")


@register_pass
@dataclass(frozen=True)
class Autodiff(Pass):
    """Append the gradient of output 0 (a float scalar) with respect to every {param}."""

    name = "autodiff"
    inputs: bool = False        # also return gradients for the float inputs (after the params')
    checkpoint: str = "none"    # none | cheap | blocks (see the module docstring)

    def run(self, module: Module) -> dict[str, Any]:
        if self.checkpoint not in CHECKPOINT_POLICIES:
            raise PipelineError(f"autodiff{{checkpoint={self.checkpoint}}}: expected one of "
                                f"{', '.join(CHECKPOINT_POLICIES)}")
        func = module.main
        inline_fused(func)
        params = func.args_of_kind("param")
        wrt = params + ([a for a in func.inputs if a.dtype.is_float] if self.inputs else [])
        outputs = func.outputs
        loss = _loss(func, outputs)
        first_backward = len(func.body.ops) - 1
        grads, unreached = differentiate(func, loss, wrt)
        recomputed = rematerialize(func, first_backward, self.checkpoint)
        ret = func.return_op
        for g in grads:
            ret._add_operand(g)
        module.meta["autodiff"] = {"num_outputs": len(outputs), "params": [p.name for p in params],
                                   "unreached": [v.name for v in unreached if v in params]}
        return {"params": len(params), "gradients": len(grads),
                "unreached": [v.name for v in unreached], "recomputed": recomputed}


def _loss(func: Func, outputs: list[Value]) -> Value:
    if not outputs or outputs[0].type.rank != 0 or not outputs[0].dtype.is_float:
        got = str(outputs[0].type) if outputs else "nothing"
        raise PipelineError(f"autodiff differentiates output 0 of @{func.name}, which must be a "
                            f"float scalar loss; got {got}. Return the loss first (or give "
                            "lmc.compile_training a loss_fn)")
    return outputs[0]


def inline_fused(func: Func) -> None:
    """Replace each kernel.fused op by its body, so that the VJP table sees plain ops."""
    for op in list(func.body.ops):
        if op.name != "kernel.fused":
            continue
        body = op.body
        mapping: dict[Value, Value] = dict(zip(body.args, op.operand_values))
        at = func.body.index(op)
        for inner in body.ops:
            if inner.name == "kernel.yield":
                results = [mapping[v] for v in inner.operand_values]
                break
            new = inner.clone([mapping[v] for v in inner.operand_values], mapping)
            func.body.insert(at, new)
            at += 1
        Rewriter().replace_op(op, results)


# ---- the reverse walk ------------------------------------------------------------------------

def differentiate(func: Func, loss: Value, wrt: list[Value]) -> tuple[list[Value], list[Value]]:
    """Gradients of `loss` w.r.t. each of `wrt` (zeros where it does not reach the loss), built
    before the function's return; also returns the `wrt` values that do not reach it."""
    ops = [op for op in func.body.ops if op.name != "func.return"]
    active = _active_values(ops, loss, wrt)
    b = Builder(Rewriter(func.body, func.return_op))
    contributions: dict[Value, list] = {loss: [b.full(1.0, loss.type)]}
    for op in reversed(ops):
        if op.name in NO_GRAD or not any(v in active for v in op.operand_values):
            continue
        if not any(r in contributions for r in op.result_values):
            continue
        result_grads = [_total(b, contributions.pop(r), r.type) if r in contributions else
                        (b.zeros(r.type) if r.dtype.is_float else None)
                        for r in op.result_values]
        for v, g in zip(op.operand_values, operand_grads(b, op, result_grads)):
            if g is not None and v in active:
                contributions.setdefault(v, []).append(g)
    grads = [_total(b, contributions[v], v.type) if v in contributions else b.zeros(v.type)
             for v in wrt]
    for v, g in zip(wrt, grads):
        if g.type != v.type:  # a rule's bug, caught here rather than as a wrong update
            raise PipelineError(f"autodiff built a gradient of type {g.type} for %{v.name} of "
                                f"type {v.type}")
    return grads, [v for v in wrt if v not in contributions]


def _active_values(ops: list[Op], loss: Value, wrt: list[Value]) -> set[Value]:
    """Float values that depend on some `wrt` value and that the loss depends on."""
    depends = set(wrt)
    for op in ops:
        if op.name not in NO_GRAD and any(v in depends for v in op.operand_values):
            depends.update(r for r in op.result_values if r.dtype.is_float)
    needed = {loss}
    for op in reversed(ops):
        if any(r in needed for r in op.result_values):
            needed.update(op.operand_values)
    return {v for v in depends & needed if v.dtype.is_float}


def _total(b: Builder, parts: list, t: TensorType) -> Value:
    """Sum the gradient contributions of one value; slices of it become one padded concat."""
    pieces = [p for p in parts if isinstance(p, SlicePiece)]
    dense = [p for p in parts if not isinstance(p, SlicePiece)]
    if pieces:
        dense += _assemble(b, pieces, t)
    total = dense[0]
    for g in dense[1:]:
        total = b.add(total, g)
    return total


def _assemble(b: Builder, pieces: list[SlicePiece], t: TensorType) -> list[Value]:
    """Place slice gradients into x's shape: disjoint unit-step slices along one axis become a
    single concat with zero gaps (the q/k/v split gives one concat of three); any other slice
    gets its own zero padding."""
    by_axis: dict[int, list[SlicePiece]] = {}
    for p in pieces:
        by_axis.setdefault(p.axis, []).append(p)
    out = []
    for axis, group in by_axis.items():
        chain, others = _disjoint_chain(group)
        if chain:
            out.append(_concat_with_gaps(b, chain, axis, t))
        out += [_pad(b, p, t) for p in others]
    return out


def _disjoint_chain(group: list[SlicePiece]) -> tuple[list[SlicePiece], list[SlicePiece]]:
    """The unit-step slices that follow each other without overlap (every one but the last of
    static size), in order; and the rest."""
    chain, others, end = [], [], 0
    for p in sorted(group, key=lambda p: p.start):
        size = p.grad.shape[p.axis]
        if p.step != 1 or end is None or p.start < end:
            others.append(p)
            continue
        chain.append(p)
        end = p.start + size if isinstance(size, int) else None
    return chain, others


def _concat_with_gaps(b: Builder, chain: list[SlicePiece], axis: int, t: TensorType) -> Value:
    parts, at = [], 0
    for p in chain:
        if p.start > at:
            parts.append(b.zeros(_with_dim(t, axis, p.start - at)))
        parts.append(p.grad)
        at = dim_add(p.start, p.grad.shape[axis])
    rest = dim_sub(t.shape[axis], at)
    if not dims_equal(rest, 0):
        parts.append(b.zeros(_with_dim(t, axis, rest)))
    return parts[0] if len(parts) == 1 else b.op("tensor.concat", *parts, axis=axis)


def _with_dim(t: TensorType, axis: int, n) -> TensorType:
    shape = list(t.shape)
    shape[axis] = n
    return t.with_shape(shape)


def _pad(b: Builder, p: SlicePiece, t: TensorType) -> Value:
    """x-shaped zeros with the slice gradient scattered at start, start+step, ..."""
    size = p.grad.shape[p.axis]
    idx = b.op("tensor.iota", type=TensorType((size,), DType.i64), start=p.start, step=p.step)
    idx = b.broadcast(b.reshape(idx, [size if i == p.axis else 1 for i in range(t.rank)]),
                      p.grad.shape)
    return b.op("tensor.scatter", b.zeros(t), idx, p.grad, axis=p.axis, reduce="add")


# ---- checkpointing ---------------------------------------------------------------------------

def rematerialize(func: Func, first_backward: int, policy: str) -> int:
    """Recompute, inside the backward, the forward values it reads that `policy` allows;
    returns how many ops were recomputed."""
    if policy == "none":
        return 0
    body = func.body
    forward = set(body.ops[:first_backward])
    backward = body.ops[first_backward:]
    remat = _Remat(body, forward, policy)
    for op in backward:
        if op.name == "func.return":
            continue
        for i, v in enumerate(op.operand_values):
            if v.op in forward and remat.allowed(v.op):
                op.set_operand(i, remat.value(v, op))
    return remat.count


class _Remat:
    def __init__(self, body, forward: set[Op], policy: str):
        self.body, self.forward, self.policy = body, forward, policy
        self.copies: dict[Value, Value] = {}   # forward value → its recomputation
        self.barriers: dict[Value, Value] = {}  # kept forward value → its barrier
        self.count = 0
        self.crossing = _block_crossings(forward) if policy == "blocks" else set()

    def allowed(self, op: Op) -> bool:
        if op.name in NEVER_RECOMPUTE or op.regions:
            return False
        if self.policy == "blocks":
            return _block_of(op) is not None and not any(v in self.crossing
                                                         for v in op.result_values)
        return op.name in CHEAP or op.name in ELEMENTWISE

    def value(self, v: Value, before: Op) -> Value:
        """v recomputed just before `before` (once: later readers share the copy)."""
        if v in self.copies:
            return self.copies[v]
        op = v.op
        if op not in self.forward or not self.allowed(op):
            return self._kept(v, before)
        operands = [self.value(x, before) for x in op.operand_values]
        new = op.clone(operands, self.copies)
        self.body.insert(self.body.index(before), new)
        self.count += 1
        return self.copies[v]

    def _kept(self, v: Value, before: Op) -> Value:
        if v not in self.barriers:
            rw = Rewriter(self.body, before)
            self.barriers[v] = rw.value("tensor.barrier", v, loc=before.loc)
        return self.barriers[v]


def _block_of(op: Op) -> str | None:
    """The repeated block an op belongs to: its module path up to the first index
    (`blocks.3.attn.qkv` → `blocks.3`), or None outside any such block."""
    parts = op.loc.path.split(".") if op.loc.path else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return None


def _block_crossings(forward: set[Op]) -> set[Value]:
    """Forward values read in a block other than the one that made them: the checkpoints."""
    out = set()
    for op in forward:
        for v in op.operand_values:
            if v.op is not None and _block_of(v.op) != _block_of(op):
                out.add(v)
    return out
