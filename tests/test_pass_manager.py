"""Pass manager: verify after each pass, dumps that parse back, numerics check, pipelines."""
from dataclasses import dataclass

import numpy as np
import pytest

import lmc
from lmc.ir import parse, parse_file
from lmc.ir.rewriter import P, RuleSet, apply_rules
from lmc.pass_base import PASSES, Pass, parse_pipeline, register_pass
from lmc.pass_manager import PassManager

TEXT = """func @main(%x: f32[B,7], %w: f32[7,5] {param}) -> (f32[B,5]) {
  %0 = tensor.matmul %x, %w : f32[B,5]  loc("proj" "model.py":3)
  %1 = tensor.constant {value = 1.0} : f32[]
  %2 = tensor.mul %0, %1 : f32[B,5]
  %3 = tensor.exp %2 : f32[B,5]
  %4 = tensor.add %3, %0 : f32[B,5]
  func.return %4
}
"""


def module():
    rng = np.random.default_rng()
    return parse(TEXT, params={"w": rng.standard_normal((7, 5)).astype(np.float32)})


def _add_to_sub(rw, lhs, rhs, root):
    return rw.value("tensor.sub", lhs, rhs)


@dataclass(frozen=True)
class BreakAdd(Pass):
    """A deliberately wrong pass: turns every add into a sub."""

    name = "test-break-add"

    def run(self, m):
        apply_rules(m.main, RuleSet([(P("tensor.add", P.var("lhs"), P.var("rhs")), _add_to_sub)]))


@dataclass(frozen=True)
class BreakTypes(Pass):
    """A deliberately wrong pass: changes a result type behind the verifier's back."""

    name = "test-break-types"

    def run(self, m):
        op = next(o for o in m.walk() if o.name == "tensor.exp")
        op.result_values[0].type = op.result.type.with_dtype(lmc.ir.DType.f16)


for cls in (BreakAdd, BreakTypes):
    if cls.name not in PASSES:
        register_pass(cls)


def test_dump_files_parse_back_and_index(tmp_path):
    x = np.random.default_rng().standard_normal((3, 7)).astype(np.float32)
    cm = lmc.compile(module(), pipeline="canonicalize,cse,dce", dump_ir=str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[:7] == ["00-import.lmc", "01-canonicalize.diff", "01-canonicalize.lmc",
                         "02-cse.diff", "02-cse.lmc", "03-dce.diff", "03-dce.lmc"]
    assert "index.md" in names and "weights.safetensors" in names
    for f in tmp_path.glob("*.lmc"):
        m = parse_file(f)  # weights.safetensors beside the dumps is picked up
        lmc.ir.verifier.verify(m)
        np.testing.assert_allclose(lmc.backends.reference.run_func(m, [x])[0], cm(x), rtol=1e-6)
    index = (tmp_path / "index.md").read_text()
    assert "`canonicalize`" in index and "tensor.mul -1" in index


def test_env_var_turns_on_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_DUMP_IR", str(tmp_path / "d"))
    lmc.compile(module(), pipeline="cse")
    assert (tmp_path / "d" / "01-cse.lmc").exists()


def test_check_numerics_names_the_wrong_pass():
    x = np.random.default_rng().standard_normal((2, 7)).astype(np.float32)
    with pytest.raises(lmc.NumericsError, match="test-break-add") as info:
        lmc.compile(module(), (x,), pipeline="canonicalize,test-break-add,cse",
                    check_numerics=True)
    assert info.value.pass_name == "test-break-add"
    lmc.compile(module(), (x,), pipeline="canonicalize,cse,dce", check_numerics=True)


def test_verifier_runs_after_every_pass():
    with pytest.raises(lmc.VerificationError, match="after pass 'test-break-types'"):
        PassManager(parse_pipeline("test-break-types")).run(module())


def test_timings_and_records():
    pm = PassManager.from_pipeline("canonicalize,cse,dce")
    pm.run(module())
    assert [r.name for r in pm.records] == ["canonicalize", "cse", "dce"]
    assert all(r.seconds >= 0 for r in pm.records)


@pytest.mark.parametrize("bad", ["nosuchpass", "cse{nosuchoption=1}", "cse,,{",
                                 "dce{drop_unused_weights=maybe}"])
def test_bad_pipelines_are_clear_errors(bad):
    with pytest.raises(lmc.PipelineError):
        parse_pipeline(bad)


def test_pass_spec_round_trips():
    (p,) = parse_pipeline("dce{drop_unused_weights=false}")
    assert parse_pipeline(p.spec()) == [p]


def test_a_failing_pass_still_leaves_a_reloadable_dump(tmp_path):
    with pytest.raises(lmc.VerificationError):
        PassManager(parse_pipeline("cse,test-break-types"), dump_ir=tmp_path).run(module())
    assert (tmp_path / "02-test-break-types.lmc").exists()  # the broken IR, to read
    assert "test-break-types" in (tmp_path / "index.md").read_text()
    assert (tmp_path / "weights.safetensors").exists()
    lmc.ir.verifier.verify(parse_file(tmp_path / "01-cse.lmc"))


def test_dump_dir_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(lmc.LmcError, match="cannot create the IR dump folder"):
        lmc.compile(module(), pipeline="cse", dump_ir=str(f))
