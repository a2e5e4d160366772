"""lmc.compile on IR and text inputs: signature checks and clear input errors."""
import numpy as np
import pytest
import torch

import lmc

TEXT = """\
func @main(%ids: i64[B,T], %x: f32[B,T,4], %w: f32[4,3] {param})\
 -> (f32[B,T,3], i64[B,T]) {
  %0 = tensor.matmul %x, %w : f32[B,T,3]
  func.return %0, %ids
}
"""


@pytest.fixture
def cm(tmp_path):
    path = tmp_path / "m.lmc"
    path.write_text(TEXT)
    from safetensors.numpy import save_file
    save_file({"w": np.ones((4, 3), np.float32)}, str(tmp_path / "m.lmc.safetensors"))
    return lmc.compile(str(path))


def test_numpy_in_numpy_out_and_torch_in_torch_out(cm):
    ids, x = np.zeros((2, 5), np.int64), np.ones((2, 5, 4), np.float32)
    y, ids_out = cm(ids, x)
    assert np.array_equal(ids_out, ids)
    assert isinstance(y, np.ndarray) and y.shape == (2, 5, 3) and np.all(y == 4)
    y, _ = cm(torch.from_numpy(ids), torch.from_numpy(x))
    assert isinstance(y, torch.Tensor)
    assert cm.artifacts["import"].startswith("func @main") and "optimized" in cm.artifacts
    assert str(cm.module) == cm.artifacts["optimized"]


@pytest.mark.parametrize("args, message", [
    (((2, 5),), "takes 2 input"),
    (((2, 5), (2, 5, 4, 1)), "input 1 \\('x'\\): expected rank 3"),
    (((2, 5), (2, 5, 7)), "dim 2 must be 4"),
    (((2, 5), (2, 6, 4)), "'T' = 5 from an earlier input"),
])
def test_input_errors(cm, args, message):
    arrays = [np.zeros(s, np.int64 if i == 0 else np.float32) for i, s in enumerate(args)]
    with pytest.raises(lmc.InputError, match=message):
        cm(*arrays)


def test_dtype_error(cm):
    with pytest.raises(lmc.InputError, match="expected dtype i64"):
        cm(np.zeros((2, 5), np.float32), np.zeros((2, 5, 4), np.float32))


def test_unknown_target_and_bad_model():
    m = lmc.parse(TEXT, params={"w": np.ones((4, 3), np.float32)})
    with pytest.raises(lmc.LmcError, match="target 'tpu'"):
        lmc.compile(m, target="tpu")
    with pytest.raises(lmc.LmcError, match="cannot compile a int"):
        lmc.compile(3)


def test_compile_does_not_mutate_the_given_module(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE_DIR", str(tmp_path))
    m = lmc.parse(TEXT, params={"w": np.ones((4, 3), np.float32)})
    before = str(m)
    lmc.compile(m)
    assert str(m) == before
    first = lmc.compile(m, target="cpu")  # the passes run on a copy; a cache hit needs none
    again = lmc.compile(m, target="cpu")
    assert again.cache_hit and not first.cache_hit and str(m) == before
    assert again.module is not m and "kernel.fused" in str(first.module)


@pytest.mark.parametrize("bad", [None, "hello"])
def test_non_tensor_inputs_are_named(cm, bad):
    with pytest.raises(lmc.InputError, match="input 0 \\('ids'\\): expected a tensor"):
        cm(bad, np.zeros((2, 5, 4), np.float32))


def test_options_target_is_honoured():
    m = lmc.parse(TEXT, params={"w": np.ones((4, 3), np.float32)})
    with pytest.raises(lmc.LmcError, match="target 'tpu'"):
        lmc.compile(m, options=lmc.CompileOptions(target="tpu"))
    with pytest.raises(lmc.LmcError, match=r"must be an lmc\.CompileOptions"):
        lmc.compile(m, options={"target": "ref"})


class _Sub(torch.nn.Module):
    def forward(self, x, y):
        return x - y


def test_the_same_tensor_for_two_inputs_stays_two_inputs():
    x = torch.randn(3, 4)
    cm = lmc.compile(_Sub(), (x, x))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    np.testing.assert_allclose(cm(a, b).numpy(), (a - b).numpy(), rtol=1e-6)


class _Cat(torch.nn.Module):
    def forward(self, x, y):
        return torch.cat([x, y, y], dim=1)


def test_derived_dims_are_checked_after_all_inputs_bind():
    T = torch.export.Dim("T", max=64)
    cm = lmc.compile(_Cat(), (torch.randn(2, 6), torch.randn(2, 3)),
                     dynamic_shapes={"x": {1: 2 * T}, "y": {1: T}})
    assert cm(torch.randn(2, 10), torch.randn(2, 5)).shape == (2, 20)
    with pytest.raises(lmc.InputError, match="dim 1 must be 2\\*T = 6"):
        cm(torch.randn(2, 7), torch.randn(2, 3))


def test_a_dim_no_input_can_bind_is_refused_at_compile_time():
    T = torch.export.Dim("T", max=64)
    with pytest.raises(lmc.LmcError, match="no input has as a plain dim"):
        lmc.compile(_Sub(), (torch.randn(6, 2), torch.randn(6, 2)),
                    dynamic_shapes={"x": {0: 2 * T}, "y": {0: 2 * T}})


def test_interpreter_failures_name_the_op():
    text = """func @main(%x: f32[4], %i: i64[2]) -> (f32[2]) {
  %0 = tensor.take %x, %i {axis = 0} : f32[2]  loc("emb" "m.py":7)
  func.return %0
}
"""
    cm = lmc.compile(lmc.parse(text))
    with pytest.raises(lmc.LmcError, match=r"tensor.take at .emb. m.py:7"):
        cm(np.zeros(4, np.float32), np.array([0, 9]))
