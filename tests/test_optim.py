"""Optimizers as IR (lmc.optim + the optimizer-step pass): the seed's golden values, torch.optim
step-by-step, clipping and schedules, text round trips, the CPU backend, and bad options.

Random inputs come from a fresh seed each run; it is in every failure message and
`LMC_TEST_SEED` replays it.
"""
from __future__ import annotations

import difflib
import math
import os
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from test_filecheck import EXPECT, SEPARATOR, run_case, run_main, split_file

import lmc.optim as optim
from lmc.backends.reference.interpreter import run_func
from lmc.errors import LmcError, PipelineError
from lmc.ir import parse, print_module
from lmc.ir.verifier import verify
from lmc.pass_base import parse_pipeline
from lmc.pass_manager import PassManager

SEED = int(os.environ.get("LMC_TEST_SEED") or secrets.randbits(32))
SHAPES = [(5, 7), (3,), (2, 3, 5)]  # odd sizes
REL = 1e-6


def grads_as_inputs(shapes, dtype="f32") -> str:
    """@main(grads.., params..) -> (loss, grads..): the gradients are fed in, not computed."""
    types = [f"{dtype}[{','.join(map(str, s))}]" for s in shapes]
    grads = [f"%g{i}: {t}" for i, t in enumerate(types)]
    params = [f"%w{i}: {t} {{param}}" for i, t in enumerate(types)]
    outs = ", ".join(f"%g{i}" for i in range(len(shapes)))
    return (f"func @main({', '.join(grads + params)}) -> ({dtype}[], {', '.join(types)}) {{\n"
            f"  %0 = tensor.sum %w0 : {dtype}[]\n"
            f"  func.return %0, {outs}\n}}\n")


# loss 0.5·Σ(p − 0.5)², gradient p − 0.5 computed in the IR: the seed's 10k-step benchmark
SEED_PROBLEM = """func @main(%p: f64[3] {param}) -> (f64[], f64[3]) {
  %0 = tensor.constant {value = 0.5} : f64[3]
  %1 = tensor.sub %p, %0 : f64[3]
  %2 = tensor.mul %1, %1 : f64[3]
  %3 = tensor.sum %2 : f64[]
  %4 = tensor.constant {value = 0.5} : f64[]
  %5 = tensor.mul %3, %4 : f64[]
  func.return %5, %1
}
"""


class Trainer:
    """Runs a module through optimizer-step (+ a pipeline) and steps it, swapping its params
    and states for the returned ones, as lmc.compile_training does."""

    def __init__(self, text: str, params: dict[str, np.ndarray], opt: optim.Optimizer,
                 pipeline: str = "canonicalize,cse,dce", via_meta: bool = False):
        self.module, self.opt = parse(text, params=dict(params)), opt
        if via_meta:
            k = len(self.module.main.outputs) - len(params)
            self.module.meta["autodiff"] = {"num_outputs": k, "params": list(params)}
        PassManager.from_pipeline(f"{opt.pass_spec()},{pipeline}").run(self.module)
        meta = self.module.meta["train_step"]
        self.k, self.names = meta["num_outputs"], meta["params"] + meta["states"]
        self.run = lambda inputs: run_func(self.module, inputs)
        self.t = 0

    def step(self, *inputs: np.ndarray) -> list[np.ndarray]:
        self.t += 1
        outs = self.run([*inputs, np.float32(self.opt.lr_at(self.t)), np.float32(self.t)])
        for name, value in zip(self.names, outs[self.k:]):
            self.module.params[name] = value
        return outs[:self.k]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.module.params[name]


