"""Built-in tiny models (plain PyTorch, random init) for `lmc demo` and the benchmarks.

Shapes follow ../shared/reference/baseline_models.py so that demo figures and benchmark figures
speak of the same workloads, scaled down.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """GPT-style pre-LayerNorm decoder block: causal multi-head attention + GELU MLP (4x)."""

    def __init__(self, d: int = 64, heads: int = 4, max_seq: int = 64, attn: str = "manual"):
        super().__init__()
        self.h, self.attn = heads, attn
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        mask = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.h, C // self.h
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
            att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
            y = torch.softmax(att, dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4,
                 max_seq: int = 64, attn: str = "manual"):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_seq, d)
        self.blocks = nn.ModuleList([Block(d, heads, max_seq, attn) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class MoE(nn.Module):
    """Mixtral-style sparse MoE FFN: softmax router, top-k, SwiGLU experts; each expert runs
    only on the tokens routed to it (torch.where + index_add_, data-dependent sizes)."""

    def __init__(self, d: int = 64, f: int = 128, experts: int = 4, topk: int = 2):
        super().__init__()
        self.E, self.k = experts, topk
        self.gate = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, d, f) / math.sqrt(d))
        self.w3 = nn.Parameter(torch.randn(experts, d, f) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(experts, f, d) / math.sqrt(f))

    def forward(self, x):  # x: [N, d]
        probs = torch.softmax(self.gate(x), dim=-1)
        topw, topi = probs.topk(self.k, dim=-1)
        topw = topw / topw.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = torch.where(topi == e)
            xe = x[tok]
            h = F.silu(xe @ self.w1[e]) * (xe @ self.w3[e])
            out.index_add_(0, tok, (h @ self.w2[e]) * topw[tok, slot].unsqueeze(-1))
        return out


class LoRALinear(nn.Module):
    """y = W x + b + (α/r)·B A x with the base weights frozen."""

    def __init__(self, fin: int = 64, fout: int = 64, r: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base = nn.Linear(fin, fout)
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, fin) * 0.02)
        self.B = nn.Parameter(torch.randn(fout, r) * 0.02)  # non-zero so the branch matters
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale


def demo_models():
    """(name, model, example inputs, dynamic_shapes, inputs at a second size) for `lmc demo`."""
    torch.manual_seed(0)
    B, T, N = torch.export.Dim("B", max=64), torch.export.Dim("T", max=63), \
        torch.export.Dim("N", max=4096)
    return [
        ("tiny-gpt", TinyGPT().eval(), (torch.randint(0, 256, (2, 16)),), ({0: B, 1: T},),
         (torch.randint(0, 256, (3, 24)),)),
        ("moe", MoE().eval(), (torch.randn(13, 64),), ({0: N},), (torch.randn(29, 64),)),
        ("lora", LoRALinear().eval(), (torch.randn(2, 9, 64),), ({0: B, 1: T},),
         (torch.randn(3, 17, 64),)),
    ]
