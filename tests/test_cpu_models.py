"""Every model of the core issue end to end on target="cpu": fused, compiled to native kernels,
and matching eager PyTorch (fp32, ≤ 1e-4 relative) at two input sizes from one compile."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from models import MODELS
from test_end_to_end import _flat
from test_hf_models import SMALL, VOCAB, BertHidden, LogitsOnly, _ids

import lmc
from lmc.zoo import LoRALinear, TinyGPT, demo_models

RTOL, ATOL = 1e-4, 1e-5


def _compare(cm, model, inputs):
    with torch.no_grad():
        want = model(*inputs)
    got = cm(*inputs)
    assert type(got) is type(want)
    for g, w in zip(_flat(got), _flat(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=RTOL, atol=ATOL)


def _native_share(cm) -> list[str]:
    """The ops left to the interpreter (they must not include the heavy kinds)."""
    fallback = cm.report["fallback"]
    heavy = ("kernel.fused", "tensor.matmul", "tensor.attention", "moe.grouped_matmul")
    assert not [f for f in fallback if f.startswith(heavy)], fallback
    return fallback


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_on_cpu(name):
    model, example, dynamic, other = MODELS[name]()
    cm = lmc.compile(model, example, dynamic_shapes=dynamic, target="cpu")
    for inputs in (example, other):
        _compare(cm, model, inputs)
    assert "define" in cm.artifacts["llvm"]
    _native_share(cm)


@pytest.mark.parametrize("index", range(3), ids=["tiny-gpt", "moe", "lora"])
def test_zoo_models_on_cpu(index):
    name, model, example, dynamic, second = demo_models()[index]
    cm = lmc.compile(model, example, dynamic_shapes=dynamic, target="cpu")
    for inputs in (example, second):
        _compare(cm, model, inputs)
    assert _native_share(cm) == [] or name == "moe"


def _hf(kind: str, attn: str):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=4, bos_token_id=0, eos_token_id=0,
                                      attn_implementation=attn)
        return LogitsOnly(transformers.GPT2LMHeadModel(cfg))
    if kind == "llama":
        cfg = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, attn_implementation=attn)
        return LogitsOnly(transformers.LlamaForCausalLM(cfg))
    cfg = transformers.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, attn_implementation=attn,
                                     experts_implementation="batched_mm")
    return LogitsOnly(transformers.MixtralForCausalLM(cfg))


@pytest.mark.parametrize("kind,attn", [("gpt2", "eager"), ("llama", "sdpa"),
                                       ("mixtral", "sdpa")])
def test_hf_causal_lm_on_cpu(kind, attn):
    torch.manual_seed(0)
    model = _hf(kind, attn).eval()
    T = torch.export.Dim("T", max=63)
    cm = lmc.compile(model, (_ids(2, 7, 1),), dynamic_shapes={"input_ids": {1: T}},
                     target="cpu")
    for inputs in ((_ids(2, 7, 2),), (_ids(2, 12, 3),)):
        _compare(cm, model, inputs)
    _native_share(cm)


def test_hf_bert_on_cpu():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = BertHidden(transformers.BertModel(transformers.BertConfig(**SMALL))).eval()

    def inputs(b, t, seed):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 3:] = 0
        return _ids(b, t, seed), mask
    B, T = torch.export.Dim("B", max=16), torch.export.Dim("T", max=63)
    spec = {"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: T}}
    cm = lmc.compile(model, inputs(2, 6, 1), dynamic_shapes=spec, target="cpu")
    for x in (inputs(2, 6, 2), inputs(3, 13, 3)):
        _compare(cm, model, x)


def test_memory_plan_reuses_buffers():
    _, model, example, dynamic, _ = demo_models()[0]
    cm = lmc.compile(model, example, dynamic_shapes=dynamic, target="cpu")
    peak = cm.executable.peak_bytes([example[0].numpy()])
    assert 0 < peak["arena_bytes"] < peak["without_reuse_bytes"]


class _Viewed(torch.nn.Module):
    """A kernel's result read through a permute (a view kept per layout), a reshape of that
    permute (a copy: its strides cannot express it) and a plain reshape (a view)."""

    def forward(self, x):
        b, t, d = x.shape
        y = torch.tanh(x).reshape(b, t, 4, d // 4).permute(0, 2, 1, 3)
        return (y * 2.0).sum(-1), y.reshape(b, 4, t * d // 4).exp(), y.sum(1).reshape(b, -1)


def test_views_of_arena_buffers_are_kept_per_layout_and_copies_are_not():
    model = _Viewed()
    T = torch.export.Dim("T", max=64)
    cm = lmc.compile(model, (torch.randn(2, 8, 16),), dynamic_shapes=({1: T},), target="cpu",
                     options=lmc.CompileOptions(cache_dir="off"))
    ex = cm.executable
    assert ex._arena_views  # the permute and reshapes of the tanh kernel's buffer
    for t in (8, 37, 8, 37):  # each size twice: the second call reuses what the first kept
        _compare(cm, model, (torch.randn(2, t, 16),))
    x = torch.randn(2, 37, 16).numpy()
    layout = ex.plan.layout(ex._env([x]))
    kept = [s for s in ex._arena_views if s in layout._views]
    copied = [s for s in ex._arena_views if s not in layout._views]
    assert kept and copied  # the permute is kept, the reshape of it (a copy) is not
    assert all(np.may_share_memory(layout._views[s], layout.arena) for s in kept)


def _gemm_steps(ex) -> list:
    """The executable's steps that a GEMM launcher runs."""
    return [st for st in ex.steps if type(st.fn).__name__ == "GemmLauncher"]


