"""The `lmc` command line."""
import subprocess
import sys

from lmc.cli import main

TEXT = """func @main(%x: f32[3]) -> (f32[3]) {
  %0 = tensor.constant {value = 0.0} : f32[]
  %1 = tensor.add %x, %0 : f32[3]
  %2 = tensor.exp %x : f32[3]
  func.return %1
}
"""


def test_opt_prints_the_optimized_ir(tmp_path, capsys):
    f = tmp_path / "a.lmc"
    f.write_text(TEXT)
    assert main(["opt", str(f), "-p", "canonicalize,dce", "--dump-ir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "func.return %x" in out and "tensor.exp" not in out
    assert (tmp_path / "d" / "02-dce.lmc").exists()


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    f = tmp_path / "bad.lmc"
    f.write_text(TEXT.replace("tensor.exp", "tensor.expp"))
    assert main(["opt", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmc: error:") and "bad.lmc:4:" in err and "Traceback" not in err
    assert main(["opt", str(f), "-p", "nosuch"]) == 1


def test_help_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "lmc.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("opt", "demo", "passes", "examples:"):
        assert word in out
