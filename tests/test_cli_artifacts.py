"""`lmc compile`, `lmc run` and `lmc inspect`: text IR → artifact → outputs that match the
reference interpreter, and one-line errors (exit 1) for every wrong input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import lmc
from lmc.backends.cpu import jit
from lmc.cli import main

TEXT = """func @main(%x: f32[B,T,19], %ids: i64[B], %g: f32[19] {param}) -> (f32[B,T,19],
                                                                     f32[B,1,19]) {
  %0 = tensor.mul %x, %g : f32[B,T,19]
  %1 = tensor.softmax %0 {axis = -1} : f32[B,T,19]
  %2 = tensor.sum %0 {axes = [1], keepdim = true} : f32[B,1,19]
  func.return %1, %2
}
"""


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE_DIR", str(tmp_path / "cache"))
    yield
    jit.set_cache_dir(None)


@pytest.fixture
def model(tmp_path):
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    f = tmp_path / "m.lmc"
    f.write_text(TEXT)
    g = rng.standard_normal(19, dtype=np.float32)
    save_file({"g": g}, str(tmp_path / "w.safetensors"))
    return f, g, rng, seed


def _compile(tmp_path, f, capsys, *extra) -> str:
    out = tmp_path / "m.lmca"
    assert main(["compile", str(f), "-o", str(out), "--weights",
                 str(tmp_path / "w.safetensors"), *extra]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    return str(out)


def test_compile_inspect_run(tmp_path, model, capsys):
    f, g, rng, seed = model
    art = _compile(tmp_path, f, capsys)
    assert main(["inspect", art]) == 0
    text = capsys.readouterr().out
    for want in (f"lmc       {lmc.__version__}  target cpu", "hashes ok", "runs here yes",
                 "x: f32[B,T,19], ids: i64[B]", "output1: f32[B,1,19]", "weights   1 arrays",
                 "pipeline  canonicalize", "kernels   "):
        assert want in text, text
    x = rng.standard_normal((3, 7, 19), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", art, "--input", f"x={tmp_path / 'x.npy'}", "--output",
                 str(tmp_path / "o.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("output0  float32[3, 7, 19]  mean=") and "sha256:" in lines[0]
    assert lines[1].startswith("output1  float32[3, 1, 19]")
    got = np.load(tmp_path / "o.npz")
    ref = lmc.compile(lmc.parse(TEXT, params={"g": g}))(x, np.zeros(3, np.int64))
    for name, want in zip(("output0", "output1"), ref):
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5,
                                   err_msg=f"seed {seed}")


def test_run_on_random_inputs_takes_dims(tmp_path, model, capsys):
    f, *_ = model
    art = _compile(tmp_path, f, capsys, "-p", "canonicalize,fuse")
    assert main(["run", art, "--dim", "B=2", "--dim", "T=129", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert "output0  float32[2, 129, 19]" in first and "output1  float32[2, 1, 19]" in first
    assert main(["run", art, "--dim", "B=2", "--dim", "T=129", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # same seed, same inputs, same checksums
    assert main(["run", art]) == 0  # symbols default to 1
    assert "output0  float32[1, 1, 19]" in capsys.readouterr().out
    assert main(["inspect", art]) == 0
    assert "pipeline  canonicalize,fuse\n" in capsys.readouterr().out


def test_run_profile_prints_every_step(tmp_path, model, capsys):
    f, *_ = model
    art = _compile(tmp_path, f, capsys, "-p", "canonicalize,fuse")
    assert main(["run", art, "--dim", "B=2", "--dim", "T=33", "--profile", "3"]) == 0
    out = capsys.readouterr().out
    assert "profile: " in out and "(mean of 3)" in out
    assert "| kernel.fused{reduction} | kernel |" in out, out


def test_compile_to_the_reference_target(tmp_path, model, capsys):
    f, *_ = model
    art = _compile(tmp_path, f, capsys, "--target", "ref")
    assert main(["inspect", art]) == 0
    out = capsys.readouterr().out
    assert "target ref" in out and "kernels   0" in out and "cpu  " not in out
    assert main(["run", art, "--dim", "T=4"]) == 0
    assert "output0  float32[1, 4, 19]" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, model, capsys):
    f, *_ = model
    art = _compile(tmp_path, f, capsys)
    (tmp_path / "bad.npy").write_text("not an array")
    cases = [
        (["run", str(f)], "is lmc text IR, not an artifact; compile it first: lmc compile"),
        (["inspect", str(f)], "is lmc text IR"),
        (["compile", art, "-o", str(tmp_path / "x.lmca")], "is an lmc artifact already"),
        (["run", art, "--input", "y=a.npy"], "--input names ['y'] are not inputs"),
        (["run", art, "--dim", "T"], "--dim takes NAME=VALUE, got 'T'"),
        (["run", art, "--dim", "T=x"], "--dim takes NAME=VALUE"),
        (["run", art, "--input", f"x={tmp_path / 'bad.npy'}"], "cannot read input"),
        (["run", art, "--input", f"x={tmp_path / 'none.npy'}"], "No such file"),
        (["run", str(tmp_path / "none.lmca")], "cannot read artifact"),
        (["compile", str(f), "-o", str(tmp_path / "y.lmca"), "--target", "tpu"],
         "target 'tpu' is not available"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("lmc: error:") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    data = bytearray((tmp_path / "m.lmca").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "m.lmca").write_bytes(bytes(data))
    assert main(["inspect", art]) == 1
    assert "corrupt artifact" in capsys.readouterr().err


def test_help_lists_the_artifact_commands():
    out = subprocess.run([sys.executable, "-m", "lmc.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("compile", "run", "inspect", "lmc run model.lmca --dim B=2"):
        assert word in out
