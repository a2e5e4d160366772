"""The PyTorch frontend: each model in tests/models.py imports, verifies, round-trips through the
text format and matches eager PyTorch under the reference interpreter at two input sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from models import MODELS
from torch import nn
from torch.export import Dim

import lmc
from lmc.backends.reference.interpreter import run_func
from lmc.frontends.torch import TorchExportError, import_module
from lmc.ir import parse
from lmc.ir.printer import print_module
from lmc.ir.verifier import verify


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def check_against_eager(model, module, inputs_list, rtol=1e-5, atol=1e-5) -> None:
    for inputs in inputs_list:
        with torch.no_grad():
            want = _flat(model(*inputs))
        got = run_func(module, [x.numpy() for x in inputs])
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), rtol=rtol, atol=atol)


def check_roundtrip(module) -> None:
    text = print_module(module)
    again = parse(text, params=dict(module.params))
    verify(again)
    assert print_module(again) == text


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_eager(name):
    model, example, dynamic, other = MODELS[name]()
    module = import_module(model, example, dynamic)
    verify(module)
    check_roundtrip(module)
    check_against_eager(model, module, [example, other])


def test_args_names_kinds_and_symbols():
    model, example, dynamic, _ = MODELS["gpt"]()
    m = import_module(model, example, dynamic)
    f = m.main
    kinds = dict(zip([a.name for a in f.body.args], f.arg_kinds))
    assert kinds["idx"] == "input"
    assert kinds["blocks.0.ln1.weight"] == "param"
    assert kinds["blocks.0.attn.mask"] == "buffer"
    assert f.inputs[0].type.shape == ("B", "T")
    assert f.result_types[0].shape == ("B", "T", 61)
    assert m.params["blocks.1.fc.weight"].flags["C_CONTIGUOUS"]
    assert set(m.params) == {a.name for a in f.weights}


def test_frozen_params_are_buffers():
    model, example, dynamic, _ = MODELS["lora"]()
    f = import_module(model, example, dynamic).main
    kinds = dict(zip([a.name for a in f.body.args], f.arg_kinds))
    assert kinds == {"A": "param", "B": "param", "base.weight": "buffer",
                     "base.bias": "buffer", "x": "input"}


def test_locations_name_module_path_and_user_line():
    model, example, dynamic, _ = MODELS["gpt"]()
    m = import_module(model, example, dynamic)
    locs = {(op.name, op.loc.path) for op in m.walk()}
    assert ("tensor.layer_norm", "blocks.0.ln1") in locs
    assert ("tensor.softmax", "blocks.1.attn") in locs
    for op in m.walk():
        if op.name != "func.return":
            assert op.loc.file == "models.py" and op.loc.line > 0, op


def test_moe_loop_ir_follows_the_raise_moe_convention():
    model, example, dynamic, _ = MODELS["moe"]()
    m = import_module(model, example, dynamic)
    counts = m.op_counts()
    assert counts["tensor.nonzero"] == 4 and counts["tensor.index_add"] == 4
    nz = next(op for op in m.walk() if op.name == "tensor.nonzero")
    assert nz.result.type.shape == ("u0", 2)
    eq = nz.x.op
    assert eq.name == "tensor.eq" and eq.rhs.op.name == "tensor.constant"
    assert eq.rhs.type == lmc.ir.TensorType((), lmc.ir.DType.i64)


def test_sdpa_mask_scale_and_noncausal_variants():
    class Attn(nn.Module):
        def forward(self, q, k, v, bmask, fmask):
            a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bmask, scale=0.3)
            b = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=fmask)
            c = nn.functional.scaled_dot_product_attention(q, k[:, :, :3], v[:, :, :3],
                                                           is_causal=True)
            return a, b, c
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    bmask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    bmask[..., 0] = True
    fmask = torch.randn(1, 3, 5, 5, generator=g)
    inputs = (q, k, v, bmask, fmask)
    m = import_module(Attn(), inputs)
    check_against_eager(Attn(), m, [inputs])


class Misc(nn.Module):
    """Ops the model zoo does not reach: promotion, rounding, reductions, indexing, creation."""

    def forward(self, x, i):
        a = (i + 1.5) * x[:, :1] - 2  # int + float scalar -> float
        b = torch.div(i, 2, rounding_mode="floor") + torch.div(-i, 3, rounding_mode="trunc")
        c = x.var(-1, keepdim=True) + x.amax(0) + x.max(-1).values[:, None]
        d = torch.cumsum(x, 1) + torch.tril(x) - torch.triu(x, 1)
        e = torch.gather(x, 1, i % 4).sum() + torch.index_select(x, 0, i[:, 0] % 2).mean()
        f = torch.zeros(x.shape[0], 4).scatter_add(1, i % 4, x[:, :4])
        g = torch.stack([x[:, 0], x[:, 1]], dim=1).flatten() + torch.ones(2 * x.shape[0])
        h = torch.where(x > 0, x, 0.0).clamp(max=0.5) + x.masked_fill(x < -1, 1.0).sigmoid()
        j = x[torch.arange(x.shape[0]), i[:, 0] % 4]
        # unbind(0) over the dynamic dim N would specialize N (an export error): unbind dim 1.
        k = torch.cat(x.chunk(2, dim=1)[::-1], 1) + x.unbind(1)[2][:, None]
        return a, b, c, d, e, f, g, h, j, k, x.argmax(-1), (x[:, :4] > 0).logical_not() & (i > 1)


def test_misc_ops_match_eager():
    g = torch.Generator().manual_seed(0)
    x, i = torch.randn(3, 8, generator=g), torch.randint(0, 9, (3, 4), generator=g)
    N = Dim("N", min=2, max=64)
    m = import_module(Misc(), (x, i), {"x": {0: N}, "i": {0: N}})
    check_roundtrip(m)
    x2, i2 = torch.randn(5, 8, generator=g), torch.randint(0, 9, (5, 4), generator=g)
    check_against_eager(Misc(), m, [(x, i), (x2, i2)])


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        s = torch.sort(self.inner(x), dim=-1).values
        f = torch.fft.rfft(s).abs()
        return torch.linalg.inv(x[:, :4]) @ s, f


def test_unsupported_ops_are_all_listed_with_locations():
    with pytest.raises(lmc.UnsupportedOpError) as info:
        import_module(Unsupported(), (torch.randn(4, 4),))
    items = info.value.items
    names = " ".join(name for name, _ in items)
    assert "sort" in names and "fft" in names and "linalg_inv" in names, items
    for _, where in items:
        assert "test_torch_frontend.py:" in where
    text = str(info.value)
    assert "Traceback" not in text and "sort" in text


def test_export_failure_is_an_lmc_error_with_a_suggestion():
    class Bad(nn.Module):
        def forward(self, x):
            return x[: x.shape[0] // 2 + 1] if x.sum() > 0 else x  # data-dependent branch

    with pytest.raises(TorchExportError) as info:
        import_module(Bad(), (torch.randn(4),))
    assert isinstance(info.value, lmc.LmcError)
    assert "draft_export" in str(info.value)


def test_positional_dynamic_shapes():
    model, example, _, other = MODELS["lora"]()
    m = import_module(model, example, ({0: Dim("rows", max=512)},))
    assert m.main.inputs[0].type.shape == ("rows", 24)
    check_against_eager(model, m, [example, other])


class Misc2(nn.Module):
    """Unary math, losses via log_softmax + nll_loss, symbolic var, boolean masks, creation."""

    def forward(self, x, t):
        lsm = torch.log_softmax(x, dim=-1)
        nll = nn.functional.nll_loss(lsm, t)
        u = torch.exp(x).log() + torch.sqrt(x.abs() + 1) + torch.erf(x) + x.pow(3) / 7
        v = x.var(0) + torch.full_like(x, 2.0)[0] + x.new_ones(x.shape[1]) * 0.5
        picked = x[x[:, 0] > 0]  # boolean mask: data-dependent row count
        nz = torch.nonzero(x > 0.5)
        w = torch.zeros(x.shape[1]).scatter(0, t[:2] % x.shape[1], 1.0)
        return nll, u, v, picked.sum(0), nz, w, lsm.argmax(-1) == t


def test_misc2_ops_match_eager():
    g = torch.Generator().manual_seed(5)
    N = Dim("N", min=2, max=64)

    def inputs(n):
        x = torch.randn(n, 6, generator=g)
        x[0, 0] = 1.0  # at least one row passes the mask
        return x, torch.randint(0, 6, (n,), generator=g)
    ex = inputs(4)
    m = import_module(Misc2(), ex, {"x": {0: N}, "t": {0: N}})
    check_roundtrip(m)
    assert "tensor.cross_entropy" in m.op_counts()
    check_against_eager(Misc2(), m, [ex, inputs(9)])


class _ReturnsInt(torch.nn.Module):
    def forward(self, x):
        return x + 1, None


def test_non_tensor_outputs_are_a_clear_error():
    import lmc
    with pytest.raises(lmc.LmcError, match="returns non-tensor output"):
        import_module(_ReturnsInt(), (torch.randn(2, 3),))
