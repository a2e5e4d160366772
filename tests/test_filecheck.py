"""Golden IR tests (MLIR style): text in, pipeline, text out.

Convention of a `tests/filecheck/<pass>-<topic>.lmc` file:

    // RUN: canonicalize,cse                 <- first line: the pipeline
    // any comment lines
    func @main(...) -> (...) { ... }         <- input IR
    // EXPECT:
    func @main(...) -> (...) { ... }         <- the exact printed output after the pipeline
    // -----                                 <- optional: another case, same pipeline

Each case is parsed, run through the pipeline, verified, printed and compared exactly (a unified
diff on mismatch); the interpreter's outputs before and after must agree too. `{param}` and
`{buffer}` arguments get random arrays of their declared shapes. To rewrite the EXPECT sections
after an intended change, run with LMC_UPDATE_GOLDEN=1 and review the git diff.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import numpy as np
import pytest

from lmc.backends.reference.interpreter import run_func
from lmc.ir import parse, print_module
from lmc.ir.core import Module
from lmc.ir.types import eval_shape
from lmc.ir.verifier import verify
from lmc.pass_base import parse_pipeline

DIR = Path(__file__).parent / "filecheck"
SEPARATOR = "// -----"
EXPECT = "// EXPECT:"
SYMBOL_SIZE = 3  # symbolic dims run with an odd size


def split_file(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """(pipeline, [(input text, expected text)]) of a golden file."""
    lines = path.read_text().splitlines()
    m = re.fullmatch(r"//\s*RUN:\s*(.+)", lines[0].strip()) if lines else None
    if m is None:
        raise ValueError(f"{path.name}: the first line must be '// RUN: <pipeline>'")
    cases, chunk = [], []
    for line in lines[1:] + [SEPARATOR]:
        if line.strip() != SEPARATOR:
            chunk.append(line)
            continue
        text = "\n".join(chunk)
        if EXPECT not in text:
            raise ValueError(f"{path.name}: a case has no '{EXPECT}' section")
        before, after = text.split(EXPECT, 1)
        cases.append((before, after.strip("\n")))
        chunk = []
    return m.group(1).strip(), cases


def weights_for(text: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for every {param}/{buffer} argument, shaped as declared."""
    m = parse(text)  # parses without arrays; only the signature is read
    rng = np.random.default_rng(seed)
    return {a.name: _random(rng, a.type, {}) for f in m.funcs.values() for a in f.weights}


def _random(rng, t, env) -> np.ndarray:
    shape = eval_shape(t.shape, env)
    if t.dtype.is_float:
        return rng.standard_normal(shape).astype(t.dtype.to_numpy())
    return rng.integers(0, 2, shape).astype(t.dtype.to_numpy())  # 0/1 fit bools and indices


def run_main(m: Module, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    env = {s: SYMBOL_SIZE for a in m.main.inputs for s in a.type.symbols()}
    return run_func(m, [_random(rng, a.type, env) for a in m.main.inputs])


def run_case(pipeline: str, text: str) -> tuple[str, Module, Module]:
    params = weights_for(text)
    m = parse(text, params)
    verify(m)
    before = parse(text, params)
    for p in parse_pipeline(pipeline):
        p.run(m)
        verify(m, pass_name=p.spec())
    return print_module(m).strip("\n"), before, m


def _update(path: Path, pipeline: str, outputs: list[tuple[str, str]]) -> None:
    parts = [f"{inp.rstrip()}\n{EXPECT}\n{out}\n" for inp, out in outputs]
    path.write_text(f"// RUN: {pipeline}\n" + f"{SEPARATOR}\n".join(parts))


@pytest.mark.parametrize("path", sorted(DIR.glob("*.lmc")), ids=lambda p: p.stem)
def test_golden(path: Path):
    pipeline, cases = split_file(path)
    produced = []
    for i, (text, expected) in enumerate(cases):
        got, before, after = run_case(pipeline, text)
        produced.append((text, got))
        for a, b in zip(run_main(before), run_main(after)):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"case {i} changed numerics")
        if os.environ.get("LMC_UPDATE_GOLDEN"):
            continue
        if got != expected:
            diff = "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(),
                                                  "expected", "got", lineterm=""))
            pytest.fail(f"{path.name} case {i} ({pipeline}):\n{diff}")
    if os.environ.get("LMC_UPDATE_GOLDEN"):
        _update(path, pipeline, produced)


def test_every_pass_of_this_suite_has_goldens():
    names = {p.stem.split("-")[0] for p in DIR.glob("*.lmc")}
    assert {"canonicalize", "cse", "dce", "fuse", "raise"} <= names
