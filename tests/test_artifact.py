"""Object code and the JIT's kernel cache, the compile cache, and artifacts (`cm.save` /
`lmc.load`): round trips against the reference interpreter at two sizes, every ArtifactError,
and no LLVM compile when a fresh process loads an artifact. Every test gets its own
LMC_CACHE_DIR, so nothing touches ~/.cache."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import types
import zipfile

import numpy as np
import pytest
import torch

import lmc
from lmc.artifact import read
from lmc.backends.cpu import jit
from lmc.backends.cpu.jit import HostTarget, JitEngine, JitError, host_target, module_key

AVX2 = host_target().without_avx512()
TOL = {"rtol": 1e-4, "atol": 1e-5}

MLP = """func @main(%x: f32[B,T,24], %w: f32[24,40] {param}, %b: f32[40] {param},
                    %g: f32[40] {param}) -> (f32[B,T,40], f32[B,T,1]) {
  %0 = tensor.matmul %x, %w : f32[B,T,40]
  %1 = tensor.add %0, %b : f32[B,T,40]
  %2 = tensor.gelu %1 {approximate = "none"} : f32[B,T,40]
  %3 = tensor.layer_norm %2, %g : f32[B,T,40]
  %4 = tensor.mean %1 {axes = [-1], keepdim = true} : f32[B,T,1]
  func.return %3, %4
}
"""
ROWS = """func @main(%x: f32[B,T,37], %g: f32[37] {param}) -> (f32[B,T,37], f32[B,T,1]) {
  %0 = tensor.mul %x, %g : f32[B,T,37]
  %1 = tensor.softmax %0 {axis = -1} : f32[B,T,37]
  %2 = tensor.tanh %1 : f32[B,T,37]
  %3 = tensor.sum %0 {axes = [-1], keepdim = true} : f32[B,T,1]
  func.return %2, %3
}
"""
MODELS = {"rows": (ROWS, {"g": (37,)}), "mlp": (MLP, {"w": (24, 40), "b": (40,), "g": (40,)})}
SIZES = [(1, 7), (2, 129)]


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LMC_CACHE_DIR", str(d))
    yield d
    jit.set_cache_dir(None)  # the default engines must not keep writing into a tmp dir


def _module(name: str, rng) -> lmc.ir.Module:
    text, shapes = MODELS[name]
    return lmc.parse(text, params={k: rng.standard_normal(v, dtype=np.float32)
                                   for k, v in shapes.items()})


def _inputs(cm, rng, b: int, t: int) -> list[np.ndarray]:
    return [rng.standard_normal((b, t, cm.signature[0][1].shape[-1]), dtype=np.float32)]


def _outs(x) -> list[np.ndarray]:
    return list(x) if isinstance(x, tuple) else [x]


def _check_against_reference(cm, module, rng, seed):
    ref = lmc.compile(module)
    for b, t in SIZES:
        xs = _inputs(cm, rng, b, t)
        for got, want in zip(_outs(cm(*xs)), _outs(ref(*xs))):
            np.testing.assert_allclose(got, want, **TOL, err_msg=f"seed {seed}")


# ---- object code and the JIT's kernel cache ------------------------------------------------------

def _text(name: str, value: float = 2.0) -> str:
    return textwrap.dedent(f"""\
        define internal double @{name}_helper(double %x) {{
          %y = fmul double %x, {value:.1f}
          ret double %y
        }}

        define double @{name}(double %x) {{
          %y = call double @{name}_helper(double %x)
          ret double %y
        }}
        """)


def _call(module, name: str, x: float) -> float:
    import ctypes
    return module.function(name, ctypes.c_double, ctypes.c_double)(x)


def test_modules_keep_their_key_and_object_code(tmp_path):
    engine = JitEngine(cache_dir=tmp_path)
    text = _text("lmc_test_twice")
    m = engine.add_ir("twice", text)
    assert m.source == "compiled" and m.key == module_key(text, engine.target, 3)
    assert m.object_code[:4] == b"\x7fELF" and _call(m, "lmc_test_twice", 1.5) == 3.0
    assert engine.add_ir("again", text) is m and engine.stats["memory"] == 1
    assert (tmp_path / f"{m.key}.o").read_bytes() == m.object_code
    # the key follows the CPU name, the features, the opt level and the text
    t = engine.target
    others = [module_key(text, HostTarget("x86-64", t.features), 3), module_key(text + "\n", t, 3),
              module_key(text, HostTarget(t.cpu, t.features + ",-fma"), 3),
              module_key(text, t, 2)]
    assert len({m.key, *others}) == 5


def test_helper_processes_compile_the_same_object_code(monkeypatch):
    """Modules compiled by the helper processes (codegen.py) are byte for byte what this
    process compiles; several threads compile at once; a helper that died, or a module LLVM
    rejects, falls back to this process (which names LLVM's error)."""
    from concurrent.futures import ThreadPoolExecutor

    from lmc.backends.cpu import codegen
    here, helped = JitEngine(), JitEngine()
    helped.start_helpers(2)
    texts = [_text(f"lmc_test_helped_{i}", float(i)) for i in range(4)]
    with ThreadPoolExecutor(3) as pool:
        modules = list(pool.map(lambda t: helped.add_ir(t[:40], t), texts))
    for i, (m, text) in enumerate(zip(modules, texts)):
        assert m.object_code == here.add_ir(f"here{i}", text).object_code
        assert _call(m, f"lmc_test_helped_{i}", 2.0) == 2.0 * i
        assert f"@lmc_test_helped_{i}" in m.optimized_ir  # recomputed on demand
    with pytest.raises(JitError, match=r"LLVM rejected module 'bad'"):
        helped.add_ir("bad", "define i32 @lmc_test_bad() {\n  ret i64 0\n}\n")
    helped._helpers._pid = -1  # as in a forked child: the parent's pipes are not its own
    calls = []
    monkeypatch.setattr(codegen._Helper, "compile", lambda *a: calls.append(a))
    m = helped.add_ir("forked", _text("lmc_test_forked", 5.0))
    assert _call(m, "lmc_test_forked", 1.0) == 5.0 and not calls  # no helper was asked
    monkeypatch.undo()
    helped._helpers._pid = os.getpid()
    for helper in helped._helpers._all:
        helper._proc.kill()
        helper._proc.wait()
    m = helped.add_ir("after", _text("lmc_test_after_kill", 3.0))
    assert m.source == "compiled" and _call(m, "lmc_test_after_kill", 1.0) == 3.0
    helped._helpers.close()


def test_registered_and_disk_objects_skip_llvm(tmp_path):
    text = _text("lmc_test_thrice", 3.0)
    first = JitEngine(cache_dir=tmp_path).add_ir("thrice", text)
    from_disk = JitEngine(cache_dir=tmp_path)
    m = from_disk.add_ir("thrice", text)
    assert m.source == "disk" and from_disk.stats["compiled"] == 0
    assert _call(m, "lmc_test_thrice", 2.0) == 6.0 and m.object_code == first.object_code
    assert "define double @lmc_test_thrice" in m.optimized_ir  # recomputed without codegen
    registered = JitEngine()
    registered.register_objects({first.key: first.object_code})
    m = registered.add_ir("thrice", text)
    assert m.source == "registered" and _call(m, "lmc_test_thrice", 1.0) == 3.0


def test_a_damaged_cache_file_is_compiled_again(tmp_path):
    text = _text("lmc_test_damaged", 5.0)
    key = JitEngine(cache_dir=tmp_path).add_ir("damaged", text).key
    obj = tmp_path / f"{key}.o"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))  # loading this into MCJIT would crash the process
    engine = JitEngine(cache_dir=tmp_path)
    m = engine.add_ir("damaged", text)
    assert m.source == "compiled" and _call(m, "lmc_test_damaged", 1.0) == 5.0
    assert obj.read_bytes() == m.object_code


