"""The LoRA branch inside its base GEMM on the cpu target (gemm.py's low-rank branch): the
forms it is found in, that the kernel then runs one GEMM whose pass over x also makes x·Aᵀ,
the results against eager at odd sizes and two lengths, the forms it leaves to the general
path, and LoRA fine-tuning against eager."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lmc
from lmc.backends.cpu import threads as cpu_threads
from lmc.zoo import LoRALinear

B, T = torch.export.Dim("B", max=64), torch.export.Dim("T", max=200)


class ScaledInside(nn.Module):
    """No bias, the scale between the two branch GEMMs: x·Wᵀ + ((x·Aᵀ)·s)·Bᵀ."""

    def __init__(self, fin=20, fout=33, r=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(fout, fin) / fin ** 0.5)
        self.a = nn.Parameter(torch.randn(r, fin))
        self.b = nn.Parameter(torch.randn(fout, r) * 0.1)

    def forward(self, x):
        return x @ self.w.t() + ((x @ self.a.t()) * 0.7) @ self.b.t()


class ResidualGelu(nn.Module):
    """The branch, then a residual and a GELU in the same kernel's epilogue."""

    def __init__(self):
        super().__init__()
        self.lora = LoRALinear(48, 40, 5, 3.0)

    def forward(self, x, res):
        return nn.functional.gelu(self.lora(x) + res)


class BranchAfterGelu(nn.Module):
    """gelu(x·Wᵀ + b) + branch: the branch does not commute with the GELU, so the kernel
    runs it as a prologue (the general path)."""

    def __init__(self):
        super().__init__()
        self.lora = LoRALinear(24, 24, 3, 6.0)

    def forward(self, x):
        m = self.lora
        return nn.functional.gelu(m.base(x)) + (x @ m.A.t()) @ m.B.t() * m.scale


def _count_gemms(monkeypatch) -> list[bool]:
    """Each sgemm call the kernels make: whether it carried a low-rank branch."""
    calls: list[bool] = []
    real = cpu_threads.sgemm

    def counting(*args, **kw):
        calls.append(kw.get("low_rank") is not None)
        return real(*args, **kw)

    monkeypatch.setattr(cpu_threads, "sgemm", counting)
    return calls


def _run(model, inputs, dyn=None):
    torch.manual_seed(0)
    cm = lmc.compile(model.eval(), inputs, target="cpu", dynamic_shapes=dyn,
                     options=lmc.CompileOptions(cache_dir="off"))
    return cm


def _close(got, model, inputs):
    with torch.no_grad():
        want = model(*inputs).numpy()
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert err <= 1e-5, err


CASES = {
    "lora-linear": (lambda: LoRALinear(64, 72, 8, 16.0), lambda n: (torch.randn(n, 64),)),
    "3-d, no bias, scale inside": (ScaledInside, lambda n: (torch.randn(2, n, 20),)),
    "residual + gelu": (ResidualGelu, lambda n: (torch.randn(n, 48), torch.randn(n, 40))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_branch_runs_inside_one_gemm(monkeypatch, name):
    make, inputs = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    dim = {0: B} if name != "3-d, no bias, scale inside" else {1: T}
    dyn = tuple(dim for _ in inputs(3))
    cm = _run(model, inputs(9), dyn)
    (kernel,) = [op for op in cm.module.main.body.ops if op.name == "kernel.fused"]
    assert kernel.kind == "matmul"
    calls = _count_gemms(monkeypatch)
    for n in (1, 7, 129):  # one compile, several lengths
        calls.clear()
        ins = inputs(n)
        _close(cm(*ins), model, ins)
        assert calls == [True], calls  # one GEMM call, with the branch in it


def test_branch_that_does_not_commute_takes_the_general_path(monkeypatch):
    torch.manual_seed(0)
    model = BranchAfterGelu().eval()
    cm = _run(model, (torch.randn(13, 24),))
    calls = _count_gemms(monkeypatch)
    x = torch.randn(13, 24)
    _close(cm(x), model, (x,))
    assert not any(calls)


def test_vector_input_keeps_the_general_path(monkeypatch):
    torch.manual_seed(0)
    model = LoRALinear(40, 24, 4, 8.0).eval()
    x = torch.randn(40)
    cm = _run(model, (x,))
    calls = _count_gemms(monkeypatch)
    _close(cm(x), model, (x,))
    assert not any(calls)


def test_lora_linear_at_the_benchmark_shape(monkeypatch):
    torch.manual_seed(0)
    model = LoRALinear(1024, 1024, 8, 16.0).eval()
    x = torch.randn(512, 1024)
    cm = _run(model, (x,))
    calls = _count_gemms(monkeypatch)
    _close(cm(x), model, (x,))
    assert calls == [True]


def test_lora_finetuning_still_matches_eager():
    """In a train step x·Aᵀ is also kept for the backward (B's gradient reads it), so the
    branch stays separate GEMMs there; losses follow eager AdamW step by step."""
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(32, 16, 4, 8.0), nn.ReLU(), nn.Linear(16, 1))
    model[2].requires_grad_(False)
    ref = copy.deepcopy(model)
    x, y = torch.randn(37, 32), torch.randn(37, 1)
    trainer = lmc.compile_training(model, (x, y), loss_fn=nn.functional.mse_loss, target="cpu",
                                   optimizer=lmc.optim.AdamW(lr=1e-2, weight_decay=0.0))
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    for _ in range(5):
        loss = trainer.step(x, y)
        opt.zero_grad()
        want = nn.functional.mse_loss(ref(x), y)
        want.backward()
        opt.step()
        assert abs(loss - want.item()) <= 1e-4 * abs(want.item())
    state = trainer.state_dict()
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(state[k].numpy(), v.numpy(), rtol=1e-4, atol=1e-6)


def test_saved_artifact_keeps_the_branch_in_the_gemm(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = LoRALinear(48, 56, 6, 12.0).eval()
    x = torch.randn(11, 48)
    loaded = lmc.load(_run(model, (x,)).save(tmp_path / "lora.lmca"))
    calls = _count_gemms(monkeypatch)
    _close(loaded(x), model, (x,))
    assert calls == [True]
