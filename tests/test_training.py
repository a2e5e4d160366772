"""`lmc.compile_training` end to end: compiled train steps against eager PyTorch step by step
(tiny GPT with AdamW, LoRA fine-tuning of a peft-wrapped Llama, an MoE with its load-balancing
loss), frozen weights, state dicts, schedules, checkpointing and bad input."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import MoE

import lmc
from lmc.backends.reference import run_func
from lmc.ir.parser import parse
from lmc.ir.printer import print_module
from lmc.zoo import TinyGPT

V, T, B = 61, 12, 3


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batches(n, vocab=V, b=B, t=T, seed=1):
    """Random tokens whose target is the next token id: learnable, so losses must fall."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]
    return [(x, (x + 1) % vocab) for x in xs]


def eager_losses(model, data, loss_fn, opt, schedule=None):
    out = []
    for i, batch in enumerate(data, start=1):
        if schedule is not None:
            for group in opt.param_groups:
                group["lr"] = schedule(i)
        opt.zero_grad()
        loss = loss_fn(model(*batch[:-1]), batch[-1]) if loss_fn else model(*batch)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def assert_losses_match(mine, eager, rtol=1e-3):
    rel = np.abs(np.array(mine) - np.array(eager)) / np.abs(np.array(eager))
    assert rel.max() <= rtol, f"step {int(rel.argmax()) + 1}: {mine[rel.argmax()]} vs " \
                              f"{eager[rel.argmax()]}"


@pytest.mark.parametrize("target", ["ref", "cpu"])
def test_tiny_gpt_adamw_50_steps_matches_eager(target):
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=32, layers=2, heads=4, max_seq=16)
    eager = copy.deepcopy(model)
    data = batches(50)
    trainer = lmc.compile_training(model, data[0], loss_fn=lm_loss, target=target,
                                   optimizer=lmc.optim.AdamW(lr=1e-2, weight_decay=0.1))
    mine = [trainer.step(*b) for b in data]
    theirs = eager_losses(eager, data, lm_loss,
                          torch.optim.AdamW(eager.parameters(), lr=1e-2, weight_decay=0.1))
    assert_losses_match(mine, theirs)
    assert mine[-1] < mine[0]
    sd = trainer.state_dict()
    assert sd.keys() == model.state_dict().keys()
    # The model object itself is untouched until update_model copies the weights in.
    trainer.update_model(model)
    assert torch.equal(model.head.weight, sd["head.weight"])


def test_a_step_writes_into_the_weights_of_the_step_before_last():
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=16, layers=1, heads=2, max_seq=16)
    before = copy.deepcopy(model.state_dict())
    data = batches(5)
    trainer = lmc.compile_training(model, data[0], loss_fn=lm_loss, target="cpu",
                                   optimizer=lmc.optim.Adam(lr=1e-2))
    held = []  # what a user may keep between steps: state dicts, optimizer state
    arrays = []
    for b in data:
        trainer.step(*b)
        arrays.append(trainer.module.params["head.weight"])
        held.append((trainer.state_dict(), trainer.optimizer_state()))
    # Steps 1 and 2 wrote fresh arrays (the first weights may be the model's own memory);
    # from then on each step reuses the buffers of the step before last.
    assert arrays[2] is arrays[0] and arrays[3] is arrays[1] and arrays[1] is not arrays[0]
    for key, t in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(t, before[key]), key
    # Copies are taken out: a state dict of step 1 still differs from step 3's weights.
    assert not torch.equal(held[0][0]["head.weight"], held[2][0]["head.weight"])
    states = [s for _, s in held]
    assert any(not np.array_equal(states[0][k], states[2][k]) for k in states[0])
    # A user's array put in place of the weights is read, never written into.
    mine = trainer.module.params["head.weight"].copy()
    trainer.module.params["head.weight"] = mine
    kept = mine.copy()
    for b in data[:3]:
        trainer.step(*b)
    assert np.array_equal(mine, kept)


