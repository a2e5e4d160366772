"""CPU model benchmark: lmc vs torch eager, torch.compile and onnxruntime in the same run, fp32.

Each workload runs in a fresh subprocess (thread counts set before torch/numpy load, empty
torch.compile and lmc caches, so compile times are cold). Inside it every tool is compiled and
warmed up, checked against eager, then timed in rounds that alternate the tools with a pause
between blocks: machine noise hits all of them, and OpenBLAS/OpenMP/onnxruntime workers that
spin after a call go to sleep before the next tool's block. A block during which other
processes were busy is redone. Prints a markdown table and writes
`bench/results/cpu-<date>[-suffix].json` and `.md`.

    .venv/bin/python bench/cpu.py [--workloads gemm,block,...] [--reps 20] [--quick]
        [--targets cpu] [--tools eager,compile,ort,lmc] [--wait-quiet 600]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAUSE_S = 0.3        # lets spinning thread-pool workers of the previous block go to sleep
# Alternating rounds of ceil(reps / rounds) timed calls per tool: many short blocks spread the
# bursts of noise from neighbours (invisible in /proc/stat when they are other VMs) evenly.
ROUNDS = 10
OPSET = 20
TOOLS = ("eager", "compile", "ort", "lmc")
WORKLOADS = ("gemm", "block", "block_sdpa", "gpt", "moe", "lora", "compile")
GEMM_SIZES = (512, 1024, 2048)
# A tool whose output differs from eager's by more than this (relative to eager's max |y|) is
# flagged in the table: a fast wrong answer must not look like a win.
DIFF_TOL = 1e-3
QUIET_CORES = 0.25   # others' average CPU use (cores) above which a block is redone / flagged


@dataclass(frozen=True)
class Goal:
    """The issue's target for a workload: lmc must be `speedup`× faster than the best anchor."""

    text: str
    speedup: float | None = None
    baseline: str = ""   # the best tool's figure in ../shared/reference/baselines.md


@dataclass(frozen=True)
class Spec:
    """A model workload's table entry: title, goal, and labels of its cases (all measured
    together in one process; see build_cases)."""

    title: str
    goal: Goal | None
    # Goal anchors: the non-lmc tools of these cases (LoRA's goal is the *merged* linear's).
    anchor_cases: tuple[str, ...] = ()
    cases: dict[str, str] = field(default_factory=dict)   # case -> label, if not the title


SPECS = {
    "block": Spec("GPT block d512 h8 T128 B4, attention written out",
                  Goal("≥ 1.3×", 1.3, "onnxruntime 26.6 ms")),
    "block_sdpa": Spec("same block, scaled_dot_product_attention", None),
    "gpt": Spec("TinyGPT V4096 L4 d256 h4 T128 B8", Goal("≥ 1.3×", 1.3, "onnxruntime 74.0 ms")),
    "moe": Spec("MoE 8 experts top-2 SwiGLU d512 f1024, 512 tokens",
                Goal("≥ 1.2×", 1.2, "onnxruntime 24.3 ms")),
    "lora": Spec("LoRA linear 1024², r=8, 512 tokens, unmerged",
                 Goal("≤ merged (≥ 1.0×)", 1.0, "merged onnxruntime 7.4 ms"),
                 anchor_cases=("lora", "merged"),
                 cases={"merged": "same, merged into one linear (anchor)"}),
}
GEMM_GOAL = Goal("≥ 0.9× numpy", 0.9, "OpenBLAS 2 thr 121–132 GFLOP/s")
COMPILE_GOAL = Goal("cold ≤ 2 s, warm ≤ 0.1 s", None, "torch.compile 13.4 s")
COLD_S, WARM_S = 2.0, 0.1


# ---------------------------------------------------------------- workloads (worker side)

