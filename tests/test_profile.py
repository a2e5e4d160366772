"""`cm.profile` / `trainer.profile`: one row per step of the function, in step order, with the
GEMM work of matmul and attention kernels counted from the sizes of the call (timings are
only checked to be there: tests never assert speed)."""
from __future__ import annotations

import pytest
import torch

import lmc
from lmc.errors import LmcError
from lmc.ir.analysis import kernel_flops
from lmc.losses import lm_cross_entropy
from lmc.profile import Profile
from lmc.zoo import Block, TinyGPT


def test_profile_of_a_compiled_block():
    torch.manual_seed(0)
    model = Block(64, 4, 64).eval()
    T = torch.export.Dim("T", max=63)
    cm = lmc.compile(model, (torch.randn(2, 16, 64),), dynamic_shapes=({1: T},), target="cpu")
    prof = cm.profile(torch.randn(2, 24, 64), repeat=2)
    assert isinstance(prof, Profile) and prof.calls == 2
    assert [r.index for r in prof.rows] == list(range(len(cm.executable.steps)))
    kinds = {r.op for r in prof.rows}
    assert {f"kernel.fused{{{k}}}" for k in ("matmul", "attention", "reduction")} <= kinds
    assert all(r.ms >= 0 for r in prof.rows)
    rates = [r for r in prof.rows if r.op == "kernel.fused{matmul}"]
    assert rates and all(r.gflops is None or r.gflops > 0 for r in rates)
    table = prof.table(top=3)
    assert table.count("\n| ") == 6 and "more steps" in table  # header, rule, 3 rows, rest


def test_flops_follow_the_call_sizes():
    torch.manual_seed(0)
    model = Block(64, 4, 64).eval()
    T = torch.export.Dim("T", max=63)
    cm = lmc.compile(model, (torch.randn(2, 16, 64),), dynamic_shapes=({1: T},), target="cpu")
    qkv = next(op for op in cm.module.main.body.ops
               if op.name == "kernel.fused" and op.kind == "matmul")
    att = next(op for op in cm.module.main.body.ops
               if op.name == "kernel.fused" and op.kind == "attention")
    t = 24
    assert kernel_flops(qkv, {"T": t}) == 2 * 2 * t * 64 * 192
    assert kernel_flops(att, {"T": t}) == 2 * (2 * 4 * t) * t * (16 + 16)


def test_trainer_profile_takes_real_steps():
    torch.manual_seed(0)
    model = TinyGPT(64, 32, 1, 2, 16)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    trainer = lmc.compile_training(model, (x, y), loss_fn=lm_cross_entropy, target="cpu")
    prof = trainer.profile(x, y, steps=2)
    assert trainer.steps_done == 2 and len(trainer.losses) == 2 and prof.calls == 2
    assert any(r.op == "tensor.cross_entropy" for r in prof.rows)


def test_reference_target_has_nothing_to_profile():
    cm = lmc.compile(Block(32, 2, 8).eval(), (torch.randn(1, 4, 32),))
    with pytest.raises(LmcError, match="native target"):
        cm.profile(torch.randn(1, 4, 32))
