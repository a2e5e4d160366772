"""The CPU kernels of backward graphs at the tiny GPT's train-step sizes (V4096, d256, T128, B8):
lmc's native kernel vs the reference interpreter's numpy implementation (what ran before) and,
for GEMMs, numpy's matmul, in the same process, alternating in rounds (bench/cpu.py's `measure`:
blocks during which other processes were busy are redone, "noisy" marks those that stayed so).

    .venv/bin/python bench/train_ops.py [--reps 20] [--rounds 4] [--threads 2]

Prints a markdown table and writes bench/results/train-ops-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def cases(threads: int) -> dict[str, dict]:
    """{case: {tool: fn}} at the GPT step's sizes."""
    import numpy as np

    from lmc.backends.cpu import losses, scatter
    from lmc.backends.cpu.grouped import grouped_weight_grad
    from lmc.backends.cpu.threads import batched_sgemm, sgemm
    from lmc.backends.reference.interpreter import IMPL
    rng = np.random.default_rng(0)

    def f32(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    v, n, d, c = 4096, 1024, 256, 4096
    zeros, ids, g = np.broadcast_to(np.float32(0), (v, d)), rng.integers(0, v, n), f32(n, d)
    logits, target = f32(n, c), rng.integers(0, c, n)
    one, col = rng.integers(0, c, (n, 1)), f32(n, 1)
    x, gf, gx = f32(n, d), f32(n, 1024), f32(8, 128, d)
    p, q = f32(8, 4, 128, 128), f32(8, 4, 128, 64)
    moe_x, moe_g = f32(2048, d), f32(2048, 512)
    offsets = np.linspace(0, 2048, 9).astype(np.int64)
    ce = SimpleNamespace(ignore_index=-100, label_smoothing=0.0, reduction="mean")
    t = {"threads": threads}
    return {
        "index_add zeros[4096,256] += g[1024,256]": {
            "lmc": lambda: scatter.index_add(zeros, ids, g, **t),
            "numpy": lambda: IMPL["tensor.index_add"](SimpleNamespace(axis=0), {}, zeros, ids,
                                                      g)},
        "scatter add [1024,4096] (1 per row)": {
            "lmc": lambda: scatter.scatter_last(logits, one, col, "add", **t),
            "numpy": lambda: IMPL["tensor.scatter"](SimpleNamespace(axis=-1, reduce="add"), {},
                                                    logits, one, col)},
        "gather [1024,4096] (1 per row)": {
            "lmc": lambda: scatter.gather_last(logits, one, **t),
            "numpy": lambda: IMPL["tensor.gather"](SimpleNamespace(axis=-1), {}, logits, one)},
        "cross_entropy [1024,4096]": {
            "lmc": lambda: losses.cross_entropy(logits, target, **t),
            "numpy": lambda: IMPL["tensor.cross_entropy"](ce, {}, logits, target)},
        "dW = xᵀ·g [256,1024], K=1024": {
            "lmc": lambda: sgemm(x.T, gf, **t), "numpy": lambda: np.matmul(x.T, gf)},
        "attention dV = Pᵀ·dO [32×128×128]·[128×64]": {
            "lmc": lambda: batched_sgemm(p.transpose(0, 1, 3, 2), q, **t),
            "numpy": lambda: np.matmul(p.transpose(0, 1, 3, 2), q)},
        "grouped_weight_grad 8 experts [2048,256]ᵀ·[2048,512]": {
            "lmc": lambda: grouped_weight_grad(moe_x, moe_g, offsets, **t),
            "numpy": lambda: IMPL["moe.grouped_weight_grad"](None, {}, moe_x, moe_g, offsets)},
        "concat 3×[8,128,256] on the last axis": {
            "numpy": lambda: np.concatenate([gx, gx, gx], axis=-1),
            "memcpy (same bytes)": lambda: np.concatenate([gx, gx, gx], axis=0)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    from cpu import machine_facts, measure

    results = measure(cases(args.threads), args.reps, args.rounds, retries=2)
    rows = []
    for (case, tool), r in results.items():
        ms = statistics.median(r["times"]) * 1e3 if isinstance(r, dict) else None
        rows.append({"case": case, "tool": tool, "median_ms": ms,
                     "noisy": isinstance(r, dict) and r["other_cores"] >= 0.25})
    print(f"{'case':55s} {'tool':20s} median")
    for row in rows:
        flag = " (noisy)" if row["noisy"] else ""
        print(f"{row['case']:55s} {row['tool']:20s} {row['median_ms']:8.3f} ms{flag}")
    out = ROOT / "bench" / "results" / f"train-ops-{datetime.date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine_facts(args.threads), "threads": args.threads,
                               "rows": rows}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