def build_cases(name: str) -> dict[str, tuple]:
    """(model, example inputs, forward FLOPs) per case: the lmc.zoo models at the issue's
    shapes (same definitions as ../shared/reference/baseline_models.py)."""
    import torch
    from torch import nn

    from lmc.zoo import Block, LoRALinear, MoE, TinyGPT

    torch.manual_seed(0)

    def block_flops(d: int, t: int, tokens: int) -> float:
        return tokens * (24 * d * d + 4 * t * d)

    if name in ("block", "block_sdpa"):
        m = Block(512, 8, 128, "sdpa" if name == "block_sdpa" else "manual")
        return {name: (m, (torch.randn(4, 128, 512),), block_flops(512, 128, 512))}
    if name == "gpt":
        fl = 4 * block_flops(256, 128, 1024) + 2 * 256 * 4096 * 1024
        return {name: (TinyGPT(4096, 256, 4, 4, 128), (torch.randint(0, 4096, (8, 128)),), fl)}
    if name == "moe":
        fl = 512 * (2 * 512 * 8 + 2 * 3 * 2 * 512 * 1024)
        return {name: (MoE(512, 1024, 8, 2), (torch.randn(512, 512),), fl)}
    if name == "lora":
        m = LoRALinear(1024, 1024, 8, 16.0)
        merged = nn.Linear(1024, 1024)
        with torch.no_grad():
            merged.weight.copy_(m.base.weight + m.scale * m.B @ m.A)
            merged.bias.copy_(m.base.bias)
        x = torch.randn(512, 1024)
        fl = 2 * 512 * 1024 * 1024
        return {"lora": (m, (x,), fl + 2 * 2 * 512 * 8 * 1024), "merged": (merged, (x,), fl)}
    raise KeyError(name)


def one_line(e: BaseException) -> str:
    """An exception as the one line the table shows: type and first line of the message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def max_abs_diff(out, ref) -> tuple[float, float]:
    """(max |out - ref|, max |ref|) over all outputs, as float64."""
    import numpy as np
    import torch

    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        raise ValueError(f"{len(outs)} outputs, eager has {len(refs)}")
    diff = scale = 0.0
    for o, r in zip(outs, refs):
        o = o.detach().numpy() if isinstance(o, torch.Tensor) else np.asarray(o)
        r = r.detach().numpy()
        if o.shape != r.shape:
            raise ValueError(f"output shape {list(o.shape)}, eager gives {list(r.shape)}")
        diff = max(diff, float(np.max(np.abs(o.astype(np.float64) - r))))
        scale = max(scale, float(np.max(np.abs(r))))
    return diff, scale


def setup_eager(model, inputs) -> Callable:
    """The PyTorch module itself, under inference_mode (no autograd bookkeeping)."""
    import torch

    def run():
        with torch.inference_mode():
            return model(*inputs)
    return run


def setup_compile(model, inputs, info: dict) -> Callable:
    """torch.compile (inductor, default mode); the first call's time is its compile time."""
    import torch
    from torch._dynamo.utils import counters

    compiled = torch.compile(model)

    def run():
        with torch.inference_mode():
            return compiled(*inputs)
    counters.clear()
    start = time.perf_counter()
    run()
    info["compile_s"] = time.perf_counter() - start
    # torch 2.13 files graph-break reasons under "unimplemented", older ones under "graph_break"
    reasons = {**counters.get("graph_break", {}), **counters.get("unimplemented", {})}
    info["graph_breaks"] = int(sum(reasons.values()))
    info["graphs"] = int(counters.get("stats", {}).get("unique_graphs", 0))
    info["inductor_cache"] = {k: int(v) for k, v in counters.get("inductor", {}).items()
                              if k.startswith("fxgraph_cache")}
    if reasons:
        info["graph_break_reasons"] = [str(r).strip().splitlines()[0][:200] for r in reasons]
    return run


def export_onnx(model, inputs, path: str, exporter: str) -> str:
    """Export with torch.onnx.export at opset 20; returns the exporter used. `auto` tries the
    dynamo exporter (needs onnxscript) and falls back to the TorchScript one."""
    import importlib.util

    import torch

    order = {"auto": ["dynamo", "legacy"], "dynamo": ["dynamo"], "legacy": ["legacy"]}[exporter]
    if exporter == "auto" and importlib.util.find_spec("onnxscript") is None:
        order = ["legacy"]
    errors = []
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    for kind in order:
        try:   # silenced: deprecation warnings, progress lines, "torchvision is not installed"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                onnx_log.setLevel(logging.ERROR)
                torch.onnx.export(model, inputs, path, opset_version=OPSET,
                                  dynamo=kind == "dynamo")
            return kind if not errors else f"{kind} (dynamo failed: {errors[0]})"
        except Exception as e:  # the exporters raise many types; report, try the next
            errors.append(one_line(e))
        finally:
            onnx_log.setLevel(level)
    raise RuntimeError("; ".join(errors))


