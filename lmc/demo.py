"""`lmc demo` / `make demo`: compile the built-in models for the CPU, show dumps, kernels and
op counts, check outputs against eager PyTorch at two input sizes (one compile serves both),
and time one call against eager."""
from __future__ import annotations

import time
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


def run_demo(dump_root: str, target: str = "cpu") -> int:
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
    return 1 if failures else 0