def test_a_batch_of_one_trains_on_the_cpu():
    """Size-1 batch dims meet broadcasts in the LayerNorm kernels of the step (they used to be
    refused as 'broadcast along two different axis sets')."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=16, layers=2, heads=4, max_seq=16)
    eager = copy.deepcopy(model)
    data = batches(4, b=1)
    trainer = lmc.compile_training(model, data[0], loss_fn=lm_loss, target="cpu",
                                   optimizer=lmc.optim.AdamW(lr=1e-2))
    mine = [trainer.step(*b) for b in data]
    theirs = eager_losses(eager, data, lm_loss, torch.optim.AdamW(eager.parameters(), lr=1e-2))
    assert_losses_match(mine, theirs)


def test_schedule_and_clipping_are_fed_per_step():
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=16, layers=1, heads=2, max_seq=16)
    eager = copy.deepcopy(model)
    data = batches(12)
    schedule = lmc.optim.WarmupCosine(warmup_steps=4, total_steps=12)
    opt = lmc.optim.Adam(lr=3e-2, max_grad_norm=0.5, schedule=schedule)
    trainer = lmc.compile_training(model, data[0], loss_fn=lm_loss, optimizer=opt, target="ref")
    mine = [trainer.step(*b) for b in data]
    torch_opt = torch.optim.Adam(eager.parameters(), lr=3e-2)
    theirs = []
    for i, (x, y) in enumerate(data, start=1):
        for group in torch_opt.param_groups:
            group["lr"] = 3e-2 * schedule.factor(i)
        torch_opt.zero_grad()
        loss = lm_loss(eager(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), 0.5)
        torch_opt.step()
        theirs.append(loss.item())
    assert_losses_match(mine, theirs)


class LogitsLoss(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, labels):
        return lm_loss(self.lm(input_ids=ids, use_cache=False).logits, labels)


def test_lora_finetuning_of_peft_llama_changes_only_adapters():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    lm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model = LogitsLoss(lm)
    with torch.no_grad():  # B starts at zero: give it values so that A's gradient is not zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    eager = copy.deepcopy(model)
    data = batches(6)
    trainer = lmc.compile_training(model, data[0], optimizer=lmc.optim.AdamW(lr=1e-2),
                                   target="ref")
    mine = [trainer.step(*b) for b in data]
    theirs = eager_losses(eager, data, None, torch.optim.AdamW(
        [p for p in eager.parameters() if p.requires_grad], lr=1e-2))
    assert_losses_match(mine, theirs)
    before, after = model.state_dict(), trainer.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert len(changed) == sum(p.requires_grad for p in model.parameters())


class MoELM(torch.nn.Module):
    """Embedding → sparse MoE FFN → head; loss = next-token CE + 0.01 · load-balancing loss."""

    def __init__(self, vocab=V, d=16, experts=4, topk=2):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.moe = MoE(d=d, f=24, experts=experts, topk=topk)
        self.head = torch.nn.Linear(d, vocab)
        self.experts, self.topk = experts, topk

    def forward(self, idx, y):
        x = self.emb(idx).reshape(-1, self.emb.embedding_dim)
        logits = self.head(x + self.moe(x))
        aux = lmc.losses.load_balancing_loss(self.moe.gate(x), self.experts, self.topk)
        return F.cross_entropy(logits, y.reshape(-1)) + 0.01 * aux


@pytest.mark.parametrize("target", ["ref", "cpu"])
def test_moe_trains_with_its_auxiliary_loss(target):
    torch.manual_seed(0)
    model = MoELM()
    eager = copy.deepcopy(model)
    data = batches(8)
    trainer = lmc.compile_training(model, data[0], optimizer=lmc.optim.AdamW(lr=1e-2),
                                   target=target)
    assert "moe.grouped_weight_grad" in trainer.module.op_counts()
    mine = [trainer.step(*b) for b in data]
    theirs = eager_losses(eager, data, None, torch.optim.AdamW(eager.parameters(), lr=1e-2))
    assert_losses_match(mine, theirs)
    router = trainer.state_dict()["moe.gate.weight"]
    assert not torch.equal(router, model.state_dict()["moe.gate.weight"])


def test_load_balancing_loss_is_one_for_uniform_routing():
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = 1.0  # each expert first for 2 tokens
    assert lmc.losses.load_balancing_loss(logits, 4, top_k=1).item() == pytest.approx(1.0)


def test_checkpointing_lowers_peak_memory_and_keeps_losses():
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=16, layers=3, heads=2, max_seq=16)
    data = batches(3, b=16, t=16)  # activations outweigh the weight gradients
    runs = {}
    for policy in ("none", "cheap", "blocks"):
        trainer = lmc.compile_training(copy.deepcopy(model), data[0], loss_fn=lm_loss,
                                       target="ref", checkpoint=policy)
        runs[policy] = ([trainer.step(*b) for b in data], trainer.peak_bytes(*data[0]),
                        trainer.module.op_counts().get("tensor.barrier", 0))
    assert runs["none"][2] == 0 and runs["cheap"][2] > 0
    for policy in ("cheap", "blocks"):
        np.testing.assert_allclose(runs[policy][0], runs["none"][0], rtol=1e-5)
    assert runs["cheap"][1]["peak_bytes"] < runs["none"][1]["peak_bytes"]
    assert runs["blocks"][1]["peak_bytes"] < 0.7 * runs["none"][1]["peak_bytes"]


def test_frozen_parameters_stay_frozen_and_tied_weights_are_one():
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=16, layers=1, heads=2, max_seq=16)
    model.head.weight = model.tok.weight  # tied, as GPT-2 does
    model.pos.weight.requires_grad_(False)
    data = batches(2)
    trainer = lmc.compile_training(model, data[0], loss_fn=lm_loss, target="ref",
                                   optimizer=lmc.optim.SGD(lr=0.1))
    kinds = dict(zip((a.name for a in trainer.func.body.args), trainer.func.arg_kinds))
    assert kinds["pos.weight"] == "buffer"
    for b in data:
        trainer.step(*b)
    sd = trainer.state_dict()
    assert torch.equal(sd["pos.weight"], model.pos.weight)
    assert torch.equal(sd["head.weight"], sd["tok.weight"])
    assert not torch.equal(sd["tok.weight"], model.tok.weight)


def test_train_step_ir_round_trips_and_runs_the_same():
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=16, layers=1, heads=2, max_seq=16)
    data = batches(1)
    trainer = lmc.compile_training(model, data[0], loss_fn=lm_loss, target="ref")
    text = print_module(trainer.module)
    assert "{state}" in text and "%lr: f32[]" in text
    again = parse(text, params=dict(trainer.module.params))
    assert print_module(again) == text
    inputs = [x.numpy() for x in data[0]] + [np.float32(1e-3), np.float32(1)]
    inputs[-2:] = [np.asarray(x) for x in inputs[-2:]]
    first = run_func(again, inputs)
    loss = trainer.step(*data[0])
    assert float(first[0]) == pytest.approx(loss, rel=1e-6)


def test_dynamic_shapes_serve_every_length():
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=16, layers=1, heads=2, max_seq=32)
    eager = copy.deepcopy(model)
    s = torch.export.Dim("T", max=31)
    spec = ({1: s}, {1: s})
    data = batches(1, t=7) + batches(1, t=13, seed=2) + batches(1, t=7, seed=3)
    trainer = lmc.compile_training(model, data[0], loss_fn=lm_loss, target="ref",
                                   dynamic_shapes=spec, optimizer=lmc.optim.SGD(lr=0.1))
    mine = [trainer.step(*b) for b in data]
    theirs = eager_losses(eager, data, lm_loss, torch.optim.SGD(eager.parameters(), lr=0.1))
    assert_losses_match(mine, theirs, rtol=1e-5)


def test_bad_input_is_a_clear_error():
    torch.manual_seed(0)
    model = TinyGPT(vocab=V, d=16, layers=1, heads=2, max_seq=16)
    data = batches(1)
    with pytest.raises(lmc.LmcError, match="float scalar loss"):
        lmc.compile_training(model, data[0][:1], target="ref")
    with pytest.raises(lmc.LmcError, match="optimizer must be"):
        lmc.compile_training(model, data[0], loss_fn=lm_loss, target="ref",
                             optimizer=torch.optim.SGD)
    trainer = lmc.compile_training(model, data[0], loss_fn=lm_loss, target="ref")
    with pytest.raises(lmc.InputError, match="batch of 2"):
        trainer.step(data[0][0])
    with pytest.raises(lmc.InputError, match="dtype"):
        trainer.step(data[0][0].float(), data[0][1])
    assert trainer.steps_done == 0  # a refused batch is not a step (the schedule's count)


class WithUnusedWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)
        self.unused = torch.nn.Parameter(torch.randn(4))

    def forward(self, x, y):
        return F.mse_loss(self.lin(x), y)


def test_a_parameter_the_loss_does_not_reach_is_left_alone_as_torch_does():
    torch.manual_seed(0)
    model = WithUnusedWeight()
    eager = copy.deepcopy(model)
    data = [(torch.randn(5, 6), torch.randn(5, 3)) for _ in range(4)]
    trainer = lmc.compile_training(model, data[0], target="ref",
                                   optimizer=lmc.optim.AdamW(lr=1e-2, weight_decay=0.5))
    mine = [trainer.step(*b) for b in data]
    theirs = eager_losses(eager, data, None, torch.optim.AdamW(eager.parameters(), lr=1e-2,
                                                               weight_decay=0.5))
    assert_losses_match(mine, theirs, rtol=1e-5)
    assert torch.equal(trainer.state_dict()["unused"], eager.unused.detach())