def setup_ort(model, inputs, info: dict, threads: int, exporter: str, tmp: str) -> Callable:
    """onnxruntime CPU session, intra-op threads = cores, ORT_ENABLE_ALL."""
    import onnxruntime as ort

    path = os.path.join(tmp, f"model-{id(model)}.onnx")
    start = time.perf_counter()
    info["exporter"] = export_onnx(model, inputs, path, exporter)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    info["compile_s"] = time.perf_counter() - start
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"the ONNX graph takes {len(names)} inputs, the model {len(inputs)}")
    feeds = {n: x.numpy() for n, x in zip(names, inputs)}

    def run():
        outs = sess.run(None, feeds)
        return outs[0] if len(outs) == 1 else tuple(outs)
    return run


def setup_lmc(model, inputs, info: dict, target: str) -> Callable:
    """`lmc.compile(model, example, target=...)`; compile time includes the first call (kernels
    may be built lazily for the call's shapes)."""
    import lmc

    start = time.perf_counter()
    cm = lmc.compile(model, inputs, target=target)
    cm(*inputs)
    info["compile_s"] = time.perf_counter() - start
    # what the target made of the model (kernels by kind, ops left to the interpreter)
    info["report"] = json.loads(json.dumps(getattr(cm, "report", {}), default=str))
    return lambda: cm(*inputs)


def setup_tools(model, inputs, args, tmp: str) -> tuple[dict, dict]:
    """Build every requested tool for one case: ({tool: run fn}, {tool: info}); a tool that
    fails to build or to match eager's output shape has its error in info and no run fn."""
    runs: dict[str, Callable] = {}
    infos: dict[str, dict] = {}
    # eager always runs once: it is the reference output; it is timed only when asked for
    builders: dict[str, Callable[[dict], Callable]] = {"eager": lambda info: setup_eager(
        model, inputs)}
    if "compile" in args.tools:
        builders["compile"] = lambda info: setup_compile(model, inputs, info)
    if "ort" in args.tools:
        builders["ort"] = lambda info: setup_ort(model, inputs, info, args.threads,
                                                 args.onnx_exporter, tmp)
    if "lmc" in args.tools:
        for t in args.targets:
            builders[f"lmc:{t}"] = lambda info, t=t: setup_lmc(model, inputs, info, t)
    ref = None
    for tool, build in builders.items():
        info = infos[tool] = {}
        try:
            run = build(info)
            out = run()
            if tool == "eager":
                ref = out
            else:
                info["max_abs_diff"], info["ref_max_abs"] = max_abs_diff(out, ref)
            runs[tool] = run
        except Exception as e:  # soft failure: the table shows the error, the run goes on
            info["error"] = one_line(e)
        print(f"  {tool}: {info.get('error', 'ready')}", file=sys.stderr, flush=True)
    if "eager" not in args.tools:
        runs.pop("eager", None)
        infos.pop("eager", None)
    return runs, infos


def time_block(fn: Callable, n: int, retries: int) -> tuple[list[float], float, int]:
    """n timed calls of fn after a pause and one untimed call; a block during which other
    processes used >= QUIET_CORES is thrown away and redone (up to `retries` times): on a
    shared 2-core machine one busy neighbour stalls every barrier of a 2-thread tool.
    Returns (times, others' cores in the kept block, blocks thrown away)."""
    for attempt in range(retries + 1):
        gc.collect()
        mon = CpuMonitor()   # from before the pause: /proc/stat counts 10 ms ticks, too coarse
        time.sleep(PAUSE_S * (1 + 2 * attempt))   # for a block of a few 10 ms calls alone
        fn()   # untimed: wakes the tool's thread pool after the pause
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        other = mon.cores()["other_cores"]
        if other < QUIET_CORES:
            break
    return times, other, attempt


