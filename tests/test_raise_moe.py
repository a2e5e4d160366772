"""raise-moe: unrolled per-expert MoE loops (as the torch frontend spells them) become
moe.route → gather → grouped_matmul → combine, with the same numerics; anything that does not
match exactly is left alone with a reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmc.backends.reference.interpreter import run_func
from lmc.ir import parse, print_module
from lmc.ir.verifier import verify
from lmc.pass_base import parse_pipeline
from lmc.passes.moe import RaiseMoE

N, D, FF = 13, 8, 12


class MoEText:
    """Text of an unrolled sparse MoE, one branch per expert, as torch.export + the torch
    frontend produce it: where → nonzero + slice/reshape, x[tok] → take, w[e] → slice + reshape,
    topw[tok, slot] → take of the flattened weights at tok * k + slot, index_add_ → index_add.

    `experts` gives each branch's expert index, `kinds` each branch's FFN ("swiglu" | "gelu"),
    `weights` is "stacked" (one [E, ...] param, select(w, 0, e)) or "separate" (per-expert
    nn.Linear-style [out, in] params used transposed), `router` computes topi/topw from x.
    """

    def __init__(self, E=4, k=2, kind="swiglu", experts=None, kinds=None, weights="stacked",
                 router=False, swap_mul=False, bias=False):
        self.E, self.k, self.weights, self.router, self.bias = E, k, weights, router, bias
        self.experts = list(range(E)) if experts is None else experts
        self.kinds = kinds or [kind] * len(self.experts)
        self.swap_mul = swap_mul
        self.lines: list[str] = []
        self.n = 0

    def emit(self, rhs: str, ty: str, loc: str = "") -> str:
        name = f"%v{self.n}"
        self.n += 1
        self.lines.append(f"  {name} = {rhs} : {ty}" + (f'  loc("{loc}")' if loc else ""))
        return name

    def params(self) -> dict[str, tuple[int, ...]]:
        E = self.E
        if self.weights == "stacked":
            out = {"w1": (E, D, FF), "w3": (E, D, FF), "w2": (E, FF, D)}
            if self.bias:
                out["b1"] = (E, FF)
        else:
            out = {}
            for e in range(E):
                out |= {f"experts.{e}.w1.weight": (FF, D), f"experts.{e}.w3.weight": (FF, D),
                        f"experts.{e}.w2.weight": (D, FF)}
                if self.bias:
                    out[f"experts.{e}.b1.weight"] = (1, FF)
        if self.router:
            out["gate"] = (D, E)
        return out

    def text(self) -> str:
        k = self.k
        ins = "%x: f32[13,8]" + ("" if self.router else f", %topi: i64[13,{k}], %topw: f32[13,{k}]")
        ps = ", ".join(f"%{n}: f32[{','.join(map(str, s))}] {{param}}"
                       for n, s in self.params().items())
        topi, topw = self.route() if self.router else ("%topi", "%topw")
        acc = self.emit("tensor.constant {value = 0.0}", "f32[13,8]", "moe.zeros_like")
        for b, (e, kind) in enumerate(zip(self.experts, self.kinds)):
            acc = self.branch(b, e, kind, topi, topw, acc)
        body = "\n".join(self.lines)
        return f"func @main({ins}, {ps}) -> (f32[13,8]) {{\n{body}\n  func.return {acc}\n}}\n"

    def route(self) -> tuple[str, str]:
        k, E = self.k, self.E
        logits = self.emit("tensor.matmul %x, %gate", f"f32[13,{E}]", "moe.gate")
        probs = self.emit(f"tensor.softmax {logits} {{axis = -1}}", f"f32[13,{E}]")
        tw, ti = f"%v{self.n}", f"%v{self.n + 1}"
        self.n += 2
        self.lines.append(f"  {tw}, {ti} = tensor.topk {probs} {{k = {k}, axis = -1}} : "
                          f'f32[13,{k}], i64[13,{k}]  loc("moe.topk")')
        s = self.emit(f"tensor.sum {tw} {{axes = [-1], keepdim = true}}", "f32[13,1]")
        return ti, self.emit(f"tensor.div {tw}, {s}", f"f32[13,{k}]")

    def weight(self, name: str, e: int, shape: tuple[int, int]) -> str:
        if self.weights == "stacked":
            _E, full = self.E, ",".join(map(str, shape))
            s = self.emit(f"tensor.slice %{name} {{axis = 0, start = {e}, end = {e + 1}}}",
                          f"f32[1,{full}]")
            return self.emit(f"tensor.reshape {s}", f"f32[{full}]")
        p = f"%experts.{e}.{name}.weight"
        if name == "b1":
            return p
        return self.emit(f"tensor.permute {p} {{perm = [1, 0]}}", f"f32[{shape[0]},{shape[1]}]")

    def branch(self, b, e, kind, topi, topw, acc) -> str:
        k, u = self.k, f"u{b}"
        loc = f"moe.experts.{b}"
        c = self.emit(f"tensor.constant {{value = {e}}}", "i64[]")
        eq = self.emit(f"tensor.eq {topi}, {c}", f"bool[13,{k}]", loc)
        nz = self.emit(f"tensor.nonzero {eq}", f"i64[{u},2]", loc)
        # torch.export reads where(...)[0] once more, for its size asserts, and drops it.
        s = self.emit(f"tensor.slice {nz} {{axis = 1, start = 0, end = 1}}", f"i64[{u},1]")
        self.emit(f"tensor.reshape {s}", f"i64[{u}]")
        cols = []
        for i in (0, 1):
            s = self.emit(f"tensor.slice {nz} {{axis = 1, start = {i}, end = {i + 1}}}",
                          f"i64[{u},1]")
            cols.append(self.emit(f"tensor.reshape {s}", f"i64[{u}]"))
        tok, slot = cols
        xe = self.emit(f"tensor.take %x, {tok} {{axis = 0}}", f"f32[{u},8]", loc + ".index")
        a = self.emit(f"tensor.matmul {xe}, {self.weight('w1', e, (D, FF))}", f"f32[{u},12]",
                      loc + ".w1")
        if self.bias:
            a = self.emit(f"tensor.add {a}, {self.weight('b1', e, (FF,))}", f"f32[{u},12]")
        if kind == "swiglu":
            g = self.emit(f"tensor.silu {a}", f"f32[{u},12]")
            v = self.emit(f"tensor.matmul {xe}, {self.weight('w3', e, (D, FF))}",
                          f"f32[{u},12]")
            h = self.emit(f"tensor.mul {g}, {v}", f"f32[{u},12]")
        else:
            h = self.emit(f"tensor.{kind} {a}", f"f32[{u},12]")
        y = self.emit(f"tensor.matmul {h}, {self.weight('w2', e, (FF, D))}", f"f32[{u},8]",
                      loc + ".w2")
        kc = self.emit(f"tensor.constant {{value = {k}}}", "i64[]")
        flat = self.emit(f"tensor.add {self.emit(f'tensor.mul {tok}, {kc}', f'i64[{u}]')}, "
                         f"{slot}", f"i64[{u}]")
        twf = self.emit(f"tensor.reshape {topw}", f"f32[{13 * k}]")
        we = self.emit(f"tensor.take {twf}, {flat} {{axis = 0}}", f"f32[{u}]")
        we = self.emit(f"tensor.reshape {we}", f"f32[{u},1]")
        src = self.emit(f"tensor.mul {we}, {y}" if self.swap_mul else f"tensor.mul {y}, {we}",
                        f"f32[{u},8]")
        return self.emit(f"tensor.index_add {acc}, {tok}, {src} {{axis = 0}}", "f32[13,8]",
                         loc + ".index_add")

    def module(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        params = {n: (rng.standard_normal(s) / np.sqrt(s[-2] if len(s) > 1 else 4)).astype(
            np.float32) for n, s in self.params().items()}
        return parse(self.text(), params=params)

    def inputs(self, seed: int = 1) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, D)).astype(np.float32)
        if self.router:
            return [x]
        topi = np.stack([rng.permutation(self.E)[:self.k] for _ in range(N)]).astype(np.int64)
        topw = rng.uniform(0.1, 1, (N, self.k)).astype(np.float32)
        return [x, topi, topw]


def raise_moe(m):
    before = print_module(m)
    report = RaiseMoE().run(m)
    verify(m, "raise-moe")
    return before, report


def check_numerics(gen: MoEText, seeds=(1, 2, 3)):
    m = gen.module()
    ref = m.clone()
    _, report = raise_moe(m)
    assert report["raised"] == 1, report
    for s in seeds:
        ins = gen.inputs(s)
        want, = run_func(ref, ins)
        got, = run_func(m, ins)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return m, report


@pytest.mark.parametrize("E,k", [(4, 2), (3, 1), (4, 1), (3, 2)])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_raise_matches_interpreter(E, k, kind):
    m, report = check_numerics(MoEText(E, k, kind))
    counts = m.op_counts()
    assert "tensor.nonzero" not in counts and "tensor.index_add" not in counts
    assert counts["moe.route"] == 1 and counts["moe.combine"] == 1
    assert counts["moe.grouped_matmul"] == (3 if kind == "swiglu" else 2)
    assert not any(t.symbols() for op in m.walk() for t in (v.type for v in op.result_values))
    assert report["layers"][0]["experts"] == E and report["layers"][0]["k"] == k


def test_raised_ir_text_and_locations():
    m, _ = check_numerics(MoEText(4, 2, "swiglu", router=True))
    text = print_module(m)
    assert parse(text, params=m.params) is not None
    ops = {op.name: op for op in m.walk()}
    assert str(ops["moe.route"].loc) == "'moe.topk'"  # the router's top-k site
    assert str(ops["moe.gather"].loc) == "'moe.experts.0.index'"
    assert str(ops["moe.combine"].loc) == "'moe.experts.0.index_add'"
    assert {str(op.loc) for op in m.walk() if op.name == "moe.grouped_matmul"} >= \
        {"'moe.experts.0.w1'", "'moe.experts.0.w2'"}
    assert "u0" not in text


def test_weight_factor_on_the_left():
    check_numerics(MoEText(3, 2, "swiglu", swap_mul=True))


def test_per_expert_bias_reads_each_rows_expert():
    m, _ = check_numerics(MoEText(4, 2, "gelu", bias=True))
    assert "tensor.nonzero" not in m.op_counts()


def test_separate_expert_params_are_stacked():
    m, _ = check_numerics(MoEText(4, 2, "swiglu", weights="separate"))
    names = {a.name for a in m.main.weights}
    assert names == {"experts.w1.weight.stacked", "experts.w3.weight.stacked",
                     "experts.w2.weight.stacked"}
    assert m.params["experts.w1.weight.stacked"].shape == (4, D, FF)
    assert not any(n.startswith("experts.0") for n in m.params)


def test_failure_after_stacking_leaves_no_trace():
    # Per-expert [1, f] biases are stacked before the emitter finds it cannot use them on rows.
    m = MoEText(3, 2, "gelu", weights="separate", bias=True).module()
    names = set(m.params)
    before, report = raise_moe(m)
    assert print_module(m) == before and set(m.params) == names
    assert "used outside a matmul" in report["skipped"][0]


def test_experts_in_any_order():
    check_numerics(MoEText(4, 2, "swiglu", experts=[2, 0, 3, 1]))


@pytest.mark.parametrize("variant,reason", [
    ({"kinds": ["swiglu", "gelu", "swiglu", "swiglu"]}, "different function"),
    ({"experts": [0, 1, 1, 3]}, "not 0..3 once each"),
    ({"experts": [0, 1, 3]}, "not 0..2 once each"),
    ({"E": 3, "experts": [0, 1]}, "not slices of one [2, ...]"),
])
def test_mismatch_is_left_unchanged(variant, reason):
    gen = MoEText(**{"E": 4, **variant})
    m = gen.module()
    before, report = raise_moe(m)
    assert print_module(m) == before
    assert report["raised"] == 0 and len(report["skipped"]) == 1
    assert reason in report["skipped"][0], report


def test_wrong_expert_weight_is_left_unchanged():
    text = MoEText(3, 2).text().replace("start = 2, end = 3}", "start = 1, end = 2}", 1)
    m = parse(text, params=MoEText(3, 2).module().params)
    before, report = raise_moe(m)
    assert print_module(m) == before and "reads expert 1's weight" in report["skipped"][0]


def test_non_moe_index_add_is_ignored():
    m = parse("""func @main(%x: f32[5,3], %i: i64[4], %s: f32[4,3]) -> (f32[5,3]) {
  %0 = tensor.index_add %x, %i, %s {axis = 0} : f32[5,3]
  func.return %0
}""")
    before, report = raise_moe(m)
    assert print_module(m) == before and report == {"raised": 0, "skipped": [], "layers": []}


def test_in_pipeline():
    m = MoEText(3, 2).module()
    for p in parse_pipeline("raise-moe,canonicalize,cse,dce"):
        p.run(m)
        verify(m)
    assert "moe.grouped_matmul" in m.op_counts()


# ---- against torch eager ---------------------------------------------------------------------

def torch_moe(x, topi, topw, w1, w3, w2):
    """The baseline's sparse loop (reference/baseline_models.py, MoE impl='sparse')."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(topi == e)
        xe = x[tok]
        h = F.silu(xe @ w1[e]) * (xe @ w3[e])
        out.index_add_(0, tok, (h @ w2[e]) * topw[tok, slot].unsqueeze(-1))
    return out


