"""raise-attention and fuse on real models: what they find, what they decline and why, and that
the fused module still computes the model (the interpreter runs kernel.fused bodies)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lmc
from lmc.ir import parse
from lmc.pass_manager import PassManager
from lmc.zoo import Block, LoRALinear, MoE

CPU_PIPELINE = ",".join(lmc.options.default_pipeline(lmc.CompileOptions(target="cpu")))
B, T, N = torch.export.Dim("B", max=64), torch.export.Dim("T", max=63), \
    torch.export.Dim("N", max=4096)


def _compile(model, example, dyn, tmp_path=None):
    torch.manual_seed(0)
    return lmc.compile(model.eval(), example, dynamic_shapes=dyn, pipeline=CPU_PIPELINE,
                       check_numerics=True, dump_ir=str(tmp_path) if tmp_path else None)


def _kernels(cm) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for op in cm.module.main.body.ops:
        if op.name == "kernel.fused":
            kinds[op.kind] = kinds.get(op.kind, 0) + 1
    return kinds


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_gpt_block_kernels(attn, tmp_path):
    model = Block(64, 4, 64, attn=attn)
    cm = _compile(model, (torch.randn(2, 16, 64),), ({0: B, 1: T},), tmp_path)
    # ln1, ln2 | qkv, proj(+residual), fc1(+gelu), fc2(+residual) | one attention
    assert _kernels(cm) == {"reduction": 2, "matmul": 4, "attention": 1}
    att = next(op.body.ops[0] for op in cm.module.main.body.ops
               if op.name == "kernel.fused" and op.kind == "attention")
    assert att.causal and att.mask is None  # the tril buffer was recognized as causal
    x = torch.randn(3, 21, 64)
    with torch.no_grad():
        np.testing.assert_allclose(cm(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    index = (tmp_path / "index.md").read_text()
    assert "`fuse`: rejected" in index
    # The residual sum feeds ln2 and the second residual add: that add cannot be computed in
    # proj's epilogue, since it needs fc2's result, which needs ln2 of this very kernel.
    assert "not fused into the matmul kernel of tensor.matmul at 'proj' zoo.py:38: it would " \
           "make a cycle through tensor.layer_norm at 'ln2'" in index


def test_lora_branch_joins_the_base_matmul():
    model = LoRALinear()
    cm = _compile(model, (torch.randn(2, 9, 64),), ({0: B, 1: T},))
    assert _kernels(cm) == {"matmul": 1}
    (fused,) = [op for op in cm.module.main.body.ops if op.name == "kernel.fused"]
    assert sum(o.name == "tensor.matmul" for o in fused.body.ops) == 3


def test_moe_experts_are_grouped_matmuls_with_epilogues():
    model = MoE()
    cm = _compile(model, (torch.randn(13, 64),), ({0: N},))
    kinds = _kernels(cm)
    assert kinds["grouped_matmul"] == 2  # x·W1 and x·W3 are siblings in one kernel
    dual = [op for op in cm.module.main.body.ops if op.name == "kernel.fused" and
            sum(o.name == "moe.grouped_matmul" for o in op.body.ops) == 2]
    assert len(dual) == 1
    x = torch.randn(40, 64)
    with torch.no_grad():
        np.testing.assert_allclose(cm(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_rejection_names_the_cycle():
    text = """func @main(%x: f32[N,8]) -> (f32[N,8]) {
  %0 = tensor.softmax %x {axis = -1} : f32[N,8]
  %1 = tensor.cumsum %0 {axis = -1} : f32[N,8]
  %2 = tensor.add %0, %1 : f32[N,8]
  func.return %2
}"""
    pm = PassManager.from_pipeline("fuse")
    pm.run(parse(text))
    (why,) = [w for w in pm.records[0].report["rejected"] if "cycle" in w]
    assert why.startswith("tensor.add") and "tensor.cumsum" in why


def test_fused_ir_round_trips():
    cm = _compile(Block(32, 2, 64), (torch.randn(2, 8, 32),), ({0: B, 1: T},))
    text = str(cm.module)
    assert str(parse(text)) == text