def measure(runs: dict[str, dict[str, Callable]], reps: int, rounds: int, retries: int) -> dict:
    """Times every (case, tool) in alternating rounds, rotating the order each round; returns
    {(case, tool): {"times", "other_cores", "discarded"}} or an error string for a tool that
    failed mid-run."""
    keys = [(c, t) for c, tools in runs.items() for t in tools]
    out: dict = {k: {"times": [], "other_cores": 0.0, "discarded": 0} for k in keys}
    per_block = -(-reps // rounds)
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)] if keys else []
        for key in order:
            if isinstance(out[key], str):
                continue
            try:
                times, other, thrown = time_block(runs[key[0]][key[1]], per_block, retries)
            except Exception as e:
                out[key] = f"failed while timing: {one_line(e)}"
                continue
            out[key]["times"] += times
            out[key]["other_cores"] = max(out[key]["other_cores"], round(other, 3))
            out[key]["discarded"] += thrown
    return out


def run_workload(args) -> dict:
    """Worker: one model workload, every tool, in this process."""
    import torch

    torch.set_num_threads(args.threads)
    cases = build_cases(args.worker)
    runs, result = {}, {}
    with tempfile.TemporaryDirectory(prefix="lmc-bench-") as tmp:
        for case, (model, inputs, flops) in cases.items():
            model.eval()
            print(f"[{args.worker}/{case}] setting up", file=sys.stderr, flush=True)
            runs[case], infos = setup_tools(model, inputs, args, tmp)
            result[case] = {"flops": flops, "tools": infos}
        print(f"[{args.worker}] timing", file=sys.stderr, flush=True)
        timed = measure(runs, args.reps, min(args.rounds, args.reps), args.noise_retries)
    for (case, tool), m in timed.items():
        info = result[case]["tools"][tool]
        if isinstance(m, str):
            info["error"] = m
            continue
        ts = m["times"]
        med = statistics.median(ts)
        info.update(median_ms=med * 1e3, min_ms=min(ts) * 1e3, n=len(ts),
                    gflops=result[case]["flops"] / med / 1e9,
                    times_ms=[round(t * 1e3, 4) for t in ts],
                    max_other_cores=m["other_cores"], discarded_blocks=m["discarded"])
    return {"cases": result}


def run_compile_worker(args) -> dict:
    """Worker: compile the GPT block; `lmc` times compile + first call twice in this process
    (cold with an empty cache dir, then warm), `torch` once (first call of torch.compile)."""
    import torch

    torch.set_num_threads(args.threads)
    (model, inputs, _), = build_cases("block").values()
    model.eval()
    out: dict = {}
    if args.worker == "compile_lmc":
        import lmc
        for key in ("first_s", "second_s"):
            start = time.perf_counter()
            try:
                cm = lmc.compile(model, inputs, target=args.targets[0])
                cm(*inputs)
            except Exception as e:
                out["error"] = one_line(e)
                break
            out[key] = time.perf_counter() - start
            out[key.replace("_s", "_cache_hit")] = bool(getattr(cm, "cache_hit", False))
        cache = os.environ.get("LMC_CACHE_DIR", "")
        out["cache_files"] = sum(len(f) for _, _, f in os.walk(cache)) if cache else 0
    else:
        try:
            info: dict = {}
            setup_compile(model, inputs, info)
            out["first_s"], out["graph_breaks"] = info["compile_s"], info["graph_breaks"]
        except Exception as e:
            out["error"] = one_line(e)
    return out


# ---------------------------------------------------------------- driver (parent side)

