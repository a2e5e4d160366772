"""fp32 GEMM: lmc's CPU sgemm vs numpy (OpenBLAS) in the same run, 1 and 2 threads.

Each thread count runs in its own subprocess so OPENBLAS_NUM_THREADS is set before numpy loads.
Within a run the two libraries alternate in blocks with a pause between, because OpenBLAS worker
threads spin for a while after each call and would steal a core from the block that follows.

    .venv/bin/python bench/gemm.py [--sizes 256,512,1024,2048] [--reps 10] [--target avx2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2       # alternating lmc/numpy blocks per size
PAUSE_S = 0.3    # lets OpenBLAS's spinning workers go to sleep between blocks


def _time_block(fn, reps: int) -> list[float]:
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def worker(sizes: list[int], reps: int, threads: int, target_name: str) -> list[dict]:
    """Runs in the subprocess: times both libraries on every size, returns one row per size."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from lmc.backends.cpu import compile_gemm, host_target, sgemm

    target = host_target().without_avx512() if target_name == "avx2" else None
    config = compile_gemm(target=target).config
    rng = np.random.default_rng()
    rows = []
    for n in sizes:
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        out = np.empty((n, n), np.float32)
        runs = {"lmc": lambda a=a, b=b, out=out: sgemm(a, b, out=out, threads=threads,
                                                       target=target),
                "numpy": lambda a=a, b=b, out=out: np.matmul(a, b, out=out)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(ROUNDS):
            for name, fn in runs.items():
                time.sleep(PAUSE_S)
                times[name] += _time_block(fn, -(-reps // ROUNDS))
        gflops = {name: 2 * n**3 / float(np.median(t)) / 1e9 for name, t in times.items()}
        rows.append({"size": n, "threads": threads, "lmc_gflops": gflops["lmc"],
                     "numpy_gflops": gflops["numpy"], "ratio": gflops["lmc"] / gflops["numpy"],
                     "config": config.tag})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--target", choices=["host", "avx2"], default="host",
                        help="avx2: run the AVX2 code path even on an AVX-512 host")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(worker(sizes, args.reps, int(args.threads), args.target)))
        return
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--worker", "--sizes", args.sizes, "--reps",
               str(args.reps), "--threads", str(threads), "--target", args.target]
        rows += json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True,
                                          text=True).stdout)
    report(rows, args.target)


def report(rows: list[dict], target_name: str) -> None:
    sys.path.insert(0, str(ROOT))
    from lmc.backends.cpu import host_target

    host = host_target()
    print(f"host {host.cpu}, avx512={host.has_avx512}, code path {target_name}, "
          f"load avg {os.getloadavg()[0]:.2f}, config {rows[0]['config']}")
    print(f"{'size':>6} {'thr':>4} {'lmc GFLOP/s':>12} {'numpy GFLOP/s':>14} {'ratio':>6}")
    for r in rows:
        print(f"{r['size']:>6} {r['threads']:>4} {r['lmc_gflops']:>12.1f} "
              f"{r['numpy_gflops']:>14.1f} {r['ratio']:>6.2f}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    suffix = "" if target_name == "host" else f"-{target_name}"
    path = ROOT / "bench" / "results" / f"gemm-{stamp}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host_cpu": host.cpu, "avx512": host.has_avx512,
                                "code_path": target_name, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
