"""The IR's text and invariants: print(parse(print(m))) == print(m) for every op case, golden
texts with symbolic dims, locations, regions and every kind of attribute; the verifier's and the
parser's errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from op_cases import CASES, Case, build, fused_module

import lmc
from lmc.ir import DType, TensorType, parse, print_module
from lmc.ir.core import REQUIRED, Block, Func, Location, Module, Op
from lmc.ir.rewriter import Rewriter
from lmc.ir.verifier import verify

F32_7 = TensorType((7,), DType.f32)


def round_trip(m: Module) -> str:
    text = print_module(m)
    again = parse(text, params=m.params)
    assert print_module(again) == text
    return text


# ---- round trip of every op ------------------------------------------------------------------

@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_round_trip_every_case(c: Case):
    m = build(c, [np.asarray(x) for x in c.make(c.rng())])
    text = round_trip(m)
    verify(m)
    again = parse(text)
    verify(again)
    assert print_module(again) == text
    assert print_module(again.clone()) == text


def test_round_trip_kernel_fused():
    m = fused_module()
    verify(m)
    text = round_trip(m)
    assert "^bb(%bx: f32[7,13], %by: f32[13]):" in text and "kernel.yield %3, %4" in text
    verify(parse(text))


# Canonical texts: parsing then printing gives back exactly the same characters.
GOLDEN = [
    # symbolic dims, products of symbols, params and buffers, locations with and without file
    """func @f(%x: f32[B,T,4], %w: f32[4,6] {param}, %p: f32[T,4] {buffer}) -> (f32[B*T,4]) {
  %0 = tensor.add %x, %p : f32[B,T,4]  loc("blocks.0.pos")
  %1 = tensor.layer_norm %0 {num_axes = 1, eps = 1e-05} : f32[B,T,4]  loc("blocks.0.ln1" "m.py":12)
  %2 = tensor.matmul %1, %w : f32[B,T,6]  loc("" "model.py":13)
  %3 = tensor.reshape %1 : f32[B*T,4]
  func.return %3
}
""",
    # multi-result ops, an op without results, two functions, names with dots and dashes
    """func @main(%x.in-1: f32[7,13], %idx: i64[13,2]) -> (f32[7,3], i64[7,3], i64[26], i64[6]) {
  %0, %1 = tensor.topk %x.in-1 {k = 3, axis = -1, largest = true} : f32[7,3], i64[7,3]
  %2, %3 = moe.route %idx {num_experts = 5} : i64[26], i64[6]  loc("moe.router")
  func.return %0, %1, %2, %3
}