def test_gemm_launches_are_replayed_for_the_same_arrays():
    """A GEMM called on the same memory again (arena views, weights) replays its prepared
    launch; the results follow the arrays' current contents, at every size."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=64, d=32, layers=2, heads=4, max_seq=32).eval()
    T = torch.export.Dim("T", max=31)
    cm = lmc.compile(model, (torch.randint(0, 64, (2, 8)),), dynamic_shapes=({1: T},),
                     target="cpu", options=lmc.CompileOptions(cache_dir="off"))
    ex = cm.executable
    steps = _gemm_steps(ex)
    assert steps and all(st.fn.replayable for st in steps)
    x = torch.randint(0, 64, (2, 8))
    for t in (8, 8, 8, 13, 13, 13, 8, 13):
        if t == x.shape[1]:
            x.copy_(torch.randint(0, 64, x.shape))  # the same tensor, new contents
        else:
            x = torch.randint(0, 64, (2, t))
        _compare(cm, model, (x,))
    # every GEMM but the head reads and writes arena buffers and weights only
    inner = [st for st in steps if not set(st.outs) & set(ex.output_slots)]
    assert len(inner) == len(steps) - 1 and all(st.fn._replays for st in inner)


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_gemm_replays_follow_addresses_not_array_objects(layout):
    """Replays are keyed by address and layout: torch's `.numpy()` makes a new array object per
    call, and the GEMM on it still replays (into the same output). An operand that the launch
    reads from a copy (a permuted [T, B, K] input flattened to rows) is never replayed: the
    replay would read the copy's old values."""
    torch.manual_seed(0)
    model = torch.nn.Linear(24, 40).eval()
    x = torch.randn(5, 3, 24) if layout == "contiguous" else torch.randn(3, 5, 24).permute(1, 0, 2)
    cm = lmc.compile(model, (x,), target="cpu", options=lmc.CompileOptions(cache_dir="off"))
    ex = cm.executable
    (gemm,) = [st.fn for st in _gemm_steps(ex)]
    out = np.empty((5, 3, 40), np.float32)
    for _ in range(4):
        x.copy_(torch.randn(x.shape))  # new contents in the same memory
        (y,) = ex([x.numpy()], into=[out])  # a new array object each call
        assert y is out
        np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert bool(gemm._replays) == (layout == "contiguous")


def test_a_lora_gemm_replays_with_its_own_branch_buffers():
    """The fused LoRA branch's T buffers belong to the launch, so a LoRA GEMM replays too, and
    its results follow the input's contents (T is rewritten on every run)."""
    torch.manual_seed(0)
    model = LoRALinear(48, 40, 4, 8.0).eval()
    x = torch.randn(37, 48)
    cm = lmc.compile(model, (x,), target="cpu", options=lmc.CompileOptions(cache_dir="off"))
    (gemm,) = [st.fn for st in _gemm_steps(cm.executable)]
    assert gemm.split.low_rank is not None and gemm.replayable
    out = np.empty((37, 40), np.float32)
    for _ in range(4):
        x.copy_(torch.randn(x.shape))
        (y,) = cm.executable([x.numpy()], into=[out])
        np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert gemm._replays


