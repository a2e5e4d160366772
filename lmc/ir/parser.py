"""Reads the text that `lmc.ir.printer` writes. Errors are `ParseError` with line and column."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmc.errors import LmcError, ParseError
from lmc.ir.core import ARG_KINDS, Block, Func, Location, Module, Region, Value
from lmc.ir.ops import OPS
from lmc.ir.types import DType, TensorType, canon_dim

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+|//[^\n]*|\#[^\n]*) |
    (?P<nl>\n) |
    (?P<arrow>->) |
    (?P<value>%[A-Za-z0-9_.$\-]+|%"(?:[^"\\]|\\.)*") |
    (?P<symbol>@[A-Za-z0-9_.$\-]+) |
    (?P<label>\^[A-Za-z0-9_]+) |
    (?P<number>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+) |
    (?P<string>"(?:[^"\\]|\\.)*") |
    (?P<ident>[A-Za-z_][A-Za-z0-9_.]*) |
    (?P<punct>[()\[\]{},:=*+\-/])
""", re.VERBOSE)

_DTYPES = {d.value for d in DType}


@dataclass
class Token:
    kind: str
    text: str
    line: int
    col: int


def tokenize(text: str, source: str) -> list[Token]:
    tokens, pos, line, line_start = [], 0, 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r}", line, pos - line_start + 1,
                             source)
        kind = m.lastgroup
        if kind == "nl":
            line, line_start = line + 1, m.end()
        elif kind != "ws":
            tokens.append(Token(kind, m.group(), line, m.start() - line_start + 1))
        pos = m.end()
    tokens.append(Token("eof", "", line, pos - line_start + 1))
    return tokens


