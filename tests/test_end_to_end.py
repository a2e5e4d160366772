"""End to end through `lmc.compile` with the default pipeline (canonicalize, raise-moe, cse,
dce) and numerics checked after every pass: every model of tests/models.py and the Hugging Face
models match eager PyTorch at two input sizes, from one compile."""
import numpy as np
import pytest
import torch
from models import MODELS

import lmc


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _compare(cm, model, inputs, rtol=1e-5, atol=1e-5):
    with torch.no_grad():
        want = model(*inputs)
    got = cm(*inputs)
    assert type(got) is type(want)  # same structure: tensor, tuple, ...
    for g, w in zip(_flat(got), _flat(want)):
        assert isinstance(g, torch.Tensor) and g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_matches_eager(name, tmp_path):
    model, example, dynamic, other = MODELS[name]()
    cm = lmc.compile(model, example, dynamic_shapes=dynamic, check_numerics=True,
                     dump_ir=str(tmp_path))
    for inputs in (example, other):
        _compare(cm, model, inputs)
    assert (tmp_path / "index.md").exists()
    if name == "moe":  # routing stays in the graph and only routed rows are computed
        counts = cm.module.op_counts()
        assert counts.get("moe.grouped_matmul") == 3 and "tensor.nonzero" not in counts


def test_numpy_in_numpy_out_for_a_torch_model():
    model, example, dynamic, _ = MODELS["lora"]()
    cm = lmc.compile(model, example, dynamic_shapes=dynamic)
    out = cm(example[0].numpy())
    assert isinstance(out, np.ndarray)


def test_static_dims_are_checked_for_a_torch_model():
    model, example, _, _ = MODELS["lora"]()
    cm = lmc.compile(model, example)  # no dynamic_shapes: every dim is static
    with pytest.raises(lmc.InputError, match="dim 0 must be 4"):
        cm(torch.randn(5, 24))


def test_hf_gpt2_compiles_and_returns_its_structure():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            out = self.lm(input_ids=ids, use_cache=False)
            return {"logits": out.logits}

    T = torch.export.Dim("T", max=31)
    ids = torch.randint(0, 61, (1, 5))
    cm = lmc.compile(Wrap(), (ids,), dynamic_shapes={"ids": {1: T}})
    for t in (5, 9):
        ids = torch.randint(0, 61, (1, t))
        got = cm(ids)
        assert set(got) == {"logits"}
        with torch.no_grad():
            np.testing.assert_allclose(got["logits"].numpy(), Wrap()(ids)["logits"].numpy(),
                                       rtol=1e-5, atol=1e-5)