def test_one_symbol_with_two_definitions_is_an_error():
    engine = JitEngine()
    engine.add_ir("a", _text("lmc_test_clash", 2.0))
    with pytest.raises(JitError, match=r"'lmc_test_clash'.*module 'a'.*different code"):
        engine.add_ir("b", _text("lmc_test_clash", 4.0))
    with pytest.raises(JitError, match=r"'lmc_test_clash_global'"):
        engine.add_ir("e", "@lmc_test_clash_global = global i64 0\n")
        engine.add_ir("f", "@lmc_test_clash_global = global i64 1\n")
    # internal (module-local) helpers of one name do not clash
    engine.add_ir("c", _text("lmc_test_c", 1.0).replace("@lmc_test_c_helper", "@helper"))
    m = engine.add_ir("d", _text("lmc_test_d", 7.0).replace("@lmc_test_d_helper", "@helper"))
    assert _call(m, "lmc_test_d", 1.0) == 7.0


def test_exported_symbols_come_from_the_text():
    text = ('define i32 @a() {\n}\n@g = global i64 0\n@h = internal global i64 0\n'
            '@"q x" = constant i8 1\ndefine private void @p() {\n}\n'
            'define internal fastcc void @i() {\n}\ndeclare void @d()\n'
            '@e = external global i32\ndefine dso_local <8 x float> @v(ptr %x) {\n}\n')
    assert jit.exported_symbols(text) == ("a", "v", "g", "q x")
    assert jit.exported_symbols("") == ()