def worker_env(threads: int, **extra: str) -> dict[str, str]:
    """Thread counts for every BLAS/OpenMP runtime, set before the worker imports them."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def spawn(args, worker: str, env: dict[str, str], timeout: float = 1800) -> dict:
    """Runs this script as `--worker NAME` in a fresh process; returns its JSON or an error."""
    with tempfile.TemporaryDirectory(prefix="lmc-bench-out-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", worker, "--json-out", str(out),
               "--reps", str(args.reps), "--rounds", str(args.rounds),
               "--threads", str(args.threads), "--targets", ",".join(args.targets),
               "--tools", ",".join(args.tools), "--onnx-exporter", args.onnx_exporter,
               "--noise-retries", str(args.noise_retries)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=sys.stderr)
        except subprocess.TimeoutExpired:
            return {"error": f"worker {worker} timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            return {"error": f"worker {worker} exited with status {proc.returncode}"}
        # the whole process: interpreter start, imports, model build, compile, timing
        return {**json.loads(out.read_text()), "process_wall_s": time.perf_counter() - start}


def run_models(args, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmc-bench-cache-") as cache:
        env = worker_env(args.threads, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                         LMC_CACHE_DIR=os.path.join(cache, "lmc"))
        return spawn(args, name, env)


def run_compile(args) -> dict:
    """Cold compile of the GPT block: lmc in a fresh process with an empty LMC_CACHE_DIR (cold,
    then warm in the same process), then warm in a second fresh process with that cache dir;
    torch.compile likewise with TORCHINDUCTOR_CACHE_DIR."""
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="lmc-bench-cache-") as cache:
        lmc_env = worker_env(args.threads, LMC_CACHE_DIR=os.path.join(cache, "lmc"))
        if "lmc" in args.tools:
            res["lmc_cold"] = spawn(args, "compile_lmc", lmc_env)
            res["lmc_new_process"] = spawn(args, "compile_lmc", lmc_env)
        if "compile" in args.tools:
            ind_env = worker_env(args.threads,
                                 TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))
            res["torch_cold"] = spawn(args, "compile_torch", ind_env)
            res["torch_new_process"] = spawn(args, "compile_torch", ind_env)
    def get(run: str, key: str):
        return res.get(run, {}).get(key)
    summary = {"lmc_cold_s": get("lmc_cold", "first_s"),
               "lmc_warm_same_process_s": get("lmc_cold", "second_s"),
               "lmc_warm_new_process_s": get("lmc_new_process", "first_s"),
               "lmc_cache_files": get("lmc_cold", "cache_files"),
               "torch_compile_cold_s": get("torch_cold", "first_s"),
               "torch_compile_warm_new_process_s": get("torch_new_process", "first_s"),
               "lmc_error": get("lmc_cold", "error") or get("lmc_new_process", "error"),
               "torch_error": get("torch_cold", "error")}
    return {"summary": summary, "raw": res}


def run_gemm(args) -> dict:
    """bench/gemm.py's worker (lmc sgemm vs numpy, alternating blocks) at `threads` threads."""
    sizes = ",".join(str(s) for s in GEMM_SIZES)
    cmd = [sys.executable, str(ROOT / "bench" / "gemm.py"), "--worker", "--sizes", sizes,
           "--reps", str(max(args.reps, 2)), "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, env=worker_env(args.threads), capture_output=True, text=True,
                              timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "bench/gemm.py timed out"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"status {proc.returncode}"]
        return {"error": f"bench/gemm.py failed: {tail[0][:300]}"}
    return {"rows": json.loads(proc.stdout.strip().splitlines()[-1])}


# ---------------------------------------------------------------- report

def machine_facts(threads: int) -> dict:
    """What the figures depend on: CPU (as LLVM and /proc/cpuinfo name it), cores, versions."""
    from importlib import metadata

    import llvmlite.binding as llvm

    from lmc.backends.cpu import host_target

    host = host_target()
    model = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                  if ln.startswith("model name")), platform.processor())
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    versions = {pkg: installed.get(pkg) for pkg in
                ("torch", "onnxruntime", "onnx", "onnxscript", "llvmlite", "numpy")}
    return {"cpu": llvm.get_host_cpu_name(), "cpu_model": model, "avx512": host.has_avx512,
            "fma": host.has_fma, "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "versions": versions, "commit": _git_commit(),
            "load_avg_start": os.getloadavg()[0]}


