"""`autodiff` on whole models: every {param} gradient against torch.autograd, at two input
sizes, for the plain-PyTorch models of tests/models.py and tiny Hugging Face models; and
activation checkpointing, which must give the same gradients with recomputation left in.

The loss is `Σ sum(out_i · r_i)` over the model's float outputs (r_i random, added to the IR
as inputs) — the classifier returns its own cross-entropy loss first. lmc runs in fp32, torch
in float64; each gradient must be within 1e-4 of the largest |entry| of that tensor.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from models import MODELS
from op_cases import SEED
from test_autodiff import attach_weighted_loss
from torch.export import Dim

import lmc
from lmc.backends.reference.interpreter import run_func
from lmc.ir.core import Module
from lmc.pass_manager import PassManager
from lmc.passes.autodiff import CHECKPOINT_POLICIES

OWN_LOSS = {"classifier"}  # output 0 already is the loss
RTOL = 1e-4
# The attention key bias has an exactly zero true gradient (softmax ignores a per-row shift):
# compare such tensors with an absolute slack, a millionth of the model's largest gradient.
FLOOR = 1e-6


def _outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o.is_floating_point()]


@functools.cache
def imported(name: str, make) -> tuple[torch.nn.Module, tuple, tuple, Module]:
    """(model, inputs, second inputs, lmc module with the loss attached), once per worker."""
    model, inputs, dynamic_shapes, other = make()
    module = lmc.compile(model, inputs, target="ref", dynamic_shapes=dynamic_shapes).module
    if name not in OWN_LOSS:
        attach_weighted_loss(module)
    return model, inputs, other, module


def draw_weights(model, inputs, name: str, seed: int) -> list[np.ndarray]:
    if name in OWN_LOSS:
        return []
    rng = np.random.default_rng([SEED, seed])
    with torch.no_grad():
        return [rng.standard_normal(tuple(o.shape)).astype(np.float32)
                for o in _outputs(model(*inputs))]


def torch_grads(model, inputs, rs, names: list[str]) -> list[np.ndarray]:
    """float64 torch.autograd gradients of the same loss w.r.t. the named parameters; a tied
    parameter (GPT-2's lm_head = wte) appears once in lmc, under one of its names."""
    m64 = copy.deepcopy(model).double()
    named = dict(m64.named_parameters(remove_duplicate=False))
    trainable = {id(p) for p in m64.parameters() if p.requires_grad}
    assert {id(named[n]) for n in names} == trainable, "lmc's {param} args are not torch's"
    outs = _outputs(m64(*[x.double() if x.is_floating_point() else x for x in inputs]))
    loss = outs[0] if not rs else sum((o * torch.from_numpy(r).double()).sum()
                                      for o, r in zip(outs, rs))
    grads = torch.autograd.grad(loss, [named[n] for n in names], allow_unused=True)
    return [np.zeros(named[n].shape) if g is None else g.numpy() for n, g in zip(names, grads)]


def lmc_grads(module: Module, inputs, rs) -> list[np.ndarray]:
    outs = run_func(module, [x.numpy() for x in inputs] + rs)
    return outs[module.meta["autodiff"]["num_outputs"]:]


def differentiated(module: Module, checkpoint: str = "none") -> tuple[Module, PassManager]:
    m = module.clone()
    pm = PassManager.from_pipeline(f"autodiff{{checkpoint={checkpoint}}},canonicalize,cse,dce")
    pm.run(m)
    return m, pm


def assert_model_grads(names, got, want, where: str) -> None:
    floor = FLOOR * max(float(np.max(np.abs(w))) for w in want)
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, f"{where}: {name} {g.shape} vs {w.shape}"
        tol = RTOL * float(np.max(np.abs(w))) + floor
        err = float(np.max(np.abs(g - w)))
        assert err <= tol, f"{where}: d/d{name} off by {err:.3g} (max |grad| " \
                           f"{np.max(np.abs(w)):.3g}, LMC_TEST_SEED={SEED})"


def check_model(name: str, make) -> None:
    model, inputs, other, module = imported(name, make)
    m, _ = differentiated(module)
    names = m.meta["autodiff"]["params"]
    assert names, f"{name}: no {{param}} arguments"
    for i, x in enumerate((inputs, other)):
        rs = draw_weights(model, x, name, i)
        assert_model_grads(names, lmc_grads(m, x, rs), torch_grads(model, x, rs, names),
                           f"{name} at input sizes {[tuple(t.shape) for t in x]}")


@pytest.mark.parametrize("name", list(MODELS))
def test_model_gradients_match_torch(name):
    check_model(name, MODELS[name])


# ---- Hugging Face models (tests/test_hf_models.py's tiny configs) ------------------------------

def _hf(builder: str, attn: str):
    def make():
        hf = pytest.importorskip("test_hf_models")
        torch.manual_seed(0)
        if builder == "bert":
            model = hf.BertHidden(hf.transformers.BertModel(
                hf.transformers.BertConfig(**hf.SMALL, attn_implementation=attn))).eval()

            def inputs(b, t, seed):
                mask = torch.ones(b, t, dtype=torch.long)
                mask[0, t - 3:] = 0
                return hf._ids(b, t, seed), mask
            B, T = Dim("B", max=16), Dim("T", max=63)
            spec = {"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: T}}
            return model, inputs(2, 6, 1), spec, inputs(3, 13, 3)
        model = getattr(hf, "_" + builder)(attn).eval()
        T = Dim("T", max=63)
        return model, (hf._ids(2, 7, 1),), {"input_ids": {1: T}}, (hf._ids(2, 12, 3),)
    return make


HF = {"gpt2-eager": _hf("gpt2", "eager"), "llama-sdpa": _hf("llama", "sdpa"),
      "mixtral-sdpa": _hf("mixtral", "sdpa"), "bert-sdpa": _hf("bert", "sdpa")}


@pytest.mark.parametrize("name", list(HF))
def test_hf_model_gradients_match_torch(name):
    check_model(name, HF[name])


# ---- checkpointing -------------------------------------------------------------------------

# Ops that each policy recomputes in these models (their count must grow): the cheap ones,
# and under `blocks` also the matmuls inside each block.
RECOMPUTED = {("gpt", "cheap"): ["tensor.layer_norm", "tensor.softmax", "tensor.gelu"],
              ("gpt", "blocks"): ["tensor.layer_norm", "tensor.softmax", "tensor.matmul"],
              ("llama", "cheap"): ["tensor.rms_norm", "tensor.silu", "tensor.sin"]}


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("policy", [p for p in CHECKPOINT_POLICIES if p != "none"])
def test_checkpointing_keeps_the_gradients_and_the_recomputation(name, policy):
    model, inputs, _, module = imported(name, MODELS[name])
    rs = draw_weights(model, inputs, name, 0)
    plain, _ = differentiated(module)
    ckpt, pm = differentiated(module, policy)
    for g, want in zip(lmc_grads(ckpt, inputs, rs), lmc_grads(plain, inputs, rs)):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(want))))
    recomputed = pm.records[0].report["recomputed"]
    ops = RECOMPUTED.get((name, policy))
    if ops is None:  # the Llama block has no `blocks.N` module path: nothing to recompute
        assert recomputed == 0
        return
    counts, plain_counts = ckpt.op_counts(), plain.op_counts()
    assert recomputed > 0 and counts.get("tensor.barrier", 0) > 0, counts
    # canonicalize,cse,dce ran after autodiff: the copies must still be there
    assert sum(counts.values()) - counts["tensor.barrier"] > sum(plain_counts.values())
    for op in ops:
        assert counts.get(op, 0) > plain_counts.get(op, 0), (op, counts, plain_counts)