DISK_SCRIPT = """
import json, sys, numpy as np
from lmc.backends.cpu import jit, sgemm
from lmc.backends.cpu.jit import default_engine, host_target
jit.set_cache_dir(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
a, b = rng.standard_normal((37, 53), dtype=np.float32), rng.standard_normal((53, 29), np.float32)
stats = {}
for name, target in (("host", None), ("avx2", host_target().without_avx512())):
    err = np.abs(sgemm(a, b, target=target) - a.astype(np.float64) @ b).max()
    assert err < 1e-3, (name, err)
    stats[name] = default_engine(target).stats
print(json.dumps(stats))
"""


def test_a_fresh_process_takes_the_gemm_kernels_from_disk(tmp_path):
    _, seed = _rng()
    run = [sys.executable, "-c", DISK_SCRIPT, str(tmp_path / "k"), str(seed % 2**32)]
    cold = json.loads(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
    warm = json.loads(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
    # (on an AVX2-only host both targets are one CPU: the second engine already hits the disk)
    assert cold["host"]["compiled"] >= 1 and cold["host"]["disk"] == 0, cold
    assert cold["avx2"]["compiled"] + cold["avx2"]["disk"] >= 1, cold
    for name in ("host", "avx2"):
        assert warm[name]["compiled"] == 0 and warm[name]["disk"] >= 1, warm


# ---- artifacts -----------------------------------------------------------------------------------

@pytest.fixture(params=["rows", "mlp"])
def compiled(request):
    rng, seed = _rng()
    module = _module(request.param, rng)
    cm = lmc.compile(module, target="cpu")
    return cm, module, rng, seed


def test_save_load_run_matches(compiled, tmp_path):
    cm, module, rng, seed = compiled
    _check_against_reference(cm, module, rng, seed)  # also compiles any lazily built kernel
    path = cm.save(tmp_path / "m.lmca")
    assert cm.save(tmp_path / "again.lmca").read_bytes() == path.read_bytes()  # reproducible
    loaded = lmc.load(path)
    assert loaded.signature == cm.signature and not loaded.cache_hit
    for b, t in SIZES:
        xs = _inputs(cm, rng, b, t)
        for got, want in zip(_outs(loaded(*xs)), _outs(cm(*xs))):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"seed {seed}")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        manifest = json.loads(zf.read("manifest.json"))
    assert {"manifest.json", "ir.lmc", "weights.safetensors"} <= set(names)
    assert manifest["inputs"][0]["type"].startswith("f32[B,T,")
    assert manifest["cpu"]["features"] == host_target().features
    assert manifest["kernels"] and all(f"kernels/{k['key']}.o" in names
                                       for k in manifest["kernels"])


MIXED = """func @main(%x: f32[B,5], %w: bf16[5] {param}, %h: f16[5] {param}, %s: f32[] {param},
                      %m: bool[5] {param}) -> (f32[B,5]) {
  %0 = tensor.cast %w {dtype = f32} : f32[5]
  %1 = tensor.mul %x, %0 : f32[B,5]
  %2 = tensor.cast %h {dtype = f32} : f32[5]
  %3 = tensor.add %1, %2 : f32[B,5]
  %4 = tensor.mul %3, %s : f32[B,5]
  %5 = tensor.where %m, %4, %x : f32[B,5]
  func.return %5
}
"""


def test_weights_of_every_dtype_round_trip(tmp_path):
    import ml_dtypes
    rng, seed = _rng()
    params = {"w": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
              "h": rng.standard_normal(5).astype(np.float16),
              "s": np.array(rng.standard_normal(), np.float32), "m": rng.random(5) < 0.5}
    cm = lmc.compile(lmc.parse(MIXED, params=params), target="cpu")
    loaded = lmc.load(cm.save(tmp_path / "mixed.lmca"))
    for name, arr in cm.module.params.items():
        got = loaded.module.params[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape and got.tobytes() == arr.tobytes()
    x = rng.standard_normal((3, 5), dtype=np.float32)
    np.testing.assert_array_equal(loaded(x), cm(x), err_msg=f"seed {seed}")


LOAD_SCRIPT = """
import json, sys, numpy as np, lmc
from lmc.backends.cpu.jit import default_engine
cm = lmc.load(sys.argv[1])
xs = np.load(sys.argv[2])
outs = cm(xs["x"])
np.savez(sys.argv[3], *(outs if isinstance(outs, tuple) else [outs]))
print(json.dumps(default_engine().stats))
"""


def test_a_fresh_process_loads_without_compiling(compiled, tmp_path):
    cm, _, rng, seed = compiled
    xs = _inputs(cm, rng, 3, 17)
    want = _outs(cm(*xs))
    path = cm.save(tmp_path / "m.lmca")
    np.savez(tmp_path / "in.npz", x=xs[0])
    env = dict(os.environ, LMC_CACHE_DIR="off")
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(path), str(tmp_path / "in.npz"),
                          str(tmp_path / "out.npz")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["compiled"] == 0 and stats["registered"] >= 1, stats
    got = np.load(tmp_path / "out.npz")
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-6, atol=1e-7,
                                   err_msg=f"seed {seed}")


OTHER_CPU_SCRIPT = """
import json, sys, numpy as np, lmc
from lmc.artifact import read
from lmc.backends.cpu.jit import HostTarget, default_engine
cpu = read(sys.argv[1]).manifest["cpu"]
cm = lmc.load(sys.argv[1])
xs = np.load(sys.argv[2])
np.save(sys.argv[3], cm(xs["x"])[0])
print(json.dumps([default_engine(HostTarget(cpu["name"], cpu["features"])).stats,
                  default_engine().stats]))
"""


def test_code_for_another_cpu_this_machine_runs_is_loaded_as_is(tmp_path):
    """Kernels built for the AVX2 target (on an AVX-512 host; else for another CPU name with
    this host's features) load into that target's engine: no recompile for the host."""
    rng, seed = _rng()
    host = host_target()
    other = AVX2 if host != AVX2 else HostTarget("x86-64-v3", host.features)
    module = _module("mlp", rng)
    fused = lmc.compile(module, target="cpu").module
    from lmc.backends.cpu.runtime import CpuExecutable
    from lmc.compile import CompiledModel
    cm = CompiledModel(fused, {}, lmc.CompileOptions(target="cpu"),
                       executable=CpuExecutable(fused, target=other))
    xs = _inputs(cm, rng, 2, 9)
    want = cm(*xs)[0]
    path = cm.save(tmp_path / "other.lmca")
    np.savez(tmp_path / "in.npz", x=xs[0])
    env = dict(os.environ, LMC_CACHE_DIR="off")
    out = subprocess.run([sys.executable, "-c", OTHER_CPU_SCRIPT, str(path),
                          str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    theirs, hosts = json.loads(out.stdout)
    assert theirs["compiled"] == 0 and theirs["registered"] >= 1 and hosts["compiled"] == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=1e-6, atol=1e-7,
                               err_msg=f"seed {seed}")


def test_torch_inputs_and_output_structure_survive(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.export import Dim

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.randn(37))
            self.ln = torch.nn.LayerNorm(37)
            self.fc = torch.nn.Linear(37, 37)

        def forward(self, x):
            y = self.fc(self.ln(x * self.scale))
            return {"soft": torch.softmax(y, -1), "pair": (y.tanh(), x.sum(-1))}

    rng, seed = _rng()
    torch.manual_seed(seed % 2**32)
    net = Net().eval()
    x = torch.randn(2, 7, 37)
    t = Dim("T", min=2, max=256)
    cm = lmc.compile(net, (x,), dynamic_shapes={"x": {1: t}}, target="cpu")
    loaded = lmc.load(cm.save(tmp_path / "net.lmca"))
    again = lmc.compile(net, (x,), dynamic_shapes={"x": {1: t}}, target="cpu")
    assert again.cache_hit
    for n in (7, 129):
        xs = torch.from_numpy(rng.standard_normal((2, n, 37), dtype=np.float32))
        with torch.no_grad():
            want = net(xs)
        for model in (loaded, again):
            got = model(xs)
            assert set(got) == {"soft", "pair"} and isinstance(got["pair"], tuple)
            for g, w in ((got["soft"], want["soft"]), *zip(got["pair"], want["pair"])):
                np.testing.assert_allclose(g.numpy(), w.numpy(), **TOL,
                                           err_msg=f"seed {seed}")
        flat = loaded(xs.numpy())  # numpy in: numpy out, flat
        assert isinstance(flat, tuple) and isinstance(flat[0], np.ndarray)


# ---- artifact errors -----------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    rng, _ = _rng()
    cm = lmc.compile(_module("rows", rng), target="cpu")
    cm(*_inputs(cm, rng, 1, 3))
    return cm.save(tmp_path / "m.lmca")


def _entries(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _rewrite(path, entries: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())


def _edit_manifest(path, edit) -> None:
    entries = _entries(path)
    manifest = json.loads(entries["manifest.json"])
    edit(manifest)
    entries["manifest.json"] = json.dumps(manifest).encode()
    _rewrite(path, entries)


def test_truncated_or_flipped_files_are_corrupt(saved):
    data = saved.read_bytes()
    for bad in (data[: len(data) // 2], data[:100], b"\x00\x01binary junk"):
        saved.write_bytes(bad)
        with pytest.raises(lmc.ArtifactError, match=r"corrupt"):
            lmc.load(saved)
    for where in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        flipped = bytearray(data)
        flipped[where] ^= 0x55
        saved.write_bytes(bytes(flipped))
        with pytest.raises(lmc.ArtifactError, match=r"corrupt|tampered"):
            lmc.load(saved)


def test_a_missing_entry_is_corrupt(saved):
    entries = _entries(saved)
    del entries["ir.lmc"]
    _rewrite(saved, entries)
    with pytest.raises(lmc.ArtifactError, match=r"corrupt.*missing entry 'ir.lmc'"):
        lmc.load(saved)


@pytest.mark.parametrize("entry", ["weights.safetensors", "ir.lmc", "kernel"])
def test_a_changed_entry_is_tampered(saved, entry):
    entries = _entries(saved)
    if entry == "kernel":
        entry = next(n for n in entries if n.endswith(".o"))
    data = bytearray(entries[entry])
    data[-1] ^= 1
    entries[entry] = bytes(data)  # a valid zip again: only the manifest's sha256 can tell
    _rewrite(saved, entries)
    with pytest.raises(lmc.ArtifactError, match=f"tampered.*'{entry}'"):
        lmc.load(saved)


def test_an_unlisted_entry_is_tampered(saved):
    _rewrite(saved, _entries(saved) | {"kernels/extra.o": b"\x7fELF"})
    with pytest.raises(lmc.ArtifactError, match=r"tampered.*'kernels/extra.o'.*not listed"):
        lmc.load(saved)


def test_another_lmc_version_is_refused(saved):
    _edit_manifest(saved, lambda m: m.update(lmc_version="0.0.1"))
    with pytest.raises(lmc.ArtifactError, match=rf"lmc 0\.0\.1.*lmc {lmc.__version__}"):
        lmc.load(saved)


def test_a_cpu_without_a_feature_of_the_code_is_refused(saved):
    rng, seed = _rng()
    before = lmc.load(saved)
    _edit_manifest(saved, lambda m: m["cpu"].update(features=m["cpu"]["features"] +
                                                    ",+lmcfakefeature"))
    with pytest.raises(lmc.ArtifactError, match=r"lacks: lmcfakefeature.*recompile=True"):
        lmc.load(saved)
    rebuilt = lmc.load(saved, recompile=True)
    xs = _inputs(before, rng, 2, 5)
    for got, want in zip(rebuilt(*xs), before(*xs)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"seed {seed}")


def test_text_ir_is_not_an_artifact(tmp_path):
    f = tmp_path / "model.lmc"
    f.write_text("// a model\n" + ROWS)
    with pytest.raises(lmc.ArtifactError, match=r"is lmc text IR.*lmc compile .*model.lmc -o"):
        lmc.load(f)
    with pytest.raises(lmc.ArtifactError, match=r"cannot read"):
        lmc.load(tmp_path / "nope.lmca")


# ---- the compile cache ---------------------------------------------------------------------------

def test_the_second_compile_is_a_cache_hit(cache_dir):
    rng, seed = _rng()
    module = _module("rows", rng)
    first = lmc.compile(module, target="cpu")
    second = lmc.compile(module, target="cpu", options=lmc.CompileOptions(threads=1))
    assert not first.cache_hit and second.cache_hit and second.pass_records == []
    assert second.executable.threads == 1  # runtime options come from this call
    assert second.artifacts["optimized"] == first.artifacts["optimized"]
    assert len(list((cache_dir / "models").iterdir())) == 1
    _check_against_reference(second, module, rng, seed)


def test_a_changed_weight_or_option_is_a_miss(cache_dir):
    rng, seed = _rng()
    module = _module("rows", rng)
    assert not lmc.compile(module, target="cpu").cache_hit
    changed = lmc.parse(ROWS, params={"g": module.params["g"].copy()})  # same IR text
    changed.params["g"][5] += 1.0
    cm = lmc.compile(changed, target="cpu")
    assert not cm.cache_hit
    _check_against_reference(cm, changed, rng, seed)
    pipeline = "canonicalize,cse,dce,fuse,dce"
    assert not lmc.compile(module, target="cpu", pipeline=pipeline).cache_hit
    assert lmc.compile(module, target="cpu", pipeline=pipeline).cache_hit
    assert not lmc.compile(module, target="ref").cache_hit  # the reference target: not cached
    assert len(list((cache_dir / "models").iterdir())) == 3


def test_the_cache_can_be_turned_off(cache_dir, monkeypatch, tmp_path):
    rng, _ = _rng()
    module = _module("rows", rng)
    off = lmc.CompileOptions(cache_dir="")
    assert not any(lmc.compile(module, target="cpu", options=off).cache_hit for _ in range(2))
    monkeypatch.setenv("LMC_CACHE_DIR", "off")
    assert not any(lmc.compile(module, target="cpu").cache_hit for _ in range(2))
    assert not cache_dir.exists()
    elsewhere = lmc.CompileOptions(cache_dir=str(tmp_path / "mine"))
    assert [lmc.compile(module, target="cpu", options=elsewhere).cache_hit
            for _ in range(2)] == [False, True]


def test_a_damaged_cache_entry_is_a_miss(cache_dir):
    rng, seed = _rng()
    module = _module("rows", rng)
    lmc.compile(module, target="cpu")
    entry = next((cache_dir / "models").iterdir())
    entry.write_bytes(entry.read_bytes()[:-40])
    with pytest.warns(UserWarning, match=r"dropping a bad compile cache entry"):
        cm = lmc.compile(module, target="cpu")
    assert not cm.cache_hit
    _check_against_reference(cm, module, rng, seed)
    assert lmc.compile(module, target="cpu").cache_hit  # stored again
    # One flipped bit in the object code: the cache does not check sha256s (the zip's CRC-32
    # of every entry catches damage to a file lmc wrote itself).
    with zipfile.ZipFile(entry) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".o"))
    data = bytearray(entry.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0x10
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"dropping a bad compile cache entry"):
        cm = lmc.compile(module, target="cpu")
    assert not cm.cache_hit
    _check_against_reference(cm, module, rng, seed)


def test_a_cache_entry_keeps_only_the_weights_the_model_lacks(tmp_path):
    """The weights a compile leaves as they are (the same arrays) are the model's, which the
    key hashes: the entry names them and a hit takes them from the model; those the passes
    make (raise-moe's stacked experts) are in the entry. `cm.save` keeps all of them."""
    from safetensors.numpy import load as st_load

    from tests.test_raise_moe import MoEText
    rows, moe = _module("rows", _rng()[0]), MoEText(4, 2, "swiglu", weights="separate")
    stacked = {f"experts.{w}.weight.stacked" for w in ("w1", "w2", "w3")}
    cases = [(rows, [np.random.default_rng(3).standard_normal((2, 5, 37), dtype=np.float32)],
              set()), (moe.module(), moe.inputs(), stacked)]
    for i, (module, xs, made) in enumerate(cases):
        opts = lmc.CompileOptions(cache_dir=str(tmp_path / f"cache{i}"))
        first = lmc.compile(module, target="cpu", options=opts)
        entry, = (tmp_path / f"cache{i}" / "models").iterdir()
        art = read(entry)
        kept = set(st_load(art.entries["weights.safetensors"]))
        external = set(first.module.params) - made
        assert kept == made and set(art.manifest["weights"].get("from_model", [])) == external
        if external:
            with pytest.raises(lmc.ArtifactError, match=r"compile-cache entry.*lmc\.compile"):
                lmc.load(entry)
        hit = lmc.compile(module, target="cpu", options=opts)
        saved = lmc.load(first.save(tmp_path / f"whole{i}.lmca"))
        assert hit.cache_hit and not saved.cache_hit
        want = _outs(lmc.compile(module)(*xs))
        for cm in (hit, saved):
            for got, ref in zip(_outs(cm(*xs)), want):
                np.testing.assert_allclose(got, ref, **TOL)


class _Knobs(torch.nn.Module):
    """A forward steered by plain attributes (what the import memo's guard must notice)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.scale, self.smooth = 2.0, True
        self.config = types.SimpleNamespace(shift=False)  # as Hugging Face models read theirs

    def forward(self, x):
        y = self.fc(x) * self.scale + (1.0 if self.config.shift else 0.0)
        return torch.nn.functional.gelu(y) if self.smooth else torch.relu(y)


def test_an_unchanged_module_is_not_exported_again(monkeypatch):
    """The import memo: compiling the same module object again skips torch.export while
    nothing torch.export would see has changed, and exports again when something has."""
    from lmc.frontends.torch import export as torch_export
    exports = []
    real = torch_export.export
    monkeypatch.setattr(torch_export, "export",
                        lambda *a, **kw: exports.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    model, x = _Knobs(), torch.randn(3, 8)

    def compiled_matches(**kw):
        cm = lmc.compile(model, (x,), target="cpu", **kw)
        with torch.no_grad():
            np.testing.assert_allclose(cm(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
        return cm

    compiled_matches()
    assert compiled_matches().cache_hit and len(exports) == 1
    with torch.no_grad():
        model.fc.weight.mul_(2.0)  # in place: the IR's weights are views, the cache key differs
    assert not compiled_matches().cache_hit and len(exports) == 1
    changes = [lambda: setattr(model, "scale", 3.0), lambda: setattr(model, "smooth", False),
               lambda: setattr(model.config, "shift", True),
               lambda: model.train(False),
               lambda: setattr(model.fc, "weight", torch.nn.Parameter(torch.randn(8, 8)))]
    for n, change in enumerate(changes, start=2):
        change()
        compiled_matches()
        assert len(exports) == n
    x = torch.randn(5, 8)  # another input shape
    compiled_matches()
    assert len(exports) == 7
    compiled_matches(options=lmc.CompileOptions(cache_dir="off"))  # no cache: no memo
    compiled_matches(options=lmc.CompileOptions(cache_dir="off"))
    assert len(exports) == 9


def test_the_passes_never_rewrite_the_memos_module():
    """A memo hit that misses the compile cache (weights changed in place) runs the passes on
    a copy: the memo keeps the imported IR, and a cache hit copies nothing."""
    from lmc.frontends.torch import memo
    from lmc.ir.printer import print_module
    torch.manual_seed(0)
    model, x = _Knobs(), torch.randn(3, 8)
    text = lmc.compile(model, (x,), target="cpu").artifacts["import"]
    with torch.no_grad():
        model.fc.weight.mul_(-1.5)
    cm = lmc.compile(model, (x,), target="cpu")
    assert not cm.cache_hit and cm.artifacts["import"] == text
    kept = memo._memo[model][1]
    assert print_module(kept) == text and "kernel.fused" not in text
    again = lmc.compile(model, (x,), target="cpu")
    assert again.cache_hit and again.module is not kept and again.artifacts["import"] == text
    with torch.no_grad():
        np.testing.assert_allclose(again(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_eviction_keeps_the_newest_files(tmp_path):
    from lmc.cache import evict
    for i in range(5):
        f = tmp_path / f"{i}.o"
        f.write_bytes(b"x" * 100)
        os.utime(f, ns=(i * 10**9, i * 10**9))
    gone = evict(tmp_path, 250)
    assert sorted(p.name for p in gone) == ["0.o", "1.o", "2.o"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.o", "4.o"]


def test_the_import_memo_does_not_keep_a_model_alive():
    import gc
    import weakref

    from lmc.frontends.torch import memo
    model = _Knobs()
    model.forward = model.forward  # an instance attribute that refers back to the model
    model.fc.register_forward_hook(lambda *a: None)
    lmc.compile(model, (torch.randn(2, 8),), target="cpu")
    assert model in memo._memo
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