class CpuMonitor:
    """CPU time the rest of the machine used while we ran (other processes, hypervisor steal):
    on a shared 2-core machine that, not the load average, says whether figures are clean."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float, float]:
        fields = [int(f) for f in _read("/proc/stat").split("\n", 1)[0].split()[1:9]] or [0] * 8
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        user, nice, system, _, _, irq, softirq, steal = (f / tick for f in fields)
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), user + nice + system + irq + softirq, steal, own

    def cores(self) -> dict[str, float]:
        """Average cores busy with others' work and stolen by the hypervisor since start."""
        end = self._sample()
        wall, busy, steal, own = (b - a for a, b in zip(self.start, end))
        wall = max(wall, 1e-9)
        return {"other_cores": round(max(busy - own, 0.0) / wall, 3),
                "steal_cores": round(steal / wall, 3)}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git_commit() -> str | None:
    """HEAD, with `+dirty` when the working tree has changes (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _cell_error(msg: str) -> str:
    """An error as a table cell: one line, pipes escaped, cut to fit."""
    return "error: " + msg.replace("|", "\\|")[:80]


def tool_cell(info: dict | None) -> str:
    """One table cell: median ms (+ compile s, graph breaks, a wrong-output flag) or error."""
    if info is None:
        return "—"
    if "error" in info:
        return _cell_error(info["error"])
    text = f"{info['median_ms']:.2f} ms"
    extra = []
    if "compile_s" in info:
        extra.append(f"{info['compile_s']:.1f} s")
    if info.get("graph_breaks"):
        extra.append(f"{info['graph_breaks']} graph breaks, {info.get('graphs', 0)} graphs")
    if extra:
        text += f" ({', '.join(extra)})"
    if wrong_output(info):
        text += f" ⚠ max Δ {info['max_abs_diff']:.2g}"
    if info.get("max_other_cores", 0.0) >= QUIET_CORES:
        text += f" (noisy: others {info['max_other_cores']:.1f} cores)"
    return text


def wrong_output(info: dict) -> bool:
    """True when the tool's output is off from eager's beyond DIFF_TOL (so its time is moot)."""
    return info.get("max_abs_diff", 0.0) > DIFF_TOL * max(1.0, info.get("ref_max_abs", 0.0))


def usable(info: dict | None) -> bool:
    """A timed, correct measurement: one that can be an anchor or lmc's figure."""
    return bool(info) and "median_ms" in info and not wrong_output(info)


def goal_cells(goal: Goal | None, lmc: dict | None, anchors: dict[str, dict]) -> list[str]:
    """goal, lmc / best anchor (speed-up; > 1 means lmc is faster), met? — for a model row."""
    best = min(((i["median_ms"], name) for name, i in anchors.items() if usable(i)),
               default=None)
    if best is None or not usable(lmc):
        return [goal.text if goal else "—", "—", "no" if goal else "—"]
    ratio = best[0] / lmc["median_ms"]
    met = ("yes" if ratio >= goal.speedup else "no") if goal and goal.speedup else "—"
    return [goal.text if goal else "—", f"{ratio:.2f}× vs {best[1]}", met]


def model_rows(name: str, res: dict, targets: list[str]) -> list[list[str]]:
    spec = SPECS[name]
    if "error" in res:
        return [[spec.title, *[_cell_error(res["error"])] * len(targets), "", "", "", "", "",
                 ""]]
    cases = res["cases"]
    anchor_cases = spec.anchor_cases or tuple(cases)
    anchors = {(f"{t} ({c})" if len(anchor_cases) > 1 else t): cases[c]["tools"].get(t)
               for c in anchor_cases if c in cases for t in ("eager", "compile", "ort")}
    rows = []
    for i, (case, data) in enumerate(cases.items()):
        tools = data["tools"]
        label = spec.cases.get(case, spec.title)
        cells = [label, *(tool_cell(tools.get(f"lmc:{t}")) for t in targets),
                 tool_cell(tools.get("eager")), tool_cell(tools.get("compile")),
                 tool_cell(tools.get("ort"))]
        lmc = tools.get(f"lmc:{targets[0]}")
        cells += goal_cells(spec.goal if i == 0 else None, lmc, anchors if i == 0 else {
            t: tools.get(t) for t in ("eager", "compile", "ort")})
        rows.append(cells)
    return rows


