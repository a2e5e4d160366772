"""Hugging Face `transformers` models from tiny configs with random weights (no downloads):
import through torch.export, verify, and match eager PyTorch at two sequence lengths."""
from __future__ import annotations

import pytest
import torch
from test_torch_frontend import check_against_eager, check_roundtrip
from torch.export import Dim

from lmc.frontends.torch import import_module
from lmc.ir.verifier import verify

transformers = pytest.importorskip("transformers")

VOCAB = 97
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}


class LogitsOnly(torch.nn.Module):
    """Wraps a causal LM so that export sees a tensor in, logits out, and no KV cache."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


class BertHidden(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


def _gpt2(attn):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return LogitsOnly(transformers.GPT2LMHeadModel(cfg))


def _llama(attn):
    cfg = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, attn_implementation=attn)
    return LogitsOnly(transformers.LlamaForCausalLM(cfg))


def _mixtral(attn):
    # batched_mm experts export as plain ATen (index, bmm, repeat_interleave); the default
    # per-expert loop iterates over a data-dependent tensor and does not export.
    cfg = transformers.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, attn_implementation=attn,
                                     experts_implementation="batched_mm")
    return LogitsOnly(transformers.MixtralForCausalLM(cfg))


def _ids(b, t, seed):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make,attn", [(_gpt2, "eager"), (_gpt2, "sdpa"), (_llama, "eager"),
                                       (_llama, "sdpa"), (_mixtral, "sdpa")],
                         ids=["gpt2-eager", "gpt2-sdpa", "llama-eager", "llama-sdpa",
                              "mixtral-sdpa"])
def test_causal_lm_matches_eager(make, attn):
    torch.manual_seed(0)
    model = make(attn).eval()
    T = Dim("T", max=63)
    module = import_module(model, (_ids(2, 7, 1),), {"input_ids": {1: T}})
    verify(module)
    assert module.main.inputs[0].type.shape == (2, "T")
    check_roundtrip(module)
    check_against_eager(model, module, [(_ids(2, 7, 2),), (_ids(2, 12, 3),)])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_with_padding_mask_matches_eager(attn):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**SMALL, attn_implementation=attn)
    model = BertHidden(transformers.BertModel(cfg)).eval()

    def inputs(b, t, seed):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 3:] = 0
        return _ids(b, t, seed), mask
    B, T = Dim("B", max=16), Dim("T", max=63)
    spec = {"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: T}}
    module = import_module(model, inputs(2, 6, 1), spec)
    verify(module)
    check_roundtrip(module)
    check_against_eager(model, module, [inputs(2, 6, 2), inputs(3, 13, 3)])