@pytest.mark.parametrize("E,k", [(4, 2), (3, 1)])
def test_matches_torch_eager(E, k):
    gen = MoEText(E, k, "swiglu")
    m = gen.module(seed=5)
    raise_moe(m)
    torch.manual_seed(0)
    x = torch.randn(N, D)
    probs = torch.softmax(torch.randn(N, E), -1)
    topw, topi = probs.topk(k, dim=-1)
    topw = topw / topw.sum(-1, keepdim=True)
    ws = [torch.from_numpy(m.params[n]) for n in ("w1", "w3", "w2")]
    want = torch_moe(x, topi, topw, *ws).numpy()
    got, = run_func(m, [x.numpy(), topi.numpy(), topw.numpy()])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_golden_two_experts():
    """The whole raised form, printed: E=2, k=1, GELU experts."""
    m = MoEText(2, 1, "gelu").module()
    raise_moe(m)
    assert print_module(m).strip() == GOLDEN_E2_K1.strip()


GOLDEN_E2_K1 = """
func @main(%x: f32[13,8], %topi: i64[13,1], %topw: f32[13,1], %w1: f32[2,8,12] {param}, \
%w3: f32[2,8,12] {param}, %w2: f32[2,12,8] {param}) -> (f32[13,8]) {
  %0, %1 = moe.route %topi {num_experts = 2} : i64[13], i64[3]  loc("moe.experts.0")
  %2 = moe.gather %x, %0 {k = 1} : f32[13,8]  loc("moe.experts.0.index")
  %3 = moe.grouped_matmul %2, %w1, %1 : f32[13,12]  loc("moe.experts.0.w1")
  %4 = tensor.gelu %3 {approximate = "none"} : f32[13,12]
  %5 = moe.grouped_matmul %4, %w2, %1 : f32[13,8]  loc("moe.experts.0.w2")
  %6 = moe.combine %5, %0, %topw : f32[13,8]  loc("moe.experts.0.index_add")
  func.return %6
}
"""