class Parser:
    def __init__(self, text: str, source: str = "<text>"):
        self.source = source
        self.toks = tokenize(text, source)
        self.i = 0

    # -- token helpers ---------------------------------------------------------------------------

    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def error(self, message: str, tok: Token | None = None) -> ParseError:
        tok = tok or self.tok
        return ParseError(message, tok.line, tok.col, self.source)

    def next(self) -> Token:
        t = self.tok
        self.i += 1
        return t

    def at(self, text: str) -> bool:
        return self.tok.text == text and self.tok.kind != "string"

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> Token:
        if not self.at(text):
            found = self.tok.text or "end of input"
            raise self.error(f"expected '{text}', found '{found}'")
        return self.next()

    def expect_kind(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            raise self.error(f"expected {what}, found '{self.tok.text or 'end of input'}'")
        return self.next()

    # -- grammar ---------------------------------------------------------------------------------

    def module(self, params: dict[str, np.ndarray] | None) -> Module:
        m = Module(params=dict(params or {}))
        while self.tok.kind != "eof":
            name_tok = self.peek()
            f = self.func()
            if f.name in m.funcs:
                raise self.error(f"function @{f.name} is defined twice", name_tok)
            m.add_func(f)
        if not m.funcs:
            raise self.error("no function in the text")
        return m

    def func(self) -> Func:
        self.expect("func")
        name = self.expect_kind("symbol", "a function name like @main").text[1:]
        f = Func(name)
        scope: dict[str, Value] = {}
        self.expect("(")
        while not self.at(")"):
            tok = self.expect_kind("value", "an argument like %x")
            self.expect(":")
            ty = self.type()
            kind = "input"
            if self.accept("{"):
                kind_tok = self.expect_kind("ident", "param, buffer, state or input")
                if kind_tok.text not in ARG_KINDS:
                    raise self.error(f"argument kind must be one of {ARG_KINDS}", kind_tok)
                kind = kind_tok.text
                self.expect("}")
            self.define(scope, tok, f.add_arg(ty, _value_name(tok), kind))
            if not self.accept(","):
                break
        self.expect(")")
        self.expect("->")
        declared = self.type_list_parens()
        self.expect("{")
        while not self.at("}"):
            self.op(f.body, scope)
        end = self.expect("}")
        ret = f.body.terminator
        if ret is None or ret.name != "func.return":
            raise self.error(f"function @{name} must end in func.return", end)
        if [v.type for v in ret.operand_values] != declared:
            raise self.error(f"@{name} returns {[str(v.type) for v in ret.operand_values]} but "
                             f"declares {[str(t) for t in declared]}", end)
        return f

    def type_list_parens(self) -> list[TensorType]:
        self.expect("(")
        out = []
        while not self.at(")"):
            out.append(self.type())
            if not self.accept(","):
                break
        self.expect(")")
        return out

    def type(self) -> TensorType:
        tok = self.expect_kind("ident", "a type like f32[B,128]")
        if tok.text not in _DTYPES:
            raise self.error(f"unknown dtype '{tok.text}' (known: {sorted(_DTYPES)})", tok)
        self.expect("[")
        dims = []
        while not self.at("]"):
            dims.append(self.dim())
            if not self.accept(","):
                break
        self.expect("]")
        return TensorType(tuple(dims), DType(tok.text))

    def dim(self):
        start, depth, parts = self.tok, 0, []
        while depth > 0 or not (self.at(",") or self.at("]")):
            t = self.next()
            if t.kind not in ("ident", "number", "punct") or t.line != start.line:
                raise self.error("malformed dim (is a ']' missing?)", t)
            depth += (t.text == "(") - (t.text == ")")
            parts.append(t.text)
        if not parts:
            raise self.error("empty dim", start)
        try:
            return canon_dim("".join(parts))
        except LmcError as exc:
            raise self.error(str(exc), start) from None

    def define(self, scope: dict[str, Value], tok: Token, v: Value) -> None:
        name = _value_name(tok)
        if name in scope:
            raise self.error(f"value %{name} is defined twice", tok)
        scope[name] = v

    def use(self, scope: dict[str, Value]) -> Value:
        tok = self.expect_kind("value", "an operand like %0")
        try:
            return scope[_value_name(tok)]
        except KeyError:
            raise self.error(f"use of undefined value {tok.text}", tok) from None

    def op(self, block: Block, scope: dict[str, Value]) -> None:
        start = self.tok
        result_toks = []
        if self.tok.kind == "value":
            while True:
                result_toks.append(self.expect_kind("value", "a result name"))
                if not self.accept(","):
                    break
            self.expect("=")
        name_tok = self.expect_kind("ident", "an op name like tensor.add")
        cls = OPS.get(name_tok.text)
        if cls is None:
            raise self.error(f"unknown op '{name_tok.text}'", name_tok)
        operands = []
        if self.tok.kind == "value":
            while True:
                operands.append(self.use(scope))
                if not self.accept(","):
                    break
        attrs = self.attr_dict() if self.at("{") and (
            self.peek().kind == "ident" or self.peek().text == "}") else {}
        types = []
        if result_toks:
            self.expect(":")
            for k in range(len(result_toks)):
                if k:
                    self.expect(",")
                types.append(self.type())
        loc = self.loc() if self.at("loc") else Location()
        regions = []
        if self.at("{") and self.peek().kind == "label":
            regions.append(self.region())
        try:
            op = cls(operands, attrs, types, regions, loc)
        except LmcError as exc:
            raise self.error(f"{name_tok.text}: {exc}", start) from None
        block.append(op)
        for tok, v in zip(result_toks, op.result_values):
            self.define(scope, tok, v)

    def region(self) -> Region:
        self.expect("{")
        blocks = []
        while self.tok.kind == "label":
            self.next()
            block, scope = Block(), {}
            self.expect("(")
            while not self.at(")"):
                tok = self.expect_kind("value", "a block argument")
                self.expect(":")
                self.define(scope, tok, block.add_arg(self.type(), _value_name(tok)))
                if not self.accept(","):
                    break
            self.expect(")")
            self.expect(":")
            while not (self.at("}") or self.tok.kind == "label"):
                self.op(block, scope)
            blocks.append(block)
        self.expect("}")
        return Region(blocks)

    def loc(self) -> Location:
        self.expect("loc")
        self.expect("(")
        path = json.loads(self.expect_kind("string", "a location string").text)
        file, line = "", 0
        if self.tok.kind == "string":
            file = json.loads(self.next().text)
            self.expect(":")
            line = int(self.expect_kind("number", "a line number").text)
        self.expect(")")
        return Location(path, file, line)

    def attr_dict(self) -> dict:
        self.expect("{")
        out = {}
        while not self.at("}"):
            key = self.expect_kind("ident", "an attribute name").text
            self.expect("=")
            out[key] = self.attr_value()
            if not self.accept(","):
                break
        self.expect("}")
        return out

    def attr_value(self):
        tok = self.next()
        if tok.text == "[" and tok.kind == "punct":
            items = []
            while not self.at("]"):
                items.append(self.attr_value())
                if not self.accept(","):
                    break
            self.expect("]")
            return items
        if tok.text == "-" and tok.kind == "punct":
            v = self.attr_value()
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self.error("'-' must precede a number", tok)
            return -v
        if tok.kind == "number":
            return float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
        if tok.kind == "string":
            return json.loads(tok.text)
        if tok.kind == "ident":
            consts = {"true": True, "false": False, "none": None, "nan": float("nan"),
                      "inf": float("inf")}
            if tok.text in consts:
                return consts[tok.text]
            if tok.text in _DTYPES:
                return DType(tok.text)
        raise self.error(f"malformed attribute value '{tok.text}'", tok)


def _value_name(tok: Token) -> str:
    """`%x` -> x; `%"onnx::Add_1"` -> onnx::Add_1 (names outside [A-Za-z0-9_.$-] are quoted)."""
    return json.loads(tok.text[1:]) if tok.text.startswith('%"') else tok.text[1:]


def parse(text: str, params: dict[str, np.ndarray] | None = None,
          source: str = "<text>") -> Module:
    """Parse a whole module. `params` holds the arrays of its {param}/{buffer} arguments."""
    m = Parser(text, source).module(params)
    _attrs_to_tuples(m)
    return m


def _attrs_to_tuples(m: Module) -> None:
    # Lists parse as Python lists; ops hold tuples so that attributes are hashable (CSE keys).
    for op in m.walk():
        for k, v in op.attributes.items():
            if isinstance(v, list):
                op.attributes[k] = _tuple(v)


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, list) else v


def parse_file(path: str | Path, weights: str | Path | None = None) -> Module:
    """Parse a `.lmc` file. Weights come from `weights` if given, else from `<file>.safetensors`
    or, for IR dumps, `weights.safetensors` in the same folder; only the arrays the text names
    are kept."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LmcError(f"cannot read IR file {path}: {exc.strerror}") from None
    m = parse(text, source=str(path))
    candidates = [Path(weights)] if weights else [
        path.with_suffix(path.suffix + ".safetensors"), path.parent / "weights.safetensors"]
    for w in candidates:
        if w.exists():
            from safetensors.numpy import load_file

            names = {a.name for f in m.funcs.values() for a in f.weights}
            m.params = {k: v for k, v in load_file(str(w)).items() if k in names}
            break
    return m
