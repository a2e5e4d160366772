"""The IR's objects: SSA values with use lists, ops, blocks, regions, functions and modules.

Modeled on xDSL's core and torch.fx's Graph: every value knows its defining op and its uses, so a
rewrite can replace all uses of a value in one call. Op classes live in `lmc.ir.ops`; this file
knows nothing about what any particular op means.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lmc.errors import ShapeError, VerificationError
from lmc.ir.types import DType, TensorType


@dataclass(frozen=True)
class Location:
    """Where an op came from: a torch module path (+ Python file:line) or an ONNX node name."""

    path: str = ""
    file: str = ""
    line: int = 0

    def __bool__(self) -> bool:
        return bool(self.path or self.file)

    def __str__(self) -> str:
        src = f"{self.file}:{self.line}" if self.file else ""
        return " ".join(x for x in (self.path and f"'{self.path}'", src) if x) or "<unknown>"


UNKNOWN_LOC = Location()


class Value:
    """An SSA value: a block argument or an op result."""

    __slots__ = ("index", "name", "owner", "type", "uses")

    def __init__(self, type: TensorType, owner: Op | Block, index: int, name: str = ""):
        self.type = type
        self.owner = owner
        self.index = index
        self.uses: list[tuple[Op, int]] = []  # (user op, operand position)
        self.name = name  # block arguments keep a user-facing name ("x", "blocks.0.ln1.weight")

    @property
    def op(self) -> Op | None:
        """The defining op, or None for a block argument."""
        return self.owner if isinstance(self.owner, Op) else None

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def users(self) -> list[Op]:
        seen: dict[int, Op] = {}
        for op, _ in self.uses:
            seen.setdefault(id(op), op)
        return list(seen.values())

    def replace_all_uses_with(self, new: Value) -> None:
        for op, i in list(self.uses):
            op.set_operand(i, new)

    def __repr__(self) -> str:
        kind = self.owner.name if isinstance(self.owner, Op) else "arg"
        return f"<Value {self.name or '#' + str(self.index)} of {kind}: {self.type}>"


REQUIRED = object()  # marks an attribute without a default


class Op:
    """Base of every op class. Subclasses declare, as class attributes:

    name      -- "dialect.op"
    operands  -- names of the operands, in order; a trailing "*rest" takes any number
    attrs     -- {attribute name: default or REQUIRED}; read them as `op.axis`
    results   -- number of results (None: as many as the declared result types)
    declared  -- True when the result type cannot be derived from operands and attributes
                 (reshape, constants): it is then given by the builder/the text and checked by
                 `verify()` instead of computed by `infer_type()`
    """

    name: ClassVar[str] = ""
    operands: ClassVar[tuple[str, ...]] = ()
    attrs: ClassVar[dict[str, Any]] = {}
    results: ClassVar[int | None] = 1
    declared: ClassVar[bool] = False
    has_region: ClassVar[bool] = False
    pure: ClassVar[bool] = True  # no side effects: may be CSE'd and DCE'd

    def __init__(self, operands: Sequence[Value], attributes: dict[str, Any] | None = None,
                 result_types: Sequence[TensorType] | None = None,
                 regions: Sequence[Region] = (), loc: Location = UNKNOWN_LOC):
        self.operand_values: list[Value] = []
        self.loc = loc  # first: attribute errors below name the location
        self.attributes: dict[str, Any] = self._fill_attrs(attributes or {})
        self.regions: list[Region] = list(regions)
        for r in self.regions:
            r.parent = self
        self.parent: Block | None = None
        for v in operands:
            self._add_operand(v)
        if result_types is None:
            if self.declared:
                raise ShapeError(f"{self.name} needs its result type given")
            inferred = self.infer_type()
            result_types = inferred if isinstance(inferred, tuple) else (inferred,)
        self.result_values = [Value(t, self, i) for i, t in enumerate(result_types)]

    # -- attributes and named operands ---------------------------------------------------------

    def _fill_attrs(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = set(given) - set(self.attrs)
        if unknown:
            raise VerificationError(f"unknown attribute(s) {sorted(unknown)}; "
                                    f"{self.name} takes {sorted(self.attrs)}", op=self)
        out = {}
        for k, default in self.attrs.items():
            if k in given:
                out[k] = given[k]
            elif default is REQUIRED:
                raise VerificationError(f"{self.name} needs attribute '{k}'", op=self)
            else:
                out[k] = default
        return out

    def __getattr__(self, key: str):
        # Only reached when normal lookup fails: typed access to attributes and named operands.
        if key.startswith("_") or key in ("attributes", "operand_values"):
            raise AttributeError(key)
        if key in self.attributes:
            return self.attributes[key]
        names = [n.rstrip("?") for n in type(self).operands]
        if key in names:
            i = names.index(key)
            return self.operand_values[i] if i < len(self.operand_values) else None
        raise AttributeError(f"{type(self).__name__} ({self.name}) has no attribute '{key}'")

    # -- operands, results, uses ---------------------------------------------------------------

    def _add_operand(self, v: Value) -> None:
        if not isinstance(v, Value):
            raise TypeError(f"{self.name}: operand {v!r} is not a Value")
        v.uses.append((self, len(self.operand_values)))
        self.operand_values.append(v)

    def set_operand(self, i: int, new: Value) -> None:
        old = self.operand_values[i]
        old.uses.remove((self, i))
        new.uses.append((self, i))
        self.operand_values[i] = new

    def drop_operands(self) -> None:
        for i, v in enumerate(self.operand_values):
            v.uses.remove((self, i))
        self.operand_values = []

    @property
    def result(self) -> Value:
        if len(self.result_values) != 1:
            raise ValueError(f"{self.name} has {len(self.result_values)} results, not one")
        return self.result_values[0]

    @property
    def inputs(self) -> list[Value]:
        return self.operand_values

    @property
    def outputs(self) -> list[Value]:
        return self.result_values

    @property
    def body(self) -> Block:
        return self.regions[0].blocks[0]

    # -- semantics hooks -----------------------------------------------------------------------

    def infer_type(self) -> TensorType | tuple[TensorType, ...]:
        raise ShapeError(f"{self.name} cannot infer its result type")

    def verify(self) -> None:
        """Check operand count, attributes and result types; subclasses add their own rules."""
        names = type(self).operands
        variadic = bool(names) and names[-1].startswith("*")
        fixed = len(names) - variadic
        optional = sum(1 for n in names if n.endswith("?"))
        n = len(self.operand_values)
        if n < fixed - optional or (not variadic and n > fixed):
            raise VerificationError(f"expects {len(names)} operand(s) {list(names)}, got {n}",
                                    op=self)
        if self.results is not None and len(self.result_values) != self.results:
            raise VerificationError(f"expects {self.results} result(s)", op=self)
        unknown = set(self.attributes) - set(self.attrs)
        if unknown:
            raise VerificationError(f"unknown attribute(s) {sorted(unknown)}; "
                                    f"{self.name} takes {sorted(self.attrs)}", op=self)
        if not self.declared:
            inferred = self.infer_type()
            inferred = inferred if isinstance(inferred, tuple) else (inferred,)
            got = tuple(v.type for v in self.result_values)
            if inferred != got:
                raise VerificationError(
                    f"result type {', '.join(map(str, got))} does not match the inferred "
                    f"{', '.join(map(str, inferred))}", op=self)

    def clone(self, operands: Sequence[Value], mapping: dict[Value, Value] | None = None) -> Op:
        """A copy of this op with new operands (regions are cloned deeply)."""
        regions = [r.clone() for r in self.regions]
        new = type(self)(operands, dict(self.attributes),
                         [v.type for v in self.result_values], regions, self.loc)
        if mapping is not None:
            for a, b in zip(self.result_values, new.result_values):
                mapping[a] = b
        return new

    def __repr__(self) -> str:
        return f"<{self.name} {self.loc}>"


class Block:
    """A straight-line list of ops with typed arguments."""

    def __init__(self, arg_types: Sequence[TensorType] = (), arg_names: Sequence[str] = ()):
        names = list(arg_names) + [""] * (len(arg_types) - len(arg_names))
        self.args: list[Value] = [Value(t, self, i, n) for i, (t, n) in
                                  enumerate(zip(arg_types, names))]
        self.ops: list[Op] = []
        self.parent: Region | None = None

    def add_arg(self, type: TensorType, name: str = "") -> Value:
        v = Value(type, self, len(self.args), name)
        self.args.append(v)
        return v

    def append(self, op: Op) -> Op:
        op.parent = self
        self.ops.append(op)
        return op

    def insert(self, index: int, op: Op) -> Op:
        op.parent = self
        self.ops.insert(index, op)
        return op

    def index(self, op: Op) -> int:
        for i, o in enumerate(self.ops):
            if o is op:
                return i
        raise ValueError(f"{op} is not in this block")

    def remove(self, op: Op) -> None:
        del self.ops[self.index(op)]
        op.parent = None

    @property
    def terminator(self) -> Op | None:
        return self.ops[-1] if self.ops else None

    def walk(self) -> Iterator[Op]:
        for op in list(self.ops):
            yield op
            for r in op.regions:
                for b in r.blocks:
                    yield from b.walk()

    def clone(self) -> Block:
        new = Block([a.type for a in self.args], [a.name for a in self.args])
        mapping = dict(zip(self.args, new.args))
        for op in self.ops:
            new.append(op.clone([mapping[v] for v in op.operand_values], mapping))
        return new


class Region:
    """A list of blocks owned by an op (e.g. the body of `kernel.fused`)."""

    def __init__(self, blocks: Sequence[Block] = ()):
        self.blocks = list(blocks)
        self.parent: Op | None = None
        for b in self.blocks:
            b.parent = self

    def clone(self) -> Region:
        return Region([b.clone() for b in self.blocks])


ARG_KINDS = ("input", "param", "buffer", "state")


class Func:
    """A function: one block whose arguments are inputs, parameters (trainable weights),
    buffers (constant arrays) or state (optimizer slots a train step reads and returns anew),
    ending in `func.return`. Every kind but `input` has its array in `Module.params`."""

    def __init__(self, name: str, body: Block | None = None, arg_kinds: Sequence[str] = ()):
        self.name = name
        self.body = body or Block()
        self.arg_kinds: list[str] = list(arg_kinds) + ["input"] * (
            len(self.body.args) - len(arg_kinds))

    def add_arg(self, type: TensorType, name: str, kind: str = "input") -> Value:
        assert kind in ARG_KINDS, kind
        self.arg_kinds.append(kind)
        return self.body.add_arg(type, name)

    def args_of_kind(self, *kinds: str) -> list[Value]:
        return [a for a, k in zip(self.body.args, self.arg_kinds) if k in kinds]

    @property
    def inputs(self) -> list[Value]:
        return self.args_of_kind("input")

    @property
    def weights(self) -> list[Value]:
        return self.args_of_kind("param", "buffer", "state")

    @property
    def return_op(self) -> Op:
        term = self.body.terminator
        if term is None or term.name != "func.return":
            raise VerificationError(f"function @{self.name} does not end in func.return")
        return term

    @property
    def outputs(self) -> list[Value]:
        return list(self.return_op.operand_values)

    @property
    def result_types(self) -> list[TensorType]:
        return [v.type for v in self.outputs]

    def walk(self) -> Iterator[Op]:
        return self.body.walk()

    def remove_arg(self, value: Value) -> None:
        if value.uses:
            raise VerificationError(f"cannot remove argument %{value.name} of @{self.name}: "
                                    "it still has uses")
        i = self.body.args.index(value)
        del self.body.args[i]
        del self.arg_kinds[i]
        for j, a in enumerate(self.body.args):
            a.index = j


@dataclass
class Module:
    """A set of functions plus the arrays of their parameters and buffers, keyed by arg name.

    Weights are kept beside the IR, never printed inline: the text shows `{param}` arguments.
    """

    funcs: dict[str, Func] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    # What a frontend knows that the IR does not say: e.g. the output pytree spec of a torch
    # model, so that a compiled model returns the same structure. Not printed.
    meta: dict[str, Any] = field(default_factory=dict)

    def add_func(self, func: Func) -> Func:
        self.funcs[func.name] = func
        return func

    @property
    def main(self) -> Func:
        if "main" in self.funcs:
            return self.funcs["main"]
        return next(iter(self.funcs.values()))

    def walk(self) -> Iterator[Op]:
        for f in self.funcs.values():
            yield from f.walk()

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.walk():
            counts[op.name] = counts.get(op.name, 0) + 1
        return dict(sorted(counts.items()))

    def clone(self, text: str | None = None) -> Module:
        """Deep copy of the IR (weights are shared: passes replace arrays, never mutate them).
        `text`: this module's printed form, when the caller has it already."""
        from lmc.ir.parser import parse  # the text round-trip is the one copy mechanism tested
        from lmc.ir.printer import print_module
        m = parse(text if text is not None else print_module(self), params=dict(self.params))
        m.meta = dict(self.meta)
        return m

    def __str__(self) -> str:
        from lmc.ir.printer import print_module
        return print_module(self)
