"""Rewriting: a `Rewriter` through which all mutation goes, `(pattern, fn)` rules with named
captures, and one greedy driver that applies a rule set to a fixed point (DESIGN.md §4).

A pattern matches a *value* by the op that defines it:

    P("tensor.mul", P.var("x"), P.const(1.0))        # x * 1.0, capturing x
    P(("tensor.add", "tensor.sub"), name="root")     # any add or sub, capturing the value

A rule is `(pattern, fn)`; `fn(rw, **captures)` returns the replacement value (or a list for
multi-result ops), or None when it declines. `root` is always captured: the matched op's result.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmc.ir.core import Block, Func, Location, Module, Op, Value
from lmc.ir.ops import op_class
from lmc.ir.types import TensorType


class Rewriter:
    """Inserts, replaces and erases ops while keeping use lists right."""

    def __init__(self, block: Block | None = None, before: Op | None = None):
        self.block, self.before = block, before
        self.created: list[Op] = []  # ops this rewriter inserted, so a declining rule can undo

    def set_insertion_point(self, op: Op) -> None:
        self.block, self.before = op.parent, op

    def insert(self, op: Op) -> Op:
        assert self.block is not None, "no insertion point"
        idx = self.block.index(self.before) if self.before is not None else len(self.block.ops)
        self.block.insert(idx, op)
        self.created.append(op)
        return op

    def create(self, name: str, operands: Sequence[Value], attrs: dict | None = None,
               result_types: Sequence[TensorType] | None = None,
               loc: Location | None = None) -> Op:
        """Build op `name` before the insertion point; its location defaults to the anchor's."""
        if loc is None:
            loc = self.before.loc if self.before is not None else Location()
        return self.insert(op_class(name)(list(operands), attrs or {}, result_types, (), loc))

    def value(self, name: str, *operands: Value, result_type: TensorType | None = None,
              loc: Location | None = None, **attrs) -> Value:
        """`create` for the common single-result case; returns the result value."""
        types = None if result_type is None else [result_type]
        return self.create(name, operands, attrs, types, loc).result

    def constant(self, value, type: TensorType, loc: Location | None = None) -> Value:
        return self.value("tensor.constant", value=value, result_type=type, loc=loc)

    def replace_op(self, op: Op, new_values: Sequence[Value]) -> None:
        for old, new in zip(op.result_values, new_values):
            if old is not new:
                old.replace_all_uses_with(new)
        self.erase_op(op)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        if old is not new:
            old.replace_all_uses_with(new)

    def erase_op(self, op: Op) -> None:
        for v in op.result_values:
            if v.uses:
                raise ValueError(f"cannot erase {op.name}: its result still has uses")
        op.drop_operands()
        op.parent.remove(op)


# ---- patterns --------------------------------------------------------------------------------

@dataclass(frozen=True)
class P:
    """Pattern over a value. `ops` None matches any value; `args` None ignores the operands."""

    ops: str | tuple[str, ...] | None = None
    args: tuple[P, ...] | None = None
    name: str | None = None
    pred: Callable[[Value], bool] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, ops=None, *args: P, name: str | None = None,
                 pred: Callable[[Value], bool] | None = None, **attrs):
        object.__setattr__(self, "ops", (ops,) if isinstance(ops, str) else ops)
        object.__setattr__(self, "args", tuple(args) if args else None)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "pred", pred)
        object.__setattr__(self, "attrs", attrs)

    @staticmethod
    def var(name: str, pred: Callable[[Value], bool] | None = None) -> P:
        return P(None, name=name, pred=pred)

    @staticmethod
    def const(value: float | None = None, name: str | None = None) -> P:
        """A splat constant, optionally with a given value."""
        def check(v: Value) -> bool:
            return value is None or splat_value(v) == value
        return P("tensor.constant", name=name, pred=check)

    def match(self, v: Value, caps: dict[str, Any], why: list[str] | None = None) -> bool:
        op = v.op
        if self.ops is not None:
            if op is None or op.name not in self.ops:
                return _fail(why, f"{_desc(v)} is not {'/'.join(self.ops)}")
            for k, want in self.attrs.items():
                if op.attributes.get(k) != want:
                    return _fail(why, f"{op.name}.{k} is {op.attributes.get(k)!r}, not {want!r}")
        if self.pred is not None and not self.pred(v):
            return _fail(why, f"{_desc(v)} fails the predicate")
        if self.name is not None:
            if self.name in caps and caps[self.name] is not v:
                return _fail(why, f"capture '{self.name}' bound to two different values")
            caps[self.name] = v
        if self.args is not None:
            if op is None or len(op.operand_values) != len(self.args):
                return _fail(why, f"{_desc(v)} has a different operand count")
            return all(p.match(a, caps, why) for p, a in zip(self.args, op.operand_values))
        return True


