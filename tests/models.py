"""Small plain-PyTorch models with random weights, used by the frontend and end-to-end tests.

Each `make_*` returns (model in eval mode, example inputs, dynamic_shapes, other_inputs) where
`other_inputs` are inputs at a second batch/sequence size, to run the one compiled model twice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from lmc import zoo

# ---- GPT -------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, max_t: int, sdpa: bool):
        super().__init__()
        self.h, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.tril(torch.ones(max_t, max_t)).view(1, 1, max_t, max_t))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.h, C // self.h).transpose(1, 2)
        k = k.view(B, T, self.h, C // self.h).transpose(1, 2)
        v = v.view(B, T, self.h, C // self.h).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class GPTBlock(nn.Module):
    def __init__(self, d, heads, max_t, sdpa, gelu_approx):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, max_t, sdpa)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU(approximate=gelu_approx)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=61, d=32, heads=4, layers=2, max_t=32, sdpa=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_t, d)
        # One block with exact GELU, one with the tanh approximation.
        self.blocks = nn.ModuleList(
            GPTBlock(d, heads, max_t, sdpa, "none" if i % 2 == 0 else "tanh")
            for i in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ---- BERT-style encoder -----------------------------------------------------------------------


class BertLayer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, add_mask):
        B, T, C = x.shape
        def heads(t):
            return t.view(B, T, self.h, C // self.h).permute(0, 2, 1, 3)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(C // self.h) + add_mask
        y = torch.matmul(s.softmax(-1), v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = self.ln1(x + self.o(y))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class BertEncoder(nn.Module):
    def __init__(self, vocab=53, d=32, heads=4, layers=2, max_t=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_t, d)
        self.typ = nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d, heads) for _ in range(layers))
        self.pool = nn.Linear(d, d)

    def forward(self, input_ids, token_type_ids, attention_mask):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device).unsqueeze(0)
        x = self.ln(self.tok(input_ids) + self.pos(pos) + self.typ(token_type_ids))
        # Padding mask: 1 = keep, 0 = pad -> additive -inf-ish bias on the keys.
        add_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, add_mask)
        pooled = torch.tanh(self.pool(x[:, 0]))
        return x, pooled


# ---- Llama-style block ------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, d=32, heads=4, kv_heads=2, ffn=48, theta=10000.0):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.norm1 = RMSNorm(d)
        self.norm2 = nn.RMSNorm(d, eps=1e-5)  # aten.rms_norm
        self.wq = nn.Linear(d, heads * self.hd, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(heads * self.hd, d, bias=False)
        self.gate = nn.Linear(d, ffn, bias=False)
        self.up = nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)
        inv = 1.0 / theta ** (torch.arange(0, self.hd, 2).float() / self.hd)
        self.register_buffer("inv_freq", inv, persistent=False)

    def rope(self, T):
        t = torch.arange(T, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def forward(self, x):
        B, T, _ = x.shape
        h = self.norm1(x)
        q = self.wq(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.wk(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.wv(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        cos, sin = self.rope(T)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


# ---- MoE (the sparse loop of /work/shared/reference/baseline_models.py) -------------------------


# The MoE and LoRA models are the built-in ones (lmc.zoo), at test sizes.
def MoE(d=16, f=24, experts=4, topk=2):
    return zoo.MoE(d, f, experts, topk)


def LoRALinear(fin=24, fout=20, r=4, alpha=8):
    return zoo.LoRALinear(fin, fout, r, alpha)


# ---- a model with its loss --------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self, d=16, classes=7):
        super().__init__()
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x, target):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return F.cross_entropy(logits, target), logits


# ---- factories --------------------------------------------------------------------------------

def _tokens(vocab, b, t, g):
    return torch.randint(0, vocab, (b, t), generator=g)


def make_gpt(sdpa=False):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    m = GPT(sdpa=sdpa).eval()
    B, T = Dim("B", max=64), Dim("T", max=31)  # T < max_t: slicing the mask needs T < 32
    return m, (_tokens(61, 2, 7, g),), {"idx": {0: B, 1: T}}, (_tokens(61, 3, 12, g),)


def make_bert():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    m = BertEncoder().eval()

    def inputs(b, t):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 2:] = 0  # padding at the end of the first sequence
        return (_tokens(53, b, t, g), torch.randint(0, 2, (b, t), generator=g), mask)
    B, T = Dim("B", max=64), Dim("T", max=32)
    spec = {"input_ids": {0: B, 1: T}, "token_type_ids": {0: B, 1: T},
            "attention_mask": {0: B, 1: T}}
    return m, inputs(2, 6), spec, inputs(3, 11)


def make_llama():
    torch.manual_seed(0)
    m = LlamaBlock().eval()
    B, T = Dim("B", max=64), Dim("T", max=128)
    return m, (torch.randn(2, 5, 32),), {"x": {0: B, 1: T}}, (torch.randn(1, 9, 32),)


def make_moe():
    torch.manual_seed(0)
    m = MoE().eval()
    return m, (torch.randn(10, 16),), {"x": {0: Dim("N", max=1024)}}, (torch.randn(23, 16),)


def make_lora():
    torch.manual_seed(0)
    m = LoRALinear().eval()
    B = Dim("B", max=1024)
    return m, (torch.randn(4, 24),), {"x": {0: B}}, (torch.randn(9, 24),)


def make_classifier():
    torch.manual_seed(0)
    m = Classifier().eval()
    N = Dim("N", max=1024)
    g = torch.Generator().manual_seed(3)
    ex = (torch.randn(6, 16), torch.randint(0, 7, (6,), generator=g))
    other = (torch.randn(13, 16), torch.randint(0, 7, (13,), generator=g))
    return m, ex, {"x": {0: N}, "target": {0: N}}, other


MODELS = {
    "gpt": make_gpt,
    "gpt_sdpa": lambda: make_gpt(sdpa=True),
    "bert": make_bert,
    "llama": make_llama,
    "moe": make_moe,
    "lora": make_lora,
    "classifier": make_classifier,
}
