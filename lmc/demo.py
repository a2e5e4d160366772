"""`lmc demo` / `make demo`: compile the built-in models, show dumps and op counts, check
outputs against eager PyTorch at two input sizes (one compile serves both)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run_demo(dump_root: str) -> int:
    import torch

    import lmc
    from lmc.zoo import demo_models

    failures = 0
    for name, model, example, dyn, second in demo_models():
        dump = Path(dump_root) / name
        start = time.perf_counter()
        cm = lmc.compile(model, example, dynamic_shapes=dyn, dump_ir=str(dump))
        seconds = time.perf_counter() - start
        counts = cm.module.op_counts()
        print(f"== {name}: compiled in {seconds:.2f} s, {sum(counts.values())} ops; "
              f"IR dumps in {dump}/ (index.md)")
        print("   signature: " + ", ".join(f"{n}: {t}" for n, t in cm.signature))
        print("   ops: " + ", ".join(f"{k.split('.', 1)[1]}×{v}" for k, v in counts.items()
                                     if k != "func.return"))
        for inputs in (example, second):
            with torch.no_grad():
                want = model(*inputs)
            got = cm(*inputs)
            err = float(np.max(np.abs(got.numpy() - want.numpy())))
            ok = np.allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
            failures += not ok
            shapes = ", ".join(str(list(x.shape)) for x in inputs)
            print(f"   input {shapes}: max |lmc - torch| = {err:.2e}  {'ok' if ok else 'MISMATCH'}")
    print("demo: all outputs match eager PyTorch" if not failures else
          f"demo: {failures} mismatch(es)")
    return 1 if failures else 0
