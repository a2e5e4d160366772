"""`lmc demo` / `make demo`: compile the built-in models for the CPU, show dumps, kernels and
op counts, check outputs against eager PyTorch at two input sizes (one compile serves both),
and time one call against eager; then train the tiny GPT on the shipped corpus for a short
run (losses, loss plot, a generated sample)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _time_one_call(cm, model, inputs) -> None:
    import torch
    with torch.no_grad():
        eager = _median_ms(lambda: model(*inputs))
    print(f"   one call: lmc {_median_ms(lambda: cm(*inputs)):.2f} ms, torch eager "
          f"{eager:.2f} ms (tiny shapes: call overhead, not kernels; see bench/cpu.py)")


def run_demo(dump_root: str, target: str = "cpu", train: bool = True) -> int:
    import torch

    import lmc
    from lmc.zoo import demo_models

    failures = 0
    for name, model, example, dyn, second in demo_models():
        dump = Path(dump_root) / name
        start = time.perf_counter()
        cm = lmc.compile(model, example, dynamic_shapes=dyn, dump_ir=str(dump), target=target)
        seconds = time.perf_counter() - start
        counts = cm.module.op_counts()
        print(f"== {name}: compiled for {target} in {seconds:.2f} s, {sum(counts.values())} ops;"
              f" IR dumps in {dump}/ (index.md)")
        print("   signature: " + ", ".join(f"{n}: {t}" for n, t in cm.signature))
        print("   ops: " + ", ".join(f"{k.split('.', 1)[1]}×{v}" for k, v in counts.items()
                                     if k != "func.return"))
        if cm.report:
            steps = ", ".join(f"{k}×{v}" for k, v in cm.report["steps"].items())
            print(f"   runtime steps: {steps}; interpreter fallbacks: "
                  f"{', '.join(cm.report['fallback']) or 'none'}")
        for inputs in (example, second):
            with torch.no_grad():
                want = model(*inputs)
            got = cm(*inputs)
            err = float(np.max(np.abs(got.numpy() - want.numpy())))
            ok = np.allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
            failures += not ok
            shapes = ", ".join(str(list(x.shape)) for x in inputs)
            print(f"   input {shapes}: max |lmc - torch| = {err:.2e}  {'ok' if ok else 'MISMATCH'}")
        _time_one_call(cm, model, second)
    print("demo: all outputs match eager PyTorch" if not failures else
          f"demo: {failures} mismatch(es)")
    if train:
        failures += run_training_demo(dump_root, target)
    return 1 if failures else 0


def demo_train_config():
    """A run that shows the loss falling within ~30 s on 2 cores (target cpu)."""
    from lmc.charlm import TrainConfig
    return TrainConfig(steps=150, batch=16, seq=64, layers=2, d=64, heads=4, lr=1e-2, warmup=15)


def run_training_demo(dump_root: str, target: str = "cpu") -> int:
    """TinyGPT as a character-level LM on the shipped Shakespeare through compiled train steps:
    losses, the loss plot, the step-1 loss vs eager PyTorch, a sample. Returns the failures."""
    from lmc import charlm
    from lmc.datasets import CharCorpus, shipped_corpus
    from lmc.plot import save_loss_plot

    dump = Path(dump_root) / "train"
    config = replace(demo_train_config(), target=target, dump_ir=str(dump))
    corpus = CharCorpus(shipped_corpus())
    print("== train: TinyGPT learns the shipped Shakespeare, one compiled forward + "
          "cross-entropy + backward + AdamW step at a time (`lmc train` does more)")
    for line in charlm.describe_run(config, corpus, "Shakespeare, Coriolanus"):
        print("   " + line)
    result = charlm.train(config, corpus, log_every=15, indent="   ")
    for line in charlm.summarize_run(result):
        print("   " + line)
    plot = save_loss_plot(result.losses, Path(dump_root) / "train-loss.png",
                          f"lmc demo: TinyGPT L{config.layers} d{config.d} on Shakespeare, "
                          f"target {target}", (len(result.losses), result.val_loss))
    print(f"   loss plot: {plot}; IR after every pass (autodiff, optimizer-step, fuse): "
          f"{dump}/ (index.md)")
    prompt = charlm.default_prompt(corpus, config.seq)
    sample = charlm.generate(result.model, corpus, 200, prompt=prompt, seq=config.seq)
    print("   sample (eager PyTorch with the trained weights):")
    print("\n".join("     | " + line for line in (prompt + sample).splitlines()))
    fell = result.losses[0] - float(np.mean(result.losses[-10:]))
    same = result.first_step_rel_diff() < 1e-4
    ok = fell > 0.5 and same
    print(f"demo: training {'ok' if ok else 'FAILED'}: loss fell by {fell:.2f}, step-1 loss "
          f"{'matches' if same else 'DIFFERS from'} eager PyTorch")
    return 0 if ok else 1