func @empty() -> () {
  func.return
}
""",
    # every kind of attribute: negative int, floats (1e-05, -inf, nan, -0.0, huge), bool, strings
    # with quotes and escapes, dtype, lists, nested lists, none
    """func @main(%x: f32[7,13], %t: i64[7]) -> (f32[], i32[7,13], f32[7,13]) {
  %0 = tensor.argmax %x {axis = -1, keepdim = false} : i64[7]
  %1 = tensor.cast %x {dtype = i32} : i32[7,13]
  %2 = tensor.constant {value = [[1.0, -inf], [nan, inf]]} : f32[2,2]
  %3 = tensor.constant {value = -0.0} : f32[]
  %4 = tensor.constant {value = 1.5e+300} : f64[]
  %5 = tensor.constant {value = "quote \\" backslash \\\\ newline \\n tab \\t \\u00e9"} : f32[]
  %6 = tensor.constant {value = [none, [1, -2, [true, false]], [], "s", f16]} : f32[]
  %7 = tensor.sum %x {axes = [0, -1], keepdim = false} : f32[]
  %8 = tensor.slice %x {axis = 1, start = 0, end = "T", step = 1} : f32[7,13]
  func.return %7, %1, %x
}
""",
    # symbolic dim expressions of every shape sympy prints
    """func @main(%x: f32[B,T], %y: f32[2*B,T+1], %z: f32[floor(T/2),Max(B,T)]) -> (f32[B,T]) {
  %0 = tensor.reshape %x : f32[B*T]
  %1 = tensor.reshape %0 : f32[B,T]
  func.return %1
}
""",
    # a symbol of a data-dependent size; attention with all its operands
    """func @g(%m: bool[7,9], %q: f32[4,7,8], %k: f32[2,9,8]) -> (i64[n,2], f32[4,7,8]) {
  %0 = tensor.nonzero %m : i64[n,2]
  %1 = tensor.attention %q, %k, %k, %m {causal = true, scale = none} : f32[4,7,8]
  func.return %0, %1
}
""",
]


@pytest.mark.parametrize("text", GOLDEN, ids=[f"golden{i}" for i in range(len(GOLDEN))])
def test_golden_text_is_canonical(text):
    m = parse(text)
    assert print_module(m) == text
    assert print_module(parse(print_module(m))) == text


def test_golden_text_with_fused_region_is_canonical():
    text = """func @main(%x: f32[B,13], %b: f32[13] {param}) -> (f32[B,13]) {
  %0 = kernel.fused %x, %b {kind = "elementwise"} : f32[B,13]  loc("mlp.act" "m.py":7) {
  ^bb(%x_1: f32[B,13], %b_1: f32[13]):
    %1 = tensor.add %x_1, %b_1 : f32[B,13]  loc("mlp.fc")
    %2 = tensor.gelu %1 {approximate = "tanh"} : f32[B,13]
    kernel.yield %2
  }
  func.return %0
}
"""
    m = parse(text, params={"b": np.zeros(13, np.float32)})
    verify(m)
    assert print_module(m) == text
    op = m.main.body.ops[0]
    assert op.loc == Location("mlp.act", "m.py", 7)
    assert op.body.ops[0].loc == Location("mlp.fc")
    assert [a.name for a in op.body.args] == ["x_1", "b_1"]


ATTR_VALUES = [0, -7, 2**40, 1.0, -2.5, 1e-05, 1e-30, 3.14159e+20, -0.0, math.inf, -math.inf,
               math.nan, True, False, None, "", "plain", 'q"uo\\te', "new\nline\ttab", "é∑",
               DType.bf16, DType.bool, (), (1, 2, 3), ((1, 2), (3, 4)), (None, "a", (True, 1.5)),
               (-math.inf, math.nan)]


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b and (
        not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


@pytest.mark.parametrize("value", ATTR_VALUES, ids=[repr(v) for v in ATTR_VALUES])
def test_attribute_value_round_trip(value):
    f = Func("main")
    rw = Rewriter(f.body)
    c = rw.create("tensor.constant", [], {"value": value}, [TensorType((), DType.f32)])
    rw.create("func.return", c.result_values)
    m = Module()
    m.add_func(f)
    text = round_trip(m)
    back = parse(text).main.body.ops[0].value
    assert _same(back, value), (text, back)


def test_parsed_list_attributes_are_tuples():
    m = parse(GOLDEN[2])
    ops = m.main.body.ops
    assert ops[6].value == (None, (1, -2, (True, False)), (), "s", DType.f16)
    assert ops[7].axes == (0, -1) and hash(ops[7].axes)


@pytest.mark.parametrize("loc", [Location("a"), Location("", "f.py", 1),
                                 Location('m["x"].proj', "dir with space/é.py", 123456),
                                 Location("onnx::Gemm_7\\n", "<stdin>", 0)], ids=str)
def test_location_text_round_trip(loc):
    f = Func("main")
    x = f.add_arg(F32_7, "x")
    rw = Rewriter(f.body)
    rw.create("func.return", [rw.value("tensor.exp", x, loc=loc)])
    m = Module()
    m.add_func(f)
    round_trip(m)
    assert parse(print_module(m)).main.body.ops[0].loc == loc


def test_locations_survive_clone():
    m = parse(GOLDEN[0])
    locs = [op.loc for op in m.clone().walk()]
    assert locs[:3] == [Location("blocks.0.pos"), Location("blocks.0.ln1", "m.py", 12),
                        Location("", "model.py", 13)]


@pytest.mark.parametrize("name", ["0.weight", "0", "3", "blocks.0.ln-1$w", "onnx::MatMul_12",
                                  "/layers.0/Add_output_0", "a b", 'q"uote', "é"])
def test_param_names_survive_text(name):
    # Weights are found by argument name, so the text keeps names exactly: nn.Sequential's
    # "0.weight" bare, ONNX's "onnx::MatMul_12" quoted.
    f = Func("main")
    x = f.add_arg(F32_7, "x")
    w = f.add_arg(F32_7, name, "param")
    rw = Rewriter(f.body)
    rw.create("func.return", [rw.value("tensor.add", x, w), rw.value("tensor.exp", w)])
    m = Module(params={name: np.ones(7, np.float32)})
    m.add_func(f)
    verify(m)
    text = round_trip(m)
    assert [a.name for a in m.clone().main.body.args] == ["x", name]
    verify(m.clone())
    assert "%0 = " in text or name == "0"  # results are numbered around argument names


# ---- use lists and the rewriter --------------------------------------------------------------

def test_use_lists_follow_rewrites():
    m = parse("""func @main(%x: f32[7]) -> (f32[7]) {
  %0 = tensor.exp %x : f32[7]
  %1 = tensor.mul %0, %0 : f32[7]
  func.return %1
}""")
    x = m.main.body.args[0]
    exp, mul, _ = m.main.body.ops
    assert [(op.name, i) for op, i in exp.result.uses] == [("tensor.mul", 0), ("tensor.mul", 1)]
    assert exp.result.users == [mul]
    rw = Rewriter(m.main.body, mul)
    neg = rw.value("tensor.neg", x)
    rw.replace_all_uses(exp.result, neg)
    rw.erase_op(exp)
    assert x.uses[0][0] is not exp and len(neg.uses) == 2
    verify(m)
    assert "tensor.neg %x" in print_module(m) and "tensor.exp" not in print_module(m)


# ---- verifier errors -------------------------------------------------------------------------

LOC = Location("blocks.3.attn", "model.py", 77)


def _module(build_body, params=None, kinds=None) -> Module:
    """A module whose @main takes x: f32[7], y: f32[7]; `build_body(rw, x, y)` fills it."""
    f = Func("main")
    x, y = f.add_arg(F32_7, "x", (kinds or {}).get("x", "input")), f.add_arg(F32_7, "y")
    build_body(Rewriter(f.body, None), x, y)
    m = Module(params=params or {})
    m.add_func(f)
    return m


def _verify_fails(m: Module, *words: str) -> str:
    with pytest.raises(lmc.VerificationError) as info:
        verify(m)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    return msg


def _ret(rw, *values):
    rw.create("func.return", list(values))


def test_verify_use_before_def():
    def body(rw, x, y):
        a = rw.value("tensor.exp", x)
        b = rw.value("tensor.neg", a, loc=LOC)
        _ret(rw, b)
    m = _module(body)
    ops = m.main.body.ops
    ops[0], ops[1] = ops[1], ops[0]
    _verify_fails(m, "tensor.neg", "'blocks.3.attn' model.py:77", "before it is defined")


def test_verify_wrong_result_type():
    def body(rw, x, y):
        _ret(rw, rw.value("tensor.add", x, y, result_type=TensorType((7,), DType.f16), loc=LOC))
    _verify_fails(_module(body), "tensor.add", "model.py:77", "f16[7]", "inferred f32[7]")


def test_verify_wrong_result_type_from_text():
    m = parse("""func @main(%x: f32[7]) -> (f32[8]) {
  %0 = tensor.exp %x : f32[8]  loc("act")
  func.return %0
}""")
    _verify_fails(m, "tensor.exp", "'act'", "inferred f32[7]")


def test_verify_wrong_operand_count():
    def body(rw, x, y):
        _ret(rw, rw.value("tensor.add", x, result_type=F32_7, loc=LOC))
    _verify_fails(_module(body), "tensor.add", "model.py:77", "expects 2 operand(s)", "got 1")
    m = parse("""func @main(%x: f32[7]) -> (f32[7]) {
  %0 = tensor.exp %x, %x, %x : f32[7]  loc("e")
  func.return %0
}""")
    _verify_fails(m, "tensor.exp", "'e'", "got 3")


def test_verify_unknown_attribute():
    with pytest.raises(lmc.VerificationError, match=r"tensor\.add.*model\.py:77.*'bogus'"):
        _module(lambda rw, x, y: rw.value("tensor.add", x, y, bogus=1, loc=LOC))

    def body(rw, x, y):
        _ret(rw, rw.value("tensor.add", x, y, loc=LOC))
    m = _module(body)
    m.main.body.ops[0].attributes["bogus"] = 1  # e.g. a pass wrote a misspelt attribute
    _verify_fails(m, "tensor.add", "model.py:77", "bogus")


def test_verify_missing_required_attribute_names_the_op():
    class NeedsK(Op):  # not registered: REQUIRED is unused by the ops of today
        name = "test.needs_k"
        operands = ("x",)
        attrs = {"k": REQUIRED}

        def infer_type(self):
            return self.x.type

    with pytest.raises(lmc.VerificationError, match=r"test\.needs_k.*model\.py:77.*'k'"):
        NeedsK([Block([F32_7]).args[0]], {}, loc=LOC)
    assert NeedsK([Block([F32_7]).args[0]], {"k": 2}).k == 2


def test_verify_missing_return():
    _verify_fails(_module(lambda rw, x, y: rw.value("tensor.exp", x)), "@main",
                  "func.return")
    _verify_fails(_module(lambda rw, x, y: None), "@main", "func.return")


def test_verify_param_without_array_or_wrong_shape():
    def body(rw, x, y):
        _ret(rw, rw.value("tensor.add", x, y))
    _verify_fails(_module(body, kinds={"x": "param"}), "param %x", "no array")
    _verify_fails(_module(body, {"x": np.zeros((7, 1), np.float32)}, {"x": "param"}),
                  "param %x", "f32[7]", "[7, 1]")
    verify(_module(body, {"x": np.zeros(7, np.float32)}, {"x": "param"}))


def test_verify_terminator_in_the_middle():
    def body(rw, x, y):
        _ret(rw, x)
        rw.value("tensor.exp", x)
        _ret(rw, y)
    _verify_fails(_module(body), "func.return", "terminator in the middle")


def test_verify_kernel_fused_body_type_mismatch():
    m = fused_module()
    m.main.body.ops[0].body.args[1].type = TensorType((1, 13), DType.f32)
    _verify_fails(m, "kernel.fused", "'blocks.0.mlp' model.py:42", "body argument types")

    m = fused_module()
    fused = m.main.body.ops[0]
    fused.body.ops[-1].set_operand(1, fused.body.ops[0].result)  # yields f32[7,13] still
    verify(m)
    fused.result_values[1].type = TensorType((7, 13), DType.f16)
    _verify_fails(m, "kernel.fused", "kernel.yield types differ")


def test_verify_kernel_fused_body_is_isolated():
    m = fused_module()
    fused = m.main.body.ops[0]
    outer = m.main.body.args[0]
    fused.body.ops[0].set_operand(0, outer)  # the body may see only its own arguments
    _verify_fails(m, "tensor.add", "outside this block")


def test_verify_reshape_changes_element_count():
    def body(rw, x, y):
        _ret(rw, rw.value("tensor.reshape", x, result_type=TensorType((2, 4), DType.f32),
                          loc=LOC))
    _verify_fails(_module(body), "tensor.reshape", "model.py:77", "element count")
    m = parse("""func @main(%x: f32[B,T,16]) -> (f32[B,16]) {
  %0 = tensor.reshape %x : f32[B,16]
  func.return %0
}""")
    _verify_fails(m, "tensor.reshape", "element count")


def test_verify_names_the_pass():
    def body(rw, x, y):
        _ret(rw, rw.value("tensor.add", x, result_type=F32_7, loc=LOC))
    with pytest.raises(lmc.VerificationError, match="after pass 'fuse'") as info:
        verify(_module(body), pass_name="fuse")
    assert info.value.pass_name == "fuse" and info.value.op.name == "tensor.add"


@pytest.mark.parametrize("text, words", [
    ("%0 = tensor.add %x, %i : f32[7]", ["differ in dtype", "tensor.cast"]),
    ("%0 = tensor.matmul %x, %x : f32[]", []),  # vector dot: fine
    ("%0 = tensor.take %x, %x : f32[7]", ["integers"]),
    ("%0 = tensor.softmax %i : i64[7]", ["float"]),
    ("%0 = tensor.sum %x {axes = [0, -1]} : f32[]", ["twice"]),
    ("%0 = tensor.permute %x {perm = [1]} : f32[7]", ["permutation"]),
    ("%0 = tensor.slice %x {step = 0} : f32[7]", ["step"]),
    ("%0, %1 = tensor.topk %x {k = 8} : f32[8], i64[8]", ["out of range"]),
    ("%0 = tensor.gelu %x {approximate = \"fast\"} : f32[7]", ["none or tanh"]),
    ("%0 = tensor.broadcast %x : f32[3,8]", ["does not broadcast"]),
    ("%0 = tensor.constant {value = [1.0, 2.0]} : f32[3]", ["value shape"]),
    ("%0 = tensor.iota : f32[2,2]", ["1-D"]),
    ("%0 = tensor.nonzero %x : i64[n,2]", ["i64[n,1]"]),
    ("%0 = tensor.cross_entropy %x, %i {reduction = \"avg\"} : f32[]", []),
])
def test_verify_op_rules(text, words):
    m = parse(f"""func @main(%x: f32[7], %i: i64[7]) -> () {{
  {text}  loc("here")
  func.return
}}""")
    if text.startswith("%0 = tensor.matmul"):
        verify(m)
        return
    _verify_fails(m, text.split("=")[1].split()[0] if "=" in text else "", "'here'", *words)


# ---- parser errors ---------------------------------------------------------------------------

GOOD = """func @main(%x: f32[7]) -> (f32[7]) {
  %0 = tensor.exp %x : f32[7]
  func.return %0
}
"""


@pytest.mark.parametrize("text, line, col, words", [
    (GOOD.replace("tensor.exp", "tensor.expp"), 2, 8, ["unknown op 'tensor.expp'"]),
    (GOOD.replace("%x: f32", "%x: f31"), 1, 16, ["unknown dtype 'f31'"]),
    (GOOD.replace("exp %x", "exp %y"), 2, 19, ["undefined value %y"]),
    (GOOD.replace("func.return %0", "%0 = tensor.neg %x : f32[7]\n  func.return %0"), 3, 3,
     ["%0 is defined twice"]),
    (GOOD.replace("(%x: f32[7])", "(%x: f32[7], %x: f32[7])"), 1, 24, ["%x is defined twice"]),
    (GOOD.replace("%x : f32[7]", "%x f32[7]"), 2, 22, ["expected"]),
    (GOOD.replace("(%x: f32[7])", "(%x f32[7])"), 1, 15, ["expected ':'"]),
    (GOOD.replace("f32[7]) {", "f32[7] {"), 1, 35, ["expected ')'"]),
    (GOOD.replace(": f32[7]\n", ": f32[7\n"), 3, 3, ["malformed dim", "']' missing"]),
    (GOOD[:-2], 4, 1, ["expected"]),  # missing closing brace
    (GOOD.replace("func.return %0", "func.return %0\n}\n}"), 5, 1, ["expected 'func'"]),
    (GOOD.replace("%x : f32[7]", "%x {eps = [1, } : f32[7]"), 2, 33, ["attribute value"]),
    (GOOD.replace("%x : f32[7]", "%x {eps = foo} : f32[7]"), 2, 29, ["attribute value 'foo'"]),
    (GOOD.replace("%x : f32[7]", "%x {eps = -true} : f32[7]"), 2, 29, ["'-' must precede"]),
    (GOOD.replace("-> (f32[7])", "-> (f16[7])"), 4, 1, ["returns ['f32[7]']", "declares"]),
    (GOOD.replace("-> (f32[7])", "-> (f32[7], f32[7])"), 4, 1, ["returns"]),
    ("", 1, 1, ["no function"]),
    ("   \n  // only a comment\n", 3, 1, ["no function"]),
    (GOOD.replace("%0 = tensor", "%0 = ¤tensor"), 2, 8, ["unexpected character '¤'"]),
    ("func @main() -> () {\n  func.return\n}\n\x00", 4, 1, ["unexpected character"]),
    (GOOD.replace("f32[7]) {", "f32[7]) {\n  %1 = tensor.exp %x {axiz = 1} : f32[7]"), 2, 3,
     ["unknown attribute", "axiz"]),
    (GOOD.replace("%x: f32[7]", "%x: f32[B+]"), 1, 20, ["malformed symbolic dim"]),
    (GOOD.replace("%x: f32[7]", "%x: f32[7] {weight}"), 1, 24, ["argument kind"]),
    (GOOD + GOOD, 5, 6, ["@main is defined twice"]),
    (GOOD.replace("tensor.exp %x : f32[7]", "tensor.exp %x : f32[7]  loc(12)"), 2, 36,
     ["location string"]),
    (GOOD.replace("%0 = tensor.exp %x : f32[7]", "%0, %1 = tensor.exp %x : f32[7]"), 3, 3,
     ["expected ','"]),  # two results, one type
])
def test_parse_errors(text, line, col, words):
    with pytest.raises(lmc.ParseError) as info:
        parse(text, source="model.lmc")
    err = info.value
    for w in words:
        assert w in str(err), str(err)
    assert (err.line, err.column) == (line, col), str(err)
    assert str(err).startswith(f"model.lmc:{line}:{col}: ")


def test_duplicate_argument_names_are_rejected():
    from lmc.ir.core import Block, Func, Module
    from lmc.ir.types import DType, TensorType
    from lmc.ir.verifier import verify

    f = Func("main", Block())
    t = TensorType((2,), DType.f32)
    a = f.add_arg(t, "w", "input")
    f.add_arg(t, "w", "input")
    f.body.append(lmc.ir.op_class("func.return")([a]))
    with pytest.raises(lmc.VerificationError, match=r"\['w'\] are used twice"):
        verify(Module({"main": f}))


def test_attribute_of_the_wrong_type_is_a_verification_error():
    m = parse("""func @main(%x: f32[3]) -> (f32[]) {
  %0 = tensor.sum %x {axes = "a", keepdim = false} : f32[]
  func.return %0
}""")
    with pytest.raises(lmc.VerificationError, match=r"tensor\.sum"):
        verify(m)