def _fail(why: list[str] | None, reason: str) -> bool:
    if why is not None:
        why.append(reason)
    return False


def _desc(v: Value) -> str:
    return v.op.name if v.op is not None else f"argument %{v.name}"


def splat_value(v: Value):
    """The scalar of a splat constant, else None."""
    op = v.op
    if op is None or op.name != "tensor.constant":
        return None
    arr = np.asarray(op.value)
    if arr.ndim == 0:
        return arr.item()
    flat = arr.reshape(-1)
    return flat[0].item() if flat.size and (flat == flat[0]).all() else None


Rule = tuple[P, Callable[..., Any]]


class RuleSet:
    """Rules indexed by root op name so that the driver tries only rules that can match."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = list(rules)
        self.by_op: dict[str, list[Rule]] = {}
        self.any_op: list[Rule] = []
        for rule in self.rules:
            pat = rule[0]
            if pat.ops is None:
                self.any_op.append(rule)
            for name in pat.ops or ():
                self.by_op.setdefault(name, []).append(rule)

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(self.rules + other.rules)

    def candidates(self, op: Op) -> list[Rule]:
        return self.by_op.get(op.name, []) + self.any_op

    def explain(self, op: Op) -> list[str]:
        """Why each rule for this op did not match (for debugging a rule set)."""
        out = []
        for pat, fn in self.candidates(op):
            why: list[str] = []
            if len(op.result_values) == 1 and not pat.match(op.result, {}, why):
                out.append(f"{getattr(fn, '__name__', fn)}: {why[-1] if why else 'no match'}")
        return out


def apply_rules(func: Func, rules: RuleSet, max_iterations: int = 50) -> bool:
    """Greedy driver: apply rules to every op until nothing changes; True if anything did."""
    changed_any = False
    for _ in range(max_iterations):
        changed = False
        for op in list(func.body.ops):
            if op.parent is None:  # erased by an earlier rewrite in this sweep
                continue
            if _rewrite_one(op, rules):
                changed = True
        changed_any |= changed
        if not changed:
            return changed_any
    return changed_any


def _rewrite_one(op: Op, rules: RuleSet) -> bool:
    if not op.result_values:
        return False
    for pat, fn in rules.candidates(op):
        caps: dict[str, Any] = {}
        root = op.result_values[0]
        if not pat.match(root, caps):
            continue
        rw = Rewriter(op.parent, op)
        caps.setdefault("root", root)
        out = fn(rw, **caps)
        if out is None:
            _drop_unused(rw, op)
            continue
        new = list(out) if isinstance(out, (list, tuple)) else [out]
        if all(n is o for n, o in zip(new, op.result_values)):
            _drop_unused(rw, op)
            continue
        rw.replace_op(op, new)
        return True
    return False


def _drop_unused(rw: Rewriter, anchor: Op) -> None:
    # A rule that declined may have built ops first; remove those it left without uses (only
    # those: dead ops that were there before are DCE's business, not the driver's).
    for op in reversed(rw.created):
        if op.parent is not None and op.pure and not any(v.uses for v in op.result_values):
            rw.erase_op(op)


def for_each_func(m: Module, fn: Callable[[Func], Any]) -> None:
    for f in m.funcs.values():
        fn(f)