def gemm_rows(res: dict, targets: list[str]) -> list[list[str]]:
    """One row per size: lmc's `sgemm` (in the cpu column when there is one) vs numpy."""
    col = targets.index("cpu") if "cpu" in targets else 0

    def lmc_cells(text: str) -> list[str]:
        return [text if i == col else "—" for i in range(len(targets))]
    if "error" in res:
        return [["GEMM 512²–2048²", *lmc_cells(_cell_error(res["error"])), "—", "—", "—",
                 GEMM_GOAL.text, "—", "no"]]
    rows = []
    for r in res["rows"]:
        met = "yes" if r["ratio"] >= GEMM_GOAL.speedup else "no"
        rows.append([f"GEMM {r['size']}², {r['threads']} threads (lmc: `sgemm`)",
                     *lmc_cells(f"{r['lmc_gflops']:.0f} GFLOP/s"),
                     f"numpy {r['numpy_gflops']:.0f} GFLOP/s", "—", "—", GEMM_GOAL.text,
                     f"{r['ratio']:.2f}× vs numpy", met])
    return rows


def compile_row(res: dict, targets: list[str]) -> list[str]:
    s = res["summary"]

    def sec(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f} s"
    lmc = (_cell_error(s["lmc_error"]) if s["lmc_error"] else "—" if s["lmc_cold_s"] is None
           else f"cold {sec(s['lmc_cold_s'])}, warm {sec(s['lmc_warm_same_process_s'])} / "
           f"{sec(s['lmc_warm_new_process_s'])} (same / new process)")
    torch_cell = (_cell_error(s["torch_error"]) if s["torch_error"] else "—"
                  if s["torch_compile_cold_s"] is None else
                  f"cold {sec(s['torch_compile_cold_s'])}, warm "
                  f"{sec(s['torch_compile_warm_new_process_s'])} (new process)")
    ratio, met = "—", "no"
    cold, torch_cold = s["lmc_cold_s"], s["torch_compile_cold_s"]
    warm = [s["lmc_warm_same_process_s"], s["lmc_warm_new_process_s"]]
    if cold is not None and torch_cold is not None:
        ratio = f"{torch_cold / cold:.1f}× vs torch.compile (cold)"
    if cold is not None and None not in warm:
        met = "yes" if cold <= COLD_S and max(warm) <= WARM_S else "no"
    return ["cold compile, GPT block", lmc, *["—"] * (len(targets) - 1), "—", torch_cell, "—",
            COMPILE_GOAL.text, ratio, met]


def render(results: dict, facts: dict, targets: list[str]) -> str:
    """The markdown report: machine line, then one table row per workload case."""
    lmc_cols = [f"lmc ({t})" for t in targets]
    head = ["workload", *lmc_cols, "eager", "torch.compile (compile s)", "onnxruntime", "goal",
            "lmc / best anchor", "met?"]
    rows: list[list[str]] = []
    for name, res in results.items():
        if name == "gemm":
            new = gemm_rows(res, targets)
        elif name == "compile":
            new = [compile_row(res, targets)]
        else:
            new = model_rows(name, res, targets)
        other = res.get("machine_load", {}).get("other_cores", 0.0)
        if other >= QUIET_CORES and name in ("gemm", "compile"):  # models flag per cell
            for row in new:
                row[0] += f" (noisy: others used {other:.2f} cores)"
        rows += new
    v = facts["versions"]
    lines = [f"CPU benchmark {facts['date']}: {facts['cpu']} ({facts['cpu_model']}), "
             f"{'AVX-512' if facts['avx512'] else 'AVX2, no AVX-512'}, {facts['cores']} cores, "
             f"{facts['threads']} threads per tool; torch {v['torch']}, onnxruntime "
             f"{v['onnxruntime']}, llvmlite {v['llvmlite']}; commit {facts['commit']}; load "
             f"{facts['load_avg_start']:.2f} → {facts['load_avg_end']:.2f}, other processes "
             f"used {facts['other_cores']:.2f} cores on average (steal {facts['steal_cores']:.2f})."
             f" Medians of {facts['reps']} calls per tool in {facts['rounds']} alternating "
             "rounds; parentheses: compile time (first call).", "",
             "| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "lmc / best anchor: the fastest of eager, torch.compile and onnxruntime in "
              "this run (for LoRA: including the merged linear) divided by lmc's time; > 1 means "
              f"lmc is faster. ⚠: output differs from eager by more than {DIFF_TOL:g}·max|y|.",
              ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from {','.join(WORKLOADS)}")
    p.add_argument("--reps", type=int, default=20, help="timed calls per tool (median)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="alternating rounds")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 reps in 2 rounds")
    p.add_argument("--targets", default="cpu", help="lmc targets, e.g. cpu or ref or cpu,ref")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"from {','.join(TOOLS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--onnx-exporter", choices=["auto", "dynamo", "legacy"], default="auto",
                   help="auto: dynamo if onnxscript is installed (falling back), else legacy")
    p.add_argument("--noise-retries", type=int, default=3,
                   help="redo a timed block up to N times when other processes were busy")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each workload wait up to S seconds for other processes to use "
                   f"< {QUIET_CORES} cores")
    p.add_argument("--out", help="results path without extension (default "
                   "bench/results/cpu-<date>[-<targets>][-quick])")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.rounds = 4, 2
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.targets = [t for t in args.targets.split(",") if t]
    args.tools = [t for t in args.tools.split(",") if t]
    for kind, got, known in (("workload", args.workloads, WORKLOADS), ("tool", args.tools, TOOLS)):
        bad = [g for g in got if g not in known]
        if bad:
            p.error(f"unknown {kind}(s) {','.join(bad)}; choose from {','.join(known)}")
    if not args.targets or args.reps < 1 or args.rounds < 1:
        p.error("need at least one target, --reps >= 1 and --rounds >= 1")
    return args