class _AdapterAsInput(torch.nn.Module):
    """A LoRA linear whose adapter comes with each call (hot-swapped adapters)."""

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(48, 40)

    def forward(self, x, a, b):
        return self.base(x) + (x @ a.t()) @ b.t() * 2.0


def test_a_lora_gemm_with_adapters_given_per_call_follows_them():
    """Adapter weights that are inputs are packed per call: a replay would read the panels
    packed for an earlier call, so such a launch is not replayed."""
    torch.manual_seed(0)
    model = _AdapterAsInput().eval()
    args = (torch.randn(37, 48), torch.randn(4, 48), torch.randn(40, 4))
    cm = lmc.compile(model, args, target="cpu", options=lmc.CompileOptions(cache_dir="off"))
    (gemm,) = [st.fn for st in _gemm_steps(cm.executable)]
    assert gemm.split.low_rank is not None
    out = np.empty((37, 40), np.float32)
    for _ in range(4):
        for t in args:
            t.copy_(torch.randn(t.shape))
        (y,) = cm.executable([t.numpy() for t in args], into=[out])
        np.testing.assert_allclose(y, model(*args).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert not gemm._replays


class _Joined(torch.nn.Module):
    """A concat of: a kernel's result; heads computed by a kernel and merged (permute +
    reshape); the input itself; a kernel's [B, T·d] result split back into [B, T, d] (in a
    slice of the wider concat, rows of d are not T·d apart: no view undoes that reshape)."""

    def forward(self, x):
        b, t, d = x.shape
        heads = x.reshape(b, t, 4, d // 4).permute(0, 2, 1, 3) * 3.0
        merged = heads.permute(0, 2, 1, 3).reshape(b, t, d)
        crossed = torch.relu(x.flatten(1)).reshape(b, t, d)
        return torch.cat([torch.sigmoid(x), merged, x, crossed], dim=-1) + 1.0


def test_concat_operands_are_computed_in_place():
    """The memory plan places a concat operand that a kernel computes (through reshapes and
    permutes) in its slice of the concat's buffer: the kernel writes there and the concat
    copies nothing for it. The input and the operand whose views need a copy are copied."""
    model = _Joined()
    T = torch.export.Dim("T", max=64)
    cm = lmc.compile(model, (torch.randn(2, 8, 16),), dynamic_shapes=({1: T},), target="cpu",
                     options=lmc.CompileOptions(cache_dir="off"))
    ex = cm.executable
    assert "tensor.concat" not in " ".join(cm.report["fallback"])
    for t in (8, 37):
        x = torch.randn(2, t, 16)
        _compare(cm, model, (x,))
        layout = ex.plan.layout(ex._env([x.numpy()]))
        joined = {p.into for p, _ in layout.placed.values()}
        assert len(layout.placed) == 2 and len(joined) == 1
        whole = layout.view(ex.plan.buffers[joined.pop()], ex._env([x.numpy()]))
        for slot in layout.placed:
            part = layout.view(ex.plan.buffers[slot], ex._env([x.numpy()]))
            assert np.shares_memory(part, whole)


def test_heads_are_merged_without_a_copy(monkeypatch):
    """An attention output read only through the head-merging permute is stored in that
    order: the reshape after it is a view (no copy), and the block still matches eager."""
    from lmc.backends.cpu import runtime
    from lmc.zoo import Block
    torch.manual_seed(0)
    model = Block(64, 4, 64).eval()
    T = torch.export.Dim("T", max=63)
    cm = lmc.compile(model, (torch.randn(2, 16, 64),), dynamic_shapes=({1: T},),
                     target="cpu", options=lmc.CompileOptions(cache_dir="off"))
    buffers = cm.executable.plan.buffers.values()
    assert [b.perm for b in buffers if b.perm] == [(0, 2, 1, 3)]
    copies = []
    real = runtime.run_view

    def watching(op, env, x):
        out = real(op, env, x)
        if not np.shares_memory(out, x):
            copies.append(op.name)
        return out

    for st in cm.executable.steps:
        if st.fn is real:
            st.fn = watching
    for t in (5, 33):
        _compare(cm, model, (torch.randn(2, t, 64),))
    assert copies == []
