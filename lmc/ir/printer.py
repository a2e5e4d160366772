"""Prints IR as text in MLIR layout with jaxpr-style types; `lmc.ir.parser` reads it back.

    func @main(%x: f32[B,T,512], %w: f32[512,512] {param}) -> (f32[B,T,512]) {
      %0 = tensor.matmul %x, %w : f32[B,T,512]  loc("proj" "model.py":12)
      func.return %0
    }
"""
from __future__ import annotations

import json
import math
import re

from lmc.ir.core import Block, Func, Location, Module, Op, Value
from lmc.ir.types import DType

_NAME = re.compile(r"^[A-Za-z0-9_.$\-]+$")  # printed bare; other names are quoted


def format_attr(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, DType):
        return v.value
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    if hasattr(v, "tolist"):  # numpy scalars and small arrays from constant folding
        return format_attr(v.tolist())
    raise TypeError(f"cannot print attribute value {v!r}")


def format_loc(loc: Location) -> str:
    if not loc:
        return ""
    parts = [json.dumps(loc.path)]
    if loc.file:
        parts.append(f"{json.dumps(loc.file)}:{loc.line}")
    return f"loc({' '.join(parts)})"


class Printer:
    def __init__(self):
        self.names: dict[Value, str] = {}
        self.used: set[str] = set()
        self.counter = 0

    def name_arg(self, v: Value) -> str:
        # The name is kept exactly (quoted if need be): parameters are looked up by it.
        base = v.name or f"arg{v.index}"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        self.names[v] = name if _NAME.match(name) else json.dumps(name)
        return self.names[v]

    def name_result(self, v: Value) -> str:
        while str(self.counter) in self.used:
            self.counter += 1
        name = str(self.counter)
        self.counter += 1
        self.used.add(name)
        self.names[v] = name
        return name

    def ref(self, v: Value) -> str:
        try:
            return "%" + self.names[v]
        except KeyError:
            return f"%<undefined {v.type}>"  # only reachable when printing invalid IR

    def op(self, op: Op, indent: str) -> list[str]:
        lhs = ", ".join("%" + self.name_result(v) for v in op.result_values)
        text = indent + (lhs + " = " if lhs else "") + op.name
        if op.operand_values:
            text += " " + ", ".join(self.ref(v) for v in op.operand_values)
        attrs = [(k, v) for k, v in op.attributes.items()]
        if attrs:
            text += " {" + ", ".join(f"{k} = {format_attr(v)}" for k, v in attrs) + "}"
        if op.result_values:
            text += " : " + ", ".join(str(v.type) for v in op.result_values)
        if op.loc:
            text += "  " + format_loc(op.loc)
        if not op.regions:
            return [text]
        lines = [text + " {"]
        for region in op.regions:
            for block in region.blocks:
                lines += self.block(block, indent)
        lines.append(indent + "}")
        return lines

    def block(self, block: Block, indent: str) -> list[str]:
        args = ", ".join(f"%{self.name_arg(a)}: {a.type}" for a in block.args)
        lines = [f"{indent}^bb({args}):"]
        for op in block.ops:
            lines += self.op(op, indent + "  ")
        return lines

    def func(self, f: Func) -> list[str]:
        args = []
        for a, kind in zip(f.body.args, f.arg_kinds):
            suffix = "" if kind == "input" else f" {{{kind}}}"
            args.append(f"%{self.name_arg(a)}: {a.type}{suffix}")
        results = ", ".join(str(t) for t in _safe_result_types(f))
        lines = [f"func @{f.name}({', '.join(args)}) -> ({results}) {{"]
        for op in f.body.ops:
            lines += self.op(op, "  ")
        lines.append("}")
        return lines


def _safe_result_types(f: Func):
    term = f.body.terminator
    return [v.type for v in term.operand_values] if term is not None else []


def print_module(m: Module) -> str:
    out: list[str] = []
    for f in m.funcs.values():
        out += Printer().func(f)
        out.append("")
    return "\n".join(out)


def print_func(f: Func) -> str:
    return "\n".join(Printer().func(f)) + "\n"