# ---- end to end through the torch frontend ---------------------------------------------------

def BaselineMoE(d=8, f=12, experts=4, topk=2):
    """MoE impl='sparse' of the baseline models (lmc.zoo.MoE), small sizes."""
    from lmc.zoo import MoE
    return MoE(d, f, experts, topk)


def _import_or_skip(model, example):
    try:
        from lmc.frontends.torch import import_module
    except ImportError:
        pytest.skip("the torch frontend (lmc.frontends.torch.import_module) is not written yet")
    from lmc.errors import UnsupportedOpError
    try:
        return import_module(model, example)
    except UnsupportedOpError as exc:
        pytest.skip(f"the torch frontend cannot convert the sparse MoE yet: {exc}")


@pytest.mark.parametrize("E,k", [(4, 2), (3, 1)])
def test_end_to_end_baseline_moe(E, k):
    torch.manual_seed(0)
    model = BaselineMoE(experts=E, topk=k).eval()
    x = torch.randn(N, D)
    m = _import_or_skip(model, (x,))
    assert "tensor.nonzero" in m.op_counts()
    report = RaiseMoE().run(m)
    verify(m, "raise-moe")
    assert report["raised"] == 1, report
    assert "tensor.nonzero" not in m.op_counts() and "moe.grouped_matmul" in m.op_counts()
    for seed in (1, 2):
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = model(x).numpy()
        got, = run_func(m, [x.numpy()])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