def output_stem(args, date: str) -> Path:
    if args.out:
        return Path(args.out)
    suffix = "" if args.targets == ["cpu"] else "-" + "+".join(args.targets)
    return ROOT / "bench" / "results" / f"cpu-{date}{suffix}{'-quick' if args.quick else ''}"


def wait_quiet(max_s: float, window_s: float = 5.0) -> float:
    """Waits (up to max_s) until other processes use < QUIET_CORES over a window; returns the
    last window's figure."""
    deadline = time.monotonic() + max_s
    while True:
        mon = CpuMonitor()
        time.sleep(window_s)
        other = mon.cores()["other_cores"]
        if other < QUIET_CORES or time.monotonic() >= deadline:
            return other
        print(f"waiting for a quiet machine: others use {other:.2f} cores", file=sys.stderr,
              flush=True)


def run_all(args) -> dict:
    """Every workload in turn, each with the machine's foreign load while it ran."""
    results = {}
    for name in args.workloads:
        if args.wait_quiet:
            wait_quiet(args.wait_quiet)
        print(f"== {name}", file=sys.stderr, flush=True)
        mon = CpuMonitor()
        if name == "gemm":
            results[name] = run_gemm(args)
        elif name == "compile":
            results[name] = run_compile(args)
        else:
            results[name] = run_models(args, name)
        results[name]["machine_load"] = mon.cores()
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        res = (run_compile_worker(args) if args.worker.startswith("compile_")
               else run_workload(args))
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
        return
    sys.path.insert(0, str(ROOT))
    facts = machine_facts(args.threads)
    facts["other_cores_start"] = wait_quiet(0.0, window_s=2.0)
    if facts["other_cores_start"] >= QUIET_CORES:
        print(f"warning: other processes use {facts['other_cores_start']:.2f} cores: figures "
              "will be noisy (--wait-quiet S waits for a quiet machine)", file=sys.stderr)
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    monitor = CpuMonitor()
    results = run_all(args)
    facts.update(monitor.cores())
    facts.update(date=date, load_avg_end=os.getloadavg()[0], reps=args.reps,
                 rounds=min(args.rounds, args.reps), targets=args.targets, tools=args.tools)
    table = render(results, facts, args.targets)
    print(table)
    stem = output_stem(args, date)
    stem.parent.mkdir(parents=True, exist_ok=True)
    goals = {name: {"goal": s.goal.text, "baseline": s.goal.baseline}
             for name, s in SPECS.items() if s.goal}
    goals.update(gemm={"goal": GEMM_GOAL.text, "baseline": GEMM_GOAL.baseline},
                 compile={"goal": COMPILE_GOAL.text, "baseline": COMPILE_GOAL.baseline})
    doc = {"machine": facts, "goals": goals, "results": results}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem.with_suffix('.json')} and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