def assert_rel(got, want, what: str, rel: float = REL, scale: float = 0.0) -> None:
    """max |got − want| ≤ rel · max(max |want|, scale): elementwise relative error means
    nothing near 0, and a momentum that cancels to near 0 is compared at its inputs' scale."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), scale, 1e-30)
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel} (seed {SEED})"


def one_step(opt: optim.Optimizer, w, g) -> Trainer:
    tr = Trainer(grads_as_inputs([(3,)]), {"w0": np.array(w, np.float32)}, opt)
    tr.step(np.array(g, np.float32))
    return tr


# ---- (a) the seed's golden values (shared/reference/seed-digest.md Appendix C) ----------------

W, G = [0.5, -0.2, 0.1], [0.1, -0.05, 0.02]


def test_seed_sgd_one_step():
    np.testing.assert_allclose(one_step(optim.SGD(lr=0.01), W, G)["w0"],
                               [0.499, -0.1995, 0.0998], rtol=1e-6)


def test_seed_heavy_ball_one_step():
    tr = one_step(optim.HeavyBall(lr=0.01, momentum=0.9), W, G)
    np.testing.assert_allclose(tr["velocity.w0"], [-0.001, 0.0005, -0.0002], rtol=1e-5)
    np.testing.assert_allclose(tr["w0"], [0.499, -0.1995, 0.0998], rtol=1e-6)


def test_seed_adam_first_step():
    tr = one_step(optim.Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8), W, G)
    np.testing.assert_allclose(tr["w0"], [0.499, -0.199, 0.099], rtol=1e-6)


@pytest.mark.parametrize("opt", [optim.SGD(lr=0.01), optim.HeavyBall(lr=0.01, momentum=0.9),
                                 optim.EMAMomentum(lr=0.01, beta=0.9),
                                 optim.Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-8)],
                         ids=lambda o: type(o).__name__)
def test_seed_10k_steps_converge(opt):
    # The full 10,000 steps of the seed's benchmark on the compiled update, in f64 as the seed
    # runs it: in f32, SGD and EMA stall ~3e-6 from 0.5, where lr·(p − 0.5) drops below half
    # an ulp of 0.5.
    tr = Trainer(SEED_PROBLEM, {"p": np.ones(3)}, opt)
    for _ in range(10_000):
        tr.step()
    np.testing.assert_allclose(tr["p"], 0.5, atol=1e-6, rtol=0)


# ---- (b) step by step against torch.optim --------------------------------------------------

def torch_optimizer(opt: optim.Optimizer, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if isinstance(opt, optim.SGD):
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, foreach=False,
                               dampening=opt.dampening, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay)
    cls = torch.optim.AdamW if isinstance(opt, optim.AdamW) else torch.optim.Adam
    return cls(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
               foreach=False)


SCHEDULE = optim.WarmupCosine(warmup_steps=5, total_steps=18, min_lr_ratio=0.1)
AGAINST_TORCH = [
    optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    optim.SGD(lr=0.05, momentum=0.8, dampening=0.25, max_grad_norm=1.5),
    optim.SGD(lr=0.1, schedule=SCHEDULE),
    optim.Adam(lr=1e-2, weight_decay=0.05),
    optim.Adam(lr=3e-2, betas=(0.3, 0.99), eps=1e-6),  # lerp weight >= 0.5: torch's other form
    optim.AdamW(lr=1e-2, weight_decay=0.1),
    optim.AdamW(lr=2e-2, weight_decay=0.1, max_grad_norm=0.5, schedule=SCHEDULE),
]


@pytest.mark.parametrize("via_meta", [False, True], ids=["trailing", "meta"])
@pytest.mark.parametrize("opt", AGAINST_TORCH, ids=lambda o: o.pass_spec())
def test_matches_torch_for_20_steps(opt, via_meta):
    rng = np.random.default_rng([SEED, len(opt.pass_spec()), via_meta])
    init = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(SHAPES)}
    tr = Trainer(grads_as_inputs(SHAPES), init, opt, via_meta=via_meta)
    params = [torch.tensor(a, requires_grad=True) for a in init.values()]
    ref = torch_optimizer(opt, params)
    factor = opt.schedule.factor if opt.schedule else (lambda t: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda epoch: factor(epoch + 1))
    clipped = 0
    for t in range(1, 21):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        assert ref.param_groups[0]["lr"] == pytest.approx(opt.lr_at(t), rel=1e-12)
        tr.step(*grads)
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        if opt.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, opt.max_grad_norm, foreach=False)
            clipped += bool(norm > opt.max_grad_norm)
        ref.step()
        sched.step()
        for i, p in enumerate(params):
            assert_rel(tr[f"w{i}"], p.detach().numpy(), f"step {t} w{i}")
            for slot in opt.slots:  # lmc's slot names are torch's state keys
                assert_rel(tr[f"{slot}.w{i}"], ref.state[p][slot], f"step {t} {slot}.w{i}",
                           scale=0.0 if slot == "exp_avg_sq" else np.abs(grads[i]).max())
    assert not opt.max_grad_norm or clipped, "the clipping threshold was never reached"


def test_warmup_cosine_formula():
    s = optim.WarmupCosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.2)
    assert [s.factor(t) for t in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert s.factor(9) == pytest.approx(0.2 + 0.8 * 0.5)  # half-way through the decay
    assert s.factor(14) == pytest.approx(0.2) and s.factor(100) == pytest.approx(0.2)
    for t in range(5, 15):
        want = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 10))
        assert s.factor(t) == pytest.approx(want, rel=1e-15)
    decay = [s.factor(t) for t in range(4, 15)]
    assert decay == sorted(decay, reverse=True)
    assert optim.WarmupCosine(0, 10).factor(1) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 10)))
    assert optim.AdamW(lr=2.0, schedule=s).lr_at(2) == 1.0


def test_clipping_against_torch_norms():
    rng = np.random.default_rng([SEED, 7])
    zeros = {f"w{i}": np.zeros(s, np.float32) for i, s in enumerate(SHAPES)}
    for scale in (0.01, 10.0):  # below and above the threshold
        grads = [scale * rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        tr = Trainer(grads_as_inputs(SHAPES), zeros, optim.SGD(lr=1.0, max_grad_norm=1.0))
        tr.step(*grads)  # from zero with lr 1 the new params are minus the clipped gradients
        ref = [torch.zeros(s, requires_grad=True) for s in SHAPES]
        for p, g in zip(ref, grads):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=False)
        for i, p in enumerate(ref):
            assert_rel(-tr[f"w{i}"], p.grad.numpy(), f"clipped grad {i} at scale {scale}")


def test_half_precision_params_keep_their_dtype():
    rng = np.random.default_rng([SEED, 16])
    w = rng.standard_normal((3, 5)).astype(np.float16)
    tr = Trainer(grads_as_inputs([(3, 5)], "f16"), {"w0": w}, optim.SGD(lr=0.1, momentum=0.5))
    g = rng.standard_normal((3, 5)).astype(np.float16)
    tr.step(g)
    tr.step(g)
    assert tr["w0"].dtype == tr["momentum_buffer.w0"].dtype == np.float16
    np.testing.assert_allclose(tr["w0"], w.astype(np.float32) - 0.1 * 2.5 * g, rtol=1e-2,
                               atol=1e-2)


# ---- (c) the IR: report, round trip, verifier --------------------------------------------

@pytest.mark.parametrize("opt", [optim.SGD(lr=0.1, momentum=0.9, dampening=0.5),
                                 optim.HeavyBall(lr=0.1), optim.EMAMomentum(lr=0.1),
                                 optim.AdamW(max_grad_norm=1.0)], ids=lambda o: o.pass_spec())
def test_ir_prints_parses_and_verifies(opt):
    m = parse(grads_as_inputs(SHAPES[:2]), params={f"w{i}": np.ones(s, np.float32)
                                                    for i, s in enumerate(SHAPES[:2])})
    (step,) = parse_pipeline(opt.pass_spec())
    assert step.spec() == opt.pass_spec()
    report = step.run(m)
    verify(m)
    assert report == {"optimizer": step.optimizer, "params": 2, "slots": list(opt.slots),
                      "state_elements": len(opt.slots) * 38}
    f = m.main
    assert [a.name for a in f.inputs] == ["g0", "g1", "lr", "step"]
    assert [a.name for a in f.args_of_kind("state")] == [
        f"{slot}.w{i}" for i in range(2) for slot in opt.slots]
    assert len(f.outputs) == 1 + 2 + 2 * len(opt.slots)
    text = print_module(m)
    again = parse(text, params=m.params)
    verify(again)
    assert print_module(again) == text
    rng = np.random.default_rng([SEED, 3])
    inputs = [rng.standard_normal(a.type.shape).astype(np.float32) for a in f.inputs[:2]]
    inputs += [np.float32(0.1), np.float32(3)]
    for a, b in zip(run_func(m, inputs), run_func(again, inputs)):
        np.testing.assert_array_equal(a, b)


# Goldens in the filecheck format, in their own folder: the shared driver compares all outputs
# before and after a pass, but a train step returns new params where the gradients were.
GOLDEN_DIR = Path(__file__).parent / "filecheck" / "optimizer"


@pytest.mark.parametrize("path", sorted(GOLDEN_DIR.glob("*.lmc")), ids=lambda p: p.stem)
def test_golden_ir(path: Path):
    pipeline, cases = split_file(path)
    produced = []
    for i, (text, expected) in enumerate(cases):
        got, before, after = run_case(pipeline, text)
        produced.append(f"{text.rstrip()}\n{EXPECT}\n{got}\n")
        k = after.meta["train_step"]["num_outputs"]
        for a, b in zip(run_main(before)[:k], run_main(after)[:k]):
            np.testing.assert_array_equal(a, b, err_msg=f"case {i}: the user outputs changed")
        if got != expected and not os.environ.get("LMC_UPDATE_GOLDEN"):
            diff = "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(),
                                                  "expected", "got", lineterm=""))
            pytest.fail(f"{path.name} case {i} ({pipeline}):\n{diff}")
    if os.environ.get("LMC_UPDATE_GOLDEN"):
        path.write_text(f"// RUN: {pipeline}\n" + f"{SEPARATOR}\n".join(produced))


# ---- (d) the CPU backend -----------------------------------------------------------------

@pytest.mark.parametrize("opt", [
    optim.AdamW(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, schedule=SCHEDULE),
    optim.SGD(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01),
    optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)],
    ids=lambda o: o.pass_spec())
def test_cpu_backend_matches_reference(opt):
    from lmc.backends.cpu.runtime import CpuExecutable
    rng = np.random.default_rng([SEED, len(opt.pass_spec())])
    init = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(SHAPES)}
    ref = Trainer(grads_as_inputs(SHAPES), init, opt)
    cpu = Trainer(grads_as_inputs(SHAPES), init, opt, pipeline="canonicalize,cse,dce,fuse,dce")
    executable = CpuExecutable(cpu.module, prepack=False)
    assert executable.report()["fallback"] == []  # the whole update runs as native kernels
    cpu.run = executable
    for t in range(1, 7):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        ref.step(*grads)
        cpu.step(*grads)
        for name in ref.names:
            assert_rel(cpu[name], ref[name], f"cpu step {t} {name}", rel=2e-6)


# ---- (e) errors --------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: optim.SGD(lr=-0.1), "lr must be >= 0"),
    (lambda: optim.SGD(lr=0.1, nesterov=True), "nesterov needs momentum > 0"),
    (lambda: optim.SGD(lr=0.1, momentum=-1), "momentum must be >= 0"),
    (lambda: optim.HeavyBall(lr=0.1, momentum=1.0), r"momentum must be >= 0 and < 1"),
    (lambda: optim.EMAMomentum(lr=0.1, beta=1.5), r"momentum must be >= 0 and < 1"),
    (lambda: optim.Adam(betas=(1.0, 0.999)), r"beta1 and beta2 must be in \[0, 1\)"),
    (lambda: optim.Adam(betas=(0.9,)), "betas must be a pair"),
    (lambda: optim.AdamW(eps=-1e-8), "eps must be >= 0"),
    (lambda: optim.AdamW(weight_decay=-0.1), "weight_decay must be >= 0"),
    (lambda: optim.Adam(max_grad_norm=0.0), "max_grad_norm must be > 0"),
    (lambda: optim.Adam(schedule="cosine"), "schedule must be a WarmupCosine"),
    (lambda: optim.WarmupCosine(warmup_steps=10, total_steps=5), "total_steps must be >="),
    (lambda: optim.WarmupCosine(2, 5, min_lr_ratio=2.0), r"min_lr_ratio must be in \[0, 1\]"),
    (lambda: optim.SGD(lr=0.1).lr_at(0), "steps count from 1"),
])
def test_bad_hyper_parameters(make, message):
    with pytest.raises(optim.OptimizerError, match=message):
        make()


@pytest.mark.parametrize("spec, message", [
    ("optimizer-step{optimizer=lion}", "unknown optimizer 'lion'; known: sgd, heavy-ball"),
    ("optimizer-step{optimizer=adam,nesterov=true}", "nesterov do not apply to optimizer"),
    ("optimizer-step{optimizer=adam,beta2=1.0}", r"must be in \[0, 1\)"),
    ("optimizer-step{max_grad_norm=-1}", "max_grad_norm must be >= 0"),
    ("optimizer-step{momentum=fast}", "expects float"),
])
def test_bad_pipeline_options(spec, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(spec)


@pytest.mark.parametrize("text, message", [
    ("func @main(%w: f32[3] {param}) -> (f32[]) {\n  %0 = tensor.neg %w : f32[3]\n"
     "  %1 = tensor.sum %0 : f32[]\n  func.return %1\n}\n", "found no gradients"),
    ("func @main(%w: f32[3] {param}) -> (f32[], f32[4]) {\n  %0 = tensor.sum %w : f32[]\n"
     "  %1 = tensor.constant {value = 0.0} : f32[4]\n  func.return %0, %1\n}\n",
     r"one gradient per \{param\} argument \(f32\[3\]\)"),
    ("func @main(%x: f32[3]) -> (f32[]) {\n  %0 = tensor.sum %x : f32[]\n"
     "  func.return %0\n}\n", r"no \{param\} arguments"),
    ("func @main(%w: i64[3] {param}) -> (i64[], i64[3]) {\n  %0 = tensor.sum %w : i64[]\n"
     "  func.return %0, %w\n}\n", "only float parameters can be trained"),
    ("func @main(%lr: f32[3], %w: f32[3] {param}) -> (f32[], f32[3]) {\n"
     "  %0 = tensor.sum %w : f32[]\n  func.return %0, %lr\n}\n", "already has an argument %lr"),
])
def test_pass_errors_name_the_pass_and_the_problem(text, message):
    m = parse(text, params={"w": np.ones(3, np.float32 if "f32[3] {" in text else np.int64)})
    with pytest.raises(PipelineError, match=f"pass 'optimizer-step': .*{message}"):
        parse_pipeline("optimizer-step{optimizer=adam}")[0].run(m)


def test_the_pass_runs_once():
    m = parse(grads_as_inputs([(3,)]), params={"w0": np.ones(3, np.float32)})
    (step,) = parse_pipeline("optimizer-step")
    step.run(m)
    with pytest.raises(PipelineError, match="already holds an optimizer update"):
        step.run(m)
    assert isinstance(PipelineError("x"), LmcError)
