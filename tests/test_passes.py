"""canonicalize, cse, dce: numerics on random modules, reports, weights, and the rule machinery."""
from __future__ import annotations

import numpy as np
import pytest

from lmc.backends.reference.interpreter import run_func
from lmc.ir import parse, print_module
from lmc.ir.rewriter import P, RuleSet, apply_rules
from lmc.ir.verifier import verify
from lmc.pass_base import parse_pipeline
from lmc.passes.canonicalize import RULES

PIPELINES = ["canonicalize", "cse", "dce", "canonicalize,cse,dce"]


class RandomModule:
    """Random straight-line text over f32[B,5] values, rich in what the passes look for:
    identities, constant chains, view round trips, duplicates and dead ops."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.lines: list[str] = []
        self.pool = ["%x", "%y"]
        self.n = 0

    def emit(self, rhs: str, ty: str = "f32[B,5]", keep: bool = True) -> str:
        name = f"%v{self.n}"
        self.n += 1
        self.lines.append(f"  {name} = {rhs} : {ty}")
        if keep:
            self.pool.append(name)
        return name

    def pick(self) -> str:
        return self.pool[int(self.rng.integers(len(self.pool)))]

    def const(self) -> str:
        kind = self.rng.integers(3)
        if kind == 0:
            return self.emit(f"tensor.constant {{value = {self.rng.choice([0.0, 1.0, 2.0])}}}",
                             "f32[]", keep=False)
        if kind == 1:
            vals = ", ".join(f"{v:.2f}" for v in self.rng.uniform(-1, 1, 5))
            return self.emit(f"tensor.constant {{value = [{vals}]}}", "f32[5]", keep=False)
        c = self.emit("tensor.constant {value = [0.5, 1.0, 1.5, 2.0, 2.5]}", "f32[5]", False)
        return self.emit(f"tensor.tanh {c}", "f32[5]", keep=False)

    def step(self) -> None:
        k, a, b = int(self.rng.integers(9)), self.pick(), self.pick()
        if k == 0:
            self.emit(f"tensor.{self.rng.choice(['tanh', 'neg', 'sin', 'sigmoid'])} {a}")
        elif k == 1:
            self.emit(f"tensor.{self.rng.choice(['add', 'sub', 'mul', 'maximum'])} {a}, {b}")
        elif k == 2:
            op = self.rng.choice(["add", "sub", "mul", "pow"])
            c = self.const() if op != "pow" else self.emit(  # integer powers: no nan
                f"tensor.constant {{value = {self.rng.choice([1.0, 2.0, 3.0])}}}", "f32[]", False)
            args = f"{a}, {c}" if op in ("sub", "pow") or self.rng.random() < .5 else f"{c}, {a}"
            self.emit(f"tensor.{op} {args}")
        elif k == 3:
            self.emit(f"tensor.neg {self.emit(f'tensor.neg {a}', keep=False)}")
        elif k == 4:
            r = self.emit(f"tensor.reshape {a}", "f32[5,B]", keep=False)
            r = self.emit(f"tensor.permute {r} {{perm = [1, 0]}}", "f32[B,5]", keep=False)
            r = self.emit(f"tensor.permute {r} {{perm = [1, 0]}}", "f32[5,B]", keep=False)
            self.emit(f"tensor.reshape {r}")
        elif k == 5:
            self.emit(f"tensor.matmul {a}, %w")
        elif k == 6:  # a duplicate of an earlier line, for CSE
            line = self.lines[int(self.rng.integers(len(self.lines)))] if self.lines else None
            if line and "constant" not in line:
                rhs, ty = line.split(" = ", 1)[1].rsplit(" : ", 1)
                self.emit(rhs, ty, keep=ty == "f32[B,5]")
        elif k == 7:
            self.emit(f"tensor.exp {a}", keep=False)  # dead
        else:
            t = self.emit(f"tensor.slice {a} {{axis = 1, start = 0, end = 5, step = 1}}")
            self.emit(f"tensor.concat {t} {{axis = 0}}")

    def text(self, steps: int = 25) -> str:
        for _ in range(steps):
            self.step()
        outs = [self.pool[-1], self.pick()]
        body = "\n".join(self.lines)
        return (f"func @main(%x: f32[B,5], %y: f32[B,5], %w: f32[5,5] {{param}}, "
                f"%u: f32[5,5] {{param}}) -> (f32[B,5], f32[B,5]) {{\n{body}\n"
                f"  func.return {', '.join(outs)}\n}}\n")


def _inputs(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, 5)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("seed", range(12))
def test_random_modules_keep_numerics(pipeline, seed):
    text = RandomModule(seed).text()
    rng = np.random.default_rng(100 + seed)
    params = {n: (rng.standard_normal((5, 5)) * 0.5).astype(np.float32) for n in "wu"}
    m = parse(text, params)
    verify(m)
    expected = {b: run_func(m, _inputs(b, seed)) for b in (1, 3, 7)}
    for p in parse_pipeline(pipeline):
        p.run(m)
        verify(m, pass_name=p.spec())
    m = parse(print_module(m), m.params)  # what a pass leaves must print and parse back
    for b, want in expected.items():
        for got, ref in zip(run_func(m, _inputs(b, seed)), want):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_pipeline_shrinks_random_modules():
    before = after = 0
    for seed in range(12):
        m = parse(RandomModule(seed).text(), {n: np.ones((5, 5), np.float32) for n in "wu"})
        before += sum(m.op_counts().values())
        for p in parse_pipeline("canonicalize,cse,dce"):
            p.run(m)
        after += sum(m.op_counts().values())
        assert ("u" not in m.params and "w" in m.params) or "tensor.matmul" not in str(m)
    assert after < 0.7 * before


TEXT = """func @main(%x: f32[B,4], %w: f32[4,4] {param}, %v: f32[4,4] {buffer}) -> (f32[B,4]) {
  %0 = tensor.constant {value = 1.0} : f32[]
  %1 = tensor.mul %x, %0 : f32[B,4]
  %2 = tensor.constant {value = [1.0, 2.0, 3.0, 4.0]} : f32[4]
  %3 = tensor.exp %2 : f32[4]
  %4 = tensor.matmul %1, %w : f32[B,4]
  %5 = tensor.matmul %1, %w : f32[B,4]
  %6 = tensor.add %4, %5 : f32[B,4]
  %7 = tensor.add %6, %3 : f32[B,4]
  %8 = tensor.matmul %x, %v : f32[B,4]
  func.return %7
}
"""


def _module():
    return parse(TEXT, {"w": np.eye(4, dtype=np.float32), "v": np.eye(4, dtype=np.float32)})


def test_reports():
    m = _module()
    (canon, cse, dce) = parse_pipeline("canonicalize,cse,dce")
    assert canon.run(m) == {"folded": 1, "rewrites": 1, "eliminated": 3}
    assert cse.run(m) == {"eliminated": 1}
    assert dce.run(m) == {"eliminated": 0, "dropped_weights": ["v"]}
    assert set(m.params) == {"w"}
    verify(m)


def test_dce_keeps_weights_when_asked_and_shared_weights():
    m = _module()
    (dce,) = parse_pipeline("dce{drop_unused_weights=false}")
    assert dce.run(m) == {"eliminated": 1}
    assert set(m.params) == {"w", "v"} and len(m.main.weights) == 2
    # A weight another function still takes keeps its array.
    two = parse(TEXT.replace("@main", "@other") + "\n" + TEXT, dict(m.params))
    parse_pipeline("dce")[0].run(two)
    assert set(two.params) == {"w"}
    verify(two)


def test_dce_never_removes_terminators_or_unused_inputs():
    m = parse("func @main(%x: f32[3], %y: f32[3]) -> (f32[3]) {\n  func.return %x\n}\n")
    assert parse_pipeline("dce")[0].run(m) == {"eliminated": 0}
    assert len(m.main.inputs) == 2 and m.main.body.ops[-1].name == "func.return"


def test_cse_inside_fused_bodies():
    m = parse("""func @main(%x: f32[4]) -> (f32[4]) {
  %0 = kernel.fused %x {kind = "elementwise"} : f32[4] {
  ^bb(%a: f32[4]):
    %1 = tensor.exp %a : f32[4]
    %2 = tensor.exp %a : f32[4]
    %3 = tensor.add %1, %2 : f32[4]
    kernel.yield %3
  }
  func.return %0
}
""")
    x = np.arange(4, dtype=np.float32)
    want = run_func(m, [x])[0]
    assert parse_pipeline("cse")[0].run(m) == {"eliminated": 1}
    verify(m)
    np.testing.assert_allclose(run_func(m, [x])[0], want)


def _build_then_decline(rw, x, root):
    rw.value("tensor.neg", x)  # work a rule did before deciding not to rewrite
    rw.value("tensor.exp", rw.value("tensor.tanh", x))


def test_declining_rule_leaves_no_junk_and_keeps_other_ops():
    text = """func @main(%x: f32[3]) -> (f32[3]) {
  %0 = tensor.sin %x : f32[3]
  %1 = tensor.cos %x : f32[3]
  func.return %1
}
"""
    m = parse(text)
    changed = apply_rules(m.main, RuleSet([(P("tensor.cos", P.var("x")), _build_then_decline)]))
    assert not changed
    assert print_module(m) == print_module(parse(text))  # the dead sin is not the rule's to drop


def test_explain_says_why_rules_did_not_match():
    m = parse("""func @main(%x: f32[3]) -> (f32[3]) {
  %0 = tensor.constant {value = 2.0} : f32[]
  %1 = tensor.add %x, %0 : f32[3]
  %2 = tensor.neg %1 : f32[3]
  func.return %2
}
""")
    add, neg = m.main.body.ops[1], m.main.body.ops[2]
    reasons = RULES.explain(add)
    assert any(r.startswith("keep_lhs:") and "predicate" in r for r in reasons)
    assert any(r.startswith("keep_rhs:") and "argument %x is not tensor.constant" in r
               for r in reasons)
    assert any(r.startswith("double_neg:") and "tensor.add is not tensor.neg" in r
               for r in RULES.explain(neg))


def test_rules_have_readable_names():
    names = [fn.__name__ for _, fn in RULES.rules]
    assert all(n.isidentifier() and n != "<lambda>" for n in names)
    assert "fold_constants" in names and "permute_of_permute" in names


@pytest.mark.parametrize("value,dtype,expected", [
    ("inf", "f32", "tensor.constant {value = -inf} : f32[2]"),
    ("nan", "f32", "tensor.constant {value = nan} : f32[2]"),
])
def test_folding_keeps_inf_and_nan(value, dtype, expected):
    m = parse(f"""func @main(%x: {dtype}[2]) -> ({dtype}[2]) {{
  %0 = tensor.constant {{value = {value}}} : {dtype}[2]
  %1 = tensor.neg %0 : {dtype}[2]
  %2 = tensor.add %x, %1 : {dtype}[2]
  func.return %2
}}
""")
    parse_pipeline("canonicalize")[0].run(m)
    assert expected in print_module(m)
    verify(parse(print_module(m)))


def test_folding_declines_when_evaluation_fails():
    m = parse("""func @main(%x: f32[2]) -> (f32[2]) {
  %0 = tensor.constant {value = [1.0, 2.0, 3.0]} : f32[3]
  %1 = tensor.constant {value = [0, 7]} : i64[2]
  %2 = tensor.take %0, %1 {axis = 0} : f32[2]
  %3 = tensor.add %x, %2 : f32[2]
  func.return %3
}
""")
    assert parse_pipeline("canonicalize")[0].run(m)["folded"] == 0
    assert "tensor.take" in print_module(m)


@pytest.mark.parametrize("x_type,start,step,n", [
    ("f32[8,4]", 0, 1, "9"),  # past the axis: take must fail at run time
    ("f32[8,4]", 2, 3, "3"),  # 2, 5, 8: the last is out of range
    ("f32[8,4]", 0, 1, "T"),  # symbolic length: not provably in range
    ("f32[B,4]", 0, 1, "3"),  # symbolic axis: the same
])
def test_take_of_iota_stays_a_take_unless_in_range(x_type, start, step, n):
    # %len only binds the iota's length n when it is a symbol
    m = parse(f"""func @main(%x: {x_type}, %len: f32[{n}]) -> (f32[{n},4]) {{
  %0 = tensor.iota {{start = {start}, step = {step}}} : i64[{n}]
  %1 = tensor.take %x, %0 {{axis = 0}} : f32[{n},4]
  func.return %1
}}
""")
    parse_pipeline("canonicalize")[0].run(m)
    assert "tensor.take" in print_module(m) and "tensor.slice" not in print_module(m)
